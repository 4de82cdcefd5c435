"""The TRM family's semantics (lmlab.models.trm), pinned: gradients only through the last outer
cycle, the carry of a continuing row independent of a replaced neighbour, halting with
exploration and the step limit, evaluation running every step, sizes and the family registry.
(tests/test_trm_reference.py compares the numbers with the official code where it is present.)
"""

from __future__ import annotations

import pytest
import torch

from lmlab.errors import UserError
from lmlab.models import load_weights, save_model
from lmlab.models.family import PuzzleModel, build_model, get_family, model_json
from lmlab.models.trm import TRM, TRMConfig

B, L, V = 4, 12, 7


def small(**kw) -> TRM:
    torch.manual_seed(0)
    cfg = dict(seq_len=L, vocab_size=V, num_puzzle_identifiers=3, hidden_size=32, num_heads=2, h_cycles=3,
               l_cycles=2, l_layers=2, puzzle_emb_len=2, halt_max_steps=5)
    m = TRM(TRMConfig(**{**cfg, **kw}))
    with torch.no_grad():  # away from the constant initial q head and puzzle table
        m.q_head.weight.normal_(0, 0.1)
        m.puzzle_emb.weight.normal_(0, 0.1)
    return m


def batch(seed=0, n=B):
    g = torch.Generator().manual_seed(seed)
    return {"inputs": torch.randint(1, V, (n, L), generator=g).int(),
            "labels": torch.randint(1, V, (n, L), generator=g).int(),
            "puzzle_identifiers": torch.randint(0, 3, (n,), generator=g).int()}


def test_gradients_flow_through_the_last_outer_cycle_only():
    m = small()
    seen = []
    m.blocks[0].register_forward_hook(lambda mod, a, out: seen.append(torch.is_grad_enabled()))
    m.train()
    carry, out = m(m.initial_carry(B), batch())
    cfg = m.cfg
    # T cycles of (n latent updates + 1 answer update) passes of f; only the last cycle's with grad
    assert seen == [False] * ((cfg.h_cycles - 1) * (cfg.l_cycles + 1)) + [True] * (cfg.l_cycles + 1)
    (out["logits"].float().logsumexp(-1).sum() + out["q_halt_logits"].sum()).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    # the same gradients from the last cycle alone, started from the no-grad cycles' states
    m.zero_grad()
    b = batch()
    with torch.no_grad():
        x = m.embed_inputs(b["inputs"], b["puzzle_identifiers"])
        y = m.y_init.expand(B, cfg.total_len, -1).clone()
        z = m.z_init.expand(B, cfg.total_len, -1).clone()
        for _ in range(cfg.h_cycles - 1):
            for _ in range(cfg.l_cycles):
                z = m.f(z, y + x)
            y = m.f(y, z)
    x = m.embed_inputs(b["inputs"], b["puzzle_identifiers"])
    for _ in range(cfg.l_cycles):
        z = m.f(z, y + x)
    y = m.f(y, z)
    logits, q_halt, _ = m.heads(y)
    (logits.float().logsumexp(-1).sum() + q_halt.sum()).backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads[n], atol=1e-6), n
    assert carry.y.grad_fn is None and carry.z.grad_fn is None  # the carry is detached


@torch.no_grad()
def test_a_continuing_row_ignores_its_replaced_neighbour_and_keeps_its_puzzle():
    m = small().eval()
    first = batch(0)
    carry, _ = m(m.initial_carry(B), first)
    carry.halted = torch.tensor([True, False, False, False])  # row 0 finished, rows 1-3 go on
    other = batch(1)
    a, out_a = m(carry, other)
    other2 = batch(2)
    b_, out_b = m(carry, other2)
    # row 0 took the new batch's puzzle (different in the two calls); rows 1-3 kept theirs
    assert torch.equal(a.inputs[0], other["inputs"][0]) and torch.equal(b_.inputs[0], other2["inputs"][0])
    assert torch.equal(a.inputs[1:], first["inputs"][1:]) and torch.equal(b_.inputs[1:], first["inputs"][1:])
    assert torch.allclose(out_a["logits"][1:], out_b["logits"][1:], atol=1e-6)
    assert torch.allclose(a.y[1:], b_.y[1:], atol=1e-6) and torch.allclose(a.z[1:], b_.z[1:], atol=1e-6)
    assert not torch.allclose(out_a["logits"][0], out_b["logits"][0])
    assert a.steps.tolist() == [1, 2, 2, 2]  # the replaced row starts counting again
    # ... and started from the fixed initial states: the same as a fresh carry's first step
    fresh, out_f = m(m.initial_carry(B), other)
    assert torch.allclose(out_f["logits"][0], out_a["logits"][0], atol=1e-6)


