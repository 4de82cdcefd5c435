"""Code problems (MBPP / HumanEval files) and the reward that runs a completion against their tests.

    from lmlab.rewards.code import code_reward, extract_program, read_code_problems, self_check
    problems = read_code_problems("data/mbpp.jsonl", n=100)      # or HumanEval.jsonl(.gz), or hf:mbpp
    p = problems[0]   # {"question", "tests", "entry_point", "setup", "reference_code", "kind", "task": "code", "id"}
    code_reward([p["question"]], [completion], tests=[p["tests"]], setup=[p["setup"]],
                entry_point=[p["entry_point"]], question=[p["question"]])   # [1.0] or [0.0]
    self_check(problems)                                          # [] when every reference passes its tests

Records, normalised to one shape:
  MBPP       `text` (or `prompt`, the sanitized file's name) problem statement, `code` reference,
             `test_list` asserts, `test_setup_code`, optional `challenge_test_list`. The question
             is the statement followed by "Your code should pass these tests:" and the asserts,
             as in the MBPP paper's prompt: the asserts are what name the function.
  HumanEval  `task_id`, `prompt` (signature + docstring, the question), `canonical_solution`,
             `test` (defines `check(candidate)`), `entry_point`; the tests are `test` followed
             by `check(<entry_point>)`.

The program a completion is scored by: `setup`, then `extract_program(completion)`, then the
tests, run by lmlab.rewards.sandbox. Reward 1.0 when it exits 0 within the limits, else 0.0
(also for a sandbox failure: the reward never raises for anything a completion contains).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from lmlab.errors import UserError
from lmlab.rewards.sandbox import SandboxLimits, run_python

_PY_TAGS = {"python", "py", "python3", "py3"}
# An opening fence (its info string), then the body up to a closing fence on its own line, or
# to the end of the text: a completion cut off by the token limit still yields its code.
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|\Z)", re.S)

_MBPP_FIELDS = "text (or prompt), code, test_list, test_setup_code"
_HUMANEVAL_FIELDS = "task_id, prompt, canonical_solution, test, entry_point"


# ----------------------------------------------------------------------------- programs

def extract_program(completion: str, *, prompt: Optional[str] = None, entry_point: Optional[str] = None) -> str:
    """The code in a completion.

    Rules, in order:
      1. the first fenced block tagged python (py, python3), else the first untagged block,
         else the first fenced block of any tag (an unterminated fence runs to the end);
      2. no fence at all: the whole completion, untouched (indentation matters);
      3. HumanEval (`prompt` and `entry_point` given): if the code does not define
         `def <entry_point>(` at the start of a line, it is a body continuation and the
         prompt is put before it; if it does, the part of the prompt above the prompt's own
         `def <entry_point>(` (its imports and helper functions) is put before it, so a full
         solution that leaves out `from typing import List` still runs.
    """
    text = _as_text(completion)
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(text)]
    code = next((b for t, b in blocks if t in _PY_TAGS), None)
    if code is None:
        code = next((b for t, b in blocks if not t), None)
    if code is None:
        code = blocks[0][1] if blocks else text
    if prompt and entry_point:
        defines = re.compile(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", re.M)
        if not defines.search(code):
            return prompt + code
        m = defines.search(prompt)
        preamble = prompt[:m.start()] if m else ""
        return (preamble + "\n" + code) if preamble.strip() else code
    return code


def build_program(completion: str, tests: str, *, setup: str = "", entry_point: Optional[str] = None,
                  question: Optional[str] = None) -> str:
    """setup + the completion's program + the tests: what the sandbox runs for one completion."""
    code = extract_program(completion, prompt=question, entry_point=entry_point)
    return "\n\n".join(part.rstrip("\n") for part in (setup or "", code, tests) if part and part.strip()) + "\n"


def _as_text(completion: Any) -> str:
    """A completion as text: a string, or a conversational completion (a list of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        return "\n".join(_as_text(m) for m in completion if not isinstance(m, dict) or m.get("role") != "user")
    return "" if completion is None else str(completion)


# ----------------------------------------------------------------------------- the reward

def _pick(value: Any, i: int, n: int, name: str) -> Any:
    """Field `name` for completion i: an aligned list, or one value for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UserError(f"code reward: the problem field {name!r} has {len(value)} values for {n} completions; "
                            f"give one per completion")
        return value[i]
    return value


def _limits(limits: Union[SandboxLimits, dict, None]) -> SandboxLimits:
    if limits is None:
        return SandboxLimits()
    if isinstance(limits, SandboxLimits):
        return limits
    if isinstance(limits, dict):
        try:
            return SandboxLimits(**limits)
        except TypeError as e:
            raise UserError(f"code reward: bad sandbox limits {limits} ({e}); the limits are the fields of "
                            f"lmlab.rewards.sandbox.SandboxLimits") from None
    raise UserError(f"code reward: limits must be a SandboxLimits or a dict, got {type(limits).__name__}")


