"""The hidden states a compressor learns from (lmlab/train/compressor.py): a frozen LLM's
last-layer states over plain text (packed rows) and over thinking trajectories it generates
itself from problems (its chat template's thinking, then the answer).

    text = text_states(model, packed_dirs, "train", tokens=100_000)          # (N, D) float32
    traj = trajectory_states(model, tok, template, problems, spec, device)   # (N, D), stats

A trajectory is the prompt and everything the model generated for it, its ending token
included; every position is a real token, so no padding ever reaches the states.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from pydantic import Field

from lmlab.config import Strict
from lmlab.errors import UserError


class TrajectorySpec(Strict):
    problems: str = Field(description="GSM8K-format jsonl the model thinks about (tasks: train.jsonl)")
    n: int = Field(200, ge=1, description="problems whose trajectories train the compressor")
    n_val: int = Field(50, ge=1, description="problems after those, held out for the metrics")
    max_new_tokens: int = Field(160, ge=1, description="tokens generated per trajectory at most")
    temperature: float = Field(0.0, ge=0, description="0 = greedy (the thinking the model would show)")
    batch_size: int = Field(32, ge=1, description="problems generated together")


def _rows(packed: list[str], split: str, tokens: int, ctx: Optional[int]) -> list[list[int]]:
    """Packed rows of `split` (each cut to the context) until `tokens` tokens, in file order."""
    from lmlab.data.loader import PackedDataset

    out, have = [], 0
    for p in packed:
        ds = PackedDataset(p, split)
        width = ds.seq_len if ctx is None else min(ds.seq_len, ctx)
        for i in range(len(ds)):
            if have >= tokens:
                return out
            row = ds.rows(np.asarray([i]))[0, :width].astype(np.int64).tolist()
            out.append(row[:tokens - have])
            have += len(out[-1])
    return out


def text_states(model, packed: list[str], split: str, tokens: int, device, bar=None) -> torch.Tensor:
    """States over the first `tokens` tokens of the packed `split` (fewer if the data has fewer)."""
    from lmlab.infer.hidden import hidden_states

    rows = _rows(packed, split, tokens, getattr(model, "max_context", None))
    if not rows:
        raise UserError(f"the packed data ({', '.join(packed)}) has no {split} rows to read hidden states from")
    return torch.cat(hidden_states(model, rows, device=device, bar=bar))


def trajectory_states(model, tokenizer, template: str, problems: list[dict], spec: TrajectorySpec, device,
                      bar=None) -> tuple[torch.Tensor, dict]:
    """States over the model's own trajectories for `problems`, and counts (trajectories, tokens,
    thinking that never closed within max_new_tokens)."""
    from lmlab.data.chat import THINK_CLOSE
    from lmlab.infer.engine import complete_ids
    from lmlab.infer.hidden import hidden_states
    from lmlab.infer.prompting import prompt_room, question_prompt
    from lmlab.infer.sampling import Sampling
    from lmlab.tasks.problems import problem_stops

    room = prompt_room(model, "trajectories.max_new_tokens", spec.max_new_tokens)
    prompts = [question_prompt(template, p["question"], tokenizer, max_len=room) for p in problems]
    done = complete_ids(model, tokenizer, prompts, Sampling(max_new_tokens=spec.max_new_tokens,
                                                            temperature=spec.temperature, seed=0),
                        problem_stops(template, tokenizer), spec.batch_size, device)
    close = tokenizer.special_tokens[THINK_CLOSE]
    seqs = [p + c.ids for p, c in zip(prompts, done)]
    states = hidden_states(model, seqs, device=device, bar=bar)
    stats = {"trajectories": len(seqs), "tokens": sum(len(s) for s in seqs),
             "thinking_not_closed": sum(close not in c.ids for c in done),
             "mean_generated": float(np.mean([len(c.ids) for c in done]))}
    return torch.cat(states), stats
