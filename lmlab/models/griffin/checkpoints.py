"""Griffin checkpoints in the two published layouts: Google DeepMind's torch checkpoint and
Hugging Face's RecurrentGemma, to and from lmlab's parameters.

The two references differ by one in the local-attention window: DeepMind's lets a token see
the W tokens before it and itself (q - k <= W), transformers' W tokens counting itself
(q - k < W). lmlab follows DeepMind (the code the checkpoints were trained with); an export
writes `attention_window_size: W + 1` so transformers computes the same logits, and keeps W
in `lmlab_attention_window_size` for the way back. A Google HF checkpoint (window 2048, no
lmlab key) is read as DeepMind's 2048: identical to transformers up to 2048 tokens.

Our parameter names are transformers' RecurrentGemma names without the `model.` prefix, with
`blocks.N` for `layers.N` (the blocks every family keeps in `model.blocks`) and without
`lm_head` (the tied embedding), so the HF mapping only renames. The DeepMind
layout (recurrentgemma.torch.Griffin's state_dict, the `.pt` files Kaggle ships) differs:

    embedder.input_embedding                     -> embed_tokens.weight
    blocks.N.{temporal,channel}_pre_norm.scale   -> blocks.N.{temporal,channel}_pre_norm.weight
    blocks.N.recurrent_block.conv_1d.w (W, L)    -> blocks.N.temporal_block.conv_1d.weight (L, 1, W)
    blocks.N.recurrent_block.rg_lru.a_param      -> ....rg_lru.recurrent_param
    blocks.N.recurrent_block.rg_lru.{input,a}_gate.{w,b} -> ....rg_lru.{input,recurrent}_gate_{weight,bias}
    blocks.N.attention_block.proj_{q,k,v,final}  -> blocks.N.temporal_block.{q,k,v,o}_proj
    blocks.N.mlp_block.ffw_up.w (2, D, E), b (2, 1, 1, E) -> mlp_block.{gate,up}_proj.{weight,bias}
    blocks.N.mlp_block.ffw_down                  -> mlp_block.down_proj
    final_norm.scale                             -> final_norm.weight

    from lmlab.models.griffin.checkpoints import load_deepmind, import_hf_griffin
    model = load_deepmind("recurrentgemma-2b.pt")            # shape inferred from the tensors
    model = import_hf_griffin("path/to/google-recurrentgemma-2b")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmlab.errors import UserError
from lmlab.models.griffin.config import GriffinConfig, resolve_griffin_config

HF_ARCH = "RecurrentGemmaForCausalLM"


def _expected(names, limit: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_keys(got: dict, want: set[str], source: str, layout: str) -> None:
    """Refuse a checkpoint whose tensor names are not exactly the layout's, naming a few."""
    missing, extra = want - set(got), set(got) - want
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_expected(missing)}")
        if extra:
            parts.append(f"unexpected {_expected(extra)}")
        raise UserError(f"{source} is not a {layout} checkpoint of this shape: {'; '.join(parts)} "
                        f"(expected names like {_expected(want, 3)})")


# ----------------------------------------------------------------------------- DeepMind layout

