"""Estimate a training run's per-process memory and tokens/s before launching it.

    lmlab plan pretrain model.preset=base train.batch_size=16 --gpu rtx4090-24gb
    lmlab plan pretrain --config configs/stages/pretrain_tiny.yaml hardware=auto
    lmlab plan sft init=runs/cpu/model seq_len=512 --world-size 8 parallel.strategy=fsdp --gpu a100-40gb
    lmlab plan dpo init=runs/cpu/sft train.batch_size=4 --memory-gib 16 --json
    lmlab plan sft init=runs/griffin-2b seq_len=2048 parallel.activation_checkpointing=true --gpu rtx4090-24gb

The same config as the stage (file, then key=value overrides, then the `hardware:` preset for
the keys left unset) becomes a table of what one process holds at its peak: fp32 weights,
gradients and AdamW's two moments (divided by the world size under FSDP), autocast's bf16
weight copies, DDP's gradient buckets or FSDP's gathered blocks, the activations every block
saves for backward (or, with activation checkpointing, only its input plus one recomputed
block), the chunked loss's buffers and a stated allowance for the CUDA context. The verdict
says whether that fits the device (the detected one, `--gpu PRESET`, or `--memory-gib X`) and,
when it does not, by how much and what would fit instead; it exits 2 then.

Model sizes are exact: the model is built on the `meta` device (no memory, no weights) from
the stage's model config (pretrain: `model` + the vocabulary of the packed data's tokenizer;
sft/dpo: the `init` model's model.json). Two ways to the bytes (`--method`): for the
transformer, an analytic model that follows its forward (lmlab/models/transformer.py) tensor by
tensor and knows CUDA's kernels (see `block_activation_bytes`); for every other family (Griffin),
or on request, a trace of one training step on fake tensors (lmlab.plan_trace), which needs no
description of the model. scripts/plan_check.py compares both with measured peaks
(docs/hardware.md); lmlab.plan_format prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from lmlab.errors import UserError

VERBS = ("pretrain", "sft", "dpo")
GIB = 2 ** 30
MFU = 0.40              # assumed model FLOPs utilisation: nanoGPT reached 37% on A100, nanochat ~47% on H100
CE_CHUNK = 256          # rows per chunk of LinearCrossEntropy (the `chunk` argument in Transformer.forward)
CUDA_CONTEXT_GIB = 1.0  # CUDA context, kernels and cuBLAS/cuDNN workspaces: outside torch's allocator
NCCL_GIB = 0.5          # NCCL communicator buffers per process when several processes train together
FRAGMENTATION = 0.05    # the caching allocator's blocks are rarely packed full
CPU_PROCESS_GIB = 0.35  # resident Python + torch + lmlab after the imports (0.23 GiB) + code and thread pools touched
CPU_MALLOC = 0.40       # glibc keeps freed blocks under its 32 MiB mmap threshold for reuse: resident, not live
DEFAULT_VOCAB = 32768   # the tokenizer stage's default vocabulary, when no tokenizer says otherwise


@dataclass(frozen=True)
class ModelDims:
    """What the estimate needs to know about the model (counted on the meta device)."""

    name: str
    params: int             # all parameters, a tied matrix once
    trainable: int          # with LoRA: the adapters only
    matmul: int             # weights that enter a matmul (autocast casts them to bf16), the head even when tied
    block_params: int       # one block's parameters (what FSDP gathers at a time)
    trainable_block: int    # of which trainable (LoRA: the block's adapters)
    n_layer: int
    d_model: int
    n_head: int
    kv_dim: int             # n_kv_head * head_dim
    ffn_dim: int
    vocab: int
    qk_norm: bool
    head_trainable: bool    # the output head (the embedding when tied) gets a gradient
    embed_trainable: bool
    tied: bool


@dataclass(frozen=True)
class RunShape:
    """One process's share of a step."""

    rows: int               # sequences per forward pass
    seq: int                # positions per sequence
    forwards: int           # forward/backward passes per optimizer step
    world: int
    strategy: str           # none | ddp | fsdp
    checkpointing: bool
    bf16: bool              # autocast to bf16
    device: str             # cuda | cpu
    loss: str = "fused"     # fused: chunked LinearCrossEntropy; logits: (n, V) logits at every position (dpo)
    packed_mask: bool = False   # sft packing: a (B, 1, T, T) document mask goes to every block's SDPA
    fsdp_param_bf16: bool = True
    reshard_after_forward: bool = True