def _steps_to_halt(m: TRM, halt_rand: float, halt_min: int, q_bias: float, steps=8) -> list[int]:
    """The step at which each row first halts, over `steps` calls without replacement."""
    with torch.no_grad():
        m.q_head.weight.zero_()
        m.q_head.bias.fill_(q_bias)
    b = {**batch(), "halt_rand": torch.full((B,), halt_rand), "halt_min": torch.full((B,), halt_min, dtype=torch.int32)}
    carry = m.initial_carry(B)
    carry, _ = m(carry, b)
    first = torch.where(carry.halted, carry.steps, 0)
    for _ in range(steps - 1):
        carry.halted = carry.halted & False  # keep every row going to see when each would halt
        carry, _ = m(carry, b)
        first = torch.where((first == 0) & carry.halted, carry.steps, first)
    return first.tolist()


@torch.no_grad()
def test_halting_q_exploration_and_the_step_limit():
    m = small(halt_max_steps=5, halt_exploration_prob=0.5).train()
    assert _steps_to_halt(m, 0.9, 3, q_bias=5.0) == [1] * B  # q_halt > 0: halt at once (no exploration)
    assert _steps_to_halt(m, 0.1, 3, q_bias=5.0) == [3] * B  # exploring: not before the drawn minimum
    assert _steps_to_halt(m, 0.1, 5, q_bias=5.0) == [5] * B
    assert _steps_to_halt(m, 0.9, 3, q_bias=-5.0) == [5] * B  # q_halt < 0: only the limit stops it
    m.eval()
    assert _steps_to_halt(m, 0.1, 2, q_bias=5.0) == [5] * B  # evaluation: always every step


@torch.no_grad()
def test_exploration_draws_from_the_global_generator_without_given_draws():
    m = small(halt_max_steps=16, halt_exploration_prob=1.0).train()
    m.q_head.weight.zero_()
    m.q_head.bias.fill_(5.0)
    torch.manual_seed(3)
    carry, _ = m(m.initial_carry(64), batch(n=64))
    assert not carry.halted.all()  # every row explores: a minimum of 2..16 steps, none halts at step 1


def test_evaluation_runs_every_supervision_step():
    from lmlab.data.puzzles.format import PuzzleSplit
    from lmlab.infer.puzzles import solve

    m = small(halt_max_steps=6)
    b = batch(n=10)
    split = PuzzleSplit(b["inputs"].numpy(), b["labels"].numpy(), torch.zeros(10, dtype=torch.int32).numpy(),
                        torch.arange(11).numpy(), torch.arange(11).numpy())
    solved = solve(m, split, batch_size=4, device="cpu")
    assert solved.exact.shape == (10, 6) and solved.q_halt.shape == (10, 6) and solved.preds.shape == (10, L)
    assert m.training  # solve restores the mode


def test_variants_sizes_and_the_puzzle_table():
    for kw in (dict(mlp_t=True, pos_encodings="none"), dict(pos_encodings="learned"), dict(puzzle_emb_ndim=0)):
        m = small(**kw) if kw.get("puzzle_emb_ndim") != 0 else TRM(TRMConfig(seq_len=L, vocab_size=V, hidden_size=32,
                                                                             num_heads=2, puzzle_emb_ndim=0))
        carry, out = m.train()(m.initial_carry(B), batch())
        assert out["logits"].shape == (B, L, V) and out["q_halt_logits"].shape == (B,)
        assert carry.y.shape == (B, m.cfg.total_len, 32)
    m = small()
    assert m.num_params() == sum(p.numel() for p in m.parameters()) - m.puzzle_emb.weight.numel()
    assert not m.puzzle_emb.weight.requires_grad
    assert m.flops_per_example() > 2 * m.num_params(non_embedding=True) * m.cfg.total_len
    with pytest.raises(ValueError):
        TRMConfig(hidden_size=30, num_heads=4)


def test_family_registry_round_trip_and_kind_guard(tmp_path):
    m = small()
    assert isinstance(m, PuzzleModel) and get_family("trm").kind == "puzzle"
    again = build_model(model_json(m))
    assert isinstance(again, TRM) and again.cfg == m.cfg
    save_model(m, tmp_path)
    loaded = load_weights(tmp_path, kind="puzzle")
    for (n, a), (_, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(UserError, match="puzzle model.*lmlab trm"):
        load_weights(tmp_path)  # a language-model stage given a TRM
