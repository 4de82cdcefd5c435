"""The code sandbox and the code reward: hostile programs fail, the caller survives, nothing leaks.

Each behaviour is checked with every layer on ("full", skipped where this machine has no
namespaces) and with the in-process layers alone ("hook": audit hook, rlimits, supervisor),
which must already stop stray writes and sockets. Some tests also switch the hook off to
show that the OS layers (namespaces, read-only mounts, the own uid) hold by themselves.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time
import uuid

import pytest

from lmlab.errors import UserError
from lmlab.rewards import sandbox
from lmlab.rewards.code import build_program, code_reward, extract_program, read_code_problems, self_check
from lmlab.rewards.sandbox import SandboxLimits, isolation, run_python

QUICK = SandboxLimits(timeout_s=1.0)


@pytest.fixture(params=["full", "hook"])
def mode(request):
    """os_isolation for run_python: None (every layer found) or False (in-process layers only)."""
    if request.param == "full" and not isolation()["pid_namespace"]:
        pytest.skip(f"no namespaces on this machine: {isolation()['notes']}")
    return None if request.param == "full" else False


def os_only(source: str, limits: SandboxLimits = QUICK, need: str = "pid_namespace"):
    """Run with the OS layers but without the audit hook: what the kernel alone enforces."""
    if not isolation()[need]:
        pytest.skip(f"{need} not available here: {isolation()['notes']}")
    return sandbox._run(source, "", limits, os_isolation=True, audit_hook=False)


def processes_of(work: str) -> list[int]:
    """Live or zombie processes that belong to the sandbox run whose directory is `work`."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if sandbox.MARKER.encode() in cmd and f"work={work}".encode() in cmd:
            found.append(int(d))
    return found


def assert_no_strays(work: str) -> None:
    deadline = time.monotonic() + 2.0
    while processes_of(work) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_of(work) == [], f"processes of {work} outlived the run"
    assert not os.path.exists(work), "the sandbox directory was not removed"


# ----------------------------------------------------------------------------- basics

def test_print_ok_and_isolation_report(mode):
    r = run_python("print(1)", os_isolation=mode)
    assert r.ok and r.returncode == 0 and r.reason == "ok" and not r.timed_out
    assert r.stdout == "1\n" and r.stderr == ""
    assert r.layers["audit_hooks"] and r.layers["rlimits"]
    iso = isolation()
    assert {"network_namespace", "pid_namespace", "mount_namespace", "audit_hooks", "rlimits"} <= set(iso)
    assert iso["audit_hooks"] is True
    if mode is None:
        assert r.layers["pid_namespace"] and r.layers["network_namespace"]


def test_overhead_per_program_is_small(mode):
    run_python("pass", os_isolation=mode)  # warm: the bootstrap is compiled once per process
    times = []
    for _ in range(5):
        t = time.perf_counter()
        assert run_python("print(1)", os_isolation=mode).ok
        times.append(time.perf_counter() - t)
    # The docstring's figure is ~25 ms idle; this bound only catches a regression to seconds.
    assert statistics.median(times) < 0.5, times


def test_syntax_error_and_exceptions_fail(mode):
    r = run_python("def f(:\n    pass\n", os_isolation=mode)
    assert not r.ok and r.reason == "exit 1" and "SyntaxError" in r.stderr
    r = run_python("raise ValueError('boom')", os_isolation=mode)
    assert not r.ok and "ValueError: boom" in r.stderr
    r = run_python("raise SystemExit(3)", os_isolation=mode)
    assert not r.ok and r.returncode == 3 and r.reason == "exit 3"


def test_stdin_env_and_directory(mode):
    r = run_python("import os, sys\nprint(sys.stdin.read().upper())\nprint(os.getcwd())\n"
                   "print(sorted(os.environ))\nprint(os.environ['HOME'] == os.getcwd() == os.environ['TMPDIR'])",
                   stdin="abc", os_isolation=mode)
    assert r.ok, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "ABC"
    assert eval(lines[2]) == ["HOME", "LANG", "LC_ALL", "PATH", "TMPDIR"] and lines[3] == "True"
    assert_no_strays(lines[1])


def test_writing_inside_the_directory_works(mode):
    r = run_python("import os, pathlib\nopen('a.txt', 'w').write('hi')\nos.mkdir('sub')\n"
                   "pathlib.Path('sub/b.txt').write_text(open('a.txt').read() + '!')\nos.rename('a.txt', 'c.txt')\n"
                   "import tempfile\nwith tempfile.NamedTemporaryFile('w') as f: f.write('x')\n"
                   "print(open('sub/b.txt').read(), sorted(os.listdir('.')))", os_isolation=mode)
    assert r.ok, r.stderr
    assert r.stdout.strip() == "hi! ['c.txt', 'main.py', 'sub']"


