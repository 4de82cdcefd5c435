"""Griffin in JAX: Google DeepMind's `recurrentgemma.jax` model (lmlab.jax_backend.griffin) against
lmlab's PyTorch Griffin on random weights, fp32, converted both ways:

- logits within 1e-4 past the attention window, for packed documents (segment positions
  restarting at 0) and for a left-padded batch (padding at segment position -1);
- the loss and every parameter's gradient of a next-token cross-entropy agree;
- torch -> Flax -> torch gives back the same tensors, bit for bit;
- `lmlab import` of a DeepMind Orbax checkpoint (written by recurrentgemma's own
  save_parameters) gives a model directory with the JAX model's logits, and `lmlab export
  format=orbax` writes one that recurrentgemma's load_parameters reads (float32 and bfloat16)
  and that imports back bit for bit; a directory that is not a checkpoint is named, and a
  setting the reference fixes is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("jax", reason="the jax extra is not installed (pip install 'lmlab[jax]')")
pytest.importorskip("flax")
try:
    import recurrentgemma.jax  # noqa: F401
except ImportError as e:  # typeguard 2 missing, or recurrentgemma absent
    pytest.skip(f"recurrentgemma.jax does not import ({e}): pip install 'lmlab[jax]' && pip install --no-deps "
                f"recurrentgemma==1.0.1", allow_module_level=True)

from lmlab.jax_backend.griffin import convert
from lmlab.jax_backend.griffin.model import build
from lmlab.models.griffin.config import resolve_griffin_config
from lmlab.models.griffin.model import Griffin

V, WINDOW, TOL = 300, 8, 1e-4


@pytest.fixture(scope="module")
def pair():
    cfg = resolve_griffin_config({"preset": "micro", "vocab_size": V, "width": 64, "num_heads": 4, "lru_width": 48,
                                  "n_layer": 4, "block_pattern": ["recurrent", "recurrent", "attention"],
                                  "attention_window_size": WINDOW, "max_seq_len": 128})
    torch.manual_seed(0)
    ours = Griffin(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # far from init (zero norms, zero biases) so every parameter matters
        for p in ours.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return ours, build(cfg), convert.from_torch_state(ours.state_dict(), cfg)


def _ids(b, t, seed):
    return torch.randint(3, V, (b, t), generator=torch.Generator().manual_seed(seed))


_FORWARD = {}


def _jax_logits(net, params, x, pos):
    import jax

    if net not in _FORWARD:  # compiled: the reference's eager path runs its type checks op by op
        _FORWARD[net] = jax.jit(lambda p, t, s: net.apply(p, t, s, return_cache=False)[0])
    return torch.from_numpy(np.array(_FORWARD[net](params, x.numpy().astype(np.int32), pos.numpy().astype(np.int32))))


@torch.no_grad()
def test_logits_match_past_the_window(pair):
    ours, net, params = pair
    x = _ids(2, 3 * WINDOW + 5, 0)
    want = ours(x)[0]
    got = _jax_logits(net, params, x, torch.arange(x.shape[1])[None].expand(2, -1))
    assert (got - want).abs().max().item() <= TOL


@torch.no_grad()
def test_packed_documents_and_left_padding_match(pair):
    ours, net, params = pair
    lens = [5, 13, 2, 11]
    x = _ids(1, sum(lens), 1)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    assert (_jax_logits(net, params, x, pos) - ours(x, doc_ids=doc_ids)[0]).abs().max().item() <= TOL

    lengths = [19, 4, 11]
    T = max(lengths)
    x = _ids(3, T, 2)
    pad = [T - n for n in lengths]
    pos = torch.stack([torch.arange(T) - p for p in pad]).clamp_min(-1)
    got = _jax_logits(net, params, x, pos)
    want = ours(x, cache=ours.new_cache(3, T, left_pad=pad))[0]
    for i, p in enumerate(pad):
        assert (got[i, p:] - want[i, p:]).abs().max().item() <= TOL


def test_loss_and_gradients_match(pair):
    import jax
    import jax.numpy as jnp
    import optax

    ours, net, params = pair
    x = _ids(2, 2 * WINDOW + 3, 3)
    inputs, targets = x[:, :-1], x[:, 1:]
    ours.zero_grad()
    logits = ours(inputs)[0]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
    loss.backward()
    pos = jnp.broadcast_to(jnp.arange(inputs.shape[1])[None], inputs.shape)

    def f(p):
        out, _ = net.apply(p, jnp.asarray(inputs.numpy()), pos, return_cache=False)
        return optax.softmax_cross_entropy_with_integer_labels(out, jnp.asarray(targets.numpy())).mean()

    value, grads = jax.jit(jax.value_and_grad(f))(params)
    assert float(value) == pytest.approx(loss.item(), rel=1e-5)
    theirs = convert.to_torch_state(jax.device_get(grads), ours.cfg)
    for name, p in ours.named_parameters():
        scale = p.grad.abs().max().item() + 1e-6
        assert (theirs[name] - p.grad).abs().max().item() <= 1e-4 * max(scale, 1.0), name


def test_torch_to_flax_and_back_is_exact(pair):
    ours, _, params = pair
    back = convert.to_torch_state(params, ours.cfg)
    sd = ours.state_dict()
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_import_of_a_deepmind_orbax_checkpoint(pair, tmp_path, gemma_tokenizer):
    import jax

    from lmlab.cli import main
    from lmlab.models import load_model
    from recurrentgemma.jax.utils import save_parameters

    ours, net, params = pair
    save_parameters(str(tmp_path / "2b"), jax.device_get(params["params"]))  # as Kaggle's flax/2b/1/2b
    (tmp_path / "tokenizer.model").write_bytes(gemma_tokenizer.read_bytes())  # beside it, as Kaggle ships it
    out = tmp_path / "rg"
    assert main(["import", str(tmp_path / "2b"), f"out={out}", f"attention_window_size={WINDOW}",
                 "max_seq_len=128"]) == 0
    model, _, _ = load_model(out)
    x = _ids(2, 30, 4)
    with torch.no_grad():
        got = model(x)[0]
    want = _jax_logits(net, params, x, torch.arange(30)[None].expand(2, -1))
    assert (got - want).abs().max().item() <= TOL

    # and back: `lmlab export format=orbax` writes the tree recurrentgemma's save_parameters writes
    # (its own load_parameters fails on either with orbax 0.12's metadata, so Orbax's restore reads)
    import orbax.checkpoint as ocp

    def restore(d):
        return ocp.PyTreeCheckpointer().restore((tmp_path / d).resolve())

    def shapes(tree):
        return jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), tree)

    assert main(["export", str(out), f"out={tmp_path / 'flax'}", "format=orbax"]) == 0
    ours = restore("flax")
    assert shapes(ours) == shapes(restore("2b"))
    assert (_jax_logits(net, ours, x, torch.arange(30)[None].expand(2, -1)) - want).abs().max() <= TOL
    assert main(["import", str(tmp_path / "flax"), f"out={tmp_path / 'again'}", f"attention_window_size={WINDOW}",
                 "max_seq_len=128"]) == 0
    again, _, _ = load_model(tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert main(["export", str(out), f"out={tmp_path / 'flax16'}", "format=orbax", "dtype=bfloat16"]) == 0
    assert str(restore("flax16")["params"]["embedder"]["input_embedding"].dtype) == "bfloat16"


def test_a_directory_that_is_no_checkpoint_and_a_fixed_setting_are_named(tmp_path, capsys, gemma_tokenizer):
    from lmlab.cli import main
    from lmlab.errors import UserError
    from lmlab.jax_backend.griffin.model import reference_config

    bad = tmp_path / "ck"
    bad.mkdir()
    (bad / "_METADATA").write_text("{not json")
    assert main(["import", str(bad), f"out={tmp_path / 'o'}", f"tokenizer={gemma_tokenizer}"]) == 2
    err = capsys.readouterr().err
    assert "Orbax checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError, match=r"recurrentgemma\.jax fixes conv1d_width=4; this model sets conv1d_width=3"):
        reference_config(resolve_griffin_config({"preset": "micro", "vocab_size": V, "conv1d_width": 3}))

