"""Generation engine, `lmlab generate` and `lmlab bench` on a micro model with a real tokenizer."""

import json
import subprocess
import sys

import pytest
import torch

from lmlab.infer.engine import generate, generate_ids, sample_next
from lmlab.models import save_model
from lmlab.models.transformer import Transformer, resolve_model_config

PROMPTS = ["Once upon a time", "The", "Language models predict", "Hello world, hello"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from test_hf import make_tokenizer
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    # a larger init spreads the logits so greedy choices are far from ties
    return Transformer(resolve_model_config({"preset": "micro", "init_std": 0.08}, vocab_size=tok.vocab_size)).eval()


def test_greedy_batch_equals_one_by_one(model, tok):
    batched = generate(model, tok, PROMPTS, max_new_tokens=12)
    single = [generate(model, tok, [p], max_new_tokens=12)[0] for p in PROMPTS]
    assert batched == single
    assert any(batched)


def test_greedy_equals_argmax_of_full_forward(model, tok):
    ids = [tok.bos_id] + tok.encode("Once upon")
    got = [s[0] for s in generate_ids(model, [ids], max_new_tokens=8)]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(8):
            seq.append(model(torch.tensor([seq]))[0][0, -1].argmax().item())
    assert got == seq[len(ids):]


def test_max_new_tokens_and_eos(model, tok):
    ids = [[tok.bos_id] + tok.encode(p) for p in PROMPTS]
    steps = list(generate_ids(model, ids, max_new_tokens=5))
    assert len(steps) == 5 and all(t is not None for s in steps for t in s)
    # make the first greedy token of row 0 its EOS: that row ends, the others go on
    first = steps[0][0]
    steps = list(generate_ids(model, ids, max_new_tokens=5, eos_id=first))
    assert steps[0][0] == first and all(s[0] is None for s in steps[1:])
    assert len(steps) == 5 and all(s[1] is not None for s in steps)


def test_stop_strings_cut_and_stop(model, tok):
    full = generate(model, tok, ["Once upon a time"], max_new_tokens=20)[0]
    assert len(full) >= 6
    stop = full[3:5]
    cut = generate(model, tok, ["Once upon a time"], max_new_tokens=20, stop=[stop])[0]
    assert cut == full[:full.find(stop)]
    # the row stopped early: fewer tokens were generated than the budget
    n = []
    generate(model, tok, ["Once upon a time"], max_new_tokens=20, stop=[stop], on_token=lambda r, t: n.append(t))
    assert len(n) < 20


def test_sampling_seeded_and_top_k1_is_greedy(model, tok):
    a = generate(model, tok, PROMPTS, max_new_tokens=10, temperature=1.0, seed=3)
    b = generate(model, tok, PROMPTS, max_new_tokens=10, temperature=1.0, seed=3)
    c = generate(model, tok, PROMPTS, max_new_tokens=10, temperature=1.0, seed=4)
    assert a == b and a != c
    greedy = generate(model, tok, PROMPTS, max_new_tokens=10)
    assert generate(model, tok, PROMPTS, max_new_tokens=10, temperature=1.3, top_k=1, seed=5) == greedy
    assert generate(model, tok, PROMPTS, max_new_tokens=10, temperature=1.3, top_p=1e-6, seed=5) == greedy


def test_top_k_top_p_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    ks = sample_next(logits, 1.0, 2, 1.0, g)
    assert set(ks.tolist()) == {0, 1}
    # p(0)=.66, p(1)=.24, p(2)=.09: top_p=0.8 keeps exactly tokens 0 and 1
    ps = sample_next(logits, 1.0, 0, 0.8, g)
    assert set(ps.tolist()) == {0, 1}


def test_cli_generate(model, tok, tmp_path):
    run = tmp_path / "run"
    save_model(model, run)
    tok.copy_to(run / "tokenizer")
    out = tmp_path / "gens.jsonl"
    r = subprocess.run([sys.executable, "-m", "lmlab", "generate", str(run), 'prompts=["Once upon", "The"]',
                        "max_new_tokens=6", "temperature=0", f"out={out}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["prompt"] for x in recs] == ["Once upon", "The"]
    assert [x["completion"] for x in recs] == generate(model, tok, ["Once upon", "The"], max_new_tokens=6)
    assert "Once upon" + recs[0]["completion"] in r.stdout
    # one prompt streams; same text
    r = subprocess.run([sys.executable, "-m", "lmlab", "generate", str(run), 'prompts=["Once upon"]',
                        "max_new_tokens=6", "temperature=0"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == ("Once upon" + recs[0]["completion"]).strip()
    r = subprocess.run([sys.executable, "-m", "lmlab", "generate", str(tmp_path / "missing"), 'prompts=["x"]'],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "missing" in r.stderr


def test_bench_smoke(tmp_path, capsys):
    """`lmlab bench train|generate` through the CLI's main here (threads=1 is set for this process,
    and put back after)."""
    from lmlab.cli import main

    out, threads = tmp_path / "bench.json", torch.get_num_threads()
    try:
        for what in ("train", "generate"):
            assert main(["bench", what, "preset=micro", "vocab_size=512", "batch_size=2", "seq_len=32", "steps=1",
                         "warmup=0", "repeats=1", "max_new_tokens=4", "threads=1", f"out={out}"]) == 0
            assert "ratio" in capsys.readouterr().out
            res = json.loads(out.read_text())
            assert res["what"] == what and res["ratio"] > 0 and res["threads"] == 1
    finally:
        torch.set_num_threads(threads)
    assert res["greedy_identical"] is True
