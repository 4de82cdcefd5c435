"""The GPU measurements the open issues still ask for, in one run on a lent GPU machine.

    bash scripts/device_wheels.sh                 # here, once: the wheels that machine's image lacks
    python3 scripts/gpu_checks.py --out "$OUT" --budget 540   # there, in one call (carry .whl)
    .venv/bin/python scripts/gpu_checks.py --smoke --out /tmp/gc   # here: the script itself, tiny, on the CPU

What it measures, in this order (the first ones matter most), each command under its own
time limit and all of them under `--budget` seconds, so one that hangs or fails costs only
itself and what is left still runs:
  pretrain-none, -ddp1, -fsdp1   issue 8: `base` at sequence 1024, bf16, torch.compile, one GPU
                                 with parallel.strategy none, ddp and fsdp (torchrun, 1 process):
                                 tokens/s and MFU of the last logged interval (compile excluded),
                                 the tensors' peak memory, `lmlab plan`'s estimate beside it
  bench-griffin                  issue 11: the RG-LRU scan and the whole Griffin, forward +
                                 backward at 2048, against recurrentgemma's loop
  bench-trm-jax-f32, -bf16       issue 14: the JAX TRM step (JAX CUDA) against the torch one
  plan-check                     issue 8: `lmlab plan` against measured CUDA peaks (scripts/plan_check.py;
                                 a Griffin case: the traced plan)
  bench-decode                   issue 11: decode tokens/s and state size against the context
  bench-train                    our training step against transformers' Llama, same weights
  bench-griffin-2b               issue 11: the same at RecurrentGemma-2B's shape (random weights)
  bench-serve                    issue 12: `lmlab serve` throughput and time to first token

The machine reaches no package registry: its image has torch, JAX, transformers and most of
what lmlab needs; scripts/device_wheels.sh downloads the rest here (pydantic, recurrentgemma,
...) into .whl/, which this script installs into /tmp/site when it finds them. Nothing else
is downloaded: the data is the Python standard library's own text (the `stdlib` corpus).

Outputs in --out: results.json (every figure, per check), summary.md (the tables for the
issues' notes), checks.log (every command and its output), the benches' plots.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2 ** 30


class Runner:
    """Runs the checks' commands under one budget, logging every command and its output."""

    def __init__(self, out: Path, budget: float, env: dict) -> None:
        self.out, self.env, self.deadline = out, env, time.monotonic() + budget
        self.log = open(out / "checks.log", "a", buffering=1)
        self.results: dict = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sh(self, name: str, cmd: list[str], limit: float) -> subprocess.CompletedProcess | None:
        """Run `cmd` for at most `limit` s (less if the budget is nearly spent); None if skipped."""
        if self.left() < 20:  # too little left to start one more command
            self.results.setdefault(name, {})["status"] = "skipped: the budget is spent"
            return None
        limit = min(limit, self.left())
        self.log.write(f"\n=== {name} ({limit:.0f} s at most): {' '.join(cmd)}\n")
        t0 = time.monotonic()
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as e:
            self.log.write(_text(e.stdout) + _text(e.stderr) + f"\n=== {name}: timed out after {limit:.0f} s\n")
            self.results.setdefault(name, {})["status"] = f"timed out after {limit:.0f} s"
            return None
        seconds = time.monotonic() - t0
        self.log.write(r.stdout + r.stderr + f"\n=== {name}: exit {r.returncode} in {seconds:.1f} s\n")
        self.results.setdefault(name, {}).update({"status": "ok" if r.returncode == 0 else f"exit {r.returncode}",
                                                  "seconds": round(seconds, 1)})
        if r.returncode != 0:
            self.results[name]["error"] = (r.stderr.strip().splitlines() or [""])[-1][:300]
        return r if r.returncode == 0 else None

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def lmlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmlab", *args]


