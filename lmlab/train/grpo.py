"""GRPO: reinforcement learning with verifiable rewards on a chat model (DeepSeekMath; TRL's GRPOTrainer).

    lmlab grpo init=runs/x/sft problems=runs/x/tasks/train.jsonl out=runs/x/grpo train.steps=100
    lmlab grpo ... num_generations=8 loss_type=dr_grpo scale_rewards=none beta=0.04
    lmlab grpo ... 'rewards=[{name: exact}, {name: format, weight: 0.1}, {name: verifier, path: runs/x/verifier}]'
    lmlab grpo ... lora.enabled=true lora.merge=true train.lr=1e-4

Every optimizer step: the policy writes G = `num_generations` completions of each of its
prompts with the KV-cache engine (the evaluation's chat prompt and stops; temperature, top-p
and top-k as configured; sampling seeded by the generation index, so a resumed run repeats
the uninterrupted one), the reward functions (lmlab.rewards.functions) score them, the
advantages are group-relative (lmlab.train.grpo_losses), and the clipped surrogate (plus β ×
the k3 KL to the reference when β > 0) is minimised under one of TRL's loss normalisations.
With `num_iterations` μ > 1 one generation is trained on for μ optimizer steps, with the
log-probs of the policy that sampled it kept as the importance-sampling denominator.

Batch: `train.batch_size` counts completions per micro-batch (TRL's per-device batch); a
step trains `train.batch_size × train.grad_accum` completions, i.e. that / G prompts, and G
must divide it. The prompts are the problems in a fresh seeded order each epoch.

Reference (β > 0): with LoRA, the model with its adapters disabled; otherwise a frozen copy of
the init model held without gradients (never trained, never saved). β = 0 (the default, as
in TRL since DAPO and Dr. GRPO) computes no reference at all.

It runs in the shared trainer (lmlab.train.loop): the rollout is made in the objective's
`before_step` and kept in its state, so checkpoints and exact resume include it. On several
processes (torchrun, DDP) each process generates and scores its share of the completions; the
rewards are gathered so every group's advantage sees its whole group. Output: a model run dir
laid out as SFT's, plus `completions.jsonl` (sample completions with their rewards, every
`log_completions_every` steps). The objective is lmlab.train.grpo_objective. See docs/grpo.md.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import Field, model_validator

from lmlab import artifacts
from lmlab import dist as lmdist
from lmlab.errors import UserError
from lmlab.models.lora import LoraConfig
from lmlab.rewards.functions import RewardSpec, Rewards
from lmlab.runtime import pick_device, seed_everything
from lmlab.train.finetune import FinetuneTrainConfig
from lmlab.train.grpo_objective import GRPOObjective
from lmlab.train.loop import EvalConfig, RunOptions, autocast_dtype
from lmlab.train.stage import RESUMABLE_TRAIN_KEYS, TrainingRun

KIND = "model"
POSITIONAL = ("--config", "grpo config YAML (same as --config)")
class GRPOTrainConfig(FinetuneTrainConfig):
    """SFT's TrainConfig; batch_size counts completions, and the length is in steps or epochs of prompts."""

    lr: float = Field(1e-5, gt=0, description="peak learning rate (AdamW); TRL's default 1e-6 is for billion-"
                      "parameter models, small models need more; LoRA ~10x more")
    warmup_steps: int | float = Field(0, ge=0, description="linear warmup: a step count (int) or a fraction of "
                                      "the run (float < 1)")
    batch_size: int = Field(16, ge=1, description="micro-batch in completions (TRL's per-device batch); a step "
                            "trains batch_size x grad_accum completions = that / num_generations prompts")
    epochs: Optional[float] = Field(None, gt=0, description="run length in passes over the prompts (used when "
                                    "train.steps is not set; unset too = 1 epoch)")
    seq_len: Optional[int] = Field(None, ge=2, description="unused by grpo: the lengths are the prompt's and "
                                   "max_completion_length")
    tokens: Optional[int] = Field(None, description="unused by grpo (refused): set train.steps or train.epochs")


class GRPOEvalConfig(EvalConfig):
    every: int = Field(50, ge=0, description="greedy rewards on the validation problems every N steps (and at the "
                       "end; 0 = end only)")
    batches: int = Field(2, ge=0, description="validation batches of train.batch_size problems per evaluation "
                         "(greedy, one completion each); 0 turns evaluation off")


