"""`lmlab bench trm`: a TRM training step of lmlab against the official implementation, same weights and batch.

    lmlab bench trm trm_reference=PATH batch_size=64 steps=3 repeats=3      # Sudoku MLP variant (81 cells)
    lmlab bench trm trm_reference=PATH trm_mlp_t=false trm_l_cycles=4 trm_seq_len=900 trm_vocab=6 batch_size=8

The official code (SamsungSAILMontreal/TinyRecursiveModels) is not on PyPI: clone it and pass
its directory as `trm_reference` (or $LMLAB_TRM_REFERENCE); its model and loss modules need
torch, pydantic and einops only. Both sides are built at the same config with the same weights
(lmlab's copied into the official modules by `copy_to_official`) and train one supervision
step on the same batch and carry: the ACT forward, the loss (stable-max cross-entropy +
0.5 x Q-halt BCE), the backward and the optimizer. The official AdamATan2 is a CUDA
extension, so both sides step lmlab's TRMOptimizer (the same update, lmlab.train.trm_optim):
the ratio compares the model and loss code. Sides alternate, each figure is the median step.
On CUDA the official side runs with forward_dtype bfloat16 and ours under bf16 autocast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from lmlab.errors import UserError


def official_names(cfg) -> dict[str, str]:
    """lmlab TRM state-dict name -> the official model's `inner.` name (parameters and buffers)."""
    names = {"embed": "embed_tokens.embedding_weight", "lm_head.weight": "lm_head.weight",
             "q_head.weight": "q_head.weight", "q_head.bias": "q_head.bias", "y_init": "H_init", "z_init": "L_init"}
    if cfg.emb_ndim:
        names["puzzle_emb.weight"] = "puzzle_emb.weights"
    if cfg.pos_encodings == "learned":
        names["pos"] = "embed_pos.embedding_weight"
    for i in range(cfg.l_layers):
        names.update({f"blocks.{i}.mlp.gate_up.weight": f"L_level.layers.{i}.mlp.gate_up_proj.weight",
                      f"blocks.{i}.mlp.down.weight": f"L_level.layers.{i}.mlp.down_proj.weight"})
        if cfg.mlp_t:
            names.update({f"blocks.{i}.mlp_t.gate_up.weight": f"L_level.layers.{i}.mlp_t.gate_up_proj.weight",
                          f"blocks.{i}.mlp_t.down.weight": f"L_level.layers.{i}.mlp_t.down_proj.weight"})
        else:
            names.update({f"blocks.{i}.attn.qkv.weight": f"L_level.layers.{i}.self_attn.qkv_proj.weight",
                          f"blocks.{i}.attn.o.weight": f"L_level.layers.{i}.self_attn.o_proj.weight"})
    return names


def official_config(cfg, batch_size: int, forward_dtype: str = "float32") -> dict:
    """The official TinyRecursiveReasoningModel_ACTV1 config dict for an lmlab TRMConfig."""
    return dict(batch_size=batch_size, seq_len=cfg.seq_len, puzzle_emb_ndim=cfg.emb_ndim,
                num_puzzle_identifiers=cfg.num_puzzle_identifiers, vocab_size=cfg.vocab_size,
                H_cycles=cfg.h_cycles, L_cycles=cfg.l_cycles, H_layers=0, L_layers=cfg.l_layers,
                hidden_size=cfg.hidden_size, expansion=cfg.expansion, num_heads=cfg.num_heads,
                pos_encodings=cfg.pos_encodings, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                halt_max_steps=cfg.halt_max_steps, halt_exploration_prob=cfg.halt_exploration_prob,
                forward_dtype=forward_dtype, mlp_t=cfg.mlp_t, puzzle_emb_len=cfg.puzzle_emb_len,
                no_ACT_continue=cfg.no_act_continue)


def import_official(path: str | None):
    """(model class, loss-head class) of the official code at `path`, or a UserError saying what to do."""
    path = path or os.environ.get("LMLAB_TRM_REFERENCE")
    if not path or not (Path(path) / "models" / "recursive_reasoning" / "trm.py").is_file():
        raise UserError("the official TRM code is needed: clone github.com/SamsungSAILMontreal/TinyRecursiveModels "
                        "and pass trm_reference=DIR (or set LMLAB_TRM_REFERENCE)")
    import importlib.util

    if importlib.util.find_spec("einops") is None:
        raise UserError("the official TRM code needs einops: pip install einops")
    if path not in sys.path:
        sys.path.insert(0, str(path))
    from models.losses import ACTLossHead  # type: ignore
    from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1  # type: ignore
    return TinyRecursiveReasoningModel_ACTV1, ACTLossHead