@dataclass(frozen=True)
class Target:
    name: str
    device: str             # cuda | cpu
    memory: int             # bytes
    peak_flops: float | None   # dense bf16 FLOP/s (lmlab.train.loop.PEAK_BF16_FLOPS)


# ----------------------------------------------------------------------------- the memory model

def block_activation_bytes(m: ModelDims, bf16: bool, fused_norm: bool) -> float:
    """Bytes one block saves for backward per token, from Block/Attention/MLP.forward.

    The residual stream stays fp32 (the embedding is fp32, and fp32 + bf16 is fp32); matmul
    outputs are bf16 under autocast. Per block:
      2 RMSNorms: the fp32 input (+ the fp32 normalised input where rms_norm decomposes into
        pow/rsqrt/mul, as on CPU; CUDA's fused kernel keeps only the input and rstd);
        their outputs as the next matmul saves them (bf16 under autocast)
      attention: q and k after RoPE (new tensors), the whole qkv output (v is a view of it, so
        all of it stays alive), SDPA's output (also o_proj's input: the transpose is a view)
        and its fp32 logsumexp per head; RoPE's cos/sin tables are shared by every token.
        SDPA is the flash/memory-efficient kernel: no T x T matrix is kept
      SwiGLU: the gate_up output (2 x ffn; gate and up are views of it), silu(gate), and
        silu(gate) * up (down_proj's input)
    """
    a, res, d, kv, f = (2 if bf16 else 4), 4, m.d_model, m.kv_dim, m.ffn_dim
    norm = res * d + (0 if fused_norm else res * d) + a * d
    # QK-norm on bf16 q/k with fp32 gains takes rms_norm's composite path even on CUDA: it saves
    # the fp32 upcast (bf16 only) and the fp32 normalised heads; fused in fp32 it keeps the input
    qk_norm = 0 if not m.qk_norm or (fused_norm and not bf16) else (8 if bf16 else 4) * (d + kv)
    attn = a * d + a * kv + a * (d + 2 * kv) + a * d + 4 * m.n_head + qk_norm
    mlp = a * 2 * f + a * f + a * f
    return 2 * norm + attn + mlp


def block_backward_bytes(m: ModelDims, bf16: bool) -> float:
    """Bytes per token that one block's backward holds beyond its saved activations.

    The SwiGLU backward makes the gradients of silu(gate), up and gate and concatenates them
    for gate_up (4 x ffn) while freeing the down_proj input and silu's output (2 x ffn);
    attention's makes those of q, k, v and their concatenation; both carry the fp32
    gradient of the residual stream, twice at the add.
    """
    a = 2 if bf16 else 4
    return max(2 * m.ffn_dim, 2 * (m.d_model + 2 * m.kv_dim)) * a + 8 * m.d_model


