"""A stand-in for the Lean 4 REPL, for tests. It is NOT Lean and proves nothing.

lmlab.eval.lean drives the real REPL (leanprover-community/repl, `lake env repl`), which
cannot be installed on lmlab's development machines. This program speaks the same protocol
so the client can be tested end to end as a subprocess:

    python tests/lean_standin.py [--log PATH] [--mode normal|exit-at-start]

Protocol (as in the real REPL's REPL/Main.lean and REPL/JSON.lean):
  * stdin: one JSON command, then a blank line. Lines are read up to a blank line and joined,
    as the real `getLines` does; end of input ends the program (exit 0).
  * stdout: one JSON object, pretty-printed over several lines, then a blank line.
  * `{"cmd": TEXT}` runs TEXT in a new environment; `{"cmd": TEXT, "env": N}` runs it on top of
    environment N. Every command is recorded as a new environment and answered with its id
    (0, 1, 2, ... in the order commands arrive): `{"env": N, "messages": [...], "sorries": [...]}`,
    where `messages` and `sorries` are left out when empty.
  * A message is `{"severity": "error"|"warning"|"info", "pos": {"line", "column"},
    "endPos": {"line", "column"}, "data": TEXT}` (lines from 1, columns from 0, in characters);
    a sorry is `{"proofState": K, "pos", "endPos", "goal": TEXT}`.
  * An unknown `env` is answered `{"message": "Unknown environment."}`; input that is not JSON
    ends the program with "uncaught exception: ..." on stderr, as the real REPL does.
  * Only command mode is implemented: other requests (`tactic`, `path`, pickling) get a
    `{"message": ...}` saying so.

"Checking" rules, deterministic and purely textual (`--` line comments are ignored by the
rules, so markers can sit in comments):
  * `sorry` or `admit` as a word: a `sorries` entry at each, and one warning
    "declaration uses `sorry`" at the name of the first declaration (current Lean's wording;
    older Lean wrote 'sorry' in straight quotes).
  * `ERROR` as a word: an error "unknown identifier 'ERROR'" at it.
  * Unbalanced ( ) [ ] { } ⟨ ⟩: an error "unexpected token ...; expected ..." at the stray
    closer, or "unexpected end of input; expected ')'" at the end for an unclosed opener.
  * `import M` in a command that has `env`: an error "invalid 'import' command, it must be used
    in the beginning of the file"; `import Missing...`: an error "unknown module prefix ...".
  * `#check X` / `#eval X`: an info message "stand-in: X".
  * `STANDIN_WARN`: a linter warning that is not about sorry ("unused variable `h`").
  * `STANDIN_RLIMIT`: an info message "RLIMIT_AS soft=S hard=H" (bytes, -1 = unlimited), so a
    test can see the memory cap the client set on this process.
  * Anything else (`theorem t : 1 + 1 = 2 := by\n  simp`) is accepted: `{"env": N}`.

Fault markers, anywhere in the command text, so one process can be driven into each:
  * `STANDIN_CRASH`: exits with code 1 without answering (a message on stderr).
  * `STANDIN_HANG`: sleeps forever without answering.
  * `STANDIN_GARBAGE`: answers with a line that is not JSON, then the blank line.
  * `STANDIN_SLOW`: sleeps 0.5 s, then answers by the rules above.
  * `STANDIN_FORGET`: forgets every environment recorded so far (their ids are not reused),
    so the command itself, if it names an `env`, gets "Unknown environment.".

`--log PATH` appends one JSON line per request received (and `{"standin_start": PID}` when
the program starts), so tests can count how often the header was elaborated.
`--mode exit-at-start` prints an error on stderr and exits 1 at once, like `lake env repl`
in a project where the `repl` executable was never built.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

_OPEN = {"(": ")", "[": "]", "{": "}", "⟨": "⟩"}
_CLOSE = {v: k for k, v in _OPEN.items()}
_DECL = re.compile(r"\b(theorem|lemma|def|example|instance|abbrev)\b(\s+([^\s:({\[⟨]+))?")


def _pos(text: str, offset: int) -> dict:
    """Lean's position of character `offset`: line from 1, column from 0 (in characters)."""
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1)
    return {"line": line, "column": column}


def _msg(text: str, severity: str, start: int, end: int, data: str) -> dict:
    return {"severity": severity, "pos": _pos(text, start), "endPos": _pos(text, end), "data": data}


def _strip_comments(text: str) -> str:
    """`--` line comments blanked out with spaces, so offsets stay those of the original."""
    return re.sub(r"--[^\n]*", lambda m: " " * len(m.group(0)), text)


def _rlimit_as() -> tuple[int, int]:
    try:
        import resource

        return resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return (-1, -1)


