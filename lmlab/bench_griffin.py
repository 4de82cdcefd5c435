"""`lmlab bench griffin` and `lmlab bench decode`: Griffin's speed against its reference and
beside our transformer.

    lmlab bench griffin preset=tiny batch_size=4 seq_len=2048 repeats=3
    lmlab bench decode preset=tiny contexts='[256, 1024, 4096]' max_new_tokens=32 plot=decode.png

`griffin`: forward + backward at sequence 2048, lmlab against Google DeepMind's recurrentgemma
torch code (installed without its dependencies, lmlab.models.griffin.reference), same weights
(the reference's, read through our DeepMind-layout loader) and batch: (1) the RG-LRU
recurrence alone, our chunked scan against the reference's `rnn_scan` Python loop over time,
on (batch, seq, lru_width) inputs; (2) the whole model with its loss. Sides alternate and the
median step is reported.
`decode`: greedy decoding speed (new tokens/s after a prompt of each context length) and the
decoding state's size (the cache's tensors) for a Griffin and our transformer of the same
preset name, one prompt. Griffin's state stops growing at the attention window; the
transformer's KV cache grows with the context. With `plot`, both curves go to a PNG.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from lmlab.bench_timing import interleaved, median, sync
from lmlab.errors import UserError

DEFAULT_SEQ = 2048


def _reference():
    from lmlab.models.griffin.reference import recurrentgemma_torch
    ref = recurrentgemma_torch()
    if ref is None:
        raise UserError("bench griffin compares against Google DeepMind's recurrentgemma; install it without its "
                        "dependencies: pip install --no-deps recurrentgemma==1.0.1 jaxtyping einops")
    return ref


def _pair(cfg, device):
    """(ours, the reference Griffin) at the preset's shape, the same weights."""
    from lmlab.models.griffin import Griffin, resolve_griffin_config
    from lmlab.models.griffin.checkpoints import from_deepmind_state_dict

    common, griffin = _reference()
    mc = resolve_griffin_config({"preset": cfg.preset, "vocab_size": cfg.vocab_size})
    T = common.TemporalBlockType
    rcfg = common.GriffinConfig(vocab_size=mc.vocab_size, width=mc.width, mlp_expanded_width=mc.mlp_expanded_width,
                                num_heads=mc.num_heads, lru_width=mc.lru_width,
                                block_types=tuple(T.RECURRENT if k == "recurrent" else T.ATTENTION
                                                  for k in mc.block_types),
                                embeddings_scale_by_sqrt_dim=mc.embeddings_scale_by_sqrt_dim,
                                attention_window_size=mc.attention_window_size, logits_soft_cap=mc.logits_soft_cap)
    torch.manual_seed(cfg.seed)
    ref = griffin.Griffin(rcfg, gradient_checkpointing=False, device=device, dtype=torch.float32).train()
    ours = Griffin(mc)
    ours.load_state_dict(from_deepmind_state_dict({k: v.cpu() for k, v in ref.state_dict().items()}, mc))
    return ours.to(device).train(), ref, mc


def bench_griffin(cfg, device) -> dict:
    from lmlab.models.griffin.scan import linear_scan

    seq = cfg.seq_len if "seq_len" in cfg.model_fields_set else DEFAULT_SEQ
    ours, ref, mc = _pair(cfg, device)
    from recurrentgemma.torch.layers import rnn_scan  # importable once _reference() registered the package
    g = torch.Generator().manual_seed(cfg.seed)
    B = cfg.batch_size
    a = torch.rand(B, seq, mc.lru_width, generator=g).to(device).requires_grad_()
    x = torch.randn(B, seq, mc.lru_width, generator=g).to(device).requires_grad_()
    reset = torch.zeros(B, seq, dtype=torch.bool, device=device)
    reset[:, 0] = True

    def scan_ours():
        y, _ = linear_scan(a, x)
        y.sum().backward()

    def scan_ref():
        y, _ = rnn_scan(x, a, reset, None)
        y.sum().backward()

    tokens = torch.randint(0, mc.vocab_size, (B, seq + 1), generator=g).to(device)
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(seq, device=device)[None].expand(B, -1)

    def model_ours():
        _, loss = ours(inp, tgt, return_logits=False)
        loss.backward()

    def model_ref():
        logits, _ = ref(inp, pos, return_cache=False)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1)).backward()

    n = cfg.repeats * cfg.steps
    scan_t = interleaved({"lmlab": scan_ours, "reference": scan_ref}, cfg.warmup, n, device)
    model_t = interleaved({"lmlab": model_ours, "reference": model_ref}, cfg.warmup, n, device)
    ms = {part: {k: 1000 * median(v) for k, v in t.items()} for part, t in (("scan", scan_t), ("model", model_t))}
    return {"what": "griffin", "params": ours.num_params(), "seq_len": seq, "lru_width": mc.lru_width,
            "ms": ms, "speedup": {p: v["reference"] / v["lmlab"] for p, v in ms.items()},
            "times_s": {"scan": scan_t, "model": model_t}}