def _score(program: str, limits: SandboxLimits) -> float:
    try:
        return 1.0 if run_python(program, limits=limits).ok else 0.0
    except Exception:  # a sandbox failure is a 0, never a crashed training step
        return 0.0


def code_reward(prompts: Sequence[str], completions: Sequence[Any], *, tests: Optional[Sequence[Optional[str]]] = None,
                entry_point: Union[Sequence[Optional[str]], str, None] = None,
                setup: Union[Sequence[Optional[str]], str] = "", limits: Union[SandboxLimits, dict, None] = None,
                question: Union[Sequence[Optional[str]], str, None] = None, workers: Optional[int] = None,
                **_) -> list[Optional[float]]:
    """1.0 per completion whose program passes its problem's tests in the sandbox, else 0.0.

    The trainer's reward signature: problem fields are lists aligned with `completions`
    (a single value applies to all). A completion whose `tests` is None (not a code problem in
    a mixed batch) gets None, and so does every completion of a batch without `tests`.
    `question` is the raw problem statement, which a HumanEval body continuation is appended
    to (see extract_program); without it the prompt is used.
    Programs run in parallel, `workers` at a time (default: os.cpu_count()).
    """
    n = len(completions)
    if tests is None:
        return [None] * n
    if isinstance(tests, str):
        tests = [tests] * n
    if len(tests) != n:
        raise UserError(f"code reward: needs the problem field 'tests' with one entry per completion "
                        f"({n}); the problems must come from lmlab.rewards.code.read_code_problems")
    lim = _limits(limits)
    jobs: list[tuple[int, str]] = []
    for i, completion in enumerate(completions):
        t = tests[i]
        if t is None:
            continue
        q = _pick(question, i, n, "question")
        if q is None and prompts is not None and i < len(prompts) and isinstance(prompts[i], str):
            q = prompts[i]
        program = build_program(completion, str(t), setup=_pick(setup, i, n, "setup") or "",
                                entry_point=_pick(entry_point, i, n, "entry_point"), question=q)
        jobs.append((i, program))
    out: list[Optional[float]] = [None] * n
    if not jobs:
        return out
    width = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if width == 1:
        scores = [_score(p, lim) for _, p in jobs]
    else:
        with ThreadPoolExecutor(max_workers=width, thread_name_prefix="code-reward") as pool:
            scores = list(pool.map(lambda job: _score(job[1], lim), jobs))
    for (i, _), s in zip(jobs, scores):
        out[i] = s
    return out


def self_check(problems: Sequence[dict], limits: Union[SandboxLimits, dict, None] = None,
               workers: Optional[int] = None) -> list[dict]:
    """The problems whose reference solution fails its own tests: [{"index", "id", "reason", "stderr"}].

    Problems without a reference are skipped. An empty list means the file and the sandbox
    agree: worth running once on a new problem file, before training on it.
    """
    lim = _limits(limits)
    todo = [(i, p) for i, p in enumerate(problems) if p.get("reference_code")]

    def run(item):
        i, p = item
        program = build_program(p["reference_code"], p["tests"], setup=p.get("setup", ""),
                                entry_point=p.get("entry_point"), question=p.get("question"))
        return i, p, run_python(program, limits=lim)

    width = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="code-self-check") as pool:
        results = list(pool.map(run, todo))
    return [{"index": i, "id": p.get("id"), "reason": r.reason, "stderr": r.stderr[-2000:]}
            for i, p, r in results if not r.ok]


# ----------------------------------------------------------------------------- reading problems

def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _normalise(rec: Any, where: str, challenge: bool) -> dict:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object (an MBPP or HumanEval record), got {type(rec).__name__}")
    if "test_list" in rec:
        text = rec.get("text", rec.get("prompt"))
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: MBPP record without the field 'text' (or 'prompt'), the problem statement "
                            f"(MBPP fields: {_MBPP_FIELDS})")
        tests = rec["test_list"]
        if not _strings(tests) or not tests:
            raise UserError(f"{where}: MBPP field 'test_list' must be a non-empty list of assert statements")
        extra = rec.get("challenge_test_list") or []
        if not _strings(extra):
            raise UserError(f"{where}: MBPP field 'challenge_test_list' must be a list of assert statements")
        for name in ("code", "test_setup_code"):
            if rec.get(name) is not None and not isinstance(rec[name], str):
                raise UserError(f"{where}: MBPP field {name!r} must be a string of Python code")
        asserts = list(tests) + (list(extra) if challenge else [])
        return {"question": f"{text.strip()}\nYour code should pass these tests:\n" + "\n".join(tests),
                "tests": "\n".join(asserts) + "\n", "entry_point": None, "setup": rec.get("test_setup_code") or "",
                "reference_code": rec.get("code") or "", "kind": "mbpp", "task": "code",
                "id": None if rec.get("task_id") is None else str(rec["task_id"])}
    if any(k in rec for k in ("entry_point", "canonical_solution", "test")):
        for name in ("prompt", "test", "entry_point"):
            if not isinstance(rec.get(name), str) or not rec[name].strip():
                raise UserError(f"{where}: HumanEval record without the field {name!r} "
                                f"(HumanEval fields: {_HUMANEVAL_FIELDS})")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rec["entry_point"]):
            raise UserError(f"{where}: HumanEval 'entry_point' {rec['entry_point']!r} is not a function name")
        solution = rec.get("canonical_solution")
        if solution is not None and not isinstance(solution, str):
            raise UserError(f"{where}: HumanEval field 'canonical_solution' must be a string of Python code")
        return {"question": rec["prompt"], "tests": rec["test"].rstrip("\n") + f"\n\n\ncheck({rec['entry_point']})\n",
                "entry_point": rec["entry_point"], "setup": "",
                "reference_code": (rec["prompt"] + solution) if solution else "", "kind": "humaneval", "task": "code",
                "id": None if rec.get("task_id") is None else str(rec["task_id"])}
    raise UserError(f"{where}: neither an MBPP record ({_MBPP_FIELDS}) nor a HumanEval record ({_HUMANEVAL_FIELDS}); "
                    f"it has the fields {sorted(rec)}")


