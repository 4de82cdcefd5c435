"""Problems with checkable answers, as `lmlab eval` and `lmlab pairs` use them: reading a
GSM8K-format file, each record's answer rules, and the prompt (and stops) that ask a model one.

    from lmlab.tasks.problems import answer_rules, build_prompt, problem_stops, read_problems
    problems = read_problems("runs/x/tasks/test.jsonl", n=200)
    ids, text, shots = build_prompt(tokenizer, problems[0], "chatml", fewshot=[], n_shot=0, budget=960)
    stops = problem_stops("chatml", tokenizer)        # template None (a base model): few-shot stops
    strict, flexible, reference = answer_rules(problems[0].get("task"))
    correct = strict(completion) == reference(problems[0]["answer"])

A record whose `task` names an embedded task (lmlab.tasks) is read with that task's own
extraction (e.g. `sort` answers are lists); others (real GSM8K) with lm-eval's GSM8K rules
(lmlab.tasks.gsm8k). The evaluation and the pairs stage both prompt, stop and check through
here, so "correct" means the same in both.

Prompting: with a chat template the question is the user turn (lmlab.infer.prompting's
`question_prompt`; few-shot examples become earlier exchanges) and the reply stops at the
template's end of turn; a base model gets lm-eval's few-shot format, `Question: q\\nAnswer:
solution` examples joined by blank lines, then `Question: q\\nAnswer:`, and stops at
`Question:` or a blank line (lm-eval gsm8k v1 `until`; v3 dropped the blank line, which only
matters for answers containing one, which ours and GSM8K's never do). Examples that do not
fit the budget are dropped from the front.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from lmlab.errors import UserError
from lmlab.tasks.gsm8k import extract_flexible, extract_strict, normalize_answer

BASE_STOP = ["Question:", "\n\n"]


# ----------------------------------------------------------------------------- answers

def answer_rules(task: Optional[str]) -> tuple[Callable, Callable, Callable]:
    """(strict, flexible, reference) functions -> normalised answers, for a record's task."""
    from lmlab.tasks import TASKS

    mod = TASKS.get(task) if task else None
    if mod is None or mod.NAME == "arithmetic":  # arithmetic answers are GSM8K numbers
        return (lambda t: normalize_answer(extract_strict(t)), lambda t: normalize_answer(extract_flexible(t)),
                normalize_answer)
    return mod.extract_strict, mod.extract_flexible, lambda ref: mod.extract_strict(ref)


def checked_answer(problem: dict, text: str, flexible: bool = False) -> tuple[Optional[str], bool]:
    """(the extracted answer of `text`, whether it is the problem's reference). Strict: the
    task's own rule (`#### N` for GSM8K numbers); `flexible`: lm-eval's flexible extraction (the
    last number), for a model that answers in its own words, as SmolLM3 or Qwen3 do."""
    strict, loose, ref = answer_rules(problem.get("task"))
    a = (loose if flexible else strict)(text)
    return a, a is not None and a == ref(problem["answer"])


# ----------------------------------------------------------------------------- reading

def read_problems(path: str | Path, n: int = 0, checkable: bool = False) -> list[dict]:
    """GSM8K-format jsonl (`question`, `answer`, optional `task`) -> records; the first n (0 = all).

    `checkable` also requires what sampling against the answers needs (`lmlab pairs`): a
    non-empty question, a string `task`, and an answer whose `#### ` line the task's strict
    extraction reads as the reference. Errors name file:line.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"problems file not found: {p} (write one with `lmlab tasks`, or fix the path)")
    from lmlab.data.records import iter_jsonl

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


# ----------------------------------------------------------------------------- prompting

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
                 budget: int, thinking: bool = True) -> tuple[list[int], str, int]:
    """(prompt ids, prompt text for the record, shots used), fitting in `budget` tokens;
    `thinking=False`: a thinking template's empty thinking block ends the prompt."""
    from lmlab.infer.engine import encode_prompt
    from lmlab.infer.prompting import question_prompt

    shots = _shots_for(problem, fewshot, n_shot) if n_shot else []
    for k in range(len(shots), -1, -1):
        if template:
            ids = question_prompt(template, problem["question"], tokenizer,
                                  [(s["question"], s["answer"]) for s in shots[len(shots) - k:]], thinking=thinking)
            text = tokenizer.decode(ids)
        else:
            text = fewshot_text(problem["question"], shots[len(shots) - k:])
            ids = encode_prompt(tokenizer, text)
        if len(ids) <= budget or k == 0:
            break
    if len(ids) > budget:  # even zero-shot is too long: keep the end, where the question is
        ids = ids[-budget:]
    return ids, text, k


def problem_stops(template: Optional[str], tokenizer):
    """Where an answer ends: the chat template's stops, or lm-eval's few-shot ones (no template)."""
    from lmlab.infer.prompting import Stops, chat_stops

    return chat_stops(template, tokenizer) if template else Stops(tuple(BASE_STOP))
