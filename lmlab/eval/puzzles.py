"""`lmlab puzzle-eval`: measure a TRM on a puzzle split, the paper's way and the ways the report plots.

    lmlab puzzle-eval model=runs/trm-sudoku/trm data=runs/trm-sudoku/puzzles
    lmlab puzzle-eval model=runs/trm-sudoku/trm data=runs/real-sudoku out=runs/trm-sudoku/eval_real

Every puzzle of the split runs all `halt_max_steps` supervision steps (lmlab.infer.puzzles).
`OUT/metrics.json` holds:
- exact_accuracy (the whole grid right after the last step: the paper's metric) with its
  standard error, token_accuracy, q_halt_accuracy;
- exact_accuracy_by_step (after 1, 2, ... steps), steps_used (the first step with q_halt >= 0)
  as mean and histogram, exact_accuracy_at_halt (answering when the model says stop) and the
  accuracy by steps used;
- accuracy_by_rating: quantile bins of the puzzles' difficulty ratings (Sudoku: the solver's
  backtracks or the file's rating; mazes: the shortest path's length), and accuracy_by_fill:
  bins of the cells to fill (Sudoku's blanks, a maze's path cells), a second difficulty axis
  that separates the easy puzzles a rating of 0 lumps together;
- ARC sets: predictions mapped back through each augmentation's inverse and voted per test
  input (count, then mean Q-halt probability), pass@1 and pass@2 as the paper reports, and
  `submission.json` in the ARC Prize layout.
`OUT/predictions.npz` keeps the first `keep_predictions` puzzles (inputs, labels, answers,
exactness per step, steps used) for the report's rendered puzzles. The model's own
puzzles.json (written by `lmlab trm`) must describe the same cells and vocabulary as the set.
`backend=jax` solves with the JAX TRM (lmlab.infer.puzzles_jax) over every device JAX sees
(dtype auto: bfloat16 on TPUs and GPUs, float32 on CPUs): in float32 the same answers and metrics.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import Field

from lmlab import artifacts
from lmlab.config import Strict
from lmlab.errors import UserError

KIND = "puzzle_eval"
POSITIONAL = ("model", "the TRM run directory (`lmlab trm`)")
METRICS = "metrics.json"
PREDICTIONS = "predictions.npz"


class Config(Strict):
    model: str = Field("runs/trm", description="the TRM run directory")
    data: str = Field("runs/puzzles", description="the puzzle set (`lmlab puzzles`)")
    split: str = Field("test", description="the split to evaluate")
    out: Optional[str] = Field(None, description="output directory (kind puzzle_eval); null = eval_<set name> next "
                               "to the model")
    limit: Optional[int] = Field(None, ge=1, description="evaluate the first N examples only")
    batch_size: int = Field(256, ge=1, description="puzzles per forward")
    keep_predictions: int = Field(64, ge=0, description="puzzles whose answers are kept for rendering")
    pass_ks: list[int] = Field(default_factory=lambda: [1, 2], description="ARC: pass@k of the voted predictions")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="autocast as in training (auto: bf16 "
                                                          "on CUDA and on CPUs with native bf16)")
    backend: Literal["torch", "jax"] = Field("torch", description="torch, or jax: the JAX TRM over every device "
                                             "JAX sees (the jax extra; batch_size a multiple of the devices)")


def default_out(model_dir: Path, data: Path) -> Path:
    return model_dir.parent / f"eval_{data.name}"


def check_compatible(model_dir: Path, model_cfg, info: dict, meta: dict, data: str) -> None:
    """The set must have the model's cells, vocabulary and puzzle identifiers (a clear error otherwise)."""
    from lmlab.data.puzzles.format import INFO

    problems = []
    for key, want in (("seq_len", model_cfg.seq_len), ("vocab_size", model_cfg.vocab_size)):
        if int(meta[key]) != want:
            problems.append(f"{key} {meta[key]} (the model's: {want})")
    if int(meta["num_puzzle_identifiers"]) > model_cfg.num_puzzle_identifiers:
        problems.append(f"{meta['num_puzzle_identifiers']} puzzle identifiers (the model has embeddings for "
                        f"{model_cfg.num_puzzle_identifiers})")
    trained = model_dir / INFO
    if trained.is_file():
        mine = json.loads(trained.read_text())
        if mine.get("vocab") and info.get("vocab") and mine["vocab"] != info["vocab"]:
            problems.append(f"vocabulary {info['vocab']} (the model's: {mine['vocab']})")
        if mine.get("kind") and info.get("kind") and mine["kind"] != info["kind"]:
            problems.append(f"kind {info['kind']!r} (the model was trained on {mine['kind']!r} puzzles)")
    if problems:
        raise UserError(f"the puzzle set {data} does not match the model {model_dir}: " + "; ".join(problems)
                        + ". Evaluate it with a model trained on such puzzles, or build the set with the same "
                          "kind and size")


