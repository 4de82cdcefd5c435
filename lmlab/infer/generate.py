"""Generate text from a trained model with the KV-cache engine.

    lmlab generate runs/model prompts='["Once upon", "The"]' max_new_tokens=50 \\
        temperature=0.8 top_k=50 top_p=0.95 stop='["\\n\\n"]'
    lmlab generate runs/model prompts_file=prompts.txt temperature=0 out=gens.jsonl

Prints each prompt and its completion; a single prompt streams its tokens as they come.
A transformer generating past its context (prompt + new tokens > max_seq_len) streams with
attention sinks (`sinks=4`: the first 4 tokens and the most recent ones stay in the cache).
With `out`, also writes one `{"prompt", "completion"}` JSON object per line.
`backend=jax` decodes a Griffin with the JAX model (lmlab.infer.backend, docs/jax.md).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from lmlab.config import Strict
from lmlab.errors import UserError

POSITIONAL = ("model", "model run directory (model.safetensors, model.json, tokenizer/)")


class Config(Strict):
    model: str = Field("", description="model run directory to generate from")
    prompts: list[str] = Field(default_factory=list, description="prompts, e.g. prompts='[\"Once upon\", \"The\"]'")
    prompts_file: Optional[str] = Field(None, description="text file with one prompt per line (added after `prompts`)")
    max_new_tokens: int = Field(64, ge=1, description="most new tokens per prompt")
    temperature: float = Field(0.8, ge=0.0, description="sampling temperature; 0 = greedy")
    top_k: int = Field(50, ge=0, description="sample from the k most likely tokens only; 0 = all")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="nucleus sampling: smallest token set with this much probability")
    stop: list[str] = Field(default_factory=list, description="stop strings: a completion ends before the first one")
    seed: int = Field(0, description="sampling seed (same seed, same text)")
    add_bos: bool = Field(True, description="start each prompt with the BOS token, as training documents do")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    batch_size: int = Field(16, ge=1, description="prompts decoded together")
    sinks: Optional[int] = Field(4, ge=0, description="past the model's context (prompt + new tokens > max_seq_len): "
                                 "keep the first `sinks` tokens and the most recent ones (attention sinks, "
                                 "StreamingLLM); null = RoPE positions past the context")
    out: Optional[str] = Field(None, description="optional JSONL file for {prompt, completion} records")
    backend: Literal["torch", "jax"] = Field("torch", description="what decodes: torch, or jax (a Griffin, with "
                                             "DeepMind's recurrentgemma.jax on JAX's devices; docs/jax.md)")


def _is_generations(path: Path) -> bool:
    """Whether `path` is an earlier `out` of this verb (empty, or {prompt, completion} lines), safe to replace."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        rec = json.loads(first) if first.strip() else {"prompt": "", "completion": ""}
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and {"prompt", "completion"} <= set(rec)


def _read_prompts(cfg: Config) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        p = Path(cfg.prompts_file)
        if not p.is_file():
            raise UserError(f"prompts_file not found: {p}")
        prompts += [line.rstrip("\n") for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError("no prompts given; add prompts='[\"Once upon\"]' or prompts_file=FILE (one prompt per line)")
    return prompts


def _stream_one(model, tokenizer, prompt: str, cfg: Config, device) -> str:
    """Print the completion of one prompt token by token; returns it (stop strings cut)."""
    from lmlab.infer.engine import generate
    from lmlab.infer.prompting import StopStream

    stream = StopStream(cfg.stop, tokenizer)  # shows nothing of a stop string, even one split across tokens

    def on_token(_row: int, t: int) -> None:
        sys.stdout.write(stream.push_token(t))
        sys.stdout.flush()

    sys.stdout.write(prompt)
    completion = generate(model, tokenizer, [prompt], cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                          cfg.stop, cfg.seed, device, add_bos=cfg.add_bos, on_token=on_token, sinks=cfg.sinks)[0]
    sys.stdout.write(stream.finish() + "\n")
    sys.stdout.flush()
    return completion


def run(cfg: Config) -> list[dict]:
    from lmlab.infer.backend import load_for_decoding
    from lmlab.infer.engine import generate
    from lmlab.runtime import progress

    if not cfg.model:
        raise UserError("no model given; run `lmlab generate RUN_DIR prompts='[\"...\"]'`")
    prompts = _read_prompts(cfg)
    if cfg.out:
        from lmlab.artifacts import check_out_file
        check_out_file(cfg.out, "generate", _is_generations, "generations.jsonl")  # before the model loads
    # (backend=jax: a single prompt streams 8 tokens at a time; a batch decodes 32 per call)
    model, tokenizer, _, device = load_for_decoding(cfg.model, cfg.backend, cfg.device,
                                                    chunk=8 if len(prompts) == 1 else 32)
    records = []
    if len(prompts) == 1:
        records.append({"prompt": prompts[0], "completion": _stream_one(model, tokenizer, prompts[0], cfg, device)})
    else:
        bar = progress(len(prompts), desc="generate", unit="prompt")
        for start in range(0, len(prompts), cfg.batch_size):
            chunk = prompts[start:start + cfg.batch_size]
            outs = generate(model, tokenizer, chunk, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                            cfg.stop, cfg.seed + start, device, add_bos=cfg.add_bos, sinks=cfg.sinks)
            for i, (p, c) in enumerate(zip(chunk, outs)):
                print(f"--- [{start + i + 1}/{len(prompts)}]\n{p}{c}", flush=True)
                records.append({"prompt": p, "completion": c})
            bar.update(len(chunk))
        bar.close()
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, out)
    return records
