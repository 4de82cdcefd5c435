"""LLM-TRM phase 3's parts: input vectors in place of embeddings (the transformer and the
generation engine), the LatentReasoner's halting and gradients, its start at the empty thinking
block, and the GRPO objective's surrogate moving the reasoner towards rewarded answers."""

from __future__ import annotations

import pytest
import torch

from lmlab.infer.engine import generate_ids
from lmlab.models.compressor import DimensionCompressor
from lmlab.models.latent_reasoner import LatentReasoner
from lmlab.models.seqtrm import SeqTRMConfig, SequenceTRM, left_pad
from lmlab.models.transformer import Transformer, resolve_model_config

V = 97


def llm(seed=0) -> Transformer:
    """A random micro transformer with weights large enough that its greedy tokens depend on the input."""
    torch.manual_seed(seed)
    m = Transformer(resolve_model_config({"preset": "micro", "max_seq_len": 64, "tie_embeddings": False},
                                         vocab_size=V)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(std=p.shape[-1] ** -0.5 * 2)
    return m


def test_vectors_equal_to_the_embeddings_change_nothing_and_get_gradients():
    m = llm()
    idx = torch.randint(1, V, (2, 9))
    where = torch.zeros(2, 9, dtype=torch.bool)
    where[0, 3:5], where[1, 6] = True, True
    values = m.embed.weight[idx[where]].detach().clone().requires_grad_(True)
    plain, _ = m(idx)
    with_vectors, _ = m(idx.masked_fill(where, 0), vectors=(where, values))  # the ids there are placeholders
    torch.testing.assert_close(with_vectors, plain, atol=1e-5, rtol=0)
    with_vectors[:, -1].sum().backward()
    assert values.grad is not None and values.grad.abs().sum() > 0
    # other vectors change the positions after them only (causal), not before
    other, _ = m(idx, vectors=(where, values.detach() + 1.0))
    torch.testing.assert_close(other[0, :3], plain[0, :3], atol=1e-5, rtol=0)
    assert not torch.allclose(other[0, 3:], plain[0, 3:], atol=1e-3)


def test_generation_with_vectors_is_the_same_batched_and_alone_and_matches_the_tokens_they_embed():
    m = llm()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in (7, 4, 10)]
    slots = [[2, 3], [1], [5, 6, 7]]
    vecs = [torch.randn(len(s), m.cfg.d_model, generator=g) for s in slots]
    given = list(zip(slots, vecs))

    def run(ps, vs):
        steps = list(generate_ids(m, ps, max_new_tokens=6, vectors=vs))
        return [[s[r] for s in steps if s[r] is not None] for r in range(len(ps))]

    together = run(prompts, given)
    alone = [run([p], [v])[0] for p, v in zip(prompts, given)]
    assert together == alone
    # vectors that are the embeddings of the prompt's own tokens: the plain generation
    own = [(s, m.embed.weight[[p[i] for i in s]].detach()) for p, s in zip(prompts, slots)]
    assert run(prompts, own) == run(prompts, None)
    assert run(prompts, given) != run(prompts, None)


def reasoner(d=32, k_prime=8, k=2, d_model=None, **kw) -> LatentReasoner:
    torch.manual_seed(0)
    comp = DimensionCompressor(d, k_prime)
    trm = SequenceTRM(SeqTRMConfig(d=k_prime, heads=2, layers=1, n=1, T=2, n_sup=4, max_len=32))
    return LatentReasoner(comp, trm, d_model or d, k, "mse_cosine", 0.5, **kw)


def test_an_untrained_reasoner_gives_the_slot_embeddings_and_its_gradients_reach_every_part():
    slots = torch.randn(2, 32)
    r = reasoner(slots=slots)
    x, mask = left_pad([torch.randn(5, 32), torch.randn(3, 32)])
    vecs, h, steps = r(x, mask)
    assert vecs.shape == (2, 2, 32) and h.shape == (2, 32) and steps.shape == (2,)
    torch.testing.assert_close(vecs, slots.expand(2, 2, 32))  # the projection's weight starts at zero
    with torch.no_grad():
        r.project.weight.normal_(std=0.1)
    vecs, _, _ = r(x, mask)
    vecs.pow(2).sum().backward()
    for name, part in (("compressor", r.compressor), ("trm", r.trm), ("project", r.project)):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), name


def test_the_reasoner_halts_where_the_head_says_and_recomputes_only_that_step_with_gradients(monkeypatch):
    r = reasoner()
    x, mask = left_pad([torch.randn(5, 32), torch.randn(3, 32), torch.randn(4, 32)])
    qs = iter([torch.tensor([0.0, 0.9, 0.0]), torch.tensor([0.9, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.0])])
    real = r.trm.supervision_step
    calls = []

    def step(xx, mm, y, z):
        (y2, z2), pred, q = real(xx, mm, y, z)
        calls.append(torch.is_grad_enabled())
        return (y2, z2), pred, (next(qs, None) if not torch.is_grad_enabled() else q)

    monkeypatch.setattr(r.trm, "supervision_step", step)
    with torch.enable_grad():
        pred, steps = r.reason(x, mask)
    # row 1 halts at step 1, row 0 at step 2, row 2 never (n_sup = 4)
    assert steps.tolist() == [2, 1, 4]
    assert calls == [False, False, False, True]  # three steps without gradients, then the one with
    assert pred.requires_grad
    # the halting step's prediction: what that many steps from the initial state give
    monkeypatch.setattr(r.trm, "supervision_step", real)
    with torch.no_grad():
        want = [r.trm.predict(r.compressor.compress(x), mask, n)[-1][0][i] for i, n in enumerate([2, 1, 4])]
        torch.testing.assert_close(pred.detach(), torch.stack(want), atol=1e-5, rtol=1e-5)
    r.steps = 3  # fixed steps: every row takes them
    assert r.reason(x, mask)[1].tolist() == [3, 3, 3]


def test_reasoner_widths_must_agree():
    comp = DimensionCompressor(32, 8)
    with pytest.raises(ValueError, match="D'=8"):
        LatentReasoner(comp, SequenceTRM(SeqTRMConfig(d=16, heads=2)), 32, 2, "mse_cosine", 0.5)
