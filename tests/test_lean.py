"""lmlab.eval.lean against tests/lean_standin.py, a stand-in that speaks the Lean REPL's JSON
protocol (it is not Lean); the real `lake env repl` runs only where Lean is installed."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lmlab.errors import UserError
from lmlab.eval.lean import LeanConfig, LeanVerifier, Verdict, judge, memory_limit

STANDIN = Path(__file__).with_name("lean_standin.py")
HEADER = "import Mathlib\nimport Aesop\nset_option maxHeartbeats 400000"
GOOD = "theorem t (n : ℕ) : n + 0 = n := by\n  simp"
SORRY = "theorem s : 1 + 1 = 2 := by\n  sorry"
BAD = "theorem e : 1 + 1 = 2 := by\n  exact ERROR"


def _standin_module():
    spec = importlib.util.spec_from_file_location("lean_standin", STANDIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def standin_cfg(tmp_path: Path, *args: str, wrap_in_sh: bool = False, **kw) -> LeanConfig:
    command = [sys.executable, str(STANDIN), "--log", str(tmp_path / "standin.log"), *args]
    if wrap_in_sh:  # a parent that stays around, as `lake env` does: a kill must reach the whole group
        command = ["sh", "-c", '"$@"; exit $?', "sh", *command]
    opts = dict(project=str(tmp_path), command=command, workers=1, timeout_s=1.0, header_timeout_s=10.0,
                memory_mb=0)
    opts.update(kw)
    return LeanConfig(**opts)


def logged(tmp_path: Path) -> list[dict]:
    p = tmp_path / "standin.log"
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()] if p.exists() else []


def header_commands(tmp_path: Path, header: str = HEADER) -> int:
    return sum(1 for r in logged(tmp_path) if r.get("cmd") == header and "env" not in r)


# --- judge on answers shaped like the REPL's (README.md and test/*.expected.out) -------------

POS = {"line": 1, "column": 8}
END = {"line": 1, "column": 18}
JUDGED = [
    ({"env": 0}, True, "ok"),
    ({"messages": [{"severity": "info", "pos": {"line": 1, "column": 0}, "endPos": {"line": 1, "column": 6},
                    "data": "rfl : f = f"}], "env": 1}, True, "ok"),
    ({"messages": [{"severity": "warning", "pos": POS, "endPos": END,
                    "data": "unused variable `h`\n\nNote: This linter can be disabled with "
                            "`set_option linter.unusedVariables false`"}], "env": 2}, True, "ok"),
    ({"messages": [{"severity": "error", "pos": {"line": 1, "column": 23}, "endPos": {"line": 1, "column": 26},
                    "data": "type mismatch\n  rfl\nhas type\n  f = f : Prop\nbut is expected to have type\n"
                            "  f = 2 : Prop"}], "env": 6}, False, "type mismatch"),
    ({"sorries": [{"proofState": 0, "pos": {"line": 1, "column": 43}, "goal": "x : Nat\n⊢ x = x",
                   "endPos": {"line": 1, "column": 48}}],
      "messages": [{"severity": "warning", "pos": POS, "endPos": END, "data": "declaration uses `sorry`"}],
      "env": 0}, False, "sorry"),
    ({"sorries": [{"proofState": 0, "goal": "⊢ Nat"}], "env": 3}, False, "sorry"),
    ({"messages": [{"severity": "warning", "pos": POS, "endPos": END, "data": "declaration uses 'sorry'"}],
      "env": 4}, False, "sorry"),
    ({"message": "Unknown environment."}, False, "REPL error: Unknown environment."),
]


@pytest.mark.parametrize("response,ok,reason", JUDGED)
def test_judge(response, ok, reason):
    got_ok, got_reason = judge(response)
    assert got_ok is ok
    assert reason in got_reason


def test_judge_error_names_the_place_and_malformed_input():
    ok, reason = judge(JUDGED[3][0])
    assert not ok and "line 1, column 23" in reason and "\n" not in reason
    assert judge([1, 2]) == (False, "malformed response: expected a JSON object, got list")
    assert not judge({"env": 0, "messages": "oops"})[0]


# --- the repl backend on the stand-in ---------------------------------------------------------


def test_valid_sorry_and_error_proofs(tmp_path):
    with LeanVerifier(standin_cfg(tmp_path)) as lean:
        good, sorry, bad = lean.verify_many([(HEADER, GOOD), (HEADER, SORRY), (HEADER, BAD)])
    assert isinstance(good, Verdict)
    assert good.ok and good.error is None and good.reason == "ok" and good.messages == [] and good.time_s >= 0
    assert not sorry.ok and sorry.error is None and "sorry" in sorry.reason
    assert [m["data"] for m in sorry.messages] == ["declaration uses `sorry`"]
    assert not bad.ok and bad.error is None and "unknown identifier 'ERROR'" in bad.reason
    assert bad.messages[0]["severity"] == "error" and bad.messages[0]["pos"] == {"line": 2, "column": 8}


def test_header_elaborated_once_per_process_and_reused(tmp_path):
    other = "import Mathlib"
    with LeanVerifier(standin_cfg(tmp_path)) as lean:
        for _ in range(4):
            assert lean.verify(HEADER, GOOD).ok
        assert lean.verify(other, GOOD).ok
        assert lean.verify(HEADER, GOOD).ok
        assert lean.verify("", GOOD).ok  # no header: a fresh environment, no env sent
    assert header_commands(tmp_path) == 1 and header_commands(tmp_path, other) == 1
    requests = [r for r in logged(tmp_path) if "cmd" in r]
    header_env = requests.index({"cmd": HEADER})  # the stand-in numbers environments in arrival order
    proofs = [r for r in requests if r["cmd"] == GOOD]
    assert [r.get("env") for r in proofs] == [header_env] * 4 + [5] + [header_env] + [None]


def test_pool_of_two_keeps_order(tmp_path):
    bodies = [GOOD, SORRY, BAD, GOOD + "\n-- STANDIN_SLOW", GOOD, BAD, SORRY + "\n-- STANDIN_SLOW", GOOD]
    expect = [True, False, False, True, True, False, False, True]
    seen = []
    cfg = standin_cfg(tmp_path, workers=2)
    with LeanVerifier(cfg) as lean:
        out = lean.verify_many([(HEADER, b) for b in bodies], progress=lambda done, total: seen.append((done, total)))
        procs = lean.processes
        assert [p.starts for p in procs] == [1, 1]
    assert [v.ok for v in out] == expect
    assert seen == [(k, 8) for k in range(1, 9)]
    assert len({r["standin_start"] for r in logged(tmp_path) if "standin_start" in r}) == 2
    assert header_commands(tmp_path) == 2  # once in each process
    assert not any(p.alive for p in procs)  # the context manager closed them
    with pytest.raises(RuntimeError, match="closed"):
        lean.verify(HEADER, GOOD)


def _gone_or_zombie(pid: int, wait_s: float = 3.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return True
        time.sleep(0.05)
    return False


def test_crash_hang_and_garbage_fail_in_words_and_the_next_proof_succeeds(tmp_path):
    cfg = standin_cfg(tmp_path, wrap_in_sh=True)
    with LeanVerifier(cfg) as lean:
        crash = lean.verify(HEADER, GOOD + "\n-- STANDIN_CRASH")
        assert not crash.ok and crash.error.startswith("crash: the REPL exited with code 1 without answering")
        assert "crash requested" in crash.error  # the tail of stderr
        assert lean.verify(HEADER, GOOD).ok

        pids = [r["standin_start"] for r in logged(tmp_path) if "standin_start" in r]
        t0 = time.monotonic()
        hang = lean.verify(HEADER, GOOD + "\n-- STANDIN_HANG")
        assert 0.9 < time.monotonic() - t0 < 5
        assert not hang.ok and hang.error.startswith("timeout: Lean gave no answer within 1 s")
        assert hang.reason == hang.error and hang.messages == []
        assert _gone_or_zombie(pids[-1])  # killed through the group, past the `sh` parent
        assert lean.verify(HEADER, GOOD).ok

        garbage = lean.verify(HEADER, GOOD + "\n-- STANDIN_GARBAGE")
        assert not garbage.ok and garbage.error.startswith("malformed output:") and "not a JSON" in garbage.error
        after = lean.verify(HEADER, SORRY)
        assert not after.ok and after.error is None and "sorry" in after.reason  # judged again
        assert lean.processes[0].starts == 4
    assert header_commands(tmp_path) == 4  # elaborated again after each restart


def test_unknown_environment_is_an_error_and_the_header_is_elaborated_again(tmp_path):
    with LeanVerifier(standin_cfg(tmp_path)) as lean:
        assert lean.verify(HEADER, GOOD).ok
        lost = lean.verify(HEADER, GOOD + "\n-- STANDIN_FORGET")
        assert not lost.ok and lost.error == "REPL error: Unknown environment."
        assert lean.verify(HEADER, GOOD).ok
        assert lean.processes[0].starts == 1  # the process was fine; only its env was gone
    assert header_commands(tmp_path) == 2


def test_failures_inside_verify_many_do_not_stop_the_run(tmp_path):
    bodies = [GOOD, GOOD + "\n-- STANDIN_CRASH", GOOD, GOOD + "\n-- STANDIN_GARBAGE", GOOD]
    with LeanVerifier(standin_cfg(tmp_path)) as lean:
        out = lean.verify_many([(HEADER, b) for b in bodies])
    assert [v.ok for v in out] == [True, False, True, False, True]
    assert out[1].error.startswith("crash") and out[3].error.startswith("malformed output")


def _reported_rlimit(verdict: Verdict) -> int:
    (m,) = [m for m in verdict.messages if m["data"].startswith("RLIMIT_AS")]
    return int(m["data"].split()[1].split("=")[1])


def test_memory_cap_applies_to_the_repl_process(tmp_path):
    import resource

    body = GOOD + "\n-- STANDIN_RLIMIT"
    with LeanVerifier(standin_cfg(tmp_path, memory_mb=1024)) as lean:
        v = lean.verify(HEADER, body)
    assert v.ok  # info messages do not fail a proof
    assert _reported_rlimit(v) == 1024 * 1024 * 1024
    with LeanVerifier(standin_cfg(tmp_path, memory_mb=0)) as lean:
        soft = _reported_rlimit(lean.verify(HEADER, body))
    own = resource.getrlimit(resource.RLIMIT_AS)[0]
    assert soft == (-1 if own == resource.RLIM_INFINITY else own)  # no cap: inherited unchanged
    assert memory_limit(0) is None and callable(memory_limit(64))


def test_missing_command_says_to_install_lean_and_the_repl(tmp_path):
    with pytest.raises(UserError) as e:
        LeanVerifier(LeanConfig(project=str(tmp_path), command=["no-such-lean-repl-xyz", "env", "repl"]))
    msg = str(e.value)
    assert "'no-such-lean-repl-xyz' was not found" in msg and "leanprover-community/repl" in msg
    assert "elan" in msg and "LeanConfig.command" in msg
    with pytest.raises(UserError, match="'.lake/build/bin/repl' was not found"):
        LeanVerifier(LeanConfig(project=str(tmp_path), command=[".lake/build/bin/repl"]))
    if shutil.which("lake") is None:
        with pytest.raises(UserError, match="'lake' was not found"):
            LeanVerifier(LeanConfig(project=str(tmp_path)))  # the default command


def test_missing_project_dir(tmp_path):
    with pytest.raises(UserError) as e:
        LeanVerifier(standin_cfg(tmp_path, project=str(tmp_path / "nope")))
    assert "nope does not exist" in str(e.value) and "LeanConfig.project" in str(e.value)
    with pytest.raises(UserError, match="LeanConfig.project is not set"):
        LeanVerifier(standin_cfg(tmp_path, project=None))


def test_header_that_does_not_elaborate_shows_the_first_error(tmp_path):
    with LeanVerifier(standin_cfg(tmp_path)) as lean:
        with pytest.raises(UserError) as e:
            lean.verify("import Mathlib\nimport MissingLib.Foo", GOOD)
        assert "does not elaborate" in str(e.value) and "unknown module prefix 'MissingLib'" in str(e.value)
        with pytest.raises(UserError, match="does not elaborate"):
            lean.verify_many([(HEADER, GOOD), ("import MissingLib", GOOD)])
        assert lean.verify(HEADER, GOOD).ok  # the verifier is still usable


def test_repl_that_exits_at_start_shows_its_stderr(tmp_path):
    with LeanVerifier(standin_cfg(tmp_path, "--mode", "exit-at-start")) as lean:
        with pytest.raises(UserError) as e:
            lean.verify(HEADER, GOOD)
        assert "could not be elaborated" in str(e.value) and "unknown executable repl" in str(e.value)
        v = lean.verify("", GOOD)  # without a header the failure is the proof's
        assert not v.ok and v.error.startswith("crash:") and "unknown executable repl" in v.error


def test_items_must_be_pairs_of_strings(tmp_path):
    with LeanVerifier(standin_cfg(tmp_path)) as lean:
        assert lean.verify_many([]) == []
        with pytest.raises(TypeError, match="item 1"):
            lean.verify_many([(HEADER, GOOD), (HEADER,)])


# --- the http backend against a local server in the Kimina shape -----------------------------


class _Kimina(BaseHTTPRequestHandler):
    """POST /verify as kimina-lean-server answers it, each code checked by the stand-in's rules."""

    requests: list = []
    api_key = None

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if self.path != "/verify":
            return self._send(404, {"detail": "Not Found"})
        if self.api_key and self.headers.get("Authorization", "").removeprefix("Bearer ").strip() != self.api_key:
            return self._send(401, {"detail": "Invalid API key"})
        standin = _standin_module().StandIn
        results = []
        for code in body["codes"]:
            if "STANDIN_HANG" in code["proof"]:
                results.append({"custom_id": code["custom_id"],
                                "error": f"Lean REPL command timed out in {body['timeout']} seconds"})
                continue
            response = standin().respond({"cmd": code["proof"]})
            response["time"] = 0.25
            results.append({"custom_id": code["custom_id"], "response": response})
        self._send(200, {"results": results[::-1]})  # any order: the client maps by custom_id

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def kimina():
    _Kimina.requests = []
    _Kimina.api_key = None
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Kimina)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_backend(kimina):
    _Kimina.api_key = "sekrit"
    cfg = LeanConfig(backend="http", url=kimina, api_key="sekrit", timeout_s=7, batch_size=2, workers=2)
    bodies = [GOOD, SORRY, BAD, GOOD + "\n-- STANDIN_HANG", GOOD]
    seen = []
    with LeanVerifier(cfg) as lean:
        out = lean.verify_many([(HEADER, b) for b in bodies], progress=lambda d, t: seen.append((d, t)))
        one = lean.verify(HEADER, GOOD)
    assert [v.ok for v in out] == [True, False, False, False, True] and one.ok
    assert out[0].time_s == 0.25 and out[0].error is None
    assert "sorry" in out[1].reason and "unknown identifier 'ERROR'" in out[2].reason
    assert out[3].error == "timeout: Lean REPL command timed out in 7 seconds"
    assert seen == [(2, 5), (4, 5), (5, 5)]
    first = _Kimina.requests[0]
    assert first["path"] == "/verify" and first["auth"] == "Bearer sekrit"
    assert first["body"]["timeout"] == 7 and first["body"]["disable_cache"] is False
    assert "infotree_type" in first["body"]
    ids = sorted(c["custom_id"] for r in _Kimina.requests[:3] for c in r["body"]["codes"])
    assert ids == ["0", "1", "2", "3", "4"]
    assert {c["proof"] for r in _Kimina.requests for c in r["body"]["codes"]} >= {HEADER + "\n\n" + GOOD}


