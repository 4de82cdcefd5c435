"""The report's alignment sections: GRPO's training curves, the verifier / reward model, and reranking.

    parts += grpo_section(found, out_dir, read_metrics)   # reward, KL, zero-std share, length per step
    parts += scorer_sections(found, out_dir)              # held-out accuracy, AUROC, ECE; reliability plot
    parts += rerank_section(ladder_rows, out_dir)         # exact match against N (Cobbe et al.'s figure)

`found` is report.discover's {kind: [(dir, manifest)]}; the sections are empty when the
pipeline has no such artifact, so a pipeline without GRPO or a verifier reports as before.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from lmlab import artifacts
from lmlab.report import plots
from lmlab.report.markdown import table

GRPO_CURVES = [("reward", "reward (mean total)"), ("kl", "KL to the reference"),
               ("frac_reward_zero_std", "share of groups without signal"),
               ("completions/mean_length", "mean completion length")]


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def grpo_section(found: dict, out_dir: Path, read_metrics: Callable) -> list[str]:
    """Per GRPO run: reward, KL, zero-std share and completion length against the step."""
    runs = [(p, m) for p, m in found.get("model") or [] if artifacts.manifest_verb(m) == "grpo"]
    out: list[str] = []
    for i, (p, m) in enumerate(runs):
        train, val = read_metrics(p)
        curves = {label: [(r["step"], r[key]) for r in train if isinstance(r.get(key), (int, float))]
                  for key, label in GRPO_CURVES}
        curves = {k: v for k, v in curves.items() if v}
        if not curves:
            continue
        st = m.get("stats") or {}
        name = f"grpo_curves{'_' + str(i) if i else ''}.png"
        plots.small_multiples(curves, out_dir / name, title=f"GRPO: {p.name}", xlabel="step")
        out += ["## GRPO", "",
                table(["", ""], [
                    ["run", f"`{p}`"], ["steps", _fmt(st.get("steps"))],
                    ["G (completions per prompt)", _fmt(st.get("num_generations"))],
                    ["loss", f"{st.get('loss_type')}, β {st.get('beta')}"],
                    ["rewards", ", ".join(st.get("rewards") or [])],
                    ["reward, first → last log line", f"{_fmt(st.get('first_reward'))} → {_fmt(st.get('final_reward'))}"],
                    ["share of groups without signal (last)", _fmt(st.get("final_frac_reward_zero_std"))],
                    ["rollout time (generate / score / reference)",
                     " / ".join(f"{v:.1f} s" for v in (st.get("rollout_time_s") or {}).values()) or "–"],
                ]), "", f"![GRPO curves]({name})", ""]
        val_lines = [r for r in val if "val_reward" in r]
        if val_lines:
            out += [f"Greedy validation reward at the end: {val_lines[-1]['val_reward']:.3f}.", ""]
    return out


def scorer_sections(found: dict, out_dir: Path) -> list[str]:
    """The verifier's / reward model's held-out metrics, with the reliability diagram."""
    out: list[str] = []
    for kind, title in (("verifier", "Verifier"), ("reward", "Reward model")):
        for i, (p, m) in enumerate(found.get(kind) or []):
            st = m.get("stats") or {}
            final = st.get("final_val_metrics") or st.get("val_metrics") or {}
            rows = [["run", f"`{p}`"]] + [[k, _fmt(v, 4) if isinstance(v, float) else _fmt(v)]
                                          for k, v in final.items() if not isinstance(v, (dict, list))]
            out += [f"## {title}", "", table(["", ""], rows), ""]
            src = p / "reliability.png"
            if src.is_file():
                name = f"{kind}_reliability{'_' + str(i) if i else ''}.png"
                shutil.copyfile(src, out_dir / name)
                out += [f"![{kind} reliability]({name})", ""]
    return out


def rerank_section(rows: list[dict], out_dir: Path) -> list[str]:
    """Exact match against N for every ladder row whose eval reranked its samples."""
    out: list[str] = []
    for r in rows:
        if r.get("outcome"):
            continue
        rr = (r["result"] or {}).get("rerank")
        if not rr:
            continue
        ns = rr["ns"]
        series = {"best-of-N (" + str(rr.get("kind") or "verifier") + ")": "best_of_{}", "weighted vote": "weighted_vote@{}",
                  "majority vote": "maj@{}", "pass@N (oracle)": "pass@{}"}
        values = {label: [rr.get(fmt.format(n)) for n in ns] for label, fmt in series.items()}
        errors = {label: [rr.get(fmt.format(n) + "_stderr") for n in ns] for label, fmt in series.items()}
        stem = r["stage"].lower().replace(" ", "_")
        name = f"rerank_{stem}.png"
        plots.against_n(ns, values, out_dir / name, errors=errors, title=f"{r['stage']}: exact match against N",
                        greedy=(r["result"] or {}).get("exact_match_strict"))
        out += [f"### {r['stage']}: reranking {rr.get('n_samples')} samples with `{rr.get('scorer')}`", "",
                table(["N"] + list(series), [[str(n)] + [_fmt(values[s][j]) for s in series] for j, n in enumerate(ns)]),
                "", "best-of-N is the expectation over random N-subsets of the samples (lmlab.eval.rerank); the "
                "greedy exact match is the dashed line.", "", f"![exact match against N]({name})", ""]
        (out_dir / f"rerank_{stem}.json").write_text(json.dumps({k: v for k, v in rr.items()}, indent=2) + "\n")
    return out
