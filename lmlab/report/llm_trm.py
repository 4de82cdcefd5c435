"""The report's LLM-TRM sections: how well tied linear compressors of a frozen LLM's hidden
states reconstruct them (lmlab/train/compressor.py), beside the best linear map; and what the
hidden-state pairs hold (lmlab/tasks/hidden_pairs.py).

    parts += compressor_section(found, out_dir) + hidden_pairs_section(found) + seqtrm_section(found, out_dir)

For every `compressor` artifact: a table per held-out kind (text, the model's own thinking
trajectories) with a row per training phase and D': parameters, cosine, relative error,
variance explained, the optimal rank-D' linear map's variance explained and the share of it
the compressor reaches, and PCA's (centred); a plot of cosine against D' after each phase,
beside the optimum; and the training loss curves of every D' and phase. For every `hidden_pairs` artifact: problems, thinking
that closed and did not, answers right, mean prompt and thinking lengths.
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
        results = res.get("results") or []
        phases = list(dict.fromkeys(r["phase"] for r in results))
        by = {(r["phase"], r["eval_on"], r["d_prime"], r["method"]): r for r in results}
        if not by:
            continue
        d = res["d"]
        out += ["## Hidden-state compressor (LLM-TRM phase 1)", "",
                f"Tied linear compressors `h -> h W^T -> (h W^T) W` of the LLM's last-layer states (D = {d}), measured "
                f"after each training phase ({', '.join(f'`{p}`' for p in phases)}: each goes on from the one before). "
                f"The linear optimum is the best rank-D' reconstruction of that kind's training states (their top right "
                f"singular vectors): no tied linear compressor can do better on them. PCA centres the states first, an "
                f"affine map outside the compressor's class.", ""]
        curves: dict[str, list[float]] = {}
        xs: list[int] = []
        for kind in [k for k in KINDS if any(key[1] == k for key in by)]:
            xs = sorted({key[2] for key in by if key[1] == kind})
            rows = []
            for phase in phases:
                for k in xs:
                    c, opt, pca = (by[(phase, kind, k, meth)] for meth in ("compressor", "linear_optimum", "pca"))
                    share = c["variance_explained"] / opt["variance_explained"] if opt["variance_explained"] else float("nan")
                    rows.append([f"`{phase}`", str(k), f"{d * k:,}", f"{c['cosine']:.4f}", f"{c['relative_error']:.4f}",
                                 f"{c['variance_explained']:.4f}", f"{opt['variance_explained']:.4f}", f"{share:.1%}",
                                 f"{pca['variance_explained']:.4f}"])
                curves[f"{kind}, after {phase}"] = [by[(phase, kind, k, "compressor")]["cosine"] for k in xs]
            curves[f"{kind}: linear optimum"] = [by[(phases[0], kind, k, "linear_optimum")]["cosine"] for k in xs]
            out += [f"**{KINDS[kind]}**", "",
                    table(["after", "D'", "params", "cosine", "relative error", "variance explained", "linear optimum",
                           "share of optimum", "PCA"], rows), ""]
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


def hidden_pairs_section(found: dict) -> list[str]:
    rows = []
    for p, m in found.get("hidden_pairs") or []:
        st = m.get("stats") or {}
        if "problems" in st:
            rows.append([f"`{Path(p).name}`", f"{st['problems']:,}", str(st.get("d")), f"{st['closed']:,}",
                         f"{st['thinking_not_closed']:,}", f"{st['correct']:,} ({st['accuracy']:.1%})",
                         f"{st['mean_prompt_tokens']:.1f}", f"{st['mean_thinking_tokens']:.1f}"])
    if not rows:
        return []
    return ["## Hidden-state pairs (LLM-TRM phase 2 data)", "",
            "The LLM's states at every prompt position and at `</think>`, from one teacher-forced pass over what it "
            "generated. A thinking that did not close within the token limit has no state after it.", "",
            table(["pairs", "problems", "D", "thinking closed", "not closed", "answers right", "prompt tokens",
                   "thinking tokens"], rows), ""]


def seqtrm_section(found: dict, out_dir: Path) -> list[str]:
    """The SequenceTRM's validation cosine after each supervision step beside its baselines, the
    halting steps, and the cosine by thinking length."""
    out: list[str] = []
    for i, (p, m) in enumerate(found.get("seqtrm") or []):
        try:
            res = json.loads((Path(p) / "results.json").read_text())
        except (OSError, ValueError):
            continue
        base, steps = res["baselines"], res["cosine_by_step"]
        out += ["## SequenceTRM (LLM-TRM phase 2)", "",
                f"Predicting the compressed state at `</think>` from the compressed prompt, on {res['val_pairs']} "
                f"held-out pairs ({res['train_pairs']} trained on).", "",
                table(["", "cosine"], [["SequenceTRM, after all steps", f"{steps[-1]:.4f}"],
                                       [f"SequenceTRM, where it halts (mean step {res['mean_halt_step']:.1f})",
                                        f"{res['cosine_at_halt']:.4f}"],
                                       ["baseline: the mean training target", f"{base['mean_target_cosine']:.4f}"],
                                       ["baseline: the last prompt position's state",
                                        f"{base['last_prompt_state_cosine']:.4f}"]]), ""]
        if res.get("by_thinking_length"):
            out += [table(["thinking tokens", "pairs", "cosine"],
                          [[b["thinking_tokens"], str(b["n"]), f"{b['cosine']:.4f}"] for b in res["by_thinking_length"]]),
                    ""]
        suffix = f"_{i}" if i else ""
        ks = list(range(1, len(steps) + 1))
        plots.by_step(ks, {"SequenceTRM": steps, "baseline: mean target": [base["mean_target_cosine"]] * len(ks)},
                      out_dir / f"seqtrm_steps{suffix}.png", title="validation cosine by supervision step",
                      ylabel="cosine")
        plots.counts([str(k) for k in ks], [res["halt_steps"].count(k) for k in ks],
                     out_dir / f"seqtrm_halting{suffix}.png", xlabel="halting step", ylabel="validation pairs",
                     title="where the halting head stops")
        out += [f"![cosine by step](seqtrm_steps{suffix}.png)", "", f"![halting steps](seqtrm_halting{suffix}.png)", ""]
    return out


def _metrics(run: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return []
