"""lmlab models under lm-evaluation-harness (EleutherAI's `lm-eval`), as its model `lmlab`.

    pip install 'lmlab[lm_eval]'                      # lm-eval >= 0.4 (tested with 0.4.13)

    # lm-eval's own command line, with `lmlab` registered first (lm-eval has no plugin entry
    # point for models, so the plain `lm_eval --model lmlab` does not know the name):
    python -m lmlab.eval.lm_harness --model lmlab --model_args path=runs/smoke/model \\
        --tasks my_task --include_path my_tasks/ --batch_size 16 --device cpu

    # from Python
    import lmlab.eval.lm_harness                      # registers the model name "lmlab"
    from lm_eval import simple_evaluate
    res = simple_evaluate(model="lmlab", model_args="path=runs/smoke/model", tasks=["my_task"])
    lm = LmlabLM(path="runs/smoke/model")             # or LmlabLM(model=model, tokenizer=tokenizer)
    res = simple_evaluate(model=lm, tasks=["my_task"], task_manager=TaskManager(include_path="my_tasks"))

    # as an eval section (lmlab/eval/evaluate.py)
    lmlab eval runs/smoke/model "lm_eval={tasks: [my_task], include_path: my_tasks}"

`LmlabLM` (lmlab/eval/lm_harness_model.py, re-exported here) loads a run dir and implements
lm-eval's three request types; its module docstring gives the tokenization conventions (those
of lm-eval's hf backend) and the model arguments (`--model_args k=v,...`). This module holds
what lmlab runs on top of it: the eval section (task_manager, run_tasks, summarize, the stats
keys and report lines) and lm-eval's command line with `lmlab` registered (main).

Importing this module needs lm-eval; nothing else in lmlab imports it at module level.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from lmlab.errors import UserError
# lm-eval comes through lm_harness_model, under its install guard (without lm-eval: a UserError
# naming INSTALL_HINT); that import registers the model "lmlab" too
from lmlab.eval.lm_harness_model import (DEFAULT_BATCH_SIZE, DEFAULT_MAX_GEN_TOKS, INSTALL_HINT,  # noqa: F401  (re-exported)
                                         LmlabLM, lm_eval)


# ---------------------------------------------------------------------- results and tasks

def task_manager(tasks: list[str], include_path=None, include_defaults: Optional[bool] = None):
    """A TaskManager that knows every name in `tasks` (or a UserError naming the unknown ones).

    include_defaults=None: lm-eval's built-in tasks (~15k YAML files, ~20 s to index) only when
    some task is not under include_path.
    """
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    for p in paths:
        if not Path(p).exists():
            raise UserError(f"lm_eval.include_path not found: {p}")
    paths = [str(p) for p in paths] or None

    def unknown(tm) -> list[str]:
        return [t for t in tasks if not Path(t).is_file() and not tm.match_tasks([t])]

    if paths and include_defaults is not True:
        tm = TaskManager(include_path=paths, include_defaults=False)
        missing = unknown(tm)
        if not missing:
            return tm
        if include_defaults is False:
            raise UserError(f"unknown lm-eval task(s) {missing}: not defined under include_path {paths} "
                            f"(include_defaults=false); tasks there: {tm.all_tasks[:20]}")
    tm = TaskManager(include_path=paths, include_defaults=include_defaults is not False)
    missing = unknown(tm)
    if missing:
        from lm_eval.api.registry import _suggest_similar

        hints = {t: _suggest_similar(t, tm.all_tasks) for t in missing}
        raise UserError(f"unknown lm-eval task(s) {missing}" + "".join(f"; {t}: did you mean {h}?" for t, h in
                                                                      hints.items() if h)
                        + (f" (include_path {paths})" if paths else " (give include_path for local task YAMLs)"))
    return tm


def tree_sha256(path) -> str:
    """sha256 over a file, or over every file under a directory (relative names and contents;
    hidden entries and __pycache__ skipped): what an include_path's task definitions hash to."""
    import hashlib

    from lmlab.artifacts import sha256_file

    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p)
        if not f.is_file() or any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        h.update(f"{rel.as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def run_tasks(model, tokenizer, spec, tm, device=None, seed: int = 0, path: Optional[str] = None) -> dict:
    """The eval section (`lmlab eval ... lm_eval={...}`): simple_evaluate on the loaded model with the
    spec's settings (lmlab.eval.evaluate.LmEvalSpec) -> {version, settings, tasks: summarize(...)}."""
    from lm_eval import simple_evaluate

    lm = LmlabLM(path=path, model=model, tokenizer=tokenizer, device=device, batch_size=spec.batch_size,
                 max_length=spec.max_length, max_gen_toks=spec.max_gen_toks, add_bos_token=spec.add_bos_token,
                 seed=seed)
    limit = spec.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    try:
        res = simple_evaluate(model=lm, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot, limit=limit,
                              task_manager=tm, log_samples=False, bootstrap_iters=spec.bootstrap_iters)
    except UserError:
        raise
    except Exception as e:
        mod = type(e).__module__ or ""
        if isinstance(e, (OSError, ConnectionError)) or mod.startswith(("datasets", "huggingface_hub", "fsspec",
                                                                          "requests", "urllib3")):
            raise UserError(f"lm_eval: a task's data could not be loaded ({type(e).__name__}: {e}); local "
                            f"tasks need `dataset_path: json` with `dataset_kwargs: {{data_files: ...}}`, hub "
                            f"tasks a reachable (or cached, HF_DATASETS_OFFLINE=1) Hugging Face hub") from None
        raise
    return {"version": lm_eval.__version__,
            "settings": {"max_length": lm.max_length, "add_bos_token": lm.add_bos_token,
                         "prefix_token_id": lm.prefix_token_id, "batch_size": lm.batch_size,
                         "num_fewshot": spec.num_fewshot, "limit": limit},
            "tasks": summarize(res)}


def _number(v):
    """A metric value for JSON: floats kept, 'N/A' and NaN -> None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return None if v != v or v in (float("inf"), float("-inf")) else v


def summarize(res: dict) -> list[dict]:
    """simple_evaluate's output -> [{task, alias, n, n_total, version, num_fewshot, output_type, group,
    metrics: [{metric, filter, value, stderr, higher_is_better}]}], tasks and groups in lm-eval's order
    (a value or stderr lm-eval gives as "N/A" or NaN is None)."""
    out = []
    n_samples = res.get("n-samples") or {}
    configs = res.get("configs") or {}
    for name, values in (res.get("results") or {}).items():
        metrics = []
        better = (res.get("higher_is_better") or {}).get(name) or {}
        for key, v in values.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            hib = better.get(metric)
            metrics.append({"metric": metric, "filter": filt, "value": _number(v),
                            "stderr": _number(values.get(f"{metric}_stderr,{filt}")),
                            "higher_is_better": hib if isinstance(hib, bool) else None})
        cfg = configs.get(name) or {}
        ns = n_samples.get(name) or {}
        out.append({"task": name, "alias": str(values.get("alias", name)).strip(),
                    "n": ns.get("effective"), "n_total": ns.get("original"),
                    "version": (res.get("versions") or {}).get(name), "num_fewshot": (res.get("n-shot") or {}).get(name),
                    "output_type": cfg.get("output_type"), "group": name in (res.get("groups") or {}),
                    "metrics": metrics})
    return out


def stat_key(task: str, m: dict) -> str:
    """The manifest stats key of a metric: lm_eval_TASK_METRIC (+ _FILTER unless the filter is 'none')."""
    suffix = "" if m["filter"] == "none" else f"_{m['filter']}"
    return f"lm_eval_{task}_{m['metric']}{suffix}"


def metrics_line(t: dict) -> str:
    """'acc 0.500 ± 0.167, acc_norm 0.333 ± 0.157 (6 docs, 0-shot)'."""
    parts = []
    for m in t["metrics"]:
        name = m["metric"] if m["filter"] == "none" else f"{m['metric']} ({m['filter']})"
        val = "–" if m["value"] is None else f"{m['value']:.4g}"
        se = f" ± {m['stderr']:.3g}" if m["stderr"] is not None else ""
        parts.append(f"{name} {val}{se}")
    docs = f"{t['n']} docs" if t.get("n") is not None else "group"
    shots = f", {t['num_fewshot']}-shot" if t.get("num_fewshot") is not None else ""
    return ", ".join(parts) + f" ({docs}{shots})"


def main(argv: Optional[list[str]] = None) -> None:
    """lm-eval's command line with the model `lmlab` registered (this module's import did it)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