def copy_to_official(ours, official) -> None:
    """Copy an lmlab TRM's weights (and initial states) into an official model."""
    mine = dict(ours.named_parameters()) | dict(ours.named_buffers())
    theirs = dict(official.inner.named_parameters()) | dict(official.inner.named_buffers())
    with torch.no_grad():
        for a, b in official_names(ours.cfg).items():
            theirs[b].copy_(mine[a].to(theirs[b].dtype))


def bench_model_config(cfg):
    """The TRM the `trm` and `trm-jax` benches time, from the bench's trm_* options."""
    from lmlab.models.trm import TRMConfig

    return TRMConfig(seq_len=cfg.trm_seq_len, vocab_size=cfg.trm_vocab, num_puzzle_identifiers=1,
                     hidden_size=cfg.trm_hidden, num_heads=max(1, cfg.trm_hidden // 64), h_cycles=cfg.trm_h_cycles,
                     l_cycles=cfg.trm_l_cycles, mlp_t=cfg.trm_mlp_t, pos_encodings="none" if cfg.trm_mlp_t else "rope")


def bench_trm(cfg, device) -> dict:
    from lmlab.bench_timing import interleaved as _interleaved
    from lmlab.bench_timing import median as _median
    from lmlab.models.trm import TRM
    from lmlab.train.trm_losses import act_loss
    from lmlab.train.trm_optim import TRMOptimizer

    Official, Head = import_official(cfg.trm_reference)
    mcfg = bench_model_config(cfg)
    torch.manual_seed(cfg.seed)
    ours = TRM(mcfg).to(device).train()
    bf16 = device.type == "cuda"
    with torch.device(device):
        official = Official(official_config(mcfg, cfg.batch_size, "bfloat16" if bf16 else "float32"))
        head = Head(official, loss_type="stablemax_cross_entropy").train()
    copy_to_official(ours, official)
    g = torch.Generator().manual_seed(cfg.seed)
    labels = torch.randint(1, mcfg.vocab_size, (cfg.batch_size, mcfg.seq_len), generator=g).int()
    batch = {"inputs": torch.randint(1, mcfg.vocab_size, (cfg.batch_size, mcfg.seq_len), generator=g).int(),
             "labels": labels, "puzzle_identifiers": torch.zeros(cfg.batch_size, dtype=torch.int32)}
    batch = {k: v.to(device) for k, v in batch.items()}
    ref_batch = {**batch, "labels": torch.where(batch["labels"] == 0, -100, batch["labels"])}
    opt_ours = TRMOptimizer(ours, "adam_atan2", 1e-4, (0.9, 0.95), 0.1, 1e-4, 0.1)
    opt_ref = TRMOptimizer(torch.nn.ModuleList([official]), "adam_atan2", 1e-4, (0.9, 0.95), 0.1, 1e-4, 0.1)
    state = {"ours": ours.initial_carry(cfg.batch_size, device=device)}
    with torch.device(device):
        state["ref"] = head.initial_carry(batch)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else torch.enable_grad

    def step_ours():
        with autocast():
            state["ours"], out = ours(state["ours"], batch)
            c = state["ours"]
            loss = act_loss(out, c.labels.long(), c.halted, c.steps).loss
        (loss / cfg.batch_size).backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_ref():
        state["ref"], loss, _, _, _ = head(carry=state["ref"], batch=ref_batch, return_keys=[])
        (loss / cfg.batch_size).backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)

    times = _interleaved({"lmlab": step_ours, "official": step_ref}, cfg.warmup, cfg.repeats * cfg.steps, device)
    pps = {k: cfg.batch_size / _median(v) for k, v in times.items()}
    out = {"what": "trm", "params": ours.num_params(), "puzzles_per_s": pps, "ratio": pps["lmlab"] / pps["official"],
           "times_s": times, "flops_per_example": ours.flops_per_example()}
    if device.type == "cuda":
        from lmlab.train.loop import peak_flops

        peak = peak_flops(device)
        if peak:
            out["mfu"] = {k: v * ours.flops_per_example() / peak for k, v in pps.items()}
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out
