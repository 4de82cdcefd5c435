"""`lmlab plan`'s table: the plan dict of lmlab.plan as the lines a person reads, and the verdict.

The analytic plan lists the transformer's memory model component by component; a traced plan
(lmlab.plan_trace) what the process keeps and the rest at the traced peak. Both end with the
throughput estimate and, for a run that fits, the verdict (one that does not ends with the
error line `lmlab plan` raises: `verdict_line`).
"""

from __future__ import annotations

GIB = 2 ** 30  # (lmlab.plan's too; this module reads the plan's dict, never lmlab.plan itself)


def _gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def _in(b: float, unit: int) -> str:
    return f"{b / unit:.2f}" if unit == GIB else f"{b / unit:.1f}"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def verdict_line(p: dict) -> str:
    t = p["target"]
    head = f"needs {_gib(p['total'])} GiB per process of {_gib(t['memory'])} GiB on {t['name']}"
    if p["fits"]:
        return f"fits: {head} ({_gib(p['margin'])} GiB to spare)"
    fixes = [f"{s['change']} ({_gib(s['bytes'])} GiB)" for s in p["suggestions"] if s["fits"]]
    tried = [f"{s['change']} is not enough ({_gib(s['bytes'])} GiB)" for s in p["suggestions"] if not s["fits"]]
    advice = ("; fits with " + " or ".join(fixes)) if fixes else "; no single change found that fits"
    return (f"does not fit: {head}, {_gib(-p['margin'])} GiB over" + advice
            + ("; " + "; ".join(tried) if tried else ""))


def format_plan(p: dict) -> str:
    from lmlab.train.hardware import describe_record
    m, r, c = p["model"], p["run"], p["components"]
    shard = f" / {r['world']}" if r["strategy"] == "fsdp" else ""
    tokens = r["rows"] * r["seq"]
    precision = "bf16 autocast" if r["bf16"] else "float32"
    trainable = "" if m["trainable"] == m["params"] else f", {_count(m['trainable'])} trainable (LoRA)"
    family = m.get("family")  # a traced plan names its family (the analytic one is the transformer's)
    name, width_name = (f"{family} {m['name']}", "width") if family else (m["name"], "d_model")
    lines = [
        f"lmlab plan {p['verb']}: {name} ({_count(m['params'])} parameters{trainable}, {m['n_layer']} blocks, "
        f"{width_name} {m['d_model']}, vocab {m['vocab']} from {p['vocab_from']}), {r['seq']} positions, {precision}",
        f"  on {p['target']['name']} ({_gib(p['target']['memory'])} GiB, {p['target']['device']})",
        f"  {r['world']} process{'es' if r['world'] > 1 else ''}, strategy {r['strategy']}, activation checkpointing "
        f"{'on' if r['checkpointing'] else 'off'}; per process {r['rows']} sequences per forward pass, "
        f"{r['forwards']} pass{'es' if r['forwards'] > 1 else ''} per step (global batch: train.batch_size "
        f"{p['batch']['batch_size']} x grad_accum {p['batch']['grad_accum']}; micro_batch "
        f"{p['batch']['micro_batch'] or 'unset'})",
    ]
    if p["hardware"]:
        lines.append("  " + describe_record(p["hardware"]))
    if p["method"] == "trace":
        return "\n".join(lines + _traced_rows(p))
    rows = [
        ("weights (fp32 master)", c["weights"], f"{_count(m['params'])} x 4 B{shard}"),
        ("gradients (fp32)", c["gradients"], f"{_count(m['trainable'])} x 4 B{shard}"),
        ("AdamW moments (2 x fp32)", c["adamw"], f"{_count(m['trainable'])} x 8 B{shard}"),
        ("bf16 weight copies (autocast)", c["bf16_copies"], "matmul weights x 2 B, kept for backward"),
        ("DDP gradient buckets", c["ddp_buckets"], "a flat fp32 copy of the gradients"),
        ("FSDP gathered blocks", c["fsdp_gathered"], "embedding/head group + 2 blocks, 1 block's grads"),
        ("activations", c["activations"], f"{m['n_layer']} blocks x {tokens:,} tokens x "
         f"{p['per_token_block_bytes'] / 1024:.1f} KiB" if not r["checkpointing"] else
         f"{m['n_layer']} fp32 block inputs x {tokens:,} tokens (checkpointing)"),
        ("loss", c["loss"],
         "chunked CE: grad_h, head gradient, 256-row logits chunks" if r["loss"] == "fused" else
         "fp32 logits at every position (upper bound) and their gradients"),
        ("backward through the blocks", c["block_backward"], "head + block gradients, temporaries"
         + (", a recomputed block" if r["checkpointing"] else "") + "; the larger of this and loss counts"),
        ("framework allowance", c["allowance"], "CUDA context + workspaces, 5% fragmentation" if r["device"] == "cuda"
         else "the Python process (torch, libraries) + 40% for malloc's free lists"),
    ]
    unit, label = (GIB, "GiB") if p["total"] >= 2 * GIB else (2 ** 20, "MiB")
    width = max(len(name) for name, _, _ in rows)
    lines.append("")
    lines.append(f"  {'component':<{width}}  {label:>8}  note")
    for name, b, note in rows:
        if b:
            lines.append(f"  {name:<{width}}  {_in(b, unit):>8}  {note}")
    lines.append(f"  {'peak: start of backward':<{width}}  {_in(p['peak_backward'], unit):>8}  weights, AdamW, "
                 f"copies, activations, loss or last block (gradients grow as activations are freed)")
    lines.append(f"  {'peak: optimizer step':<{width}}  {_in(p['peak_step'], unit):>8}  weights, gradients, AdamW")
    lines.append(f"  {'estimated peak per process':<{width}}  {_in(p['total'], unit):>8}  the larger peak + allowance")
    return "\n".join(lines + _closing(p))