# ----------------------------------------------------------------------------- runaway programs

def test_infinite_loop_times_out(mode):
    t = time.monotonic()
    r = run_python("while True:\n    pass\n", limits=QUICK, os_isolation=mode)
    assert r.timed_out and not r.ok
    assert r.reason in ("timeout", "cpu")  # cpu_s = ceil(timeout_s): a busy loop meets both limits at once
    assert time.monotonic() - t < QUICK.timeout_s + 1.0


def test_sleeping_program_times_out(mode):
    r = run_python("import time\ntime.sleep(30)", limits=SandboxLimits(timeout_s=0.5), os_isolation=mode)
    assert r.timed_out and r.reason == "timeout" and r.duration_s < 1.5


def test_unbounded_allocation_is_stopped(mode):
    r = run_python("x = []\nwhile True:\n    x.append(' ' * 10**7)\n", limits=SandboxLimits(timeout_s=5, memory_mb=256),
                   os_isolation=mode)
    assert not r.ok and not r.timed_out
    assert r.reason == "memory" or r.reason.startswith("signal"), r.reason


def test_cpu_and_file_size_limits(mode):
    r = run_python("while True:\n    pass\n", limits=SandboxLimits(timeout_s=5, cpu_s=1), os_isolation=mode)
    assert not r.ok and r.timed_out and r.reason == "cpu" and r.duration_s < 3
    r = run_python("open('big', 'wb').write(b'x' * 3 * 2**20)", limits=SandboxLimits(file_size_mb=1), os_isolation=mode)
    assert not r.ok and r.reason == "file size"


def test_fork_bomb_gets_zero_and_leaves_nothing(mode):
    src = "import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    os.fork()\n"
    r = run_python(src, limits=QUICK, os_isolation=mode)
    assert not r.ok and r.reason.startswith("refused: fork")
    assert_no_strays(r.stdout.split()[0])
    assert code_reward(["q"], [f"```python\n{src}```"], tests=["assert True"], limits=QUICK) == [0.0]


def test_fork_bomb_without_the_hook_is_bounded_and_cleaned():
    # The kernel alone: RLIMIT_NPROC of the program's own uid caps it, the pid namespace ends it.
    src = ("import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    try:\n        os.fork()\n"
           "    except OSError:\n        pass\n")
    r = os_only(src, SandboxLimits(timeout_s=1.0, max_processes=4), need="separate_uid")
    assert not r.ok and r.timed_out
    assert_no_strays(r.stdout.split()[0])


DOUBLE_FORK = """import os, sys, time
print(os.getcwd(), flush=True)
if os.fork() == 0:
    if os.fork() == 0:
        {escape}
        time.sleep(30)      # tries to outlive everything
    os._exit(0)
os.wait()
print("parent done", flush=True)
"""


def test_double_fork_child_is_dead_after_the_call():
    if not (isolation()["separate_uid"] or isolation()["user_namespace"]):
        pytest.skip("forking is only allowed where the kernel counts the program's processes")
    r = run_python(DOUBLE_FORK.format(escape="pass"), limits=SandboxLimits(timeout_s=5, max_processes=4))
    assert r.ok, r.stderr
    assert r.stdout.splitlines()[1] == "parent done"
    assert r.duration_s < 3  # the run ends with its main program, not with the sleeper
    assert_no_strays(r.stdout.split()[0])


def test_double_fork_leaving_the_session_dies_with_the_namespace():
    # Without the hook a grandchild can setsid() out of the process group: the pid namespace
    # still kills it when the program (its init) exits.
    r = os_only(DOUBLE_FORK.format(escape="os.setsid()"), SandboxLimits(timeout_s=5, max_processes=4),
                need="separate_uid")
    assert r.ok, r.stderr
    assert_no_strays(r.stdout.split()[0])


def test_fork_refused_by_default_even_when_asked_in_hook_mode():
    r = run_python(DOUBLE_FORK.format(escape="pass"), limits=SandboxLimits(timeout_s=5, max_processes=4),
                   os_isolation=False)
    assert not r.ok and r.reason.startswith("refused: fork")
    assert_no_strays(r.stdout.split()[0])


