"""`lmlab import` of Hugging Face Llama, Mistral, Qwen2, Qwen3 and SmolLM2-like checkpoints, all offline.

Each is a tiny random model built with transformers' own classes (weights moved off their init)
and saved with a real byte-level BPE tokenizer.json and a tokenizer_config.json as the hub
ships them. The import must compute transformers' logits (fp32, 1e-4), take bos/eos/pad from
the model's own files, and record the chat template only when an lmlab template renders it
exactly (Qwen3's thinking template as lmlab's qwen3); Qwen2's q/k/v biases survive `lmlab export`.
Architectures lmlab's transformer does not compute exactly are refused in one line naming them.
"""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.cli import main
from lmlab.models import load_model

TEXT = ["Once upon a time there was a little fox.", "The quick brown fox jumps over the lazy dog.",
        "What is the capital of France? Paris is the capital of France.", "And of Italy, please? It is Rome.",
        "You answer in one short sentence."] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# SmolLM2-Instruct's and Qwen2.5-Instruct's templates as the hub ships them (ChatML, no bos, a
# default system message); Qwen2.5's tool branch never renders here (no tools are passed).
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.<|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
INST = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


def _bpe(tmp_path_factory, specials):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=330, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path, {t: tok.token_to_id(t) for t in specials}, tok.get_vocab_size()


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    return _bpe(tmp_path_factory, SPECIALS)


@pytest.fixture(scope="module")
def tokenizer_json_think(tmp_path_factory):
    """The tokenizer with Qwen3's thinking delimiters too (added tokens after the others: same ids for those)."""
    return _bpe(tmp_path_factory, SPECIALS + ["<think>", "</think>"])


def _perturb(model):
    torch.manual_seed(1)
    with torch.no_grad():  # far from init: a mis-mapped norm, bias or projection shows in the logits
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0.0, 0.3)
            else:
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def _save(tmp_path_factory, name, model_cls, config, tokenizer_json, tokenizer_config, jinja=None, legacy=None):
    """model_cls(config) saved with the tokenizer; `legacy` rewrites config.json keys (hub quirks)."""
    import shutil

    torch.manual_seed(0)
    model = _perturb(model_cls(config))
    d = tmp_path_factory.mktemp(name)
    model.save_pretrained(d)
    if legacy:
        c = json.loads((d / "config.json").read_text())
        c.pop("rope_parameters", None)
        c.update(legacy)
        (d / "config.json").write_text(json.dumps(c))
    shutil.copy(tokenizer_json, d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                         "model_max_length": 2048, **tokenizer_config}))
    if jinja:
        (d / "chat_template.jinja").write_text(jinja)
    return d


