"""Checking model-written Lean 4 proofs: the share of generated proofs that Lean accepts.

    from lmlab.eval.lean import LeanConfig, LeanVerifier
    cfg = LeanConfig(project="~/lean/mathproj")                 # a Lean project with Mathlib built
    with LeanVerifier(cfg) as lean:
        v = lean.verify("import Mathlib", "theorem t : 1 + 1 = 2 := by norm_num")
        v.ok, v.reason, v.messages, v.error, v.time_s
        vs = lean.verify_many([(header, body), ...])             # in the order given

Two backends behind one interface (`LeanConfig.backend`):
  repl  a pool of `workers` REPL processes (leanprover-community/repl, started as
        `lake env repl` in `project`), one thread each; each process elaborates a header
        once and runs every proof on top of it (lmlab.eval.lean.repl).
  http  a Kimina Lean Server (project-numina/kimina-lean-server), `POST {url}/verify`
        (lmlab.eval.lean.http).

A proof is valid only when Lean's answer has no message of severity "error", no `sorries`
entry and no "declaration uses 'sorry'" warning (`judge`, lmlab.eval.lean.verdict). Accepting
means only that: Lean does not look for `axiom` declarations or other tricks in the proof
text, and neither does this.

Problems the user can fix (no Lean installed, a wrong `project`, a header that does not
elaborate, a server that cannot be reached) raise `UserError` with the fix. The real REPL was
not run on lmlab's development machines: tests/test_lean.py drives tests/lean_standin.py, a
program that speaks the same protocol (docs/lean.md).

Package layout: verdict.py (LeanConfig, Verdict, judge), repl.py (ReplProcess, ReplPool),
http.py (HttpBackend), verifier.py (LeanVerifier); this module re-exports their public names.
"""

from lmlab.eval.lean.http import HttpBackend
from lmlab.eval.lean.repl import (ReplFailure, ReplPool, ReplProcess, check_command, check_project,
                                  memory_limit)
from lmlab.eval.lean.verdict import LeanConfig, Progress, Verdict, judge
from lmlab.eval.lean.verifier import LeanVerifier

__all__ = ["HttpBackend", "LeanConfig", "LeanVerifier", "Progress", "ReplFailure", "ReplPool", "ReplProcess",
           "Verdict", "check_command", "check_project", "judge", "memory_limit"]
