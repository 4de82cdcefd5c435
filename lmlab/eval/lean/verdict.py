"""What a proof check is and how Lean's answer is judged: `LeanConfig`, `Verdict`, `judge`.

Both backends (lmlab.eval.lean.repl, lmlab.eval.lean.http) turn Lean's answer into a
`Verdict` through `verdict_of`, so a proof is judged the same way whichever ran it: valid
only when the answer has no message of severity "error", no `sorries` entry and no
"declaration uses 'sorry'" warning. A check that got no judgement (timeout, crash, bad
output, a server error) becomes a failed Verdict through `failed`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

from pydantic import Field

from lmlab.config import Strict

DOCS = "see docs/lean.md"
# Both spellings: Lean before v4.28 wrote 'sorry' in straight quotes, later ones in backticks.
_SORRY_WARNING = re.compile(r"declaration uses ['`]sorry['`]")


class LeanConfig(Strict):
    """Where Lean runs and how long a proof may take."""

    backend: Literal["repl", "http"] = Field("repl", description="repl = local REPL processes; http = a Kimina Lean Server")
    project: Optional[str] = Field(None, description="repl: the Lean project (with Mathlib built) the REPL runs in, as its cwd")
    command: list[str] = Field(default_factory=lambda: ["lake", "env", "repl"],
                               description="repl: how to start one REPL, run in `project` (e.g. "
                                           "[lake, env, /path/to/repl/.lake/build/bin/repl])")
    workers: int = Field(4, ge=1, description="repl: REPL processes run at once; http: requests in flight at once")
    timeout_s: float = Field(60.0, gt=0, description="seconds one proof may take before it counts as failed")
    memory_mb: int = Field(8192, ge=0, description="repl: address-space cap (RLIMIT_AS) per REPL process, MiB (0 = none)")
    header_timeout_s: float = Field(600.0, gt=0, description="repl: seconds to elaborate a header such as `import Mathlib`")
    url: str = Field("http://localhost:8000", description="http: the Kimina Lean Server (its /verify endpoint is used)")
    api_key: Optional[str] = Field(None, description="http: sent as `Authorization: Bearer KEY`")
    batch_size: int = Field(8, ge=1, description="http: proofs per request")


@dataclass
class Verdict:
    """One proof's outcome.

    `ok`: Lean accepted it. `messages`: Lean's messages, as the REPL gave them (positions are
    relative to the body for the repl backend, to header + blank line + body for http).
    `error`: why no judgement was possible (timeout, crash, malformed output, REPL error,
    HTTP error), in words; None when Lean answered. `reason`: the judgement in words ("ok",
    the first error, "uses sorry") or the error. `time_s`: seconds the proof took (the header
    is not counted).
    """

    ok: bool
    messages: list[dict] = field(default_factory=list)
    error: Optional[str] = None
    time_s: float = 0.0
    reason: str = ""


def judge(response: dict) -> tuple[bool, str]:
    """(valid, reason) for one REPL answer to a command.

    Valid means: no message of severity "error", no `sorries` entry and no warning saying the
    declaration uses sorry. The warning is checked as well as `sorries` because the REPL lists
    sorries from the info trees, and a sorry reached in a way it does not see still gets the
    warning. Info messages and other warnings (linters) do not matter.
    """
    if not isinstance(response, dict):
        return False, f"malformed response: expected a JSON object, got {type(response).__name__}"
    if "message" in response and "env" not in response:  # the REPL's own error, e.g. "Unknown environment."
        return False, f"REPL error: {one_line(str(response['message']))}"
    messages = response.get("messages") or []
    if not isinstance(messages, list):
        return False, "malformed response: `messages` is not a list"
    for m in messages:
        if isinstance(m, dict) and m.get("severity") == "error":
            return False, f"Lean error{where(m)}: {one_line(str(m.get('data', '')))}"
    sorries = response.get("sorries") or []
    if sorries:
        return False, f"the proof uses sorry ({len(sorries)} sorr{'y' if len(sorries) == 1 else 'ies'})"
    for m in messages:
        if isinstance(m, dict) and _SORRY_WARNING.search(str(m.get("data", ""))):
            return False, f"the proof uses sorry ({one_line(str(m.get('data')))}{where(m)})"
    return True, "ok"


def where(m: dict) -> str:
    pos = m.get("pos")
    if isinstance(pos, dict) and "line" in pos:
        return f" at line {pos.get('line')}, column {pos.get('column')}"
    return ""


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def verdict_of(response: dict, time_s: float) -> Verdict:
    ok, reason = judge(response)
    if reason.startswith(("REPL error", "malformed")):  # no judgement of the proof was possible
        return Verdict(False, [], reason, time_s, reason)
    messages = [m for m in response.get("messages") or [] if isinstance(m, dict)]
    return Verdict(ok, messages, None, time_s, reason)


def failed(error: str, time_s: float) -> Verdict:
    return Verdict(False, [], error, time_s, error)



Progress = Callable[[int, int], None]  # (done, total), called in the caller's thread
