"""The verifier's training examples: labelled model samples and synthetic pairs, tokenized, split by problem.

Read by `lmlab verifier` (lmlab.train.verifier, whose docstring tells the whole story):

  SamplesSpec         a `data` source: samples from `lmlab samples` (a directory holding
                      samples.jsonl, or such a .jsonl file), its weight and max_records
  read_samples        every sample of a source, checked: at least problem (int), question (str),
                      completion (str: the model's solution), correct (bool) and k (int)
  tokenize_examples   samples -> (question, completion, correct); synthetic preference pairs ->
                      chosen as a correct example, rejected as a wrong one ("synthetic wrong
                      solutions"); each rendered by encode_example (lmlab.train.scorer_common)
  split_by_problem    the held-out problems (by question text, over all sources): no problem is on
                      both sides; validation uses the model samples
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import Field

from lmlab import artifacts
from lmlab.config import Strict
from lmlab.errors import UserError
from lmlab.runtime import progress
from lmlab.train.scorer_common import Sequences, conversation_key, encode_example

SAMPLES_FILE = "samples.jsonl"
# the keys of a samples record the verifier reads (lmlab samples writes these and more)
SAMPLE_KEYS = ("problem", "question", "completion", "correct", "k")


class SamplesSpec(Strict):
    path: str = Field(..., description="a directory written by `lmlab samples` (holding samples.jsonl) or a samples "
                      ".jsonl file")
    weight: float = Field(1.0, gt=0, description="relative share of the training examples when sources are mixed")
    max_records: Optional[int] = Field(None, ge=1, description="use at most this many samples (the first ones)")

    def name(self) -> str:
        return self.path


def samples_path(spec: SamplesSpec) -> Path:
    p = Path(spec.path)
    if p.is_dir():
        if not (p / SAMPLES_FILE).is_file():
            raise UserError(f"{p} has no {SAMPLES_FILE}; give a directory written by `lmlab samples` or a samples "
                            f".jsonl file")
        return p / SAMPLES_FILE
    if not p.is_file():
        raise UserError(f"samples not found: {p} (run `lmlab samples` first, or fix the path)")
    return p


def read_samples(spec: SamplesSpec) -> list[tuple[str, dict]]:
    """(FILE:LINE, record) of every sample, checked: the keys the verifier reads, with their types."""
    from lmlab.data.records import iter_jsonl

    path = samples_path(spec)
    out = []
    for n, rec in iter_jsonl(path):
        where = f"{path}:{n}"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: a samples record must be a JSON object, got {type(rec).__name__}")
        missing = [k for k in SAMPLE_KEYS if k not in rec]
        if missing:
            raise UserError(f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
                            f"a samples record has {', '.join(SAMPLE_KEYS)} (as `lmlab samples` writes them)")
        if not isinstance(rec["question"], str) or not rec["question"].strip():
            raise UserError(f"{where}: 'question' must be a non-empty string")
        if not isinstance(rec["completion"], str):
            raise UserError(f"{where}: 'completion' must be a string (the model's solution)")
        if not isinstance(rec["correct"], bool):
            raise UserError(f"{where}: 'correct' must be true or false, got {rec['correct']!r}")
        for key in ("problem", "k"):
            if not isinstance(rec[key], int) or isinstance(rec[key], bool):
                raise UserError(f"{where}: '{key}' must be an integer, got {rec[key]!r}")
        out.append((where, rec))
        if spec.max_records and len(out) >= spec.max_records:
            break
    if not out:
        raise UserError(f"{path} holds no samples; run `lmlab samples` to write some")
    return out


class Examples:
    """Labelled, tokenized verifier examples: sequences plus label, source, problem key and sample info."""

    def __init__(self) -> None:
        self.seqs = Sequences()
        self.label: list[int] = []
        self.source: list[int] = []
        self.key: list[str] = []
        self.info: list[Optional[dict]] = []  # samples: {"problem", "k", "task"}; synthetic: None

    def add(self, encoded, label: int, source: int, key: str, info: Optional[dict]) -> None:
        self.seqs.add(encoded)
        self.label.append(int(label))
        self.source.append(source)
        self.key.append(key)
        self.info.append(info)

    def __len__(self) -> int:
        return len(self.label)

    def fingerprint(self) -> str:
        return artifacts.fingerprint({"seqs": self.seqs.fingerprint(), "labels": self.label, "source": self.source})


def tokenize_examples(samples: list[list[tuple[str, dict]]], synthetic: list[list[dict]],
                      synthetic_where: list[list[str]], template: str, tokenizer, max_len: int,
                      truncation: str) -> tuple[Examples, dict]:
    """Samples sources first (source s), then synthetic ones (source len(samples) + j) -> (Examples, counts)."""
    ex = Examples()
    counts = {"examples_read": 0, "examples_truncated": 0, "examples_dropped": 0}
    too_long: list[tuple[str, int]] = []
    total = sum(len(s) for s in samples) + 2 * sum(len(p) for p in synthetic)
    bar = progress(total=total, desc="verifier: tokenize", unit="example")

    def add(where, messages, reply, label, source, info):
        counts["examples_read"] += 1
        bar.update(1)
        enc, status = encode_example(template, messages, reply, tokenizer, max_len, truncation)
        if status == "too_long":
            too_long.append((where, len(enc.ids)))
            return
        if status == "dropped":
            counts["examples_dropped"] += 1
            return
        counts["examples_truncated"] += status == "truncated"
        ex.add(enc, label, source, conversation_key(messages), info)

    for s, records in enumerate(samples):
        for where, rec in records:
            messages = [{"role": "user", "content": rec["question"]}]
            add(where, messages, rec["completion"], rec["correct"], s,
                {"problem": rec["problem"], "k": rec["k"], "task": rec.get("task")})
    for j, (pairs, wheres) in enumerate(zip(synthetic, synthetic_where)):
        for pair, where in zip(pairs, wheres):
            add(where, pair["prompt"], pair["chosen"], 1, len(samples) + j, None)
            add(where, pair["prompt"], pair["rejected"], 0, len(samples) + j, None)
    bar.close()
    if too_long:
        where, length = too_long[0]
        raise UserError(f"{len(too_long)} example(s) are longer than max_len={max_len} tokens, first: {where} "
                        f"({length} tokens); raise max_len (up to the model's max_seq_len), or set truncation=left "
                        f"to cut the prompts from the left")
    return ex, counts


def split_by_problem(ex: Examples, eligible: np.ndarray, val_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(train, val, dropped): ceil(f x problems) of the eligible examples' problems (seeded hash) are held out.

    Every example of a held-out problem leaves training; the eligible ones (the model samples,
    or everything when there are none) form the validation set, the others are dropped.
    At least one problem stays in training.
    """
    n = len(ex)
    if val_fraction <= 0:
        return np.arange(n), np.zeros(0, np.int64), 0
    keys = sorted({ex.key[i] for i in np.flatnonzero(eligible)},
                  key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    all_keys = set(ex.key)
    n_val = min(math.ceil(val_fraction * len(keys)), len(keys) - (1 if set(keys) == all_keys else 0))
    held = set(keys[:n_val])
    is_held = np.array([k in held for k in ex.key], dtype=bool)
    val = np.flatnonzero(is_held & eligible)
    dropped = int((is_held & ~eligible).sum())
    return np.flatnonzero(~is_held), val, dropped
