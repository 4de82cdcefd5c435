"""Griffin against both references on random weights, fp32, logits within 1e-4:

- Google DeepMind's recurrentgemma torch model (weights written by its own state_dict, read
  through our DeepMind-layout loader): a plain batch, a left-padded batch (the reference's
  sampler marks padding with segment position -1) and packed documents (segment positions
  restarting at 0), with sequences longer than the attention window;
- transformers' RecurrentGemmaForCausalLM (weights written by its save_pretrained, read by our
  HF import): a plain batch, a right-padded batch with an attention mask, and left padding and
  packed documents compared with each document run alone (transformers' conv1d reads across
  document starts, so it cannot be given them packed).
"""

from __future__ import annotations

import pytest
import torch

from lmlab.models.griffin.reference import recurrentgemma_torch
from lmlab.models.griffin.checkpoints import (config_from_deepmind, from_deepmind_state_dict,
                                              import_hf_griffin)
from lmlab.models.griffin.model import Griffin

V, WIDTH, HEADS, WINDOW = 211, 64, 4, 8
TOL = 1e-4


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # far from init (zero norms, zero biases) so every parameter matters
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def deepmind():
    ref = recurrentgemma_torch()
    if ref is None:
        pytest.skip("recurrentgemma is not installed (pip install --no-deps recurrentgemma==1.0.1 jaxtyping)")
    common, griffin = ref
    T = common.TemporalBlockType
    cfg = common.GriffinConfig(vocab_size=V, width=WIDTH, mlp_expanded_width=3 * WIDTH, num_heads=HEADS,
                               lru_width=48, block_types=(T.RECURRENT, T.RECURRENT, T.ATTENTION, T.RECURRENT),
                               embeddings_scale_by_sqrt_dim=True, attention_window_size=WINDOW,
                               logits_soft_cap=30.0)
    torch.manual_seed(0)
    theirs = griffin.Griffin(cfg, gradient_checkpointing=False, dtype=torch.float32).eval()
    _randomize(theirs, 1)
    sd = theirs.state_dict()
    ours_cfg = config_from_deepmind(sd, attention_window_size=WINDOW, max_seq_len=128)
    ours = Griffin(ours_cfg)
    ours.load_state_dict(from_deepmind_state_dict(sd, ours_cfg))
    return theirs, ours.eval()


