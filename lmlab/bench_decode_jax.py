"""`lmlab bench decode-jax`: a Griffin's greedy decoding in JAX (lmlab.jax_backend.griffin.decode,
DeepMind's recurrentgemma.jax) against lmlab's torch engine, same random weights and prompts, in
the same run; and the JAX programs' compile time.

    lmlab bench decode-jax preset=tiny batch_size=8 prompt_len=64 max_new_tokens=128

Each side decodes `batch_size` prompts of `prompt_len` random tokens for `max_new_tokens` new
tokens (prefill included, no eos), float32 on the CPU (JAX: its first device; compute in bf16
on a TPU or GPU, as `lmlab eval backend=jax` does). The sides alternate, each figure is the
median call; the JAX side's first call, which compiles the prefill and the chunk program, is
reported apart (`compile_s`). Whether the greedy tokens agree is reported too (fp32 on a CPU:
they should; bf16 on an accelerator: they need not).
"""

from __future__ import annotations

import time

import torch


def bench_decode_jax(cfg, device) -> dict:
    from lmlab.bench_timing import interleaved, median
    from lmlab.errors import UserError
    from lmlab.infer.engine import generate_ids
    from lmlab.jax_backend.griffin.decode import Decoder, check
    from lmlab.models.family import build_model
    from lmlab.models.griffin.config import PRESETS

    if cfg.preset not in PRESETS:
        raise UserError(f"bench decode-jax decodes a Griffin; preset={cfg.preset} is not one of {', '.join(PRESETS)}")
    torch.manual_seed(cfg.seed)
    model = build_model({"family": "griffin", "preset": cfg.preset, "vocab_size": cfg.vocab_size,
                         "max_seq_len": cfg.prompt_len + cfg.max_new_tokens}).to(device).eval()
    check(model.family, model.cfg, f"preset {cfg.preset}")
    import jax

    dec = Decoder.of(model)
    g = torch.Generator().manual_seed(cfg.seed)
    prompts = torch.randint(1, cfg.vocab_size, (cfg.batch_size, cfg.prompt_len), generator=g).tolist()
    n = cfg.max_new_tokens
    out: dict = {}

    def collect(steps) -> list[list[int]]:
        rows = [[] for _ in prompts]
        for step in steps:
            for r, t in enumerate(step):
                if t is not None:
                    rows[r].append(t)
        return rows

    def run_torch():
        with torch.no_grad():
            out["torch"] = collect(generate_ids(model, prompts, max_new_tokens=n, device=device))

    def run_jax():
        out["jax"] = collect(dec.generate_ids(prompts, max_new_tokens=n))

    t0 = time.perf_counter()
    run_jax()  # compiles the prefill and the chunk program for these shapes
    compile_s = time.perf_counter() - t0
    times = interleaved({"jax": run_jax, "torch": run_torch}, cfg.warmup, cfg.repeats, device)
    tps = {k: cfg.batch_size * n / median(v) for k, v in times.items()}
    return {"what": "decode-jax", "params": model.num_params(), "tokens_per_s": tps,
            "ratio": tps["jax"] / tps["torch"], "times_s": times, "compile_s": compile_s,
            "greedy_identical": out["jax"] == out["torch"], "chunk": dec.chunk,
            "jax_device": str(jax.local_devices()[0]), "jax": jax.__version__}


def print_decode_jax(cfg, res: dict, device) -> None:
    print(f"bench decode-jax: Griffin {cfg.preset}, {res['params'] / 1e6:.1f}M params; {cfg.batch_size} prompts of "
          f"{cfg.prompt_len} tokens, {cfg.max_new_tokens} new tokens each, greedy; median of {cfg.repeats} "
          f"interleaved runs; torch engine on {device} ({res['threads']} threads), JAX {res['jax']} on "
          f"{res['jax_device']} ({res['chunk']} steps per call)")
    print(f"  {'':<8}{'tokens/s':>12}{'s/run':>10}")
    for k, v in res["tokens_per_s"].items():
        print(f"  {k:<8}{v:>12,.1f}{cfg.batch_size * cfg.max_new_tokens / v:>10,.2f}")
    print(f"  ratio jax/torch: {res['ratio']:.2f}x; JAX's first call (compile) {res['compile_s']:.1f} s; "
          f"greedy tokens identical: {res['greedy_identical']}")
