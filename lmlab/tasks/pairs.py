"""On-policy DPO preference pairs: sample a chat model on training problems, let the task checkers pick.

    lmlab pairs runs/x/sft problems=runs/x/tasks/train.jsonl out=runs/x/pairs
    lmlab pairs runs/x/sft problems=../shared/data/gsm8k/train.jsonl out=runs/x/pairs_gsm8k n_samples=8
    lmlab pairs samples=runs/x/samples out=runs/x/pairs      # the samples of `lmlab samples`, not drawn again
    lmlab dpo init=runs/x/sft data=runs/x/pairs/pairs.jsonl out=runs/x/dpo_onpolicy

As in Iterative Reasoning Preference Optimization (Pang et al. 2024): for each problem the
model writes `n_samples` solutions; those whose answer the checker accepts are chosen
replies, the others rejected ones. Unlike the synthetic pairs of `lmlab tasks`
(dpo_train.jsonl: the reference with one arithmetic slip), the rejected replies are the
model's own mistakes, so DPO pushes probability away from what it actually gets wrong.

The samples are drawn and labelled by lmlab.tasks.samples (`draw`), the code of `lmlab
samples`: exactly the evaluation's chat prompt and stops (lmlab.tasks.problems: `build_prompt`
with the model's template, zero-shot; `problem_stops`), the answer read with the evaluation's
strict extraction (`answer_rules`: `#### N`; a `sort` answer as its list), so "correct" means
what exact match means in `lmlab eval`. Sampling here is `lmlab samples` with the same options
and its default chunk_size (64): `samples=DIR` of such a run gives these very pairs. With
`samples=DIR` the model, problems and sampling options are the samples artifact's, and giving
them too is an error.

Per problem, up to `pairs_per_problem` pairs (`select_pairs`):
  chosen    a distinct correct sample (cycled when there are fewer than pairs); with none,
            the reference solution if `reference_fallback`, else no pair
  rejected  a distinct incorrect sample, each used once: those with a parseable `#### `
            answer (a wrong answer) before unparseable ones (cut off, rambling); empty
            samples never
  replies are stripped of surrounding whitespace, and chosen never equals rejected.
A problem whose samples are all correct gives no pair (counted as all-correct).

Files in `out` (kind 'pairs'):
  pairs.jsonl    {"prompt": question, "chosen", "rejected", "task", "difficulty",
                  "chosen_from": "sample" | "reference"}: what `lmlab dpo data=...` reads
  samples.jsonl  every sample, in the record layout of `lmlab samples` ({"problem", "question",
                 "solution", "task", "difficulty", "k", "completion", "answer", "reference",
                 "correct"}; see lmlab.tasks.samples)
  manifest.json  stats: problems, samples, sample accuracy (overall and per task), pairs,
                 chosen_from counts, problems without a pair and why, time
The fingerprint covers the config (not `out` or `device`), the model's fingerprint and the
problem file's sha256 (with `samples=DIR`: the samples artifact's fingerprint): the same
command with nothing changed is a no-op, and the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from pydantic import Field

from lmlab import artifacts
from lmlab.config import Strict
from lmlab.errors import UserError
from lmlab.tasks import samples as sampler

# What `lmlab pairs` prompts and samples with, under the names callers (and tests) know it by.
problem_prompts = sampler.problem_prompts
sample = sampler.sample

KIND = "pairs"
POSITIONAL = ("model", "the chat model run directory to sample (an sft or dpo run, with chat.json)")


class Config(Strict):
    model: str = Field("", description="chat model run dir (kind 'model', with chat.json: an sft or dpo run) whose "
                       "samples become the pairs")
    problems: str = Field("", description="GSM8K-format jsonl: question, answer (worked solution ending '#### N'), "
                          "optional task and difficulty; `lmlab tasks` writes train.jsonl, GSM8K train files work too")
    samples: str = Field("", description="a samples artifact (`lmlab samples`) to take the samples from instead of "
                         "sampling: model, problems and the sampling options are then the ones it was drawn with")
    out: str = Field("", description="output directory (kind 'pairs'); default: 'pairs' next to the model (or "
                     "samples) directory")
    template: Optional[str] = Field(None, description="chat template to prompt with (chatml, instruct, chat, "
                                    "alpaca); null = the model's chat.json")
    n_samples: int = Field(4, ge=1, description="sampled solutions per problem")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus top-p (1 = off)")
    max_new_tokens: int = Field(128, ge=1, description="tokens generated per sample at most")
    max_problems: Optional[int] = Field(None, ge=1, description="use only the first N problems (null = all)")
    pairs_per_problem: int = Field(1, ge=1, description="pairs per problem at most (each with a distinct rejected sample)")
    reference_fallback: bool = Field(True, description="when no sample is correct, the reference solution is the "
                                     "chosen reply (false: such problems give no pair)")
    batch_size: int = Field(32, ge=1, description="completions decoded together")
    seed: int = Field(0, description="sampling seed: the same seed gives the same pairs")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")


# ----------------------------------------------------------------------------- selection

def select_pairs(samples: Sequence[str], correct: Sequence[bool], parsed: Sequence[bool], reference: str,
                 pairs_per_problem: int = 1, reference_fallback: bool = True) -> list[tuple[str, str, str]]:
    """Up to `pairs_per_problem` (chosen, rejected, chosen_from) from one problem's samples.

    `correct[i]`: sample i's answer is the reference answer; `parsed[i]`: it has an answer at
    all (strict extraction found `#### ...`). Replies are stripped. Chosen: the distinct
    correct samples in order, cycled; none -> the reference (chosen_from "reference") if
    `reference_fallback`, else no pair. Rejected: the distinct non-empty incorrect samples,
    parseable ones first, each in sample order and used once. Chosen never equals rejected.
    """
    if not (len(samples) == len(correct) == len(parsed)):
        raise ValueError("samples, correct and parsed must have the same length")
    chosen: list[str] = []
    wrong_parsed: list[str] = []
    wrong_unparsed: list[str] = []
    for text, ok, has_answer in zip(samples, correct, parsed):
        t = text.strip()
        if not t:
            continue  # an empty reply teaches nothing (and the DPO reader refuses it)
        if ok:
            if t not in chosen:
                chosen.append(t)
        else:
            group = wrong_parsed if has_answer else wrong_unparsed
            if t not in wrong_parsed and t not in wrong_unparsed:
                group.append(t)
    source = "sample"
    if not chosen:
        if not reference_fallback or not reference.strip():
            return []
        chosen, source = [reference.strip()], "reference"
    rejected = [t for t in wrong_parsed + wrong_unparsed if t not in chosen]
    return [(chosen[i % len(chosen)], r, source) for i, r in enumerate(rejected[:pairs_per_problem])]


# ----------------------------------------------------------------------------- inputs

def default_out(model_dir: str | Path) -> Path:
    """runs/x/sft -> runs/x/pairs (and runs/x/samples -> runs/x/pairs)."""
    return Path(model_dir).resolve().parent / "pairs"


# ----------------------------------------------------------------------------- the stage

def run(cfg: Config) -> Path:
    if cfg.samples:
        return _run(cfg, *_from_samples(cfg))
    if not cfg.model:
        raise UserError("no model given: pass a chat model run dir, e.g. `lmlab pairs runs/x/sft "
                        "problems=runs/x/tasks/train.jsonl` (or samples=DIR, a `lmlab samples` artifact)")
    if not cfg.problems:
        raise UserError("no problems given: set problems=PATH (GSM8K-format jsonl, e.g. runs/x/tasks/train.jsonl)")
    from lmlab.data.tokenizer import Tokenizer

    model_dir = Path(cfg.model)
    model_manifest = artifacts.require_artifact(model_dir, "model", "model")
    out = Path(cfg.out) if cfg.out else default_out(model_dir)
    artifacts.check_out(out, KIND, "pairs", inputs={"model": model_dir}, suggest=default_out(model_dir))
    tokenizer = Tokenizer.load(model_dir / "tokenizer")  # cheap; vets the template before the weights load
    template = sampler.resolve_template(cfg, model_dir, tokenizer, "pairs")
    problems = sampler.read_checkable(cfg.problems, cfg.max_problems)
    inputs = {"model": {"path": str(model_dir), "fingerprint": model_manifest.get("fingerprint")},
              "problems": {"path": str(cfg.problems), "fingerprint": artifacts.sha256_file(cfg.problems)}}

    def draw(timer: artifacts.Timer) -> tuple[list[dict], dict, str]:
        """(sample records, timing stats, tokenizer sha256): the samples, drawn as `lmlab samples` draws them."""
        model, tok, device = sampler.load_sampler(model_dir, cfg, timer)
        t0 = time.perf_counter()
        with timer("sample"):
            records = sampler.draw(model, tok, problems, template, cfg, device, sampler.CHUNK_SIZE, desc="pairs")
        sample_s = time.perf_counter() - t0
        return records, {"time_s": round(sample_s, 3),
                         "samples_per_s": round(len(records) / max(sample_s, 1e-9), 2)}, tok.sha256

    return _run(cfg, out, {**cfg.model_dump(mode="json"), "template": template}, inputs, draw)


def _from_samples(cfg: Config):
    """(out, config, inputs, draw) for `samples=DIR`: the records of a samples artifact, as they are."""
    given = sorted(f for f in sampler.SAMPLING_FIELDS if f in cfg.model_fields_set and f in Config.model_fields)
    if given:
        raise UserError(f"samples={cfg.samples} already fixes {', '.join(given)} (the samples were drawn with its "
                        f"own); drop {' and '.join(given)}, or drop samples= to sample again")
    src = Path(cfg.samples)
    manifest = artifacts.require_artifact(src, sampler.KIND, "samples")
    out = Path(cfg.out) if cfg.out else default_out(src)
    artifacts.check_out(out, KIND, "pairs", inputs={"samples": src}, suggest=default_out(src))
    records = sampler.read_records(src / sampler.SAMPLES)
    drawn = manifest.get("config") or {}
    # the manifest's config says how the samples were drawn, in this stage's field names
    config = {**cfg.model_dump(mode="json"),
              **{k: drawn[k] for k in sampler.SAMPLING_FIELDS if k in Config.model_fields and k in drawn}}
    inputs = {"samples": {"path": str(src), "fingerprint": manifest.get("fingerprint")}}

    def draw(timer: artifacts.Timer) -> tuple[list[dict], dict, str]:
        rate = (manifest.get("stats") or {}).get("samples_per_s")
        return records, {"time_s": 0.0, "samples_per_s": rate}, manifest.get("tokenizer_sha256")

    return out, config, inputs, draw


def _run(cfg: Config, out: Path, config: dict, inputs: dict, draw) -> Path:
    """Draw (or read) the samples, select the pairs, write `out` atomically; a no-op when up to date."""
    fp_config = {k: v for k, v in config.items() if k not in ("out", "device")}
    fp = artifacts.stage_fingerprint(KIND, fp_config, {k: v["fingerprint"] for k, v in inputs.items()})
    if artifacts.is_up_to_date(out, fp):
        print(f"pairs: up to date ({out}), nothing to do")
        return out
    timer = artifacts.Timer()
    records, timing, tokenizer_sha256 = draw(timer)
    with timer("select"):
        pairs, stats = pairs_from_records(records, cfg)
    stats.update(timing)
    try:
        with artifacts.atomic_dir(out) as tmp:
            with open(tmp / "pairs.jsonl", "w", encoding="utf-8") as f:
                for r in pairs:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            (tmp / "samples.jsonl").write_bytes(sampler.records_bytes(records))
            stats["sha256"] = {f"{n}.jsonl": artifacts.sha256_file(tmp / f"{n}.jsonl") for n in ("pairs", "samples")}
            artifacts.write_manifest(tmp, KIND, config, fp, inputs=inputs, verb="pairs",
                                     tokenizer_sha256=tokenizer_sha256, timings=timer.total(), stats=stats)
    except OSError as e:
        raise artifacts.disk_error(e, out) from None
    print(summary_line(stats, out))
    if not pairs:
        print(f"pairs: warning: no pairs (every problem was all-correct or had no usable sample); "
              f"see {out / 'samples.jsonl'}", file=sys.stderr)
    return out


def build_pairs(problems: list[dict], samples: list[list[str]], cfg: Config) -> tuple[list[dict], list[dict], dict]:
    """(pair records, sample records, stats) from each problem's completions."""
    records = sampler.label(problems, samples)
    pairs, stats = pairs_from_records(records, cfg)
    return pairs, records, stats


