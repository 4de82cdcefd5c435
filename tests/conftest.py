"""Shared test helpers: a real micro pipeline built by the real stages, and the shared data path."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("LMLAB_NO_PROGRESS", "1")

ROOT = Path(__file__).resolve().parent.parent
# ../shared/data beside the checkout holds real public datasets; a fresh clone may not have it.
SHARED_DATA = ROOT.parent / "shared" / "data"


def build_micro_pipeline(root: Path, max_docs: int = 40, seq_len: int = 65, steps: int = 12) -> dict:
    """corpus (stdlib) -> tokenizer (vocab 400) -> pack -> pretrain (a micro model) under `root`."""
    from lmlab.data import corpus, pack, tokenizer
    from lmlab.train import pretrain

    c = corpus.run(corpus.Config(out=str(root / "corpus"), sources=[{"kind": "stdlib", "max_docs": max_docs}]))
    t = tokenizer.run(tokenizer.Config(corpus=str(c), out=str(root / "tokenizer"), vocab_size=400, threads=1))
    p = pack.run(pack.Config(corpus=str(c), tokenizer=str(t), out=str(root / "packed"), seq_len=seq_len, workers=1,
                             val_fraction=0.2))
    m = pretrain.run(pretrain.Config(data=[str(p)], out=str(root / "model"),
                                     model={"preset": "micro", "max_seq_len": seq_len - 1},
                                     train={"steps": steps, "batch_size": 4, "device": "cpu"},
                                     eval={"every": 4, "batches": 2}, log={"every": 2}, checkpoint={"every": 0}))
    return {"root": root, "corpus": c, "tokenizer": t, "packed": p, "model": m}
