"""The report's LLM-TRM compressor section: how well tied linear compressors of a frozen LLM's
hidden states reconstruct them (lmlab/train/compressor.py), beside the best linear map.

    parts += compressor_section(found, out_dir)

For every `compressor` artifact: a table per held-out kind (text, the model's own thinking
trajectories) after the last phase, with D', parameters, cosine, relative error, variance
explained, the optimal rank-D' linear map's variance explained and the share of it the
compressor reaches, and PCA's (centred); a plot of cosine against D' for the three; and the
training loss curves of every D' and phase.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.report import plots
from lmlab.report.markdown import table

KINDS = {"text": "held-out text", "trajectories": "held-out thinking trajectories (the model's own)"}


def compressor_section(found: dict, out_dir: Path) -> list[str]:
    out: list[str] = []
    for i, (p, m) in enumerate(found.get("compressor") or []):
        try:
            res = json.loads((Path(p) / "compression.json").read_text())
        except (OSError, ValueError):
            continue
        last = res["results"][-1]["phase"] if res.get("results") else None
        by = {(r["eval_on"], r["d_prime"], r["method"]): r for r in res.get("results", []) if r["phase"] == last}
        if not by:
            continue
        d = res["d"]
        out += ["## Hidden-state compressor (LLM-TRM phase 1)", "",
                f"Tied linear compressors `h -> h W^T -> (h W^T) W` of the LLM's last-layer states (D = {d}), after "
                f"phase `{last}`. The linear optimum is the best rank-D' reconstruction of that kind's training "
                f"states (their top right singular vectors): no tied linear compressor can do better on them. PCA "
                f"centres the states first, an affine map outside the compressor's class.", ""]
        curves: dict[str, list[float]] = {}
        for kind in [k for k in KINDS if any(key[0] == k for key in by)]:
            dims = sorted({key[1] for key in by if key[0] == kind})
            rows = []
            for k in dims:
                c, opt, pca = (by[(kind, k, meth)] for meth in ("compressor", "linear_optimum", "pca"))
                share = c["variance_explained"] / opt["variance_explained"] if opt["variance_explained"] else float("nan")
                rows.append([str(k), f"{d * k:,}", f"{c['cosine']:.4f}", f"{c['relative_error']:.4f}",
                             f"{c['variance_explained']:.4f}", f"{opt['variance_explained']:.4f}", f"{share:.1%}",
                             f"{pca['variance_explained']:.4f}"])
            out += [f"**{KINDS[kind]}**", "",
                    table(["D'", "params", "cosine", "relative error", "variance explained", "linear optimum",
                           "share of optimum", "PCA"], rows), ""]
            for meth, label in (("compressor", "compressor"), ("linear_optimum", "linear optimum")):
                curves[f"{kind}: {label}"] = [by[(kind, k, meth)]["cosine"] for k in dims]
            xs = dims
        name = f"compressor_cosine{'_' + str(i) if i else ''}.png"
        plots.against_dim(xs, curves, out_dir / name, ylabel="mean per-token cosine",
                          title="reconstruction cosine against D'")
        out += [f"![cosine against D']({name})", ""]
        lines = _metrics(Path(p))
        if lines:
            series = {}
            for x in lines:
                series.setdefault(f"{x['phase']} D'={x['d_prime']}", []).append((x["step"], x["loss"]))
            name = f"compressor_loss{'_' + str(i) if i else ''}.png"
            plots.small_multiples(series, out_dir / name, title="compressor training loss (MSE)")
            out += [f"![compressor loss]({name})", ""]
    return out


def _metrics(run: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return []