def _iter_lines(p: Path, f):
    n = 0
    try:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{p}:{n}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{p}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}:{n + 1}: not UTF-8 text; convert the file to UTF-8") from None


def _iter_file(p: Path):
    """(location, record) for a .jsonl, .jsonl.gz, .json (a list) or .parquet file.

    Read here rather than through lmlab.data.formats, whose imports (pydantic configs) cost
    seconds that a reward's first call should not."""
    name = p.name.lower()
    if name.endswith(".gz"):
        try:
            with gzip.open(p, "rt", encoding="utf-8") as f:
                yield from _iter_lines(p, f)
        except (OSError, EOFError) as e:
            raise UserError(f"{p}: not a readable gzip file ({e}); gunzip it and pass the .jsonl") from None
    elif name.endswith(".jsonl"):
        with open(p, encoding="utf-8") as f:
            yield from _iter_lines(p, f)
    elif name.endswith(".json"):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
        except UnicodeDecodeError:
            raise UserError(f"{p}: not UTF-8 text; convert the file to UTF-8") from None
        if not isinstance(data, list):
            raise UserError(f"{p}: a .json problems file must hold a list of records")
        for n, rec in enumerate(data, 1):
            yield f"{p}:record {n}", rec
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for n, rec in enumerate(pq.read_table(p).to_pylist(), 1):
            yield f"{p}:row {n}", rec
    else:
        raise UserError(f"{p}: unsupported problems file type; use .jsonl, .jsonl.gz, .json or .parquet")


def _iter_hf(name: str):
    """hf:NAME[/CONFIG][:SPLIT] (split default: test), through datasets.load_dataset."""
    spec = name[3:]
    spec, _, split = spec.partition(":")
    dataset, _, config = spec.partition("/")
    fix = ("download the dataset's file (MBPP: mbpp.jsonl or sanitized-mbpp.json; HumanEval: HumanEval.jsonl.gz) "
           "and pass its path instead")
    if not dataset:
        raise UserError(f"{name!r}: no dataset name after 'hf:' (e.g. hf:mbpp, hf:mbpp/sanitized:test, "
                        f"hf:openai_humaneval)")
    try:
        import datasets
    except ImportError:
        raise UserError(f"{name}: reading Hugging Face datasets needs the `datasets` package (pip install "
                        f"datasets); or {fix}") from None
    try:
        ds = datasets.load_dataset(dataset, config or None, split=split or "test")
    except Exception as e:  # offline, unknown name, bad split: all fixed the same two ways
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{name}: cannot load it from the Hugging Face hub ({type(e).__name__}: {first}); "
                        f"check the name/config/split, or {fix}") from None
    for n, rec in enumerate(ds, 1):
        yield f"{name}:row {n}", dict(rec)


def read_code_problems(path_or_hf: str, n: int = 0, challenge: bool = False) -> list[dict]:
    """MBPP or HumanEval records from a local file or `hf:NAME[/CONFIG][:SPLIT]` -> normalised problems.

    The first `n` (0 = all). Local files: .jsonl, .jsonl.gz (HumanEval's own), .json (a list,
    e.g. sanitized-mbpp.json) or .parquet. `challenge` adds MBPP's challenge_test_list to the
    tests. A malformed record is a UserError naming file:line and the missing field.
    """
    if not isinstance(path_or_hf, (str, Path)) or not str(path_or_hf).strip():
        raise UserError("code problems: give a file path (MBPP/HumanEval jsonl) or hf:NAME")
    name = str(path_or_hf)
    if name.startswith("hf:"):
        records = _iter_hf(name)
    else:
        p = Path(name)
        if not p.is_file():
            raise UserError(f"code problems file not found: {p} (an MBPP or HumanEval .jsonl; fix the path, or use "
                            f"hf:mbpp / hf:openai_humaneval where the hub is reachable)")
        records = _iter_file(p)
    out = []
    for where, rec in records:
        out.append(_normalise(rec, where, challenge))
        if n and len(out) >= n:
            break
    if not out:
        raise UserError(f"{name}: holds no code problems")
    return out
