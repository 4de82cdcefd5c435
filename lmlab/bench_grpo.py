"""`lmlab bench grpo`: one GRPO step of lmlab against TRL's GRPOTrainer, same model, prompts, G, length and reward.

    ./scripts/setup_peers.sh                      # once: TRL in its own venv (.peers/trl)
    lmlab bench grpo model=runs/cpu/sft problems=runs/cpu/tasks/train.jsonl prompts=8 num_generations=8 \\
        max_completion_length=64 steps=3 repeats=2

The model (a chat model run) is exported to a Hugging Face directory (`lmlab export`, with its
chat template) that TRL loads; both sides train on the same first `prompts` problems, G
completions each, at most `max_completion_length` new tokens, temperature 1, the exact-answer
reward, one optimizer step per generation, AdamW at the same constant lr. TRL runs in the peer
venv as a subprocess (scripts/peers/trl_grpo.py) so lmlab's environment never needs it; the
two sides alternate (ours, TRL, TRL, ours, ...) so a busy machine slows both alike, and each
figure is the median over all timed steps. The split: generation (the decoding loop), scoring
and reference (rewards, and the reference/old log-probs when beta > 0), update (the loss
forward, backward and AdamW). The sides sample different completions, so their mean
completion lengths are printed too; time per completion token corrects for a length gap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmlab.bench_timing import median as _median
from lmlab.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
PEER_SCRIPT = ROOT / "scripts" / "peers" / "trl_grpo.py"


def _peer_python(cfg) -> Path:
    p = Path(cfg.peer_python or os.environ.get("LMLAB_PEER_PYTHON", "") or ROOT / ".peers" / "trl" / "bin" / "python")
    if not p.is_file():
        raise UserError(f"TRL's venv was not found ({p}); create it with ./scripts/setup_peers.sh, or point "
                        f"peer_python=PATH (or LMLAB_PEER_PYTHON) at a python that has trl installed")
    return p


def _ours(cfg, device):
    """Our model, objective and optimizer set up for `steps` single-generation GRPO steps."""
    from lmlab.models import load_model
    from lmlab.rewards.functions import RewardSpec, Rewards
    from lmlab.train import grpo

    model, tokenizer, _ = load_model(cfg.model, device="cpu")
    g = grpo.Config(init=cfg.model, problems=cfg.problems, num_generations=cfg.num_generations,
                    max_completion_length=cfg.max_completion_length, beta=cfg.beta,
                    train={"batch_size": cfg.prompts * cfg.num_generations, "lr": cfg.lr, "device": str(device),
                           "seed": cfg.seed}, out=tempfile.mkdtemp(prefix="lmlab-bench-grpo-"))
    template = grpo._resolve_template(g, tokenizer)
    problems, _ = grpo.read_problem_file(cfg.problems, cfg.prompts)
    if len(problems) < cfg.prompts:
        raise UserError(f"{cfg.problems} has {len(problems)} problems; prompts={cfg.prompts} needs as many")
    ctx = int(model.cfg.max_seq_len)
    prompts, _ = grpo.encode_prompts(problems, template, tokenizer, ctx - cfg.max_completion_length, "error")
    ref = None
    if cfg.beta:
        import copy

        ref = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    model.to(device)
    obj = grpo.GRPOObjective(g, tokenizer, template, prompts, problems, np.arange(len(problems)), np.zeros(0, np.int64),
                             Rewards([RewardSpec(name="exact")]), device, None, ref)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    return model, obj, opt, [p["question"] for p in problems], [p["answer"] for p in problems]


def _our_steps(model, obj, opt, steps: int, first: int) -> dict:
    out = {"generate": [], "rollout": [], "step": [], "lengths": []}
    for step in range(first, first + steps):
        for k in obj.timings:
            obj.timings[k] = 0.0
        t0 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            obj.before_step(model, step)
        model.train()
        t1 = time.perf_counter()
        batch = obj.batch(step, 0)
        loss, count = obj.loss(model, batch)
        (loss / max(count, 1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        out["generate"].append(obj.timings["generate"])
        out["rollout"].append(t1 - t0)
        out["step"].append(t2 - t0)
        out["lengths"].append(float(np.mean([len(c) for c in obj.rollout["completion"]])))
    return out


def _trl_steps(cfg, python: Path, hf_dir: Path, prompts_file: Path, steps: int, work: Path, i: int) -> dict:
    out = work / f"trl_{i}.json"
    cmd = [str(python), str(PEER_SCRIPT), "--model", str(hf_dir), "--prompts", str(prompts_file), "--out", str(out),
           "--num-generations", str(cfg.num_generations), "--max-completion-length", str(cfg.max_completion_length),
           "--steps", str(steps), "--lr", str(cfg.lr), "--beta", str(cfg.beta), "--seed", str(cfg.seed + i),
           "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise UserError(f"the TRL side failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


def bench_grpo(cfg, device) -> dict:
    from lmlab.models import export

    if not cfg.model or not cfg.problems:
        raise UserError("bench grpo needs model=RUN_DIR (a chat model: an sft run) and problems=PATH "
                        "(GSM8K-format jsonl, e.g. runs/cpu/tasks/train.jsonl)")
    python = _peer_python(cfg)
    work = Path(tempfile.mkdtemp(prefix="lmlab-bench-grpo-"))
    hf_dir = work / "hf"
    export.run(export.Config(model=cfg.model, out=str(hf_dir)))
    model, obj, opt, questions, answers = _ours(cfg, device)
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps({"questions": questions, "answers": answers}))
    sides = {"lmlab": [], "trl": []}
    first = 0
    for r in range(cfg.repeats):
        order = ["lmlab", "trl"] if r % 2 == 0 else ["trl", "lmlab"]
        for name in order:
            if name == "lmlab":
                sides[name].append(_our_steps(model, obj, opt, cfg.steps + (cfg.warmup if r == 0 else 0), first))
                first += cfg.steps + (cfg.warmup if r == 0 else 0)
            else:  # each TRL run starts a process: its first step (warm-up) is dropped below
                sides[name].append(_trl_steps(cfg, python, hf_dir, prompts_file, cfg.steps + cfg.warmup, work, r))
    res: dict = {"what": "grpo", "params": model.num_params(), "peer": None}
    for name, runs in sides.items():
        merged = {k: [] for k in ("generate", "rollout", "step", "lengths")}
        for j, run in enumerate(runs):
            skip = cfg.warmup if (name == "trl" or j == 0) else 0
            for k in merged:
                merged[k] += run[k][skip:]
        step, gen, roll = _median(merged["step"]), _median(merged["generate"]), _median(merged["rollout"])
        length = float(np.mean(merged["lengths"])) if merged["lengths"] else float("nan")
        res[name] = {"step_s": step, "generate_s": gen, "score_and_reference_s": roll - gen, "update_s": step - roll,
                     "mean_completion_length": length,
                     "ms_per_completion_token": 1000 * step / max(length * cfg.prompts * cfg.num_generations, 1e-9),
                     "steps_timed": len(merged["step"])}
        if name == "trl" and runs:
            res["peer"] = {"trl": runs[0].get("trl"), "torch": runs[0].get("torch"), "threads": runs[0].get("threads")}
    res["ratio"] = res["trl"]["step_s"] / res["lmlab"]["step_s"]
    res["ratio_per_token"] = res["trl"]["ms_per_completion_token"] / res["lmlab"]["ms_per_completion_token"]
    return res


def print_grpo(cfg, res: dict) -> None:
    print(f"bench grpo: {cfg.model} ({res['params'] / 1e6:.1f}M params), {cfg.prompts} prompts x G "
          f"{cfg.num_generations}, max {cfg.max_completion_length} new tokens, beta {cfg.beta}, exact reward; "
          f"medians of {res['lmlab']['steps_timed']} / {res['trl']['steps_timed']} interleaved steps; "
          f"TRL {res['peer']['trl']} (torch {res['peer']['torch']}), {res['peer']['threads']} threads")
    print(f"  {'':<8}{'step s':>9}{'generate':>10}{'score+ref':>11}{'update':>9}{'mean len':>10}{'ms/token':>10}")
    for name in ("lmlab", "trl"):
        r = res[name]
        print(f"  {name:<8}{r['step_s']:>9.3f}{r['generate_s']:>10.3f}{r['score_and_reference_s']:>11.3f}"
              f"{r['update_s']:>9.3f}{r['mean_completion_length']:>10.1f}{r['ms_per_completion_token']:>10.3f}")
    print(f"  ratio TRL/lmlab step time: {res['ratio']:.2f}x (per completion token: {res['ratio_per_token']:.2f}x)",
          file=sys.stdout)