class Config(RunOptions):
    init: str = Field("runs/sft", description="the chat model to train (an sft or dpo run, or an HF Llama/Qwen3 "
                      "directory); also the reference when beta > 0")
    tokenizer: Optional[str] = Field(None, description="HF init only: an lmlab tokenizer dir")
    out: str = Field("runs/grpo", description="run directory (model artifact, checkpoints, metrics, completions)")
    problems: str = Field("", description="prompts with what the rewards check: GSM8K-format jsonl (question, "
                          "answer ending '#### N', optional task; `lmlab tasks` writes train.jsonl) or "
                          "MBPP/HumanEval-style code problems with tests")
    max_problems: Optional[int] = Field(None, ge=1, description="use only the first N problems")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="share of the problems held out for the greedy "
                                "validation rewards (val_reward); 0 = none (evaluate with `lmlab eval`)")
    template: Optional[str] = Field(None, description="chat template; null = the init run's chat.json, else chatml")
    rewards: Optional[list[RewardSpec]] = Field(None, description="reward functions with weights: [{name, weight, "
                                                "path, label, params}], names exact | format | verifier | "
                                                "reward_model | code | MODULE:FUNCTION; null = [exact] for "
                                                "GSM8K-format problems, [code] for code problems")
    reward_errors: Literal["fail", "none"] = Field("fail", description="a reward function that raises or returns "
                                                   "the wrong number of rewards: fail the run naming it, or mark "
                                                   "its rewards None for that batch")
    num_generations: int = Field(8, ge=2, description="G: completions per prompt (a group)")
    max_completion_length: int = Field(128, ge=1, description="tokens generated per completion at most")
    long_prompts: Literal["error", "skip"] = Field("error", description="prompts longer than the context minus "
                                                   "max_completion_length: stop naming them, or skip them (counted)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (the log-probs are of logits / "
                               "temperature, as TRL computes them)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (1 = off)")
    top_k: int = Field(0, ge=0, description="top-k sampling (0 = off)")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="divide advantages by the "
                                                             "group's reward std, the batch's, or not at all "
                                                             "(Dr. GRPO)")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field("dapo", description="loss normalisation "
                                                                  "(TRL's): grpo per-sequence means; bnpo per "
                                                                  "micro-batch tokens; dr_grpo / (N x "
                                                                  "max_completion_length); dapo / the step's "
                                                                  "tokens")
    epsilon: float = Field(0.2, gt=0, lt=1, description="ε_low: lower clip of the ratio (1 − ε)")
    epsilon_high: Optional[float] = Field(None, gt=0, description="ε_high: upper clip (1 + ε_high); null = "
                                          "epsilon. DAPO's clip-higher uses 0.28")
    beta: float = Field(0.0, ge=0, description="β: weight of the k3 KL to the reference (0 = no reference)")
    num_iterations: int = Field(1, ge=1, description="μ: optimizer steps per generation (old log-probs kept for "
                                "the ratio)")
    mask_truncated_completions: bool = Field(False, description="completions cut at max_completion_length add "
                                             "nothing to the loss (DAPO)")
    log_completions_every: int = Field(0, ge=0, description="write sample completions with their rewards to "
                                       "completions.jsonl every N steps (0 = never)")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters (PEFT) instead of full "
                             "finetuning")
    train: GRPOTrainConfig = Field(default_factory=GRPOTrainConfig, description="optimisation; batch_size counts "
                                   "completions")
    eval: GRPOEvalConfig = Field(default_factory=GRPOEvalConfig, description="greedy validation rewards")

    @model_validator(mode="after")
    def _check(self):
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ValueError("epsilon_high must be positive")
        return self


# ----------------------------------------------------------------------------- problems and prompts

def read_problem_file(path: str, n: int) -> tuple[list[dict], str]:
    """(problems, kind) with kind 'math' (GSM8K format, checkable answers) or 'code' (tests)."""
    from lmlab.data.records import iter_jsonl

    p = Path(path)
    if not p.is_file():
        raise UserError(f"problems file not found: {p} (write one with `lmlab tasks`, or fix the path)")
    first = next((rec for _, rec in iter_jsonl(p)), None)
    if isinstance(first, dict) and ("test_list" in first or ("test" in first and "entry_point" in first)):
        from lmlab.rewards.code import read_code_problems

        return read_code_problems(str(p), n), "code"
    from lmlab.tasks.problems import read_problems

    return read_problems(p, n, checkable=True), "math"


def encode_prompts(problems: list[dict], template: str, tokenizer, budget: int, long_prompts: str
                   ) -> tuple[list[list[int]], list[int]]:
    """(prompt ids, kept problem indices): each question as the user turn, as `lmlab eval` asks it."""
    from lmlab.infer.prompting import question_prompt

    ids, keep, too_long = [], [], []
    for i, p in enumerate(problems):
        x = question_prompt(template, p["question"], tokenizer)
        if len(x) > budget:
            too_long.append((i, len(x)))
            continue
        ids.append(x)
        keep.append(i)
    if too_long and long_prompts == "error":
        i, n = too_long[0]
        raise UserError(f"{len(too_long)} prompt(s) are longer than the {budget} tokens the context leaves after "
                        f"max_completion_length (first: problem {i}, {n} tokens); lower max_completion_length, "
                        f"shorten the problems, or set long_prompts=skip")
    if too_long:
        print(f"grpo: skipped {len(too_long)} prompts longer than {budget} tokens (long_prompts=skip)", file=sys.stderr)
    if not ids:
        raise UserError(f"no prompt fits in {budget} tokens; lower max_completion_length")
    return ids, keep