def print_griffin(cfg, res: dict, device) -> None:
    print(f"bench griffin: preset {cfg.preset} ({res['params'] / 1e6:.1f}M params), batch {cfg.batch_size} x seq "
          f"{res['seq_len']}, forward+backward, median of {cfg.repeats * cfg.steps} interleaved timings, "
          f"{res['threads']} threads, {device} float32; reference: recurrentgemma (torch)")
    print(f"  {'':<34}{'lmlab ms':>10}{'reference ms':>14}{'speedup':>9}")
    names = {"scan": f"RG-LRU scan ({cfg.batch_size}x{res['seq_len']}x{res['lru_width']})",
             "model": "whole model + loss"}
    for part, v in res["ms"].items():
        print(f"  {names[part]:<34}{v['lmlab']:>10,.1f}{v['reference']:>14,.1f}{res['speedup'][part]:>8.1f}x")


# ----------------------------------------------------------------------------- decode

def _cache_bytes(cache) -> int:
    seen, total = set(), 0
    for value in vars(cache).values():
        tensors = value.values() if isinstance(value, dict) else [value]
        for t in tensors:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def bench_decode(cfg, device) -> dict:
    from lmlab.models.family import build_model
    from lmlab.models.griffin.config import PRESETS as GRIFFIN
    from lmlab.models.transformer import PRESETS as TRANSFORMER

    if cfg.preset not in GRIFFIN or cfg.preset not in TRANSFORMER:
        both = sorted(set(GRIFFIN) & set(TRANSFORMER))
        raise UserError(f"bench decode compares presets both families have; preset={cfg.preset} is not one: "
                        f"{', '.join(both)}")
    longest = max(cfg.contexts) + cfg.max_new_tokens
    models = {}
    for family in ("griffin", "transformer"):
        torch.manual_seed(cfg.seed)
        models[family] = build_model({"family": family, "preset": cfg.preset, "vocab_size": cfg.vocab_size,
                                      "max_seq_len": longest}).to(device).eval()
    g = torch.Generator().manual_seed(cfg.seed)
    rows = []
    for ctx in cfg.contexts:
        prompt = torch.randint(0, cfg.vocab_size, (1, ctx), generator=g).to(device)
        row = {"context": ctx}
        for family, m in models.items():
            state = {}

            @torch.no_grad()
            def decode(m=m, state=state):
                cache = m.new_cache(1, ctx + cfg.max_new_tokens)
                logits, _ = m(prompt, cache=cache, last_only=True)
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                sync(device)
                t = time.perf_counter()
                for _ in range(cfg.max_new_tokens):
                    logits, _ = m(nxt, cache=cache)
                    nxt = logits[:, -1].argmax(-1, keepdim=True)
                sync(device)
                state.setdefault("decode_s", []).append(time.perf_counter() - t)
                state["bytes"] = _cache_bytes(cache)

            for _ in range(cfg.repeats):
                decode()
            row[family] = {"tokens_per_s": cfg.max_new_tokens / median(state["decode_s"]),
                           "cache_mib": state["bytes"] / 2 ** 20}
        rows.append(row)
    return {"what": "decode", "params": {f: m.num_params() for f, m in models.items()}, "rows": rows,
            "window": models["griffin"].cfg.attention_window_size}


def print_decode(cfg, res: dict, device) -> None:
    p = res["params"]
    print(f"bench decode: preset {cfg.preset} (griffin {p['griffin'] / 1e6:.1f}M, transformer {p['transformer'] / 1e6:.1f}M "
          f"params), 1 prompt, {cfg.max_new_tokens} greedy new tokens after each context, median of {cfg.repeats}, "
          f"{res['threads']} threads, {device} float32; griffin attention window {res['window']}")
    print(f"  {'context':>8}{'griffin tok/s':>15}{'transformer tok/s':>19}{'griffin MiB':>13}{'transformer MiB':>17}")
    for r in res["rows"]:
        print(f"  {r['context']:>8}{r['griffin']['tokens_per_s']:>15,.1f}{r['transformer']['tokens_per_s']:>19,.1f}"
              f"{r['griffin']['cache_mib']:>13,.2f}{r['transformer']['cache_mib']:>17,.2f}")


def plot_decode(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import os
    from pathlib import Path

    ctx = [r["context"] for r in res["rows"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for family, style in (("griffin", "o-"), ("transformer", "s--")):
        ax1.plot(ctx, [r[family]["tokens_per_s"] for r in res["rows"]], style, label=family)
        ax2.plot(ctx, [r[family]["cache_mib"] for r in res["rows"]], style, label=family)
    for ax, title in ((ax1, "decode speed (new tokens/s)"), (ax2, "decoding state (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
