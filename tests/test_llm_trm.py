"""LLM-TRM through the real CLI, phase by phase.

Phase 0, a thinking model: the tasks stage writes replies that think first, `lmlab sft
template=think` trains on them, and `lmlab eval` asks the model with its thinking and without
(an empty thinking block closing the prompt). Phase 1, `lmlab compressor`: tied linear
compressors of its hidden states on text and on its own trajectories, against the best linear
map; the maths of lmlab.models.compressor on states with a known spectrum."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_micro_pipeline

from lmlab.cli import main


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return build_micro_pipeline(tmp_path_factory.mktemp("think"), seq_len=257, steps=4)


def test_tasks_sft_and_eval_with_and_without_thinking(pipe, capsys):
    root = pipe["root"]
    assert main(["tasks", f"out={root / 'tasks'}", "thinking=true",
                 "tasks=[{name: arithmetic, difficulty: [1], n_train: 64, n_test: 4, n_fewshot: 0}]"]) == 0
    reply = json.loads((root / "tasks" / "sft_train.jsonl").read_text().splitlines()[0])["messages"][1]
    assert reply["thinking"] and reply["content"].startswith("#### ")
    # chatml has no thinking delimiters: refused in one line, before training
    common = [f"init={pipe['model']}", f"data={root / 'tasks' / 'sft_train.jsonl'}", "seq_len=256", "train.steps=4",
              "train.batch_size=4", "train.device=cpu", "eval.batches=0", "checkpoint.every=0"]
    capsys.readouterr()
    assert main(["sft", *common, f"out={root / 'sft_chatml'}"]) == 2
    err = capsys.readouterr().err
    assert "template=think" in err and "Traceback" not in err
    assert main(["sft", *common, f"out={root / 'sft'}", "template=think"]) == 0
    assert json.loads((root / "sft" / "chat.json").read_text())["template"] == "think"
    gen = f"{{path: {root / 'tasks' / 'test.jsonl'}, n_samples: 0, k: [1], max_new_tokens: 8, batch_size: 4"
    for on in ("true", "false"):
        assert main(["eval", str(root / "sft"), f"out={root / ('eval_' + on)}", "packed_default=false",
                     f"generative=[{gen}, thinking: {on}}}]"]) == 0
    samples = {on: [json.loads(x) for x in (root / f"eval_{on}" / "samples.jsonl").read_text().splitlines()]
               for on in ("true", "false")}
    prompts = {on: [s["prompt"] for s in samples[on] if s.get("kind") == "generative"] for on in samples}
    assert prompts["true"] and all(p.endswith("<|im_start|>assistant\n") for p in prompts["true"])
    assert all(p.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") for p in prompts["false"])
    settings = {on: json.loads((root / f"eval_{on}" / "eval.json").read_text())["generative"][0]["settings"]
                for on in ("true", "false")}
    assert settings["true"]["prompting"] == "chat:think" and settings["false"]["prompting"] == "chat:think, no thinking"


# ----------------------------------------------------------------------------- phase 1: the compressor

def _low_rank(n=4000, d=24, seed=0):
    """States with a known spectrum: a mean far from 0 plus 6 strong and 18 weak directions."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.cat([torch.linspace(5, 2, 6), torch.full((d - 6,), 0.1)])
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return (torch.randn(n, d, generator=g) * scales) @ basis.T + 3.0 * torch.randn(d, generator=g)


