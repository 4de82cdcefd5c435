"""The report's TRM sections: puzzle sets, TRM runs, their puzzle evaluations and rendered puzzles.

    parts += puzzle_sets_section(found)                 # kind, grid, examples / puzzles / groups per split
    parts += trm_section(found, out_dir, read_metrics)  # runs table, learning curves, evals, plots, puzzles
    summary_line(found)                                 # the opening paragraph of a puzzle-only report

`found` is report.discover's {kind: [(dir, manifest)]} with the kinds "puzzles" (`lmlab
puzzles`), "trm" (`lmlab trm`) and "puzzle_eval" (`lmlab puzzle-eval`); every section is
empty when the pipeline has none of them, so a language-model pipeline reports as before.
A puzzle-eval is tied to its run by its manifest's inputs["model"]["path"].

The plots are PNGs written into `out_dir`: trm_curves[_i].png (per run), trm_exact_by_step.png
(every eval), trm_steps_used_<eval>.png, trm_rating_<eval>.png, trm_fill_<eval>.png (by
cells to fill) and trm_puzzles_<eval>.png (lmlab.report.puzzle_images.render_puzzles: input,
prediction, truth for up to 6 puzzles of predictions.npz). A missing piece (a run without
metrics or evals, an eval without metrics.json or predictions.npz) is named in the text
instead of stopping the report.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable

import numpy as np

from lmlab.report import plots
from lmlab.report.markdown import fmt_count, fmt_duration, hardware_line, table
from lmlab.report.puzzle_images import render_puzzles
from lmlab.report.plots import DPI, FIGSIZE, plt

KINDS = ("puzzles", "trm", "puzzle_eval")

# panel -> [(metrics.jsonl key, series label, from the eval lines)]
CURVES = {"LM loss (cross-entropy)": [("lm_loss", "train", False)],
          "Q-halt loss (BCE)": [("q_halt_loss", "train", False)],
          "exact accuracy": [("exact_accuracy", "train (halted rows)", False), ("val_exact_accuracy", "val", True)]}

WALL_CLOCK = "val exact accuracy vs wall-clock"


def _wall_clock(train: list[dict], val: list[dict]) -> list[tuple[float, float]]:
    """(training minutes, val exact accuracy) per evaluation, the minutes interpolated from the
    train lines' (step, time_s)."""
    pts = sorted((r["step"], r["time_s"]) for r in train if _num(r.get("time_s")) is not None)
    if not pts:
        return []
    steps, secs = np.array([a for a, _ in pts], float), np.array([b for _, b in pts], float)
    return [(float(np.interp(r["step"], steps, secs)) / 60, r["val_exact_accuracy"]) for r in val
            if _num(r.get("val_exact_accuracy")) is not None]


# ----------------------------------------------------------------------------- helpers

def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _load_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _same(a, b) -> bool:
    try:
        return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "eval"


def _eval_names(evals: list[tuple[Path, dict]]) -> list[str]:
    """A file-name-safe, unique name per eval (its directory's name)."""
    names, seen = [], {}
    for p, _ in evals:
        n = _safe(Path(p).name)
        seen[n] = seen.get(n, 0) + 1
        names.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return names


def _model_ref(eval_m: dict):
    ref = ((eval_m or {}).get("inputs") or {}).get("model")
    return ref.get("path") if isinstance(ref, dict) else None


def _set_ref(eval_m: dict, metrics: dict | None):
    ref = ((eval_m or {}).get("inputs") or {}).get("puzzles")
    return (ref.get("path") if isinstance(ref, dict) else None) or (metrics or {}).get("data")


def _val_lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl's evaluation lines (val_exact_accuracy, ...): report.read_metrics keeps only
    lines with val_loss, which a TRM does not log."""
    from lmlab.train.logging import read_metrics as all_lines

    return [r for r in all_lines(run_dir) if isinstance(r, dict) and "step" in r and "val_exact_accuracy" in r]


def has_puzzles(found: dict) -> bool:
    return any(found.get(k) for k in KINDS)


# ----------------------------------------------------------------------------- puzzle sets

def _split_counts(p: Path, m: dict) -> dict[str, dict]:
    """{split: {examples, puzzles, groups}} from puzzles.json, the manifest's stats, or dataset.json."""
    info = _load_json(p / "puzzles.json") or {}
    for src in (info.get("splits"), (m.get("stats") or {}).get("splits")):
        if isinstance(src, dict) and src and all(isinstance(v, dict) for v in src.values()):
            return src
    out = {}
    for meta_path in sorted(p.glob("*/dataset.json")):
        meta = _load_json(meta_path) or {}
        puzzles, mean = meta.get("total_puzzles"), meta.get("mean_puzzle_examples")
        out[meta_path.parent.name] = {"examples": round(puzzles * mean) if puzzles and mean else None,
                                      "puzzles": puzzles, "groups": meta.get("total_groups")}
    return out


