"""Check `lmlab plan`'s memory estimate against the measured peak of real training steps.

    .venv/bin/python scripts/plan_check.py                   # the CPU cases (~4 min on 2 cores)
    .venv/bin/python scripts/plan_check.py --device cuda     # the CUDA cases (base @1023 tokens, bf16)
    .venv/bin/python scripts/plan_check.py --case tiny,512,8,ckpt --case micro,256,16,packed

Each case runs in a fresh subprocess: it builds the case's model (lmlab's Transformer, or its
Griffin with the `griffin` flag), then takes two
optimizer steps the way lmlab.train.loop does (autocast, the summed loss's backward, the
gradient divided by the count, clipping, AdamW from lmlab.train.optim, zero_grad to None),
so the second step runs with AdamW's moments allocated. Measured:
  tensors: the peak of live tensor bytes, what the planner's components add up to
        (cpu: torch.profiler's memory events, "Total Allocated", recorded from before the
        model is built; cuda: torch.cuda.max_memory_allocated()), against the planner's
        tensor peak (lmlab.plan.estimate; for a Griffin, or with `trace`, the peak of the
        same step traced on fake tensors: lmlab.plan_trace, what `lmlab plan` reports for it);
  process (cpu only): the high-water mark of the process's resident memory (getrusage
        ru_maxrss), imports, libraries and malloc's free lists included, against the
        planner's total (tensor peak + its CPU allowance). On CUDA the context is outside
        max_memory_allocated; compare nvidia-smi with the total by hand.

A case is `PRESET,SEQ,BATCH[,FLAG...]`; flags: `ckpt` (activation checkpointing, each block
recomputed: lmlab.train.parallelize's own wrapping, as parallel.activation_checkpointing does),
`packed` (two documents per row through doc_ids, as sft's packing), `dpo` (logits at
every position and their log-softmax, as dpo's completion log-probs), `bf16` (autocast;
emulated and slow on CPUs without native bf16), `qk_norm`, `accum=N` (N forward/backward
passes per step, as train.grad_accum or micro_batch splits), `vocab=N`, `layers=N`,
`griffin` (the preset is Griffin's), `trace` (plan a transformer by tracing, not analytically).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

# small enough for 2 shared cores (~20 s a case); the cpu speedrun's model is tiny,256,16,layers=4
CPU_CASES = ["micro,256,16,vocab=8192", "tiny,256,8,vocab=8192,layers=4", "tiny,512,4,vocab=8192",
             "tiny,512,4,vocab=8192,ckpt", "micro,512,8,vocab=8192,packed", "micro,256,8,vocab=8192,dpo",
             "micro,256,16,vocab=8192,bf16,qk_norm", "tiny,256,4,vocab=8192,layers=4,accum=2",
             "tiny,512,4,vocab=8192,trace", "tiny,512,4,vocab=8192,griffin", "tiny,512,4,vocab=8192,griffin,ckpt",
             "micro,256,8,vocab=8192,griffin,packed", "micro,256,8,vocab=8192,griffin,dpo",
             "micro,256,16,vocab=8192,griffin,bf16,accum=2"]
CUDA_CASES = ["base,1023,8,bf16", "base,1023,8,bf16,ckpt", "base,1023,16,bf16", "tiny,1023,32,bf16",
              "small,1023,16,bf16,packed", "small,1023,8,bf16,dpo", "small,1023,8,bf16,qk_norm", "tiny,512,8",
              "base,1023,8,bf16,trace", "small,1023,8,bf16,griffin", "small,1023,8,bf16,griffin,ckpt",
              "small,1023,8,bf16,griffin,dpo"]


def parse_case(text: str) -> dict:
    preset, seq, batch, *flags = text.split(",")
    case = {"preset": preset, "seq": int(seq), "batch": int(batch), "vocab": 32768, "layers": None,
            "ckpt": False, "packed": False, "dpo": False, "bf16": False, "qk_norm": False, "accum": 1,
            "griffin": False, "trace": False}
    for f in flags:
        key, _, value = f.partition("=")
        if key not in case or key in ("preset", "seq", "batch"):
            raise SystemExit(f"unknown flag {key!r} in case {text!r}; flags: ckpt packed dpo bf16 qk_norm accum= "
                             f"vocab= layers= griffin trace")
        case[key] = int(value) if value else True
    return case


def _family(case: dict) -> str:
    return "griffin" if case["griffin"] else "transformer"


def model_config(case: dict):
    """The case's resolved model config (its family's presets, the case's overrides)."""
    from lmlab.models.family import get_family
    over = {"preset": case["preset"], "max_seq_len": max(case["seq"], 8)}
    if case["layers"]:
        over["n_layer"] = case["layers"]
    if case["qk_norm"]:
        over["qk_norm"] = True
    return get_family(_family(case)).config(over, vocab_size=case["vocab"])


