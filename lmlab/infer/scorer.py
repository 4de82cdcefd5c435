"""The scorer API: score (problem, answer) pairs with a trained verifier or reward model.

    from lmlab.infer.scorer import Verifier, RewardModel, Scorer
    v = Verifier.load("runs/verifier")                 # device="cpu" | "cuda" | "auto"
    v.score("What is 2+3?", "2 + 3 = 5\\n#### 5")       # -> 0.93 (P(correct), a float in [0, 1])
    v.score(["What is 2+3?"] * 2, ["#### 5", "#### 6"], batch_size=32)   # -> [0.93, 0.04]
    rm = RewardModel.load("runs/reward")
    rm.score(question, reply)                          # -> the raw reward r (any real number)
    v.tokenizer_sha256, v.kind, v.template, v.level, v.max_len, v.path
    v.check_tokenizer(policy_tokenizer)                # UserError when they differ

How a pair becomes tokens (the one function the `verifier` and `reward` stages train with, so
scoring sees exactly what training saw): `encode_reply` renders the conversation
[user: problem] + [assistant: answer] with the scorer's chat template (lmlab.data.chat.render,
as SFT renders a conversation: bos first, message text escaped so it never yields a control
token) and keeps the tokens up to the end of the reply's trained span: the reply and its
end-of-turn marker (`<|im_end|>` for chatml, `<|eos|>` for the others). `problem` may also be a
whole conversation (a list of {"role", "content"} messages ending with a user turn), as in
multi-turn preference data. The score is read at the last token, the end-of-turn marker:
the head's output after the model has read the problem and the whole reply.

A verifier's score is σ(logit), the probability that the answer is correct; a reward model's
is the raw reward. Inputs longer than the scorer's `max_len` (the training max_len) keep
their end: bos, then the last max_len − 1 tokens (the start of the prompt goes first, then
the start of the reply), so scoring never fails on length. Batches are right-padded (causal
attention: a real token never sees the padding after it) and formed longest first; a batch
gives the same scores as one pair at a time (to float rounding).

Layering: this module imports lmlab.models, lmlab.data and lmlab.runtime/errors only (never lmlab.train).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from lmlab.errors import UserError

Problem = Union[str, list]  # a user turn, or a conversation ending with one


@dataclass(frozen=True)
class Encoded:
    """A rendered (prompt, reply): `ids` up to the reply's end-of-turn token, the reply from `start`.

    `cut` counts the tokens removed after bos to fit max_len; `prompt_tokens` is how many
    prompt tokens (after bos) are left, `reply_tokens` the reply's tokens (end marker included).
    """

    ids: list[int]
    start: int
    cut: int
    prompt_tokens: int

    @property
    def reply_tokens(self) -> int:
        return len(self.ids) - self.start


def as_conversation(problem: Problem) -> list[dict]:
    """A user turn (str) -> [{"role": "user", "content": problem}]; a message list is checked and kept."""
    if isinstance(problem, str):
        return [{"role": "user", "content": problem}]
    from lmlab.data.chat import validate_conversation

    conv = validate_conversation(problem, "problem", need_assistant=False)
    if conv[-1]["role"] != "user":
        raise UserError("problem: a conversation to score must end with a user turn (the reply is the answer)")
    return conv


def encode_reply(template: str, messages: list[dict], reply: str, tokenizer,
                 max_len: Optional[int] = None) -> Encoded:
    """Render messages + [assistant: reply]; keep up to the reply's end-of-turn token; fit max_len.

    Too long: bos is kept and the tokens right after it go (the start of the prompt, then of
    the reply), so the end, where the score is read, always stays.
    """
    from lmlab.data.chat import render

    ids, mask = render(template, list(messages) + [{"role": "assistant", "content": reply}], tokenizer)
    end = len(mask)
    while end > 0 and not mask[end - 1]:
        end -= 1
    if end == 0:
        raise UserError(f"the chat template {template!r} marked no reply tokens; check the template")
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    ids = list(ids[:end])
    head = 1 if ids and ids[0] == tokenizer.bos_id else 0
    cut = 0
    if max_len is not None and len(ids) > max_len:
        if max_len < head + 1:
            raise ValueError(f"max_len={max_len} leaves no room for a token after bos")
        cut = len(ids) - max_len
        ids = ids[:head] + ids[head + cut:]
        start = max(start - cut, head)
    return Encoded(ids=ids, start=start, cut=cut, prompt_tokens=start - head)


def collate_replies(seqs: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int) -> dict:
    """Right-padded token rows -> {"x" (B, T) int64, "last" (B,) int64, "mask" (B, T) bool}.

    `last[i]` is the index of row i's last token (where a sequence score is read); `mask` is
    True on the reply's tokens start..last (where a token-level verifier is trained).
    """
    T = max(len(s) for s in seqs)
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    last = torch.empty(len(seqs), dtype=torch.long)
    for r, (s, start) in enumerate(zip(seqs, starts)):
        x[r, :len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
        mask[r, start:len(s)] = True
        last[r] = len(s) - 1
    return {"x": x, "last": last, "mask": mask}


def pad_id_of(tokenizer) -> int:
    """The id right padding uses (never read: causal attention and the scores stop at `last`)."""
    pad = getattr(tokenizer, "pad_id", None)
    return pad if pad is not None and pad >= 0 else 0


def read_scores(scores: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(B, T) scores -> (B,) the score at each row's last token."""
    return scores[torch.arange(scores.shape[0], device=scores.device), last.to(scores.device)]