def puzzle_sets_section(found: dict) -> list[str]:
    """One line per puzzle set: kind, grid, vocabulary, examples / puzzles / groups per split."""
    sets = found.get("puzzles") or []
    if not sets:
        return []
    rows, splits = [], []
    counts = []
    for p, m in sets:
        c = _split_counts(Path(p), m)
        counts.append(c)
        splits += [s for s in c if s not in splits]
    splits = sorted(splits, key=lambda s: ({"train": 0, "test": 1}.get(s, 2), s))
    for (p, m), c in zip(sets, counts):
        info = _load_json(Path(p) / "puzzles.json") or {}
        grid = info.get("grid")
        grid_s = f"{grid[0]}×{grid[1]}" if isinstance(grid, list) and len(grid) == 2 else "–"
        vocab = info.get("vocab")
        cells = []
        for s in splits:
            v = c.get(s)
            cells.append(" / ".join(fmt_count(v.get(k)) for k in ("examples", "puzzles", "groups")) if v else "–")
        rows.append([f"`{p}`", info.get("kind") or (m.get("stats") or {}).get("kind") or "–", grid_s,
                     str(info.get("vocab_size") or (len(vocab) if vocab else "–"))] + cells)
        if not info:
            rows[-1][1] += " (puzzles.json missing)"
    return ["### Puzzle sets", "",
            table(["set", "kind", "grid", "vocab"] + [f"{s} (examples / puzzles / groups)" for s in splits], rows),
            "", "A group is one original puzzle with its augmentations.", ""]


# ----------------------------------------------------------------------------- summary

def summary_line(found: dict) -> str:
    """The opening paragraph of a report whose artifacts are all puzzle sets, TRM runs and evals."""

    runs = found.get("trm") or []
    evals = found.get("puzzle_eval") or []
    bits = []
    for p, m in evals:
        mt = _load_json(Path(p) / "metrics.json") or (m.get("stats") or {})
        acc = _num(mt.get("exact_accuracy"))
        if acc is None:
            continue
        se = _num(mt.get("exact_accuracy_stderr"))
        s = f"**exact accuracy {acc:.3f}" + (f" ± {se:.3f}" if se is not None else "") + "**"
        where = Path(_set_ref(m, mt) or p).name
        s += f" on {fmt_count(mt.get('examples'))} {mt.get('split') or m.get('config', {}).get('split', '')} puzzles of " \
             f"`{where}`" + (f" ({mt['kind']})" if mt.get("kind") else "")
        arc = mt.get("arc") if isinstance(mt.get("arc"), dict) else {}
        if arc.get("pass@2") is not None:
            s += f", ARC pass@2 {arc['pass@2']:.3f}"
        bits.append(s)
    if len(bits) > 1:  # every evaluation, in the order found (sorted by directory)
        bits = ["; ".join(bits)]
    if runs:
        p, m = runs[0]
        st = m.get("stats") or {}
        if not bits and _num(st.get("final_val_exact_accuracy")) is not None:
            bits.append(f"**val exact accuracy {st['final_val_exact_accuracy']:.3f}** (the test batches of the "
                        f"last evaluation in training; run `lmlab puzzle-eval` for a whole split)")
        run = f"a TRM ({st.get('variant') or '?'}"
        if st.get("params"):
            run += f", {fmt_count(st['params'])} parameters"
        run += ")"
        if st.get("steps"):
            run += f" trained for {fmt_count(st['steps'])} steps"
            if st.get("examples_trained"):
                run += f" ({fmt_count(st['examples_trained'])} puzzles)"
        secs = st.get("train_time_s") or (m.get("timings") or {}).get("total_s")
        if secs:
            run += f" in {fmt_duration(secs)}"
        if st.get("hardware"):
            run += f" on {hardware_line(st['hardware'])}"
        bits.append(("from " if bits else "") + run)
    if not bits:
        return "_No trained TRM or puzzle evaluation found yet._"
    text = " ".join(bits)
    return text[0].upper() + text[1:] + "."


