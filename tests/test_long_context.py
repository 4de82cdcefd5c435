"""The long-context eval section (lmlab.eval.long_context) end to end: `lmlab eval long_context=...`
on the micro pipeline's model reads its val tokens 3x past the context in the three modes,
the numbers agree with a direct computation, and the report gets the section and its plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import build_micro_pipeline

from lmlab.cli import main


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return build_micro_pipeline(tmp_path_factory.mktemp("lc"))


def test_eval_section_and_report(pipe, capsys):
    root = pipe["root"]
    assert main(["eval", str(pipe["model"]), f"out={root / 'eval'}", "max_new_tokens=0", "max_batches=2",
                 "long_context=[{factor: 3, chunk: 4, stride: 8, buckets: 6}]"]) == 0
    assert "long context" in capsys.readouterr().out
    ev = json.loads((root / "eval" / "eval.json").read_text())
    (lc,) = ev["long_context"]
    assert lc["context"] == 64 and lc["tokens"] == 192 and set(lc["modes"]) == {"sinks", "window", "dense"}
    for m in lc["modes"].values():
        assert len(m["curve"]) == 6 and math.isclose(m["perplexity"], math.exp(m["loss"]))
        assert 0 < m["loss"] < 10
    # the dense mode's first context is plain next-token loss over the first window
    from lmlab.models import load_model
    model, _, _ = load_model(pipe["model"])
    from lmlab.data.loader import PackedDataset
    ids = torch.as_tensor(PackedDataset(pipe["packed"], "val").rows(np.arange(4)).reshape(-1)[:192].astype(np.int64))
    with torch.no_grad():
        logits, _ = model(ids[:64][None])
        first = torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:64], reduction="none")
    edges = lc["bucket_edges"]
    assert edges[1] <= 63
    assert lc["modes"]["dense"]["curve"][0] == pytest.approx(float(first[:edges[1]].mean()), abs=1e-4)
    assert lc["modes"]["sinks"]["curve"][0] == pytest.approx(lc["modes"]["dense"]["curve"][0], abs=1e-4)

    assert main(["report", f"root={root}", f"out={root / 'report'}"]) == 0
    text = (root / "report" / "report.md").read_text()
    assert "## Reading past the context" in text and "attention sinks" in text
    assert (root / "report" / "long_context_0.png").stat().st_size > 1000


def test_a_learned_sink_model_beside_the_plain_one_gets_a_compared_plot(pipe, capsys):
    root = pipe["root"]
    sink_dir = root / "model_sink"
    assert main(["pretrain", f"data={pipe['packed']}", f"out={sink_dir}", "model.preset=micro", "model.max_seq_len=64",
                 "model.attn_sink=true", "train.steps=4", "train.batch_size=4", "train.device=cpu",
                 "eval.every=0", "checkpoint.every=0"]) == 0
    spec = "long_context=[{factor: 3, chunk: 4, stride: 8, buckets: 6}]"
    for model, out in ((pipe["model"], root / "eval_cmp"), (sink_dir, root / "eval_cmp_sink")):
        assert main(["eval", str(model), f"out={out}", "max_new_tokens=0", "max_batches=2", spec]) == 0
    assert main(["report", f"inputs=[{root / 'eval_cmp'}, {root / 'eval_cmp_sink'}]", "follow_inputs=true",
                 f"out={root / 'report_cmp'}"]) == 0
    text = (root / "report_cmp" / "report.md").read_text()
    assert "**Base, learned sink**" in text and "**Base**" in text and "**The models compared**" in text
    assert (root / "report_cmp" / "long_context_compared_0.png").stat().st_size > 1000


def test_a_text_too_short_is_refused_before_scoring(pipe, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    assert main(["eval", str(pipe["model"]), f"out={tmp_path / 'e'}", "max_new_tokens=0", "packed_default=false",
                 f"long_context=[{{path: {short}}}]"]) == 2
    err = capsys.readouterr().err
    assert "fewer than factor x context" in err and "Traceback" not in err


@torch.no_grad()
def test_a_recurrent_family_reads_in_one_stream():
    from lmlab.eval.long_context import LongContextSpec, score_long_context
    from lmlab.models.family import build_model

    model = build_model({"family": "griffin", "preset": "micro", "vocab_size": 50, "width": 32, "num_heads": 4,
                         "mlp_expanded_width": 48, "attention_window_size": 8, "max_seq_len": 16}).eval()
    ids = np.random.default_rng(0).integers(0, 50, 80)
    res = score_long_context(model, ids, LongContextSpec(chunk=5, buckets=4), "cpu")
    assert set(res["modes"]) == {"native"} and len(res["modes"]["native"]["curve"]) == 4
    full, _ = model(torch.as_tensor(ids)[None])  # one stream equals the whole text in one forward
    want = torch.nn.functional.cross_entropy(full[0, :-1], torch.as_tensor(ids[1:]))
    assert res["modes"]["native"]["loss"] == pytest.approx(float(want), abs=1e-4)