def estimate(m: ModelDims, r: RunShape) -> dict:
    """Per-process bytes of each component, the two peaks and the overall peak (tensors only).

    Peak A, forward and backward: weights, AdamW state, every block's activations and the
    larger of `loss` (the loss's forward: its saved buffers and a chunk of logits; its
    backward: those buffers and their scaled copies) and `block_backward` (going down the
    blocks: the head's gradient, the gradients of the blocks done so far, a block's gradient
    temporaries and, with checkpointing, its recomputed activations), plus all gradients when
    a step has several forwards (they accumulate). Peak B, the optimizer step: weights,
    gradients, AdamW state and its temporaries.
    """
    W = r.world
    shard = W if r.strategy == "fsdp" else 1
    a = 2 if r.bf16 else 4
    tokens = r.rows * r.seq
    fused_norm = r.device == "cuda"
    d, V, L = m.d_model, m.vocab, m.n_layer
    hd = m.d_model // m.n_head
    c: dict[str, float] = {}
    c["weights"] = 4 * m.params / shard
    c["gradients"] = 4 * m.trainable / shard
    c["adamw"] = 8 * m.trainable / shard
    # autocast casts each weight to bf16 once per forward and the matmuls keep those copies for
    # backward; FSDP with bf16 parameters gathers them in bf16 already (and frees them per block)
    casts = r.bf16 and not (r.strategy == "fsdp" and r.fsdp_param_bf16)
    c["bf16_copies"] = 2 * m.matmul if casts else 0
    c["ddp_buckets"] = 4 * m.trainable if r.strategy == "ddp" else 0  # DDP's flat copy of the gradients
    if r.strategy == "fsdp":
        p = 2 if r.fsdp_param_bf16 else 4
        gathered_blocks = 2 if r.reshard_after_forward else L  # the running block and the prefetched one
        root = m.params - L * m.block_params                   # embedding, head, final norm: one group
        c["fsdp_gathered"] = (root + gathered_blocks * m.block_params) * p + 4 * m.block_params  # + a block's grads
    else:
        c["fsdp_gathered"] = 0
    per_token = block_activation_bytes(m, r.bf16, fused_norm)
    # with activation checkpointing each block keeps only its fp32 input; its backward first
    # recomputes the block's activations (after the loss's buffers are gone)
    c["activations"] = tokens * L * (4 * d if r.checkpointing else per_token)
    recompute = tokens * per_token if r.checkpointing else 0
    if r.packed_mask:
        # two bool (B, T, T) masks (same-document, and it & causal) live through the forward;
        # SDPA saves an additive copy in each block; RoPE tables become per row (fp32 + cast)
        blocks_holding = 1 if r.checkpointing else L
        rope = tokens * hd * 2 * (4 + (2 if r.bf16 else 0))
        c["activations"] += r.rows * r.seq ** 2 * (2 + a * blocks_holding) + rope
    final_norm = tokens * (4 * d + (0 if fused_norm else 4 * d))  # what the last RMSNorm saves
    head_grad = 4 * V * d if m.head_trainable else 0
    if r.loss == "fused":
        # LinearCrossEntropy: grad_h (tokens x d) and the head's fp32 gradient are computed in the
        # forward and saved; a chunk of 256 rows of logits is live then (with the previous chunk
        # and logsumexp's temporary: 12 bytes per logit; 8 when the batch is one chunk), next to
        # the norm's output (and its bf16 cast). Backward scales both saved gradients into new
        # tensors.
        grad_h = tokens * a * d
        chunk = min(CE_CHUNK, tokens) * V * (12 if tokens > CE_CHUNK else 8)
        loss_fwd = final_norm + tokens * (4 * d + (2 * d if r.bf16 else 0)) + grad_h + head_grad + chunk
        loss_bwd = final_norm + 2 * (grad_h + head_grad)
    else:
        # dpo: fp32 logits at the completion positions (upper bound: every position) saved by
        # logsumexp; its backward, gather's and their sum: three more fp32 copies (+ a bf16 one)
        loss_fwd = final_norm + tokens * (4 * d + V * (8 + (2 if r.bf16 else 0)))
        loss_bwd = final_norm + tokens * (a * d + V * (16 + (2 if r.bf16 else 0)))
    c["loss"] = max(loss_fwd, loss_bwd)
    # Going down the blocks, block i's backward holds the activations of blocks 0..i and the
    # finished gradients of blocks i+1..L-1: the most at the last block or at the first (linear
    # in i). With several forwards per step all gradients exist already (they accumulate).
    saved = c["activations"] / L                       # one block's saved activations
    block_grads = 4 * m.trainable_block / shard        # FSDP reduce-scatters each block's gradient at once
    grads_live = c["gradients"] if r.forwards > 1 else 0
    down_the_blocks = 0 if r.forwards > 1 else max(0, (L - 1) * (block_grads - saved))
    c["block_backward"] = head_grad + recompute + tokens * block_backward_bytes(m, r.bf16) + down_the_blocks
    static = c["weights"] + c["adamw"] + c["ddp_buckets"]
    working = max(c["loss"], c["block_backward"])  # one after the other, never together
    peak_a = static + c["bf16_copies"] + c["fsdp_gathered"] + c["activations"] + working + grads_live
    # the untied embedding's dense gradient arrives last; AdamW's foreach path needs one
    # parameter-sized temporary (sqrt of the second moment), CUDA's fused kernel none
    emb_grad = 4 * V * d if (m.embed_trainable and not m.tied) else 0
    opt_temp = 0 if r.device == "cuda" else 4 * m.trainable / shard
    peak_b = static + c["gradients"] + max(emb_grad, opt_temp)
    return {"components": c, "per_token_block_bytes": per_token, "peak_backward": peak_a, "peak_step": peak_b,
            "peak": max(peak_a, peak_b)}


