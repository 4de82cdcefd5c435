"""The http backend: a Kimina Lean Server (project-numina/kimina-lean-server).

`POST {url}/verify` with `{"codes": [{"custom_id", "proof"}], "timeout", "infotree_type",
"disable_cache"}`, answered `{"results": [{"custom_id", "error", "response"}]}` where
`response` is the REPL's own answer, so both backends are judged by the same `judge`.
Proofs travel in batches of `batch_size`, up to `workers` requests in flight.
"""

from __future__ import annotations

import json
import math
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

from lmlab.errors import UserError
from lmlab.eval.lean.verdict import DOCS, LeanConfig, Progress, Verdict, failed, one_line, verdict_of


class HttpBackend:
    """Sends proofs to a Kimina Lean Server and judges its answers."""

    def __init__(self, cfg: LeanConfig):
        self.cfg = cfg
        url = cfg.url.rstrip("/")
        self.endpoint = url if url.endswith("/verify") else url + "/verify"

    def verify_many(self, items: Sequence[tuple[str, str]], progress: Optional[Progress]) -> list[Verdict]:
        n = len(items)
        results: list[Optional[Verdict]] = [None] * n
        size = self.cfg.batch_size
        batches = [list(range(s, min(s + size, n))) for s in range(0, n, size)]
        done = 0
        with ThreadPoolExecutor(max_workers=max(1, min(self.cfg.workers, len(batches)))) as pool:
            futures = [pool.submit(self._batch, [(i, items[i]) for i in b]) for b in batches]
            try:
                for fut in futures:  # in order; progress comes per finished batch
                    verdicts = fut.result()
                    for i, verdict in verdicts:
                        results[i] = verdict
                    done += len(verdicts)
                    if progress is not None:
                        progress(done, n)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return results  # type: ignore[return-value]

    def _batch(self, batch: list[tuple[int, tuple[str, str]]]) -> list[tuple[int, Verdict]]:
        # The server splits the imports off the code itself and reuses REPLs that have the same
        # header, so header and body travel as one file.
        codes = [{"custom_id": str(i), "proof": (h + "\n\n" + b) if h.strip() else b} for i, (h, b) in batch]
        start = time.monotonic()
        answer, error = self._post(codes)
        wall = time.monotonic() - start
        if error is not None:
            return [(i, failed(error, wall)) for i, _ in batch]
        by_id = {}
        for r in answer.get("results") or []:
            if isinstance(r, dict):
                by_id[str(r.get("custom_id"))] = r
        out = []
        for i, _ in batch:
            r = by_id.get(str(i))
            out.append((i, self._result_verdict(r, wall)))
        return out

    @staticmethod
    def _result_verdict(result: Optional[dict], wall: float) -> Verdict:
        if result is None:
            return failed("malformed output: the server returned no result for this proof", wall)
        response = result.get("response")
        t = response.get("time") if isinstance(response, dict) else None
        time_s = float(t) if isinstance(t, (int, float)) else wall
        if result.get("error"):
            err = str(result["error"])
            kind = "timeout" if "timed out" in err else "server error"
            return failed(f"{kind}: {one_line(err)}", time_s)
        if not isinstance(response, dict):
            return failed("malformed output: the server's result has neither `response` nor `error`", time_s)
        return verdict_of(response, time_s)

    def _post(self, codes: list[dict]) -> tuple[dict, Optional[str]]:
        """(answer, None), or ({}, error in words) for a failure that costs only this batch."""
        cfg = self.cfg
        body = json.dumps({"codes": codes, "timeout": max(1, math.ceil(cfg.timeout_s)),
                           "infotree_type": None, "disable_cache": False}).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if cfg.api_key:
            headers["Authorization"] = f"Bearer {cfg.api_key}"  # what kimina-lean-server's auth reads
        req = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        # A socket timeout, not a deadline for the whole request: the server may run the batch
        # one proof at a time, so allow each proof its timeout, plus slack for the transfer.
        wait = cfg.timeout_s * len(codes) + 30
        try:
            with urllib.request.urlopen(req, timeout=wait) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = one_line(e.read().decode("utf-8", "replace"), 200)
            if e.code in (401, 403):
                raise UserError(f"the Lean server at {self.endpoint} refused the API key (HTTP {e.code}: {detail}): "
                                f"set LeanConfig.api_key to the server's LEAN_SERVER_API_KEY ({DOCS})") from None
            if e.code in (404, 405):
                raise UserError(f"{self.endpoint} has no POST /verify (HTTP {e.code}): LeanConfig.url must point at a "
                                f"Kimina Lean Server ({DOCS})") from None
            return {}, f"http error {e.code}: {detail}"
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                return {}, f"timeout: the Lean server gave no answer within {wait:g} s"
            raise UserError(f"cannot reach the Lean server at {self.endpoint} ({e.reason}): start kimina-lean-server "
                            f"there or fix LeanConfig.url ({DOCS})") from None
        except (TimeoutError, socket.timeout):
            return {}, f"timeout: the Lean server gave no answer within {wait:g} s"
        except (ConnectionError, OSError) as e:
            return {}, f"http error: the connection to the Lean server failed ({e})"
        try:
            answer = json.loads(raw.decode("utf-8"))
        except ValueError:
            return {}, f"malformed output: the server answered {one_line(raw.decode('utf-8', 'replace'), 200)!r}"
        if not isinstance(answer, dict):
            return {}, "malformed output: the server's answer is not a JSON object"
        return answer, None

    def close(self) -> None:
        pass

