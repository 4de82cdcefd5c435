"""The model-family contract (lmlab.models.family), checked for every registered family.

A new family registers itself in `FAMILIES` and adds a small config to SMALL below (a model
option that changes the maths, like the transformer's learned attention sink, adds a variant);
then it must pass every test here: the Protocols, shapes, hidden -> logits, causal masking, packed
documents kept apart, incremental decoding equal to the full forward, left-padded batches
equal to one-by-one, dropping rows from a cache, rows merged into a decoding batch
and dropped from it (continuous batching), greedy generation batched vs alone, the
save/load round trip through model.json's family, a training step that `lmlab plan` can
trace, and the Hugging Face export where the family exports.
"""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.models import load_weights, save_model
from lmlab.models.family import FAMILIES, Cache, LanguageModel, build_model, families_of_kind, get_family

V = 97
# family (or family+variant) -> model.json content of a small model (fast on CPU)
SMALL = {
    "transformer": {"family": "transformer", "preset": "micro", "vocab_size": V, "max_seq_len": 64,
                    "n_kv_head": 2, "tie_embeddings": False},
    "transformer+sink": {"family": "transformer", "preset": "micro", "vocab_size": V, "max_seq_len": 64,
                         "n_kv_head": 2, "tie_embeddings": False, "attn_sink": True},
    # SmolLM3's NoPE: layer 1 of 2 without the rotary embedding (exports as SmolLM3ForCausalLM)
    "transformer+nope": {"family": "transformer", "preset": "micro", "vocab_size": V, "max_seq_len": 64,
                         "n_kv_head": 2, "tie_embeddings": True, "nope_layers": [1]},
    # window 6 < the test sequences: the local attention's band and its ring cache are exercised
    "griffin": {"family": "griffin", "preset": "micro", "vocab_size": V, "width": 32, "num_heads": 4,
                "mlp_expanded_width": 48, "attention_window_size": 6, "max_seq_len": 64},
}
ATOL = 1e-5


def test_every_family_has_a_small_config():
    # puzzle families (TRM) meet the PuzzleModel contract instead: tests/test_trm_model.py
    assert {c["family"] for c in SMALL.values()} == set(families_of_kind("lm")), \
        "add the new language-model family's small config to SMALL"
    assert set(FAMILIES) == set(families_of_kind("lm")) | set(families_of_kind("puzzle"))


@pytest.fixture(params=sorted(SMALL))
def model(request) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(SMALL[request.param]).eval()
    with torch.no_grad():  # random weights far from init, so masking bugs cannot hide behind small logits
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for sub in m.modules():  # learned attention sinks large enough to take a real share
            if isinstance(getattr(sub, "sink", None), torch.nn.Parameter):
                sub.sink.normal_(0.0, 2.0)
    return m


def ids(b, t, lo=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, V, (b, t), generator=g)


@torch.no_grad()
def test_protocols_and_sizes(model):
    assert isinstance(model, LanguageModel)
    assert model.family in FAMILIES and get_family(model.family).name == model.family
    assert model.max_context is None or model.max_context >= 32
    # at least a multiply-add per non-embedding weight in the forward pass alone
    assert model.num_params() > 0 and model.flops_per_token(16) >= 2 * model.num_params(non_embedding=True)
    cache = model.new_cache(2, 16)
    assert isinstance(cache, Cache) and cache.batch == 2 and cache.pos == 0 and cache.max_len == 16


@torch.no_grad()
def test_shapes_and_hidden_then_logits(model):
    x = ids(3, 11)
    logits, loss = model(x)
    assert logits.shape == (3, 11, V) and loss is None and torch.isfinite(logits).all()
    h = model.hidden(x)
    assert h.shape[:2] == (3, 11)
    torch.testing.assert_close(model.logits(h), logits, atol=ATOL, rtol=0)
    last, _ = model(x, last_only=True)
    torch.testing.assert_close(last, logits[:, -1:], atol=ATOL, rtol=0)
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(2)) < 0.4
    at, _ = model(x, logits_at=mask)  # logits at chosen positions only, row-major (DPO's completions)
    assert at.shape == (int(mask.sum()), V)
    torch.testing.assert_close(at, logits[mask], atol=ATOL, rtol=0)
    y = ids(3, 11, lo=0, seed=1)
    _, full = model(x, y)
    _, fused = model(x, y, return_logits=False)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
    torch.testing.assert_close(full, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=0)