def allowance(r: RunShape, tensors: float) -> float:
    """Bytes outside the tensors: the CUDA context (+ NCCL) and fragmentation, or the CPU process."""
    if r.device == "cuda":
        return (CUDA_CONTEXT_GIB + (NCCL_GIB if r.world > 1 else 0)) * GIB + FRAGMENTATION * tensors
    return CPU_PROCESS_GIB * GIB + CPU_MALLOC * tensors


def total_bytes(m: ModelDims, r: RunShape) -> float:
    peak = estimate(m, r)["peak"]
    return peak + allowance(r, peak)


# ----------------------------------------------------------------------------- the model's dims

def model_dims(model, lora=None) -> ModelDims:
    """ModelDims of a (meta-device) Transformer; `lora` is a LoraConfig when adapters are trained."""
    import torch.nn as nn

    if getattr(model, "family", "transformer") != "transformer":
        raise UserError(f"lmlab plan models the transformer's activations; the '{model.family}' family is not covered")
    c = model.cfg
    matmul = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, nn.Linear))
    params = model.num_params()
    block_params = sum(p.numel() for p in model.blocks[0].parameters())
    trainable, trainable_block = params, block_params
    if lora is not None and lora.enabled:
        from lmlab.models.lora import targets_of
        targets = targets_of(model, lora)

        def adapters(module) -> int:
            return sum(lora.r * (mod.in_features + mod.out_features) + (mod.out_features if lora.use_dora else 0)
                       for name, mod in module.named_modules()
                       if isinstance(mod, nn.Linear) and name.split(".")[-1] in targets)
        trainable, trainable_block = adapters(model), adapters(model.blocks[0])
    full = trainable == params
    return ModelDims(name=c.preset, params=params, trainable=trainable, matmul=matmul,
                     block_params=block_params, trainable_block=trainable_block, n_layer=c.n_layer,
                     d_model=c.d_model, n_head=c.n_head, kv_dim=c.n_kv_head * (c.d_model // c.n_head),
                     ffn_dim=c.ffn_dim, vocab=c.vocab_size, qk_norm=bool(c.qk_norm), head_trainable=full,
                     embed_trainable=full, tied=bool(c.tie_embeddings))


def build_meta(model_cfg):
    """The model on the meta device: exact parameter counts, no memory."""
    import torch

    from lmlab.models.family import get_family
    with torch.device("meta"):
        return get_family(getattr(model_cfg, "family", "transformer")).build(model_cfg)


def _packed_info(cfg) -> tuple[int | None, int | None]:
    """(vocab size, packed seq_len) from the first packed dataset, when it is there to read."""
    if not cfg.data:
        return None, None
    from lmlab import artifacts
    m = artifacts.read_manifest(cfg.data[0].path)
    if not m:
        return None, None
    seq = (m.get("stats") or {}).get("seq_len")
    tok = ((m.get("inputs") or {}).get("tokenizer") or {}).get("path")
    try:
        vocab = int(json.loads((Path(tok) / "tokenizer_meta.json").read_text())["vocab_size"]) if tok else None
    except (OSError, ValueError, KeyError):
        vocab = None
    return vocab, seq


def _init_model_config(init: str):
    """The ModelConfig of a finetuning stage's `init` (an lmlab model dir or an HF directory)."""
    from lmlab.models.family import get_family, split_model_json
    d = Path(init)
    if (d / "model.json").is_file():
        family, fields = split_model_json(json.loads((d / "model.json").read_text()))
        if get_family(family).kind != "lm":
            raise UserError(f"lmlab plan covers language models (pretrain, sft, dpo); init {init} is a "
                            f"'{family}' model")
        return get_family(family).config(fields)
    base = d / "base.json"  # an unmerged LoRA run: the base model it adapts
    if base.is_file():
        return _init_model_config(json.loads(base.read_text())["path"])
    if (d / "config.json").is_file():
        from lmlab.models.hf import model_config_from_hf
        return model_config_from_hf(json.loads((d / "config.json").read_text()), str(d / "config.json"))
    raise UserError(f"init {d} holds no model.json (lmlab model) or config.json (HF model); set init=RUN_DIR")


def resolve_model(verb: str, cfg, vocab_size: int | None) -> tuple[object, int, str]:
    """-> (the model's resolved config, positions per sequence, where the vocabulary came from)."""
    from lmlab.models.family import get_family
    if verb != "pretrain":
        mc = _init_model_config(cfg.init)
        return mc, (cfg.seq_len if verb == "sft" else cfg.max_len) or mc.max_seq_len, f"init {cfg.init}"
    data_vocab, packed_seq = _packed_info(cfg)
    vocab = data_vocab or vocab_size
    source = ("the packed data's tokenizer" if data_vocab else "--vocab-size" if vocab_size
              else "model.vocab_size" if cfg.model.vocab_size else "the tokenizer default (no packed data to read)")
    family = get_family(getattr(cfg.model, "family", "transformer"))
    mc = family.config(cfg.model, vocab_size=vocab or (None if cfg.model.vocab_size else DEFAULT_VOCAB))
    seq = (cfg.train.seq_len or packed_seq or mc.max_seq_len) - 1  # the model sees x = row[:-1]
    return mc, seq, source


# ----------------------------------------------------------------------------- the device

def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _peak_for(name: str) -> float | None:
    from lmlab.train.loop import PEAK_BF16_FLOPS
    return next((f for key, f in PEAK_BF16_FLOPS if key in name), None)


def resolve_target(gpu: str | None, memory_gib: float | None, record: dict | None, device: str) -> Target:
    """The device to plan for: --memory-gib, else --gpu PRESET, else the hardware preset, else this machine."""
    from lmlab.train.hardware import load_preset
    preset = gpu or (record["preset"] if record else None)
    if preset is not None:
        match = load_preset(preset).get("match", {})
        kind = match.get("device", "cuda")
        if kind == "cpu":
            mem, peak = _ram_bytes(), None
        else:
            if "total_gib" not in match and memory_gib is None:
                raise UserError(f"hardware preset {preset} has no match.total_gib; add it or pass --memory-gib X")
            mem = int(match.get("total_gib", 0) * GIB)
            peak = next((p for p in map(_peak_for, match.get("names", [])) if p), None)
        name = preset
    else:
        import torch
        if device != "cpu" and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            kind, name, mem, peak = "cuda", props.name, props.total_memory, _peak_for(props.name)
        else:
            kind, name, mem, peak = ("cuda", "a GPU", 0, None) if memory_gib else ("cpu", "this machine's RAM",
                                                                                   _ram_bytes(), None)
    if memory_gib is not None:
        name, mem = f"{memory_gib:g} GiB" + (f" ({name})" if preset else ""), int(memory_gib * GIB)
    return Target(name=name, device=kind, memory=mem, peak_flops=peak)


# ----------------------------------------------------------------------------- the plan

def run_shape(verb: str, cfg, seq: int, world: int, target: Target, micro_batch: int | None = None,
              strategy: str | None = None, checkpointing: bool | None = None) -> RunShape:
    """One process's share of the stage's step on `target` (overrides for the suggestions)."""
    from lmlab.runtime import cpu_has_native_bf16
    from lmlab.train.batching import rank_pieces
    t, p = cfg.train, cfg.parallel
    strategy = strategy or p.strategy
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if strategy == "none" and world > 1:
        raise UserError(f"parallel.strategy=none runs one process, not --world-size {world}; use ddp, fsdp or auto")
    # the loop's own split of the global batch (lmlab.train.batching): rank 0's forward passes
    mb = micro_batch if micro_batch is not None else t.micro_batch
    pieces = rank_pieces(t.batch_size, t.grad_accum, world, 0, mb)
    rows = max((s.stop - s.start) if s is not None else t.batch_size for _, s in pieces)
    bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and (target.device == "cuda" or cpu_has_native_bf16()))
    seqs = 2 if verb == "dpo" else 1  # a preference pair is two sequences, chosen and rejected
    if checkpointing is None:
        checkpointing = p.activation_checkpointing
    return RunShape(rows=rows * seqs, seq=seq, forwards=len(pieces), world=world,
                    strategy=strategy, checkpointing=checkpointing,
                    bf16=bf16, device=target.device, loss="logits" if verb == "dpo" else "fused",
                    packed_mask=verb == "sft" and cfg.packing,
                    fsdp_param_bf16=p.fsdp_param_dtype == "bfloat16" or (p.fsdp_param_dtype == "auto" and bf16),
                    reshard_after_forward=p.reshard_after_forward)


