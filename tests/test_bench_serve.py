"""`lmlab bench serve` end to end: the real server in a subprocess on a random micro model, two
concurrency levels and the one-at-a-time baseline; the JSON holds the figures (no timing asserts).
With llama-cpp-python's venv present (/work/peers/llamacpp-venv or $LMLAB_LLAMACPP_PYTHON), the
same on llama.cpp's server beside it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("openai", reason="the openai client is part of the dev extra (pip install -e .[dev])")

from serving import random_model_dir  # noqa: E402

from lmlab.bench_serve import LLAMACPP, LLAMACPP_VENV, VLLM  # noqa: E402
from lmlab.cli import main  # noqa: E402

LLAMACPP_PY = Path(os.environ.get("LMLAB_LLAMACPP_PYTHON") or LLAMACPP_VENV)


def _check_rows(rows: dict, tokens_per_s: dict) -> None:
    assert set(rows) == {"1", "2"}
    for c, row in rows.items():
        assert row["tokens_per_s"] > 0 and row["requests_per_s"] > 0 and row["ratio"] > 0
        assert tokens_per_s[c] == row["tokens_per_s"]
        assert 1 <= row["streams_at_once"] <= int(c) + 1
        for name in ("ttft_s", "itl_s", "tpot_s", "total_s"):
            assert 0 <= row[name]["p50"] <= row[name]["p99"], (c, name, row[name])


def test_bench_serve_figures(tmp_path):
    run_dir = random_model_dir(tmp_path / "models", "transformer", context=256)
    out = tmp_path / "serve.json"
    out.write_text(json.dumps({"what": "serve", "tokens_per_s": {}}))  # an earlier result: replaced
    main(["bench", "serve", f"model={run_dir}", "concurrency=[1, 2]", "requests=4", "max_new_tokens=8",
          "prompt_len=12", "llamacpp_python=none", "vllm_python=none", f"out={out}"])
    res = json.loads(out.read_text())
    assert res["what"] == "serve" and res["family"] == "transformer" and res["params"] > 0
    assert len(res["baseline_runs_tokens_per_s"]) == 2
    assert res["ratio"]["1"] == pytest.approx(1.0)
    _check_rows(res["rows"], res["tokens_per_s"])
    assert 1 <= res["server_peak_batch"] <= 2
    assert res["peers"] == {}
    assert set(res["not_measured"]) == {VLLM, LLAMACPP}
    assert all("turned off" in why for why in res["not_measured"].values())


@pytest.mark.skipif(not LLAMACPP_PY.is_file(), reason=f"llama-cpp-python's venv is absent ({LLAMACPP_PY}; "
                    "$LMLAB_LLAMACPP_PYTHON points at another)")
def test_bench_serve_llamacpp_peer(tmp_path):
    run_dir = random_model_dir(tmp_path / "models", "transformer", context=256)
    out = tmp_path / "serve.json"
    main(["bench", "serve", f"model={run_dir}", "concurrency=[1, 2]", "requests=4", "max_new_tokens=8",
          "prompt_len=12", f"llamacpp_python={LLAMACPP_PY}", "vllm_python=none", "threads=2", f"out={out}"])
    res = json.loads(out.read_text())
    assert LLAMACPP not in res["not_measured"], res["not_measured"]
    peer = res["peers"][LLAMACPP]
    _check_rows(peer["rows"], peer["tokens_per_s"])
    assert peer["prompts_same_tokens"] == 4 and peer["version"]
    for c, ratio in peer["lmlab_over_peer"].items():
        assert ratio > 0 and ratio == pytest.approx(res["tokens_per_s"][c] / peer["tokens_per_s"][c])
    # lmlab ran before and after the peer at each level: 1, llama.cpp at 1, 1, 2, llama.cpp at 2, 2, 1
    assert len(res["baseline_runs_tokens_per_s"]) == 3 and len(res["rows"]["2"]["runs_tokens_per_s"]) == 2