class Scorer:
    """A trained scorer (verifier or reward model) with its tokenizer and chat template."""

    KIND: Optional[str] = None  # Verifier / RewardModel check it on load

    def __init__(self, model, tokenizer, meta: dict, device: torch.device, path: Optional[str] = None) -> None:
        self.model, self.tokenizer, self.meta, self.device = model, tokenizer, meta, device
        self.path = path  # the scorer directory it was loaded from
        self.kind: str = meta["kind"]
        self.template: str = meta["template"]
        self.level: str = meta["level"]
        self.max_len: Optional[int] = meta.get("max_len") or getattr(model, "max_context", None)
        self.tokenizer_sha256: str = meta.get("tokenizer_sha256") or tokenizer.sha256
        self.pad_id = pad_id_of(tokenizer)

    @classmethod
    def load(cls, scorer_dir: str | Path, device: str | torch.device = "cpu") -> "Scorer":
        """A scorer directory written by `lmlab verifier` or `lmlab reward`, on `device` (or "auto")."""
        from lmlab.data.chat import check_template
        from lmlab.models.scorer import load_scorer, read_scorer_meta
        from lmlab.runtime import pick_device

        meta = read_scorer_meta(scorer_dir)
        if cls.KIND is not None and meta["kind"] != cls.KIND:
            other = {"verifier": "Verifier", "reward": "RewardModel"}[meta["kind"]]
            raise UserError(f"{scorer_dir} is a {meta['kind']} scorer, not a {cls.KIND}; load it with "
                            f"{other}.load (or Scorer.load)")
        dev = pick_device(device) if isinstance(device, str) else torch.device(device)
        model, tokenizer, meta = load_scorer(scorer_dir, dev)
        check_template(meta["template"], tokenizer)
        return cls(model, tokenizer, meta, dev, str(scorer_dir))

    def check_tokenizer(self, other, what: str = "the policy") -> None:
        """UserError when `other` (a Tokenizer or a sha256 string) is not the scorer's tokenizer.

        A scorer re-tokenizes the text it is given, so it works with any policy; but token-level
        uses (scores at the policy's token positions) and reproducibility need the same one.
        """
        sha = other if isinstance(other, str) else getattr(other, "sha256", None)
        if sha != self.tokenizer_sha256:
            raise UserError(f"the {self.kind} scorer was trained with tokenizer {self.tokenizer_sha256[:12]} but "
                            f"{what} uses {str(sha)[:12]}; train the scorer from a model with {what}'s tokenizer "
                            f"(init=...)")

    def encode(self, problem: Problem, answer: str) -> Encoded:
        if not isinstance(answer, str):
            raise TypeError(f"an answer must be a str, got {type(answer).__name__}")
        return encode_reply(self.template, as_conversation(problem), answer, self.tokenizer, self.max_len)

    @torch.no_grad()
    def score(self, problems: Union[Problem, Sequence[Problem]], answers: Union[str, Sequence[str]],
              batch_size: int = 32) -> Union[float, list[float]]:
        """Score each (problem, answer): a float for one pair, a list for lists (same order).

        Verifier: P(correct) in [0, 1]; reward model: the raw reward.
        """
        single = isinstance(problems, str) or (isinstance(problems, list) and bool(problems)
                                                 and isinstance(problems[0], dict))
        if single:
            if not isinstance(answers, str):
                raise TypeError("one problem takes one answer (a str); pass lists to score several pairs")
            problems, answers = [problems], [answers]
        elif isinstance(answers, str):
            raise TypeError("several problems take a list of answers, one per problem")
        problems, answers = list(problems), list(answers)
        if len(problems) != len(answers):
            raise ValueError(f"{len(problems)} problems but {len(answers)} answers")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        encoded = [self.encode(p, a) for p, a in zip(problems, answers)]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].ids))
        out = [0.0] * len(encoded)
        self.model.eval()
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = collate_replies([encoded[i].ids for i in idx], [encoded[i].start for i in idx], self.pad_id)
            values = read_scores(self.model(batch["x"].to(self.device)), batch["last"]).float()
            if self.kind == "verifier":
                values = torch.sigmoid(values)
            for i, v in zip(idx, values.cpu().tolist()):
                out[i] = v
        return out[0] if single else out


class Verifier(Scorer):
    """A Scorer that loads only verifiers: score() is P(correct)."""

    KIND = "verifier"


class RewardModel(Scorer):
    """A Scorer that loads only reward models: score() is the raw Bradley-Terry reward."""

    KIND = "reward"