def test_output_is_capped(mode):
    limits = SandboxLimits(timeout_s=5, max_output_bytes=1000)
    r = run_python("import sys\nsys.stdout.write('x' * 3000)\nsys.stderr.write('y' * 3000)", limits=limits,
                   os_isolation=mode)
    assert r.ok and r.truncated and r.stdout == "x" * 1000 and r.stderr == "y" * 1000
    t = time.monotonic()
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 100000)\n", limits=limits, os_isolation=mode)
    assert not r.ok and r.reason == "output cap" and len(r.stdout) == 1000
    assert time.monotonic() - t < 3


# ----------------------------------------------------------------------------- writes outside

def write_outside_sources(target: str) -> list[str]:
    return [f"open({target!r}, 'w').write('x')",
            f"import os\nfd = os.open({target!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
            f"import pathlib\npathlib.Path({target!r}).write_text('x')",
            f"import os\nos.mkdir({target!r})",
            "import os\nos.symlink('/etc/passwd', 'link')\nopen('link', 'a').write('x')",
            f"import os\nos.chdir('/')\nopen({target.lstrip('/')!r}, 'w').write('x')",
            "import os, os.path\nos.path.realpath = lambda p, **k: os.getcwd() + '/x'\n"
            f"open({target!r}, 'w').write('x')"]


def test_writing_outside_does_nothing_and_scores_zero(mode, tmp_path):
    targets = [f"/tmp/lmlab-sbx-test-{uuid.uuid4().hex}", str(tmp_path / "outside.txt")]
    for target in targets:
        for src in write_outside_sources(target):
            r = run_python(src, os_isolation=mode)
            assert not r.ok, src
            assert not os.path.lexists(target), src
    keep = tmp_path / "keep.txt"
    keep.write_text("data")
    for src in (f"import os\nos.remove({str(keep)!r})", f"import os\nos.rename({str(keep)!r}, 'mine.txt')",
                f"import os\nos.chmod({str(keep)!r}, 0)", f"import os\nos.truncate({str(keep)!r}, 0)"):
        r = run_python(src, os_isolation=mode)
        assert not r.ok, src
        assert keep.read_text() == "data" and (keep.stat().st_mode & 0o777) != 0, src
    # The code reward: the same program with passing tests still scores 0.
    src = f"open({targets[0]!r}, 'w').write('x')\ndef f():\n    return 1\n"
    assert code_reward(["q"], [src], tests=["assert f() == 1"], limits=QUICK) == [0.0]
    assert not os.path.lexists(targets[0])


def test_a_caught_refusal_still_fails(mode, tmp_path):
    target = str(tmp_path / "caught.txt")
    r = run_python(f"try:\n    open({target!r}, 'w')\nexcept PermissionError:\n    pass\nprint('carried on')",
                   os_isolation=mode)
    assert r.stdout == "carried on\n" and r.returncode == 0
    assert not r.ok and r.reason.startswith("refused: opening for writing outside")
    assert not os.path.exists(target)


def test_read_only_filesystem_without_the_hook(tmp_path):
    target = f"/tmp/lmlab-sbx-test-{uuid.uuid4().hex}"
    r = os_only(f"open({target!r}, 'w').write('x')", need="readonly_filesystem")
    assert not r.ok and "Read-only file system" in r.stderr
    assert not os.path.exists(target)
    r = os_only("open('inside.txt', 'w').write('x')\nprint(open('inside.txt').read())", need="readonly_filesystem")
    assert r.ok and r.stdout == "x\n"


def test_bypass_modules_are_refused(mode):
    for src, what in (("import ctypes", "importing ctypes"), ("import subprocess\nsubprocess.run(['true'])",
                                                              "starting another program"),
                      ("import os\nos.system('true')", "starting another program"),
                      ("import os\nos.kill(os.getppid(), 9)", "sending signals"),
                      ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "changing resource"),
                      ("import gc\ngc.get_objects()", "gc.get_objects")):
        r = run_python(src, os_isolation=mode)
        assert not r.ok and r.reason.startswith("refused: " + what), (src, r.reason)


def test_ordinary_stdlib_still_works(mode):
    src = ("import collections, dataclasses, functools, itertools, json, math, re, heapq, threading, signal\n"
           "import subprocess, asyncio, pickle\n"
           "P = collections.namedtuple('P', 'a b', defaults=[0])\n"
           "@dataclasses.dataclass\nclass D:\n    x: int = 1\n"
           "t = threading.Thread(target=lambda: None)\nt.start()\nt.join()\n"
           "print(P(1), D(), pickle.loads(pickle.dumps(D())), json.dumps({'a': math.sqrt(4)}))")
    r = run_python(src, os_isolation=mode)
    assert r.ok, r.stderr
    assert r.stdout.strip() == "P(a=1, b=0) D(x=1) D(x=1) {\"a\": 2.0}"