# ----------------------------------------------------------------------------- the section

def trm_section(found: dict, out_dir: Path, read_metrics: Callable) -> list[str]:
    """TRM runs (table, learning curves), their puzzle evaluations (table, plots) and rendered puzzles."""
    runs = found.get("trm") or []
    evals = found.get("puzzle_eval") or []
    if not runs and not evals:
        return []
    out_dir = Path(out_dir)
    out = ["## TRM: tiny recursive models on puzzles", ""]
    out += _runs_table(runs)
    for i, (p, m) in enumerate(runs):
        out += _curves(i, Path(p), m, out_dir, read_metrics, len(runs) > 1)
    for p, m in runs:
        if not any(_same(_model_ref(em), p) for _, em in evals):
            out += [f"_No puzzle evaluation of `{p}` found: run `lmlab puzzle-eval model={p} data=SET` and then "
                    f"this report again._", ""]
    if evals:
        out += _evals(runs, evals, out_dir)
    return out


def _model_fields(p: Path) -> dict:
    return _load_json(p / "model.json") or {}


def _runs_table(runs) -> list[str]:

    if not runs:
        return ["_No TRM run found (the evaluations below name their model)._", ""]
    rows = []
    for p, m in runs:
        p = Path(p)
        st = m.get("stats") or {}
        mc = _model_fields(p)
        variant = st.get("variant") or (("mlp_t" if mc.get("mlp_t") else "attention") if "mlp_t" in mc else "–")
        tnn = "/".join(str(mc.get(k, "?")) for k in ("h_cycles", "l_cycles", "halt_max_steps")) if mc else \
            "– (model.json missing)"
        ft = st.get("final_train_metrics") or {}
        fv = st.get("final_val_metrics") or {}
        val = st.get("final_val_exact_accuracy", fv.get("val_exact_accuracy"))
        trained = fmt_count(st.get("examples_trained"))
        if st.get("epochs") is not None:
            trained += f" ({st['epochs']:g} epochs)"
        rows.append([f"`{p.name}`", variant, fmt_count(st.get("params")), tnn, fmt_count(st.get("steps")), trained,
                     fmt_count(st.get("examples_per_s")),
                     fmt_duration(st.get("train_time_s") or (m.get("timings") or {}).get("total_s")),
                     _fmt(_num(ft.get("exact_accuracy"))), _fmt(_num(val))])
    return [table(["run", "variant", "parameters", "T / n / N_sup", "steps", "puzzles trained", "examples/s",
                   "train time", "final train exact accuracy", "final val exact accuracy"], rows), "",
            "T / n / N_sup: H cycles (full recursions per supervision step), L cycles (latent updates per "
            "recursion), supervision steps. Train exact accuracy is over the rows that halted in the last log "
            "interval; val is the test batches evaluated during training.", ""]


def _curves(i: int, p: Path, m: dict, out_dir: Path, read_metrics: Callable, several: bool) -> list[str]:
    if not (p / "metrics.jsonl").is_file():
        return [f"_No training metrics for `{p}` (metrics.jsonl missing)._", ""]
    train, _ = read_metrics(p)
    val = _val_lines(p)
    panels = {title: {label: [(r["step"], r[key]) for r in (val if from_val else train) if _num(r.get(key)) is not None]
                      for key, label, from_val in series} for title, series in CURVES.items()}
    clock = _wall_clock(train, val)
    if clock:  # exact accuracy against the minutes of training steps (the loop's time_s; evals not counted)
        panels[WALL_CLOCK] = {"val": clock}
    panels = {t: {k: v for k, v in ser.items() if v} for t, ser in panels.items()}
    panels = {t: ser for t, ser in panels.items() if ser}
    if not panels:
        return [f"_`{p}/metrics.jsonl` has no TRM train or eval lines._", ""]
    name = f"trm_curves{'_' + str(i) if i else ''}.png"
    learning_curves(panels, out_dir / name, title=f"TRM: {p.name}")
    out = [f"### Learning curves{': ' + p.name if several else ''}", "", f"![TRM learning curves]({name})", ""]
    if val:
        last = val[-1]
        out += [f"Last evaluation in training (step {last['step']}, {last.get('val_examples', '?')} test puzzles): "
                f"exact accuracy {_fmt(_num(last.get('val_exact_accuracy')))}, token accuracy "
                f"{_fmt(_num(last.get('val_token_accuracy')))}, steps used {_fmt(_num(last.get('val_steps_used')), 2)}, "
                f"exact accuracy at halt {_fmt(_num(last.get('val_exact_at_halt')))}.", ""]
    return out