# ----------------------------------------------------------------------------- the stage

def _resolve_template(cfg: Config, tokenizer) -> str:
    from lmlab.infer.prompting import resolve_template

    template = resolve_template(Path(cfg.init), tokenizer, cfg.template, default=None)
    if template is None:
        print(f"grpo: {cfg.init} has no chat.json (not a chat model); using the chatml template", file=sys.stderr)
        template = resolve_template(Path(cfg.init), tokenizer, "chatml")
    return template


def check_divides(G: int, batch_size: int, grad_accum: int) -> None:
    """G must divide the completions of a step: name the values that do."""
    n = batch_size * grad_accum
    if n % G:
        ok = [g for g in range(2, n + 1) if n % g == 0]
        raise UserError(f"num_generations={G} does not divide the {n} completions of a step (train.batch_size "
                        f"{batch_size} x train.grad_accum {grad_accum}); num_generations can be one of {ok}, or "
                        f"make train.batch_size x train.grad_accum a multiple of {G}")


def split_problems(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: a seeded shuffle, the first ceil(f·n) (at most n − 1) held out."""
    if val_fraction <= 0:
        return np.arange(n), np.zeros(0, np.int64)
    order = np.random.default_rng([seed, 11]).permutation(n)
    k = min(math.ceil(val_fraction * n), n - 1)
    return np.sort(order[k:]), np.sort(order[:k])


def _total_steps(cfg: Config, n_prompts: int) -> int:
    t = cfg.train
    if t.tokens is not None:
        raise UserError("train.tokens is not used by grpo; set the length with train.steps=N or train.epochs=N")
    if t.steps is not None:
        return t.steps
    per_step = t.batch_size * t.grad_accum // cfg.num_generations
    return max(1, math.ceil((t.epochs or 1.0) * n_prompts / per_step))


def run(cfg: Config) -> Path:
    import copy

    from lmlab.data.chat import check_template
    from lmlab.models.lora import apply_lora, check_targets, param_counts, targets_of
    from lmlab.train.finetune import load_init, write_outputs
    from lmlab.train.parallelize import resolve_strategy

    run = TrainingRun(cfg, "grpo", KIND)
    cfg, out, timer = run.cfg, run.out, run.timer
    if not cfg.problems:
        raise UserError("no problems: set problems=PATH (GSM8K-format jsonl, e.g. runs/x/tasks/train.jsonl, or "
                        "MBPP/HumanEval-style code problems)")
    t = cfg.train
    check_divides(cfg.num_generations, t.batch_size, t.grad_accum)
    if resolve_strategy(cfg.parallel, lmdist.read_env()) == "fsdp":
        raise UserError("grpo generates with the whole model on every process: use parallel.strategy=ddp (or "
                        "auto) rather than fsdp")
    run.check_out(inputs={"init model": cfg.init})
    with timer("load"):
        model, tokenizer, init_fp, init_format = load_init(cfg)
        problems, problem_kind = read_problem_file(cfg.problems, cfg.max_problems or 0)
    template = _resolve_template(cfg, tokenizer)
    check_template(template, tokenizer)
    if cfg.lora.enabled:
        check_targets(model, targets_of(model, cfg.lora))
    from lmlab.infer.prompting import prompt_room

    budget = prompt_room(model, "max_completion_length", cfg.max_completion_length)
    prompts, keep = encode_prompts(problems, template, tokenizer, budget, cfg.long_prompts)
    problems = [problems[i] for i in keep]
    specs = cfg.rewards if cfg.rewards is not None else [RewardSpec(name="code" if problem_kind == "code" else "exact")]
    device = pick_device(t.device)
    rewards = Rewards(specs, device=str(device))
    for scorer in rewards.scorers():
        if scorer.tokenizer_sha256 != tokenizer.sha256:
            raise UserError(f"the scorer {scorer.path} was trained with another tokenizer than the policy {cfg.init} "
                            f"(sha256 {scorer.tokenizer_sha256[:12]} vs {tokenizer.sha256[:12]}); train the verifier "
                            f"or reward model from this pipeline's models (init=the sft run)")
    train_idx, val_idx = split_problems(len(problems), cfg.val_fraction, t.seed)

    run.config = {**run.config, "template": template, "rewards": [s.model_dump(mode="json") for s in specs]}
    inputs = {"init": {"path": cfg.init, "fingerprint": init_fp},
              "problems": {"path": cfg.problems, "fingerprint": artifacts.sha256_file(cfg.problems)}}
    for s in specs:
        if s.path:
            m = artifacts.read_manifest(s.path) or {}
            inputs[f"reward_{s.key()}"] = {"path": s.path, "fingerprint": m.get("fingerprint", "")}
    if run.up_to_date(inputs):
        return out
    total_steps = _total_steps(cfg, len(train_idx))
    resume_config = {"init": init_fp, "model": model.cfg.model_dump(mode="json"), "template": template,
                     "problems": inputs["problems"]["fingerprint"], "n_problems": len(problems),
                     "rewards": [s.model_dump(mode="json") for s in specs],
                     **{k: getattr(cfg, k) for k in ("val_fraction", "num_generations", "max_completion_length",
                                                     "temperature", "top_p", "top_k", "scale_rewards", "loss_type",
                                                     "epsilon", "epsilon_high", "beta", "num_iterations",
                                                     "mask_truncated_completions", "reward_errors")},
                     "lora": cfg.lora.model_dump(mode="json", exclude={"merge"}),
                     "train": t.model_dump(mode="json", exclude=RESUMABLE_TRAIN_KEYS), "total_steps": total_steps}
    run.start(resume_config)

    seed_everything(t.seed)  # the LoRA A init draws from it
    ref_model = None
    if cfg.beta and not cfg.lora.enabled:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # frozen: no grads, no optimizer state
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    amp = autocast_dtype(t.dtype, device)
    objective = GRPOObjective(cfg, tokenizer, template, prompts, problems, train_idx, val_idx, rewards, device, amp,
                              ref_model)
    trainable, total = param_counts(model)
    mode = f"LoRA r={cfg.lora.r}" if cfg.lora.enabled else "full"
    print(f"grpo ({mode}): {trainable:,} trainable of {total:,} parameters; {len(train_idx)} prompts "
          f"({len(val_idx)} held out); G {cfg.num_generations}, {objective.prompts_per_step} prompts x "
          f"{cfg.num_generations} = {objective.rows_per_step} completions per step, loss {cfg.loss_type}, "
          f"beta {cfg.beta}, rewards {', '.join(f'{k}x{w:g}' for k, w in zip(rewards.keys, rewards.weights))}; "
          f"{total_steps} steps -> {out}", file=sys.stderr)
    summary = run.train(model, objective, total_steps=total_steps, resume_config=resume_config, desc="grpo")

    total_steps = summary["steps"]
    final_train, final_eval = summary["final_train"], summary["final_eval"]
    metrics = read_train_metrics(out)
    stats = {
        "mode": "lora" if cfg.lora.enabled else "full", "params": total, "trainable_params": trainable,
        "template": template, "problems": len(problems), "prompts_train": int(len(train_idx)),
        "prompts_val": int(len(val_idx)), "problem_kind": problem_kind, "num_generations": cfg.num_generations,
        "loss_type": cfg.loss_type, "beta": cfg.beta, "steps": total_steps,
        "completions_trained": total_steps * objective.rows_per_step,
        "epochs": round(total_steps * objective.prompts_per_step / max(len(train_idx), 1) / cfg.num_iterations, 4),
        "tokens_trained": summary["tokens"], "rewards": rewards.keys,
        "first_reward": metrics[0].get("reward") if metrics else None,
        "final_reward": final_train.get("reward"),
        "final_frac_reward_zero_std": final_train.get("frac_reward_zero_std"),
        "final_train_metrics": {k: v for k, v in final_train.items() if k not in ("loss", "lr", "tokens", "time_s")},
        "final_val_metrics": final_eval,
        # rank 0's rollout time by part; the rest of train_time_s is the update (forward, backward, AdamW)
        "rollout_time_s": {k: round(v, 2) for k, v in objective.timings.items()},
    }
    inputs["tokenizer"] = {"path": str(out / "tokenizer"), "fingerprint": tokenizer.sha256}
    run.finish(lambda m: write_outputs(out, m, tokenizer, cfg.model_copy(update={"template": template}), init_format),
               stats, inputs, tokenizer.sha256, summary)
    r0, r1 = stats["first_reward"], stats["final_reward"]
    shown = f", reward {r0:.3f} -> {r1:.3f}" if r0 is not None and r1 is not None else ""
    print(f"grpo: wrote {out} ({mode}, {total_steps} steps{shown})")
    return out


def read_train_metrics(run_dir: Path) -> list[dict]:
    from lmlab.train.logging import read_metrics

    return [r for r in read_metrics(run_dir) if "loss" in r]
