"""`LeanVerifier`: checks (header, body) proofs with the backend `LeanConfig.backend` names."""

from __future__ import annotations

from typing import Optional, Sequence

from lmlab.eval.lean.http import HttpBackend
from lmlab.eval.lean.repl import ReplPool, ReplProcess
from lmlab.eval.lean.verdict import LeanConfig, Progress, Verdict


class LeanVerifier:
    """Checks (header, body) proofs with the backend `cfg.backend` names; a context manager.

    `verify(header, body)` checks one proof; `verify_many(items, progress)` checks many at
    once (up to `cfg.workers` in flight) and returns verdicts in the order of `items`;
    `progress(done, total)` is called in the caller's thread after each result (repl) or
    batch (http). A proof that fails for any reason is a Verdict with ok=False; only problems
    the user must fix (see the module docstring) raise UserError.
    """

    def __init__(self, cfg: LeanConfig | dict | None = None):
        if cfg is None:
            cfg = LeanConfig()
        elif isinstance(cfg, dict):
            cfg = LeanConfig(**cfg)
        self.cfg = cfg
        self._backend = HttpBackend(cfg) if cfg.backend == "http" else ReplPool(cfg)
        self._closed = False

    @property
    def processes(self) -> list[ReplProcess]:
        """The repl backend's processes (empty for http), for diagnostics."""
        return list(getattr(self._backend, "processes", []))

    def verify(self, header: str, body: str) -> Verdict:
        return self.verify_many([(header, body)])[0]

    def verify_many(self, items: Sequence[tuple[str, str]], progress: Optional[Progress] = None) -> list[Verdict]:
        if self._closed:
            raise RuntimeError("LeanVerifier is closed")
        checked = []
        for k, item in enumerate(items):
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(s, str) for s in item)):
                raise TypeError(f"item {k} must be a (header, body) pair of strings, got {item!r:.80}")
            checked.append((item[0], item[1]))
        if not checked:
            return []
        return self._backend.verify_many(checked, progress)

    def close(self) -> None:
        self._closed = True
        self._backend.close()

    def __enter__(self) -> "LeanVerifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten verifier must not leave REPLs holding gigabytes
        try:
            if not self._closed:
                self._backend.close()
        except Exception:
            pass

