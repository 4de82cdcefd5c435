"""scripts/gpu_checks.py's own logic (the GPU measurements themselves need a GPU; `--smoke` runs
them on the CPU by hand, docs/hardware.md): each command under its limit and the budget, a
failure or a hang costing only its own check, and the summary every check ends up in."""

from __future__ import annotations

import importlib.util
import json
import sys

from conftest import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("gpu_checks", ROOT / "scripts" / "gpu_checks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_failure_a_hang_and_a_spent_budget_cost_only_their_check(tmp_path):
    g = _module()
    run = g.Runner(tmp_path, budget=60, env={})
    ok = run.sh("ok", [sys.executable, "-c", "print('fine')"], 30)
    assert ok is not None and ok.stdout.strip() == "fine" and run.results["ok"]["status"] == "ok"
    assert run.sh("bad", [sys.executable, "-c", "raise SystemExit('no GPU here')"], 30) is None
    assert run.results["bad"]["status"] == "exit 1" and run.results["bad"]["error"] == "no GPU here"
    # a limit of 1 s: the hang is stopped there
    assert run.sh("hang", [sys.executable, "-c", "import time; time.sleep(30)"], 1) is None
    assert run.results["hang"]["status"].startswith("timed out")
    run.deadline = g.time.monotonic() + 5  # under 20 s left: the next check is not started
    assert run.sh("late", [sys.executable, "-c", "pass"], 30) is None
    assert run.results["late"]["status"] == "skipped: the budget is spent"
    run.save()
    assert set(json.loads((tmp_path / "results.json").read_text())) == {"ok", "bad", "hang", "late"}
    log = (tmp_path / "checks.log").read_text()
    assert "=== ok" in log and "fine" in log and "=== hang: timed out" in log

    run.results["probe"] = {"status": "ok", "gpu": "H200"}
    run.results["bench-x"] = {"status": "ok", "seconds": 2.0, "figures": {"ratio": 3.0}, "printed": ["a table"]}
    md = g.summary(run.results)
    assert '"gpu": "H200"' in md and "| bad | exit 1 |" in md and "| late | skipped" in md
    assert "bench-x:\n```\na table\n```" in md and "ratio" not in md  # printed tables, not raw figures
