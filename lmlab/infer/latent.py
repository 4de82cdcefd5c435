"""Answering with LLM-TRM's reasoner in place of thinking (phase 3; docs/llm_trm.md).

    from lmlab.infer.latent import LatentPrompts, answer_latent, answer_first_token
    lp = LatentPrompts(tokenizer, "think", k=4)
    p = lp.build(question)          # p.reads: the prompt the LLM's states are read on (before <think>)
                                    # p.ids, p.slots: <think> k placeholders </think> in the prompt
    outs, steps = answer_latent(llm, reasoner, tokenizer, lp, questions, Sampling(max_new_tokens=24))
    texts, tokens, steps = answer_first_token(llm, reasoner, tokenizer, lp, questions, Sampling(max_new_tokens=24))

The layout is the thinking template's own with the thinking text replaced: the prompt that asks
to answer at once (`<think>`, an empty gap, `</think>`, then the answer; chat.prompt_ids with
thinking=False) with the gap's tokens replaced by k placeholder positions whose input vectors
come from the reasoner. The reasoner reads the LLM's last-layer states over the prompt up to the
assistant header (where the model would open `<think>`), as `lmlab hidden-pairs` stores them.

The first-token variant (the prototype's use of its prediction, src/models/inference.py there)
gives the LLM no vectors: the output head reads the reasoner's decompressed prediction to pick
the first answer token after the empty-thinking prompt, and the LLM goes on from the prompt plus
that token. (The prototype runs its TRM on the states of that whole prompt; here it reads the
prompt it was trained on, up to the assistant header.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from lmlab.errors import UserError


@dataclass
class LatentPrompt:
    reads: list[int]     # the prompt up to the assistant header: the states the reasoner reads
    ids: list[int]       # prompt with <think> k placeholders </think> (then the template's gap)
    slots: list[int]     # positions of the k placeholders in `ids`
    direct: list[int]    # the empty-thinking prompt (answer at once)


class LatentPrompts:
    """Builds the three prompts of a question for a thinking template."""

    def __init__(self, tokenizer, template: str, k: int, max_len: Optional[int] = None):
        from lmlab.data.chat import THINK_CLOSE, THINK_OPEN, check_thinking_template

        check_thinking_template(template, tokenizer, "latent reasoning")
        self.tokenizer, self.template, self.k, self.max_len = tokenizer, template, k, max_len
        self.opener, self.closer = tokenizer.special_tokens[THINK_OPEN], tokenizer.special_tokens[THINK_CLOSE]
        self.placeholder = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else 0

    def build(self, question: str) -> LatentPrompt:
        from lmlab.infer.prompting import question_prompt

        reads = question_prompt(self.template, question, self.tokenizer, max_len=self.max_len)
        direct = question_prompt(self.template, question, self.tokenizer, max_len=self.max_len, thinking=False)
        o = len(direct) - 1 - direct[::-1].index(self.opener)
        c = len(direct) - 1 - direct[::-1].index(self.closer)
        ids = direct[:o + 1] + [self.placeholder] * self.k + direct[c:]
        return LatentPrompt(reads, ids, list(range(o + 1, o + 1 + self.k)), direct)

    def gap_ids(self) -> list[int]:
        """The tokens an empty thinking block holds between the delimiters (the projection's start)."""
        from lmlab.infer.prompting import question_prompt

        direct = question_prompt(self.template, "", self.tokenizer, thinking=False)
        o = len(direct) - 1 - direct[::-1].index(self.opener)
        c = len(direct) - 1 - direct[::-1].index(self.closer)
        return direct[o + 1:c]


def slot_init(llm, lp: LatentPrompts) -> torch.Tensor:
    """(k, d_model): the input embeddings of the empty gap's tokens, repeated to k slots."""
    gap = lp.gap_ids() or [lp.placeholder]
    ids = torch.tensor([gap[i % len(gap)] for i in range(lp.k)])
    emb = llm.embed.weight if hasattr(llm, "embed") else None
    if emb is None:
        raise UserError("the LLM has no input embedding table (`embed`) to start the latent slots from")
    return emb.detach()[ids.to(emb.device)].float().cpu()


@torch.no_grad()
def reason(llm, reasoner, prompts: Sequence[LatentPrompt], batch_size: int, device=None,
           states: Optional[Sequence[torch.Tensor]] = None):
    """(vectors (n, k, d_model), decompressed predictions (n, D), steps (n,)) of the prompts; the
    LLM's states over each prompt's `reads` are computed unless given as `states`."""
    from lmlab.infer.hidden import hidden_states
    from lmlab.models.seqtrm import left_pad

    device = device or next(llm.parameters()).device
    if states is None:
        states = hidden_states(llm, [p.reads for p in prompts], batch_size=batch_size, device=device)
    vecs, hs, steps = [], [], []
    for s in range(0, len(prompts), batch_size):
        x, mask = left_pad(list(states[s:s + batch_size]), device)
        v, h, st = reasoner(x, mask)
        vecs.append(v.float().cpu())
        hs.append(h.float().cpu())
        steps.append(st.cpu())
    return torch.cat(vecs), torch.cat(hs), torch.cat(steps)


def answer_with_vectors(llm, tokenizer, prompts: Sequence[LatentPrompt], vectors: torch.Tensor, sampling,
                        stops, batch_size: int = 32, device=None):
    """Completions of latent prompts with `vectors` (n, k, d_model) at their slots."""
    from lmlab.infer.engine import complete_ids

    return complete_ids(llm, tokenizer, [p.ids for p in prompts], sampling, stops, batch_size, device,
                        vectors=[(p.slots, v) for p, v in zip(prompts, vectors)])


def answer_from_states(llm, tokenizer, prompts: Sequence[LatentPrompt], hs: torch.Tensor, sampling, stops,
                       batch_size: int = 32, device=None):
    """(texts, tokens generated) when the output head on the predicted states `hs` (n, D) picks the
    first answer token after each empty-thinking prompt and the LLM writes the rest (the
    prototype's first-token variant)."""
    from lmlab.infer.engine import complete_ids

    head = next(llm.parameters())
    firsts = llm.logits(hs.to(head.device, head.dtype)).argmax(-1).tolist()
    outs = complete_ids(llm, tokenizer, [p.direct + [t] for p, t in zip(prompts, firsts)], sampling, stops,
                        batch_size, device)
    return [tokenizer.decode([t]) + o.text for t, o in zip(firsts, outs)], [len(o.ids) + 1 for o in outs]


def answer_latent(llm, reasoner, tokenizer, lp: LatentPrompts, questions: Sequence[str], sampling, batch_size: int = 32,
                  device=None, stops=None):
    """(completions (lmlab.infer.engine.Completion), TRM steps per question) with the latent vectors."""
    from lmlab.infer.prompting import chat_stops

    prompts = [lp.build(q) for q in questions]
    vecs, _, steps = reason(llm, reasoner, prompts, batch_size, device)
    outs = answer_with_vectors(llm, tokenizer, prompts, vecs, sampling, stops or chat_stops(lp.template, tokenizer),
                               batch_size, device)
    return outs, steps.tolist()


def answer_first_token(llm, reasoner, tokenizer, lp: LatentPrompts, questions: Sequence[str], sampling,
                       batch_size: int = 32, device=None, stops=None):
    """(texts, tokens generated, TRM steps) per question, as the prototype answers: the output
    head on the reasoner's predicted state picks the first answer token after the whole
    empty-thinking prompt, and the LLM writes the rest from there."""
    from lmlab.infer.prompting import chat_stops

    prompts = [lp.build(q) for q in questions]
    _, hs, steps = reason(llm, reasoner, prompts, batch_size, device)
    texts, tokens = answer_from_states(llm, tokenizer, prompts, hs, sampling,
                                       stops or chat_stops(lp.template, tokenizer), batch_size, device)
    return texts, tokens, steps.tolist()