def config_from_deepmind(sd: dict[str, torch.Tensor], source: str = "checkpoint", **overrides) -> GriffinConfig:
    """The shape of a DeepMind torch state_dict, inferred from its tensors as the reference's
    GriffinConfig.from_torch_params does; the rest (window, soft cap, ...) from the 2b preset
    or `overrides`."""
    if "embedder.input_embedding" not in sd or "blocks.0.mlp_block.ffw_up.w" not in sd:
        raise UserError(f"{source} is not a DeepMind recurrentgemma checkpoint: it has no "
                        f"'embedder.input_embedding' / 'blocks.0.mlp_block.ffw_up.w' "
                        f"(its first keys: {_expected(sd, 3)})")
    vocab, width = sd["embedder.input_embedding"].shape
    types, i, heads, lru = [], 0, None, None
    while f"blocks.{i}.channel_pre_norm.scale" in sd:
        if f"blocks.{i}.recurrent_block.rg_lru.a_gate.w" in sd:
            types.append("recurrent")
            heads, bw, _ = sd[f"blocks.{i}.recurrent_block.rg_lru.a_gate.w"].shape
            lru = heads * bw
        elif f"blocks.{i}.attention_block.proj_k.weight" in sd:
            types.append("attention")
            heads = width // sd[f"blocks.{i}.attention_block.proj_k.weight"].shape[0]
        else:
            raise UserError(f"{source}: blocks.{i} is neither a recurrent nor an attention block")
        i += 1
    period = next(p for p in range(1, len(types) + 1) if all(types[j] == types[j % p] for j in range(len(types))))
    fields = dict(preset="2b", vocab_size=int(vocab), width=int(width), n_layer=len(types),
                  block_pattern=types[:period], num_heads=int(heads), lru_width=int(lru or width),
                  mlp_expanded_width=int(sd["blocks.0.mlp_block.ffw_up.w"].shape[-1]))
    return resolve_griffin_config({**fields, **overrides})


def _deepmind_renames(cfg: GriffinConfig) -> list[tuple[str, str]]:
    """(ours, DeepMind's) for every tensor that only changes its name; the MLP's up projection
    (two stacked matrices there) and the convolution (transposed) change shape too, and are
    handled by from/to_deepmind_state_dict themselves."""
    pairs = [("embed_tokens.weight", "embedder.input_embedding"), ("final_norm.weight", "final_norm.scale")]
    for i, kind in enumerate(cfg.block_types):
        b = f"blocks.{i}."
        t = b + "temporal_block."
        pairs += [(b + f"{n}_pre_norm.weight", b + f"{n}_pre_norm.scale") for n in ("temporal", "channel")]
        pairs += [(b + f"mlp_block.down_proj.{p}", b + f"mlp_block.ffw_down.{p}") for p in ("weight", "bias")]
        if kind == "recurrent":
            r = b + "recurrent_block."
            pairs += [(t + f"{lin}.{p}", r + f"{lin}.{p}") for lin in ("linear_y", "linear_x", "linear_out")
                      for p in ("weight", "bias")]
            pairs += [(t + "conv_1d.bias", r + "conv_1d.b"), (t + "rg_lru.recurrent_param", r + "rg_lru.a_param")]
            pairs += [(t + f"rg_lru.{ours}_{p}", r + f"rg_lru.{theirs}.{q}")
                      for ours, theirs in (("input_gate", "input_gate"), ("recurrent_gate", "a_gate"))
                      for p, q in (("weight", "w"), ("bias", "b"))]
        else:
            a = b + "attention_block."
            pairs += [(t + f"{ours}.weight", a + f"{theirs}.weight")
                      for ours, theirs in (("q_proj", "proj_q"), ("k_proj", "proj_k"), ("v_proj", "proj_v"),
                                           ("o_proj", "proj_final"))]
            pairs.append((t + "o_proj.bias", a + "proj_final.bias"))
    return pairs


def deepmind_names(cfg: GriffinConfig) -> set[str]:
    names = {theirs for _, theirs in _deepmind_renames(cfg)}
    for i, kind in enumerate(cfg.block_types):
        names |= {f"blocks.{i}.mlp_block.ffw_up.w", f"blocks.{i}.mlp_block.ffw_up.b"}
        if kind == "recurrent":
            names.add(f"blocks.{i}.recurrent_block.conv_1d.w")
    return names