def _traced_rows(p: dict) -> list[str]:
    """The component table of a traced plan (lmlab.plan_trace), then the closing lines."""
    m, r, c = p["model"], p["run"], p["components"]
    shard = f" / {r['world']} (FSDP shards)" if r["strategy"] == "fsdp" else ""
    rows = [
        ("weights", c["weights"], f"{_count(m['params'])} parameters as the model holds them{shard}"),
        ("gradients", c["gradients"], f"{_count(m['trainable'])} trainable{shard}"),
        ("optimizer state", c["optimizer"], "AdamW's two moments" + shard),
        ("DDP gradient buckets", c["ddp_buckets"], "a flat copy of the gradients"),
        ("the rest at the peak", c["working"], f"during the {p['peak_phase']}: activations saved for backward, "
         f"gradients so far, temporaries" + (", gathered blocks" if r["strategy"] == "fsdp" else "")),
        ("framework allowance", c["allowance"], "CUDA context + workspaces, 5% fragmentation" if r["device"] == "cuda"
         else "the Python process (torch, libraries) + 40% for malloc's free lists"),
    ]
    unit, label = (GIB, "GiB") if p["total"] >= 2 * GIB else (2 ** 20, "MiB")
    width = len("estimated peak per process")
    lines = ["", f"  {'component':<{width}}  {label:>8}  note"]
    lines += [f"  {name:<{width}}  {_in(b, unit):>8}  {note}" for name, b, note in rows if b]
    lines.append(f"  {'traced peak of the step':<{width}}  {_in(p['peak_tensors'], unit):>8}  live tensor bytes, "
                 f"one training step on fake tensors ({p['trace_seconds']:.1f} s; CPU kernels, eager)")
    lines.append(f"  {'estimated peak per process':<{width}}  {_in(p['total'], unit):>8}  the peak + allowance")
    return lines + _closing(p)


def _closing(p: dict) -> list[str]:
    """Throughput and, for a run that fits, the verdict (one that does not ends with the error line)."""
    lines = [""]
    tp = p["throughput"]
    if tp:
        lines.append(f"  throughput: ~{tp['tokens_per_s']:,.0f} tokens/s ({tp['tokens_per_s_per_process']:,.0f} per "
                     f"process at {tp['mfu']:.0%} MFU of {tp['peak_flops'] / 1e12:.0f} TFLOP/s), "
                     f"~{tp['step_s']:.3g} s per optimizer step (an assumed MFU; small models reach less)")
    elif p["target"]["device"] == "cpu":
        lines.append("  throughput: not estimated for a CPU (lmlab.train.loop.PEAK_BF16_FLOPS lists GPUs)")
    else:
        lines.append(f"  throughput: not estimated (no peak FLOP/s for {p['target']['name']} in "
                     f"lmlab.train.loop.PEAK_BF16_FLOPS)")
    if p["fits"]:  # a run that does not fit ends with the error line instead (see main)
        lines.append("  " + verdict_line(p))
    return lines