def test_http_errors_are_user_errors(kimina):
    _Kimina.api_key = "sekrit"
    with LeanVerifier(LeanConfig(backend="http", url=kimina, api_key="wrong")) as lean:
        with pytest.raises(UserError, match="refused the API key"):
            lean.verify(HEADER, GOOD)
    with LeanVerifier(LeanConfig(backend="http", url=kimina + "/elsewhere", api_key="sekrit")) as lean:
        with pytest.raises(UserError, match="has no POST /verify"):
            lean.verify(HEADER, GOOD)
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with LeanVerifier(LeanConfig(backend="http", url=f"http://127.0.0.1:{port}")) as lean:
        with pytest.raises(UserError) as e:
            lean.verify(HEADER, GOOD)
    assert "cannot reach the Lean server" in str(e.value) and "LeanConfig.url" in str(e.value)


# --- the real thing, where it is installed ---------------------------------------------------


@pytest.mark.skipif(shutil.which("lake") is None, reason="Lean 4 is not installed here (no `lake` on PATH)")
def test_real_lake_env_repl():
    project = os.environ.get("LMLAB_LEAN_PROJECT")
    if not project:
        pytest.skip("set LMLAB_LEAN_PROJECT to a Lean project where `lake env repl` starts the REPL")
    command = json.loads(os.environ.get("LMLAB_LEAN_COMMAND", '["lake", "env", "repl"]'))
    cfg = LeanConfig(project=project, command=command, workers=2, timeout_s=120, header_timeout_s=900)
    with LeanVerifier(cfg) as lean:
        good, sorry, bad = lean.verify_many([
            ("", "theorem t : 1 + 1 = 2 := by decide"),
            ("", "theorem s (n : Nat) : n + 0 = n := by\n  sorry"),
            ("", "theorem e : 1 + 1 = 3 := by decide"),
        ])
    assert good.ok, good
    assert not sorry.ok and sorry.error is None and "sorry" in sorry.reason
    assert not bad.ok and bad.error is None and bad.reason.startswith("Lean error")