def from_deepmind_state_dict(sd: dict[str, torch.Tensor], cfg: GriffinConfig,
                             source: str = "checkpoint") -> dict[str, torch.Tensor]:
    check_keys(sd, deepmind_names(cfg), source, "DeepMind recurrentgemma")
    out = {ours: sd[theirs] for ours, theirs in _deepmind_renames(cfg)}
    for i, kind in enumerate(cfg.block_types):
        b = f"blocks.{i}."
        up_w, up_b = sd[b + "mlp_block.ffw_up.w"], sd[b + "mlp_block.ffw_up.b"]  # (2, D, E), (2, 1, 1, E)
        out[b + "mlp_block.gate_proj.weight"], out[b + "mlp_block.up_proj.weight"] = up_w[0].t(), up_w[1].t()
        out[b + "mlp_block.gate_proj.bias"] = up_b[0].reshape(-1)
        out[b + "mlp_block.up_proj.bias"] = up_b[1].reshape(-1)
        if kind == "recurrent":  # (W, L) -> a depthwise Conv1d's (L, 1, W)
            out[b + "temporal_block.conv_1d.weight"] = sd[b + "recurrent_block.conv_1d.w"].t()[:, None, :]
    return {k: v.contiguous() for k, v in out.items()}


def to_deepmind_state_dict(sd: dict[str, torch.Tensor], cfg: GriffinConfig) -> dict[str, torch.Tensor]:
    """Our parameters in DeepMind's layout (the inverse of from_deepmind_state_dict)."""
    out = {theirs: sd[ours] for ours, theirs in _deepmind_renames(cfg)}
    for i, kind in enumerate(cfg.block_types):
        b = f"blocks.{i}."
        m = b + "mlp_block."
        out[m + "ffw_up.w"] = torch.stack([sd[m + "gate_proj.weight"].t(), sd[m + "up_proj.weight"].t()])
        out[m + "ffw_up.b"] = torch.stack([sd[m + "gate_proj.bias"], sd[m + "up_proj.bias"]])[:, None, None]
        if kind == "recurrent":
            out[b + "recurrent_block.conv_1d.w"] = sd[b + "temporal_block.conv_1d.weight"][:, 0, :].t()
    return {k: v.contiguous() for k, v in out.items()}


