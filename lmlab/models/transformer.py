"""The LLaMA-style decoder-only transformer.

Pre-RMSNorm blocks with rotary position embeddings (the Hugging Face Llama `rotate_half`
convention, so export needs no weight permutation), grouped-query attention through
`torch.nn.functional.scaled_dot_product_attention`, a SwiGLU MLP, optional per-head QK-norm
(as Qwen3 does), tied or untied embeddings, no biases (q/k/v biases as an option, as Qwen2),
optionally a learned attention sink per head (`attn_sink`, see `sink_attention`), and optionally
layers without the rotary embedding (`nope_layers`: SmolLM3 leaves it out of every 4th layer).

    from lmlab.models.transformer import Transformer, resolve_model_config
    cfg = resolve_model_config({"preset": "tiny"}, vocab_size=32768)
    model = Transformer(cfg)
    logits, _ = model(idx)                                   # (B, T, V)
    _, loss = model(x, y, return_logits=False)               # training: mean CE over y != -100
    _, loss = model(x, y, doc_ids=doc_ids)                   # packed documents kept apart
    cache = model.new_cache(B, max_len, device, dtype)       # incremental decoding
    logits, _ = model(prompt, cache=cache); logits, _ = model(next_tok, cache=cache)

Print the presets' sizes with `python -m lmlab.models.transformer`.

The q/k/v projections are one fused matrix and so are the gate/up projections of the MLP:
one large matmul is faster than three small ones, on CPU especially. `lmlab.models.hf`
splits them back into the Hugging Face layout on export.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from lmlab.config import Strict
from lmlab.errors import UserError
from lmlab.models.kv_cache import KVCache, rotate_half
from lmlab.models.parts import fill_vocab
from lmlab.models.fused_ce import lm_outputs

# (mask (B, T) bool, values (n, d_model)): input vectors in place of the masked positions' embeddings
Vectors = tuple[torch.Tensor, torch.Tensor]


class ModelConfig(Strict):
    """Shape of the transformer. Fields left unset (None) take the preset's value."""

    family: Literal["transformer"] = Field("transformer", description="model family: transformer (this) or griffin")
    preset: str = Field("tiny", description="size preset that fills every field left unset: micro, tiny, small, base")
    vocab_size: Optional[int] = Field(None, ge=2, description="vocabulary size; unset = the tokenizer's vocab size")
    n_layer: Optional[int] = Field(None, ge=1, description="number of transformer blocks")
    d_model: Optional[int] = Field(None, ge=8, description="width of the residual stream")
    n_head: Optional[int] = Field(None, ge=1, description="number of query heads (head_dim = d_model / n_head)")
    n_kv_head: Optional[int] = Field(None, ge=1, description="number of key/value heads (grouped-query attention); must divide n_head")
    ffn_dim: Optional[int] = Field(None, ge=1, description="hidden width of the SwiGLU MLP")
    max_seq_len: Optional[int] = Field(None, ge=1, description="longest context the model is trained for")
    rope_theta: Optional[float] = Field(None, gt=0, description="RoPE base frequency")
    norm_eps: Optional[float] = Field(None, gt=0, description="RMSNorm epsilon")
    qk_norm: Optional[bool] = Field(None, description="RMSNorm each query and key head before RoPE (as Qwen3 does)")
    tie_embeddings: Optional[bool] = Field(None, description="share the input embedding matrix with the output head")
    init_std: Optional[float] = Field(None, gt=0, description="std of the normal init; output projections get init_std/sqrt(2*n_layer)")
    attn_bias: bool = Field(False, description="q/k/v projection biases, as Qwen2 (the output projection has none)")
    attn_sink: bool = Field(False, description="a learned attention sink: one logit per head that every query's "
                            "softmax also weighs, with a zero value, so a head can attend to nothing (as gpt-oss)")
    nope_layers: list[int] = Field(default_factory=list, description="indices (from 0) of the layers whose attention "
                                   "has no rotary embedding (NoPE), as SmolLM3's every 4th layer: 3, 7, 11, ...")


