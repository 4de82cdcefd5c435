"""`lmlab hidden-pairs`: what a thinking LLM's hidden states are before and after it thinks, per
problem (LLM-TRM's phase 2 data; docs/llm_trm.md).

    lmlab hidden-pairs runs/llm_trm/sft problems=runs/llm_trm/tasks/train.jsonl out=runs/llm_trm/pairs
    records, pre, post, meta = load_pairs("runs/llm_trm/pairs")

For each problem the LLM generates its thinking and answer, prompted in its thinking template as
`lmlab eval` prompts it (greedy by default). Then one teacher-forced forward pass over prompt +
generated tokens gives the last-layer states (after the final norm, lmlab.infer.hidden):
`hidden_pre` at every prompt position (all before `<think>`, which the model writes first) and
`hidden_post` at the position of `</think>` (the state that predicts the first answer token).
The pass is exact for every row, unlike states collected while sampling. Each record keeps the
thinking and answer text, the generated token ids, the thinking's length in tokens, whether the
thinking closed within `max_new_tokens` (an unclosed one has no hidden_post: counted in the
manifest, not truncated) and whether the answer is right (the task's checker, as `lmlab eval`
scores it; `match=flexible`: the last number after `</think>`, for a model such as SmolLM3 that
answers in its own words).

Files in `out` (kind 'hidden_pairs'): pairs.safetensors (`pre`: every problem's prompt states,
concatenated, (sum of prompt lengths, D) float32; `post`: one row per closed thinking, (n_closed,
D)), pairs.jsonl (one record per problem: its `pre_start`/`pre_len` rows in `pre` and `post_row`
in `post`, -1 when unclosed) and manifest.json (the LLM's fingerprint, D, counts).

Chunks and resume (lmlab.chunks): `chunk_size` problems at a time, each chunk written when done.
Ctrl-C keeps the finished chunks and the same command does only the rest, redoing and
duplicating nothing; the result is byte-identical to an uninterrupted run. A run left unfinished
with another config, model or problem file is refused, naming what changed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import Field

from lmlab import artifacts
from lmlab.chunks import ChunkStore
from lmlab.config import Strict
from lmlab.errors import UserError

KIND = "hidden_pairs"
VERB = "hidden-pairs"
PAIRS = "pairs.safetensors"
RECORDS = "pairs.jsonl"
POSITIONAL = ("model", "the thinking LLM's run directory (an SFT run in the think template)")


class Config(Strict):
    model: str = Field("", description="the thinking LLM (a model run dir whose chat template thinks)")
    problems: str = Field("", description="GSM8K-format jsonl (question, answer ending '#### N', optional task)")
    out: str = Field("runs/hidden_pairs", description="output directory (kind 'hidden_pairs')")
    max_problems: Optional[int] = Field(None, ge=1, description="the first N problems only")
    template: Optional[str] = Field(None, description="chat template; default: the run's chat.json (a thinking one)")
    max_new_tokens: int = Field(160, ge=1, description="tokens of thinking + answer generated at most")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    batch_size: int = Field(32, ge=1, description="problems generated (and read back) together")
    chunk_size: int = Field(64, ge=1, description="problems per chunk (the unit an interrupted run keeps)")
    seed: int = Field(0, description="sampling seed (chunk c draws with a hash of seed and c)")
    match: Literal["strict", "flexible"] = Field("strict", description="how `correct` reads the answer after "
                                                  "</think>: strict (the task's `#### N`) or flexible (the last "
                                                  "number, lm-eval's flexible-extract, for a model's own words)")
    device: str = Field("auto", description="auto | cpu | cuda | mps")


def _pairs_of(model, tokenizer, template: str, problems: list[dict], start: int, cfg: Config, device,
              seed: int) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """(records, pre states, post states) of one chunk of problems."""
    from lmlab.data.chat import THINK_CLOSE, THINK_OPEN
    from lmlab.infer.engine import complete_ids
    from lmlab.infer.hidden import hidden_states
    from lmlab.infer.prompting import prompt_room, question_prompt
    from lmlab.infer.sampling import Sampling
    from lmlab.tasks.problems import answer_rules, problem_stops

    room = prompt_room(model, "max_new_tokens", cfg.max_new_tokens)
    prompts = [question_prompt(template, p["question"], tokenizer, max_len=room) for p in problems]
    done = complete_ids(model, tokenizer, prompts, Sampling(max_new_tokens=cfg.max_new_tokens,
                                                            temperature=cfg.temperature, seed=seed),
                        problem_stops(template, tokenizer), cfg.batch_size, device)
    states = hidden_states(model, [p + c.ids for p, c in zip(prompts, done)], batch_size=cfg.batch_size,
                           device=device)
    opener, closer = tokenizer.special_tokens[THINK_OPEN], tokenizer.special_tokens[THINK_CLOSE]
    records, pre, post = [], [], []
    for i, (p, prompt, c, h) in enumerate(zip(problems, prompts, done, states)):
        ids = c.ids
        first = 1 if ids[:1] == [opener] else 0
        close = ids.index(closer) if closer in ids else None
        thinking_ids = ids[first:close] if close is not None else ids[first:]
        # the reply's text is cut at the stops already; the answer is what follows </think>
        # (from the ids when the tokenizer drops the delimiters from decoded text as special tokens)
        answer = "" if close is None else (c.text.split(THINK_CLOSE, 1)[1] if THINK_CLOSE in c.text
                                           else tokenizer.decode(ids[close + 1:])).strip()
        strict, loose, ref_fn = answer_rules(p.get("task"))
        a = (loose if cfg.match == "flexible" else strict)(answer) if close is not None else None
        ref = ref_fn(p["answer"])
        pre.append(h[:len(prompt)])
        if close is not None:
            post.append(h[len(prompt) + close])
        records.append({"problem": start + i, "question": p["question"], "task": p.get("task") or "gsm8k",
                        "opened": bool(first), "closed": close is not None,
                        "thinking": tokenizer.decode(thinking_ids).strip(), "thinking_tokens": len(thinking_ids),
                        "answer": answer, "extracted": a, "reference": ref, "correct": a is not None and a == ref,
                        "prompt_len": len(prompt), "generated_ids": ids})
    d = states[0].shape[-1]
    return records, torch.cat(pre), torch.stack(post) if post else torch.zeros(0, d)


def _chunk_bytes(records: list[dict], pre: torch.Tensor, post: torch.Tensor) -> bytes:
    from safetensors.torch import save

    return save({"pre": pre.contiguous(), "post": post.contiguous()}, metadata={"records": json.dumps(records)})


def _chunk_parts(data: bytes) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    from safetensors.torch import load

    # safetensors' layout: an 8-byte little-endian header length, then the JSON header (its metadata)
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    t = load(data)
    return json.loads(header["__metadata__"]["records"]), t["pre"], t["post"]


def load_pairs(path: str | Path) -> tuple[list[dict], list[torch.Tensor], torch.Tensor, dict]:
    """(records, each problem's pre states (prompt_len, D), post states (n_closed, D), the manifest)."""
    from safetensors.torch import load_file

    d = Path(path)
    m = artifacts.require_artifact(d, KIND, "hidden pairs")
    try:
        t = load_file(str(d / PAIRS))
        records = [json.loads(x) for x in (d / RECORDS).read_text().splitlines() if x.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {d} ({e}); run `lmlab hidden-pairs` again") from None
    pre = [t["pre"][r["pre_start"]:r["pre_start"] + r["pre_len"]] for r in records]
    return records, pre, t["post"], m


def _stats(records: list[dict], d: int) -> dict:
    closed = [r for r in records if r["closed"]]
    return {"problems": len(records), "d": d, "closed": len(closed), "thinking_not_closed": len(records) - len(closed),
            "not_opened": sum(not r["opened"] for r in records), "correct": sum(r["correct"] for r in records),
            "accuracy": sum(r["correct"] for r in records) / max(1, len(records)),
            "mean_thinking_tokens": sum(r["thinking_tokens"] for r in closed) / max(1, len(closed)),
            "mean_prompt_tokens": sum(r["prompt_len"] for r in records) / max(1, len(records))}


def run(cfg: Config) -> Path:
    from lmlab.data.tokenizer import Tokenizer
    from lmlab.infer.prompting import resolve_template
    from lmlab.models import load_model
    from lmlab.runtime import pick_device, progress
    from lmlab.data.chat import check_thinking_template
    from lmlab.tasks.samples import chunk_seed, read_checkable

    if not cfg.model or not cfg.problems:
        raise UserError("give the thinking model and the problems: `lmlab hidden-pairs RUN_DIR problems=FILE out=DIR`")
    model_dir, out = Path(cfg.model), Path(cfg.out)
    model_m = artifacts.require_artifact(model_dir, "model", "model")
    artifacts.check_out(out, KIND, VERB, inputs={"model": model_dir, "problems": Path(cfg.problems)})
    tokenizer = Tokenizer.load(model_dir / "tokenizer")  # cheap: the template is vetted before the weights load
    template = resolve_template(model_dir, None, cfg.template, default=None)
    check_thinking_template(template, tokenizer, VERB)
    problems = read_checkable(cfg.problems, cfg.max_problems)
    config = {**cfg.model_dump(mode="json"), "template": template}
    # match=strict is left out, so pairs written before `match` existed stay up to date
    fp_config = {k: v for k, v in config.items()
                 if k not in ("out", "device") and not (k == "match" and v == "strict")}
    inputs = {"model": {"path": str(model_dir), "fingerprint": model_m.get("fingerprint")},
              "problems": {"path": str(cfg.problems), "fingerprint": artifacts.sha256_file(cfg.problems)}}
    fp = artifacts.stage_fingerprint(KIND, fp_config, {k: v["fingerprint"] for k, v in inputs.items()})
    if artifacts.is_up_to_date(out, fp):
        print(f"{VERB}: up to date ({out}), nothing to do")
        return out

    timer = artifacts.Timer()
    device = pick_device(cfg.device)
    n_chunks = -(-len(problems) // cfg.chunk_size)
    store = ChunkStore(out, fp, n_chunks, VERB, kind=KIND, suffix=".safetensors",
                       config={**fp_config, **{f"{k}_fingerprint": v["fingerprint"] for k, v in inputs.items()}},
                       on_change="refuse", chunk_size=cfg.chunk_size, outputs=(PAIRS, RECORDS))
    with store.kept_on_stop("make"):
        kept = store.open()
        with timer("load"):
            model, tokenizer, _ = load_model(model_dir, device=device)
        model.requires_grad_(False).eval()
        with timer("pairs"), progress(len(problems), VERB, "problem") as bar:
            bar.update(sum(min(cfg.chunk_size, len(problems) - c * cfg.chunk_size) for c in kept))
            for c in range(n_chunks):
                if c in kept:
                    continue
                t0 = time.perf_counter()
                chunk = problems[c * cfg.chunk_size:(c + 1) * cfg.chunk_size]
                parts = _pairs_of(model, tokenizer, template, chunk, c * cfg.chunk_size, cfg, device,
                                  chunk_seed(cfg.seed, c))
                store.keep(c, _chunk_bytes(*parts), time.perf_counter() - t0)
                bar.update(len(chunk))
        records, pres, posts = [], [], []
        pre_rows = post_rows = 0
        for c in range(n_chunks):
            recs, pre, post = _chunk_parts(store.data[c])
            for r in recs:  # each record's rows in the concatenated tensors
                r["pre_start"], r["pre_len"] = pre_rows, r["prompt_len"]
                r["post_row"] = post_rows if r["closed"] else -1
                pre_rows += r["prompt_len"]
                post_rows += int(r["closed"])
            records += recs
            pres.append(pre)
            posts.append(post)
        d = int(pres[0].shape[-1])
        stats = {**_stats(records, d), "chunks": n_chunks, "chunks_reused": len(kept), "time_s": round(store.time_s(), 3)}
        from safetensors.torch import save_file

        with artifacts.atomic_dir(out) as tmp:
            save_file({"pre": torch.cat(pres).contiguous(), "post": torch.cat(posts).contiguous()}, str(tmp / PAIRS))
            with open(tmp / RECORDS, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            stats["sha256"] = {n: artifacts.sha256_file(tmp / n) for n in (PAIRS, RECORDS)}
            artifacts.write_manifest(tmp, KIND, config, fp, inputs=inputs, verb=VERB,
                                     tokenizer_sha256=tokenizer.sha256, timings=timer.total(), stats=stats)
    print(f"{VERB}: wrote {out} ({stats['problems']} problems, D={d}; thinking closed in {stats['closed']}, "
          f"not closed in {stats['thinking_not_closed']}; {stats['correct']} answers right; mean thinking "
          f"{stats['mean_thinking_tokens']:.1f} tokens)")
    return out
