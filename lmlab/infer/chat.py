"""Chat with a model in the terminal, using its chat template; replies stream as they come.

    lmlab chat runs/sft                                  # template from the run's chat.json
    lmlab chat runs/sft system="Answer briefly." temperature=0.7 max_new_tokens=200
    printf 'What is 2+3?\\n/reset\\nHi\\n' | lmlab chat runs/sft temperature=0

The conversation history is kept and rendered with the template (lmlab.data.chat) on every
turn; a reply ends at the template's end-of-turn token (`<|im_end|>` for chatml, eos for the
others), at a stop string (the model starting the next turn) or after max_new_tokens: the
stops of lmlab.infer.prompting, which also holds back text that may be a stop's start.
When the history no longer fits the model's context (leaving room for the reply), the
oldest messages after the system message are dropped, and the chat says so; with `sinks=4`
the whole history is read instead, streaming past the context with attention sinks (the
first 4 tokens and the most recent ones stay in the cache: lmlab.models.kv_cache).

Commands: `/reset` clears the history (the system message stays), `/exit` (or `/quit`,
end of input, Ctrl-C) leaves. Ctrl-C while a reply streams stops that reply only.
`backend=jax` decodes a Griffin with the JAX model (lmlab.infer.backend, docs/jax.md).
"""

from __future__ import annotations

import sys
from typing import Literal, Optional

from pydantic import Field

from lmlab.config import Strict
from lmlab.errors import UserError

POSITIONAL = ("model", "model run directory (model.safetensors, model.json, tokenizer/, chat.json)")


class Config(Strict):
    model: str = Field("", description="model run directory to chat with")
    template: Optional[str] = Field(None, description="chat template: chatml, instruct, chat or alpaca; "
                                                      "default: the run's chat.json, else chatml")
    system: Optional[str] = Field(None, description="system message that opens the conversation")
    max_new_tokens: int = Field(256, ge=1, description="most tokens per reply")
    temperature: float = Field(0.7, ge=0.0, description="sampling temperature; 0 = greedy")
    top_k: int = Field(50, ge=0, description="sample from the k most likely tokens only; 0 = all")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="nucleus sampling: smallest token set with this much probability")
    seed: int = Field(0, description="sampling seed; reply n uses seed + n, so a session replays exactly")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    sinks: Optional[int] = Field(None, ge=0, description="when the history outgrows the context, stream past it "
                                 "with attention sinks (the first `sinks` tokens and the most recent ones) "
                                 "instead of dropping the oldest messages")
    backend: Literal["torch", "jax"] = Field("torch", description="what decodes: torch, or jax (a Griffin, with "
                                             "DeepMind's recurrentgemma.jax on JAX's devices; docs/jax.md)")


def stream_reply(model, tokenizer, ids: list[int], template: str, cfg: Config, seed: int, device,
                 out=None) -> str:
    """Generate one reply to prompt `ids`, writing its text to `out` as it comes; returns it."""
    from lmlab.infer.engine import generate_ids
    from lmlab.infer.prompting import StopStream, chat_stops
    from lmlab.infer.sampling import Sampling

    out = out or sys.stdout
    stops = chat_stops(template, tokenizer)
    ends = set(stops.ids)
    stream = StopStream(stops.strings, tokenizer)
    s = Sampling.of(cfg, seed=seed)
    # what the context has room for, unless sinks stream past it
    budget = s.max_new_tokens if cfg.sinks is not None else min(s.max_new_tokens, model.cfg.max_seq_len - len(ids))
    try:
        for step in generate_ids(model, [ids], budget, s.temperature, s.top_k, s.top_p, eos_id=None,
                                 seed=s.seed, device=device, pad_id=max(tokenizer.pad_id, 0), sinks=cfg.sinks):
            t = step[0]
            if t is None or t in ends:
                break
            out.write(stream.push_token(t))
            out.flush()
            if stream.stopped:  # leaving the loop ends the decoding
                break
    except KeyboardInterrupt:
        out.write(" [stopped]")
    out.write(stream.finish() + "\n")
    out.flush()
    return stream.text.strip()


def run(cfg: Config) -> list[dict]:
    """The REPL; returns the conversation as it stands when the chat ends."""
    from lmlab.data.chat import check_template, prompt_ids
    from lmlab.infer.prompting import resolve_template
    from lmlab.infer.backend import load_for_decoding

    if not cfg.model:
        raise UserError("no model given; run `lmlab chat RUN_DIR`")
    template = resolve_template(cfg.model, template=cfg.template)  # a bad name fails before the weights load
    # backend=jax: the reply streams 8 tokens at a time
    model, tokenizer, _, device = load_for_decoding(cfg.model, cfg.backend, cfg.device, chunk=8)
    check_template(template, tokenizer)
    context = model.cfg.max_seq_len
    # Leave room for the reply, but never less than half the context for the history.
    prompt_budget = context - min(cfg.max_new_tokens, context // 2)
    start = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    print(f"chat: {cfg.model} (template {template}, context {context} tokens). "
          f"/reset clears the history, /exit quits.", file=sys.stderr)
    turn = 0
    try:
        while True:
            sys.stdout.write("you> ")
            sys.stdout.flush()
            line = sys.stdin.readline()
            if not line:  # end of input
                sys.stdout.write("\n")
                break
            if not interactive:
                sys.stdout.write(line if line.endswith("\n") else line + "\n")
            text = line.rstrip("\n")
            if text.strip() in ("/exit", "/quit"):
                break
            if text.strip() == "/reset":
                messages = list(start)
                print("(history cleared)", flush=True)
                continue
            if not text.strip():
                continue
            messages.append({"role": "user", "content": text})
            stats: dict = {}
            ids = prompt_ids(template, messages, tokenizer, max_len=None if cfg.sinks is not None else prompt_budget,
                             stats=stats)
            if stats.get("dropped_messages"):
                head = len(start)
                messages = messages[:head] + messages[head + stats["dropped_messages"]:]
                print(f"(history truncated: dropped the {stats['dropped_messages']} oldest message(s) to fit "
                      f"{prompt_budget} of the model's {context} context tokens)", file=sys.stderr, flush=True)
            if stats.get("cut_tokens"):
                print(f"(your message is too long: its first {stats['cut_tokens']} tokens were cut to fit "
                      f"the context)", file=sys.stderr, flush=True)
            sys.stdout.write("assistant> ")
            reply = stream_reply(model, tokenizer, ids, template, cfg, cfg.seed + turn, device)
            messages.append({"role": "assistant", "content": reply})
            turn += 1
    except KeyboardInterrupt:
        sys.stdout.write("\n")
    sys.stdout.flush()
    return messages