def install_wheels(env: dict) -> str:
    """The carried wheels (.whl/) into /tmp/site, first on PYTHONPATH; -> what happened."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        return "no .whl/ folder: using the packages already installed"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", "/tmp/site", *map(str, wheels)],
                       capture_output=True, text=True)
    env["PYTHONPATH"] = os.pathsep.join(["/tmp/site", env["PYTHONPATH"]])
    return f"installed {len(wheels)} wheels into /tmp/site" if r.returncode == 0 else f"pip failed: {r.stderr[-500:]}"


def probe(run: Runner) -> None:
    code = ("import json, platform, torch; d = {'python': platform.python_version(), 'torch': torch.__version__, "
            "'cuda': torch.cuda.is_available()}\nif d['cuda']: d.update(gpu=torch.cuda.get_device_name(), "
            "memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1), "
            "bf16=torch.cuda.is_bf16_supported())\ntry:\n import jax; d.update(jax=jax.__version__, "
            "jax_devices=[str(x) for x in jax.devices()])\nexcept Exception as e: d['jax'] = repr(e)[:200]\n"
            "import lmlab; d['lmlab'] = lmlab.__version__\nprint(json.dumps(d))")
    r = run.sh("probe", [sys.executable, "-c", code], 120)
    if r is not None:
        run.results["probe"].update(json.loads(r.stdout.strip().splitlines()[-1]))


def make_data(run: Runner, work: Path, smoke: bool) -> Path | None:
    """stdlib corpus -> a BPE tokenizer -> packed rows of the pretraining sequence length + 1."""
    seq = 64 if smoke else 1024
    steps = [("corpus", lmlab("corpus", f"out={work / 'corpus'}", f"sources=[{{kind: stdlib, max_docs: "
                                                                    f"{60 if smoke else 4000}}}]")),
             ("tokenizer", lmlab("tokenizer", f"corpus={work / 'corpus'}", f"out={work / 'tokenizer'}",
                                 f"vocab_size={512 if smoke else 8192}")),
             ("pack", lmlab("pack", f"corpus={work / 'corpus'}", f"tokenizer={work / 'tokenizer'}",
                            f"out={work / 'packed'}", f"seq_len={seq + 1}", "val_fraction=0.02"))]
    for name, cmd in steps:
        if run.sh(f"data-{name}", cmd, 300) is None:
            return None
    return work / "packed"


def pretrain_checks(run: Runner, work: Path, packed: Path, smoke: bool) -> None:
    """Issue 8's table: base @1024, bf16, compile, on one GPU as none / ddp(1) / fsdp(1)."""
    common = [f"data={packed}", f"model.preset={'micro' if smoke else 'base'}", f"train.steps={4 if smoke else 40}",
              f"train.batch_size={4 if smoke else 16}", "train.warmup_steps=2", "eval.every=0", "eval.batches=0",
              "checkpoint.every=0", f"log.every={2 if smoke else 10}"]
    if not smoke:
        common += ["train.device=cuda", "train.dtype=auto", "train.compile=true"]
    else:
        common += ["train.device=cpu"]
    vocab = _vocab(packed)
    for strategy, launch in (("none", []), ("ddp", ["ddp1"]), ("fsdp", ["fsdp1"])):
        name = f"pretrain-{launch[0] if launch else 'none'}"
        out = work / name
        args = ["pretrain", *common, f"out={out}", f"parallel.strategy={strategy}"]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        cmd = lmlab(*args) if strategy == "none" else [*torchrun, "-m", "lmlab", *args]
        if run.sh(name, cmd, 90 if smoke else 300) is None:
            continue
        stats = json.loads((out / "manifest.json").read_text())["stats"]
        last = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r][-1]
        res = {"tokens_per_s_last_interval": last.get("tokens_per_s"), "mfu_last_interval": last.get("mfu"),
               "tokens_per_s_whole_run": stats.get("tokens_per_s"), "peak_memory_gib": stats.get("peak_memory_gib"),
               "precision": stats.get("precision"), "params": stats.get("params"), "final_loss": last.get("loss")}
        plan = run.sh(f"{name}-plan", lmlab("plan", "pretrain", *common, f"parallel.strategy={strategy}",
                                            "--vocab-size", str(vocab), "--memory-gib", "140", "--json"), 120)
        if plan is not None:
            res["plan_peak_tensors_gib"] = round(json.loads(plan.stdout)["peak_tensors"] / GIB, 3)
        run.results[name].update(res)
        run.save()


def _vocab(packed: Path) -> int:
    return int(json.loads((packed / "manifest.json").read_text())["stats"]["vocab_size"])


def bench(run: Runner, name: str, what: str, args: list[str], limit: float) -> None:
    """`lmlab bench WHAT ARGS out=...json`: its JSON into the results."""
    path = run.out / f"{name}.json"
    r = run.sh(name, lmlab("bench", what, *args, f"out={path}"), limit)
    if r is not None and path.is_file():
        run.results[name]["figures"] = json.loads(path.read_text())
        run.results[name]["printed"] = r.stdout.strip().splitlines()[-24:]  # the bench's own table
        path.unlink()  # in results.json now: the device tool brings back 8 files at most
    run.save()