@torch.no_grad()
def test_causal(model):
    x = ids(2, 20)
    x2 = x.clone()
    x2[:, 13:] = ids(2, 7, seed=3)
    a, _ = model(x)
    b, _ = model(x2)
    torch.testing.assert_close(a[:, :13], b[:, :13], atol=ATOL, rtol=0)
    assert not torch.allclose(a[:, 13:], b[:, 13:])


@torch.no_grad()
def test_packed_documents_are_kept_apart(model):
    d1, d2 = ids(1, 7, seed=4), ids(1, 9, seed=5)
    got, _ = model(torch.cat([d1, d2], 1), doc_ids=torch.tensor([[0] * 7 + [1] * 9]))
    torch.testing.assert_close(got[:, :7], model(d1)[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[:, 7:], model(d2)[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_incremental_decoding_equals_full_forward(model):
    x = ids(2, 24)
    full, _ = model(x)
    cache = model.new_cache(2, 30)
    parts = [model(x[:, :9], cache=cache)[0], model(x[:, 9:14], cache=cache)[0]]  # prefill, chunked prefill
    parts += [model(x[:, t:t + 1], cache=cache)[0] for t in range(14, 24)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=ATOL, rtol=0)
    assert cache.pos == 24


@torch.no_grad()
def test_left_padded_batch_equals_one_by_one_and_select_drops_rows(model):
    prompts = [ids(1, n, seed=10 + n)[0] for n in (5, 9, 7)]
    longest = max(len(p) for p in prompts)
    batch = torch.zeros(3, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, longest - len(p):] = p
    cont = ids(3, 4, seed=20)
    cache = model.new_cache(3, longest + 4, left_pad=[longest - len(p) for p in prompts])
    first, _ = model(batch, cache=cache, last_only=True)
    steps = [model(cont[:, :1], cache=cache)[0]]
    cache.select([2, 0])  # row 1 finished: decoding goes on for rows 2 and 0, in that order
    assert cache.batch == 2
    steps.append(model(cont[[2, 0], 1:2], cache=cache)[0])
    for row in range(3):
        alone, _ = model(torch.cat([prompts[row][None], cont[row:row + 1, :2]], 1))
        torch.testing.assert_close(first[row, -1], alone[0, len(prompts[row]) - 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(steps[0][row, -1], alone[0, len(prompts[row])], atol=ATOL, rtol=0)
        if row in (2, 0):
            torch.testing.assert_close(steps[1][[2, 0].index(row), -1], alone[0, len(prompts[row]) + 1],
                                       atol=ATOL, rtol=0)


@torch.no_grad()
def test_rows_merged_and_dropped_mid_decoding_decode_as_alone(model):
    """Continuous batching (lmlab.serve): prompts prefilled apart join a decoding batch
    (`merge`), finished rows leave it (`select`), and every row's logits stay those of its own
    sequence run alone; past the Griffin window, with both sides of a merge the longer."""
    g = torch.Generator().manual_seed(5)
    live: list[list[int]] = []  # the tokens each cache row has been fed

    def check(logits):
        for r, seq in enumerate(live):
            alone, _ = model(torch.tensor([seq]))
            torch.testing.assert_close(logits[r, -1], alone[0, -1], atol=ATOL, rtol=0)

    def prefill(lengths):
        rows = [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]
        longest = max(lengths)
        x = torch.tensor([[0] * (longest - len(r)) + r for r in rows])
        c = model.new_cache(len(rows), 40, left_pad=[longest - len(r) for r in rows])
        return rows, c, model(x, cache=c, last_only=True)[0]

    def step(cache):
        nxt = torch.randint(1, V, (len(live),), generator=g)
        for seq, t in zip(live, nxt.tolist()):
            seq.append(t)
        check(model(nxt[:, None], cache=cache)[0])

    live, cache, first = prefill([9, 4])
    check(first)
    for _ in range(3):
        step(cache)
    for lengths in ([15], [2, 5]):   # a newcomer longer than the batch, then shorter ones
        rows, new, first = prefill(lengths)
        live_new = rows
        saved, live = live, live_new
        check(first)
        live = saved + live_new
        cache.merge(new)
        assert cache.batch == len(live) and cache.pos <= 40
        step(cache)
        step(cache)
        cache.select([len(live) - 1, 0])  # keep the newest and the oldest row, in that order
        live = [live[-1], live[0]]
        step(cache)
    assert cache.batch == 2


@torch.no_grad()
def test_greedy_generation_batched_equals_alone(model):
    from lmlab.infer.engine import generate_ids

    prompts = [ids(1, n, seed=30 + n)[0].tolist() for n in (3, 8, 5)]

    def run(ps):
        outs = [[] for _ in ps]
        for step in generate_ids(model, ps, max_new_tokens=6):
            for i, t in enumerate(step):
                if t is not None:
                    outs[i].append(t)
        return outs

    assert run(prompts) == [run([p])[0] for p in prompts]


@torch.no_grad()
def test_save_load_round_trip_keeps_family_and_logits(model, tmp_path):
    save_model(model, tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["family"] == model.family
    again = load_weights(tmp_path)
    assert type(again) is type(model)
    x = ids(2, 10)
    torch.testing.assert_close(again(x)[0], model(x)[0], atol=0, rtol=0)


def test_lmlab_plan_traces_a_training_step_of_the_family(model, tmp_path):
    """`lmlab plan` traces one step on fake tensors (lmlab.plan_trace): the family's build must
    run on the meta device and its training forward must ask for no tensor's value."""
    from lmlab import plan
    from lmlab.train import sft
    save_model(model, tmp_path)
    p = plan.plan("sft", sft.Config(init=str(tmp_path), seq_len=32, train={"batch_size": 2}), memory_gib=4,
                  method="trace")
    assert p["model"]["params"] == model.num_params() and p["peak_tensors"] > p["components"]["weights"] > 0


@torch.no_grad()
def test_hf_export_round_trip_where_the_family_exports(model, tmp_path):
    if not get_family(model.family).exports_hf:
        pytest.skip(f"family {model.family} has no Hugging Face export")
    if getattr(model.cfg, "attn_sink", False):  # no HF architecture has them beside Llama's layout
        from lmlab.errors import UserError
        from lmlab.models.hf import write_hf

        with pytest.raises(UserError, match="attention sinks"):
            write_hf(model, tmp_path)
        return
    from transformers import AutoModelForCausalLM

    from lmlab.models.hf import write_hf

    write_hf(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = ids(2, 12)
    torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-4, rtol=0)


def test_model_json_without_family_is_a_transformer(tmp_path):
    m = build_model(SMALL["transformer"])
    save_model(m, tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    del meta["family"]  # written before families existed
    (tmp_path / "model.json").write_text(json.dumps(meta))
    assert load_weights(tmp_path).family == "transformer"


def test_unknown_family_is_a_clear_error(tmp_path):
    from lmlab.errors import UserError

    with pytest.raises(UserError, match=r"unknown model family 'mamba'; known: transformer"):
        build_model({"family": "mamba"})



def test_export_refuses_a_family_without_a_hugging_face_export(tmp_path, monkeypatch):
    """A family registered with exports_hf=False: `lmlab export` names it and the families that
    do, before loading anything, and writes nothing."""
    from lmlab.errors import UserError
    from lmlab.models.family import Family
    from lmlab.models.export import Config, run
    from lmlab.models.transformer import Transformer, resolve_model_config

    class Plain(Transformer):
        family = "plain"

    monkeypatch.setitem(FAMILIES, "plain", lambda: Family("plain", resolve_model_config, Plain, exports_hf=False))
    src = tmp_path / "model"
    save_model(build_model({**SMALL["transformer"], "family": "plain"}), src)
    assert json.loads((src / "model.json").read_text())["family"] == "plain"
    with pytest.raises(UserError, match=r"'plain' model, and that family has no Hugging Face export; families "
                                        r"that export: transformer"):
        run(Config(model=str(src), out=str(tmp_path / "hf")))
    assert not (tmp_path / "hf").exists()