def _ids(b, t, seed):
    return torch.randint(3, V, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_deepmind_config_is_inferred_from_the_tensors(deepmind):
    _, ours = deepmind
    c = ours.cfg
    assert (c.width, c.num_heads, c.lru_width, c.mlp_expanded_width, c.vocab_size) == (WIDTH, HEADS, 48, 3 * WIDTH, V)
    assert c.block_types == ["recurrent", "recurrent", "attention", "recurrent"]


@torch.no_grad()
def test_logits_match_deepmind_beyond_the_window(deepmind):
    theirs, ours = deepmind
    x = _ids(2, 3 * WINDOW + 5, 0)
    pos = torch.arange(x.shape[1])[None].expand(2, -1)
    ref, _ = theirs(x, pos, return_cache=False)
    got, _ = ours(x)
    assert (got - ref).abs().max().item() <= TOL


@torch.no_grad()
def test_packed_documents_match_deepmind_segment_positions(deepmind):
    theirs, ours = deepmind
    lens = [5, 13, 2, 11]
    x = _ids(1, sum(lens), 1)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    ref, _ = theirs(x, pos, return_cache=False)
    got, _ = ours(x, doc_ids=doc_ids)
    assert (got - ref).abs().max().item() <= TOL


@torch.no_grad()
def test_left_padded_batch_matches_deepmind_padding(deepmind):
    """The reference's sampler left-pads and gives padding segment position -1; our cache
    takes left_pad. Real positions' logits agree (padding itself is never read)."""
    theirs, ours = deepmind
    lengths = [19, 4, 11]
    T = max(lengths)
    x = _ids(3, T, 2)
    pad = [T - n for n in lengths]
    pos = torch.stack([torch.arange(T) - p for p in pad]).clamp_min(-1)
    ref, _ = theirs(x, pos, return_cache=False)
    got, _ = ours(x, cache=ours.new_cache(3, T, left_pad=pad))
    for i, p in enumerate(pad):
        assert (got[i, p:] - ref[i, p:]).abs().max().item() <= TOL


@torch.no_grad()
def test_decoding_matches_the_deepmind_cache(deepmind):
    """Prefill, then token by token through both models' caches, past the window."""
    theirs, ours = deepmind
    x = _ids(2, 2 * WINDOW + 6, 3)
    n0 = 7
    pos = torch.arange(x.shape[1])[None].expand(2, -1)
    ref, rcache = theirs(x[:, :n0], pos[:, :n0], return_cache=True)
    cache = ours.new_cache(2, x.shape[1])
    got, _ = ours(x[:, :n0], cache=cache)
    assert (got - ref).abs().max().item() <= TOL
    for t in range(n0, x.shape[1]):
        ref, rcache = theirs(x[:, t:t + 1], pos[:, t:t + 1], cache=rcache, return_cache=True)
        got, _ = ours(x[:, t:t + 1], cache=cache)
        assert (got - ref).abs().max().item() <= TOL, t


# ----------------------------------------------------------------------------- transformers

@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    c = RecurrentGemmaConfig(vocab_size=V, hidden_size=WIDTH, intermediate_size=6 * WIDTH, num_hidden_layers=4,
                             num_attention_heads=HEADS, num_key_value_heads=1, lru_width=48,
                             attention_window_size=64, block_types=["recurrent", "recurrent", "attention"],
                             pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    theirs = RecurrentGemmaForCausalLM(c).eval()
    _randomize(theirs, 2)
    d = tmp_path_factory.mktemp("hf_rg")
    theirs.save_pretrained(d)
    ours, _ = import_hf_griffin(d)
    return theirs, ours


@torch.no_grad()
def test_hf_import_matches_transformers(hf):
    theirs, ours = hf
    assert ours.cfg.attention_window_size == 64 and ours.cfg.block_types[3] == "recurrent"
    x = _ids(2, 40, 4)
    ref = theirs(x, use_cache=False).logits
    assert (ours(x)[0] - ref).abs().max().item() <= TOL


@torch.no_grad()
def test_right_padded_batch_matches_transformers(hf):
    theirs, ours = hf
    lengths = [30, 9]
    x = _ids(2, 30, 5)
    mask = torch.stack([torch.arange(30) < n for n in lengths]).long()
    ref = theirs(x, attention_mask=mask, use_cache=False).logits
    got, _ = ours(x)
    for i, n in enumerate(lengths):
        assert (got[i, :n] - ref[i, :n]).abs().max().item() <= TOL


@torch.no_grad()
def test_left_padding_and_packed_documents_match_transformers_alone(hf):
    theirs, ours = hf
    docs = [_ids(1, n, 6 + n)[0] for n in (12, 3, 20)]
    packed, _ = ours(torch.cat(docs)[None], doc_ids=torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None])
    T = max(len(d) for d in docs)
    batch = torch.zeros(3, T, dtype=torch.long)
    for i, d in enumerate(docs):
        batch[i, T - len(d):] = d
    padded, _ = ours(batch, cache=ours.new_cache(3, T, left_pad=[T - len(d) for d in docs]))
    start = 0
    for i, d in enumerate(docs):
        alone = theirs(d[None], use_cache=False).logits[0]
        assert (packed[0, start:start + len(d)] - alone).abs().max().item() <= TOL
        assert (padded[i, T - len(d):] - alone).abs().max().item() <= TOL
        start += len(d)


@torch.no_grad()
def test_export_then_transformers_load_gives_equal_logits_past_the_window(tmp_path):
    """Our window (DeepMind's: W earlier tokens and itself) is written as W + 1 for transformers."""
    from transformers import AutoModelForCausalLM

    from lmlab.models.hf import write_hf

    ours = Griffin({"preset": "micro", "vocab_size": V, "attention_window_size": 5, "max_seq_len": 64}).eval()
    _randomize(ours, 3)
    write_hf(ours, tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = _ids(2, 23, 7)
    assert (theirs(x, use_cache=False).logits - ours(x)[0]).abs().max().item() <= TOL
    back, _ = import_hf_griffin(tmp_path)
    assert back.cfg.attention_window_size == 5
    assert torch.equal(back(x)[0], ours(x)[0])


@torch.no_grad()
def test_deepmind_pt_file_loads_and_a_damaged_one_is_named(deepmind, tmp_path):
    from lmlab.errors import UserError
    from lmlab.models.griffin.checkpoints import load_deepmind

    theirs, ours = deepmind
    sd = theirs.state_dict()
    torch.save(sd, tmp_path / "rg.pt")  # what Kaggle's torch checkpoints are: the reference's state_dict
    loaded = load_deepmind(tmp_path / "rg.pt", attention_window_size=WINDOW, max_seq_len=128)
    x = _ids(1, 20, 9)
    assert torch.equal(loaded(x)[0], ours(x)[0])
    broken = {k: v for k, v in sd.items() if k != "blocks.1.recurrent_block.rg_lru.a_param"}
    broken["blocks.0.extra.w"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(UserError, match=r"missing blocks\.1\.recurrent_block\.rg_lru\.a_param; unexpected "
                                        r"blocks\.0\.extra\.w \(expected names like"):
        load_deepmind(tmp_path / "broken.pt")
