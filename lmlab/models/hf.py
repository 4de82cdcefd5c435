"""Export a model to a Hugging Face directory (or a GGUF file), and import Llama-family HF checkpoints.

    lmlab export runs/model out=runs/hf_model dtype=bfloat16
    lmlab export runs/model out=runs/model.gguf dtype=q8_0          # llama.cpp / Ollama (lmlab.models.gguf)

writes `config.json`, `model.safetensors`, `generation_config.json` and the tokenizer files,
which `transformers.AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` load. A model
run with `chat.json` (made by sft/dpo) also gets its Jinja `chat_template` in
tokenizer_config.json and its end-of-turn id in generation_config.json. Without
QK-norm the model is exactly `LlamaForCausalLM`; with QK-norm it is exactly
`Qwen3ForCausalLM` (Qwen3 RMS-normalises each query/key head before RoPE, as we do); with
q/k/v biases and no QK-norm, `Qwen2ForCausalLM`; with layers without RoPE (`nope_layers`),
`SmolLM3ForCausalLM`.

    from lmlab.models.hf import import_hf, to_hf_state_dict
    model, cfg = import_hf("path/to/hf_dir")   # Llama/SmolLM, Mistral, Qwen2, Qwen3, SmolLM3 layouts, safetensors

The name mapping both ways is in `to_hf_state_dict` / `from_hf_state_dict`: our fused
q/k/v and gate/up matrices are split into HF's separate projections and stacked back. RoPE
already uses HF's rotate_half convention, so no weight is permuted.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmlab.errors import UserError
from lmlab.models.parts import read_hf_weights
from lmlab.models.transformer import ModelConfig, Transformer, resolve_model_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- name mapping

def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our parameters under HF Llama/Qwen2/Qwen3/SmolLM3 names, fused projections (and q/k/v biases) split."""
    cfg, hd = model.cfg, model.head_dim
    sd = model.state_dict()
    sizes = [cfg.n_head * hd, cfg.n_kv_head * hd, cfg.n_kv_head * hd]
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[p + "attn.qkv.weight"].split(sizes)
        gate, up = sd[p + "mlp.gate_up.weight"].split(cfg.ffn_dim)
        out.update({
            h + "input_layernorm.weight": sd[p + "attn_norm.weight"],
            h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k, h + "self_attn.v_proj.weight": v,
            h + "self_attn.o_proj.weight": sd[p + "attn.o_proj.weight"],
            h + "post_attention_layernorm.weight": sd[p + "mlp_norm.weight"],
            h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
            h + "mlp.down_proj.weight": sd[p + "mlp.down_proj.weight"],
        })
        if cfg.attn_bias:
            qb, kb, vb = sd[p + "attn.qkv.bias"].split(sizes)
            out.update({h + "self_attn.q_proj.bias": qb, h + "self_attn.k_proj.bias": kb,
                        h + "self_attn.v_proj.bias": vb})
            if cfg.qk_norm or cfg.nope_layers:  # Qwen3's and SmolLM3's attention_bias biases o_proj too: ours is zero
                out[h + "self_attn.o_proj.bias"] = torch.zeros(cfg.d_model, dtype=qb.dtype, device=qb.device)
        if cfg.qk_norm:
            out[h + "self_attn.q_norm.weight"] = sd[p + "attn.q_norm.weight"]
            out[h + "self_attn.k_norm.weight"] = sd[p + "attn.k_norm.weight"]
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Llama/Mistral/Qwen2/Qwen3/SmolLM3 names -> ours (q/k/v, their biases and gate/up stacked).

    Raises KeyError naming a missing tensor, UserError for an o_proj bias that is not zero
    (Llama's and Qwen3's `attention_bias` has one; lmlab's transformer has none)."""
    out = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    out["lm_head.weight"] = hf["model.embed_tokens.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]
    for i in range(cfg.n_layer):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        out.update({
            p + "attn_norm.weight": hf[h + "input_layernorm.weight"],
            p + "attn.qkv.weight": torch.cat([hf[h + "self_attn.q_proj.weight"], hf[h + "self_attn.k_proj.weight"],
                                              hf[h + "self_attn.v_proj.weight"]]),
            p + "attn.o_proj.weight": hf[h + "self_attn.o_proj.weight"],
            p + "mlp_norm.weight": hf[h + "post_attention_layernorm.weight"],
            p + "mlp.gate_up.weight": torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]]),
            p + "mlp.down_proj.weight": hf[h + "mlp.down_proj.weight"],
        })
        if cfg.attn_bias:
            out[p + "attn.qkv.bias"] = torch.cat([hf[h + "self_attn.q_proj.bias"], hf[h + "self_attn.k_proj.bias"],
                                                  hf[h + "self_attn.v_proj.bias"]])
        o_bias = hf.get(h + "self_attn.o_proj.bias")
        if o_bias is not None and bool(o_bias.any()):
            raise UserError(f"layer {i} has a non-zero o_proj bias ({h}self_attn.o_proj.bias); lmlab's transformer "
                            f"has biases on q/k/v only (as Qwen2), so it cannot import this model exactly")
        if cfg.qk_norm:
            out[p + "attn.q_norm.weight"] = hf[h + "self_attn.q_norm.weight"]
            out[p + "attn.k_norm.weight"] = hf[h + "self_attn.k_norm.weight"]
    return out


