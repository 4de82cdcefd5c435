"""`lmlab compressor`: train DimensionCompressors (lmlab/models/compressor.py) on a frozen LLM's
hidden states (LLM-TRM's phase 1), and measure them against the best linear reconstruction.

    lmlab compressor runs/llm_trm/sft out=runs/llm_trm/compressor dims='[32, 64, 128]' \
        trajectories='{problems: runs/llm_trm/tasks/train.jsonl, n: 200}'

Phase 1a trains one compressor per D' on the LLM's last-layer states (after the final norm:
what its output head reads) over plain text: the packed data it was pretrained on (`data`,
default: the model's own, following an SFT run to its init). Phase 1b, with `trajectories`,
goes on from 1a's weights on states over thinking trajectories the LLM generates itself
(its thinking chat template: the prompt, `<think> ... </think>`, the answer). Each phase
ends with metrics on held-out states of both kinds (the val split of the text; problems after
the training ones): MSE, relative error, mean per-token cosine and variance explained, and the
same for the optimal rank-D' linear map on that kind's training states (the bound a tied
linear compressor can at best reach) and for PCA (centred, an affine map, for reference).

Every D' trains for `steps` AdamW steps of `batch_tokens` states drawn with the seed, the
learning rate warmed up then cosine-decayed over exactly those steps. Writes, atomically:
compressor.safetensors and compressor.json (the final weights: lmlab.models.compressor's
`load_compressor`), compression.json (every metric), metrics.jsonl (loss curves), manifest.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from lmlab import artifacts
from lmlab.config import Strict
from lmlab.errors import UserError
from lmlab.data.chat import check_thinking_template
from lmlab.train.compressor_data import TrajectorySpec, text_states, trajectory_states

POSITIONAL = ("model", "the frozen LLM's run directory (a thinking SFT model for trajectories)")


class Config(Strict):
    model: str = Field("", description="the frozen LLM (a model run dir); its hidden states are compressed")
    out: str = Field("runs/compressor", description="output directory (kind 'compressor')")
    dims: Optional[list[int]] = Field(None, description="D' values, each at most the model's width D; default "
                                      "D/8, D/4, D/2")
    data: list[str] = Field(default_factory=list, description="packed artifacts of plain text (default: the data the "
                            "model, or the model it was finetuned from, was pretrained on)")
    tokens: int = Field(100_000, ge=1, description="training states from text (train split)")
    val_tokens: int = Field(20_000, ge=1, description="held-out states from text (val split)")
    trajectories: Optional[TrajectorySpec] = Field(None, description="phase 1b: states over the model's own thinking "
                                                   "trajectories, {problems: FILE, n, n_val, max_new_tokens}")
    template: Optional[str] = Field(None, description="chat template for the trajectories; default: the run's chat.json")
    steps: int = Field(400, ge=1, description="optimizer steps per D' per phase")
    batch_tokens: int = Field(2048, ge=1, description="states per step")
    lr: float = Field(1e-2, gt=0, description="peak AdamW learning rate")
    warmup_steps: int = Field(20, ge=0, description="linear warmup steps")
    log_every: int = Field(20, ge=1, description="steps between metrics.jsonl lines")
    seed: int = Field(0, description="seed of the initialisation and the batches")
    device: str = Field("auto", description="auto | cpu | cuda | mps")


def _dims(cfg: Config, d: int) -> list[int]:
    dims = cfg.dims if cfg.dims is not None else [max(1, d // 8), max(1, d // 4), max(1, d // 2)]
    bad = [k for k in dims if k > d or k < 1]
    if not dims or bad:
        raise UserError(f"dims={dims}: each D' must be between 1 and the model's width D={d} ({bad} is not); "
                        f"a compressor maps D -> D' <= D")
    return sorted(set(dims))


def _train(c, states: torch.Tensor, cfg: Config, phase: str, log, bar) -> float:
    """`cfg.steps` AdamW steps of MSE reconstruction on random batches of `states`; the last loss."""
    from lmlab.train.optim import Schedule, set_lr

    opt = torch.optim.AdamW(c.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = Schedule("cosine", cfg.lr, cfg.steps, cfg.warmup_steps, min_lr_ratio=0.1)
    g = torch.Generator().manual_seed(cfg.seed * 1009 + c.k)
    loss = float("nan")
    for step in range(cfg.steps):
        lr = sched(step)
        set_lr(opt, lr)
        x = states[torch.randint(0, len(states), (min(cfg.batch_tokens, len(states)),), generator=g)]
        out = F.mse_loss(c(x.to(c.weight.device)), x.to(c.weight.device))
        opt.zero_grad(set_to_none=True)
        out.backward()
        opt.step()
        loss = float(out.detach())
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log({"phase": phase, "d_prime": c.k, "step": step, "loss": loss, "lr": lr})
        bar.update(1)
    return loss


def _evaluate(compressors: dict, held: dict[str, torch.Tensor], refs: dict[str, dict], phase: str) -> list[dict]:
    """Metrics of every compressor and reference on every held-out set."""
    from lmlab.models.compressor import project, reconstruction_metrics

    rows = []
    for kind, x in held.items():
        mean = refs[kind]["mean"]
        for k, c in compressors.items():
            with torch.no_grad():
                x_hat = c(x.to(c.weight.device)).cpu()
            rows.append({"phase": phase, "eval_on": kind, "d_prime": k, "method": "compressor",
                         **reconstruction_metrics(x, x_hat, mean)})
            for method in ("linear_optimum", "pca"):
                basis, offset = refs[kind][method][k]
                rows.append({"phase": phase, "eval_on": kind, "d_prime": k, "method": method,
                             **reconstruction_metrics(x, project(x, basis, offset), mean)})
    return rows


def _references(train: torch.Tensor, dims: list[int]) -> dict:
    from lmlab.models.compressor import subspace

    return {"mean": train.double().mean(0), "linear_optimum": {k: subspace(train, k, centre=False) for k in dims},
            "pca": {k: subspace(train, k, centre=True) for k in dims}}


def run(cfg: Config) -> Path:
    from lmlab.infer.prompting import resolve_template
    from lmlab.models import load_model
    from lmlab.models.compressor import DimensionCompressor, save_compressors
    from lmlab.runtime import pick_device, progress
    from lmlab.tasks.problems import read_problems

    if not cfg.model:
        raise UserError("no model given; run `lmlab compressor RUN_DIR out=DIR`")
    model_dir, out = Path(cfg.model), Path(cfg.out)
    model_m = artifacts.require_artifact(model_dir, "model", "model")
    artifacts.check_out(out, "compressor", "compressor", inputs={"model": model_dir})
    packed = list(cfg.data) or artifacts.packed_inputs(model_m, follow_init=True)
    if not packed:
        raise UserError(f"{model_dir} names no packed data it (or its init) was pretrained on; give data=PACKED_DIR")
    inputs = {"model": {"path": str(model_dir), "fingerprint": model_m.get("fingerprint")}}
    for i, p in enumerate(packed):
        pm = artifacts.require_artifact(p, "packed", f"data[{i}]")
        theirs, ours = pm.get("tokenizer_sha256"), model_m.get("tokenizer_sha256")
        if theirs and ours and theirs != ours:  # its token ids would mean other words to this model
            raise UserError(f"data[{i}] {p} was packed with another tokenizer (sha256 {theirs[:12]}) than "
                            f"{model_dir}'s ({ours[:12]}); pack the text with the model's own: `lmlab pack "
                            f"corpus=... tokenizer={model_dir} out=...`")
        inputs[f"data_{i}"] = {"path": str(p), "fingerprint": pm.get("fingerprint")}
    problems: list[dict] = []
    if cfg.trajectories is not None:
        t = cfg.trajectories
        problems = read_problems(t.problems, t.n + t.n_val)
        if len(problems) < t.n + t.n_val:
            raise UserError(f"trajectories: {t.problems} has {len(problems)} problems, fewer than n + n_val = "
                            f"{t.n + t.n_val}; lower n or n_val")
        inputs["problems"] = {"path": t.problems, "fingerprint": artifacts.sha256_file(t.problems)}
    conf = cfg.model_dump(mode="json", exclude={"out", "device"})
    fp = artifacts.stage_fingerprint("compressor", conf, {k: v["fingerprint"] for k, v in inputs.items()})
    if artifacts.is_up_to_date(out, fp):
        print(f"compressor: up to date ({out}), nothing to do")
        return out

    timer = artifacts.Timer()
    device = pick_device(cfg.device)
    with timer("load"):
        model, tokenizer, _ = load_model(model_dir, device=device)
    model.requires_grad_(False).eval()
    d = int(getattr(model.cfg, "d_model", None) or model.cfg.width)  # transformer / griffin
    dims = _dims(cfg, d)
    template = None
    if cfg.trajectories is not None:
        template = resolve_template(model_dir, None, cfg.template, default=None)
        check_thinking_template(template, tokenizer, "trajectories")
    stats: dict = {"d": d, "dims": dims}
    with timer("states"):
        with progress(cfg.tokens + cfg.val_tokens, "compressor: text states", "tok", unit_scale=True) as bar:
            train = {"text": text_states(model, packed, "train", cfg.tokens, device, bar)}
            held = {"text": text_states(model, packed, "val", cfg.val_tokens, device, bar)}
        if cfg.trajectories is not None:
            t = cfg.trajectories
            with progress(None, "compressor: trajectory states", "tok", unit_scale=True) as bar:
                train["trajectories"], stats["trajectories_train"] = trajectory_states(
                    model, tokenizer, template, problems[:t.n], t, device, bar)
                held["trajectories"], stats["trajectories_val"] = trajectory_states(
                    model, tokenizer, template, problems[t.n:], t, device, bar)
    stats["states"] = {f"{split}_{kind}": len(x) for split, sets in (("train", train), ("val", held))
                       for kind, x in sets.items()}
    refs = {kind: _references(x, dims) for kind, x in train.items()}

    g = torch.Generator().manual_seed(cfg.seed)
    compressors = {k: DimensionCompressor(d, k, generator=g).to(device) for k in dims}
    phases = [("1a_text", "text")] + ([("1b_trajectories", "trajectories")] if "trajectories" in train else [])
    lines: list[dict] = []
    results: list[dict] = []
    try:
        with artifacts.atomic_dir(out) as tmp:
            with timer("train"), progress(len(phases) * len(dims) * cfg.steps, "compressor", "step") as bar:
                for phase, kind in phases:
                    for k in dims:
                        _train(compressors[k], train[kind], cfg, phase, lines.append, bar)
                    results += _evaluate(compressors, held, refs, phase)
            with open(tmp / "metrics.jsonl", "w") as f:
                f.writelines(json.dumps(x) + "\n" for x in lines)
            save_compressors(tmp, {k: c.cpu() for k, c in compressors.items()},
                             {"model": str(model_dir), "model_fingerprint": model_m.get("fingerprint"),
                              "tokenizer_sha256": getattr(tokenizer, "sha256", None), "phases": [p for p, _ in phases]})
            artifacts.write_json_atomic(tmp / "compression.json", {"d": d, "dims": dims, "stats": stats,
                                                                   "results": results})
            stats["final"] = {f"{r['eval_on']}_d{r['d_prime']}_cosine": round(r["cosine"], 4) for r in results
                              if r["phase"] == phases[-1][0] and r["method"] == "compressor"}
            artifacts.write_manifest(tmp, "compressor", conf, fp, verb="compressor", inputs=inputs,
                                     tokenizer_sha256=getattr(tokenizer, "sha256", None), timings=timer.total(),
                                     stats=stats)
    except OSError as e:
        raise artifacts.disk_error(e, out) from None
    _print_summary(results, phases[-1][0], out)
    return out


def _print_summary(results: list[dict], phase: str, out: Path) -> None:
    by = {(r["eval_on"], r["d_prime"], r["method"]): r for r in results if r["phase"] == phase}
    for kind in sorted({r["eval_on"] for r in by.values()}):
        for k in sorted({r["d_prime"] for r in by.values()}):
            c, opt = by[(kind, k, "compressor")], by[(kind, k, "linear_optimum")]
            share = c["variance_explained"] / opt["variance_explained"] if opt["variance_explained"] > 0 else math.nan
            print(f"compressor: {kind} D'={k}: cosine {c['cosine']:.4f}, relative error {c['relative_error']:.4f}, "
                  f"variance explained {c['variance_explained']:.4f} ({share:.1%} of the linear optimum's "
                  f"{opt['variance_explained']:.4f})")
    print(f"compressor: wrote {out}")
