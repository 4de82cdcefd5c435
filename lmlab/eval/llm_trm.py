"""`lmlab llm-trm-eval`: LLM-TRM's outcome table: does the reasoner help the frozen LLM answer?
(phase 3; docs/llm_trm.md)

    lmlab llm-trm-eval runs/llm_trm/sft problems=runs/llm_trm/tasks/test.jsonl out=runs/llm_trm/outcome \
        'reasoners=[{label: "latent, supervised", path: runs/llm_trm/latent_sup}]' first_token=runs/llm_trm/seqtrm

On the same problems, greedy, one after another in one process (so the times compare):
- **thinking**: the LLM thinks in full, then answers (its thinking template's prompt);
- **direct**: it answers at once (an empty thinking block closes the prompt);
- one row per reasoner (`lmlab latent` runs): the reasoner's k vectors in place of the thinking
  (lmlab.infer.latent.answer_with_vectors);
- with `controls`, per reasoner: each problem answered with the next problem's vectors, which
  tells whether the vectors carry anything about this problem or only a prior over answers;
- **first token** (`first_token`: a `lmlab seqtrm` or `lmlab latent` run): the prototype's use
  of the prediction, deciding only the first answer token through the output head.

Each row: exact match (the task's strict checker, or with `match=flexible` lm-eval's flexible
extraction of the answer after `</think>`, with its standard error), generated tokens
and wall-clock seconds per problem (the latent rows include reading the prompt's states and the
reasoner), the SequenceTRM's supervision steps, the exact match split by whether thinking in
full got the problem right, and (reasoner rows) the exact match minus answering directly with
its paired standard error. What explains a row: for every problem whose thinking closed, the
cosine between the row's compressed prediction and the LLM's real compressed state at
`</think>` (the phase-2 target), for the problems the row answers right and wrong.

Writes outcome.json (the table and the settings), outcome.jsonl (each problem's answers) and
manifest.json (kind 'llm_trm_outcome').
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from lmlab import artifacts
from lmlab.config import Strict
from lmlab.errors import UserError

KIND = "llm_trm_outcome"
VERB = "llm-trm-eval"
POSITIONAL = ("model", "the frozen thinking LLM (the run the reasoners were trained over)")


class ReasonerSpec(Strict):
    label: str = Field(description="the row's name in the table")
    path: str = Field(description="an `lmlab latent` run")


class Config(Strict):
    model: str = Field("", description="the frozen thinking LLM's run directory")
    problems: str = Field("", description="held-out GSM8K-format jsonl (question, answer '#### N', optional task)")
    out: str = Field("runs/llm_trm_outcome", description="output directory")
    n: int = Field(0, ge=0, description="the first n problems (0 = all)")
    reasoners: list[ReasonerSpec] = Field(default_factory=list, description="latent reasoners, one row each")
    first_token: Optional[str] = Field(None, description="a `lmlab seqtrm` (or `lmlab latent`) run for the "
                                       "first-token row")
    thinking_max_new_tokens: int = Field(112, ge=1, description="tokens of thinking + answer at most")
    max_new_tokens: int = Field(24, ge=1, description="answer tokens at most (the other rows)")
    controls: bool = Field(True, description="also answer with another problem's vectors, per reasoner (what "
                           "the vectors carry beyond a prior over answers)")
    batch_size: int = Field(64, ge=1, description="problems decoded together")
    template: Optional[str] = Field(None, description="chat template; default: the run's chat.json")
    match: Literal["strict", "flexible"] = Field("strict", description="answer extraction: strict (the task's "
                                                  "`#### N`) or flexible (the last number after </think>, lm-eval's "
                                                  "flexible-extract: for a model that answers in its own words)")
    device: str = Field("auto", description="auto | cpu | cuda | mps")


def _row(label: str, problems: list[dict], texts: list[str], tokens: list[int], seconds: float,
         thinking_right: Optional[list[bool]] = None, steps: Optional[list[int]] = None,
         flexible: bool = False, answers: Optional[list[Optional[str]]] = None) -> tuple[dict, list[dict]]:
    """A row of the table and its per-problem records; `answers` (default `texts`): the text each
    answer is extracted from, None where there is none (thinking that never closed)."""
    from lmlab.eval.estimators import stderr
    from lmlab.tasks.problems import checked_answer

    per = [checked_answer(p, a, flexible) if a is not None else (None, False)
           for p, a in zip(problems, texts if answers is None else answers)]
    ok = [float(c) for _, c in per]
    row = {"label": label, "n": len(problems), "exact_match": sum(ok) / len(ok), "exact_match_stderr": stderr(ok),
           "tokens_per_problem": sum(tokens) / len(tokens), "seconds_per_problem": seconds / len(problems)}
    if steps is not None:
        row["mean_trm_steps"] = sum(steps) / len(steps)
    if thinking_right is not None:
        for key, want in (("em_where_thinking_right", True), ("em_where_thinking_wrong", False)):
            sel = [o for o, t in zip(ok, thinking_right) if t == want]
            row[key] = sum(sel) / len(sel) if sel else None
    records = [{"answer": a, "correct": c, "text": t, "tokens": n} for (a, c), t, n in zip(per, texts, tokens)]
    return row, records


def _first_token_reasoner(path: str, llm, llm_fp, lp):
    from lmlab.infer.latent import slot_init
    from lmlab.models.latent_reasoner import load_reasoner, reasoner_from_seqtrm

    if (Path(path) / "reasoner.json").is_file():
        r, meta = load_reasoner(path)
        if meta.get("llm_fingerprint") != llm_fp:
            raise UserError(f"{path} was trained over another LLM than this one; use a reasoner of the same LLM")
        return r
    return reasoner_from_seqtrm(path, llm, llm_fp, lp.k, slot_init(llm, lp))[0]


def _cosines(preds: torch.Tensor, targets: dict[int, torch.Tensor], compressor, right: list[bool]) -> dict:
    """Mean cosine of compressed predictions to the real compressed </think> states, by correctness."""
    got = {"right": [], "wrong": []}
    with torch.no_grad():
        for i, t in targets.items():
            c = float(F.cosine_similarity(compressor.compress(preds[i].float()), compressor.compress(t), dim=-1))
            got["right" if right[i] else "wrong"].append(c)
    return {f"cosine_{k}": (sum(v) / len(v) if v else None) for k, v in got.items()} | {
        "cosine_n": sum(len(v) for v in got.values())}


def run(cfg: Config) -> Path:
    from lmlab.data.chat import THINK_CLOSE
    from lmlab.data.tokenizer import Tokenizer
    from lmlab.infer.engine import complete_ids
    from lmlab.infer.hidden import hidden_states
    from lmlab.infer.latent import LatentPrompts, answer_from_states, answer_with_vectors, reason
    from lmlab.infer.prompting import resolve_template
    from lmlab.infer.sampling import Sampling
    from lmlab.models import load_model
    from lmlab.models.family import takes_vectors
    from lmlab.models.latent_reasoner import load_reasoner
    from lmlab.runtime import pick_device
    from lmlab.tasks.problems import problem_stops
    from lmlab.tasks.samples import read_checkable

    if not cfg.model or not cfg.problems:
        raise UserError("give the LLM and the problems: `lmlab llm-trm-eval RUN_DIR problems=FILE out=DIR`")
    model_dir, out = Path(cfg.model), Path(cfg.out)
    model_m = artifacts.require_artifact(model_dir, "model", "model")
    paths = {f"reasoner {i}": Path(r.path) for i, r in enumerate(cfg.reasoners)}
    artifacts.check_out(out, KIND, VERB, inputs={"model": model_dir, "problems": Path(cfg.problems), **paths})
    tokenizer = Tokenizer.load(model_dir / "tokenizer")
    template = resolve_template(model_dir, None, cfg.template, default=None)
    problems = read_checkable(cfg.problems, cfg.n or None)
    llm_fp = model_m.get("fingerprint")
    loaded = []
    for spec in cfg.reasoners:
        r, meta = load_reasoner(spec.path)
        if meta.get("llm_fingerprint") != llm_fp:
            raise UserError(f"{spec.path} was trained over the LLM {meta.get('llm')} (fingerprint "
                            f"{str(meta.get('llm_fingerprint'))[:12]}), not {cfg.model} ({str(llm_fp)[:12]}); "
                            f"use reasoners of the same LLM")
        loaded.append((spec, r, meta))
    k = loaded[0][1].k if loaded else 4
    lp = LatentPrompts(tokenizer, template, k)  # refuses a template without thinking delimiters
    inputs = {"model": {"path": cfg.model, "fingerprint": llm_fp},
              "problems": {"path": cfg.problems, "fingerprint": artifacts.sha256_file(cfg.problems)}}
    for i, (spec, _, _) in enumerate(loaded):
        inputs[f"reasoner {i}"] = {"path": spec.path,
                                   "fingerprint": artifacts.sha256_file(Path(spec.path) / "reasoner.safetensors")}
    if cfg.first_token:
        ft = Path(cfg.first_token)
        weights = ft / "reasoner.safetensors" if (ft / "reasoner.json").is_file() else ft / "seqtrm.safetensors"
        inputs["first_token"] = {"path": cfg.first_token, "fingerprint": artifacts.sha256_file(weights)}
    # match=strict is left out, so outcome dirs written before `match` existed stay up to date
    fp_config = {k: v for k, v in cfg.model_dump(mode="json").items()
                 if k not in ("out", "device") and not (k == "match" and v == "strict")}
    fp = artifacts.stage_fingerprint(KIND, {**fp_config, "template": template},
                                     {k: v["fingerprint"] for k, v in inputs.items()})
    if artifacts.is_up_to_date(out, fp):
        print(f"{VERB}: up to date ({out}), nothing to do")
        return out

    timer = artifacts.Timer()
    device = pick_device(cfg.device)
    with timer("load"):
        llm, tokenizer, _ = load_model(model_dir, device=device)
    if not takes_vectors(llm):
        raise UserError(f"{cfg.model}'s forward takes no input vectors; latent reasoning needs a transformer LLM")
    llm.requires_grad_(False).eval()
    stops = problem_stops(template, tokenizer)
    questions = [p["question"] for p in problems]
    built = [lp.build(q) for q in questions]
    answer = Sampling(max_new_tokens=cfg.max_new_tokens)
    rows, per_problem = [], [{"i": i, "question": q} for i, q in enumerate(questions)]
    scored = functools.partial(_row, flexible=cfg.match == "flexible")

    def add(name: str, row: dict, records: list[dict]) -> None:
        rows.append(row)
        for rec, r in zip(per_problem, records):
            rec[name] = r
        print(f"{VERB}: {row['label']}: exact match {row['exact_match']:.3f}, {row['tokens_per_problem']:.1f} "
              f"tokens and {row['seconds_per_problem'] * 1000:.1f} ms per problem", flush=True)

    with timer("thinking"):
        t0 = time.perf_counter()
        outs = complete_ids(llm, tokenizer, [b.reads for b in built],
                            Sampling(max_new_tokens=cfg.thinking_max_new_tokens), stops, cfg.batch_size, device)
        seconds = time.perf_counter() - t0
    closer = tokenizer.special_tokens[THINK_CLOSE]
    # flexible: the number is looked for after </think> only (none where the thinking never closed)
    after = [tokenizer.decode(o.ids[o.ids.index(closer) + 1:]) if closer in o.ids else None for o in outs]
    think_row, think_rec = scored("thinking in full", problems, [o.text for o in outs], [len(o.ids) for o in outs],
                                  seconds, answers=after if cfg.match == "flexible" else None)
    add("thinking", think_row, think_rec)
    right = [r["correct"] for r in think_rec]
    # the phase-2 target of each problem whose thinking closed: the LLM's state at </think>
    closed = {i: o.ids.index(closer) for i, o in enumerate(outs) if closer in o.ids}
    states = hidden_states(llm, [built[i].reads + outs[i].ids for i in closed], batch_size=cfg.batch_size, device=device)
    targets = {i: s[len(built[i].reads) + c] for (i, c), s in zip(closed.items(), states)}
    think_row["closed"] = len(closed)

    with timer("direct"):
        t0 = time.perf_counter()
        outs = complete_ids(llm, tokenizer, [b.direct for b in built], answer, stops, cfg.batch_size, device)
        row, rec = scored("direct (no thinking)", problems, [o.text for o in outs], [len(o.ids) for o in outs],
                          time.perf_counter() - t0, right)
    add("direct", row, rec)
    direct_right = [r["correct"] for r in rec]

    def against_direct(row: dict, records: list[dict]) -> None:
        """The row's exact match minus answering directly, with the paired standard error (same problems)."""
        from lmlab.eval.estimators import stderr

        diff = [float(r["correct"]) - float(d) for r, d in zip(records, direct_right)]
        row["minus_direct"], row["minus_direct_stderr"] = sum(diff) / len(diff), stderr(diff)

    for i, (spec, r, meta) in enumerate(loaded):
        r.to(device).eval()
        with timer(f"reasoner {i}"):
            t0 = time.perf_counter()
            vecs, preds, steps = reason(llm, r, built, cfg.batch_size, device)
            outs = answer_with_vectors(llm, tokenizer, built, vecs, answer, stops, cfg.batch_size, device)
            row, rec = scored(spec.label, problems, [o.text for o in outs], [len(o.ids) for o in outs],
                              time.perf_counter() - t0, right, steps.tolist())
        row.update({"path": spec.path, "method": meta.get("method"),
                    **_cosines(preds, targets, r.compressor, [x["correct"] for x in rec])})
        against_direct(row, rec)
        add(f"reasoner {i}", row, rec)
        if cfg.controls and len(built) > 1:
            # the control: each problem gets the next problem's vectors. What survives it is a
            # prior over answers, not anything the reasoner read in this problem.
            t0 = time.perf_counter()
            outs = answer_with_vectors(llm, tokenizer, built, torch.roll(vecs, 1, dims=0), answer, stops,
                                       cfg.batch_size, device)
            row, rec = scored(f"{spec.label}, another problem's vectors", problems, [o.text for o in outs],
                              [len(o.ids) for o in outs], time.perf_counter() - t0, right)
            row["control"] = True
            against_direct(row, rec)
            add(f"reasoner {i} control", row, rec)

    if cfg.first_token:
        r = _first_token_reasoner(cfg.first_token, llm, llm_fp, lp).to(device).eval()
        with timer("first token"):
            t0 = time.perf_counter()
            _, preds, steps = reason(llm, r, built, cfg.batch_size, device)
            texts, tokens = answer_from_states(llm, tokenizer, built, preds, answer, stops, cfg.batch_size, device)
            row, rec = scored("first token only", problems, texts, tokens, time.perf_counter() - t0, right,
                              steps.tolist())
        row.update({"path": cfg.first_token, **_cosines(preds, targets, r.compressor, [x["correct"] for x in rec])})
        against_direct(row, rec)
        add("first_token", row, rec)

    result = {"rows": rows, "settings": {"template": template, "k": k, "greedy": True,
                                          "thinking_max_new_tokens": cfg.thinking_max_new_tokens,
                                          "max_new_tokens": cfg.max_new_tokens, "match": cfg.match,
                                          "device": str(device)}}

    def files(tmp: Path) -> None:
        artifacts.write_json_atomic(tmp / "outcome.json", result)
        (tmp / "outcome.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in per_problem),
                                           encoding="utf-8")

    artifacts.check_out(out, KIND, VERB)
    out.mkdir(parents=True, exist_ok=True)
    from lmlab.train.stage import swap_in

    swap_in(out, files, ["outcome.json", "outcome.jsonl"])
    artifacts.write_manifest(out, KIND, cfg.model_dump(mode="json"), fp, inputs=inputs, verb=VERB,
                             timings=timer.total(), stats={r["label"]: {k: v for k, v in r.items() if k != "label"}
                                                           for r in rows})
    print(f"{VERB}: wrote {out}")
    return out
