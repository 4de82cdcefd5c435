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

A record whose `task` names an embedded task (lmlab.tasks) is scored with that task's own
extraction (e.g. `sort` answers are lists); others (real GSM8K) with the rules above.

Prompting: a model with a chat template gets the question as a user turn (`prompt_ids`)
and stops at the template's end of turn; a base model gets lm-eval's few-shot format,
`Question: q\\nAnswer: solution` examples joined by blank lines, then `Question: q\\nAnswer:`,
and stops at `Question:` or a blank line (lm-eval gsm8k v1 `until`; v3 dropped the blank
line, which only matters for answers containing one, which ours and GSM8K's never do).
Examples that do not fit the context with `max_new_tokens` are dropped from the front.

Metrics: greedy decoding gives `exact_match_strict` / `exact_match_flexible`; `n_samples`
sampled completions per problem give `pass@k` (the unbiased estimator of Chen et al. 2021)
and `maj@k` (majority vote over the first k samples' answers, ties to the earliest), using
strict extraction, with `_flexible` variants alongside.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Sequence

from lmlab.errors import UserError
from lmlab.tasks.gsm8k import (FLEXIBLE_REGEX, IGNORE_REGEXES, STRICT_REGEX, extract_flexible,  # noqa: F401
                               extract_strict, normalize_answer, regex_filter)

BASE_STOP = ["Question:", "\n\n"]


def answer_rules(task: Optional[str]) -> tuple[Callable, Callable, Callable]:
    """(strict, flexible, reference) functions -> normalised answers, for a record's task."""
    from lmlab.tasks import TASKS

    mod = TASKS.get(task) if task else None
    if mod is None or mod.NAME == "arithmetic":  # arithmetic answers are GSM8K numbers
        return (lambda t: normalize_answer(extract_strict(t)), lambda t: normalize_answer(extract_flexible(t)),
                normalize_answer)
    return mod.extract_strict, mod.extract_flexible, lambda ref: mod.extract_strict(ref)


# ------------------------------------------------------------------------ estimators

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def majority_vote(answers: Sequence[Optional[str]]) -> Optional[str]:
    """The most frequent answer (None = no answer, never voted for); ties go to the earliest."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


# --------------------------------------------------------------------------- problems

def read_problems(path: str | Path, n: int = 0, checkable: bool = False) -> list[dict]:
    """GSM8K-format jsonl (`question`, `answer`, optional `task`) -> records; the first n (0 = all).

    `checkable` also requires what sampling against the answers needs (`lmlab pairs`): a
    non-empty question, a string `task`, and an answer whose `#### ` line the task's strict
    extraction reads as the reference. Errors name file:line.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"problems file not found: {p} (write one with `lmlab tasks`, or fix the path)")
    from lmlab.data.formats import iter_jsonl

    out = []
    for lineno, rec in iter_jsonl(p):
        where = f"{p}:{lineno}"
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or not isinstance(rec.get("answer"), str):
            raise UserError(f"{where}: expected an object with string fields 'question' and 'answer' (GSM8K format)")
        if checkable:
            _check_answerable(rec, where)
        out.append(rec)
        if n and len(out) >= n:
            break
    if not out:
        raise UserError(f"problems file {p} holds no problems")
    return out


def _check_answerable(rec: dict, where: str) -> None:
    if not rec["question"].strip():
        raise UserError(f"{where}: the question is empty")
    task = rec.get("task")
    if task is not None and not isinstance(task, str):
        raise UserError(f"{where}: 'task' must be a string (a task name such as arithmetic or sort), "
                        f"got {type(task).__name__}")
    strict, _, ref = answer_rules(task)
    got, want = strict(rec["answer"]), ref(rec["answer"])
    if got is None:
        raise UserError(f"{where}: the answer has no '#### N' line (a GSM8K answer ends with one), so samples "
                        f"cannot be checked against it")
    if got != want:
        raise UserError(f"{where}: the answer's '#### ' line reads {got!r} but the reference answer reads "
                        f"{want!r}; end the answer with the line '#### N' and nothing after it")


# -------------------------------------------------------------------------- prompting

def fewshot_text(question: str, shots: Sequence[dict]) -> str:
    """lm-eval's gsm8k prompt: `Question: q\\nAnswer: a` examples + blank lines, then the question."""
    ctx = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return ctx + f"Question: {question}\nAnswer:"


def _shots_for(problem: dict, fewshot: Sequence[dict], n_shot: int) -> list[dict]:
    """The first n_shot examples of the problem's task (all examples when it has none), never itself."""
    same = [s for s in fewshot if s.get("task") == problem.get("task") and s["question"] != problem["question"]]
    pool = same if same else [s for s in fewshot if s["question"] != problem["question"]]
    return list(pool[:n_shot])


def build_prompt(tokenizer, problem: dict, template: Optional[str], fewshot: Sequence[dict], n_shot: int,
                 budget: int) -> tuple[list[int], str, int]:
    """(prompt ids, prompt text for the record, shots used), fitting in `budget` tokens."""
    from lmlab.infer.engine import encode_prompt

    shots = _shots_for(problem, fewshot, n_shot) if n_shot else []
    for k in range(len(shots), -1, -1):
        if template:
            from lmlab.data.chat import prompt_ids

            messages = []
            for s in shots[len(shots) - k:]:
                messages += [{"role": "user", "content": s["question"]}, {"role": "assistant", "content": s["answer"]}]
            messages.append({"role": "user", "content": problem["question"]})
            ids = prompt_ids(template, messages, tokenizer)
            text = tokenizer.decode(ids)
        else:
            text = fewshot_text(problem["question"], shots[len(shots) - k:])
            ids = encode_prompt(tokenizer, text)
        if len(ids) <= budget or k == 0:
            break
    if len(ids) > budget:  # even zero-shot is too long: keep the end, where the question is
        ids = ids[-budget:]
    return ids, text, k


def complete(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop: Sequence[str] = (), stop_ids: Sequence[int] = (), seed: int = 0,
             batch_size: int = 32, device=None, bar=None) -> list[str]:
    """Completions of token-id prompts, batched by length, cut at the first stop string or stop id."""
    from lmlab.infer.engine import _cut_at_stop, generate_ids

    stop = [s for s in stop if s]
    stop_ids = set(int(i) for i in stop_ids)
    eos = tokenizer.eos_id if tokenizer.eos_id is not None and tokenizer.eos_id >= 0 else None
    tail = max(map(len, stop), default=0) + 8
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch with little padding
    outs: list[str] = [""] * len(prompts)
    for b, start in enumerate(range(0, len(order), batch_size)):
        rows = order[start:start + batch_size]
        new: list[list[int]] = [[] for _ in rows]

        def should_stop(row: int, ids: list[int]) -> bool:
            if ids[-1] in stop_ids:
                return True
            return bool(stop) and any(s in tokenizer.decode(ids[-tail:]) for s in stop)

        # A seed per batch: the samples of one problem differ, and a run is reproducible.
        for step in generate_ids(model, [prompts[i] for i in rows], max_new_tokens, temperature, 0, top_p,
                                 eos_id=eos, seed=seed + b, device=device,
                                 pad_id=tokenizer.pad_id if tokenizer.pad_id >= 0 else 0, should_stop=should_stop):
            for r, t in enumerate(step):
                if t is not None and t != eos and t not in stop_ids:
                    new[r].append(t)
        for r, i in enumerate(rows):
            outs[i] = _cut_at_stop(tokenizer.decode(new[r]), stop)[0]
        if bar is not None:
            bar.update(len(rows))
    return outs


# ---------------------------------------------------------------------------- scoring

def stderr(values: Sequence[float]) -> Optional[float]:
    """Standard error of a mean over problems (sample std / sqrt(n)), as lm-eval reports it."""
    n = len(values)
    if n < 2:
        return None
    m = sum(values) / n
    return (sum((v - m) ** 2 for v in values) / (n - 1) / n) ** 0.5


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
                     batch_size: int = 32, seed: int = 0, device=None, n_records: int = 5) -> dict:
    """Greedy exact match (strict, flexible) and, with n_samples > 0, pass@k and maj@k per k ≤ n_samples.

    `template` (a chat template name) prompts with the template, zero-shot unless n_shot > 0
    (examples then become earlier turns); None prompts lm-eval-style few-shot from `fewshot`.
    Returns metrics overall and per task, the settings, and `n_records` sample records.
    """
    from lmlab.runtime import progress

    if not problems:
        raise UserError("no problems to score")
    ks = sorted(set(int(x) for x in k))
    if n_samples and any(x > n_samples for x in ks):
        raise UserError(f"k={ks} asks for more than n_samples={n_samples} samples; raise n_samples or lower k")
    ctx = int(model.cfg.max_seq_len)
    if max_new_tokens >= ctx:
        raise UserError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's "
                        f"{ctx}-token context; lower it")
    if template:
        from lmlab.data.chat import end_of_turn_ids, stop_strings

        stop, stop_ids = list(stop_strings(template)), list(end_of_turn_ids(template, tokenizer))
        shots = n_shot if fewshot else 0
    else:
        stop, stop_ids, shots = list(BASE_STOP), [], n_shot if fewshot else 0
    t0 = time.perf_counter()
    built = [build_prompt(tokenizer, p, template, fewshot, shots, ctx - max_new_tokens) for p in problems]
    prompts = [b[0] for b in built]
    was_training = model.training
    model.eval()
    total = len(prompts) * (1 + n_samples)
    with progress(total, "generative", "completion") as bar:
        greedy = complete(model, tokenizer, prompts, max_new_tokens, 0.0, 1.0, stop, stop_ids, seed, batch_size,
                          device, bar)
        sampled: list[str] = []
        if n_samples:
            rep = [p for p in prompts for _ in range(n_samples)]
            sampled = complete(model, tokenizer, rep, max_new_tokens, temperature, top_p, stop, stop_ids, seed,
                               batch_size, device, bar)
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
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    res["per_task"] = {t: _aggregate(rs, ks, n_samples) for t, rs in sorted(by_task.items())}
    res["settings"] = {"prompting": f"chat:{template}" if template else "fewshot", "n_shot": shots,
                       "mean_shots_used": sum(b[2] for b in built) / len(built), "greedy": True,
                       "n_samples": n_samples, "k": [x for x in ks if x <= n_samples], "temperature": temperature,
                       "top_p": top_p, "top_k": 0, "max_new_tokens": max_new_tokens, "seed": seed,
                       "stop": stop, "extraction": {"strict": STRICT_REGEX, "flexible": FLEXIBLE_REGEX,
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
                        "samples_correct": sum(a == r["reference"] for a in r["samples_strict"])}
                       for i, r in enumerate(records)]
    return res
