"""Generative evaluation with lm-evaluation-harness's GSM8K conventions: exact match, pass@k, maj@k.

    from lmlab.eval.generative import read_problems, score_generative
    from lmlab.models import load_model
    model, tok, _ = load_model("runs/x/sft")
    res = score_generative(model, tok, read_problems("runs/x/tasks/test.jsonl", n=200),
                           template="chatml", n_samples=4, k=[1, 4], temperature=0.8)
    print(res["exact_match_strict"], res["pass@4"], res["maj@4"])

Extraction (lm-eval `gsm8k.yaml`, version 3):
  strict    regex `#### (\\-?[0-9\\.\\,]+)`, first match               (filter "strict-match")
  flexible  regex `(-?[$0-9.,]{2,})|(-?[0-9]+)`, last match, the non-empty group
                                                                  (filter "flexible-extract")
  exact match: prediction and reference both pass through lm-eval's `regexes_to_ignore`
  `,`  `\\$`  `(?s).*#### `  `\\.$` (in that order) and are lower-cased, then compared as strings.
  The reference is the whole GSM8K `answer` field; `(?s).*#### ` reduces it to the number.

Reading problems, each record's answer rules (a record whose `task` names an embedded task
is scored with that task's own extraction, e.g. `sort` answers are lists) and the prompt and
stops that ask a model one live with the tasks (lmlab.tasks.problems, which `lmlab pairs`
shares): a chat model gets the question as a user turn in its template and stops at the end
of turn; a base model gets lm-eval's few-shot format and stops at `Question:` or a blank
line. Generation is lmlab.infer.engine's `complete`.

Metrics: greedy decoding gives `exact_match_strict` / `exact_match_flexible`; `n_samples`
sampled completions per problem give `pass@k` (the unbiased estimator of Chen et al. 2021)
and `maj@k` (majority vote over the first k samples' answers, ties to the earliest), using
strict extraction, with `_flexible` variants alongside.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

from lmlab.errors import UserError
from lmlab.eval.estimators import majority_vote, pass_at_k, stderr
from lmlab.tasks.gsm8k import (FLEXIBLE_REGEX, IGNORE_REGEXES, STRICT_REGEX, extract_flexible,  # noqa: F401
                               extract_strict, normalize_answer, regex_filter)
from lmlab.tasks.problems import answer_rules, build_prompt, problem_stops, read_problems  # noqa: F401


# ---------------------------------------------------------------------------- scoring

def _aggregate(records: list[dict], ks: list[int], n_samples: int) -> dict:
    """Means over problems, each with its standard error as `<metric>_stderr`."""
    per: dict[str, list[float]] = {"exact_match_strict": [float(r["strict_ok"]) for r in records],
                                   "exact_match_flexible": [float(r["flexible_ok"]) for r in records]}
    for k in ks:
        if k > n_samples:
            continue
        for suffix, key in (("", "samples_strict"), ("_flexible", "samples_flexible")):
            per[f"pass@{k}{suffix}"] = [pass_at_k(n_samples, sum(a == r["reference"] for a in r[key]), k)
                                        for r in records]
            per[f"maj@{k}{suffix}"] = [float(majority_vote(r[key][:k]) == r["reference"]) for r in records]
    res: dict = {"n": len(records), **{name: sum(values) / len(values) for name, values in per.items()},
                 **{f"{name}_stderr": stderr(values) for name, values in per.items()}}
    res["exact_match"], res["exact_match_stderr"] = res["exact_match_strict"], res["exact_match_strict_stderr"]
    return res


def score_generative(model, tokenizer, problems: list[dict], template: Optional[str] = None,
                     fewshot: Sequence[dict] = (), n_shot: int = 4, n_samples: int = 0, k: Sequence[int] = (1,),
                     temperature: float = 0.8, top_p: float = 0.95, max_new_tokens: int = 128,
                     batch_size: int = 32, seed: int = 0, device=None, n_records: int = 5, scorer=None,
                     rerank_n: Sequence[int] = (), thinking: bool = True) -> dict:
    """Greedy exact match (strict, flexible) and, with n_samples > 0, pass@k and maj@k per k ≤ n_samples.

    `template` (a chat template name) prompts with the template, zero-shot unless n_shot > 0
    (examples then become earlier turns); None prompts lm-eval-style few-shot from `fewshot`.
    `thinking=False` asks a thinking template's model to answer without thinking (chat.prompt_ids).
    Returns metrics overall and per task, the settings, and `n_records` sample records.
    With a `scorer` (lmlab.infer.scorer: a verifier or reward model) every sample is scored and
    `rerank` holds best-of-N, weighted vote, maj@N and pass@N for each N in `rerank_n`
    (lmlab.eval.rerank); each problem's values are in its `problems` entry.
    """
    from lmlab.infer.engine import complete
    from lmlab.infer.prompting import prompt_room
    from lmlab.infer.sampling import Sampling
    from lmlab.runtime import progress

    if not problems:
        raise UserError("no problems to score")
    ks = sorted(set(int(x) for x in k))
    if n_samples and any(x > n_samples for x in ks):
        raise UserError(f"k={ks} asks for more than n_samples={n_samples} samples; raise n_samples or lower k")
    budget = prompt_room(model, "max_new_tokens", max_new_tokens)
    stops = problem_stops(template, tokenizer)
    shots = n_shot if fewshot else 0
    t0 = time.perf_counter()
    built = [build_prompt(tokenizer, p, template, fewshot, shots, budget, thinking) for p in problems]
    prompts = [b[0] for b in built]
    was_training = model.training
    model.eval()
    total = len(prompts) * (1 + n_samples)
    with progress(total, "generative", "completion") as bar:
        greedy = complete(model, tokenizer, prompts, Sampling(max_new_tokens=max_new_tokens, seed=seed), stops,
                          batch_size, device, bar)
        sampled: list[str] = []
        if n_samples:
            rep = [p for p in prompts for _ in range(n_samples)]
            sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
            sampled = complete(model, tokenizer, rep, sampling, stops, batch_size, device, bar)
    model.train(was_training)

    records = []
    for i, p in enumerate(problems):
        strict_fn, flex_fn, ref_fn = answer_rules(p.get("task"))
        ref = ref_fn(p["answer"])
        samples = sampled[i * n_samples:(i + 1) * n_samples]
        records.append({
            "task": p.get("task", "gsm8k"), "question": p["question"], "prompt": built[i][1], "shots": built[i][2],
            "completion": greedy[i], "reference": ref,
            "strict": strict_fn(greedy[i]), "flexible": flex_fn(greedy[i]),
            "samples_strict": [strict_fn(s) for s in samples], "samples_flexible": [flex_fn(s) for s in samples],
            "samples": samples,
        })
        records[-1]["strict_ok"] = ref is not None and records[-1]["strict"] == ref
        records[-1]["flexible_ok"] = ref is not None and records[-1]["flexible"] == ref

    res = _aggregate(records, ks, n_samples)
    if scorer is not None and n_samples:
        from lmlab.eval.rerank import rerank_metrics

        t_score = time.perf_counter()
        questions = [r["question"] for r in records for _ in range(n_samples)]
        flat = scorer.score(questions, [s for r in records for s in r["samples"]], batch_size=batch_size)
        scores = [flat[i * n_samples:(i + 1) * n_samples] for i in range(len(records))]
        rr = rerank_metrics(scores, [r["samples_strict"] for r in records], [r["reference"] for r in records],
                            rerank_n)
        for r, row, sc in zip(records, rr.pop("per_problem"), scores):
            r["rerank"], r["scores"] = row, [round(float(x), 5) for x in sc]
        res["rerank"] = {**rr, "scorer": str(getattr(scorer, "path", "")), "kind": getattr(scorer, "kind", None),
                         "score_time_s": round(time.perf_counter() - t_score, 3)}
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    res["per_task"] = {t: _aggregate(rs, ks, n_samples) for t, rs in sorted(by_task.items())}
    prompting = (f"chat:{template}" + ("" if thinking else ", no thinking")) if template else "fewshot"
    res["settings"] = {"prompting": prompting, "n_shot": shots,
                       "mean_shots_used": sum(b[2] for b in built) / len(built), "greedy": True,
                       "n_samples": n_samples, "k": [x for x in ks if x <= n_samples], "temperature": temperature,
                       "top_p": top_p, "top_k": 0, "max_new_tokens": max_new_tokens, "seed": seed,
                       "stop": list(stops.strings), "extraction": {"strict": STRICT_REGEX, "flexible": FLEXIBLE_REGEX,
                                                    "ignore": IGNORE_REGEXES}}
    res["time_s"] = round(time.perf_counter() - t0, 3)
    res["records"] = [{"task": r["task"], "prompt": r["prompt"], "completion": r["completion"],
                       "strict": r["strict"], "flexible": r["flexible"], "reference": r["reference"],
                       "correct": r["strict_ok"]} for r in records[:n_records]]
    # Every problem's outcome, in file order: what a user reads to see which problems fail, and
    # what the report pairs across stages (the same problems) for the difference's error bar.
    res["problems"] = [{"i": i, "task": r["task"], "question": r["question"], "reference": r["reference"],
                        "completion": r["completion"], "strict": r["strict"], "correct": r["strict_ok"],
                        "flexible_correct": r["flexible_ok"],
                        "samples_correct": sum(a == r["reference"] for a in r["samples_strict"]),
                        **({"rerank": r["rerank"], "scores": r["scores"]} if "rerank" in r else {})}
                       for i, r in enumerate(records)]
    return res