def benches(run: Runner, smoke: bool) -> None:
    dev = "device=cpu" if smoke else "device=cuda"
    small = ["steps=1", "warmup=0", "repeats=1"] if smoke else ["repeats=3"]
    bench(run, "bench-griffin", "griffin", ["preset=micro" if smoke else "preset=tiny",
                                            f"seq_len={128 if smoke else 2048}", "batch_size=2", dev, *small], 240)
    for dtype, short in (("float32", "f32"), ("bfloat16", "bf16")):
        bench(run, f"bench-trm-jax-{short}", "trm-jax", [dev, f"trm_dtype={dtype}", *small,
              *(["batch_size=4", "trm_hidden=32", "trm_h_cycles=1", "trm_l_cycles=1"] if smoke else
                ["batch_size=256"])], 240)
    cases = ["micro,64,4", "micro,64,4,griffin"] if smoke else ["base,1023,8,bf16", "base,1023,8,bf16,ckpt",
                                                                "small,1023,8,bf16,dpo", "small,1023,8,bf16,griffin"]
    r = run.sh("plan-check", [sys.executable, "scripts/plan_check.py", "--device", "cpu" if smoke else "cuda",
                              *[f"--case={c}" for c in cases]], 180)
    if r is not None:
        run.results["plan-check"]["printed"] = r.stdout.strip().splitlines()
    bench(run, "bench-decode", "decode", ["preset=micro" if smoke else "preset=tiny", dev,
                                          f"contexts=[{'32, 64' if smoke else '128, 512, 2048, 8192'}]",
                                          f"plot={run.out / 'decode.png'}", "max_new_tokens=8" if smoke else
                                          "max_new_tokens=64", *small], 240)
    bench(run, "bench-train", "train", ["preset=micro" if smoke else "preset=base", "vocab_size=512" if smoke else
                                        "vocab_size=32768", f"seq_len={32 if smoke else 1024}",
                                        f"batch_size={2 if smoke else 8}", dev, *small], 240)
    if not smoke:  # the users' model: RecurrentGemma-2B's shape, one sequence of 2048, forward + backward
        bench(run, "bench-griffin-2b", "griffin", ["preset=2b", "seq_len=2048", "batch_size=1", dev, "repeats=2"], 240)
    bench(run, "bench-serve", "serve", ["preset=micro" if smoke else "preset=tiny", dev, "concurrency=[1, 4]" if smoke
                                        else "concurrency=[1, 16, 64]", f"requests={4 if smoke else 64}",
                                        f"max_new_tokens={4 if smoke else 64}"], 240)


def summary(results: dict) -> str:
    """The tables for the issues' notes."""
    lines = ["# GPU checks", "", "```", json.dumps(results.get("probe", {})), "```", "",
             "| check | status | s | figures |", "|---|---|---|---|"]
    for name, r in results.items():
        if name == "probe":
            continue
        figures = {k: v for k, v in r.items() if k not in ("status", "seconds", "figures", "printed")}
        lines.append(f"| {name} | {r.get('status')} | {r.get('seconds', '')} | "
                     + ", ".join(f"{k}={v}" for k, v in figures.items())[:600] + " |")
    for name, r in results.items():
        if r.get("printed"):
            lines += ["", f"{name}:", "```", *r["printed"], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for results.json, summary.md, checks.log and plots")
    ap.add_argument("--budget", type=float, default=480, help="seconds for everything (default 480)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: check the script itself")
    ap.add_argument("--only", default="", help="comma-separated groups to run: pretrain, benches (default both)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LMLAB_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1",  # lmlab from this tree, not installed
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           # JAX takes 75% of the GPU at start by default; torch shares it in bench trm-jax
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    note = install_wheels(env) if not args.smoke else "smoke: this interpreter's packages"
    run = Runner(out, args.budget, env)
    run.log.write(f"{note}\n")
    work = Path(tempfile.mkdtemp(prefix="lmlab-gpu-checks-"))  # fresh: an earlier run's dirs would be "up to date"
    groups = set(filter(None, args.only.split(","))) or {"pretrain", "benches"}
    try:
        probe(run)
        if "pretrain" in groups and (packed := make_data(run, work, args.smoke)) is not None:
            pretrain_checks(run, work, packed, args.smoke)
        if "benches" in groups:
            benches(run, args.smoke)
    finally:
        run.save()
        (out / "summary.md").write_text(summary(run.results))
        shutil.rmtree(work, ignore_errors=True)  # the runs and data: what matters is in --out
    print((out / "summary.md").read_text())
    return 0 if all(r.get("status") == "ok" for r in run.results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
