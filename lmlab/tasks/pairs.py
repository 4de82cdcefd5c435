"""On-policy DPO preference pairs: sample a chat model on training problems, let the task checkers pick.

    lmlab pairs runs/x/sft problems=runs/x/tasks/train.jsonl out=runs/x/pairs
    lmlab pairs runs/x/sft problems=../shared/data/gsm8k/train.jsonl out=runs/x/pairs_gsm8k n_samples=8
    lmlab dpo init=runs/x/sft data=runs/x/pairs/pairs.jsonl out=runs/x/dpo_onpolicy

As in Iterative Reasoning Preference Optimization (Pang et al. 2024): for each problem the
model writes `n_samples` solutions; those whose answer the checker accepts are chosen
replies, the others rejected ones. Unlike the synthetic pairs of `lmlab tasks`
(dpo_train.jsonl: the reference with one arithmetic slip), the rejected replies are the
model's own mistakes, so DPO pushes probability away from what it actually gets wrong.

Sampling uses exactly the evaluation's chat prompt and stops (lmlab.tasks.problems:
`build_prompt` with the model's template, zero-shot, the question as the user turn;
`problem_stops`, the template's end of turn), and the answer is read with the evaluation's
strict extraction (`answer_rules`: `#### N`; a `sort` answer as its list), so "correct" means
what exact match means in `lmlab eval`.

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
  samples.jsonl  every sample: {"problem": index, "task", "sample", "answer", "reference", "correct"}
  manifest.json  stats: problems, samples, sample accuracy (overall and per task), pairs,
                 chosen_from counts, problems without a pair and why, time
The fingerprint covers the config (not `out` or `device`), the model's fingerprint and the
problem file's sha256: the same command with nothing changed is a no-op, and the same seed
gives byte-identical files.
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

KIND = "pairs"
POSITIONAL = ("model", "the chat model run directory to sample (an sft or dpo run, with chat.json)")


class Config(Strict):
    model: str = Field("", description="chat model run dir (kind 'model', with chat.json: an sft or dpo run) whose "
                       "samples become the pairs")
    problems: str = Field("", description="GSM8K-format jsonl: question, answer (worked solution ending '#### N'), "
                          "optional task and difficulty; `lmlab tasks` writes train.jsonl, GSM8K train files work too")
    out: str = Field("", description="output directory (kind 'pairs'); default: 'pairs' next to the model directory")
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
    """runs/x/sft -> runs/x/pairs."""
    return Path(model_dir).resolve().parent / "pairs"


def _resolve_template(cfg: Config, model_dir: Path, tokenizer) -> str:
    from lmlab.infer.prompting import resolve_template

    template = resolve_template(model_dir, tokenizer, cfg.template, default=None)
    if template is None:
        raise UserError(f"{model_dir} has no chat template (no chat.json: it is not an sft/dpo run); on-policy "
                        f"pairs sample a chat model: finetune it first (`lmlab sft init={model_dir} ...`) and "
                        f"pass the sft run, or set template=chatml if it was trained with one")
    return template


# ----------------------------------------------------------------------------- the stage

def run(cfg: Config) -> Path:
    from lmlab.data.tokenizer import Tokenizer
    from lmlab.tasks.problems import read_problems

    if not cfg.model:
        raise UserError("no model given: pass a chat model run dir, e.g. `lmlab pairs runs/x/sft "
                        "problems=runs/x/tasks/train.jsonl`")
    if not cfg.problems:
        raise UserError("no problems given: set problems=PATH (GSM8K-format jsonl, e.g. runs/x/tasks/train.jsonl)")
    model_dir = Path(cfg.model)
    model_manifest = artifacts.require_artifact(model_dir, "model", "model")
    out = Path(cfg.out) if cfg.out else default_out(model_dir)
    artifacts.check_out(out, KIND, "pairs", inputs={"model": model_dir}, suggest=default_out(model_dir))
    tokenizer = Tokenizer.load(model_dir / "tokenizer")  # cheap; vets the template before the weights load
    template = _resolve_template(cfg, model_dir, tokenizer)
    problems = read_problems(cfg.problems, cfg.max_problems or 0, checkable=True)

    config = {**cfg.model_dump(mode="json"), "template": template}
    fp_config = {k: v for k, v in config.items() if k not in ("out", "device")}
    inputs = {"model": {"path": str(model_dir), "fingerprint": model_manifest.get("fingerprint")},
              "problems": {"path": str(cfg.problems), "fingerprint": artifacts.sha256_file(cfg.problems)}}
    fp = artifacts.stage_fingerprint(KIND, fp_config, {k: v["fingerprint"] for k, v in inputs.items()})
    if artifacts.is_up_to_date(out, fp):
        print(f"pairs: up to date ({out}), nothing to do")
        return out

    from lmlab.models import load_model
    from lmlab.runtime import pick_device

    timer = artifacts.Timer()
    device = pick_device(cfg.device)
    with timer("load"):
        model, tokenizer, _ = load_model(model_dir, device=device)
    ctx = int(model.cfg.max_seq_len)
    if cfg.max_new_tokens >= ctx:
        raise UserError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for the prompt in the model's "
                        f"{ctx}-token context; lower it")
    t0 = time.perf_counter()
    with timer("sample"):
        samples = sample(model, tokenizer, problems, template, cfg, device)
    sample_s = time.perf_counter() - t0
    with timer("select"):
        pairs, sample_records, stats = build_pairs(problems, samples, cfg)
    stats["time_s"] = round(sample_s, 3)
    stats["samples_per_s"] = round(stats["samples"] / max(sample_s, 1e-9), 2)

    try:
        with artifacts.atomic_dir(out) as tmp:
            for name, recs in (("pairs", pairs), ("samples", sample_records)):
                with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                    for r in recs:
                        f.write(json.dumps(r, ensure_ascii=False) + "\n")
            stats["sha256"] = {f"{n}.jsonl": artifacts.sha256_file(tmp / f"{n}.jsonl") for n in ("pairs", "samples")}
            artifacts.write_manifest(tmp, KIND, config, fp, inputs=inputs, verb="pairs",
                                     tokenizer_sha256=tokenizer.sha256,
                                     timings=timer.total(), stats=stats)
    except OSError as e:
        raise artifacts.disk_error(e, out) from None
    print(summary_line(stats, out))
    if not pairs:
        print(f"pairs: warning: no pairs (every problem was all-correct or had no usable sample); "
              f"see {out / 'samples.jsonl'}", file=sys.stderr)
    return out


def problem_prompts(tokenizer, problems: list[dict], template: str, budget: int) -> list[list[int]]:
    """Each problem's prompt ids: the evaluation's zero-shot chat prompt, within `budget` tokens."""
    from lmlab.tasks.problems import build_prompt

    return [build_prompt(tokenizer, p, template, (), 0, budget)[0] for p in problems]


def sample(model, tokenizer, problems: list[dict], template: str, cfg: Config, device) -> list[list[str]]:
    """`n_samples` completions per problem, prompted and stopped exactly as `lmlab eval` prompts a chat model."""
    from lmlab.infer.engine import complete
    from lmlab.infer.sampling import Sampling
    from lmlab.runtime import progress
    from lmlab.tasks.problems import problem_stops

    ctx = int(model.cfg.max_seq_len)
    prompts = problem_prompts(tokenizer, problems, template, ctx - cfg.max_new_tokens)
    rep = [ids for ids in prompts for _ in range(cfg.n_samples)]
    was_training = model.training
    model.eval()
    with progress(len(rep), "pairs", "completion") as bar:
        flat = complete(model, tokenizer, rep, Sampling.of(cfg), problem_stops(template, tokenizer), cfg.batch_size,
                        device, bar)
    model.train(was_training)
    n = cfg.n_samples
    return [flat[i * n:(i + 1) * n] for i in range(len(problems))]


def build_pairs(problems: list[dict], samples: list[list[str]], cfg: Config) -> tuple[list[dict], list[dict], dict]:
    """(pair records, sample records, stats) from each problem's samples."""
    from lmlab.tasks.problems import answer_rules

    pairs: list[dict] = []
    records: list[dict] = []
    per_task: dict[str, dict] = {}
    without = {"all_correct": 0, "no_chosen": 0, "no_rejected": 0}
    counts = {"samples_correct": 0, "samples_unparseable": 0, "samples_empty": 0, "problems_any_correct": 0,
              "rejected_unparseable": 0}
    chosen_from = {"sample": 0, "reference": 0}
    for i, (p, outs) in enumerate(zip(problems, samples)):
        task = p.get("task") or "gsm8k"
        strict, _, ref_fn = answer_rules(p.get("task"))
        ref = ref_fn(p["answer"])
        answers = [strict(s) for s in outs]
        correct = [a is not None and a == ref for a in answers]
        parsed = [a is not None for a in answers]
        for s, a, ok in zip(outs, answers, correct):
            records.append({"problem": i, "task": task, "sample": s, "answer": a, "reference": ref, "correct": ok})
        chosen = select_pairs(outs, correct, parsed, p["answer"], cfg.pairs_per_problem, cfg.reference_fallback)
        parsed_of = {s.strip(): ok for s, ok in zip(outs, parsed)}
        for c, r, source in chosen:
            pairs.append({"prompt": p["question"], "chosen": c, "rejected": r, "task": task,
                          "difficulty": p.get("difficulty"), "chosen_from": source})
            chosen_from[source] += 1
            counts["rejected_unparseable"] += not parsed_of.get(r, False)
        n_ok = sum(correct)
        counts["samples_correct"] += n_ok
        counts["samples_unparseable"] += sum(not x for x in parsed)
        counts["samples_empty"] += sum(not s.strip() for s in outs)
        counts["problems_any_correct"] += n_ok > 0
        if not chosen:
            if n_ok == len(outs):
                without["all_correct"] += 1
            elif n_ok == 0 and not cfg.reference_fallback:
                without["no_chosen"] += 1
            else:
                without["no_rejected"] += 1  # the wrong samples were empty or equal to the chosen reply
        t = per_task.setdefault(task, {"problems": 0, "samples": 0, "samples_correct": 0, "pairs": 0,
                                       "problems_all_correct": 0})
        t["problems"] += 1
        t["samples"] += len(outs)
        t["samples_correct"] += n_ok
        t["pairs"] += len(chosen)
        t["problems_all_correct"] += n_ok == len(outs)
    n_samples = sum(len(s) for s in samples)
    for t in per_task.values():
        t["sample_accuracy"] = t["samples_correct"] / t["samples"] if t["samples"] else 0.0
    stats = {
        "problems": len(problems),
        "samples": n_samples,
        "sample_accuracy": counts["samples_correct"] / n_samples if n_samples else 0.0,
        **counts,
        "pairs": len(pairs),
        "chosen_from": chosen_from,
        "problems_with_pairs": len(problems) - sum(without.values()),
        "problems_all_correct": without["all_correct"],
        "problems_without_pair": without,
        "per_task": dict(sorted(per_task.items())),
    }
    return pairs, records, stats


def summary_line(stats: dict, out: Path) -> str:
    cf = stats["chosen_from"]
    return (f"pairs: wrote {out} ({stats['pairs']} pairs from {stats['problems']} problems; {stats['samples']} "
            f"samples, {100 * stats['sample_accuracy']:.1f}% correct; chosen: {cf['sample']} sample, "
            f"{cf['reference']} reference; {stats['problems_all_correct']} problems all correct)")
