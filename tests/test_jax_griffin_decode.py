"""Generation with the JAX Griffin (lmlab.jax_backend.griffin.decode) against lmlab's torch engine
on the same random weights, fp32:

- greedy tokens equal the torch engine's, for a left-padded batch of prompts from 1 token (the
  convolution's state holds padding after prefill) to past the attention window, and rows end
  at eos on the same step;
- sampling repeats with its seed; top-k 1 and a tiny top-p are greedy; top-k 3 draws only
  among the three most likely first tokens;
- decoding a few steps per call gives the same tokens as one call;
- the scorer's per-row sums and greedy flags, and a stream several windows long read through the
  cache, equal the torch forward's;
- `lmlab eval RUN backend=jax proofs=[...]` (Lean played by tests/lean_standin.py) writes the
  same greedy proofs and verdicts as backend=torch, and scores packed data, texts, choices,
  long_context and lm-eval tasks as it does; a transformer is refused with backend=jax;
  `lmlab generate` and `lmlab chat` with backend=jax write torch's greedy text.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("jax", reason="the jax extra is not installed (pip install 'lmlab[jax]')")
try:
    import recurrentgemma.jax  # noqa: F401
except ImportError as e:
    pytest.skip(f"recurrentgemma.jax does not import ({e})", allow_module_level=True)

from conftest import ROOT
from lmlab.infer import engine
from lmlab.jax_backend.griffin.decode import Decoder, bucket
from lmlab.jax_backend.griffin.score import Scorer
from lmlab.models.griffin.config import resolve_griffin_config
from lmlab.models.griffin.model import Griffin

V, WINDOW = 300, 8
N = 8  # new tokens everywhere: one compiled program per sampling mode
PROMPTS = [[1], [5, 7], [3, 9, 11, 4, 8], list(range(20, 33)), [(7 * i) % 290 + 3 for i in range(30)]]


@pytest.fixture(scope="module")
def pair():
    cfg = resolve_griffin_config({"preset": "micro", "vocab_size": V, "width": 64, "num_heads": 4, "lru_width": 48,
                                  "n_layer": 3, "block_pattern": ["recurrent", "recurrent", "attention"],
                                  "attention_window_size": WINDOW, "max_seq_len": 128})
    torch.manual_seed(0)
    model = Griffin(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # far from init, so the tokens depend on every parameter
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model, Decoder.of(model)


def _run(gen) -> list[list[int]]:
    out: list[list[int]] = []
    for step in gen:
        out = out or [[] for _ in step]
        for r, t in enumerate(step):
            if t is not None:
                out[r].append(t)
    return out


def test_buckets():
    assert [bucket(n) for n in (1, 8, 9, 100, 129)] == [8, 8, 16, 128, 256]
    assert bucket(5, 4) == 8 and bucket(9, 3) == 18


def test_greedy_tokens_equal_the_torch_engine(pair):
    model, dec = pair
    with torch.no_grad():
        want = _run(engine.generate_ids(model, PROMPTS, max_new_tokens=N, device="cpu"))
    got = _run(dec.generate_ids(PROMPTS, max_new_tokens=N))
    assert got == want
    assert len({tuple(w) for w in want}) == len(want)  # the prompts lead to different text
    eos = want[3][4]  # a token row 3 emits on its 5th step: each row ends at its first one
    with torch.no_grad():
        want = _run(engine.generate_ids(model, PROMPTS, max_new_tokens=N, eos_id=eos, device="cpu"))
    assert _run(dec.generate_ids(PROMPTS, max_new_tokens=N, eos_id=eos)) == want
    assert len(want[3]) <= 5 and want[3][-1] == eos


def test_sampling_repeats_and_truncates(pair):
    model, dec = pair
    greedy = _run(dec.generate_ids(PROMPTS, max_new_tokens=N))
    a = _run(dec.generate_ids(PROMPTS, max_new_tokens=N, temperature=1.5, seed=3))
    assert a == _run(dec.generate_ids(PROMPTS, max_new_tokens=N, temperature=1.5, seed=3))
    assert a != _run(dec.generate_ids(PROMPTS, max_new_tokens=N, temperature=1.5, seed=4)) and a != greedy
    assert _run(dec.generate_ids(PROMPTS, max_new_tokens=N, temperature=1.5, top_k=1, seed=3)) == greedy
    assert _run(dec.generate_ids(PROMPTS, max_new_tokens=N, temperature=1.5, top_p=1e-6, seed=3)) == greedy
    with torch.no_grad():
        top3 = [set(model(torch.tensor([p]))[0][0, -1].topk(3).indices.tolist()) for p in PROMPTS]
    firsts = [set() for _ in PROMPTS]
    for seed in range(8):
        for r, row in enumerate(_run(dec.generate_ids(PROMPTS, max_new_tokens=N, temperature=5.0, top_k=3, seed=seed))):
            firsts[r].add(row[0])
    assert all(f <= t for f, t in zip(firsts, top3)) and any(len(f) > 1 for f in firsts)


def test_should_stop_ends_a_row_as_the_engine_does(pair):
    model, dec = pair
    stop = lambda row, ids: row == 1 and len(ids) == 3  # noqa: E731
    with torch.no_grad():
        want = _run(engine.generate_ids(model, PROMPTS, max_new_tokens=N, should_stop=stop, device="cpu"))
    assert _run(dec.generate_ids(PROMPTS, max_new_tokens=N, should_stop=stop)) == want and len(want[1]) == 3


def test_chunks_decode_what_one_call_decodes(pair):
    """Decoding 3 steps per call (the cache and PRNG key carried between calls) gives the same
    greedy and sampled tokens; rows ended on the host are marked done on the devices."""
    model, dec = pair
    small = Decoder.of(model, chunk=3)
    assert _run(small.generate_ids(PROMPTS, max_new_tokens=N)) == _run(dec.generate_ids(PROMPTS, max_new_tokens=N))
    kw = {"max_new_tokens": N, "temperature": 1.5, "top_k": 20, "seed": 5}
    assert _run(small.generate_ids(PROMPTS, **kw)) == _run(dec.generate_ids(PROMPTS, **kw))
    stop = lambda row, ids: len(ids) == 2 + row % 2  # noqa: E731  (every row ends on step 2 or 3)
    steps = list(small.generate_ids(PROMPTS, max_new_tokens=40, should_stop=stop))
    assert len(steps) == 3 and [len(r) for r in _run(iter(steps))] == [2, 3, 2, 3, 2]
    assert small.decode(PROMPTS, 7).shape == (len(PROMPTS), 7)  # a budget that is not a multiple of the chunk
    assert (small.decode(PROMPTS, 7) == dec.decode(PROMPTS, 7)).all()


def test_scores_and_a_long_stream_equal_the_torch_forward(pair):
    """Scorer.row_scores: masked per-row sums and greedy flags as the torch forward gives them;
    Scorer.stream_nll: a stream of 7 windows less 3 tokens (the first window through the forward
    pass, the rest a token per step through the cache, the last call padded) scores every token
    as one full forward does."""
    import torch.nn.functional as F

    model, dec = pair
    scorer = Scorer(dec)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, V, (1, 7 * WINDOW - 3), generator=g)
    with torch.no_grad():
        logits, _ = model(ids[:, :-1])
    want = F.cross_entropy(logits[0].float(), ids[0, 1:], reduction="none").double().numpy()
    got = scorer.stream_nll(ids[0].tolist())
    assert got.shape == want.shape and abs(got - want).max() < 1e-4

    x = torch.randint(1, V, (3, 13), generator=g)
    with torch.no_grad():
        logits, _ = model(x)
    best = logits.argmax(-1)
    y = torch.full_like(x, -100)
    y[0, 4:9] = best[0, 4:9]  # greedy targets
    y[1, 2:] = torch.randint(1, V, (11,), generator=g)  # random targets: not greedy
    y[2, 12] = best[2, 12]
    y[1, 5] = best[1, 5]
    nll, greedy = scorer.row_scores(x.numpy(), y.numpy())
    ce = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-100, reduction="none").sum(-1)
    assert nll.dtype.name == "float64" and abs(nll - ce.double().numpy()).max() < 1e-4
    assert greedy.tolist() == [True, False, True]


# ----------------------------------------------------------------------------- lmlab eval backend=jax

@pytest.fixture(scope="module")
def griffin_run(tmp_path_factory):
    """A Griffin micro model with a 320-token context (Herald prompts fit) and a Herald sample."""
    from conftest import pretrain_griffin
    from lmlab.data import herald
    from lmlab.models import load_model, save_model

    root = tmp_path_factory.mktemp("jax_decode")
    m = pretrain_griffin(root, 320, batch_size=2)

    model, _, _ = load_model(m, device="cpu")  # two steps teach it one token: move it off, so proofs differ
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for q in model.parameters():
            q.add_(torch.randn(q.shape, generator=g) * 0.2)
    save_model(model, m)
    path = root / "herald.jsonl"
    herald.write_jsonl_atomic(herald.sample_rows(6, seed=0), path)
    return {"root": root, "model": m, "herald": path}


def _eval(griffin_run, out, *extra):
    """`lmlab eval ...` through the CLI's main in this process (a process of its own would add the
    ~5 s of importing torch and JAX again) -> (exit code, stdout, stderr)."""
    import contextlib
    import io

    from test_proof_eval import lean_cfg

    from lmlab.cli import main

    spec = {"path": str(griffin_run["herald"]), "name": "herald", "split": "all", "n_samples": 1, "k": [1],
            "temperature": 0.0, "max_new_tokens": 10, "batch_size": 8, "lean": lean_cfg(griffin_run["root"])}
    out_, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out_), contextlib.redirect_stderr(err):
        code = main(["eval", str(griffin_run["model"]), f"out={out}", "packed_default=false", "max_new_tokens=6",
                     "prompts=[def , Return the]", "device=cpu", f"proofs={json.dumps([spec])}", *extra])
    return code, out_.getvalue(), err.getvalue()


def test_eval_backend_jax_proves_what_torch_proves(griffin_run, tmp_path):
    runs = {}
    for backend in ("torch", "jax"):
        code, _, err = _eval(griffin_run, tmp_path / backend, f"backend={backend}")
        assert code == 0, err[-3000:]
        runs[backend] = tmp_path / backend
    problems = {b: [p for p in map(json.loads, (d / "problems.jsonl").read_text().splitlines())]
                for b, d in runs.items()}
    proofs = {b: [(p["theorem_name"], p["samples"][0]["proof"], p["samples"][0]["ok"]) for p in ps]
              for b, ps in problems.items()}
    assert proofs["jax"] == proofs["torch"] and len(proofs["jax"]) == 4  # (the sample's 6 rows hold 4 theorems)
    assert len({text for _, text, _ in proofs["jax"]}) == 4
    gens = {b: [(g["prompt"], g["completion"]) for g in map(json.loads, (d / "generations.jsonl").read_text()
                                                             .splitlines()) if g["setting"] == "greedy"]
            for b, d in runs.items()}
    assert gens["jax"] == gens["torch"]
    res = {b: json.loads((d / "eval.json").read_text()) for b, d in runs.items()}
    assert res["jax"]["model"]["backend"] == "jax" and res["torch"]["model"]["backend"] == "torch"
    assert res["jax"]["proofs"][0]["valid"] == res["torch"]["proofs"][0]["valid"]
    m = {b: json.loads((d / "manifest.json").read_text()) for b, d in runs.items()}
    assert m["jax"]["fingerprint"] != m["torch"]["fingerprint"]  # sampled text differs across backends
    code, printed, _ = _eval(griffin_run, runs["jax"], "backend=jax")
    assert code == 0 and "up to date" in printed


def test_eval_backend_jax_scores_packed_data_texts_and_choices_as_torch_does(griffin_run, tmp_path, monkeypatch):
    """Scoring through the JAX model (lmlab.models.family.Scorer): the packed val split the model
    was trained on, a text file in rolling windows and multiple choice, within 1e-5 of torch's."""
    from lmlab.eval import evaluate

    calls = []
    scored = Scorer.row_scores
    monkeypatch.setattr(Scorer, "row_scores", lambda self, x, y: calls.append(x.shape) or scored(self, x, y))

    text = tmp_path / "doc.txt"
    text.write_text((ROOT / "README.md").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    arc = tmp_path / "arc.jsonl"  # ARC-format multiple choice
    arc.write_text("".join(json.dumps({"question": f"What does def {w} return?", "answerKey": "B",
                                       "choices": {"label": ["A", "B", "C"], "text": ["None", f"the {w}", "0"]}}) + "\n"
                           for w in ("path", "name", "list", "value", "text")))
    res = {}
    for backend in ("torch", "jax"):
        out = evaluate.run(evaluate.Config(model=str(griffin_run["model"]), out=str(tmp_path / backend),
                                           backend=backend, texts=[str(text)], choice=[str(arc)], max_new_tokens=0,
                                           batch_size=3, device="cpu"))
        res[backend] = json.loads((out / "eval.json").read_text())
    assert len(calls) > 2  # every batch of the jax run went through the JAX model
    (pt,), (pj,) = res["torch"]["packed"], res["jax"]["packed"]
    assert pj["tokens_scored"] == pt["tokens_scored"] > 0 and pj["loss"] == pytest.approx(pt["loss"], rel=1e-5)
    (tt,), (tj,) = res["torch"]["texts"], res["jax"]["texts"]
    assert tj["windows"] == tt["windows"] > 1
    for k in ("nll", "byte_perplexity", "bits_per_byte"):
        assert tj[k] == pytest.approx(tt[k], rel=1e-5), k
    (ct,), (cj,) = res["torch"]["choice"], res["jax"]["choice"]
    assert cj["n"] == ct["n"] == 5 and (cj["acc"], cj["acc_norm"]) == (ct["acc"], ct["acc_norm"])
    from lmlab.eval.choice import continuation_logprobs  # the scores themselves
    from lmlab.infer.backend import load_for_decoding

    pairs = [([1, 5, 9, 13], [7, 8]), ([2] * 40, [3]), ([4, 4], [11, 12, 13, 14, 15])]
    torch_model = load_for_decoding(griffin_run["model"])[0]
    jax_model = load_for_decoding(griffin_run["model"], "jax")[0]
    want = continuation_logprobs(torch_model, pairs, batch_size=2)
    assert continuation_logprobs(jax_model, pairs, batch_size=2) == pytest.approx(want, rel=1e-5)


def test_eval_backend_jax_long_context_and_lm_eval_as_torch(griffin_run, tmp_path, monkeypatch):
    """long_context reads the val tokens in one stream through the JAX model's cache, and lm-eval's
    three request types (choice, rolling perplexity, generation) run on it: the numbers are torch's;
    lm-eval's own simple_evaluate takes the model arg backend=jax too."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'lmlab[lm_eval]')")
    from test_lm_harness import TASKS, offline_hub, write_tasks

    from lmlab.eval import evaluate

    offline_hub(monkeypatch)
    calls = []
    for name in ("row_scores", "stream_nll"):
        real = getattr(Scorer, name)
        monkeypatch.setattr(Scorer, name, lambda self, *a, f=real, n=name: calls.append(n) or f(self, *a))
    write_tasks(tmp_path / "tasks", tmp_path / "hf_datasets")
    lm = {"tasks": TASKS, "include_path": str(tmp_path / "tasks"), "batch_size": 4}
    res = {}
    for backend in ("torch", "jax"):
        out = evaluate.run(evaluate.Config(model=str(griffin_run["model"]), out=str(tmp_path / backend),
                                           backend=backend, max_new_tokens=0, device="cpu", lm_eval=lm,
                                           long_context=[{"factor": 2, "buckets": 4}]))
        res[backend] = json.loads((out / "eval.json").read_text())
    assert calls.count("stream_nll") == 1 and calls.count("row_scores") > 1  # the jax run scored on JAX
    (lt,), (lj,) = res["torch"]["long_context"], res["jax"]["long_context"]
    assert lj["tokens"] == lt["tokens"] == 640 and set(lj["modes"]) == {"native"}
    for k in ("loss", "loss_past_context"):
        assert lj["modes"]["native"][k] == pytest.approx(lt["modes"]["native"][k], rel=1e-5), k
    assert lj["modes"]["native"]["curve"] == pytest.approx(lt["modes"]["native"]["curve"], rel=1e-5)

    def metrics(r):
        return {(t["task"], m["metric"], m["filter"]): m["value"] for t in r["lm_eval"]["tasks"] for m in t["metrics"]}

    want = metrics(res["torch"])
    assert {t for t, _, _ in want} == set(TASKS) and metrics(res["jax"]) == pytest.approx(want, rel=1e-4)

    import lmlab.eval.lm_harness  # noqa: F401  (registers "lmlab")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    direct = simple_evaluate(model="lmlab", model_args=f"path={griffin_run['model']},backend=jax", tasks=["lmlab_mc"],
                             task_manager=TaskManager(include_path=lm["include_path"], include_defaults=False),
                             batch_size=4, device="cpu")
    assert direct["results"]["lmlab_mc"]["acc,none"] == pytest.approx(want[("lmlab_mc", "acc", "none")])


def test_eval_backend_jax_refusals(griffin_run, tmp_path):
    import shutil

    from lmlab.errors import UserError
    from lmlab.eval import evaluate

    def run(model=griffin_run["model"], **kw):
        cfg = {"model": str(model), "out": str(tmp_path / "e"), "backend": "jax", "packed_default": False, **kw}
        with pytest.raises(UserError) as e:
            evaluate.run(evaluate.Config(**cfg))
        return str(e.value)

    other = tmp_path / "transformer"  # a model.json naming another family
    shutil.copytree(griffin_run["model"], other)
    meta = json.loads((other / "model.json").read_text())
    (other / "model.json").write_text(json.dumps({**meta, "family": "transformer"}))
    msg = run(model=other)
    assert "is a transformer model" in msg and "backend=torch" in msg
    assert not (tmp_path / "e").exists()


def test_generate_and_chat_backend_jax_say_what_torch_says(griffin_run, capsys, monkeypatch):
    """`lmlab generate` (a batch, and one streamed prompt) and `lmlab chat` with backend=jax write
    torch's greedy text; a torch device with backend=jax is refused."""
    import io

    from lmlab.errors import UserError
    from lmlab.infer import chat, generate

    m = str(griffin_run["model"])
    out = {}
    for backend in ("torch", "jax"):
        common = {"model": m, "temperature": 0.0, "max_new_tokens": 6, "backend": backend}
        batch = generate.run(generate.Config(prompts=["def ", "Return the"], **common))
        one = generate.run(generate.Config(prompts=["import "], **common))
        streamed = capsys.readouterr().out
        monkeypatch.setattr("sys.stdin", io.StringIO("def f\nReturn\n"))
        chat.run(chat.Config(**common))
        out[backend] = (batch, one, streamed, capsys.readouterr().out)
    assert out["jax"] == out["torch"]
    assert out["jax"][2].endswith("import " + out["jax"][1][0]["completion"] + "\n")
    assert out["jax"][3].count("assistant> ") == 2
    with pytest.raises(UserError, match="backend=jax decodes on JAX's devices"):
        generate.run(generate.Config(model=m, prompts=["x"], backend="jax", device="cuda"))


def test_bench_decode_jax_decodes_the_torch_engines_tokens(tmp_path):
    from lmlab import bench

    out = tmp_path / "bench.json"
    res = bench.run(bench.Config(what="decode-jax", preset="micro", vocab_size=512, batch_size=2, prompt_len=8,
                                 max_new_tokens=4, repeats=1, warmup=0, out=str(out)))
    assert res["greedy_identical"] is True and res["ratio"] > 0 and json.loads(out.read_text())["what"] == "decode-jax"
