"""`lmlab latent`: train LLM-TRM's reasoner to make a frozen LLM answer from k latent vectors in
place of its thinking (phase 3; docs/llm_trm.md).

    lmlab latent model=runs/llm_trm/sft seqtrm=runs/llm_trm/seqtrm problems=runs/llm_trm/tasks/train.jsonl \
        out=runs/llm_trm/latent_sft method=supervised train.steps=300
    lmlab latent model=runs/llm_trm/sft init=runs/llm_trm/latent_sft problems=... out=runs/llm_trm/latent_grpo \
        method=grpo train.steps=100 train.lr=1e-5

The reasoner (lmlab/models/latent_reasoner.py) is the phase-1 compressor and the phase-2
SequenceTRM of `seqtrm` (its compressor is the one it was trained on) with a projection into the
LLM's input embeddings, started so the LLM answers as it does without thinking. `init` starts
from another `lmlab latent` run instead (GRPO starts from the supervised one, which is also its
KL reference). The LLM must be the one the SequenceTRM's pairs came from (fingerprints compared).

method=supervised maximises the reference answer's log-likelihood given the prompt and the
vectors; method=grpo samples `grpo.num_generations` answers per problem and rewards the correct
ones (lmlab/train/latent_objective.py). Both are the shared loop: AdamW with the compressor at
`compressor_lr_scale`, warmup then cosine over the run's steps, checkpoints and exact resume,
a seeded held-out split of the problems evaluated by answer NLL and greedy exact match.

Writes reasoner.safetensors and reasoner.json (lmlab.models.latent_reasoner), metrics.jsonl,
manifest.json (kind 'latent_reasoner').
"""

from __future__ import annotations

import copy
import hashlib
import sys
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field

from lmlab import artifacts
from lmlab.config import Strict
from lmlab.errors import UserError
from lmlab.runtime import pick_device, seed_everything
from lmlab.train.loop import EvalConfig, RunOptions, TrainConfig
from lmlab.train.stage import RESUMABLE_TRAIN_KEYS, TrainingRun, swap_in

KIND = "latent_reasoner"