def throughput(model, r: RunShape, target: Target, cfg, verb: str) -> dict | None:
    """Tokens/s and step time at MFU of the device's dense bf16 peak (TF32, half of it, in fp32)."""
    if not target.peak_flops:
        return None
    peak = target.peak_flops * (1 if r.bf16 else 0.5)
    flops = model.flops_per_token(r.seq) * (4 / 3 if r.checkpointing else 1)  # a recomputed forward: 2 of 6 FLOPs
    per_gpu = MFU * peak / flops
    seqs = 2 if verb == "dpo" else 1
    step_tokens = cfg.train.batch_size * cfg.train.grad_accum * seqs * r.seq
    return {"tokens_per_s": per_gpu * r.world, "tokens_per_s_per_process": per_gpu,
            "step_s": step_tokens / (per_gpu * r.world), "mfu": MFU, "peak_flops": peak, "flops_per_token": flops}


def suggestions(verb, cfg, seq, world, target, measure, r: RunShape) -> list[dict]:
    """Changes that make a run that does not fit fit, each with its estimate.

    `measure(shape)` is a run shape's bytes per process (the analytic model or a trace); the
    largest micro-batch that fits is found by bisection (the peak grows with the rows), so a
    traced plan takes a few traces, not one per candidate."""
    from lmlab.train.hardware import list_presets, load_preset
    out = []

    def fits(shape):
        return measure(shape) <= target.memory

    def largest_rows(**kw) -> int | None:
        share = cfg.train.batch_size // (world // math.gcd(world, cfg.train.grad_accum))  # rows per piece
        lo, hi = 0, share  # rows lo fit (0: none known), rows hi + 1 do not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(run_shape(verb, cfg, seq, world, target, micro_batch=mid, **kw)):
                lo = mid
            else:
                hi = mid - 1
        return lo or None

    checkpointing_fits = False
    if not r.checkpointing:
        ac = run_shape(verb, cfg, seq, world, target, checkpointing=True)
        checkpointing_fits = fits(ac)
        out.append({"change": "parallel.activation_checkpointing=true", "bytes": measure(ac),
                    "fits": checkpointing_fits})
    rows = largest_rows()
    if rows is not None:
        shape = run_shape(verb, cfg, seq, world, target, micro_batch=rows)
        out.append({"change": f"train.micro_batch={rows}", "bytes": measure(shape), "fits": True})
    elif not r.checkpointing and not checkpointing_fits and (rows := largest_rows(checkpointing=True)) is not None:
        shape = run_shape(verb, cfg, seq, world, target, micro_batch=rows, checkpointing=True)
        out.append({"change": f"parallel.activation_checkpointing=true train.micro_batch={rows}",
                    "bytes": measure(shape), "fits": True})
    if r.strategy != "fsdp" and world > 1:
        shape = run_shape(verb, cfg, seq, world, target, strategy="fsdp")
        out.append({"change": f"parallel.strategy=fsdp (at --world-size {world})", "bytes": measure(shape),
                    "fits": fits(shape)})
    bigger = []
    for name in list_presets():
        match = load_preset(name).get("match", {})
        if match.get("device") == "cuda" and match.get("total_gib", 0) * GIB > target.memory:
            bigger.append((match["total_gib"], name))
    need = measure(replace(r, device="cuda"))
    fitting = [name for gib, name in sorted(bigger) if gib * GIB >= need]
    if fitting:
        out.append({"change": f"a bigger device (--gpu {fitting[0]})", "bytes": need, "fits": True})
    return out


