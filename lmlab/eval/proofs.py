"""Proof evaluation: a model writes Lean 4 proofs of Herald_proofs theorems and Lean judges them.

    lmlab eval runs/h/sft packed_default=false max_new_tokens=0 \
        proofs='[{path: data/herald_proofs.parquet, n: 200, n_samples: 4, k: [1, 4], temperature: 0.8,
                  lean: {project: ~/lean/mathproj, workers: 8}}]'

    from lmlab.eval.proofs import ProofSpec, read_theorems, score_proofs
    spec = ProofSpec(path="data/herald_proofs.parquet", lean={"project": "~/lean/mathproj"})
    examples, data = read_theorems(spec)
    res = score_proofs(model, tokenizer, examples, spec, seed=0, device="cuda")
    res["pass@1"], res["failed"], res["inference_s_per_proof"], res["verify_s_per_proof"]

Each theorem is prompted exactly as SFT trained the model on it: bos + the tokens of
`lmlab.data.herald.to_record(ex)["prompt"]` (header, informal statement as a docstring, the
renamed statement ending ":="), raw text, no chat template. `n_samples` completions per theorem
come from lmlab.infer.engine (batched KV-cache decoding, stopped at eos or `max_new_tokens`),
greedy when n_samples is 1 and temperature 0. Every completion is sent to Lean as
`herald.lean_source(ex, completion)` on top of the theorem's header (elaborated once per REPL
process) through `lmlab.eval.lean.LeanVerifier`.

Outcomes: a sample is valid when Lean accepts it; a failed one has one of FAILURES: `lean_error`
(Lean answered with an error), `sorry`, `timeout`, `crash` (the REPL died), `too_long` (the
prompt leaves no room for `max_new_tokens` in the model's context: nothing is generated or
checked, the theorem counts n_samples failures), `other` (malformed output, a REPL or server
error). valid + sum(failed) == samples. The run goes on after any of them.

Metrics: `pass@k` per k (Chen et al.'s unbiased estimator over n_samples; pass@1 is the proof
success rate) with `pass@k_stderr` over theorems; `inference_s_per_proof` (each batch's
generation time shared equally among its proofs), `inference_ms_per_token` (generation time
over generated tokens, eos included), `verify_s_per_proof` (Lean's time per proof, header
excluded); counts. Too-long theorems are left out of the time and token means (nothing ran).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal, Optional, Sequence

from pydantic import Field

from lmlab.artifacts import sha256_file
from lmlab.config import Strict
from lmlab.errors import UserError
from lmlab.eval.estimators import pass_at_k, stderr
from lmlab.eval.lean import LeanConfig

FAILURES = ("lean_error", "sorry", "timeout", "crash", "too_long", "other")
TOO_LONG = "prompt longer than the context"
# Files in a Lean project that fix the Lean and Mathlib versions, hence the verdicts.
PROJECT_FILES = ("lean-toolchain", "lake-manifest.json")


class ProofSpec(Strict):
    path: str = Field(description="a Herald_proofs file (.parquet/.jsonl/.json with its columns), read by "
                                  "lmlab.data.herald")
    name: str = Field("", description="name in eval.json (default: the file's parent dir and stem)")
    split: Literal["valid", "train", "all"] = Field("valid", description="which side of herald.split_examples to "
                                                    "prove: valid (held out from SFT), train, or all")
    valid_fraction: float = Field(0.1, ge=0, lt=1, description="the split's validation fraction (as used for SFT)")
    n: int = Field(200, ge=0, description="prove the first n theorems of the split (0 = all)")
    n_samples: int = Field(1, ge=1, description="completions per theorem (1 with temperature 0 = greedy)")
    k: list[int] = Field(default_factory=lambda: [1], description="k values for pass@k (each <= n_samples)")
    temperature: float = Field(0.0, ge=0, description="sampling temperature (0 = greedy; n_samples > 1 needs > 0)")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus top-p of sampled completions")
    max_new_tokens: int = Field(256, ge=1, description="tokens generated per proof at most")
    batch_size: int = Field(16, ge=1, description="completions decoded together")
    lean: LeanConfig = Field(default_factory=LeanConfig, description="where and how Lean checks the proofs "
                                                                     "(docs/lean.md)")


# ----------------------------------------------------------------------------- inputs

def read_theorems(spec: ProofSpec, where: str = "proofs") -> tuple[list, dict]:
    """(examples of the chosen split, the first `n`; the read's statistics), errors before any model work."""
    from lmlab.data import herald

    if not Path(spec.path).is_file():
        raise UserError(f"{where}: Herald_proofs file not found: {spec.path} (fix `path`; "
                        f"lmlab.data.herald.write_sample writes a sample)")
    stats: dict = {}
    examples = herald.read_herald(spec.path, stats=stats)
    if spec.split != "all":
        train, valid = herald.split_examples(examples, spec.valid_fraction)
        examples = valid if spec.split == "valid" else train
    if not examples:
        raise UserError(f"{where}: the {spec.split} split of {spec.path} holds no theorem "
                        f"({herald.summary(stats)}); use split=all, another valid_fraction or a larger file")
    data = {"rows": stats["rows"], "examples": stats["examples"], "dropped": stats["dropped"],
            "in_split": len(examples)}
    return (examples[:spec.n] if spec.n else examples), data


def check_spec(spec: ProofSpec, where: str = "proofs") -> None:
    """UserError for settings that cannot work, and for a Lean setup that is not there (nothing starts)."""
    from lmlab.eval.lean import LeanVerifier

    if not spec.k or any(k < 1 or k > spec.n_samples for k in spec.k):
        raise UserError(f"{where}: k={spec.k} needs 1 <= k <= n_samples={spec.n_samples}; raise n_samples or lower k")
    if spec.n_samples > 1 and spec.temperature == 0:
        raise UserError(f"{where}: n_samples={spec.n_samples} greedy completions would all be the same proof; "
                        f"set temperature (e.g. 0.8) or n_samples=1")
    LeanVerifier(spec.lean).close()  # checks the project and the command (repl); starts no process


def verdict_settings(cfg: LeanConfig) -> dict:
    """The Lean settings that change verdicts, for the fingerprint: where Lean runs and its limits.

    Not results, but another project (Mathlib version), command or timeout can turn a verdict,
    so a change re-runs the eval. Workers, batch size and the API key change no verdict.
    """
    if cfg.backend == "http":
        return {"backend": "http", "url": cfg.url, "timeout_s": cfg.timeout_s}
    project = Path(cfg.project).expanduser().resolve() if cfg.project else None
    files = {name: sha256_file(project / name) for name in PROJECT_FILES
             if project is not None and (project / name).is_file()}
    return {"backend": "repl", "project": str(project) if project else None, "project_files": files,
            "command": list(cfg.command), "timeout_s": cfg.timeout_s, "memory_mb": cfg.memory_mb, "header_timeout_s": cfg.header_timeout_s}


def spec_fingerprint(spec: ProofSpec) -> dict:
    """The spec as the eval's fingerprint sees it: every field, Lean reduced to `verdict_settings`."""
    return {**spec.model_dump(mode="json", exclude={"lean"}), "lean": verdict_settings(spec.lean)}


# ----------------------------------------------------------------------------- generation

def generate_proofs(model, tokenizer, examples: Sequence, spec: ProofSpec, seed: int = 0, device=None,
                    option: str = "proofs.max_new_tokens") -> list[dict]:
    """One problem record per theorem with `n_samples` samples: proof text, tokens, finished, inference_s.

    Prompts that leave no room for `max_new_tokens` are marked too long and not generated.
    Completions are decoded in batches of similar prompt length; batch b samples with seed
    `seed + b`, so a run repeats.
    """
    from lmlab.data.herald import to_record
    from lmlab.infer import engine
    from lmlab.infer.prompting import prompt_room
    from lmlab.infer.sampling import Sampling
    from lmlab.runtime import progress

    budget = prompt_room(model, option, spec.max_new_tokens)
    ctx = int(model.cfg.max_seq_len)
    prompts = [engine.encode_prompt(tokenizer, to_record(ex)["prompt"]) for ex in examples]
    problems = [{"i": i, "id": ex.id, "theorem_name": ex.name, "theorem": ex.theorem, "prompt_tokens": len(p),
                 "too_long": len(p) > budget, "samples": []} for i, (ex, p) in enumerate(zip(examples, prompts))]
    for prob in problems:
        if prob["too_long"]:
            reason = (f"{TOO_LONG} ({prob['prompt_tokens']} prompt tokens; max_seq_len {ctx} "
                      f"minus max_new_tokens {spec.max_new_tokens} leaves {budget})")
            prob["samples"] = [{"proof": "", "tokens": 0, "finished": False, "inference_s": 0.0, "ok": False,
                                "failure": "too_long", "reason": reason, "error": None, "verify_s": 0.0}
                               for _ in range(spec.n_samples)]
    jobs = sorted(((i, j) for i, p in enumerate(problems) if not p["too_long"] for j in range(spec.n_samples)),
                  key=lambda ij: len(prompts[ij[0]]))  # similar lengths together: little padding
    sampled = spec.temperature > 0
    slots: dict = {}
    was_training = model.training
    model.eval()
    with progress(len(jobs), "proofs generate", "proof") as bar:
        for b, start in enumerate(range(0, len(jobs), spec.batch_size)):
            chunk = jobs[start:start + spec.batch_size]
            sampling = Sampling(max_new_tokens=spec.max_new_tokens, temperature=spec.temperature,
                                top_p=spec.top_p if sampled else 1.0, seed=seed + b)
            t0 = time.perf_counter()
            outs = engine.complete_ids(model, tokenizer, [prompts[i] for i, _ in chunk], sampling,
                                       batch_size=len(chunk), device=device)
            share = (time.perf_counter() - t0) / len(chunk)  # the batch ran together: each proof its share
            for (i, j), c in zip(chunk, outs):
                slots[(i, j)] = {"proof": c.text, "tokens": len(c.ids), "finished": c.finished, "inference_s": share}
            bar.update(len(chunk))
    model.train(was_training)
    for (i, j) in sorted(slots):
        problems[i]["samples"].append(slots[(i, j)])
    return problems


# ----------------------------------------------------------------------------- verification

def failure_of(verdict) -> Optional[str]:
    """None for a valid proof, else its kind in FAILURES (from the Verdict's error or reason)."""
    if verdict.ok:
        return None
    if verdict.error is None:
        return "sorry" if verdict.reason.startswith("the proof uses sorry") else "lean_error"
    for kind in ("timeout", "crash"):
        if verdict.error.startswith(kind):
            return kind
    return "other"


def verify_proofs(examples: Sequence, problems: list[dict], lean: LeanConfig) -> float:
    """Judge every generated sample with Lean, in place (ok, failure, reason, error, verify_s); -> wall seconds.

    A proof that fails in any way (an error, sorry, a timeout, a crashed REPL) is a failed
    sample and the rest go on; only a Lean setup the user must fix raises UserError.
    """
    from lmlab.data.herald import lean_source
    from lmlab.eval.lean import LeanVerifier
    from lmlab.runtime import progress

    todo = [(p, s) for p in problems for s in p["samples"] if s.get("failure") != "too_long"]
    items = [(examples[p["i"]].header, lean_source(examples[p["i"]], s["proof"])) for p, s in todo]
    t0 = time.perf_counter()
    with progress(len(items), "proofs verify", "proof") as bar, LeanVerifier(lean) as verifier:
        seen = [0]

        def advance(done: int, total: int) -> None:
            bar.update(done - seen[0])
            seen[0] = done

        verdicts = verifier.verify_many(items, progress=advance)
    for (_, s), v in zip(todo, verdicts):
        s.update(ok=v.ok, failure=failure_of(v), reason=v.reason, error=v.error, verify_s=round(v.time_s, 4))
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- metrics

def _mean(total: float, count: int) -> Optional[float]:
    return total / count if count else None


def aggregate(problems: list[dict], ks: Sequence[int], n_samples: int) -> dict:
    """pass@k (± stderr over theorems), counts by outcome and the mean times, from judged problem records."""
    per = {f"pass@{k}": [pass_at_k(n_samples, sum(s["ok"] for s in p["samples"]), k) for p in problems]
           for k in sorted(set(ks))}
    samples = [s for p in problems for s in p["samples"]]
    ran = [s for s in samples if s["failure"] != "too_long"]
    failed = {kind: sum(s["failure"] == kind for s in samples) for kind in FAILURES}
    gen_s, tokens = sum(s["inference_s"] for s in ran), sum(s["tokens"] for s in ran)
    res: dict = {"theorems": len(problems), "samples": len(samples), "valid": sum(s["ok"] for s in samples),
                 "failed": failed, "too_long_theorems": sum(p["too_long"] for p in problems),
                 "samples_cut": sum(not s["finished"] for s in ran)}
    for name, values in per.items():
        res[name] = sum(values) / len(values) if values else None
        res[f"{name}_stderr"] = stderr(values)
    res.update({"inference_s_per_proof": _mean(gen_s, len(ran)),
                "inference_ms_per_token": _mean(1000.0 * gen_s, tokens),
                "tokens_per_proof": _mean(tokens, len(ran)),
                "verify_s_per_proof": _mean(sum(s["verify_s"] for s in ran), len(ran)),
                "inference_time_s": round(gen_s, 3)})
    return res


def pick_records(problems: list[dict], n: int = 5, valid: int = 2) -> list[dict]:
    """Up to `n` first samples to show: at most `valid` accepted ones, failures for the rest, in file order."""
    good = [p for p in problems if p["samples"] and p["samples"][0]["ok"]][:valid]
    bad = [p for p in problems if p["samples"] and not p["samples"][0]["ok"]][:n - len(good)]
    return [{"id": p["id"], "theorem_name": p["theorem_name"], "theorem": p["theorem"],
             **{k: p["samples"][0][k] for k in ("proof", "ok", "failure", "reason", "error")}}
            for p in sorted(good + bad, key=lambda p: p["i"])]


def score_proofs(model, tokenizer, examples: Sequence, spec: ProofSpec, seed: int = 0, device=None,
                 option: str = "proofs.max_new_tokens") -> dict:
    """Generate, verify and aggregate one proofs file; metrics plus `records` (samples.jsonl) and
    `problems` (problems.jsonl: one record per theorem, its samples with verdicts and times)."""
    t0 = time.perf_counter()
    problems = generate_proofs(model, tokenizer, examples, spec, seed, device, option)
    verify_s = verify_proofs(examples, problems, spec.lean)
    res = aggregate(problems, spec.k, spec.n_samples)
    res["verify_time_s"] = round(verify_s, 3)
    res["settings"] = {"split": spec.split, "valid_fraction": spec.valid_fraction, "n_samples": spec.n_samples,
                       "k": sorted(set(spec.k)), "greedy": spec.temperature == 0, "temperature": spec.temperature,
                       "top_p": spec.top_p if spec.temperature > 0 else 1.0, "max_new_tokens": spec.max_new_tokens,
                       "seed": seed, "batch_size": spec.batch_size, "prompt": "bos + herald.to_record prompt",
                       "stop": "eos", "lean": verdict_settings(spec.lean)}
    res["time_s"] = round(time.perf_counter() - t0, 3)
    res["records"] = pick_records(problems)
    for p in problems:
        first = p["samples"][0]
        # `correct` is the first sample's verdict (the greedy proof when n_samples is 1), as the
        # generative section's `correct` is its greedy answer's.
        p.update(completion=first["proof"], correct=bool(first["ok"]),
                 samples_correct=sum(bool(s["ok"]) for s in p["samples"]))
    res["problems"] = problems
    return res
