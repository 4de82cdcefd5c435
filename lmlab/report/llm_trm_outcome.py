"""The report's LLM-TRM phase 3 sections: how the reasoners trained (`lmlab latent`) and the
outcome table (`lmlab llm-trm-eval`): does answering with the reasoner beat answering directly?

    parts += latent_section(found, out_dir) + outcome_section(found, out_dir)

For every `latent_reasoner` artifact: its method, steps and held-out figures, and one plot of
the held-out answer NLL and exact match against the step for all of them (GRPO's sampled reward
too). For every `llm_trm_outcome` artifact: a row per way of answering with exact match and its
standard error, tokens and milliseconds per problem, SequenceTRM steps, the exact match where
thinking in full was right and wrong, and the cosine of the reasoner's prediction to the LLM's
real state at `</think>` for answers right and wrong; and a bar plot of the exact matches.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.report import plots
from lmlab.report.llm_trm import _metrics
from lmlab.report.markdown import table


def _f(v, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def latent_section(found: dict, out_dir: Path) -> list[str]:
    runs = found.get("latent_reasoner") or []
    if not runs:
        return []
    rows, nll, em, reward = [], {}, {}, {}
    for p, m in runs:
        st, name = m.get("stats") or {}, Path(p).name
        rows.append([f"`{name}`", str(st.get("method")), str(st.get("steps")), str(st.get("k")),
                     f"{st.get('params', 0):,}", f"{st.get('train_problems', 0):,}", _f(st.get("val_answer_nll")),
                     _f(st.get("val_em"))])
        lines = _metrics(Path(p))
        nll[name] = [(r["step"], r["val_answer_nll"]) for r in lines if "val_answer_nll" in r]
        em[name] = [(r["step"], r["val_em"]) for r in lines if "val_em" in r]
        if st.get("method") == "grpo":
            reward[name] = [(r["step"], r["reward"]) for r in lines if "reward" in r]
    out = ["## Latent reasoners (LLM-TRM phase 3)", "",
           "The compressor and SequenceTRM with a projection into the frozen LLM's input embeddings, trained to make "
           "it answer from k vectors in place of its thinking: by the reference answer's likelihood (supervised), "
           "then by rewards for right sampled answers (GRPO). Held-out problems are part of the training problems' "
           "file, kept out of training.", "",
           table(["run", "method", "steps", "k", "parameters", "training problems", "held-out answer NLL",
                  "held-out exact match"], rows), ""]
    plots.metric_curves(nll, out_dir / "latent_nll.png", "step", "answer NLL per token",
                        "held-out answer NLL with the latent vectors")
    plots.metric_curves({**{f"{k}: held-out exact match": v for k, v in em.items()},
                         **{f"{k}: sampled reward": v for k, v in reward.items()}},
                        out_dir / "latent_em.png", "step", "rate", "held-out exact match (greedy), GRPO reward")
    return out + ["![latent NLL](latent_nll.png)", "", "![latent exact match](latent_em.png)", ""]


def outcome_section(found: dict, out_dir: Path) -> list[str]:
    out: list[str] = []
    for i, (p, _) in enumerate(found.get("llm_trm_outcome") or []):
        try:
            res = json.loads((Path(p) / "outcome.json").read_text())
        except (OSError, ValueError):
            continue
        rows = res["rows"]
        table_rows = [[r["label"], f"{r['exact_match']:.3f} ± {_f(r.get('exact_match_stderr'))}",
                       f"{r['tokens_per_problem']:.1f}", f"{r['seconds_per_problem'] * 1000:.1f}",
                       _f(r.get("mean_trm_steps"), ".1f"), _f(r.get("em_where_thinking_right")),
                       _f(r.get("em_where_thinking_wrong")), _f(r.get("cosine_right")), _f(r.get("cosine_wrong"))]
                      for r in rows]
        n = rows[0]["n"] if rows else 0
        suffix = f"_{i}" if i else ""
        plots.answer_rates([r["label"] for r in rows], [r["exact_match"] for r in rows],
                           [f"{r['exact_match']:.3f} ± {_f(r.get('exact_match_stderr'))}, "
                            f"{r['tokens_per_problem']:.0f} tokens" for r in rows],
                           out_dir / f"llm_trm_outcome{suffix}.png", f"answering {n} held-out problems")
        latent = [r for r in rows if "minus_direct" in r and "method" in r]
        verdict = []
        if latent:
            best = max(latent, key=lambda r: r["minus_direct"])
            gap, se = best["minus_direct"], best.get("minus_direct_stderr") or 0.0
            verdict = [f"The best latent row ({best['label']}) is {gap:+.3f} exact match against answering directly "
                       f"(paired standard error {se:.3f})"
                       + ("; it does not beat answering directly." if gap <= 2 * se else ".")]
        out += ["## LLM-TRM outcome: answering with the reasoner", "",
                f"The frozen LLM on {n} held-out problems, greedy: thinking in full, answering at once, with each "
                "reasoner's latent vectors in place of the thinking (and, as a control, with another problem's "
                "vectors), and with the prediction deciding only the first answer token. Time is wall-clock per "
                "problem in batches (the latent rows include reading the prompt's states and running the reasoner). "
                "The cosine compares the row's compressed prediction with the LLM's real compressed state at "
                "`</think>` from its own thinking.", "",
                table(["answering", "exact match", "tokens", "ms / problem", "TRM steps", "EM where thinking right",
                       "EM where thinking wrong", "cosine (right)", "cosine (wrong)"], table_rows), "",
                *verdict, "", f"![outcome](llm_trm_outcome{suffix}.png)", ""]
    return out