def _evals(runs, evals, out_dir: Path) -> list[str]:
    names = _eval_names(evals)
    loaded = [_load_json(Path(p) / "metrics.json") for p, _ in evals]
    arc = any(isinstance((mt or {}).get("arc"), dict) for mt in loaded)
    rows, notes = [], []
    for (p, m), name, mt in zip(evals, names, loaded):
        ref = _model_ref(m)
        run = next((rp for rp, _ in runs if _same(rp, ref)), None)
        model = f"`{Path(run).name}`" if run else (f"`{ref}` (not in this report)" if ref else "–")
        set_name = Path(_set_ref(m, mt) or "?").name
        if not isinstance(mt, dict):
            notes.append(f"_`{p}` has no readable metrics.json: re-run `lmlab puzzle-eval`._")
            rows.append([f"`{name}`", set_name, (m.get("config") or {}).get("split", "–"), model, "–", "–", "–",
                         "–", "–"] + (["–", "–"] if arc else []))
            continue
        acc, se = _num(mt.get("exact_accuracy")), _num(mt.get("exact_accuracy_stderr"))
        acc_s = "–" if acc is None else f"**{acc:.3f}**" + (f" ± {se:.3f}" if se is not None else "")
        row = [f"`{name}`", set_name + (f" ({mt['kind']})" if mt.get("kind") else ""), mt.get("split", "–"), model,
               fmt_count(mt.get("examples")), acc_s, _fmt(_num(mt.get("token_accuracy"))),
               _fmt(_num(mt.get("steps_used_mean")), 2), _fmt(_num(mt.get("exact_accuracy_at_halt")))]
        if arc:
            a = mt.get("arc") if isinstance(mt.get("arc"), dict) else {}
            row += [_fmt(_num(a.get("pass@1"))), _fmt(_num(a.get("pass@2")))]
        rows.append(row)
    out = ["### Puzzle evaluations", "",
           table(["eval", "set", "split", "model", "puzzles", "exact accuracy", "token accuracy", "steps used (mean)",
                  "exact accuracy at halt"] + (["ARC pass@1", "ARC pass@2"] if arc else []), rows), "",
           "Every puzzle runs all supervision steps; exact accuracy (± standard error) scores the whole grid after "
           "the last one, as the paper does. Steps used is the first step whose Q-halt logit says stop (the last "
           "step if none does); exact accuracy at halt scores the answer given there."
           + (" ARC pass@k votes the augmented predictions per test input." if arc else ""), ""] + \
        [n for note in notes for n in (note, "")]

    by_step = {name: mt["exact_accuracy_by_step"] for name, mt in zip(names, loaded)
               if isinstance(mt, dict) and isinstance(mt.get("exact_accuracy_by_step"), list)
               and mt["exact_accuracy_by_step"]}
    if by_step:
        exact_by_step(by_step, out_dir / "trm_exact_by_step.png")
        out += ["![exact accuracy after k supervision steps](trm_exact_by_step.png)", ""]

    for (p, m), name, mt in zip(evals, names, loaded):
        out += [f"#### {name}", ""]
        if isinstance(mt, dict):
            hist = _int_keys(mt.get("steps_used_histogram"))
            if hist:
                f = f"trm_steps_used_{name}.png"
                steps_used(hist, _int_keys(mt.get("accuracy_by_steps_used")), out_dir / f, mt.get("halt_max_steps"),
                           title=f"{name}: when the model halts")
                out += [f"![steps used and accuracy by steps used]({f})", ""]
            bins = [b for b in mt.get("accuracy_by_rating") or [] if isinstance(b, dict)]
            if bins:
                f = f"trm_rating_{name}.png"
                accuracy_by_rating(bins, out_dir / f, title=f"{name}: exact accuracy by rating")
                out += [f"![exact accuracy by rating]({f})", ""]
            elif hist:
                out += ["_No ratings in this set: no accuracy by rating._", ""]
            fill = [b for b in mt.get("accuracy_by_fill") or [] if isinstance(b, dict)]
            if len(fill) > 1:
                f = f"trm_fill_{name}.png"
                accuracy_by_rating(fill, out_dir / f, title=f"{name}: exact accuracy by cells to fill",
                                   xlabel="cells to fill (Sudoku: blanks; maze: path cells)")
                out += [f"![exact accuracy by cells to fill]({f})", ""]
        out += _rendered(Path(p), name, out_dir)
    return out


