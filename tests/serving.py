"""Helpers of the server tests: the real `lmlab serve` in a subprocess (`serving`), and model run
directories with the micro pipeline's tokenizer and a random-weight model of a longer context
(`random_model_dir`: greedy text then varies with the prompt, so "same text alone and batched"
means something, and a long reply takes long enough to disconnect from)."""

from __future__ import annotations

import contextlib
import os
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import ROOT, build_micro_pipeline

# loopback only: no proxy from the environment
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@contextlib.contextmanager
def serving(run_dir: Path, log_path: Path, *options: str):
    """Run the real `python -m lmlab serve RUN_DIR port=0 OPTIONS...` until the block ends:
    yields {"url", "model"} read from its `serve: listening on URL (model ID...)` line."""
    from lmlab.errors import UserError
    from lmlab.serve.launch import serve_process

    env = {k: v for k, v in os.environ.items() if k != "LMLAB_API_KEY"}  # a key only where a test sets one
    try:
        with serve_process(run_dir, log_path, *options, env=env, timeout=60, cwd=ROOT) as (url, model):
            yield {"url": url, "model": model}
    except UserError as e:
        pytest.fail(str(e))


def random_model_dir(root: Path, family: str = "transformer", context: int = 1024, seed: int = 0) -> Path:
    """A run dir (model.safetensors, model.json, tokenizer/) of a random micro model of `family`."""
    from lmlab.data.tokenizer import Tokenizer
    from lmlab.models import save_model
    from lmlab.models.family import build_model

    tok_dir = root / "tokenizer"
    if not tok_dir.is_dir():
        build_micro_pipeline(root / "pipe", steps=2)
        Tokenizer.load(root / "pipe" / "tokenizer").copy_to(tok_dir)
    tok = Tokenizer.load(tok_dir)
    fields = {"transformer": {"preset": "micro"},
              "griffin": {"preset": "micro", "width": 32, "num_heads": 4, "mlp_expanded_width": 48,
                          "attention_window_size": 16}}[family]
    torch.manual_seed(seed)
    model = build_model({"family": family, **fields, "vocab_size": tok.vocab_size, "max_seq_len": context}).eval()
    with torch.no_grad():  # far from init: logits spread, so greedy text depends on the prompt
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    out = root / f"{family}-{context}"
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out)
    tok.copy_to(out / "tokenizer")
    return out
