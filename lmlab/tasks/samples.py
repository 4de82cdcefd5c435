"""k labelled samples per training problem from a chat model: the data verifier, reward model and pairs share.

    lmlab samples runs/x/sft problems=runs/x/tasks/train.jsonl out=runs/x/samples
    lmlab samples runs/x/sft problems=../shared/data/gsm8k/train.jsonl n_samples=16 max_problems=2000
    lmlab pairs samples=runs/x/samples out=runs/x/pairs       # DPO pairs from these samples, no sampling

For each problem the model writes `n_samples` solutions, prompted and stopped exactly as
`lmlab eval` prompts a chat model (lmlab.tasks.problems: `build_prompt` with the model's
template, zero-shot; `problem_stops`), and each is labelled with the evaluation's strict
extraction (`answer_rules`: `#### N`; a `sort` answer as its list), so `correct` means what
exact match means in `lmlab eval`. `lmlab pairs` samples through the same functions here
(`draw`, `sample`, `label`), so prompts, seeds and labels are defined once.

Files in `out` (kind 'samples'):
  samples.jsonl  one record per sample, in problem order, then sample order:
                 {"problem": index in the file (after max_problems), "question", "solution" (the
                  problem's reference `answer`, the worked solution), "task" ("gsm8k" when absent),
                  "difficulty" (int or null), "k": sample index 0..n_samples-1, "completion",
                  "answer" (strict extraction, null when none), "reference" (the extracted
                  reference answer), "correct"}
  manifest.json  stats: problems, samples, sample_accuracy, samples_correct, samples_unparseable,
                 samples_empty, problems_any_correct (pass@k), problems_all_correct, pass_at_k,
                 per_task, chunks, chunks_reused, time_s, samples_per_s, the file's sha256

Chunks and resume. Problems are sampled `chunk_size` at a time, chunk c with the seed
`chunk_seed(seed, c)`. While the run is unfinished `out` is a run directory (`run.json`, as
training runs mark theirs) holding `chunks/chunk_00000.jsonl`, ... (each written atomically
when its chunk is done) and `chunks/state.json` (the fingerprint and each finished chunk's
sha256). Ctrl-C keeps the finished chunks; the same command samples only the rest, and the
result is byte-identical to an uninterrupted run. A changed config, model or problem file
starts over. When every chunk is done, samples.jsonl and the manifest replace the run
directory in one rename. The fingerprint covers the config (not `out` or `device`), the
model's fingerprint and the problem file's sha256: the same command on a finished run is a
no-op.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from pydantic import Field

from lmlab import artifacts
from lmlab.chunks import ChunkStore
from lmlab.config import Strict
from lmlab.errors import UserError

KIND = "samples"
VERB = "samples"
POSITIONAL = ("model", "the chat model run directory to sample (an sft or dpo run, with chat.json)")
CHUNK_SIZE = 64
SAMPLES = "samples.jsonl"
RECORD_KEYS = ("problem", "question", "solution", "task", "difficulty", "k", "completion", "answer", "reference",
               "correct")
# The config fields that decide which completions are drawn (what `lmlab pairs samples=DIR` takes as given).
SAMPLING_FIELDS = ("model", "problems", "template", "n_samples", "temperature", "top_p", "top_k", "max_new_tokens",
                   "max_problems", "batch_size", "chunk_size", "seed")


class Config(Strict):
    model: str = Field("", description="chat model run dir (kind 'model', with chat.json: an sft or dpo run) to "
                       "sample")
    problems: str = Field("", description="GSM8K-format jsonl: question, answer (worked solution ending '#### N'), "
                          "optional task and difficulty; `lmlab tasks` writes train.jsonl, GSM8K train files work too")
    out: str = Field("", description="output directory (kind 'samples'); default: 'samples' next to the model "
                     "directory")
    template: Optional[str] = Field(None, description="chat template to prompt with (chatml, instruct, chat, "
                                    "alpaca); null = the model's chat.json")
    n_samples: int = Field(8, ge=1, description="sampled solutions per problem (k)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus top-p (1 = off)")
    top_k: int = Field(0, ge=0, description="sample from the k most likely tokens only (0 = all)")
    max_new_tokens: int = Field(128, ge=1, description="tokens generated per sample at most")
    max_problems: Optional[int] = Field(None, ge=1, description="use only the first N problems (null = all)")
    batch_size: int = Field(32, ge=1, description="completions decoded together")
    chunk_size: int = Field(CHUNK_SIZE, ge=1, description="problems per chunk: each finished chunk is kept on disk, "
                            "so an interrupted run continues from the last one")
    seed: int = Field(0, description="sampling seed: the same seed gives byte-identical samples")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")


def load_sampler(model_dir: Path, cfg, timer: artifacts.Timer):
    """(model, tokenizer, device) to sample with, refused when max_new_tokens fills the context
    (the `samples` and `pairs` stages load through here)."""
    from lmlab.infer.prompting import prompt_room
    from lmlab.models import load_model
    from lmlab.runtime import pick_device

    device = pick_device(cfg.device)
    with timer("load"):
        model, tokenizer, _ = load_model(model_dir, device=device)
    prompt_room(model, "max_new_tokens", cfg.max_new_tokens)
    return model, tokenizer, device


# ----------------------------------------------------------------------------- inputs (shared with pairs)

def default_out(model_dir: str | Path) -> Path:
    """runs/x/sft -> runs/x/samples."""
    return Path(model_dir).resolve().parent / "samples"


def resolve_template(cfg, model_dir: Path, tokenizer, verb: str) -> str:
    """The chat template to prompt with (`cfg.template`, else the run's chat.json); a base model is a UserError."""
    from lmlab.infer.prompting import resolve_template as resolve

    template = resolve(model_dir, tokenizer, cfg.template, default=None)
    if template is None:
        raise UserError(f"{model_dir} has no chat template (no chat.json: it is not an sft/dpo run); `lmlab {verb}` "
                        f"samples a chat model: finetune it first (`lmlab sft init={model_dir} ...`) and pass the "
                        f"sft run, or set template=chatml if it was trained with one")
    return template


def read_checkable(path: str | Path, max_problems: Optional[int]) -> list[dict]:
    """The problems to sample: `read_problems(checkable=True)`, with `difficulty` an integer or absent.

    The records' `difficulty` is passed on to readers that group by it, so a value of another
    type is refused here rather than written.
    """
    from lmlab.tasks.problems import read_problems

    problems = read_problems(path, max_problems or 0, checkable=True)
    for i, p in enumerate(problems):
        d = p.get("difficulty")
        if d is not None and (isinstance(d, bool) or not isinstance(d, int)):
            raise UserError(f"{path}: problem {i + 1} has difficulty {d!r}; it must be an integer level or absent")
    return problems


# ----------------------------------------------------------------------------- sampling and labelling

def problem_prompts(tokenizer, problems: Sequence[dict], template: str, budget: int) -> list[list[int]]:
    """Each problem's prompt ids: the evaluation's zero-shot chat prompt, within `budget` tokens."""
    from lmlab.tasks.problems import build_prompt

    return [build_prompt(tokenizer, p, template, (), 0, budget)[0] for p in problems]


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of chunk `chunk`: a hash, so no two chunks' batches (seeded seed + b) share a stream."""
    digest = hashlib.sha256(f"lmlab-samples:{seed}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:6], "big")  # 48 bits: room for `+ batch` within torch's 64-bit seeds


def sample(model, tokenizer, problems: Sequence[dict], template: str, cfg, device, bar=None,
           chunk: int = 0) -> list[list[str]]:
    """`cfg.n_samples` completions per problem, prompted and stopped exactly as `lmlab eval` prompts a chat model.

    `cfg` is any config with the sampling fields (n_samples, temperature, top_p, top_k,
    max_new_tokens, batch_size, seed); the draw is seeded with `chunk_seed(cfg.seed, chunk)`.
    """
    from lmlab.infer.engine import complete
    from lmlab.infer.prompting import prompt_room
    from lmlab.infer.sampling import Sampling
    from lmlab.tasks.problems import problem_stops

    prompts = problem_prompts(tokenizer, problems, template, prompt_room(model, "max_new_tokens", cfg.max_new_tokens))
    rep = [ids for ids in prompts for _ in range(cfg.n_samples)]
    was_training = model.training
    model.eval()
    try:
        flat = complete(model, tokenizer, rep, Sampling.of(cfg, seed=chunk_seed(cfg.seed, chunk)),
                        problem_stops(template, tokenizer), cfg.batch_size, device, bar)
    finally:
        model.train(was_training)
    n = cfg.n_samples
    return [flat[i * n:(i + 1) * n] for i in range(len(problems))]


def label(problems: Sequence[dict], completions: Sequence[Sequence[str]], start: int = 0) -> list[dict]:
    """The sample records (RECORD_KEYS) of `problems` (the file's problems start, start+1, ...) and completions."""
    from lmlab.tasks.problems import answer_rules

    records = []
    for i, (p, outs) in enumerate(zip(problems, completions)):
        strict, _, ref_fn = answer_rules(p.get("task"))
        ref = ref_fn(p["answer"])
        for k, text in enumerate(outs):
            a = strict(text)
            records.append({"problem": start + i, "question": p["question"], "solution": p["answer"],
                            "task": p.get("task") or "gsm8k", "difficulty": p.get("difficulty"), "k": k,
                            "completion": text, "answer": a, "reference": ref, "correct": a is not None and a == ref})
    return records


def draw(model, tokenizer, problems: Sequence[dict], template: str, cfg, device, chunk_size: int, *,
         done: Optional[dict[int, list[dict]]] = None,
         on_chunk: Optional[Callable[[int, list[dict], float], None]] = None, desc: str = "samples") -> list[dict]:
    """Every problem's labelled samples, `chunk_size` problems at a time (chunk c seeded `chunk_seed(seed, c)`).

    `done[c]` holds the records of chunks finished earlier (not sampled again);
    `on_chunk(c, records, seconds)` is called as each new chunk finishes, to keep it.
    A progress bar counts completions, with rate and ETA.
    """
    from lmlab.runtime import progress

    done = done or {}
    n = cfg.n_samples
    starts = range(0, len(problems), chunk_size)
    reused = sum(len(problems[s:s + chunk_size]) * n for c, s in enumerate(starts) if c in done)
    records: list[dict] = []
    with progress(len(problems) * n, desc, "completion", initial=reused) as bar:
        for c, s in enumerate(starts):
            if c in done:
                records += done[c]
                continue
            part = problems[s:s + chunk_size]
            t0 = time.perf_counter()
            recs = label(part, sample(model, tokenizer, part, template, cfg, device, bar, chunk=c), start=s)
            if on_chunk is not None:
                on_chunk(c, recs, time.perf_counter() - t0)
            records += recs
    return records


def by_problem(records: Sequence[dict]) -> list[list[dict]]:
    """Sample records grouped by problem, in order (the records of one problem are consecutive)."""
    return [list(g) for _, g in itertools.groupby(records, key=lambda r: r["problem"])]


def sample_stats(records: Sequence[dict]) -> dict:
    """Counts over sample records: accuracy overall and per task, pass@k-style problem counts."""
    per_task: dict[str, dict] = {}
    totals = {"samples_correct": 0, "samples_unparseable": 0, "samples_empty": 0, "problems_any_correct": 0,
              "problems_all_correct": 0}
    groups = by_problem(records)
    for recs in groups:
        n_ok = sum(r["correct"] for r in recs)
        totals["samples_correct"] += n_ok
        totals["samples_unparseable"] += sum(r["answer"] is None for r in recs)
        totals["samples_empty"] += sum(not r["completion"].strip() for r in recs)
        totals["problems_any_correct"] += n_ok > 0
        totals["problems_all_correct"] += n_ok == len(recs)
        t = per_task.setdefault(recs[0]["task"], {"problems": 0, "samples": 0, "samples_correct": 0,
                                                  "problems_any_correct": 0, "problems_all_correct": 0})
        t["problems"] += 1
        t["samples"] += len(recs)
        t["samples_correct"] += n_ok
        t["problems_any_correct"] += n_ok > 0
        t["problems_all_correct"] += n_ok == len(recs)
    for t in per_task.values():
        t["sample_accuracy"] = t["samples_correct"] / t["samples"] if t["samples"] else 0.0
    n = len(records)
    return {"problems": len(groups), "samples": n,
            "sample_accuracy": totals["samples_correct"] / n if n else 0.0, **totals,
            "pass_at_k": totals["problems_any_correct"] / len(groups) if groups else 0.0,
            "per_task": dict(sorted(per_task.items()))}


def records_bytes(records: Sequence[dict]) -> bytes:
    """Sample records as jsonl bytes (the one serialisation chunks, samples.jsonl and pairs use)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def parse_records(data: bytes) -> list[dict]:
    """jsonl bytes -> records. Split at "\\n" only: a completion may hold U+2028 and the like, which
    json.dumps leaves as they are and str.splitlines would split at."""
    return [json.loads(line) for line in data.decode("utf-8").split("\n") if line.strip()]


def read_records(path: Path) -> list[dict]:
    """The records of a samples.jsonl (or a chunk) that this module wrote; anything else is a UserError."""
    try:
        recs = parse_records(path.read_bytes())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); re-run `lmlab samples` to write it again") from None
    for i, r in enumerate(recs, 1):
        if not isinstance(r, dict) or set(r) != set(RECORD_KEYS):
            raise UserError(f"{path}:{i}: not a sample record (expected the keys {', '.join(RECORD_KEYS)}); "
                            f"re-run `lmlab samples` to write it again")
    return recs


# ----------------------------------------------------------------------------- the stage

def run(cfg: Config) -> Path:
    if not cfg.model:
        raise UserError("no model given: pass a chat model run dir, e.g. `lmlab samples runs/x/sft "
                        "problems=runs/x/tasks/train.jsonl`")
    if not cfg.problems:
        raise UserError("no problems given: set problems=PATH (GSM8K-format jsonl, e.g. runs/x/tasks/train.jsonl)")
    from lmlab.data.tokenizer import Tokenizer

    model_dir = Path(cfg.model)
    model_manifest = artifacts.require_artifact(model_dir, "model", "model")
    out = Path(cfg.out) if cfg.out else default_out(model_dir)
    artifacts.check_out(out, KIND, VERB, inputs={"model": model_dir, "problems": Path(cfg.problems)},
                        suggest=default_out(model_dir))
    tokenizer = Tokenizer.load(model_dir / "tokenizer")  # cheap; vets the template before the weights load
    template = resolve_template(cfg, model_dir, tokenizer, VERB)
    problems = read_checkable(cfg.problems, cfg.max_problems)

    config = {**cfg.model_dump(mode="json"), "template": template}
    fp_config = {k: v for k, v in config.items() if k not in ("out", "device")}
    inputs = {"model": {"path": str(model_dir), "fingerprint": model_manifest.get("fingerprint")},
              "problems": {"path": str(cfg.problems), "fingerprint": artifacts.sha256_file(cfg.problems)}}
    fp = artifacts.stage_fingerprint(KIND, fp_config, {k: v["fingerprint"] for k, v in inputs.items()})
    if artifacts.is_up_to_date(out, fp):
        print(f"samples: up to date ({out}), nothing to do")
        return out

    timer = artifacts.Timer()
    model, tokenizer, device = load_sampler(model_dir, cfg, timer)

    n_chunks = -(-len(problems) // cfg.chunk_size)
    store = ChunkStore(out, fp, n_chunks, VERB, kind=KIND, suffix=".jsonl", config=fp_config,
                       chunk_size=cfg.chunk_size, done_word="sampled", outputs=(SAMPLES,))
    with store.kept_on_stop("sample"):
        kept = store.open()
        done = {c: parse_records(data) for c, data in kept.items()}

        def keep(c: int, recs: list[dict], seconds: float) -> None:
            store.keep(c, records_bytes(recs), seconds)

        with timer("sample"):
            records = draw(model, tokenizer, problems, template, cfg, device, cfg.chunk_size, done=done,
                           on_chunk=keep)
        stats = {**sample_stats(records), "n_samples": cfg.n_samples, "chunks": n_chunks, "chunks_reused": len(kept),
                 "chunk_size": cfg.chunk_size}
        # time over every chunk, whichever run sampled it, so an interrupted run reports the same rate
        sample_s = store.time_s()
        stats["time_s"] = round(sample_s, 3)
        stats["samples_per_s"] = round(stats["samples"] / max(sample_s, 1e-9), 2)
        with artifacts.atomic_dir(out) as tmp:
            with open(tmp / SAMPLES, "wb") as f:
                for c in range(n_chunks):
                    f.write(store.data[c])
            stats["sha256"] = {SAMPLES: artifacts.sha256_file(tmp / SAMPLES)}
            artifacts.write_manifest(tmp, KIND, config, fp, inputs=inputs, verb=VERB,
                                     tokenizer_sha256=tokenizer.sha256, timings=timer.total(), stats=stats)
    print(summary_line(stats, out))
    return out


def summary_line(stats: dict, out: Path) -> str:
    reused = f", {stats['chunks_reused']} reused" if stats["chunks_reused"] else ""
    return (f"samples: wrote {out} ({stats['samples']} samples of {stats['problems']} problems, "
            f"k={stats['n_samples']}; {100 * stats['sample_accuracy']:.1f}% correct; "
            f"{stats['problems_any_correct']} problems with a correct sample, {stats['problems_all_correct']} all "
            f"correct; {stats['chunks']} chunks{reused})")
