"""The report's lm-evaluation-harness section: every eval's `lm_eval` results side by side.

    parts += lm_eval_section(found, stage_of)

For every eval artifact whose eval.json has an `lm_eval` entry (written by `lmlab eval ...
lm_eval={tasks: [...]}`, lmlab/eval/lm_harness.py), one table: a row per task and metric
(lm-eval's filter in brackets when it is not "none"), a column per evaluated model (its
training stage: Base, SFT, ...), each cell the value ± its standard error as lm-eval reports
it. Below it, per eval, lm-eval's version, the documents scored and the settings that change
the numbers. With no such eval, there is no section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from lmlab.report.markdown import table


def _cell(m: dict) -> str:
    v, se = m.get("value"), m.get("stderr")
    if v is None:
        return "–"
    return f"{v:.4g}" + (f" ± {se:.3g}" if se is not None else "")


def _metric_name(m: dict) -> str:
    arrow = {True: " ↑", False: " ↓"}.get(m.get("higher_is_better"), "")
    return m["metric"] + ("" if m.get("filter") in (None, "none") else f" ({m['filter']})") + arrow


def lm_eval_section(found: dict, stage_of: Callable[[dict], Optional[str]]) -> list[str]:
    evals = []  # (column label, eval dir, lm_eval entry)
    for eval_dir, eval_m in found.get("eval") or []:
        try:
            ev = json.loads((Path(eval_dir) / "eval.json").read_text())
        except (OSError, ValueError):
            continue
        le = ev.get("lm_eval")
        if isinstance(le, dict) and le.get("tasks"):
            model = ((eval_m.get("inputs") or {}).get("model") or {}).get("path")
            evals.append((stage_of(eval_m) or (Path(model).name if model else "?"), Path(eval_dir), le))
    if not evals:
        return []
    labels = [s for s, _, _ in evals]
    # the same stage evaluated twice (two evals of one model): tell the columns apart by directory
    labels = [f"{s} ({d.name})" if labels.count(s) > 1 else s for s, d, _ in evals]
    rows: dict[tuple[str, str], list[str]] = {}
    for col, (_, _, le) in enumerate(evals):
        for t in le["tasks"]:
            for m in t.get("metrics") or []:
                key = (t.get("alias") or t["task"], _metric_name(m))
                rows.setdefault(key, ["–"] * len(evals))[col] = _cell(m)
    out = ["## lm-evaluation-harness", "",
           "Tasks run by lm-evaluation-harness on each model (`lmlab eval ... lm_eval={tasks: [...]}`, "
           "docs/lm_eval.md), as lm-eval computes and reports them: value ± standard error; ↑ higher is "
           "better, ↓ lower is better.", "",
           table(["task", "metric"] + labels, [[task, metric] + cells for (task, metric), cells in rows.items()]), ""]
    for label, eval_dir, le in evals:
        st = le.get("settings") or {}
        docs = ", ".join(f"{t.get('alias') or t['task']} {t['n']}" + (f"/{t['n_total']}" if t.get("n_total") not in
                                                                     (None, t["n"]) else "")
                         + (f" ({t['num_fewshot']}-shot)" if t.get("num_fewshot") else "")
                         for t in le["tasks"] if t.get("n") is not None)
        bos = "bos before each context" if st.get("add_bos_token") else "no bos before contexts"
        out.append(f"- **{label}** (`{eval_dir}`): lm-eval {le.get('version', '?')}; documents {docs}; "
                   f"context {st.get('max_length', '?')} tokens, {bos}")
    return out + [""]