METHODS = ("auto", "analytic", "trace")


def _method(method: str, family: str) -> str:
    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "auto":
        return "analytic" if family == "transformer" else "trace"
    if method == "analytic" and family != "transformer":
        raise UserError(f"--method analytic models the transformer's tensors; a '{family}' model is planned by "
                        f"tracing its step (--method trace, the default for it)")
    return method


def _analytic(model, cfg, r: RunShape) -> tuple[dict, object]:
    """The analytic plan's parts, and its measure for the suggestions."""
    m = model_dims(model, getattr(cfg, "lora", None))
    est = estimate(m, r)
    extra = allowance(r, est["peak"])
    return {"method": "analytic", "model": asdict(m), "components": {**est["components"], "allowance": extra},
            "per_token_block_bytes": est["per_token_block_bytes"], "peak_backward": est["peak_backward"],
            "peak_step": est["peak_step"], "peak_tensors": est["peak"], "total": est["peak"] + extra}, \
        lambda shape: total_bytes(m, shape)


def _traced(verb, model, model_cfg, cfg, r: RunShape) -> tuple[dict, object]:
    """The traced plan's parts (lmlab.plan_trace), and its measure (traces are kept per shape)."""
    from lmlab.plan_trace import trace_step
    traces: dict = {}

    def trace(shape):
        if shape not in traces:
            traces[shape] = t = trace_step(verb, model_cfg, cfg, shape, shape.device)
            # progress on stderr (a plan that does not fit traces its suggestions too)
            print(f"plan: traced a step of {shape.rows} x {shape.seq} positions (strategy {shape.strategy}, "
                  f"checkpointing {'on' if shape.checkpointing else 'off'}, {shape.device}) in {t.seconds:.1f} s",
                  file=sys.stderr, flush=True)
        return traces[shape]

    def measure(shape) -> float:
        peak = trace(shape).peak
        return peak + allowance(shape, peak)

    t = trace(r)
    c = model_cfg
    extra = allowance(r, t.peak)
    dims = {"family": c.family if hasattr(c, "family") else "transformer", "name": c.preset, "params": t.params,
            "trainable": t.trainable, "n_layer": len(model.blocks), "d_model": getattr(c, "width", None)
            or getattr(c, "d_model", None), "vocab": c.vocab_size}
    parts = {"weights": t.weights, "gradients": t.gradients, "optimizer": t.optimizer, "ddp_buckets": t.ddp_buckets,
             "working": t.working, "allowance": extra}
    return {"method": "trace", "model": dims, "components": parts, "peak_phase": t.peak_phase,
            "peak_tensors": t.peak, "total": t.peak + extra, "trace_seconds": t.seconds}, measure


