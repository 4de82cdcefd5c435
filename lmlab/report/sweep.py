"""A hyperparameter sweep's results as markdown and PNG plots, read from its sweep.json.

Used twice: `lmlab sweep` writes OUT/summary.md (with history.png, importance.png,
params.png) next to OUT/sweep.json, and `lmlab report` adds a section per
sweep directory -- one named in its `inputs`, or a directory under its `root` that holds a
sweep.json -- with the same table and plots (PNG names prefixed by the sweep's name).
Needs nothing but sweep.json, so a copied sweep directory reports the same.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from lmlab import artifacts
from lmlab.report import plots
from lmlab.report.markdown import table

SWEEP_JSON = "sweep.json"
ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}


def load(sweep_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(sweep_dir) / SWEEP_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def find_sweeps(root: str, inputs: list[str]) -> list[Path]:
    """The sweep directories a report covers: `inputs` holding a sweep.json, and root's subdirectories that do."""
    candidates = [Path(p) for p in inputs]
    if root and Path(root).is_dir():
        candidates.append(Path(root))
        candidates += sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
    found, seen = [], set()
    for p in candidates:
        if (p / SWEEP_JSON).is_file() and p.resolve() not in seen:
            seen.add(p.resolve())
            found.append(p)
    return found


def fingerprints(sweeps: list[Path]) -> dict[str, str]:
    """The report's dependency on each sweep: sweep.json changes after every finished trial."""
    return {str((p / SWEEP_JSON).resolve()): artifacts.sha256_file(p / SWEEP_JSON) for p in sweeps}


def ranked(rec: dict) -> list[dict]:
    """Complete trials best first, then pruned ones by their last reported value, then the rest by number."""
    sign = -1.0 if rec.get("direction") == "maximize" else 1.0

    def key(t):
        v = t.get("value")
        good = v is not None and math.isfinite(v) and t["state"] in ("COMPLETE", "PRUNED")
        return ORDER.get(t["state"], 5), sign * v if good else 0.0, t["number"]

    return sorted(rec.get("trials", []), key=key)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "–" if v is None else str(v)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "sweep"


def summary_line(rec: dict, sweep_dir: str = "") -> str:
    n, target = rec.get("counts", {}), rec.get("trials_target")
    line = (f"{rec.get('finished', 0)} of {target} trials finished ({n.get('COMPLETE', 0)} complete, "
            f"{n.get('PRUNED', 0)} pruned; {n.get('FAIL', 0)} failed, {n.get('RUNNING', 0)} running).")
    best = rec.get("best")
    if best:
        params = ", ".join(f"`{k}={_fmt(v)}`" for k, v in best["params"].items())
        line += (f" Best: trial {best['number']}, {rec['metric']} **{best['value']:.4f}** with {params} "
                 f"(run directory `{Path(sweep_dir, best['run_dir'] or '')}`).")
    return line


def markdown(rec: dict, out_dir: Path, prefix: str = "", heading: str = "#", sweep_dir: str = "") -> list[str]:
    """The sweep's lines (a heading, the summary, the table, the plots); PNGs go into `out_dir`
    named `prefix` + history/importance/params.png. `sweep_dir` prefixes the run directories."""

    metric, keys = rec.get("metric", "value"), list(rec.get("space", {}))
    where = f"Sweep directory `{sweep_dir}`, storage `{rec.get('storage')}`. " if sweep_dir else ""
    lines = [f"{heading} Sweep `{rec.get('study')}`: `lmlab {rec.get('verb')}`, {rec.get('direction')} {metric}", "",
             where + summary_line(rec, sweep_dir), ""]
    rows, rank = [], 0
    for t in ranked(rec):
        rank += t["state"] == "COMPLETE"
        run_dir = t.get("run_dir") or "–"
        value = f"{t['value']:.4f}" if isinstance(t.get("value"), (int, float)) else "–"
        rows.append([rank if t["state"] == "COMPLETE" else "", t["number"], value, t["state"].lower(),
                     *[_fmt(t["params"].get(k)) for k in keys],
                     f"`{Path(sweep_dir, run_dir) if sweep_dir and t.get('run_dir') else run_dir}`", t.get("note", "")])
    lines += [table(["rank", "trial", metric, "state", *[f"`{k}`" for k in keys], "run directory", "note"], rows), ""]

    scored = [(t["number"], t.get("value"), t["state"]) for t in rec.get("trials", [])
              if t["state"] in plots.STATE_STYLE]
    if not scored:
        return lines + ["_No trial has finished yet: no plots._", ""]
    plots.sweep_history(scored, out_dir / f"{prefix}history.png", metric, rec.get("direction", "minimize"))
    lines += [f"![{metric} per trial, with the best so far]({prefix}history.png)", ""]
    if rec.get("importance"):
        plots.param_importance(rec["importance"], out_dir / f"{prefix}importance.png")
        lines += [f"![parameter importance]({prefix}importance.png)", ""]
    else:
        lines += [f"_{(rec.get('importance_note') or 'parameter importance not available').capitalize()}._", ""]
    space = rec.get("space", {})
    numeric = [k for k in keys if space[k].get("type") in ("float", "int")]
    if numeric:
        series = {k: [(t["params"][k], t.get("value"), t["state"]) for t in rec["trials"]
                      if k in t["params"] and t["state"] in plots.STATE_STYLE] for k in numeric}
        plots.sweep_params(series, out_dir / f"{prefix}params.png", metric,
                           {k for k in numeric if space[k].get("log")})
        lines += [f"![{metric} against each numeric parameter]({prefix}params.png)", ""]
    return lines


def write_summary(rec: dict, out: Path, source_sha256: str = "") -> Path:
    """OUT/summary.md and its PNGs, for `lmlab sweep`; it ends naming the sweep.json it shows."""
    text = "\n".join(markdown(rec, out)).rstrip() + "\n"
    if source_sha256:
        text += f"\n<!-- from sweep.json sha256 {source_sha256} -->\n"
    (out / "summary.md").write_text(text, encoding="utf-8")
    return out / "summary.md"


def report_sections(sweeps: list[Path], out_dir: Path) -> list[str]:
    """The report's sweep sections: one `## Sweep` per directory, its plots prefixed by its name."""
    lines, prefixes = [], set()
    for i, p in enumerate(sweeps):
        rec = load(p)
        if rec is None:
            lines += [f"## Sweep `{p}`", "", f"_`{p / SWEEP_JSON}` could not be read._", ""]
            continue
        prefix = f"sweep-{_slug(p.name)}-"
        prefix = prefix if prefix not in prefixes else f"sweep{i}-{_slug(p.name)}-"  # two sweeps named alike
        prefixes.add(prefix)
        lines += markdown(rec, out_dir, prefix=prefix, heading="##", sweep_dir=str(p))
    return lines


def console_summary(rec: dict, out: Path, top: int = 10) -> str:
    """What `lmlab sweep` prints at the end: the summary line, the best `top` trials, summary.md's path."""
    lines = [f"sweep '{rec['study']}': " + summary_line(rec, str(out)).replace("**", "").replace("`", "")]
    for t in ranked(rec)[:top]:
        value = f"{t['value']:.4f}" if isinstance(t.get("value"), float) else "–"
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())
        lines.append(f"  trial {t['number']:>4}  {t['state'].lower():<8}  {rec['metric']} {value:>8}  {params}  "
                     f"{out / t['run_dir'] if t.get('run_dir') else ''}")
    return "\n".join(lines + [str(out / "summary.md")])