class StandIn:
    """The REPL's state (its environments) and its answer to one request; no I/O here, so the
    test's HTTP server can answer in the same way."""

    def __init__(self) -> None:
        self.envs: list[str | None] = []  # env id -> the command that made it (None: forgotten)
        self.proof_states = 0

    def respond(self, request: object) -> dict:
        if not isinstance(request, dict) or "cmd" not in request:
            return {"message": "stand-in: only command mode ({\"cmd\": ..., \"env\": ...}) is implemented"}
        cmd = request["cmd"]
        env = request.get("env")
        if not isinstance(cmd, str) or (env is not None and not isinstance(env, int)):
            return {"message": "Could not parse as a valid JSON command:\nstand-in: cmd must be a string, env a number"}
        if "STANDIN_FORGET" in cmd:
            self.envs = [None] * len(self.envs)
        if env is not None and not (0 <= env < len(self.envs) and self.envs[env] is not None):
            return {"message": "Unknown environment."}
        messages, sorries = self.check(cmd, has_env=env is not None)
        self.envs.append(cmd)
        out: dict = {"env": len(self.envs) - 1}
        if messages:
            out["messages"] = messages
        if sorries:
            out["sorries"] = sorries
        return out

    def check(self, text: str, has_env: bool) -> tuple[list[dict], list[dict]]:
        code = _strip_comments(text)
        messages: list[dict] = []
        sorries: list[dict] = []
        for m in re.finditer(r"^import[ \t]+(\S+)", code, re.M):
            if has_env:
                messages.append(_msg(text, "error", m.start(), m.end(),
                                     "invalid 'import' command, it must be used in the beginning of the file"))
            elif m.group(1).startswith("Missing"):
                root = m.group(1).split(".")[0]
                messages.append(_msg(text, "error", m.start(), m.end(),
                                     f"unknown module prefix '{root}'\n\nNo directory '{root}' or file "
                                     f"'{root}.olean' in the search path entries:\n(stand-in: none)"))
        for m in re.finditer(r"\bERROR\b", code):
            messages.append(_msg(text, "error", m.start(), m.end(), "unknown identifier 'ERROR'"))
        messages.extend(self._brackets(text, code))
        for m in re.finditer(r"^[ \t]*#(check|eval)[ \t]+(.*)$", code, re.M):
            messages.append(_msg(text, "info", m.start(1) - 1, m.end(), f"stand-in: {m.group(2).strip()}"))
        if "STANDIN_WARN" in text:
            messages.append(_msg(text, "warning", 0, 0, "unused variable `h`\n\nNote: This linter can be "
                                 "disabled with `set_option linter.unusedVariables false`"))
        if "STANDIN_RLIMIT" in text:
            soft, hard = _rlimit_as()
            messages.append(_msg(text, "info", 0, 0, f"RLIMIT_AS soft={soft} hard={hard}"))
        for m in re.finditer(r"\b(sorry|admit)\b", code):
            sorries.append({"proofState": self.proof_states, "pos": _pos(text, m.start()),
                            "endPos": _pos(text, m.end()), "goal": "⊢ stand-in goal"})
            self.proof_states += 1
        if sorries:
            d = _DECL.search(code)
            start, end = (d.span(3) if d.group(3) else d.span(1)) if d else (0, 0)
            messages.append(_msg(text, "warning", start, end, "declaration uses `sorry`"))
        messages.sort(key=lambda m: (m["pos"]["line"], m["pos"]["column"]))
        return messages, sorries

    @staticmethod
    def _brackets(text: str, code: str) -> list[dict]:
        stack: list[tuple[str, int]] = []
        for i, ch in enumerate(code):
            if ch in _OPEN:
                stack.append((ch, i))
            elif ch in _CLOSE:
                if stack and stack[-1][0] == _CLOSE[ch]:
                    stack.pop()
                else:
                    want = f"'{_OPEN[stack[-1][0]]}'" if stack else "command"
                    return [_msg(text, "error", i, i + 1, f"unexpected token '{ch}'; expected {want}")]
        if stack:
            end = len(text)
            return [_msg(text, "error", end, end, f"unexpected end of input; expected '{_OPEN[stack[-1][0]]}'")]
        return []


def _read_query(stdin) -> str:
    """Lines up to a blank line, joined (the real REPL's `getLines`); "" at end of input."""
    parts: list[str] = []
    while True:
        line = stdin.readline()
        if not line or not line.strip():
            if not line or parts:
                return "".join(parts)
            continue  # blank lines before a command are skipped
        parts.append(line.rstrip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="A stand-in for the Lean 4 REPL (NOT Lean), for tests.")
    ap.add_argument("--log", help="append each request received to this file, one JSON line each")
    ap.add_argument("--mode", choices=["normal", "exit-at-start"], default="normal")
    args = ap.parse_args(argv)

    def log(record: dict) -> None:
        if args.log:
            with open(args.log, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    log({"standin_start": os.getpid()})
    if args.mode == "exit-at-start":
        sys.stderr.write("error: unknown executable repl (stand-in --mode exit-at-start)\n")
        return 1
    state = StandIn()
    while True:
        query = _read_query(sys.stdin)
        if not query:
            return 0
        try:
            request = json.loads(query)
        except ValueError as e:
            sys.stderr.write("uncaught exception: " + json.dumps({"message": f"Could not parse JSON:\n{e}"}) + "\n")
            return 1
        log(request)
        cmd = request.get("cmd", "") if isinstance(request, dict) else ""
        cmd = cmd if isinstance(cmd, str) else ""
        if "STANDIN_CRASH" in cmd:
            sys.stderr.write("stand-in: crash requested by STANDIN_CRASH\n")
            sys.stderr.flush()
            os._exit(1)
        if "STANDIN_HANG" in cmd:
            while True:
                time.sleep(3600)
        if "STANDIN_GARBAGE" in cmd:
            sys.stdout.write("this is <not> JSON {\n\n")
            sys.stdout.flush()
            continue
        if "STANDIN_SLOW" in cmd:
            time.sleep(0.5)
        sys.stdout.write(json.dumps(state.respond(request), indent=1, ensure_ascii=False) + "\n\n")
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