def hf_config(cfg: ModelConfig, dtype: str = "float32", bos_id=None, eos_id=None, pad_id=None) -> dict:
    """config.json for LlamaForCausalLM; Qwen3ForCausalLM when the model uses QK-norm (with
    `attention_bias` when it also has q/k/v biases: its o_proj bias is written as zeros),
    Qwen2ForCausalLM for q/k/v biases without QK-norm, and SmolLM3ForCausalLM for a model with
    NoPE layers (`no_rope_layers`: 0 where a layer has no rotary embedding)."""
    if getattr(cfg, "attn_sink", False):
        raise UserError("this model has learned attention sinks (model.attn_sink), which Llama, Qwen2, Qwen3 and "
                        "SmolLM3 lack; it has no Hugging Face export (lmlab serve, eval and chat run it as it is)")
    nope = list(getattr(cfg, "nope_layers", []) or [])
    if nope and cfg.qk_norm:
        raise UserError(f"this model has both NoPE layers (model.nope_layers={nope}) and QK-norm: no Hugging Face "
                        f"architecture has both (SmolLM3 has NoPE layers, Qwen3 QK-norm); it has no Hugging Face "
                        f"export (lmlab serve, eval and chat run it as it is)")
    hd = cfg.d_model // cfg.n_head
    arch, model_type = (("SmolLM3ForCausalLM", "smollm3") if nope else ("Qwen3ForCausalLM", "qwen3") if cfg.qk_norm else
                        ("Qwen2ForCausalLM", "qwen2") if cfg.attn_bias else ("LlamaForCausalLM", "llama"))
    d = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": hd,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5.x
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if model_type != "qwen2":  # Qwen2's q/k/v biases are built in, its o_proj has none: no such option
        d["attention_bias"] = bool(cfg.attn_bias)
    if model_type == "llama":
        d.update(mlp_bias=False, pretraining_tp=1)
    elif model_type == "smollm3":
        d.update(mlp_bias=False, use_sliding_window=False, sliding_window=None,
                 no_rope_layers=[0 if i in nope else 1 for i in range(cfg.n_layer)],
                 layer_types=["full_attention"] * cfg.n_layer)
    else:
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer,
                 layer_types=["full_attention"] * cfg.n_layer)
    return d