_COMMON = dict(rope_theta=10000.0, norm_eps=1e-5, qk_norm=False, init_std=0.02)
# Parameter counts below are with vocab_size=32768 (see docs/model.md for the table).
PRESETS: dict[str, dict] = {
    # for tests: a few thousand parameters plus the embeddings
    "micro": dict(n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_dim=128, max_seq_len=256,
                  tie_embeddings=True, **_COMMON),
    # ~23.1M: the CPU workhorse
    "tiny": dict(n_layer=6, d_model=256, n_head=4, n_kv_head=4, ffn_dim=1024, max_seq_len=512,
                 tie_embeddings=False, **_COMMON),
    # ~42.0M
    "small": dict(n_layer=8, d_model=512, n_head=8, n_kv_head=4, ffn_dim=1536, max_seq_len=1024,
                  tie_embeddings=True, **_COMMON),
    # ~124.3M: GPT-2-small-sized
    "base": dict(n_layer=12, d_model=768, n_head=12, n_kv_head=12, ffn_dim=2560, max_seq_len=1024,
                 tie_embeddings=True, **_COMMON),
}


def resolve_model_config(cfg: dict | ModelConfig | None, vocab_size: int | None = None) -> ModelConfig:
    """Fill every unset field from the preset; `vocab_size` is used when the config sets none.

    The result has no None left and is validated (head counts divide, widths match), so a
    bad shape is reported here, with the field to change, not as a matmul error later.
    """
    if cfg is None:
        cfg = {}
    if isinstance(cfg, ModelConfig):
        cfg = cfg.model_dump()
    data = {k: v for k, v in dict(cfg).items() if v is not None}
    preset = data.get("preset", "tiny")
    if preset not in PRESETS:
        raise UserError(f"unknown model preset '{preset}'; valid presets: {', '.join(PRESETS)}")
    out = {**PRESETS[preset], **data, "preset": preset}
    fill_vocab(out, vocab_size)
    try:
        resolved = ModelConfig(**out)
    except Exception as e:  # pydantic's message already names the field
        raise UserError(f"invalid model config: {e}".replace("\n", " ")) from None
    if resolved.d_model % resolved.n_head:
        raise UserError(f"model.d_model={resolved.d_model} is not divisible by model.n_head={resolved.n_head}")
    if (resolved.d_model // resolved.n_head) % 2:
        raise UserError(f"head_dim = d_model/n_head = {resolved.d_model // resolved.n_head} must be even for RoPE")
    if resolved.n_head % resolved.n_kv_head:
        raise UserError(f"model.n_kv_head={resolved.n_kv_head} must divide model.n_head={resolved.n_head}")
    bad = [i for i in resolved.nope_layers if not 0 <= i < resolved.n_layer]
    if bad or len(set(resolved.nope_layers)) != len(resolved.nope_layers):
        raise UserError(f"model.nope_layers={resolved.nope_layers} must be distinct layer indices in "
                        f"0..{resolved.n_layer - 1}")
    return resolved.model_copy(update={"nope_layers": sorted(resolved.nope_layers)})


def param_count(cfg: ModelConfig) -> int:
    """Closed-form parameter count (equals `Transformer(cfg).num_params()`)."""
    d, hd = cfg.d_model, cfg.d_model // cfg.n_head
    attn = (d + (1 if cfg.attn_bias else 0)) * (cfg.n_head + 2 * cfg.n_kv_head) * hd + cfg.n_head * hd * d
    mlp = 3 * d * cfg.ffn_dim
    norms = 2 * d + (2 * hd if cfg.qk_norm else 0)
    sink = cfg.n_head if cfg.attn_sink else 0
    emb = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return cfg.n_layer * (attn + mlp + norms + sink) + d + emb


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is one fused op; it normalises in float32 internally for half inputs.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, hd); cos/sin broadcastable (…, T, 1, hd). HF Llama's convention."""
    return x * cos + rotate_half(x) * sin