def plan(verb: str, cfg, *, world: int = 1, gpu: str | None = None, memory_gib: float | None = None,
         vocab_size: int | None = None, method: str = "auto") -> dict:
    """The whole plan as a dict (what --json prints): model, run, target, components, verdict."""
    from lmlab.train.hardware import apply_hardware
    if world < 1:
        raise UserError(f"--world-size must be at least 1, got {world}")
    cfg, record = apply_hardware(cfg)
    model_cfg, seq, vocab_source = resolve_model(verb, cfg, vocab_size)
    method = _method(method, getattr(model_cfg, "family", "transformer"))
    model = build_meta(model_cfg)
    target = resolve_target(gpu, memory_gib, record, cfg.train.device)
    r = run_shape(verb, cfg, seq, world, target)
    parts, measure = _analytic(model, cfg, r) if method == "analytic" else _traced(verb, model, model_cfg, cfg, r)
    fits = parts["total"] <= target.memory
    return {
        "verb": verb, **parts, "vocab_from": vocab_source, "run": asdict(r), "target": asdict(target),
        "hardware": record, "fits": fits, "margin": target.memory - parts["total"],
        "suggestions": [] if fits else suggestions(verb, cfg, seq, world, target, measure, r),
        "throughput": throughput(model, r, target, cfg, verb),
        "batch": {"batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
                  "micro_batch": cfg.train.micro_batch},
        "assumptions": {"mfu": MFU, "cuda_context_gib": CUDA_CONTEXT_GIB, "nccl_gib": NCCL_GIB,
                        "fragmentation": FRAGMENTATION, "cpu_process_gib": CPU_PROCESS_GIB,
                        "cpu_malloc": CPU_MALLOC},
    }