def model_config_from_hf(c: dict, source: str = "config.json", notes: list | None = None) -> ModelConfig:
    """Our ModelConfig for an HF Llama (SmolLM, SmolLM2), Mistral, Qwen2, Qwen3 or SmolLM3 config,
    refusing (UserError, one line naming the architecture) what we do not implement exactly.
    SmolLM3's layers without the rotary embedding (`no_rope_layers` 0, by default every
    `no_rope_layer_interval`th) become `nope_layers`.

    A Mistral `sliding_window` shorter than max_position_embeddings becomes max_seq_len (a window
    that covers the whole sequence is full attention, so the model is exact up to that length);
    that is said in a line appended to `notes`."""
    mt = c.get("model_type")
    arch = (c.get("architectures") or [None])[0]
    named = f"{arch} (model_type {mt})" if arch else f"model_type {mt!r}"
    supported = ("supported: llama (Llama, SmolLM, SmolLM2), mistral, qwen2, qwen3, smollm3, and recurrent_gemma "
                 "(as the griffin family)")
    if mt not in ("llama", "mistral", "qwen2", "qwen3", "smollm3"):
        raise UserError(f"{source}: {named} is not supported by lmlab's transformer; {supported}")
    problems = []
    attn_bias = mt == "qwen2" or (mt != "mistral" and bool(c.get("attention_bias")))  # Qwen2's are built in
    if c.get("mlp_bias"):
        problems.append("MLP biases (mlp_bias=true)")
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={c.get('hidden_act')}")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope scaling '{rope.get('rope_type', rope.get('type'))}'")
    if float(rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        problems.append("a partial rotary embedding (partial_rotary_factor)")
    if c.get("use_sliding_window"):
        problems.append(f"sliding-window attention (use_sliding_window=true, sliding_window={c.get('sliding_window')})")
    other = sorted({t for t in c.get("layer_types") or [] if t != "full_attention"})
    if other and not c.get("use_sliding_window"):
        problems.append(f"layer_types {', '.join(other)}")
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    nope: list[int] = []
    if mt == "smollm3":
        flags = c.get("no_rope_layers")
        if flags is None:  # transformers' default: a NoPE layer every interval-th layer
            every = int(c.get("no_rope_layer_interval", 4))
            flags = [int((i + 1) % every != 0) for i in range(c["num_hidden_layers"])]
        if len(flags) < c["num_hidden_layers"]:
            problems.append(f"no_rope_layers has {len(flags)} entries for {c['num_hidden_layers']} layers")
        nope = [i for i, f in enumerate(flags[:c["num_hidden_layers"]]) if not f]
    if c.get("head_dim") not in (None, hidden // heads):
        problems.append(f"head_dim={c['head_dim']} != hidden_size/num_attention_heads={hidden // heads}")
    if problems:
        raise UserError(f"{source}: cannot import {named} exactly: {'; '.join(problems)} not supported by "
                        f"lmlab's transformer")
    max_seq_len = c.get("max_position_embeddings", 2048)
    window = c.get("sliding_window") if mt == "mistral" else None
    if window is not None and window < max_seq_len:
        max_seq_len = window
        if notes is not None:
            notes.append(f"{source}: sliding_window={window} < max_position_embeddings="
                         f"{c.get('max_position_embeddings', 2048)}: imported with max_seq_len={window}, up to which "
                         f"the window covers the whole sequence (full attention) and the model is exact; lmlab's "
                         f"transformer has no sliding-window attention for longer contexts")
    return resolve_model_config({
        "preset": "micro", "vocab_size": c["vocab_size"], "n_layer": c["num_hidden_layers"], "d_model": hidden,
        "n_head": heads, "n_kv_head": c.get("num_key_value_heads") or heads, "ffn_dim": c["intermediate_size"],
        "max_seq_len": max_seq_len,
        "rope_theta": float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        "norm_eps": c.get("rms_norm_eps", 1e-6), "qk_norm": mt == "qwen3", "attn_bias": attn_bias,
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)), "init_std": c.get("initializer_range", 0.02),
        "nope_layers": nope,
    })


