"""The report's figures, drawn with matplotlib's Agg backend (no display needed).

Each function takes plain numbers and writes one PNG; lmlab/report/report.py (and, for
hyperparameter sweeps, lmlab/report/sweep.py) decides what to plot. Kept free of artifact
parsing so a notebook can call them directly:

    from lmlab.report.plots import loss_curves
    loss_curves([(1, 9.1), (2, 8.7)], [(2, 8.9)], "loss.png")
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: reports are written on headless machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullFormatter  # noqa: E402

FIGSIZE = (7.0, 3.8)
DPI = 110


def ema(values: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard smooths curves)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)


def _labelled_bars(names: list[str], values: list[float], labels: list[str], xlabel: str, title: str,
                   path: str | Path) -> Path:
    """Horizontal bars, the first name at the top, each with its label at the bar's end."""
    fig, ax = plt.subplots(figsize=(FIGSIZE[0], 0.45 * len(names) + 1.2))
    bars = ax.barh(names[::-1], values[::-1], color="#4c72b0")
    for bar, label in zip(bars, labels[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {label}", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.margins(x=0.15)
    return _save(fig, path)


def stage_times(stages: list[tuple[str, float]], path: str | Path) -> Path:
    """Horizontal bars: wall-clock seconds per stage, in pipeline order (first at the top)."""
    secs = [s for _, s in stages]
    unit, scale = ("min", 60.0) if max(secs, default=0) >= 300 else ("s", 1.0)
    return _labelled_bars([n for n, _ in stages], secs, [f"{s / scale:.1f} {unit}" for s in secs],
                          "wall-clock seconds", "time per stage", path)


def loss_curves(train: list[tuple[float, float]], val: list[tuple[float, float]], path: str | Path,
                smoothing: float = 0.9, xlabel: str = "step") -> Path:
    """Train loss (raw, faint; smoothed, solid) and val loss points against the step."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    if train:
        xs, ys = zip(*train)
        ax.plot(xs, ys, color="#4c72b0", alpha=0.25, linewidth=0.8, label="train (raw)")
        ax.plot(xs, ema(list(ys), smoothing), color="#4c72b0", linewidth=1.6, label=f"train (EMA {smoothing})")
    if val:
        xs, ys = zip(*val)
        ax.plot(xs, ys, "o-", color="#dd8452", markersize=4, linewidth=1.0, label="val")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def val_bpb(val: list[tuple[float, float]], unigram_bpb: float | None, path: str | Path,
            xlabel: str = "step") -> Path:
    """Val bits per byte over training against the unigram baseline's horizontal line."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    if val:
        xs, ys = zip(*val)
        ax.plot(xs, ys, "o-", color="#dd8452", markersize=4, label="model (val)")
    if unigram_bpb is not None:
        ax.axhline(unigram_bpb, color="#55a868", linestyle="--", label=f"unigram baseline ({unigram_bpb:.3f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("bits per byte")
    ax.set_title("validation bits per byte (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def ladder(stages: list[str], metrics: dict[str, list[float | None]], path: str | Path,
           title: str = "held-out problems: base → SFT → DPO",
           errors: dict[str, list[float | None]] | None = None) -> Path:
    """Grouped bars: one group per metric (exact match, pass@k, maj@k), one bar per stage;
    `errors` (standard errors, same shape as `metrics`) draws error bars."""
    import numpy as np

    names = list(metrics)
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    width = 0.8 / max(len(stages), 1)
    x = np.arange(len(names))
    for i, stage in enumerate(stages):
        vals = [metrics[m][i] if metrics[m][i] is not None else 0.0 for m in names]
        err = [((errors or {}).get(m) or [None] * len(stages))[i] or 0.0 for m in names]
        bars = ax.bar(x + (i - (len(stages) - 1) / 2) * width, vals, width, label=stage,
                      yerr=err if any(err) else None, capsize=2, error_kw={"elinewidth": 0.8})
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names)
    top = max((v or 0) + (((errors or {}).get(m) or [None] * len(vs))[j] or 0)
              for m, vs in metrics.items() for j, v in enumerate(vs))
    ax.set_ylim(0, max(1e-3, top) * 1.2)
    ax.set_ylabel("fraction of problems")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def compare_curves(train: dict[str, list[tuple[float, float]]], val: dict[str, list[tuple[float, float]]],
                   path: str | Path, smoothing: float = 0.9) -> Path:
    """Several runs' loss against tokens in one plot: train smoothed (solid), val (markers), one colour each."""
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(dict.fromkeys([*train, *val])):
        c = colours[i % len(colours)]
        pts = train.get(name) or []
        if pts:
            ax.plot([x for x, _ in pts], ema([y for _, y in pts], smoothing), color=c, lw=1.3, label=f"{name} train")
        vpts = val.get(name) or []
        if vpts:
            ax.plot([x for x, _ in vpts], [y for _, y in vpts], "o--", color=c, ms=3, lw=0.8, label=f"{name} val")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("pretraining runs compared")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def long_context(positions: list[float], curves: dict[str, list[float]], context: int, path: str | Path,
                 title: str = "") -> Path:
    """Loss against position in a text longer than the context, one line per reading mode."""
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    style = {"sinks": ("#4c72b0", "-"), "window": ("#c44e52", "--"), "dense": ("#55a868", ":"),
             "native": ("#8172b2", "-")}
    for mode, ys in curves.items():
        c, ls = style.get(mode, ("#333333", "-"))
        ax.plot(positions, ys, ls, color=c, lw=1.4, marker="o", ms=2.5, label=mode)
    return _save(_past_context_axes(ax, fig, context, title or "reading past the context", 7), path)


def _past_context_axes(ax, fig, context: int, title: str, legend_size: int):
    """The long-context plots' dressing: the context marked, labels, legend, grid; returns `fig`."""
    ax.axvline(context, color="#999999", lw=0.8)
    ax.text(context, ax.get_ylim()[1], " context", va="top", fontsize=7, color="#666666")
    ax.set_xlabel("position in the text (tokens)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    return fig


def long_context_compared(positions: list[float], curves: dict[str, list[float]], context: int,
                          path: str | Path, title: str = "") -> Path:
    """Several models' `long_context` curves on one plot: a colour per model, a line style per
    mode; keys are "MODEL: MODE"."""
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    models = list(dict.fromkeys(k.rsplit(": ", 1)[0] for k in curves))
    palette = ["#4c72b0", "#c44e52", "#55a868", "#8172b2", "#ccb974", "#64b5cd"]
    dash = {"sinks": "-", "window": "--", "dense": ":", "native": "-."}
    for key, ys in curves.items():
        model, mode = key.rsplit(": ", 1)
        ax.plot(positions, ys, dash.get(mode, "-"), color=palette[models.index(model) % len(palette)], lw=1.3,
                marker="o", ms=2, label=key)
    return _save(_past_context_axes(ax, fig, context, title or "reading past the context, models compared", 6), path)


# ---------------------------------------------------------------------- alignment (grpo, rerank)

def small_multiples(curves: dict[str, list[tuple[float, float]]], path: str | Path, title: str = "",
                    xlabel: str = "step") -> Path:
    """One small panel per named curve, side by side (GRPO's reward, KL, zero-std share, length)."""
    n = max(len(curves), 1)
    fig, axes = plt.subplots(1, n, figsize=(max(FIGSIZE[0], 2.6 * n), 2.8), dpi=DPI, squeeze=False)
    for ax, (name, pts) in zip(axes[0], curves.items()):
        ax.plot([x for x, _ in pts], [y for _, y in pts], color="#4c72b0", lw=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def against_n(ns: list[int], series: dict[str, list[float | None]], path: str | Path,
              errors: dict[str, list[float | None]] | None = None, title: str = "exact match against N",
              greedy: float | None = None) -> Path:
    """Lines of a metric against the number of samples N (log2 axis), with error bars; the
    greedy result as a dashed line (Cobbe et al. 2021's verifier figure)."""
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for name, vals in series.items():
        pts = [(n, v, ((errors or {}).get(name) or [None] * len(ns))[i]) for i, (n, v) in enumerate(zip(ns, vals))
               if v is not None]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] or 0.0 for p in pts], marker="o",
                        ms=3, capsize=2, lw=1.2, label=name)
    if greedy is not None:
        ax.axhline(greedy, ls="--", color="grey", lw=1, label="greedy")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("N (samples per problem)")
    ax.set_ylabel("fraction of problems")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def against_dim(dims: list[int], series: dict[str, list[float]], path: str | Path, ylabel: str,
                title: str = "") -> Path:
    """Lines of a metric against a width D' (log2 axis): the compressor beside its references."""
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for name, vals in series.items():
        ax.plot(dims, vals, "--" if "optimum" in name else "-", marker="o", ms=3, lw=1.2, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(k) for k in dims])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("D' (compressed width)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def by_step(steps: list[int], series: dict[str, list[float]], path: str | Path, title: str, ylabel: str) -> Path:
    """A metric after each supervision step; a series of equal values (a baseline) is dashed."""
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for name, vals in series.items():
        flat = len(set(vals)) == 1
        ax.plot(steps, vals, "--" if flat else "-", marker=None if flat else "o", ms=3, lw=1.2, label=name)
    ax.set_xlabel("supervision step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def answer_rates(names: list[str], rates: list[float], labels: list[str], path: str | Path, title: str) -> Path:
    """Horizontal bars of exact-match rates, each labelled (e.g. with its standard error and cost)."""
    return _labelled_bars(names, rates, labels, "exact match", title, path)


def metric_curves(series: dict[str, list[tuple[float, float]]], path: str | Path, xlabel: str, ylabel: str,
                  title: str) -> Path:
    """One line per run of a metric against the step."""
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for name, pts in series.items():
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, lw=1.2, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def counts(labels: list[str], values: list[int], path: str | Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Vertical bars of counts (a histogram over named bins)."""
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    ax.bar(labels, values, color="#4c72b0")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


# ---------------------------------------------------------------------- sweeps (lmlab sweep)

STATE_STYLE = {"COMPLETE": ("o", "#4c72b0", "complete"), "PRUNED": ("x", "#c44e52", "pruned (last reported value)")}


def sweep_history(points: list[tuple[int, float, str]], path: str | Path, metric: str = "val_loss",
                  direction: str = "minimize") -> Path:
    """The objective of every trial (number, value, state) in trial order, with the running best
    of the complete trials as a step line."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for state, (marker, color, label) in STATE_STYLE.items():
        pts = [(n, v) for n, v, s in points if s == state and v is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker, color=color, linestyle="none", markersize=5, label=label)
    best, running = None, []
    for n, v, s in sorted(points):
        if s == "COMPLETE" and v is not None:
            best = v if best is None else (min(best, v) if direction == "minimize" else max(best, v))
        if best is not None:
            running.append((n, best))
    if running:
        xs, ys = zip(*running)
        ax.step(xs, ys, where="post", color="#55a868", linewidth=1.4, label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial ({'lower' if direction == 'minimize' else 'higher'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def param_importance(importances: dict[str, float], path: str | Path) -> Path:
    """Horizontal bars: each parameter's share of the objective's variation (most important on top)."""
    vals = list(importances.values())
    return _labelled_bars(list(importances), vals, [f"{v:.2f}" for v in vals], "importance (sums to 1)",
                          "parameter importance (Optuna, PED-ANOVA)", path)


def sweep_params(series: dict[str, list[tuple[float, float, str]]], path: str | Path, metric: str = "val_loss",
                 log_keys: frozenset | set = frozenset()) -> Path:
    """One panel per numeric parameter: the objective (y) against the parameter's value (x)
    for every complete and pruned trial; log-scaled x for log-scaled ranges."""
    keys = list(series)
    cols = min(3, max(len(keys), 1))
    rows = -(-max(len(keys), 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(FIGSIZE[0], 2.8 * rows + 0.4), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for state, (marker, color, label) in STATE_STYLE.items():
            pts = [(x, y) for x, y, s in series[key] if s == state and y is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker, color=color, linestyle="none", markersize=5, label=label)
        if key in log_keys:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # a narrow log range labels every minor tick
        elif all(isinstance(x, int) for x, _, _ in series[key]):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(f"{metric} against each numeric parameter", fontsize=10)
    return _save(fig, path)
