"""The report's long-context section: loss against position in a text longer than the context.

    parts += long_context_section(found, out_dir, stage_of)

For every eval artifact whose eval.json has a `long_context` entry (lmlab.eval.long_context,
written by `lmlab eval ... long_context=[...]`), there is a table row per reading mode:
perplexity over the whole text, and past the first context. There is also one plot per
entry, with the loss per position range: attention sinks, a plain rolling window, dense
recomputation (or a recurrent family's native stream). When several models read the same text
(the same name and length), one more plot puts their curves side by side: a learned attention
sink (model.attn_sink) against none, say (configs/pipelines/attn-sink-cpu.yaml). With no such
eval, there is no section.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

from lmlab.report import plots

MODE_WORDS = {"sinks": "attention sinks (first {sinks} tokens + rolling window)",
              "window": "rolling window, no sinks", "dense": "dense recomputation (stride {stride})",
              "native": "one stream (recurrent state + local window)"}


def long_context_section(found: dict, out_dir: Path, stage_of: Callable[[dict], Optional[str]]) -> list[str]:
    rows = []  # (label, model dir, entry)
    for eval_dir, eval_m in found.get("eval") or []:
        try:
            ev = json.loads((Path(eval_dir) / "eval.json").read_text())
        except (OSError, ValueError):
            continue
        for e in ev.get("long_context") or []:
            if isinstance(e, dict) and e.get("modes"):
                model = ((eval_m.get("inputs") or {}).get("model") or {}).get("path")
                rows.append((_model_label(stage_of(eval_m), model), model, e))
    if not rows:
        return []
    labels = [label for label, _, _ in rows]  # two models of one stage: their directories tell them apart
    rows = [(label if labels.count(label) == 1 else f"{label} ({Path(model or '?').name})", e)
            for label, model, e in rows]
    out = ["## Reading past the context", "",
           "Each model read a text several times longer than its context, token after token. There are three "
           "ways to do that. A KV cache of the context's size can keep the first tokens (attention sinks, "
           "StreamingLLM) or only the most recent ones. Or each window can be recomputed from scratch, which "
           "costs more. A flat curve means the model stays stable past its context.", ""]
    for i, (stage, e) in enumerate(rows):
        out += [f"**{stage}**, {e['name']}: {e['tokens']:,} tokens, context {e['context']}", "",
                "| mode | perplexity | perplexity past the first context |", "|---|---:|---:|"]
        for mode, m in e["modes"].items():
            words = MODE_WORDS.get(mode, mode).format(sinks=e.get("sinks"), stride=e.get("stride"))
            out.append(f"| {words} | {m['perplexity']:.2f} | {math.exp(m['loss_past_context']):.2f} |")
        edges = e["bucket_edges"]
        centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        name = f"long_context_{i}.png"
        plots.long_context(centres, {mode: m["curve"] for mode, m in e["modes"].items()}, e["context"],
                           out_dir / name, title=f"{stage}: {e['name']}")
        out += ["", f"![loss against position]({name})", ""]
    out += _compared(rows, out_dir)
    return out


def _model_label(stage: Optional[str], model: Optional[str]) -> str:
    """The stage that made the model (or its directory's name), and whether it has a learned sink."""
    label = stage or (Path(model).name if model else "?")
    try:
        if model and json.loads((Path(model) / "model.json").read_text()).get("attn_sink"):
            label += ", learned sink"
    except (OSError, ValueError, AttributeError):
        pass
    return label


def _compared(rows: list[tuple[str, dict]], out_dir: Path) -> list[str]:
    """One plot per text that two or more models read: every model's curves, per mode."""
    groups: dict[tuple, list[tuple[str, dict]]] = {}
    for label, e in rows:
        groups.setdefault((e["name"], e["tokens"], e["context"]), []).append((label, e))
    out = []
    for i, ((text, tokens, context), group) in enumerate(g for g in groups.items() if len(g[1]) > 1):
        edges = group[0][1]["bucket_edges"]
        centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        curves = {f"{label}: {mode}": m["curve"] for label, e in group for mode, m in e["modes"].items()}
        name = f"long_context_compared_{i}.png"
        plots.long_context_compared(centres, curves, context, out_dir / name,
                                    title=f"{text}: {tokens:,} tokens, {len(group)} models")
        out += [f"**The models compared**, {text}", "", f"![loss against position, models compared]({name})", ""]
    return out