# ----------------------------------------------------------------------------- the command

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lmlab plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("verb", choices=VERBS, help="the training stage to plan")
    ap.add_argument("--config", metavar="FILE.yaml", help="the stage's YAML config (overrides follow it)")
    ap.add_argument("--world-size", type=int, default=1, metavar="N", help="processes (GPUs) the run uses")
    dev = ap.add_mutually_exclusive_group()
    dev.add_argument("--gpu", metavar="PRESET", help="plan for this hardware preset's device (configs/hardware)")
    dev.add_argument("--memory-gib", type=float, metavar="X", help="plan for a device with X GiB")
    ap.add_argument("--vocab-size", type=int, metavar="V", help="pretrain without readable data: the vocabulary")
    ap.add_argument("--method", choices=METHODS, default="auto",
                    help="analytic: the transformer's memory model; trace: one step on fake tensors (any family); "
                         "auto: analytic for transformers, trace for the others")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, as for the stage")
    return ap


def main(argv: list[str]) -> dict:
    """`lmlab plan VERB ...`: print the plan; raise UserError (exit 2) when the run does not fit."""
    import importlib

    from lmlab.config import load_config
    from lmlab.plan_format import format_plan, verdict_line
    from lmlab.stages import STAGES
    args = build_parser().parse_intermixed_args(argv)
    module = importlib.import_module(STAGES[args.verb][0])
    cfg = load_config(module.Config, args.config, list(args.overrides))
    p = plan(args.verb, cfg, world=args.world_size, gpu=args.gpu, memory_gib=args.memory_gib,
             vocab_size=args.vocab_size, method=args.method)
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
    sys.stdout.flush()
    if not p["fits"]:
        raise UserError(verdict_line(p))
    return p