def _train_steps(case: dict, dev, steps: int = 2):
    """Build the model and take `steps` optimizer steps as the loop does. -> the model."""
    import torch
    from lmlab.models.family import get_family
    from lmlab.train.optim import build_optimizer
    from lmlab.train.parallelize import apply_activation_checkpointing

    torch.manual_seed(0)
    B, T = case["batch"], case["seq"]
    x = torch.randint(0, case["vocab"], (B, T), device=dev)
    y = torch.randint(0, case["vocab"], (B, T), device=dev)
    doc = (torch.arange(T, device=dev)[None, :] >= T // 2).long().expand(B, T).contiguous() if case["packed"] else None
    model = get_family(_family(case)).build(model_config(case)).to(dev)
    if case["ckpt"]:
        apply_activation_checkpointing(model)
    opt = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95), dev)
    for _ in range(steps):
        for _ in range(case["accum"]):  # gradient accumulation: the forwards of one step
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=case["bf16"]):
                if case["dpo"]:
                    logits, _ = model(x, logits_at=torch.ones_like(x, dtype=torch.bool))
                    logits = logits.float()
                    logps = logits.gather(-1, y.reshape(-1, 1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
                    loss, n = -logps.sum(), B
                else:
                    _, loss = model(x, y, doc_ids=doc, return_logits=False)
                    loss, n = loss * y.numel(), y.numel()
            loss.backward()
            del loss
        for p in model.parameters():
            p.grad.div_(n)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def _profiled_peak(fn) -> tuple[int, object]:
    """(peak bytes of CPU tensors fn allocated and holds at once, fn's result), from the profiler's
    memory events: their running total, less what was allocated before fn began (a test's process
    holds earlier tests' tensors)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not memory:
        return 0, result
    before = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(m["Total Allocated"] for m in memory) - before, result


def child(case: dict, device: str) -> dict:
    """Train two steps in this (fresh) process and measure. -> bytes: measured, estimate, ..."""
    import torch

    from lmlab.plan import RunShape, allowance, estimate, model_dims

    dev = torch.device(device)
    out = {}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        model = _train_steps(case, dev)
        torch.cuda.synchronize()
        out["measured"] = torch.cuda.max_memory_allocated()
    else:
        out["measured"], model = _profiled_peak(lambda: _train_steps(case, dev))
        out["process_measured"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    shape = RunShape(rows=case["batch"], seq=case["seq"], forwards=case["accum"], world=1, strategy="none",
                     checkpointing=case["ckpt"], bf16=case["bf16"], device=dev.type,
                     loss="logits" if case["dpo"] else "fused", packed_mask=case["packed"])
    if case["griffin"] or case["trace"]:  # one step traced on fake tensors (lmlab.plan_trace)
        from lmlab.plan_trace import trace_step
        from lmlab.train.pretrain import Config
        peak = trace_step("dpo" if case["dpo"] else "sft" if case["packed"] else "pretrain", model_config(case),
                          Config(), shape, dev.type).peak
    else:
        peak = estimate(model_dims(model), shape)["peak"]
    out.update(estimate=peak, params=model.num_params())
    if dev.type == "cpu":
        out["process_estimate"] = peak + allowance(shape, peak)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--case", action="append", help="PRESET,SEQ,BATCH[,FLAG...] (repeatable)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per case")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child), args.device)))
        return 0
    cases = args.case or (CUDA_CASES if args.device == "cuda" else CPU_CASES)
    parsed = [parse_case(text) for text in cases]  # a typo stops here, before anything runs
    cpu = args.device == "cpu"
    if not args.json:
        print(f"{'case':<46}{'params':>8}  {'tensors MiB: measured':>21} {'planned':>8} {'error':>7}"
              + (f"  {'process MiB: measured':>21} {'planned':>8} {'error':>7}" if cpu else ""))
    worst = {"tensors": 0.0, "process": 0.0}
    for text, case in zip(cases, parsed):
        out = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", json.dumps(case)],
                             capture_output=True, text=True)
        if out.returncode:
            print(f"{text}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["error"] = r["estimate"] / r["measured"] - 1
        worst["tensors"] = max(worst["tensors"], abs(r["error"]))
        line = (f"{text:<46}{r['params'] / 1e6:>7.2f}M  {r['measured'] / 2**20:>21.1f} {r['estimate'] / 2**20:>8.1f}"
                f" {r['error']:>+7.1%}")
        if cpu:
            r["process_error"] = r["process_estimate"] / r["process_measured"] - 1
            worst["process"] = max(worst["process"], abs(r["process_error"]))
            line += (f"  {r['process_measured'] / 2**20:>21.1f} {r['process_estimate'] / 2**20:>8.1f}"
                     f" {r['process_error']:>+7.1%}")
        print(json.dumps({"case": text, "device": args.device, **r}) if args.json else line)
    if not args.json:
        print(f"largest error (planned / measured - 1): tensors {worst['tensors']:.1%}"
              + (f", process {worst['process']:.1%}" if cpu else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
