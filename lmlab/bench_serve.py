"""`lmlab bench serve`: `lmlab serve` under concurrent streaming clients, against the same
requests sent one at a time, and against llama.cpp's and vLLM's servers where they are installed.

    lmlab bench serve model=runs/cpu/sft concurrency='[1, 4, 16]' requests=32 max_new_tokens=64 prompt_len=32
    lmlab bench serve preset=tiny family=griffin out=serve.json    # no model=: a random-weight one
    lmlab bench serve preset=tiny threads=2 llamacpp_python=PY vllm_python=PY   # the peers' venvs

The real server runs in a subprocess (`python -m lmlab serve RUN port=0 max_batch=<the largest
concurrency>`). The official `openai` client sends streaming `/v1/completions` requests with
token-id prompts of exactly `prompt_len` tokens (bos, then seeded random words), greedy, with
vLLM's `ignore_eos` so that every completion has exactly `max_new_tokens` tokens. At concurrency
c, c client threads send the `requests` back to back until all are done (after one untimed
warm-up round of the largest concurrency, full length, on every server). Per request: the time
to first token (the first text chunk), the gaps between text chunks (inter-token latency: a
chunk is one token unless the tokenizer holds back an incomplete UTF-8 character) and TPOT
((total - TTFT) / (tokens - 1)). Per concurrency: generated tokens/s (all completion tokens /
wall time), requests/s, TTFT and inter-token p50/p99, the most requests streaming at once (seen
by the clients: overlapping first-token..end intervals) and the throughput as a ratio to the
baseline, the same requests one at a time (serving without batching), run before the first
level, between levels and after the last; its median is used, because the machine is noisy.
Without `model=`, a random-weight model of `family` and `preset` with a byte-level BPE
tokenizer trained on Python's own docs (vocab_size, at most 16384) is built in a temporary
directory.

Peers, each in a venv of its own (lmlab/bench_serve_peers.py: llama.cpp's and vLLM's servers,
how each is started and fed the same requests), same weights, same requests, same concurrency
levels, run in the same process as lmlab's and bracketed by lmlab runs at the same level
(lmlab, peer, lmlab, next peer, lmlab).
`threads=N` gives every server N threads (lmlab and vLLM OMP_NUM_THREADS, llama.cpp n_threads
and n_threads_batch); 0 leaves each at its default. A peer that is not installed, does not
start or fails is named with the reason as not measured.
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

from lmlab.bench_serve_peers import (HTTP, LLAMACPP, LLAMACPP_VENV, PEER_START_S, VLLM, PeerError,  # noqa: F401  (re-exported)
                                     Side, _llamacpp_python, _short, _start_llamacpp, _start_vllm, _vllm_python)
from lmlab.errors import UserError

WORDS = ("the", "model", "reads", "a", "long", "prompt", "and", "then", "writes", "its", "answer", "one", "token",
         "at", "time", "while", "others", "wait", "for", "their", "turn", "in", "batch", "server")
MAX_RANDOM_VOCAB = 16384  # what a BPE trained on the stdlib's docs reaches (about 19k merges)

def bench_serve(cfg, device) -> dict:
    levels = sorted(set(cfg.concurrency))
    if not levels or levels[0] < 1:
        raise UserError(f"concurrency={cfg.concurrency}: give positive client counts, e.g. concurrency='[1, 4, 16]'")
    not_measured = {}
    peer_python = {}
    for name, py in ((LLAMACPP, _llamacpp_python(cfg)), (VLLM, _vllm_python(cfg))):
        if isinstance(py, Path):
            peer_python[name] = py
        else:
            not_measured[name] = py
    with tempfile.TemporaryDirectory(prefix="lmlab-bench-serve-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        run_dir = Path(cfg.model) if cfg.model else _random_model(cfg, tmp)
        info = _model_info(run_dir)
        if cfg.prompt_len + cfg.max_new_tokens > info["context"]:
            raise UserError(f"prompt_len + max_new_tokens = {cfg.prompt_len + cfg.max_new_tokens} is over the "
                            f"model's context of {info['context']} tokens; lower them")
        from lmlab.data.tokenizer import Tokenizer

        tok = Tokenizer.load(run_dir / "tokenizer")
        prompts = _prompts(tok, cfg)
        url, model_id = stack.enter_context(_server(run_dir, cfg, max(levels), tmp / "serve.log"))
        lmlab = Side("lmlab serve", url, model_id, prompts, lambda n: {"ignore_eos": True},
                     f"OMP_NUM_THREADS={cfg.threads}" if cfg.threads else "torch's default threads",
                     key=os.environ.get("LMLAB_API_KEY") or "unused")
        peers, stops = [], {}  # stops: each running peer's server, stopped when it fails or the bench ends
        stack.callback(lambda: [s.close() for s in stops.values()])
        for name, py in peer_python.items():
            start = _start_llamacpp if name == LLAMACPP else _start_vllm
            try:
                with contextlib.ExitStack() as own:  # a peer that fails to start is stopped at once
                    peers.append(start(own, py, run_dir, tok, prompts, cfg, info, max(levels), tmp))
                    stops[name] = own.pop_all()
            except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                not_measured[name] = f"not measured: {_short(e)}"

        def drop(p: Side, why: str):
            peers.remove(p)
            stops.pop(p.name).close()
            not_measured[p.name] = f"not measured: {why}"
        n = cfg.max_new_tokens
        clients = {s.name: s.client() for s in [lmlab] + peers}

        def go(side: Side, c: int, tokens: int = n, ps=None):
            cl = clients[side.name]
            return _round(lambda p: _one(cl, side, p, tokens), side.prompts if ps is None else ps, c)

        for side in [lmlab] + peers:  # warm-up, untimed: full length (llama.cpp's first long requests take seconds)
            try:
                go(side, max(levels), n, side.prompts[:max(levels)])
            except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
                if side is lmlab:
                    raise
                drop(side, f"failed in the warm-up: {_short(e)}")
        baseline, runs = [], {c: [] for c in levels if c > 1}
        peer_runs = {p.name: {c: [] for c in sorted(set(levels) | {1})} for p in peers}

        def lmlab_at(c):
            (baseline if c == 1 else runs[c]).append(go(lmlab, c))

        def peers_at(c):  # each peer, then lmlab again at the same level: the peer is bracketed
            for p in list(peers):
                try:
                    peer_runs[p.name][c].append(go(p, c))
                except Exception as e:  # noqa: BLE001
                    del peer_runs[p.name]
                    drop(p, f"failed at {c} clients: {_short(e)}")
                    continue
                lmlab_at(c)

        lmlab_at(1)  # 1, peers at 1, then c1, peers at c1, 1, c2, peers at c2, ..., 1
        peers_at(1)
        for c in runs:
            lmlab_at(c)
            peers_at(c)
            lmlab_at(1)
        peak = _peak_batch(url, lmlab.key)
    rows = {1: _figures(baseline)} | {c: _figures(r) for c, r in runs.items()}
    base = rows[1]["tokens_per_s"]
    for r in rows.values():
        r["ratio"] = r["tokens_per_s"] / base
    peer_res = {}
    for p in peers:
        prow = {c: _figures(r) for c, r in peer_runs[p.name].items()}
        for c, r in prow.items():
            r["ratio"] = r["tokens_per_s"] / prow[1]["tokens_per_s"]
            r["lmlab_over_peer"] = rows[c]["tokens_per_s"] / r["tokens_per_s"] if c in rows else None
        peer_res[p.name] = {"rows": {str(c): r for c, r in prow.items()},
                            "tokens_per_s": {str(c): r["tokens_per_s"] for c, r in prow.items()},
                            "lmlab_over_peer": {str(c): r["lmlab_over_peer"] for c, r in prow.items()},
                            "threads": p.threads, "notes": p.notes, **p.info}
    return {"what": "serve", "model": cfg.model or f"random {cfg.family} {cfg.preset}", **info,
            "rows": {str(c): r for c, r in rows.items()}, "tokens_per_s": {str(c): r["tokens_per_s"] for c, r in
                                                                         rows.items()},
            "ratio": {str(c): r["ratio"] for c, r in rows.items()},
            "baseline_runs_tokens_per_s": rows[1]["runs_tokens_per_s"], "server_peak_batch": peak,
            "lmlab_threads": lmlab.threads, "peers": peer_res, "not_measured": not_measured,
            "load_average": list(os.getloadavg())}


def print_serve(cfg, res: dict, device) -> None:
    b = res["baseline_runs_tokens_per_s"]
    load = res.get("load_average")
    print(f"bench serve: {res['model']} ({res['family']}, {res['params'] / 1e6:.1f}M params, vocab "
          f"{res['vocab_size']}), {cfg.requests} requests x {cfg.prompt_len}-token prompt -> {cfg.max_new_tokens} "
          f"tokens (greedy, fixed length), "
          f"streaming /v1/completions, lmlab serve max_batch {max(cfg.concurrency)} on {cfg.device} "
          f"({res.get('lmlab_threads', 'default threads')}); baseline: the "
          f"same requests one at a time, median of {len(b)} runs ({min(b):,.1f}..{max(b):,.1f} tokens/s)"
          + (f"; load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" if load else ""))
    peers = res.get("peers", {})
    head = (f"  {'clients':<16}{'tokens/s':>10}{'req/s':>8}{'x 1-at-a-time':>15}{'TTFT p50/p99 ms':>18}"
            f"{'inter-token p50/p99 ms':>24}{'TPOT p50 ms':>13}{'streams':>9}")
    print(head + (f"{'lmlab / peer':>14}" if peers else ""))
    print("  lmlab serve")
    _print_rows(res["rows"])
    print(f"  most sequences the server decoded together: {res['server_peak_batch']}")
    for name, p in peers.items():
        print(f"  {name} {p.get('version', '')}: {p['threads']}")
        for note in p["notes"]:
            print(f"    {note}")
        _print_rows(p["rows"], peer=True)
    for name, why in res["not_measured"].items():
        print(f"  {name}: {why}")


def _print_rows(rows: dict, peer: bool = False) -> None:
    for c, r in rows.items():
        label = "1 (one by one)" if c == "1" else c
        ttft = f"{1000 * r['ttft_s']['p50']:,.0f} / {1000 * r['ttft_s']['p99']:,.0f}"
        itl = f"{1000 * r['itl_s']['p50']:,.1f} / {1000 * r['itl_s']['p99']:,.1f}"
        line = (f"    {label:<14}{r['tokens_per_s']:>10,.1f}{r['requests_per_s']:>8,.2f}{r['ratio']:>14.2f}x"
                f"{ttft:>18}{itl:>24}{1000 * r['tpot_s']['p50']:>13,.1f}{r['streams_at_once']:>9}")
        if peer and r.get("lmlab_over_peer"):
            line += f"{r['lmlab_over_peer']:>13.2f}x"
        print(line)


def _one(client, side: Side, prompt, n: int) -> dict:
    """One streaming completion: its time to first text, gaps between text chunks, total, tokens."""
    t0 = time.perf_counter()
    stamps, tokens, finish = [], None, None
    stream = client.completions.create(model=side.model, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body=side.body(n))
    for chunk in stream:
        if chunk.choices:
            if chunk.choices[0].text:
                stamps.append(time.perf_counter())
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    if tokens is None and finish == "length":  # no usage in the stream (llama.cpp): it stopped at max_tokens
        tokens = n
    if tokens != n:
        raise RuntimeError(f"{side.name} returned {tokens} tokens (finish_reason {finish}), not max_tokens={n}")
    ttft = (stamps[0] if stamps else end) - t0
    return {"ttft": ttft, "gaps": list(np.diff(stamps)), "total": end - t0, "tokens": tokens,
            "tpot": (end - t0 - ttft) / (tokens - 1) if tokens > 1 else 0.0, "span": (t0 + ttft, end)}


def _round(send, prompts, c: int) -> tuple[float, list[dict]]:
    """(wall seconds, per-request figures) of sending `prompts` from `c` clients, back to back."""
    t = time.perf_counter()
    with ThreadPoolExecutor(c) as pool:
        done = list(pool.map(send, prompts))
    return time.perf_counter() - t, done


def _streams_at_once(reqs: list[dict]) -> int:
    """The most requests whose first-token..end intervals overlap: what the server streamed together."""
    events = sorted([(a, 1) for a, _ in (r["span"] for r in reqs)] + [(b, -1) for _, b in (r["span"] for r in reqs)],
                    key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most


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
            "streams_at_once": max(_streams_at_once(rs) for _, rs in runs),
            "runs_tokens_per_s": tps, "wall_s": [w for w, _ in runs]}


def _prompts(tok, cfg) -> list[list[int]]:
    """`requests` token-id prompts of exactly `prompt_len` tokens: bos, then seeded random words, encoded."""
    out = []
    for i in range(cfg.requests):
        rng = random.Random(cfg.seed * 1_000_003 + i)
        ids: list[int] = [tok.bos_id] if tok.bos_id is not None and tok.bos_id >= 0 else []
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