def run(cfg: Config) -> Path:
    import torch

    from lmlab.data.puzzles.format import read_info, read_split
    from lmlab.data.puzzles.sampler import owners
    from lmlab.eval.estimators import stderr
    from lmlab.infer.puzzles import cells_to_fill, solve, summary
    from lmlab.models import load_weights
    from lmlab.runtime import pick_device, progress
    from lmlab.train.loop import autocast_dtype

    model_dir, data = Path(cfg.model), Path(cfg.data)
    out = Path(cfg.out) if cfg.out else default_out(model_dir, data)
    artifacts.check_out(out, KIND, "puzzle-eval", inputs={"model": model_dir, "puzzle set": data})
    model_manifest = artifacts.require_artifact(model_dir, "trm", "TRM model")
    set_manifest = artifacts.require_artifact(data, "puzzles", "puzzle set")
    config = cfg.model_dump(mode="json")
    inputs = {"model": {"path": str(model_dir), "fingerprint": model_manifest.get("fingerprint")},
              "puzzles": {"path": str(data), "fingerprint": set_manifest.get("fingerprint")}}
    # how it runs, not what it measures: the device and the backend (the same argmax answers)
    fp = artifacts.stage_fingerprint(KIND, {k: v for k, v in config.items() if k not in ("out", "device", "backend")},
                                     {k: v["fingerprint"] for k, v in inputs.items()})
    if artifacts.is_up_to_date(out, fp):
        print(f"puzzle-eval: up to date ({out}), nothing to do")
        return out
    info = read_info(data)
    split, meta = read_split(data, cfg.split)
    model = load_weights(model_dir, "cpu", kind="puzzle")
    check_compatible(model_dir, model.cfg, info, meta, str(data))
    device = pick_device(cfg.device)
    model.to(device)
    amp = autocast_dtype(cfg.dtype, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else contextlib.nullcontext
    timer = artifacts.Timer()
    n = split.num_examples if cfg.limit is None else min(cfg.limit, split.num_examples)
    if cfg.backend == "jax":
        solver, state = _jax_solver(model, cfg.batch_size, cfg.dtype)
        amp = None  # the precision is the solver's
    with timer("solve"), progress(total=n, desc="puzzle-eval", unit="puzzle") as bar:
        if cfg.backend == "jax":
            from lmlab.infer.puzzles_jax import solve_split

            solved = solve_split(solver, *state, split, cfg.batch_size, limit=cfg.limit, progress_bar=bar)
        else:
            solved = solve(model, split, cfg.batch_size, device, limit=cfg.limit, progress_bar=bar, autocast=autocast)
    own = owners(split)
    metrics = summary(solved, split.ratings, own, fill=cells_to_fill(split))
    last = solved.exact[solved.scored][:, -1].astype(float)
    metrics["exact_accuracy_stderr"] = stderr(last.tolist())
    metrics.update(split=cfg.split, kind=info.get("kind"), model=str(model_dir), data=str(data),
                   halt_max_steps=model.cfg.halt_max_steps, puzzles_per_s=round(n / max(timer.total()["solve"], 1e-9), 1),
                   precision=(solver.precision if cfg.backend == "jax" else "bf16 autocast" if amp is not None
                              else "float32"), backend=cfg.backend)
    submission = None
    if info.get("kind") == "arc":
        metrics["arc"], submission = _arc_votes(data, split, solved, own, cfg.pass_ks)
    k = min(cfg.keep_predictions, len(solved.examples))
    rows = solved.examples[:k]
    try:
        with artifacts.atomic_dir(out) as tmp:
            artifacts.write_json_atomic(tmp / METRICS, metrics)
            np.savez_compressed(tmp / PREDICTIONS, inputs=np.asarray(split.inputs[rows]),
                                labels=np.asarray(split.labels[rows]), preds=solved.preds[:k],
                                exact=solved.exact[:k], steps_used=solved.steps_used[:k],
                                ratings=(np.asarray(split.ratings)[own[rows]] if split.ratings is not None
                                         else np.full(k, np.nan)), grid=np.asarray(info.get("grid", [0, 0])),
                                vocab=np.asarray(info.get("vocab", []), dtype=object).astype(str))
            if submission is not None:
                artifacts.write_json_atomic(tmp / "submission.json", submission)
            stats = {k2: metrics[k2] for k2 in ("examples", "exact_accuracy", "exact_accuracy_stderr", "token_accuracy",
                                                 "steps_used_mean", "exact_accuracy_at_halt", "puzzles_per_s")}
            if "arc" in metrics:
                stats["arc"] = metrics["arc"]
            artifacts.write_manifest(tmp, KIND, config, fp, inputs=inputs, verb="puzzle-eval",
                                     timings=timer.total(), stats=stats)
    except OSError as e:
        raise artifacts.disk_error(e, out) from None
    se = metrics["exact_accuracy_stderr"]
    arc = "".join(f", {kk} {v:.3f}" for kk, v in metrics.get("arc", {}).items() if kk.startswith("pass@"))
    print(f"puzzle-eval: {metrics['examples']} puzzles, exact accuracy {metrics['exact_accuracy']:.3f}"
          f"{f' ± {se:.3f}' if se is not None else ''}, token accuracy {metrics['token_accuracy']:.3f}, "
          f"steps used {metrics['steps_used_mean']:.1f}{arc} -> {out}", file=sys.stderr)
    return out


def _jax_solver(model, batch_size: int, dtype: str):
    """backend=jax: (the Solver on a mesh of every device, [params, consts, table] placed on it);
    dtype auto: bfloat16 on TPUs and GPUs, float32 on CPUs (lmlab.jax_backend.compute_dtype)."""
    from lmlab.infer.puzzles_jax import Solver
    from lmlab.jax_backend import compute_dtype, enable_compile_cache, require_jax
    from lmlab.jax_backend.mesh import make_mesh, shards
    from lmlab.jax_backend.trm import convert
    from lmlab.train.trm_jax import check_batch

    require_jax()
    import jax

    enable_compile_cache()
    mesh = make_mesh(None)
    check_batch(batch_size, shards(mesh), "batch_size")
    solver = Solver(model.cfg, mesh, compute_dtype(dtype, jax.devices()[0].platform))
    params, consts, table = convert.from_torch_state(model.state_dict(), model.cfg)
    return solver, [solver.put(params, False), solver.put(consts, False),
                    None if table is None else solver.put(table, False)]


def _arc_votes(data: Path, split, solved, own: np.ndarray, pass_ks: list[int]):
    """ARC: vote the augmented predictions per test input (lmlab.data.puzzles.arc.vote) ->
    ({"pass@k": ..., "num_tasks", "tasks_without_predictions"}, the submission)."""
    from lmlab.data.puzzles import arc
    from lmlab.data.puzzles.format import IDENTIFIERS, TEST_PUZZLES

    names = json.loads((data / IDENTIFIERS).read_text())
    test_puzzles = json.loads((data / TEST_PUZZLES).read_text())
    q_prob = 1 / (1 + np.exp(-solved.q_halt[:, -1].astype(np.float64)))
    ids = np.asarray(split.puzzle_identifiers)[own[solved.examples]]
    preds = ((names[int(i)], np.asarray(split.inputs[e]), p, float(q))
             for i, e, p, q in zip(ids, solved.examples, solved.preds, q_prob) if int(i) != 0)
    voted = arc.vote(preds, test_puzzles, pass_ks=tuple(pass_ks))
    submission = voted.pop("submission")
    return voted, submission