# ----------------------------------------------------------------------------- network

@pytest.fixture
def server():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    s.settimeout(0.3)
    yield s
    s.close()


def connects(s: socket.socket) -> bool:
    try:
        conn, _ = s.accept()
    except socket.timeout:
        return False
    conn.close()
    return True


def connect_source(port: int) -> str:
    return f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()\nprint('connected')"


def test_socket_cannot_reach_a_listening_server(mode, server):
    r = run_python(connect_source(server.getsockname()[1]), os_isolation=mode)
    assert not r.ok and "connected" not in r.stdout
    assert not connects(server)


def test_network_true_is_a_working_control(server):
    # The same program with network allowed does connect: the refusals above are the sandbox.
    r = run_python(connect_source(server.getsockname()[1]), limits=SandboxLimits(network=True), os_isolation=False)
    assert r.ok and r.stdout == "connected\n", r.stderr
    assert connects(server)


def test_network_namespace_without_the_hook(server):
    r = os_only(connect_source(server.getsockname()[1]), need="network_namespace")
    assert not r.ok and "unreachable" in r.stderr.lower()
    assert not connects(server)


# ----------------------------------------------------------------------------- robustness

def test_sandbox_failure_is_a_result_not_an_exception(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    r = run_python("print(1)", os_isolation=False)
    assert not r.ok and r.reason.startswith("sandbox error")
    assert code_reward(["q"], ["print(1)"], tests=["assert True"], limits=QUICK) == [0.0]


def test_isolation_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(sandbox, "_ISOLATION", None)
    monkeypatch.setenv("LMLAB_SANDBOX_OS_ISOLATION", "0")
    iso = isolation()
    assert not any(iso[k] for k in ("network_namespace", "pid_namespace", "mount_namespace", "separate_uid"))
    assert iso["audit_hooks"] and "LMLAB_SANDBOX_OS_ISOLATION" in iso["notes"][0]
    r = run_python("print(1)")
    assert r.ok and not r.layers["pid_namespace"]


def test_bad_limits_are_user_errors():
    with pytest.raises(UserError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(UserError, match="memory_mb"):
        SandboxLimits(memory_mb="lots")
    assert SandboxLimits(timeout_s=2.5).cpu_s == 3


# ----------------------------------------------------------------------------- code problems

MBPP = [
    {"task_id": 11, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
     "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], "test_setup_code": "",
     "challenge_test_list": ["assert add(10**20, 1) == 10**20 + 1"]},
    {"task_id": 12, "text": "Write a function to find the square root, rounded down.",
     "code": "def isqrt_(n):\n    return math.isqrt(n)", "test_list": ["assert isqrt_(17) == 4"],
     "test_setup_code": "import math"},
]
HUMANEVAL = {
    "task_id": "HumanEval/0", "entry_point": "below_zero",
    "prompt": "from typing import List\n\n\ndef below_zero(ops: List[int]) -> bool:\n"
              "    \"\"\"True when the running balance ever drops below zero.\"\"\"\n",
    "canonical_solution": "    s = 0\n    for op in ops:\n        s += op\n        if s < 0:\n            return True\n"
                          "    return False\n",
    "test": "def check(candidate):\n    assert candidate([1, 2, -4, 5]) is True\n    assert candidate([1, 2]) is False\n",
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_mbpp_and_humaneval_rewards(tmp_path):
    problems = read_code_problems(str(write_jsonl(tmp_path / "p.jsonl", MBPP + [HUMANEVAL])))
    assert [p["kind"] for p in problems] == ["mbpp", "mbpp", "humaneval"]
    assert all(p["task"] == "code" for p in problems)
    add, isqrt, he = problems
    assert "assert add(1, 2) == 3" in add["question"] and add["entry_point"] is None
    assert he["entry_point"] == "below_zero" and he["tests"].rstrip().endswith("check(below_zero)")
    assert self_check(problems) == []

    cases = [  # (problem, completion, expected reward)
        (add, "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.", 1.0),
        (add, "```python\ndef add(a, b):\n    return a - b\n```", 0.0),                  # wrong
        (add, "```python\ndef add(a, b)\n    return a + b\n```", 0.0),                   # does not parse
        (isqrt, "def isqrt_(n):\n    return int(math.sqrt(n))\n", 1.0),                  # setup imports math
        (he, "    return any(sum(ops[:i + 1]) < 0 for i in range(len(ops)))\n", 1.0),   # body continuation
        (he, "```python\ndef below_zero(ops: List[int]) -> bool:\n    return min([0] + [sum(ops[:i + 1]) for i in "
             "range(len(ops))]) < 0\n```", 1.0),                                           # full def, no import
        (he, "    return False\n", 0.0),                                                   # wrong
        (he, "    return (\n", 0.0),                                                       # does not parse
    ]
    rewards = code_reward([p["question"] for p, _, _ in cases], [c for _, c, _ in cases],
                          tests=[p["tests"] for p, _, _ in cases], setup=[p["setup"] for p, _, _ in cases],
                          entry_point=[p["entry_point"] for p, _, _ in cases],
                          question=[p["question"] for p, _, _ in cases], limits={"timeout_s": 5}, workers=4)
    assert rewards == [want for _, _, want in cases]
    # A record that is not a code problem (tests None) is not scored.
    assert code_reward(["q", "q"], ["x", "def f(): pass"], tests=[None, "f()"]) == [None, 1.0]


def test_challenge_tests_and_other_file_types(tmp_path):
    import gzip

    gz = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps(HUMANEVAL) + "\n")
    assert read_code_problems(str(gz))[0]["entry_point"] == "below_zero"
    sanitized = tmp_path / "sanitized-mbpp.json"
    sanitized.write_text(json.dumps([{"task_id": 2, "prompt": "Add.", "code": MBPP[0]["code"],
                                      "test_list": MBPP[0]["test_list"]}]))
    assert read_code_problems(str(sanitized))[0]["question"].startswith("Add.")
    path = write_jsonl(tmp_path / "m.jsonl", MBPP)
    assert "10**20" in read_code_problems(str(path), n=1, challenge=True)[0]["tests"]
    assert len(read_code_problems(str(path), n=1)) == 1


def test_extract_program_rules():
    assert extract_program("x = 1") == "x = 1"
    assert extract_program("Sure!\n```python\na = 1\n```\ntext\n```python\nb = 2\n```") == "a = 1"
    assert extract_program("```\nplain = 1\n```") == "plain = 1"
    assert extract_program("```bash\nls\n```\n```Python3\nc = 3\n```") == "c = 3"   # python beats other tags
    assert extract_program("```bash\nls\n```") == "ls"                                # else the first block
    assert extract_program("```python\ncut = 1\nby the limit") == "cut = 1\nby the limit"  # unterminated
    assert extract_program("    return 1\n") == "    return 1\n"                       # indentation kept
    prompt = "import math\n\ndef f(x):\n    \"\"\"doc\"\"\"\n"
    assert extract_program("    return x\n", prompt=prompt, entry_point="f") == prompt + "    return x\n"
    full = extract_program("```python\ndef f(x):\n    return math.floor(x)\n```", prompt=prompt, entry_point="f")
    assert full.startswith("import math") and full.count("def f(") == 1
    assert extract_program([{"role": "assistant", "content": "```python\nz = 0\n```"}]) == "z = 0"
    assert build_program("def g():\n    return 2", "assert g() == 2", setup="import os") == \
        "import os\n\ndef g():\n    return 2\n\nassert g() == 2\n"


def test_read_code_problems_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(MBPP[0]) + "\n" + json.dumps({"task_id": 3, "test_list": ["assert 1"]}) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: MBPP record without the field 'text'"):
        read_code_problems(str(bad))
    bad.write_text(json.dumps({k: v for k, v in HUMANEVAL.items() if k != "entry_point"}) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:1: HumanEval record without the field 'entry_point'"):
        read_code_problems(str(bad))
    bad.write_text(json.dumps(MBPP[0]) + "\n{not json\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON"):
        read_code_problems(str(bad))
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(UserError, match="neither an MBPP record"):
        read_code_problems(str(bad))
    with pytest.raises(UserError, match="not found"):
        read_code_problems(str(tmp_path / "missing.jsonl"))

    import types

    def offline(*a, **k):  # what datasets raises without a network, without waiting for its retries
        raise ConnectionError("Couldn't reach 'mbpp' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(UserError, match="hf:mbpp: cannot load it.*download the dataset's file"):
        read_code_problems("hf:mbpp")