def read_torch_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(p))
        # mmap: the tensors stay in the file's pages until copied into the model, so loading
        # a 2B checkpoint holds one copy in memory, not two
        sd = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a damaged or foreign file: name it, no traceback
        raise UserError(f"{p} cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"{p} holds a {type(sd).__name__}, not a state_dict of tensors")
    return sd


def load_deepmind(path: str | Path, **overrides):
    """A DeepMind recurrentgemma torch checkpoint (`.pt` state_dict) -> our Griffin in float32."""
    from lmlab.models.griffin.model import Griffin

    sd = read_torch_checkpoint(path)
    cfg = config_from_deepmind(sd, str(path), **overrides)
    model = Griffin(cfg)
    model.load_state_dict({k: v.float() for k, v in from_deepmind_state_dict(sd, cfg, str(path)).items()})
    return model.eval()


# ----------------------------------------------------------------------------- Hugging Face layout

def _to_hf_name(name: str) -> str:
    return "model." + ("layers." + name[len("blocks."):] if name.startswith("blocks.") else name)


def _from_hf_name(name: str) -> str:
    name = name[len("model."):]
    return "blocks." + name[len("layers."):] if name.startswith("layers.") else name


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our parameters under transformers' RecurrentGemma names (the head is tied: not stored)."""
    return {_to_hf_name(k): v.detach().contiguous() for k, v in model.state_dict().items()}


def hf_names(cfg: GriffinConfig) -> set[str]:
    from lmlab.models.griffin.model import Griffin
    with torch.device("meta"):
        m = Griffin(cfg)
    return {_to_hf_name(k) for k in m.state_dict()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: GriffinConfig, source: str = "checkpoint") -> dict:
    hf = {k: v for k, v in hf.items() if k != "lm_head.weight"}  # tied to the embedding
    check_keys(hf, hf_names(cfg), source, "Hugging Face RecurrentGemma")
    return {_from_hf_name(k): v for k, v in hf.items()}


def hf_config(cfg: GriffinConfig, dtype: str = "float32", bos_id=None, eos_id=None, pad_id=None) -> dict:
    """config.json for transformers' RecurrentGemmaForCausalLM."""
    if not cfg.embeddings_scale_by_sqrt_dim or not cfg.logits_soft_cap:
        raise UserError("transformers' RecurrentGemma always scales embeddings by sqrt(width) and soft-caps the "
                        "logits; a griffin model with embeddings_scale_by_sqrt_dim=false or logits_soft_cap=0 "
                        "has no exact Hugging Face export")
    return {
        "architectures": [HF_ARCH], "model_type": "recurrent_gemma",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.width, "num_hidden_layers": cfg.n_layer,
        # transformers splits intermediate_size in two: gate_proj and up_proj each get half
        "intermediate_size": 2 * cfg.mlp_expanded_width,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": 1, "head_dim": cfg.head_dim,
        # transformers' window counts the token itself (W keys), DeepMind's does not (W + 1 keys):
        # W + 1 in transformers is our W, and our own key keeps the round trip exact
        "lru_width": cfg.lru_width, "attention_window_size": cfg.attention_window_size + 1,
        "lmlab_attention_window_size": cfg.attention_window_size,
        "conv1d_width": cfg.conv1d_width, "logits_soft_cap": cfg.logits_soft_cap, "rms_norm_eps": cfg.norm_eps,
        "block_types": list(cfg.block_pattern), "hidden_activation": "gelu_pytorch_tanh",
        "partial_rotary_factor": 0.5, "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 0.5},
        "embeddings_scale_by_sqrt_dim": True, "attention_bias": False, "tie_word_embeddings": True,
        "max_position_embeddings": cfg.max_seq_len,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "use_cache": True, "dtype": dtype, "torch_dtype": dtype,
    }


def config_from_hf(c: dict, source: str = "config.json") -> GriffinConfig:
    """Our GriffinConfig for a transformers RecurrentGemma config.json, refusing what we do not implement."""
    problems = []
    if c.get("num_key_value_heads", 1) != 1:
        problems.append(f"num_key_value_heads={c['num_key_value_heads']} (Griffin's attention has one)")
    if c.get("attention_bias"):
        problems.append("attention biases")
    if c.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        problems.append(f"hidden_activation={c.get('hidden_activation')}")
    rope = c.get("rope_parameters") or {}
    if float(rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.5))) != 0.5:
        problems.append("partial_rotary_factor other than 0.5")
    if problems:
        raise UserError(f"{source}: cannot import exactly: {', '.join(problems)}")
    width, layers = c.get("hidden_size", 2560), c.get("num_hidden_layers", 26)
    return resolve_griffin_config({
        "preset": "2b", "vocab_size": c.get("vocab_size", 256000), "width": width, "n_layer": layers,
        "block_pattern": list(c.get("block_types") or ["recurrent", "recurrent", "attention"]),
        "mlp_expanded_width": c.get("intermediate_size", 6 * width) // 2,
        "num_heads": c.get("num_attention_heads", 10), "lru_width": c.get("lru_width") or width,
        "conv1d_width": c.get("conv1d_width", 4), "attention_window_size": c.get("lmlab_attention_window_size", c.get("attention_window_size", 2048)),
        "logits_soft_cap": float(c.get("logits_soft_cap", 30.0)), "norm_eps": c.get("rms_norm_eps", 1e-6),
        "rope_theta": float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        "max_seq_len": c.get("max_position_embeddings") or 8192,
    })


def import_hf_griffin(hf_dir: str | Path, state: dict | None = None):
    """A transformers RecurrentGemma directory (config.json + safetensors) -> our Griffin (float32)."""
    from lmlab.models.griffin.model import Griffin
    from lmlab.models.parts import read_hf_weights

    d = Path(hf_dir)
    cfg = config_from_hf(json.loads((d / "config.json").read_text()), str(d / "config.json"))
    weights = from_hf_state_dict(state if state is not None else read_hf_weights(d), cfg, str(d))
    model = Griffin(cfg)
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    return model.eval(), cfg

