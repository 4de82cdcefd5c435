"""Long-context stability: how a model predicts a text `factor` times longer than its context,
with attention sinks, with a plain rolling window, and with dense recomputation.

    lmlab eval runs/cpu/model long_context='[{path: ../shared/data/wikitext-2/test.txt}]'
    lmlab eval runs/cpu/model long_context='[{factor: 10}]'     # the model's own val tokens

Three ways to read T = factor x context tokens one after the other (StreamingLLM, Xiao et al.
2023, Figure 3):
- `sinks`: one KV cache of the context's size that keeps the first `sinks` tokens and the most
  recent ones (lmlab.models.kv_cache). Constant memory, and the loss should stay flat.
- `window`: the same cache without sinks (a pure rolling window). StreamingLLM finds the loss
  blows up once the first tokens leave the cache.
- `dense`: each token predicted from the `context - stride` to `context` tokens before it, recomputed
  from scratch (windows that overlap, `stride` tokens scored per window). This is the quality the
  other two approach, at about `context / stride` times their cost.

The cached modes feed `chunk` tokens per forward (each token still sees every cached key
before it), so a chunk of 8 costs an eighth of the steps. A family without a bounded context
(Griffin: a recurrence and a local window) reads the text in one stream (`native`); a model's
`scorer` (lmlab.models.family.Scorer: the JAX Griffin) reads it in its place.
Per-token losses are averaged over `buckets` position ranges: the report plots them against
position (lmlab/report/long_context.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from lmlab.config import Strict
from lmlab.errors import UserError


class LongContextSpec(Strict):
    path: Optional[str] = Field(None, description="a UTF-8 text file read as one stream (default: the val tokens of "
                                "the first packed artifact the eval scores, documents joined)")
    name: str = Field("", description="name in eval.json (default: the file's stem, or 'val')")
    factor: float = Field(10.0, gt=1, description="tokens read = factor x the model's context (the text is cut "
                          "there; shorter texts are refused)")
    sinks: int = Field(4, ge=1, description="attention sinks kept by the `sinks` mode")
    chunk: int = Field(8, ge=1, description="tokens per forward in the cached modes")
    stride: int = Field(16, ge=1, description="dense mode: tokens scored per recomputed window")
    buckets: int = Field(20, ge=2, description="position ranges the per-token loss is averaged over")


def spec_name(spec: LongContextSpec) -> str:
    return spec.name or (Path(spec.path).stem if spec.path else "val")


def read_tokens(spec: LongContextSpec, tokenizer, packed: list, need: int, where: str) -> np.ndarray:
    """The first `need` tokens of the spec's text (bos first) or of the packed val split."""
    if spec.path:
        p = Path(spec.path)
        if not p.is_file():
            raise UserError(f"{where}: text file not found: {p}")
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else []
        ids = bos + tokenizer.encode(p.read_text(encoding="utf-8", errors="replace"))
    else:
        if not packed:
            raise UserError(f"{where}: no `path` and no packed data to read tokens from; give path=TEXT_FILE")
        from lmlab.data.loader import PackedDataset

        ds = PackedDataset(packed[0], "val")
        rows = min(len(ds), math.ceil(need / max(1, ds.seq_len)) + 1)
        ids = ds.rows(np.arange(rows)).reshape(-1).tolist()
    if len(ids) < need:
        raise UserError(f"{where}: the text has {len(ids):,} tokens, fewer than factor x context = {need:,}; "
                        f"give a longer text or a smaller factor")
    return np.asarray(ids[:need], dtype=np.int64)


@torch.no_grad()
def _cached_nll(model, ids: torch.Tensor, cache, chunk: int) -> np.ndarray:
    """Per-token loss of ids[1:] reading ids through one cache, `chunk` tokens per forward."""
    out = []
    for s in range(0, len(ids) - 1, chunk):
        x = ids[s:min(s + chunk, len(ids) - 1)][None]
        y = ids[s + 1:s + 1 + x.shape[1]]
        logits, _ = model(x, cache=cache)
        out.append(F.cross_entropy(logits[0].float(), y, reduction="none"))
    return torch.cat(out).cpu().numpy()


@torch.no_grad()
def _dense_nll(model, ids: torch.Tensor, ctx: int, stride: int) -> np.ndarray:
    """Per-token loss of ids[1:], each token predicted from a fresh window of up to ctx tokens."""
    n = len(ids) - 1
    out = np.zeros(n, dtype=np.float64)
    for end in range(0, n, stride):  # score targets end+1 .. end+stride
        last = min(end + stride, n)
        start = max(0, last - ctx)
        logits, _ = model(ids[start:last][None])
        tail = last - end
        out[end:last] = F.cross_entropy(logits[0, -tail:].float(), ids[end + 1:last + 1],
                                        reduction="none").cpu().numpy()
    return out


def score_long_context(model, ids: np.ndarray, spec: LongContextSpec, device, bar=None) -> dict:
    """Per mode: mean loss, perplexity, loss past the first context, and the per-bucket curve."""
    x = torch.as_tensor(ids, device=device)
    ctx = getattr(model, "max_context", None)
    modes: dict[str, np.ndarray] = {}
    if ctx is None:  # a recurrent family: read the whole text in one stream, constant memory
        scorer = getattr(model, "scorer", None)  # lmlab.models.family.Scorer: the JAX Griffin
        modes["native"] = (scorer.stream_nll(ids) if scorer is not None else
                           _cached_nll(model, x, model.new_cache(1, len(ids), device=device), spec.chunk))
        ctx = int(model.cfg.max_seq_len)
    else:
        if spec.sinks + spec.chunk > ctx:
            raise UserError(f"long_context: sinks={spec.sinks} + chunk={spec.chunk} leave no window in the "
                            f"model's {ctx}-token context; lower them")
        for mode, k in (("sinks", spec.sinks), ("window", 0)):
            modes[mode] = _cached_nll(model, x, model.new_cache(1, ctx, device=device, sinks=k), spec.chunk)
            if bar is not None:
                bar.update(1)
        modes["dense"] = _dense_nll(model, x, ctx, min(spec.stride, ctx))
    if bar is not None:
        bar.update(1)
    edges = np.linspace(0, len(ids) - 1, spec.buckets + 1).round().astype(int)
    res = {"tokens": int(len(ids)), "context": int(ctx), "sinks": spec.sinks, "chunk": spec.chunk,
           "stride": spec.stride, "bucket_edges": edges.tolist(), "modes": {}}
    for mode, nll in modes.items():
        past = nll[ctx:] if len(nll) > ctx else nll
        res["modes"][mode] = {"loss": float(nll.mean()), "perplexity": float(math.exp(nll.mean())),
                              "loss_past_context": float(past.mean()),
                              "curve": [float(nll[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]}
    return res