def _int_keys(d) -> dict[int, float]:
    if not isinstance(d, dict):
        return {}
    out = {}
    for k, v in d.items():
        try:
            out[int(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return dict(sorted(out.items()))


def _rendered(p: Path, name: str, out_dir: Path) -> list[str]:
    path = p / "predictions.npz"
    if not path.is_file():
        return [f"_No predictions.npz in `{p}`: no puzzles to render (run `lmlab puzzle-eval` with "
                f"keep_predictions > 0)._", ""]
    f = f"trm_puzzles_{name}.png"
    try:
        shown = render_puzzles(path, out_dir / f)
    except (OSError, KeyError, ValueError, IndexError) as e:
        return [f"_`{path}` cannot be rendered ({type(e).__name__}: {e})._", ""]
    if not shown:
        return [f"_`{path}` holds no puzzles._", ""]
    solved = sum(s["exact"] for s in shown)
    return [f"{len(shown)} puzzles ({solved} solved exactly): input, the model's answer after the last step "
            f"(wrong cells marked), truth.", "", f"![rendered puzzles: {name}]({f})", ""]


# ----------------------------------------------------------------------------- plots

def learning_curves(panels: dict[str, dict[str, list[tuple[float, float]]]], path: str | Path,
                    title: str = "") -> Path:
    """Small multiples with several series per panel: lines with markers (a lone eval point shows)."""
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(max(FIGSIZE[0], 3.0 * n), 2.9), dpi=DPI, squeeze=False)
    colours = ["#4c72b0", "#dd8452", "#55a868"]
    for ax, (name, series) in zip(axes[0], panels.items()):
        for j, (label, pts) in enumerate(series.items()):
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-" if j else "-", ms=3.5, lw=1.2,
                    color=colours[j % len(colours)], label=label)
        if "accuracy" in name:
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("minutes of training" if name == WALL_CLOCK else "step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return plots._save(fig, path)


def exact_by_step(series: dict[str, list[float]], path: str | Path) -> Path:
    """Exact accuracy after k supervision steps, one line per evaluation."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for name, ys in series.items():
        ax.plot(range(1, len(ys) + 1), ys, "o-", ms=3, lw=1.2, label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, max(1.0, *(max(v) for v in series.values())) * 1.02)
    ax.set_xlabel("supervision steps (k)")
    ax.set_ylabel("exact accuracy")
    ax.set_title("exact accuracy after k supervision steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return plots._save(fig, path)


def steps_used(hist: dict[int, float], acc: dict[int, float], path: str | Path, max_steps: int | None = None,
               title: str = "when the model halts") -> Path:
    """Bars: puzzles by the step the model halts at; dots (right axis): exact accuracy at that step."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    xs = list(hist)
    ax.bar(xs, [hist[x] for x in xs], color="#4c72b0", alpha=0.75, label="puzzles")
    ax.set_xlabel("steps used (first step with Q-halt ≥ 0)")
    ax.set_ylabel("puzzles")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if max_steps:
        ax.set_xlim(0.4, int(max_steps) + 0.6)
    if acc:
        ax2 = ax.twinx()
        ax2.plot(list(acc), list(acc.values()), "o", color="#dd8452", ms=5, label="exact accuracy at halt")
        ax2.set_ylim(-0.03, 1.05)
        ax2.set_ylabel("exact accuracy at halt", color="#dd8452")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return plots._save(fig, path)


def accuracy_by_rating(bins: list[dict], path: str | Path, title: str = "exact accuracy by rating",
                       xlabel: str = "rating (difficulty) bin") -> Path:
    """Bars: exact accuracy per rating bin (rating_min..rating_max), each with its number of puzzles."""
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    labels = [f"{b.get('rating_min', 0):g}–{b.get('rating_max', 0):g}" for b in bins]
    vals = [_num(b.get("exact_accuracy")) or 0.0 for b in bins]
    bars = ax.bar(range(len(bins)), vals, color="#55a868")
    for bar, b in zip(bars, bins):
        ax.annotate(f"{bar.get_height():.2f}\nn={b.get('examples', '?')}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(bins)), labels, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("exact accuracy")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return plots._save(fig, path)
