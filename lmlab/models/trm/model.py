"""The Tiny Recursive Model (Jolicoeur-Martineau 2025, "Less is More: Recursive Reasoning with Tiny
Networks") with its adaptive-computation (ACT) wrapper, as the official code computes it.

    model = TRM(TRMConfig(seq_len=81, vocab_size=11, hidden_size=512, mlp_t=True, pos_encodings="none"))
    carry = model.initial_carry(batch_size=768)      # every row "halted": the first call loads the batch
    carry, out = model(carry, batch)                 # ONE supervision step; batch = {"inputs", "labels",
                                                     # "puzzle_identifiers"}; out = {"logits", "q_halt_logits",
                                                     # "q_continue_logits"[, "target_q_continue"]}

One shared network f (`blocks`) updates the latent z and the answer y. Per supervision step,
with x the embedded puzzle: T = h_cycles times { n = l_cycles times z <- f(z + y + x); then
y <- f(y + z) }, the first T-1 cycles under no_grad (only the last one is backpropagated).
The output head reads y at the cells; the Q-halt head reads y at the first (puzzle-embedding)
position. (The official code calls y `z_H` and z `z_L`; "f(a + b)" is its input injection.)

ACT across optimizer steps: the carry holds (y, z) detached, the step count, the halted flag and
the rows' current data. At each call, rows that halted at the previous call take the new
batch's row and start again from the fixed initial states (`y_init`, `z_init`); the others
continue their puzzle. A row halts at `halt_max_steps`, or in training when q_halt > 0, but
not before a minimum number of steps that is, with probability `halt_exploration_prob`, drawn
uniformly from [2, halt_max_steps] (otherwise 0). Evaluation (`model.eval()`) halts every row
at `halt_max_steps` only, so a batch finishes together. The random draws come with the batch
when it holds `halt_rand` (B,) uniform [0, 1) and `halt_min` (B,) in [2, halt_max_steps]:
lmlab's trainer draws them per (batch, row) from a seeded generator, so a run does not depend
on how its rows are split over processes or forward passes. Without them the model draws from
the global torch generator in the official order (rand, then randint).

The puzzle embeddings (one row per puzzle identifier, zero-initialised) are not trained by
autograd: lmlab.models.trm.embedding explains why and how the sign-SGD optimizer updates them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.trm.config import TRMConfig
from lmlab.models.trm.embedding import PuzzleEmbedding
from lmlab.models.trm.layers import Block, Linear, Rotary, trunc_normal_

DATA_KEYS = ("inputs", "labels", "puzzle_identifiers")


@dataclass
class Carry:
    """What one call hands to the next (per row): the recursion state and the puzzle being solved."""

    y: torch.Tensor  # (B, prefix + L, D) the answer state (official z_H)
    z: torch.Tensor  # (B, prefix + L, D) the latent (official z_L)
    steps: torch.Tensor  # (B,) int32 supervision steps taken on the current puzzle
    halted: torch.Tensor  # (B,) bool: replaced by the next batch's row at the next call
    inputs: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L)
    puzzle_identifiers: torch.Tensor  # (B,)

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name).detach().cpu() for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict, device=None) -> "Carry":
        return cls(**{f.name: state[f.name].to(device) for f in fields(cls)})

    def data(self) -> dict:
        return {k: getattr(self, k) for k in DATA_KEYS}


class TRM(nn.Module):
    family = "trm"

    def __init__(self, cfg: TRMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, v = cfg.hidden_size, cfg.vocab_size
        self.embed_scale = math.sqrt(d)
        self.embed = nn.Parameter(trunc_normal_(torch.empty(v, d), std=1.0 / self.embed_scale))
        self.lm_head = Linear(d, v)
        self.q_head = Linear(d, 2, bias=True)
        with torch.no_grad():  # Q starts near "do not halt" (sigmoid(-5) ~ 0.007), as the official code
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)
        self.prefix = cfg.prefix_len
        self.puzzle_emb = PuzzleEmbedding(cfg.num_puzzle_identifiers, cfg.emb_ndim) if cfg.emb_ndim else None
        positions = cfg.total_len
        self.rope = None
        if cfg.pos_encodings == "rope" and not cfg.mlp_t:
            self.rope = Rotary(d // cfg.num_heads, positions, cfg.rope_theta)
        if cfg.pos_encodings == "learned":
            self.pos = nn.Parameter(trunc_normal_(torch.empty(positions, d), std=1.0 / self.embed_scale))
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.expansion, positions, cfg.mlp_t, cfg.rms_norm_eps)
                                    for _ in range(cfg.l_layers))
        # fixed initial states of a new puzzle (saved with the weights, never trained)
        self.register_buffer("y_init", trunc_normal_(torch.empty(d), std=1.0))
        self.register_buffer("z_init", trunc_normal_(torch.empty(d), std=1.0))

    # ------------------------------------------------------------------ the recursion

    def embed_inputs(self, inputs: torch.Tensor, puzzle_identifiers: torch.Tensor) -> torch.Tensor:
        """x: (B, prefix + L, D), the cells' embeddings after the puzzle embedding, times sqrt(D)."""
        x = F.embedding(inputs.long(), self.embed)
        if self.puzzle_emb is not None:
            pe = self.puzzle_emb(puzzle_identifiers)
            pad = self.prefix * self.cfg.hidden_size - pe.shape[-1]
            if pad > 0:
                pe = F.pad(pe, (0, pad))
            x = torch.cat((pe.view(-1, self.prefix, self.cfg.hidden_size).to(x.dtype), x), dim=-2)
        if self.cfg.pos_encodings == "learned":
            x = 0.707106781 * (x + self.pos)  # 1/sqrt(2) keeps the sum's variance
        return self.embed_scale * x

    def f(self, h: torch.Tensor, injection: torch.Tensor) -> torch.Tensor:
        """The shared network: f(h + injection)."""
        h = h + injection
        for block in self.blocks:
            h = block(h, self.rope)
        return h

    def recurse(self, y: torch.Tensor, z: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """T cycles of (n latent updates, one answer update); gradients flow through the last cycle only."""
        cfg = self.cfg
        with torch.no_grad():
            for _ in range(cfg.h_cycles - 1):
                for _ in range(cfg.l_cycles):
                    z = self.f(z, y + x)
                y = self.f(y, z)
        for _ in range(cfg.l_cycles):
            z = self.f(z, y + x)
        y = self.f(y, z)
        return y, z

    def heads(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cell logits (B, L, V), q_halt (B,), q_continue (B,)) from the answer state; Q in float32."""
        q = self.q_head(y[:, 0]).float()
        return self.lm_head(y)[:, self.prefix:], q[..., 0], q[..., 1]

    # ------------------------------------------------------------------ ACT

    def initial_carry(self, batch_size: int, device=None) -> Carry:
        """Every row halted: the first call replaces all of them by the batch it is given."""
        device = device if device is not None else self.y_init.device
        n, d = self.cfg.total_len, self.cfg.hidden_size
        zeros = torch.zeros(batch_size, n, d, device=device)
        return Carry(y=zeros, z=zeros.clone(), steps=torch.zeros(batch_size, dtype=torch.int32, device=device),
                     halted=torch.ones(batch_size, dtype=torch.bool, device=device),
                     inputs=torch.zeros(batch_size, self.cfg.seq_len, dtype=torch.int32, device=device),
                     labels=torch.zeros(batch_size, self.cfg.seq_len, dtype=torch.int32, device=device),
                     puzzle_identifiers=torch.zeros(batch_size, dtype=torch.int32, device=device))

    def forward(self, carry: Carry, batch: dict) -> tuple[Carry, dict]:
        cfg = self.cfg
        reset = carry.halted
        y = torch.where(reset.view(-1, 1, 1), self.y_init.to(carry.y.dtype), carry.y)
        z = torch.where(reset.view(-1, 1, 1), self.z_init.to(carry.z.dtype), carry.z)
        steps = torch.where(reset, 0, carry.steps)
        data = {k: torch.where(reset.view((-1,) + (1,) * (batch[k].dim() - 1)), batch[k].to(getattr(carry, k).dtype),
                               getattr(carry, k)) for k in DATA_KEYS}
        x = self.embed_inputs(data["inputs"], data["puzzle_identifiers"])
        y, z = self.recurse(y, z, x)
        logits, q_halt, q_continue = self.heads(y)
        out = {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": q_continue}
        y, z = y.detach(), z.detach()
        with torch.no_grad():
            steps = steps + 1
            last = steps >= cfg.halt_max_steps
            halted = last
            if self.training and cfg.halt_max_steps > 1:
                halted = halted | (q_halt > 0 if cfg.no_act_continue else q_halt > q_continue)
                if "halt_rand" in batch:  # per-row draws given with the batch (lmlab's trainer: see below)
                    explore = batch["halt_rand"].to(q_halt.device) < cfg.halt_exploration_prob
                    min_steps = explore * batch["halt_min"].to(steps)
                else:  # the official code's draws from the global generator
                    explore = torch.rand_like(q_halt) < cfg.halt_exploration_prob
                    min_steps = explore * torch.randint_like(steps, low=2, high=cfg.halt_max_steps + 1)
                halted = halted & (steps >= min_steps)
                if not cfg.no_act_continue:
                    # HRM's bootstrapped Q-continue target: the next step's Q from the new state, no
                    # replay buffer or target network (the official TRM code's second forward
                    # unpacks the inner call wrongly; this is the computation it intends)
                    _, next_halt, next_continue = self.heads(self.recurse(y, z, x)[0])
                    out["target_q_continue"] = torch.sigmoid(
                        torch.where(last, next_halt, torch.maximum(next_halt, next_continue)))
        return Carry(y=y, z=z, steps=steps, halted=halted, **data), out

    # ------------------------------------------------------------------ sizes

    def num_params(self, non_embedding: bool = False) -> int:
        """Trained parameters (the puzzle embeddings are not counted: they are a per-puzzle table,
        as the paper's parameter counts leave them out); non_embedding also drops the token embedding."""
        n = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return n - self.embed.numel() if non_embedding else n

    def flops_per_example(self) -> float:
        """Training FLOPs of one supervision step on one example: every pass of f forward
        (T * (n + 1) of them), the last cycle's (n + 1) backward at twice that, the heads once."""
        cfg, length, d = self.cfg, self.cfg.total_len, self.cfg.hidden_size
        per_pass = 0.0
        for block in self.blocks:
            mlp = sum(p.numel() for p in block.mlp.parameters())
            if cfg.mlp_t:
                mix = 2.0 * d * sum(p.numel() for p in block.mlp_t.parameters())
            else:
                mix = 2.0 * length * sum(p.numel() for p in block.attn.parameters()) + 4.0 * length * length * d
            per_pass += mix + 2.0 * length * mlp
        passes = cfg.h_cycles * (cfg.l_cycles + 1) + 2 * (cfg.l_cycles + 1)
        heads = 6.0 * (cfg.seq_len * d * cfg.vocab_size + 2 * d)
        return per_pass * passes + heads

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """flops_per_example per position (the loop's MFU counts positions as tokens)."""
        return self.flops_per_example() / self.cfg.total_len