def pairs_from_records(records: Sequence[dict], cfg: Config) -> tuple[list[dict], dict]:
    """(pair records, stats) from sample records (lmlab.tasks.samples' layout), problem by problem."""
    pairs: list[dict] = []
    without = {"all_correct": 0, "no_chosen": 0, "no_rejected": 0}
    chosen_from = {"sample": 0, "reference": 0}
    rejected_unparseable = 0
    stats = sampler.sample_stats(records)
    for recs in sampler.by_problem(records):
        outs = [r["completion"] for r in recs]
        correct = [r["correct"] for r in recs]
        parsed = [r["answer"] is not None for r in recs]
        p = recs[0]
        chosen = select_pairs(outs, correct, parsed, p["solution"], cfg.pairs_per_problem, cfg.reference_fallback)
        parsed_of = {s.strip(): ok for s, ok in zip(outs, parsed)}
        for c, r, source in chosen:
            pairs.append({"prompt": p["question"], "chosen": c, "rejected": r, "task": p["task"],
                          "difficulty": p["difficulty"], "chosen_from": source})
            chosen_from[source] += 1
            rejected_unparseable += not parsed_of.get(r, False)
        stats["per_task"][p["task"]]["pairs"] = stats["per_task"][p["task"]].get("pairs", 0) + len(chosen)
        if not chosen:
            n_ok = sum(correct)
            if n_ok == len(outs):
                without["all_correct"] += 1
            elif n_ok == 0 and not cfg.reference_fallback:
                without["no_chosen"] += 1
            else:
                without["no_rejected"] += 1  # the wrong samples were empty or equal to the chosen reply
    stats.update({
        "rejected_unparseable": rejected_unparseable,
        "pairs": len(pairs),
        "chosen_from": chosen_from,
        "problems_with_pairs": stats["problems"] - sum(without.values()),
        "problems_without_pair": without,
    })
    return pairs, stats


def summary_line(stats: dict, out: Path) -> str:
    cf = stats["chosen_from"]
    return (f"pairs: wrote {out} ({stats['pairs']} pairs from {stats['problems']} problems; {stats['samples']} "
            f"samples, {100 * stats['sample_accuracy']:.1f}% correct; chosen: {cf['sample']} sample, "
            f"{cf['reference']} reference; {stats['problems_all_correct']} problems all correct)")