@pytest.fixture(scope="module")
def families(tmp_path_factory, tokenizer_json, tokenizer_json_think):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    from hub_templates import QWEN3

    path, ids, size = tokenizer_json
    think_path, think_ids, think_size = tokenizer_json_think
    assert all(think_ids[t] == ids[t] for t in SPECIALS)
    ids = {**ids, **think_ids}
    s, eot, ime = ids["<s>"], ids["<|endoftext|>"], ids["<|im_end|>"]
    fams = {
        # bos + ChatML in tokenizer_config.json: exactly lmlab's chatml
        "llama": (LlamaForCausalLM, LlamaConfig(vocab_size=size, bos_token_id=s, eos_token_id=ids["</s>"], **SHAPE),
                  {"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ bos_token }}" + CHATML},
                  None, None),
        # [INST] turns in chat_template.jinja: no lmlab equivalent
        "mistral": (MistralForCausalLM, MistralConfig(vocab_size=size, sliding_window=None, **SHAPE),
                    {"bos_token": "<s>", "eos_token": "</s>"}, INST, None),
        # a window shorter than the context; a base model, no chat template
        "mistral_window": (MistralForCausalLM, MistralConfig(vocab_size=size, **{**SHAPE, "max_position_embeddings": 64},
                                                             sliding_window=16),
                           {"bos_token": "<s>", "eos_token": "</s>"}, None, None),
        # q/k/v biases, a padded embedding table, no bos in the tokenizer, a plain ChatML without bos
        # or default system message: no lmlab equivalent
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(vocab_size=size + 14, bos_token_id=eot, eos_token_id=ime,
                                                rope_theta=1e6, **SHAPE),
                  {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML},
                  None, None),
        # Qwen2.5-Instruct's own template
        "qwen2.5": (Qwen2ForCausalLM, Qwen2Config(vocab_size=size, bos_token_id=eot, eos_token_id=ime, **SHAPE),
                    {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                     "chat_template": QWEN25}, None, None),
        # SmolLM2: a Llama with tied embeddings, its config.json written by transformers 4 (rope_scaling null),
        # named templates in tokenizer_config.json (bos + ChatML: lmlab's chatml)
        "smollm2": (LlamaForCausalLM, LlamaConfig(vocab_size=size, tie_word_embeddings=True, bos_token_id=eot,
                                                  eos_token_id=eot, **SHAPE),
                    {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                     "chat_template": [{"name": "default", "template": "{{ bos_token }}" + CHATML}]},
                    None, {"rope_scaling": None, "rope_theta": 100000.0, "rope_interleaved": False}),
        # SmolLM2-Instruct's own template, in chat_template.jinja
        "smollm2-instruct": (LlamaForCausalLM, LlamaConfig(vocab_size=size, tie_word_embeddings=True,
                                                           bos_token_id=ids["<|im_start|>"], eos_token_id=ime, **SHAPE),
                             {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"},
                             SMOLLM2, None),
        # Qwen3 (QK-norm) with Qwen3's own thinking template; its tokenizer has <think> and </think>
        "qwen3": (Qwen3ForCausalLM, Qwen3Config(vocab_size=think_size, bos_token_id=eot, eos_token_id=ime, head_dim=16,
                                                **SHAPE),
                  {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": QWEN3},
                  None, None),
    }
    out = {}
    for name, (cls, config, tc, jinja, legacy) in fams.items():
        d = _save(tmp_path_factory, name, cls, config, think_path if name == "qwen3" else path, tc, jinja, legacy)
        from transformers import AutoModelForCausalLM
        out[name] = (d, AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval())
    return out, ids


# name -> (expected (bos, eos, pad) names, chat template recorded, words the output must show)
EXPECT = {
    "llama": (("<s>", "</s>", "</s>"), "chatml", []),
    "mistral": (("<s>", "</s>", "</s>"), None, ["chat_template.jinja", "[INST]"]),
    "mistral_window": (("<s>", "</s>", "</s>"), None, ["sliding_window=16", "max_seq_len=16"]),
    "qwen2": (("<|endoftext|>", "<|im_end|>", "<|endoftext|>"), None,
              ["tokenizer_config.json", "ChatML", "bos token '<|endoftext|>'", "template=NAME"]),
    "smollm2": (("<|endoftext|>", "<|endoftext|>", "<|endoftext|>"), "chatml", []),
    "qwen2.5": (("<|endoftext|>", "<|im_end|>", "<|endoftext|>"), "qwen2.5", []),
    "smollm2-instruct": (("<|im_start|>", "<|im_end|>", "<|im_end|>"), "smollm2", []),
    "qwen3": (("<|endoftext|>", "<|im_end|>", "<|endoftext|>"), "qwen3", []),
}


@pytest.mark.parametrize("name", list(EXPECT))
def test_import_matches_transformers(families, name, tmp_path, capsys):
    from transformers import AutoTokenizer

    fams, ids = families
    d, ref = fams[name]
    specials, template, words = EXPECT[name]
    out = tmp_path / "run"
    assert main(["import", str(d), f"out={out}"]) == 0
    said = capsys.readouterr().out
    for w in words:
        assert w in said, (w, said)
    model, tok, manifest = load_model(out)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(ids[t] for t in specials)
    assert manifest.get("chat", {}).get("template") == template and (out / "chat.json").is_file() == bool(template)
    assert manifest["stats"]["chat_template_from"] == ("detected" if template else None)
    hf_tok = AutoTokenizer.from_pretrained(d)
    text = "The quick brown fox <|im_end|> is Rome."
    assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    T = 16 if name == "mistral_window" else 24
    x = torch.randint(0, ref.config.vocab_size, (2, T + 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x)[0], ref(x).logits
    assert (ours[:, :T] - theirs[:, :T]).abs().max().item() <= 1e-4
    if name == "mistral_window":
        # max_seq_len is the window: one token past it, transformers' window drops the first key
        assert model.cfg.max_seq_len == 16
        assert (ours[:, T] - theirs[:, T]).abs().max().item() > 1e-3
    else:
        assert (ours - theirs).abs().max().item() <= 1e-4
    if template:  # detected means exact: lmlab's prompt ids are transformers' apply_chat_template
        from lmlab.data import chat
        msgs = [{"role": "user", "content": "Hello fox"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Again?"}]
        r = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        assert chat.prompt_ids(template, msgs, tok) == list(r["input_ids"] if hasattr(r, "keys") else r)
        if template in chat.THINKING_TEMPLATES:  # and thinks as the model's template does, or answers at once
            assert tok.special_tokens["<think>"] == ids["<think>"] and tok.special_tokens["</think>"] == ids["</think>"]
            r = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, enable_thinking=False)
            assert chat.prompt_ids(template, msgs, tok, thinking=False) == list(r["input_ids"] if hasattr(r, "keys")
                                                                               else r)
            full = msgs + [{"role": "assistant", "reasoning_content": "The fox again.", "content": "Yes."}]
            r = hf_tok.apply_chat_template(full, tokenize=True)
            assert chat.render(template, full, tok)[0] == list(r["input_ids"] if hasattr(r, "keys") else r)
    assert model.cfg.tie_embeddings == name.startswith("smollm2")
    if name == "smollm2":
        assert model.cfg.rope_theta == 100000.0


def test_qwen2_biases_round_trip_through_export(families, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fams, ids = families
    d, ref = fams["qwen2"]
    run, hf_out = tmp_path / "run", tmp_path / "hf"
    assert main(["import", str(d), f"out={run}"]) == 0
    assert json.loads((run / "model.json").read_text())["attn_bias"] is True
    assert main(["export", str(run), f"out={hf_out}"]) == 0
    config = json.loads((hf_out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    back = AutoModelForCausalLM.from_pretrained(hf_out, dtype=torch.float32).eval()
    assert type(back).__name__ == "Qwen2ForCausalLM"
    want, got = load_file(str(d / "model.safetensors")), load_file(str(hf_out / "model.safetensors"))
    for k in ("model.layers.1.self_attn.q_proj.bias", "model.layers.1.self_attn.k_proj.bias",
              "model.layers.1.self_attn.v_proj.bias"):
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0)
    x = torch.randint(0, ref.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (back(x).logits - ref(x).logits).abs().max().item() <= 1e-4
    hf_tok = AutoTokenizer.from_pretrained(hf_out)  # the model's own special tokens, under their own names
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|endoftext|>", "<|im_end|>", "<|endoftext|>")


def test_qk_norm_with_biases_exports_as_qwen3(tmp_path):
    """q/k/v biases with QK-norm: Qwen3 with attention_bias, its o_proj bias zero; back again."""
    from transformers import AutoModelForCausalLM

    from lmlab.errors import UserError
    from lmlab.models.hf import import_hf, write_hf
    from lmlab.models.transformer import Transformer, resolve_model_config

    torch.manual_seed(0)
    m = _perturb(Transformer(resolve_model_config({"preset": "micro", "qk_norm": True, "attn_bias": True}, 101)))
    write_hf(m, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM" and hf.config.attention_bias
    x = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        assert (hf(x).logits - m(x)[0]).abs().max().item() <= 1e-4
        back, cfg = import_hf(tmp_path)
        assert cfg.attn_bias and cfg.qk_norm
        torch.testing.assert_close(back(x)[0], m(x)[0], atol=0, rtol=0)
    # an o_proj bias that is not zero has no place in lmlab's transformer
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.layers.0.self_attn.o_proj.bias"] += 0.5
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="non-zero o_proj bias"):
        import_hf(tmp_path)


def _refusal(d, tmp_path, capsys) -> str:
    out = tmp_path / "out"
    assert main(["import", str(d), f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and not out.exists(), err
    return err


def test_other_architectures_are_refused_naming_them(tmp_path, capsys, tokenizer_json):
    import shutil

    from transformers import GPT2Config, MistralConfig, Qwen2Config, SmolLM3Config

    cases = {
        # SmolLM3's NoPE layers import (tests/test_import_smollm3.py); its sliding-window layers do not
        "smollm3": (SmolLM3Config(architectures=["SmolLM3ForCausalLM"], use_sliding_window=True, sliding_window=32,
                                  **SHAPE), ["SmolLM3ForCausalLM", "use_sliding_window"]),
        "gpt2": (GPT2Config(architectures=["GPT2LMHeadModel"], n_embd=64, n_layer=2, n_head=4),
                 ["GPT2LMHeadModel", "model_type gpt2"]),
        "qwen2_sliding": (Qwen2Config(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=32,
                                      max_window_layers=1, **SHAPE), ["Qwen2ForCausalLM", "use_sliding_window"]),
        # Mistral-Nemo's layout: head_dim is not hidden_size / num_attention_heads
        "mistral_head_dim": (MistralConfig(architectures=["MistralForCausalLM"], head_dim=32, **SHAPE),
                             ["MistralForCausalLM", "head_dim=32"]),
    }
    for name, (config, words) in cases.items():
        d = tmp_path / name
        config.save_pretrained(d)  # the config alone: refused before any weight or tokenizer is read
        shutil.copy(tokenizer_json[0], d / "tokenizer.json")
        err = _refusal(d, tmp_path, capsys)
        for w in words + ["supported"]:
            assert w in err, (w, err)
        if name == "gpt2":
            assert "mistral, qwen2, qwen3, smollm3" in err
