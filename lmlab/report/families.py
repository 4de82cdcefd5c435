"""The report's comparison of pretraining runs: several base models trained on the same data
(a Griffin beside a transformer of equal parameter count, two presets, two recipes), their
sizes, speed and final losses in one table and their loss curves against tokens in one plot.
Rendered only when the pipeline holds two or more pretraining runs."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lmlab.report.markdown import fmt_count, table


def _label(path: Path, family: str, preset: str) -> str:
    return f"{path.name} ({family} {preset})"


def pretrain_comparison(found: dict, out_dir: Path, read_metrics: Callable, is_base: Callable) -> list[str]:
    import json

    from lmlab.report import plots

    runs = [(p, m) for p, m in found.get("model") or [] if is_base(m)]
    if len(runs) < 2:
        return []
    rows, train_curves, val_curves = [], {}, {}
    for path, m in runs:
        try:
            mj = json.loads((path / "model.json").read_text())
        except (OSError, ValueError):
            mj = {}
        family, preset = mj.get("family", "transformer"), mj.get("preset", "?")
        stats = m.get("stats", {})
        train, val = read_metrics(path)
        name = _label(path, family, preset)
        tokens_at = {r["step"]: r.get("tokens") for r in train}
        per_step = (train[0]["tokens"] / train[0]["step"]) if train and train[0].get("tokens") else None
        train_curves[name] = [(r["tokens"], r["loss"]) for r in train if r.get("tokens")]
        val_curves[name] = [(tokens_at.get(r["step"]) or (per_step or 0) * r["step"], r["val_loss"]) for r in val]
        tps = sorted(r["tokens_per_s"] for r in train if r.get("tokens_per_s"))
        last_val = val[-1] if val else {}
        rows.append([f"`{path.name}`", family, preset, fmt_count(stats.get("params")),
                     fmt_count(stats.get("non_embedding_params")),
                     fmt_count(train[-1].get("tokens") if train else None),
                     f"{fmt_count(tps[len(tps) // 2])}/s" if tps else "–",
                     f"{last_val['val_loss']:.4f}" if "val_loss" in last_val else "–",
                     f"{last_val['val_bpb']:.4f}" if last_val.get("val_bpb") is not None else "–"])
    out = ["## Pretraining compared", "",
           "Base models trained by `lmlab pretrain` in this pipeline, on the same packed data unless their "
           "configs say otherwise (see Resolved configs).", "",
           table(["run", "family", "preset", "params", "non-embedding", "tokens", "tokens/s (median)",
                  "final val loss", "final val bpb"], rows), ""]
    if any(val_curves.values()) or any(train_curves.values()):
        plots.compare_curves(train_curves, val_curves, out_dir / "pretrain_compared.png")
        out += ["![loss against tokens, every pretraining run](pretrain_compared.png)", ""]
    return out