class LatentTrainConfig(TrainConfig):
    batch_size: int = Field(16, ge=1, description="problems (supervised) or sampled answers (grpo) per micro-batch")
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate (the prototype's GRPO plan: 1e-5)")
    warmup_steps: int | float = Field(0.05, ge=0, description="linear warmup steps (int) or share of the run")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay")
    tokens: int | None = Field(None, description="unused (refused): set train.steps")
    seq_len: int | None = Field(None, description="unused: the prompts fix the lengths")


class LatentEvalConfig(EvalConfig):
    every: int = Field(100, ge=0, description="held-out answer NLL and exact match every N steps (and at the end)")
    batches: int = Field(1, ge=0, description="0 turns evaluation off; otherwise the whole held-out split")


class GRPOSettings(Strict):
    num_generations: int = Field(8, ge=2, description="G: answers sampled per problem")
    beta: float = Field(0.1, ge=0, description="weight of the k3 KL to the reference reasoner (init)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the answers")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus top-p of the answers")
    curriculum: bool = Field(True, description="the first epoch from easy to hard problems (difficulty, then the "
                             "reference solution's length)")


class Config(RunOptions):
    model: str = Field("", description="the frozen thinking LLM (the run the hidden pairs came from)")
    seqtrm: str = Field("", description="`lmlab seqtrm` output to start from (with its compressor)")
    init: str = Field("", description="an `lmlab latent` run to start from instead (grpo: also the KL reference)")
    problems: str = Field("", description="GSM8K-format jsonl of training problems (question, answer '#### N')")
    out: str = Field("runs/latent", description="run directory")
    method: Literal["supervised", "grpo"] = Field("supervised", description="answer likelihood, or GRPO rewards")
    k: int = Field(4, ge=1, description="latent vectors in place of the thinking")
    steps: Optional[int] = Field(None, ge=1, description="SequenceTRM supervision steps (default: its halting head)")
    compressor_lr_scale: float = Field(0.1, ge=0, description="the compressor's LR / the scheduled LR (0 = frozen)")
    max_problems: Optional[int] = Field(None, ge=1, description="the first N problems only")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of the problems held out (by index, seeded)")
    max_new_tokens: int = Field(24, ge=1, description="answer tokens generated at most (evaluation, grpo samples)")
    template: Optional[str] = Field(None, description="chat template; default: the LLM run's chat.json")
    grpo: GRPOSettings = Field(default_factory=GRPOSettings, description="method=grpo settings")
    train: LatentTrainConfig = Field(default_factory=LatentTrainConfig, description="optimisation")
    eval: LatentEvalConfig = Field(default_factory=LatentEvalConfig, description="evaluation during training")


def _held_out(i: int, seed: int, fraction: float) -> bool:
    h = hashlib.sha256(f"lmlab-latent:{seed}:{i}".encode()).digest()
    return int.from_bytes(h[:4], "big") / 2 ** 32 < fraction


def answer_ids(template: str, tokenizer, question: str, answer: str, direct: list[int]) -> list[int]:
    """The reference reply's tokens after the empty-thinking prompt: `#### N` and the end of turn
    (the conversation rendered in the template's no-thinking mode, which the prompt is too)."""
    from lmlab.data.chat import render

    final = "#### " + answer.rsplit("####", 1)[-1].strip()
    ids, _ = render(template, [{"role": "user", "content": question}, {"role": "assistant", "content": final}],
                    tokenizer, thinking=False)
    if ids[:len(direct)] != direct:
        raise UserError(f"the {template} template's reply does not continue its empty-thinking prompt; "
                        f"latent reasoning needs a template where it does")
    return ids[len(direct):]


@torch.no_grad()
def fixed_steps(reasoner, states: list[torch.Tensor], batch_size: int = 64) -> int:
    """The median step at which the phase-2 halting head stops these prompts.

    Phase 3 fixes the number of supervision steps there: its losses say nothing about when the
    prediction is good enough, so the halting head, trained in phase 2 against the cosine to
    the state at </think>, would drift away from meaning anything as the SequenceTRM changes.
    """
    from lmlab.models.seqtrm import left_pad

    found = []
    for s in range(0, len(states), batch_size):
        x, mask = left_pad(states[s:s + batch_size])
        found += reasoner.reason(x, mask)[1].tolist()
    return max(1, int(np.median(found)))


def _reasoner_from(cfg: Config, llm, lp, llm_fp: str):
    """(reasoner, its origin for the manifest, the reasoner it started from, or None)."""
    from lmlab.infer.latent import slot_init
    from lmlab.models.latent_reasoner import load_reasoner, reasoner_from_seqtrm

    if cfg.init:
        r, meta = load_reasoner(cfg.init)
        if meta.get("llm_fingerprint") != llm_fp:
            raise UserError(f"{cfg.init} was trained on the LLM {meta.get('llm')} (fingerprint "
                            f"{str(meta.get('llm_fingerprint'))[:12]}), not {cfg.model} ({llm_fp[:12]}); use a "
                            f"reasoner of the same LLM")
        if r.k != cfg.k:
            raise UserError(f"{cfg.init} makes k={r.k} latent vectors; set k={r.k}")
        origin = {"path": cfg.init, "fingerprint": artifacts.sha256_file(Path(cfg.init) / "reasoner.safetensors")}
        return r, origin, copy.deepcopy(r)  # the KL reference: the starting reasoner, frozen
    if not cfg.seqtrm:
        raise UserError("give the phase-2 model to start from, seqtrm=SEQTRM_DIR (or init=LATENT_DIR)")
    r, fingerprint = reasoner_from_seqtrm(cfg.seqtrm, llm, llm_fp, cfg.k, slot_init(llm, lp), cfg.steps)
    return r, {"path": cfg.seqtrm, "fingerprint": fingerprint}, None


def run(cfg: Config) -> Path:
    from lmlab.data.tokenizer import Tokenizer
    from lmlab.infer.hidden import hidden_states
    from lmlab.infer.latent import LatentPrompts
    from lmlab.infer.prompting import resolve_template
    from lmlab.models import load_model, unwrap
    from lmlab.models.family import takes_vectors
    from lmlab.models.latent_reasoner import save_reasoner
    from lmlab.tasks.samples import read_checkable
    from lmlab.train.latent_objective import GRPOLatent, LatentProblem, SupervisedLatent

    run = TrainingRun(cfg, "latent", KIND)
    cfg, out = run.cfg, run.out
    if not cfg.model or not cfg.problems:
        raise UserError("give the LLM and the problems: `lmlab latent model=RUN seqtrm=DIR problems=FILE out=DIR`")
    if cfg.method == "grpo" and not cfg.init:
        raise UserError("method=grpo starts from a trained reasoner, which is also its KL reference: set "
                        "init=LATENT_DIR (an `lmlab latent method=supervised` run)")
    if cfg.train.tokens is not None or cfg.train.steps is None:
        raise UserError("set the run length with train.steps=N")
    model_dir = Path(cfg.model)
    model_m = artifacts.require_artifact(model_dir, "model", "model")
    run.check_out(inputs={"model": cfg.model, "problems": cfg.problems})
    tokenizer = Tokenizer.load(model_dir / "tokenizer")
    template = resolve_template(model_dir, None, cfg.template, default=None)
    lp = LatentPrompts(tokenizer, template, cfg.k)   # refuses a template without thinking delimiters
    problems = read_checkable(cfg.problems, cfg.max_problems)
    llm, tokenizer, _ = load_model(model_dir, device="cpu")
    if not takes_vectors(llm):
        raise UserError(f"{cfg.model} is a {getattr(llm, 'family', type(llm).__name__)} model, whose forward takes "
                        f"no input vectors; latent reasoning needs a transformer LLM")
    llm.requires_grad_(False).eval()
    llm.to(pick_device(cfg.train.device))  # the prompt states are read where the LLM will run
    reasoner, origin, reference = _reasoner_from(cfg, llm, lp, model_m.get("fingerprint"))
    inputs = {"model": {"path": cfg.model, "fingerprint": model_m.get("fingerprint")},
              "problems": {"path": cfg.problems, "fingerprint": artifacts.sha256_file(cfg.problems)},
              "init" if cfg.init else "seqtrm": origin}
    if run.up_to_date(inputs):
        return out
    t = cfg.train
    resume_config = {"inputs": {k: v["fingerprint"] for k, v in inputs.items()}, "reasoner": reasoner.config(),
                     "train": t.model_dump(mode="json", exclude=RESUMABLE_TRAIN_KEYS),
                     **{k: getattr(cfg, k) for k in ("method", "compressor_lr_scale", "val_fraction", "max_problems",
                                                      "max_new_tokens")},
                     "grpo": cfg.grpo.model_dump(mode="json"), "template": template}
    run.start(resume_config)
    seed_everything(t.seed)

    built = [lp.build(p["question"]) for p in problems]
    print(f"latent: reading the LLM's states over {len(problems)} prompts", file=sys.stderr)
    states = hidden_states(llm, [b.reads for b in built], batch_size=32)
    items = [LatentProblem(b, s, answer_ids(template, tokenizer, p["question"], p["answer"], b.direct), p)
             for b, s, p in zip(built, states, problems)]
    held = np.array([_held_out(i, t.seed, cfg.val_fraction) for i in range(len(items))])
    train_idx, val_idx = np.nonzero(~held)[0], np.nonzero(held)[0]
    if not len(train_idx) or not len(val_idx):
        raise UserError(f"{len(items)} problems leave no {'training' if not len(train_idx) else 'held-out'} problem "
                        f"at val_fraction={cfg.val_fraction}; use more problems")
    if reasoner.steps is None:
        reasoner.steps = fixed_steps(reasoner, [items[i].states for i in train_idx])
        print(f"latent: the SequenceTRM's halting head stops the training prompts after {reasoner.steps} "
              f"supervision step(s) (median); phase 3 runs that many", file=sys.stderr)
    if cfg.method == "supervised":
        objective = SupervisedLatent(cfg, llm, tokenizer, lp, items, train_idx, val_idx)
    else:
        try:
            objective = GRPOLatent(cfg, llm, tokenizer, lp, items, train_idx, val_idx, reference)
        except ValueError as e:
            raise UserError(str(e)) from None
    print(f"latent: {cfg.method}, a reasoner of {reasoner.num_params():,} parameters (k={cfg.k} vectors of "
          f"{reasoner.d_model}, D'={reasoner.compressor.k}, SequenceTRM n_sup={reasoner.trm.cfg.n_sup}) over a frozen "
          f"LLM of {llm.num_params():,}; {len(train_idx)} training and {len(val_idx)} held-out problems; "
          f"{t.steps} steps -> {out}", file=sys.stderr)
    summary = run.train(reasoner, objective, total_steps=t.steps, resume_config=resume_config, desc=f"latent {cfg.method}")
    trained = unwrap(summary["model"])

    def write(model) -> None:
        def files(tmp: Path) -> None:
            save_reasoner(tmp, model, {"llm": cfg.model, "llm_fingerprint": model_m.get("fingerprint"),
                                       "template": template, "method": cfg.method, "origin": origin})

        swap_in(out, files, ["reasoner.safetensors", "reasoner.json"])

    final = summary.get("final_eval", {})
    stats = {"params": trained.num_params(), "steps": summary["steps"], "method": cfg.method, "k": cfg.k,
             "train_problems": int(len(train_idx)), "val_problems": int(len(val_idx)),
             "val_answer_nll": final.get("val_answer_nll"), "val_em": final.get("val_em"),
             "final_train_metrics": {k: v for k, v in summary["final_train"].items() if k not in ("tokens", "time_s")}}
    run.finish(write, stats, inputs, None, summary)
    print(f"latent: wrote {out} (held-out exact match {final.get('val_em')}, answer NLL "
          f"{final.get('val_answer_nll')})")
    return out
