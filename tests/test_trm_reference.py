"""Parity with the official TRM code (SamsungSAILMontreal/TinyRecursiveModels), on random weights, fp32, CPU.

The official code cannot be installed from PyPI; point LMLAB_TRM_REFERENCE at a checkout of it
(a git clone of github.com/SamsungSAILMontreal/TinyRecursiveModels) to run these tests. They
import its model and loss modules (torch + einops + pydantic only), copy the same weights into
lmlab's TRM and compare, for the attention and the MLP variant:
- evaluation: logits and Q-values at each of the 16 supervision steps (<= 1e-4);
- training: with the same global seed, the same halting decisions (exploration included), the
  same loss, and the same gradients for every parameter and for the puzzle embeddings' rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REF = os.environ.get("LMLAB_TRM_REFERENCE")
pytestmark = pytest.mark.skipif(not REF or not (Path(REF) / "models" / "recursive_reasoning" / "trm.py").is_file(),
                                reason="set LMLAB_TRM_REFERENCE to a checkout of the official TinyRecursiveModels code")

from lmlab.models.trm import TRM, TRMConfig  # noqa: E402
from lmlab.train.trm_losses import act_loss  # noqa: E402

B, L, V, IDS = 6, 20, 11, 5


def _pair(mlp_t: bool):
    """lmlab's TRM with random weights, and the official model and loss head holding the same ones."""
    from lmlab.bench_trm import copy_to_official, import_official, official_config, official_names

    pytest.importorskip("einops")
    Ref, Head = import_official(REF)
    cfg = TRMConfig(seq_len=L, vocab_size=V, num_puzzle_identifiers=IDS, hidden_size=32, num_heads=4, expansion=4,
                    h_cycles=2, l_cycles=3, l_layers=2, puzzle_emb_len=4, mlp_t=mlp_t,
                    pos_encodings="none" if mlp_t else "rope", halt_max_steps=16, halt_exploration_prob=0.5)
    ours = TRM(cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # random weights everywhere (the q head and puzzle table start at constants)
        for p in list(ours.parameters()) + [ours.y_init, ours.z_init]:
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1.0))
    ref = Ref(official_config(cfg, B))
    copy_to_official(ours, ref)
    return ours, ref, Head(ref, loss_type="stablemax_cross_entropy"), official_names(cfg)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(1, V, (B, L), generator=g)
    labels[0, :5] = 0  # some cells not scored
    return {"inputs": torch.randint(1, V, (B, L), generator=g).int(), "labels": labels.int(),
            "puzzle_identifiers": torch.randint(0, IDS, (B,), generator=g).int()}


@pytest.mark.parametrize("mlp_t", [False, True])
@torch.no_grad()
def test_evaluation_matches_the_official_model_at_every_step(mlp_t):
    ours, ref, _, _ = _pair(mlp_t)
    ours.eval(), ref.eval()
    batch = _batch()
    c_ours, c_ref = ours.initial_carry(B), ref.initial_carry(batch)
    for step in range(16):
        c_ours, o = ours(c_ours, batch)
        c_ref, r = ref(c_ref, batch)
        assert (o["logits"] - r["logits"]).abs().max() <= 1e-4, step
        assert (o["q_halt_logits"] - r["q_halt_logits"]).abs().max() <= 1e-4
        assert (o["q_continue_logits"] - r["q_continue_logits"]).abs().max() <= 1e-4
        assert torch.equal(c_ours.halted, c_ref.halted) and torch.equal(c_ours.steps, c_ref.steps)
    assert c_ours.halted.all()  # evaluation halts everything at the 16th step, never earlier


@pytest.mark.parametrize("mlp_t", [False, True])
def test_training_step_matches_the_official_loss_halting_and_gradients(mlp_t):
    ours, ref, head, names = _pair(mlp_t)
    ours.train(), head.train()
    c_ours, c_ref = ours.initial_carry(B), head.initial_carry(_batch(0))
    for step in range(4):  # carried across steps; new batches replace halted rows
        batch = _batch(step)
        ours.puzzle_emb.pending.clear()
        torch.manual_seed(100 + step)
        c_ours, o = ours(c_ours, batch)
        terms = act_loss(o, c_ours.labels.long(), c_ours.halted, c_ours.steps)
        torch.manual_seed(100 + step)
        ref_batch = {**batch, "labels": torch.where(batch["labels"] == 0, -100, batch["labels"])}
        c_ref, loss_ref, metrics, _, _ = head(carry=c_ref, batch=ref_batch, return_keys=[])
        assert torch.equal(c_ours.halted, c_ref.halted) and torch.equal(c_ours.steps, c_ref.steps), step
        assert abs(terms.loss.item() - loss_ref.item()) <= 1e-4 * max(1.0, abs(loss_ref.item()))
        for k in ("count", "exact_accuracy", "steps"):
            assert terms.stats[k].item() == metrics[k].item(), k
        ours.zero_grad(), ref.zero_grad()
        ref.inner.puzzle_emb.local_weights.grad = None  # a buffer: the official sign-SGD's zero_grad clears it
        terms.loss.backward()
        loss_ref.backward()
        theirs = dict(ref.inner.named_parameters())
        for mine, p in ours.named_parameters():
            if p.requires_grad:
                g_ref = theirs[names[mine]].grad
                assert torch.allclose(p.grad, g_ref, atol=1e-4, rtol=1e-3), (step, mine)
        (ids, leaf), = ours.puzzle_emb.pending
        assert torch.allclose(leaf.grad, ref.inner.puzzle_emb.local_weights.grad, atol=1e-4, rtol=1e-3)
        assert torch.equal(ids.int(), ref.inner.puzzle_emb.local_ids)