def sink_attention(q, k, v, sink: torch.Tensor, mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
    """Attention whose softmax also weighs a learned per-head logit `sink` (H,) with a zero value:
    softmax([q·k_j/√d ..., sink_h]) over the keys and the sink, the sink's share dropped (gpt-oss's
    sinks; Xiao et al. 2023 §3.3 train a sink token to the same end). A head can so put its mass on
    nothing instead of on the first tokens, which StreamingLLM finds models otherwise learn to do.

    Written as SDPA over one extra key: a zero key (q·0 = 0) whose additive mask is the sink
    logit, and a zero value. q (B, H, T, hd); k, v (B, Hkv, S, hd); mask None (all keys, or
    causal when is_causal), or bool (T, S) / (B, 1, T, S) with True = attend.
    """
    B, H, T, _ = q.shape
    S = k.shape[2]
    if is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    bias = torch.zeros(T, S, dtype=q.dtype, device=q.device) if mask is None else \
        torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    bias = bias.expand(bias.shape[0] if bias.dim() == 4 else 1, H, T, S)
    column = sink.to(q.dtype).view(1, H, 1, 1).expand(bias.shape[0], H, T, 1)
    bias = torch.cat([column, bias], dim=-1)
    zero = k.new_zeros(k.shape[0], k.shape[1], 1, k.shape[3])
    k, v = torch.cat([zero, k], dim=2), torch.cat([zero, v], dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=k.shape[1] != H)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * self.head_dim, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.sink = nn.Parameter(torch.zeros(cfg.n_head)) if cfg.attn_sink else None
        self.rope = layer not in cfg.nope_layers  # NoPE: keys carry no position; the causal mask orders them

    def forward(self, x, cos, sin, mask: Optional[torch.Tensor], cache: Optional[KVCache]):
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.n_head * hd, self.n_kv_head * hd, self.n_kv_head * hd], dim=-1)
        q, k, v = q.view(B, T, self.n_head, hd), k.view(B, T, self.n_kv_head, hd), v.view(B, T, self.n_kv_head, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if cache is not None:
            end = cache.pos + T
            cache.k[self.layer, :, :, cache.pos:end] = k
            cache.v[self.layer, :, :, cache.pos:end] = v
            k, v = cache.k[self.layer, :, :, :end], cache.v[self.layer, :, :, :end]
        # Fast path: a plain causal mask, which SDPA never materialises.
        is_causal = mask is None and (cache is None or (cache.pos == 0 and T > 1))
        if self.sink is not None:
            y = sink_attention(q, k, v, self.sink, mask, is_causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ffn_dim = cfg.ffn_dim
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.ffn_dim, bias=False)  # [gate; up] stacked
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).split(self.ffn_dim, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------- the model

class Transformer(nn.Module):
    """The `transformer` family (lmlab.models.family): a LLaMA-style decoder."""

    family = "transformer"

    def __init__(self, cfg: ModelConfig | dict):
        super().__init__()
        cfg = resolve_model_config(cfg)
        self.cfg = cfg
        self.head_dim = cfg.d_model // cfg.n_head
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # RoPE inverse frequencies, computed exactly as HF Llama does (parity to ~1e-7).
        # Kept off the module's buffers so that model.to(bfloat16) cannot round them.
        self._inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float()
                                                   / self.head_dim))
        self._rope: dict = {}  # device -> (cos, sin) float32 tables, grown on demand
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, init_std) everywhere; output projections scaled by 1/sqrt(2·n_layer) (GPT-2);
        norms 1, biases 0 (as transformers initialises Qwen2's), attention-sink logits 0."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias") or name.endswith(".sink"):
                p.zero_()
            elif name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    # --- sizes

    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters (a tied matrix once); non_embedding drops the input embedding table."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N_matmul + 12·n_layer·d_attn·seq_len.

        N_matmul counts every weight that takes part in a matmul: all linear layers including
        the output head (even when tied), but not the embedding lookup or the norms. The
        second term is attention's QK^T and AV (2 matmuls × 2 FLOPs × 3 for fwd+bwd), written
        as in the PaLM/nanoGPT MFU formula, without halving for causality.
        """
        c = self.cfg
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6.0 * n_matmul + 12.0 * c.n_layer * c.n_head * self.head_dim * seq_len

    # --- RoPE tables

    def _rope_tables(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        cos_sin = self._rope.get(device)
        if cos_sin is None or cos_sin[0].shape[0] < length:
            n = max(length, self.cfg.max_seq_len, 2 * (cos_sin[0].shape[0] if cos_sin else 0))
            # Built outside inference mode even when generation asks first: a cached inference
            # tensor could not be used by a later training forward (GRPO generates, then trains).
            with torch.inference_mode(False):
                t = torch.arange(n, dtype=torch.float32)
                freqs = t[:, None] * self._inv_freq.detach().clone()[None, :]
                emb = torch.cat((freqs, freqs), dim=-1)
                cos_sin = (emb.cos().to(device), emb.sin().to(device))
            self._rope[device] = cos_sin
        return cos_sin

    # --- cache

    @property
    def max_context(self) -> int:
        """The longest sequence the model attends over (RoPE positions trained): max_seq_len."""
        return self.cfg.max_seq_len

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None,
                  left_pad: Optional[Sequence[int]] = None, sinks: Optional[int] = None) -> KVCache:
        """A KV cache for `batch` rows of up to `max_len` positions; `left_pad[i]` leading
        slots of row i are padding (left-padded prompts): masked, and RoPE starts after them.
        `sinks=k`: never full; past max_len it keeps each row's first k tokens and the most
        recent ones (attention sinks, lmlab.models.kv_cache)."""
        p = self.embed.weight
        return KVCache(self.cfg.n_layer, batch, self.cfg.n_kv_head, max_len, self.head_dim,
                       device or p.device, dtype or p.dtype, left_pad=left_pad, sinks=sinks,
                       nope_layers=self.cfg.nope_layers)

    # --- forward

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output-head logits of final hidden states `h` (..., d_model) -> (..., vocab)."""
        return self.lm_head(h)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                doc_ids: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                return_logits: bool = True, last_only: bool = False,
                logits_at: Optional[torch.Tensor] = None, vectors: Optional[Vectors] = None):
        """idx (B, T) -> (logits (B, T, V) or None, loss or None).

        targets: (B, T) next-token ids, -100 = ignored; loss is their mean cross entropy.
        doc_ids: (B, T) document index of each token (packed rows): attention stays inside a
          document and RoPE positions restart at each document's first token.
        cache: a KVCache; the tokens are appended at cache.pos and attend to everything before.
        return_logits=False with targets skips returning the (B, T, V) logits.
        last_only: compute logits for the last position only (prefill in generation).
        logits_at: a (B, T) bool mask: logits only at those positions, (n, V) in row-major
          order (DPO's completion tokens); no targets with it.
        vectors: (mask (B, T) bool, values (n, d_model)): input vectors that replace the token
          embeddings at the masked positions, in row-major order (LLM-TRM's latent thinking;
          gradients reach the values). The ids there are placeholders.
        """
        # forward uses the private bodies of `hidden` and `logits`: a wrapper that hooks each
        # public entry point (FSDP2's register_fsdp_forward_method) then never nests its hooks.
        x = self._hidden(idx, doc_ids=doc_ids, cache=cache, vectors=vectors)
        return lm_outputs(x, targets, head=self.lm_head, weight=self.lm_head.weight, return_logits=return_logits,
                          last_only=last_only, logits_at=logits_at)

    def hidden(self, idx: torch.Tensor, *, doc_ids: Optional[torch.Tensor] = None,
               cache: Optional[KVCache] = None, vectors: Optional[Vectors] = None) -> torch.Tensor:
        """idx (B, T) -> final hidden states (B, T, d_model), after the last norm: what `logits` reads.

        doc_ids, cache and vectors as in `forward`.
        """
        return self._hidden(idx, doc_ids=doc_ids, cache=cache, vectors=vectors)

    def _hidden(self, idx: torch.Tensor, *, doc_ids: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, vectors: Optional[Vectors] = None) -> torch.Tensor:
        B, T = idx.shape
        device = idx.device
        mask = None
        if cache is not None:
            if doc_ids is not None:
                raise ValueError("doc_ids and cache cannot be combined")
            cache.room(T, lambda n: self._rope_tables(n, device))  # sink mode evicts; else full is an error
            cos_t, sin_t = self._rope_tables(cache.pos + T, device)
            abs_pos = torch.arange(cache.pos, cache.pos + T, device=device)
            if cache.left_pad is not None:
                pad = cache.left_pad.to(device)
                positions = (abs_pos[None, :] - pad[:, None]).clamp_min(0)  # (B, T)
                cos, sin = cos_t[positions][:, :, None], sin_t[positions][:, :, None]
                key_idx = torch.arange(cache.pos + T, device=device)
                causal = key_idx[None, :] <= abs_pos[:, None]                          # (T, S)
                valid = key_idx[None, None, :] >= pad[:, None, None]                    # (B, 1, S)
                # A padding query sees only itself, so its (unused) output stays finite.
                itself = key_idx[None, :] == abs_pos[:, None]
                mask = ((causal[None] & valid) | itself[None])[:, None]                 # (B, 1, T, S)
            else:
                cos, sin = cos_t[cache.pos:cache.pos + T][:, None], sin_t[cache.pos:cache.pos + T][:, None]
                if cache.pos > 0 and T > 1:  # chunked prefill: causal, offset by pos
                    key_idx = torch.arange(cache.pos + T, device=device)
                    mask = key_idx[None, :] <= abs_pos[:, None]
        elif doc_ids is not None:
            ar = torch.arange(T, device=device)
            starts = torch.ones_like(doc_ids, dtype=torch.bool)
            starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            first = torch.where(starts, ar[None, :], torch.zeros_like(ar)[None, :]).cummax(dim=1).values
            positions = ar[None, :] - first  # restart at each document
            cos_t, sin_t = self._rope_tables(T, device)
            cos, sin = cos_t[positions][:, :, None], sin_t[positions][:, :, None]
            same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
            mask = (same_doc & (ar[None, :] <= ar[:, None])[None])[:, None]  # (B, 1, T, T)
        else:
            cos_t, sin_t = self._rope_tables(T, device)
            cos, sin = cos_t[:T][:, None], sin_t[:T][:, None]  # (T, 1, hd)

        x = self.embed(idx)
        if vectors is not None:
            where, values = vectors
            x = x.masked_scatter(where.to(x.device)[..., None], values.to(x.dtype))
        dtype = x.dtype if not torch.is_autocast_enabled(device.type) else torch.get_autocast_dtype(device.type)
        cos, sin = cos.to(dtype), sin.to(dtype)
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += T
        return self.norm(x)


if __name__ == "__main__":
    print(f"{'preset':<8}{'params':>14}{'non-emb':>14}{'FLOPs/token@max_seq_len':>26}")
    for name in PRESETS:
        c = resolve_model_config({"preset": name}, vocab_size=32768)
        with torch.device("meta"):
            m = Transformer(c)
        print(f"{name:<8}{m.num_params():>14,}{m.num_params(non_embedding=True):>14,}"
              f"{m.flops_per_token(c.max_seq_len):>26,.0f}")