def import_hf(hf_dir: str | Path, device: str = "cpu", notes: list | None = None):
    """A Llama-, Mistral-, Qwen2-, Qwen3-, SmolLM3- or RecurrentGemma-layout HF directory -> (our model in
    float32, its config). Notes on how it was mapped (model_config_from_hf) go to `notes`, or are
    printed when no list is given."""
    d = Path(hf_dir)
    cpath = d / "config.json"
    if not cpath.is_file():
        raise UserError(f"{cpath} not found; give import_hf a Hugging Face model directory")
    try:
        hf_cfg = json.loads(cpath.read_text())
    except ValueError as e:
        raise UserError(f"{cpath} is not valid JSON ({e})") from None
    if hf_cfg.get("model_type") == "recurrent_gemma":
        from lmlab.models.griffin.checkpoints import import_hf_griffin
        model, cfg = import_hf_griffin(d)
        return model.to(device), cfg
    said = [] if notes is None else notes
    cfg = model_config_from_hf(hf_cfg, str(cpath), said)
    if notes is None:
        for n in said:
            print(f"note: {n}")
    try:
        state = from_hf_state_dict(read_hf_weights(d), cfg)
    except KeyError as e:
        raise UserError(f"{d}: tensor {e} is missing from the checkpoint; is it a complete "
                        f"{hf_cfg.get('model_type')} model?") from None
    model = Transformer(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.to(device).eval(), cfg


# ----------------------------------------------------------------------------- writing (the export stage: lmlab.models.export)

def hf_parts(model):
    """(state_dict under HF names, config.json builder) for the model's family."""
    if getattr(model, "family", "transformer") == "griffin":
        from lmlab.models.griffin import checkpoints
        return checkpoints.to_hf_state_dict(model), checkpoints.hf_config
    return to_hf_state_dict(model), hf_config


def write_hf(model: Transformer, out: str | Path, dtype: str = "float32", tokenizer=None,
             chat_template: str | None = None) -> None:
    """Write the HF files (weights, config, generation config, tokenizer) into an existing dir.

    With `chat_template` (a lmlab.data.chat template name), tokenizer_config.json gets the
    Jinja `chat_template` and generation_config.json ends generation at the end-of-turn token too.
    """
    from safetensors.torch import save_file

    out = Path(out)
    ids = {"bos_id": None, "eos_id": None, "pad_id": None}
    if tokenizer is not None:
        ids = {k: getattr(tokenizer, k, None) for k in ids}
        ids = {k: (v if v is not None and v >= 0 else None) for k, v in ids.items()}
    hf_state, config_of = hf_parts(model)
    config = config_of(model.cfg, dtype, **ids)  # before writing anything: it refuses what HF cannot express
    state = {k: v.to(DTYPES[dtype]).cpu() for k, v in hf_state.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"]}
    (out / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None}, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.export_hf(out)
    if chat_template is not None:
        if tokenizer is None:
            raise ValueError("a chat template needs the tokenizer")
        add_chat_template(out, chat_template, tokenizer)


def add_chat_template(out: str | Path, template: str, tokenizer) -> None:
    """Put the chat template into an exported dir: tokenizer_config.json's `chat_template`, the
    end-of-turn id in generation_config.json's eos_token_id, and chat.json."""
    from lmlab.artifacts import write_json_atomic
    from lmlab.data import chat
    from lmlab.data.chat_jinja import hf_chat_template

    out = Path(out)
    chat.check_template(template, tokenizer)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc["chat_template"] = hf_chat_template(template, tokenizer)
    write_json_atomic(out / "tokenizer_config.json", tc)
    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    eot = chat.end_of_turn_ids(template, tokenizer)
    # transformers stops at any id in the list: the template's end of turn first, eos too
    gen["eos_token_id"] = eot if len(eot) > 1 else eot[0]
    write_json_atomic(gen_path, gen)
    chat.save_chat_template(out, template)


def _check_family_exports(src: Path) -> None:
    """Refuse, before loading anything, a model whose family has no Hugging Face export."""
    from lmlab.models.family import FAMILIES, get_family, split_model_json

    try:
        name, _ = split_model_json(json.loads((src / "model.json").read_text()))
    except (OSError, ValueError):
        return  # no readable model.json (an adapter run, a broken dir): load_model explains
    family = get_family(name)
    if not family.exports_hf:
        raise UserError(f"{src} is a '{family.name}' model, and that family has no Hugging Face export; "
                        f"families that export: {', '.join(n for n in FAMILIES if get_family(n).exports_hf)}")


def export_hf(cfg) -> Path:
    """`lmlab export RUN_DIR out=DIR` (cfg: lmlab.models.export.Config, format hf)."""
    from lmlab import artifacts
    from lmlab.data.chat import load_chat_template
    from lmlab.models import WEIGHTS, load_model

    if cfg.dtype == "q8_0":
        raise UserError("dtype=q8_0 is a GGUF quantization; add format=gguf (and out=FILE.gguf), or export to "
                        "Hugging Face with dtype=float32|bfloat16|float16")
    cfg = cfg.model_copy(update={"dtype": {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(cfg.dtype, cfg.dtype),
                                 "format": "hf"})
    if not cfg.model:
        raise UserError("no model given; run `lmlab export RUN_DIR out=DIR`")
    if not cfg.out:
        raise UserError("no output directory given; add out=DIR")
    src, out = Path(cfg.model), Path(cfg.out)
    artifacts.check_out(out, "hf_export", "export", inputs={"model directory": src})
    manifest_in = artifacts.read_manifest(src) or {}
    in_fp = manifest_in.get("fingerprint") or (artifacts.sha256_file(src / WEIGHTS) if (src / WEIGHTS).is_file() else "")
    conf = cfg.model_dump(mode="json", exclude={"format"})  # the manifest of an HF export, as before formats
    # chat.json is part of the input: adding or changing a template re-exports
    chat_fp = artifacts.sha256_file(src / "chat.json") if (src / "chat.json").is_file() else None
    fp = artifacts.stage_fingerprint("hf_export", {"dtype": cfg.dtype},
                                     {"model": in_fp, **({"chat": chat_fp} if chat_fp else {})})
    if artifacts.is_up_to_date(out, fp):
        print(f"export: up to date ({out}), nothing to do")
        return out
    timer = artifacts.Timer()
    _check_family_exports(src)
    with timer("load"):
        model, tokenizer, _ = load_model(src)
    arch = hf_parts(model)[1](model.cfg)["architectures"][0]
    try:
        with artifacts.atomic_dir(out) as tmp:
            with timer("write"):
                write_hf(model, tmp, cfg.dtype, tokenizer, chat_template=load_chat_template(src))
            artifacts.write_manifest(
                tmp, "hf_export", conf, fp, verb="export", inputs={"model": {"path": str(src), "fingerprint": in_fp}},
                tokenizer_sha256=getattr(tokenizer, "sha256", None), timings=timer.total(),
                stats={"architecture": arch, "params": model.num_params()})
    except OSError as e:
        raise artifacts.disk_error(e, out) from None
    print(f"export: wrote {out} ({arch}, {model.num_params():,} params, {cfg.dtype})")
    return out