def test_subspaces_are_the_svd_optimum_and_training_reaches_it():
    from lmlab.models.compressor import DimensionCompressor, project, reconstruction_metrics, subspace

    x = _low_rank()
    c = DimensionCompressor(24, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(c.weight @ c.weight.T, torch.eye(6), atol=1e-5, rtol=0)  # orthonormal rows
    basis, offset = subspace(x, 6, centre=False)
    _, _, vt = torch.linalg.svd(x.double(), full_matrices=False)  # Eckart-Young: the top right singular vectors
    torch.testing.assert_close(basis @ basis.T, torch.eye(6, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close((basis.T @ basis), vt[:6].T @ vt[:6], atol=1e-8, rtol=0)
    mean = x.double().mean(0)
    opt = reconstruction_metrics(x, project(x, basis, offset), mean)
    pca = reconstruction_metrics(x, project(x, *subspace(x, 6, centre=True)), mean)
    assert pca["variance_explained"] > opt["variance_explained"]  # the mean costs the linear map one direction
    opt_sum = (x.double() - project(x, basis, offset).double()).pow(2).sum()
    opt5 = subspace(x, 5, centre=False)
    assert (x.double() - project(x, *opt5).double()).pow(2).sum() > opt_sum  # fewer directions, more error
    from lmlab.train.compressor import Config, _train

    class Bar:
        def update(self, n):
            pass

    _train(c, x, Config(steps=600, batch_tokens=512, lr=1e-2, warmup_steps=10), "t", lambda _: None, Bar())
    with torch.no_grad():
        got = reconstruction_metrics(x, c(x), mean)
        sse = (x.double() - c(x).double()).pow(2).sum()
    assert sse >= opt_sum * (1 - 1e-6)  # a tied linear map cannot beat the optimum on its own training states
    assert got["variance_explained"] > 0.995 * opt["variance_explained"] and got["cosine"] > 0.99


def test_compressor_stage_on_text_and_the_models_own_thinking(pipe, capsys):
    from lmlab.models.compressor import load_compressor

    root = pipe["root"]
    sft = root / "sft"
    if not (sft / "manifest.json").is_file():
        pytest.skip("needs the phase 0 test's thinking model")
    out = root / "compressor"
    traj = f"trajectories={{problems: {root / 'tasks' / 'test.jsonl'}, n: 2, n_val: 2, max_new_tokens: 12}}"
    common = [str(sft), "tokens=3000", "val_tokens=1000", "steps=150", "lr=1.0e-2", "batch_tokens=256", traj]
    capsys.readouterr()
    assert main(["compressor", *common, f"out={out}", "dims=[8, 16]"]) == 0
    said = capsys.readouterr().out
    assert "of the linear optimum" in said and "trajectories D'=16" in said
    res = json.loads((out / "compression.json").read_text())
    assert res["d"] == 64 and res["dims"] == [8, 16]
    rows = {(r["phase"], r["eval_on"], r["d_prime"], r["method"]): r for r in res["results"]}
    assert len(rows) == 2 * 2 * 2 * 3  # phases x held-out sets x D' x (compressor, optimum, PCA)
    for (phase, kind, k, method), r in rows.items():
        assert 0 < r["cosine"] <= 1 and r["relative_error"] >= 0
    # wider keeps more; the text phase gets close to the optimum of its own kind
    for phase in ("1a_text", "1b_trajectories"):
        for kind in ("text", "trajectories"):
            assert rows[(phase, kind, 16, "compressor")]["mse"] < rows[(phase, kind, 8, "compressor")]["mse"]
    c, opt = rows[("1a_text", "text", 16, "compressor")], rows[("1a_text", "text", 16, "linear_optimum")]
    assert c["variance_explained"] > 0.8 * opt["variance_explained"]
    st = json.loads((out / "manifest.json").read_text())["stats"]
    assert st["trajectories_train"]["trajectories"] == 2 and st["states"]["val_text"] == 1000
    comp, meta = load_compressor(out, 8)
    assert comp.weight.shape == (8, 64) and meta["phases"] == ["1a_text", "1b_trajectories"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {x["phase"] for x in lines} == {"1a_text", "1b_trajectories"}
    # bad input: one line, exit 2, the good run untouched
    good = (out / "manifest.json").read_text()
    assert main(["compressor", *common, f"out={out}", "dims=[8, 128]"]) == 2
    assert "D=64" in capsys.readouterr().err
    assert main(["compressor", str(pipe["model"]), f"out={root / 'c_base'}", traj]) == 2
    err = capsys.readouterr().err
    assert "no thinking delimiters (<think> </think>)" in err and "Traceback" not in err
    assert (out / "manifest.json").read_text() == good
    assert main(["report", f"inputs=[{out}]", "follow_inputs=false", f"out={root / 'report_c'}"]) == 0
    text = (root / "report_c" / "report.md").read_text()
    assert "## Hidden-state compressor" in text and "held-out thinking trajectories" in text
    assert (root / "report_c" / "compressor_cosine.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- phase 2 data: hidden pairs

def test_hidden_pairs_are_the_teacher_forced_states_and_resume_without_redoing_a_chunk(pipe, capsys, monkeypatch):
    from lmlab.infer import engine
    from lmlab.models import load_model
    from lmlab.tasks import hidden_pairs as hp

    root = pipe["root"]
    sft = root / "sft"
    if not (sft / "manifest.json").is_file():
        pytest.skip("needs the phase 0 test's thinking model")
    model, tok, _ = load_model(sft)
    real = engine.complete_ids
    closer = tok.special_tokens["</think>"]

    def thinking_that_closes(m, t, prompts, sampling, stops, *a, **kw):
        """the real engine's tokens, with the thinking closed after 3 of them (a 4-step model rarely closes)"""
        outs = real(m, t, prompts, sampling, stops, *a, **kw)
        for o in outs:
            o.ids = [tok.special_tokens["<think>"]] + o.ids[:3] + [closer] + tok.encode("\n\n#### 4")
            o.text = tok.decode(o.ids)
        return outs

    monkeypatch.setattr(engine, "complete_ids", thinking_that_closes)
    problems = root / "tasks" / "test.jsonl"
    args = [str(sft), f"problems={problems}", "max_problems=4", "chunk_size=2", "max_new_tokens=8", "device=cpu"]
    whole = root / "pairs_whole"
    assert main(["hidden-pairs", *args, f"out={whole}"]) == 0
    records, pre, post, m = hp.load_pairs(whole)
    assert len(records) == 4 and m["stats"]["closed"] == 4 and m["stats"]["d"] == 64
    for r, p in zip(records, pre):
        ids = chat_prompt(tok, r["question"])
        assert r["prompt_len"] == len(ids) and r["thinking_tokens"] == 3 and r["answer"] == "#### 4"
        with torch.no_grad():  # the prompt's states alone, and the state at </think> of the whole sequence
            torch.testing.assert_close(p, model.hidden(torch.tensor([ids]))[0], atol=1e-5, rtol=0)
            full = model.hidden(torch.tensor([ids + r["generated_ids"]]))[0]
        at = len(ids) + r["generated_ids"].index(closer)
        torch.testing.assert_close(post[r["post_row"]], full[at], atol=1e-5, rtol=0)

    # Ctrl-C in the second chunk: the first is kept, the same command does only the second
    calls = []
    real_pairs = hp._pairs_of

    def counted(*a, **kw):
        calls.append(a[4])  # the chunk's first problem index
        if len(calls) == 2 and stop["now"]:
            raise KeyboardInterrupt
        return real_pairs(*a, **kw)

    stop = {"now": True}
    monkeypatch.setattr(hp, "_pairs_of", counted)
    out = root / "pairs_resumed"
    assert main(["hidden-pairs", *args, f"out={out}"]) == 130
    assert "1 of 2 chunks finished" in capsys.readouterr().err
    # another config on the unfinished run: refused, naming the change, the kept chunk untouched
    assert main(["hidden-pairs", *[a for a in args if not a.startswith("max_new")], "max_new_tokens=9",
                 f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert "max_new_tokens 8 -> 9" in err and "Traceback" not in err
    stop["now"], calls[:] = False, []
    assert main(["hidden-pairs", *args, f"out={out}"]) == 0
    assert calls == [2]  # only the second chunk
    for name in ("pairs.safetensors", "pairs.jsonl"):
        assert (out / name).read_bytes() == (whole / name).read_bytes()
    # a model that does not think is refused before any work
    assert main(["hidden-pairs", str(pipe["model"]), f"problems={problems}", f"out={root / 'p_base'}"]) == 2
    assert "no thinking delimiters" in capsys.readouterr().err


def chat_prompt(tok, question):
    from lmlab.infer.prompting import question_prompt

    return question_prompt("think", question, tok)



# ----------------------------------------------------------------------------- phase 2: the SequenceTRM

def test_seqtrm_trains_on_the_pairs_against_its_baselines_and_refuses_another_llms_compressor(pipe, capsys,
                                                                                            monkeypatch):
    from lmlab.infer import engine

    root = pipe["root"]
    sft, comp = root / "sft", root / "compressor"
    if not (sft / "manifest.json").is_file() or not (comp / "manifest.json").is_file():
        pytest.skip("needs the phase 0 and phase 1 tests' models")
    real = engine.complete_ids

    def closes(m, t, prompts, sampling, stops, *a, **kw):  # a 4-step model rarely closes its thinking
        outs = real(m, t, prompts, sampling, stops, *a, **kw)
        for o in outs:
            o.ids = o.ids[:2] + [t.special_tokens["</think>"]]
            o.text = t.decode(o.ids)
        return outs

    monkeypatch.setattr(engine, "complete_ids", closes)
    pairs = root / "pairs_many"
    assert main(["hidden-pairs", str(sft), f"problems={root / 'tasks' / 'sft_train.jsonl'}", "max_problems=16",
                 "chunk_size=8", "max_new_tokens=4", f"out={pairs}", "device=cpu"]) == 2  # not GSM8K-format
    capsys.readouterr()
    src = root / "tasks" / "train.jsonl"
    assert main(["hidden-pairs", str(sft), f"problems={src}", "max_problems=16", "chunk_size=8",
                 "max_new_tokens=4", f"out={pairs}", "device=cpu"]) == 0
    out = root / "seqtrm"
    common = [f"pairs={pairs}", f"compressor={comp}", "dim=8", "val_fraction=0.25", "train.steps=6",
              "train.batch_size=4", "train.device=cpu", "model.n=1", "model.T=2", "model.n_sup=3", "model.heads=2",
              "model.layers=1", "eval.every=3", "checkpoint.every=0"]
    assert main(["seqtrm", *common, f"out={out}"]) == 0
    said = capsys.readouterr()
    assert "baselines: mean target cosine" in said.err and "validation cosine" in said.out
    res = json.loads((out / "results.json").read_text())
    assert len(res["cosine_by_step"]) == 3 and res["val_pairs"] + res["train_pairs"] == 16
    assert set(res["baselines"]) == {"mean_target_cosine", "last_prompt_state_cosine"}
    assert all(1 <= s <= 3 for s in res["halt_steps"]) and res["by_thinking_length"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_cosine" in x for x in lines) and any("threshold" in x for x in lines)
    meta = json.loads((out / "seqtrm.json").read_text())
    assert meta["d_prime"] == 8 and meta["config"]["n_sup"] == 3
    assert main(["report", f"inputs=[{out}]", "follow_inputs=false", f"out={root / 'report_s'}"]) == 0
    text = (root / "report_s" / "report.md").read_text()
    assert "## SequenceTRM" in text and "baseline: the mean training target" in text
    assert (root / "report_s" / "seqtrm_halting.png").stat().st_size > 1000
    # a compressor of another LLM (the base model) is refused, both named
    other = root / "compressor_base"
    assert main(["compressor", str(pipe["model"]), f"out={other}", "tokens=2000", "val_tokens=500", "steps=5",
                 "dims=[8]"]) == 0
    capsys.readouterr()
    assert main(["seqtrm", *[c for c in common if not c.startswith("compressor=")], f"compressor={other}",
                 f"out={root / 'seqtrm_bad'}"]) == 2
    err = capsys.readouterr().err
    assert str(pipe["model"]) in err and str(sft) in err and "Traceback" not in err


# ----------------------------------------------------------------------------- phase 3: answering with the reasoner

def test_latent_reasoner_supervised_then_grpo_and_the_outcome_table(pipe, capsys):
    root = pipe["root"]
    sft, seqtrm = root / "sft", root / "seqtrm"
    if not (seqtrm / "manifest.json").is_file():
        pytest.skip("needs the phase 2 test's SequenceTRM")
    problems, test = root / "tasks" / "train.jsonl", root / "tasks" / "test.jsonl"
    common = [f"model={sft}", f"problems={problems}", "k=2", "max_problems=16", "val_fraction=0.25",
              "max_new_tokens=4", "train.device=cpu", "eval.every=2", "checkpoint.every=0"]
    sup = root / "latent_sft"
    assert main(["latent", *common, f"seqtrm={seqtrm}", f"out={sup}", "train.steps=3", "train.batch_size=4"]) == 0
    meta = json.loads((sup / "reasoner.json").read_text())
    assert meta["method"] == "supervised" and meta["config"]["k"] == 2 and 1 <= meta["config"]["steps"] <= 3
    lines = [json.loads(x) for x in (sup / "metrics.jsonl").read_text().splitlines()]
    assert any("val_em" in x and "val_answer_nll" in x for x in lines)
    # GRPO needs the supervised reasoner to start from (and to keep close to)
    capsys.readouterr()
    grpo = [*common, "method=grpo", "grpo.num_generations=4", "train.steps=2", "train.batch_size=8", "train.lr=1e-5"]
    assert main(["latent", *grpo, f"seqtrm={seqtrm}", f"out={root / 'latent_bad'}"]) == 2
    err = capsys.readouterr().err
    assert "init=LATENT_DIR" in err and "Traceback" not in err
    assert main(["latent", *grpo, f"init={sup}", f"out={root / 'latent_grpo'}"]) == 0
    lines = [json.loads(x) for x in (root / "latent_grpo" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "reward" in x]
    assert train and all(0 <= x["reward"] <= 1 and x["kl"] >= 0 for x in train)
    # a model without thinking delimiters is refused, naming them
    assert main(["latent", *[c for c in common if not c.startswith("model=")], f"model={pipe['model']}",
                 f"seqtrm={seqtrm}", f"out={root / 'latent_base'}", "train.steps=1"]) == 2
    assert "no thinking delimiters" in capsys.readouterr().err

    out = root / "outcome"
    assert main(["llm-trm-eval", str(sft), f"problems={test}", f"out={out}", "n=4", "thinking_max_new_tokens=8",
                 "max_new_tokens=4", "batch_size=4", "device=cpu", f"first_token={seqtrm}",
                 f"reasoners=[{{label: supervised, path: {sup}}}, {{label: grpo, path: {root / 'latent_grpo'}}}]"]) == 0
    rows = json.loads((out / "outcome.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["thinking in full", "direct (no thinking)", "supervised",
                                          "supervised, another problem's vectors", "grpo",
                                          "grpo, another problem's vectors", "first token only"]
    for r in rows:
        assert r["n"] == 4 and 0 <= r["exact_match"] <= 1 and r["tokens_per_problem"] >= 1
    for r in rows[2:]:
        assert r.get("control") or r["mean_trm_steps"] >= 1
        assert r["minus_direct"] == pytest.approx(r["exact_match"] - rows[1]["exact_match"])
    per = [json.loads(x) for x in (out / "outcome.jsonl").read_text().splitlines()]
    assert len(per) == 4 and {"thinking", "direct", "reasoner 0", "reasoner 0 control", "reasoner 1",
                              "first_token"} <= set(per[0])
    assert main(["llm-trm-eval", str(sft), f"problems={test}", f"out={out}", "n=4", "thinking_max_new_tokens=8",
                 "max_new_tokens=4", "batch_size=4", "device=cpu", f"first_token={seqtrm}",
                 f"reasoners=[{{label: supervised, path: {sup}}}, {{label: grpo, path: {root / 'latent_grpo'}}}]"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["report", f"inputs=[{out}, {sup}, {root / 'latent_grpo'}]", "follow_inputs=false",
                 f"out={root / 'report_o'}"]) == 0
    text = (root / "report_o" / "report.md").read_text()
    assert "## LLM-TRM outcome" in text and "| first token only |" in text and "## Latent reasoners" in text
    assert (root / "report_o" / "llm_trm_outcome.png").stat().st_size > 1000


def test_an_untrained_reasoner_shows_the_llm_its_empty_thinking_block(pipe):
    """k = the empty block's length: the latent prompt with the untrained reasoner's vectors gives the
    LLM exactly the prompt that answers at once (the projection starts at the block's embeddings)."""
    from lmlab.infer.latent import LatentPrompts, reason, slot_init
    from lmlab.models import load_model
    from lmlab.models.latent_reasoner import reasoner_from_seqtrm

    root = pipe["root"]
    if not (root / "seqtrm" / "manifest.json").is_file():
        pytest.skip("needs the phase 2 test's SequenceTRM")
    llm, tok, m = load_model(root / "sft")
    gap = LatentPrompts(tok, "think", 1).gap_ids()
    lp = LatentPrompts(tok, "think", len(gap))
    r, _ = reasoner_from_seqtrm(root / "seqtrm", llm, m["fingerprint"], lp.k, slot_init(llm, lp), steps=1)
    built = [lp.build(q) for q in ("Ann has 3 pens. She buys 4 more. How many pens does Ann have now?", "Sum 2 and 5.")]
    vecs, _, steps = reason(llm, r, built, batch_size=2)
    assert steps.tolist() == [1, 1]
    with torch.no_grad():
        for b, v in zip(built, vecs):
            assert len(b.ids) == len(b.direct) and b.ids[:b.slots[0]] == b.direct[:b.slots[0]]
            where = torch.zeros(1, len(b.ids), dtype=torch.bool)
            where[0, b.slots] = True
            latent, _ = llm(torch.tensor([b.ids]), vectors=(where, v))
            direct, _ = llm(torch.tensor([b.direct]))
            torch.testing.assert_close(latent, direct, atol=1e-5, rtol=0)
