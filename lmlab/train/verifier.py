"""The outcome verifier: a language-model trunk with a scalar head trained to say whether a solution is correct.

    lmlab verifier init=runs/sft data=runs/samples synthetic=runs/tasks/dpo_train.jsonl out=runs/verifier
    lmlab verifier ... level=token balance=true train.epochs=2 val_fraction=0.1
    lmlab verifier ... lora.enabled=true lora.r=16 train.lr=5e-4

As in Cobbe et al. 2021 ("Training Verifiers to Solve Math Word Problems"): the trunk starts
from `init` (usually the SFT model whose samples are being judged, or a separate small model
run) and a zero-initialised scalar head (lmlab.models.scorer) is put on its final hidden
state. Training minimises binary cross-entropy on (problem, solution) -> correct?:

  level=outcome  one logit per pair, read at the solution's last token (its end-of-turn marker)
  level=token    a logit at every solution token, each trained towards the pair's label (Cobbe
                 et al. found this generalises better); the score is still read at the last token
  balance=true   weight each example so correct and wrong ones carry equal total weight

Data (read by lmlab.train.scorer_examples; lmlab.train.scorer_losses has the formulas;
docs/verifier.md the whole story):
  data       samples from `lmlab samples`: a directory holding samples.jsonl, or such a .jsonl
             file; one record per sample with at least problem (int), question (str),
             completion (str: the model's solution), correct (bool) and k (int)
  synthetic  optional preference files (format preference, e.g. `lmlab tasks`' dpo_train.jsonl):
             chosen -> a correct example, rejected -> a wrong one ("synthetic wrong solutions")
Each source's share of the training examples is its `weight`, mixed exactly and resumably as
in sft/dpo (lmlab.train.finetune.Mixture). `val_fraction` of the problems (by question text,
over all sources) are held out: no problem is on both sides. Validation uses the model
samples; synthetic examples of a held-out problem are dropped from training.

How a pair becomes tokens, and where the score is read: lmlab.infer.scorer.encode_reply, the
same function the Python API (`Verifier.load(DIR).score(problem, answer)`) uses; an example
longer than max_len keeps bos and its end and loses the start of the prompt (one whose reply
leaves fewer than 16 prompt tokens is dropped; truncation=error stops instead).

Metrics: on every train line `accuracy` (at the last token, threshold 0.5, over the examples
since the previous line); on the eval lines val_loss, val_accuracy, val_auroc, val_ece and
val_brier over the first eval.batches x train.batch_size held-out samples (a fixed shuffle);
after training the same over all held-out samples, in the manifest with the reliability table
(lmlab.train.scorer_metrics has the definitions).

Outputs in `out` (kind 'verifier'): the scorer directory of lmlab.models.scorer (model.safetensors
+ model.json: the trunk, an ordinary model dir; head.safetensors; scorer.json; tokenizer/),
reliability.png (reliability diagram and confidence histogram), val_scores.jsonl (per held-out
sample: source, problem, k, task, score, correct), metrics.jsonl, checkpoints/, manifest.json.
Same trainer, checkpoints and exact resume as every training stage; re-running a finished
run is a no-op.

What this stage shares with `lmlab reward` (lmlab.train.reward_model) is in
lmlab.train.scorer_common: the train/eval settings, loading and checking the init, building
the scorer, tokenized sequences, the mixture's batches, the run length, the up-to-date check,
the resume config, the plan and final lines and writing the scorer directory (ScorerRun).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from lmlab import artifacts
from lmlab import dist as lmdist
from lmlab.data.formats import DataSpec
from lmlab.errors import UserError
from lmlab.models.lora import LoraConfig
from lmlab.train.loop import RunOptions, as_data_specs
from lmlab.train.scorer_common import (MIN_PROMPT_TOKENS, ScorerEvalConfig, ScorerRun, ScorerTrainConfig,
                                       mix_sources, mixture_indices, note_truncated, to_device, total_steps)
from lmlab.train.scorer_examples import (Examples, SamplesSpec, read_samples, samples_path, split_by_problem,
                                         tokenize_examples)
from lmlab.train.scorer_losses import outcome_bce, token_bce
from lmlab.train.scorer_metrics import DEFAULT_BINS, binary_metrics, reliability_table

KIND = "verifier"
POSITIONAL = ("--config", "verifier config YAML (same as --config)")
RELIABILITY_PNG = "reliability.png"
VAL_SCORES = "val_scores.jsonl"
VAL_METRICS = ("val_loss", "val_accuracy", "val_auroc", "val_ece", "val_brier")


# ----------------------------------------------------------------------------- settings

class Config(RunOptions):
    init: str = Field("runs/sft", description="model whose trunk starts the verifier: a model run dir (usually the "
                      "SFT run whose samples are judged, or a separate small model run; its chat.json gives the "
                      "template unless `template` is set) or a Hugging Face Llama/Qwen3 directory")
    tokenizer: str | None = Field(None, description="HF init only: an lmlab tokenizer dir; unset = import the "
                                  "HF directory's tokenizer.json")
    out: str = Field("runs/verifier", description="run directory (verifier scorer, checkpoints, metrics, plots)")
    data: list[SamplesSpec] = Field(default_factory=list, description="labelled model samples: a path (a "
                                    "directory from `lmlab samples` or a samples .jsonl), or a list of "
                                    "{path, weight, max_records}")
    synthetic: list[DataSpec] = Field(default_factory=list, description="optional preference files (format "
                                      "preference, e.g. runs/tasks/dpo_train.jsonl): chosen -> correct, rejected "
                                      "-> wrong; a path or a list of data specs {path | hf, weight, max_records, "
                                      "invalid, ...}")
    level: Literal["outcome", "token"] = Field("outcome", description="outcome: one prediction per solution, at "
                                               "its last token; token: a prediction at every solution token, each "
                                               "trained towards the solution's label (Cobbe et al. 2021)")
    balance: bool = Field(False, description="weight the loss so that correct and wrong examples count equally "
                          "overall (each class's examples weigh 1/(2 x its share of the training mixture))")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of the problems held out for validation (by "
                                "question text over all sources: no problem on both sides)")
    template: str | None = Field(None, description="chat template (chatml, instruct, chat, alpaca); null = the "
                                 "init run's chat.json, else chatml")
    max_len: int | None = Field(None, ge=8, description="tokens per (problem, solution) sequence; null = the "
                                "model's max_seq_len. Longer ones lose the start of the prompt (see truncation)")
    truncation: Literal["left", "error"] = Field(
        "left", description="left: cut too-long prompts from the left (keeping bos and the end) and drop examples "
        "left with fewer than 16 prompt tokens; error: stop instead")
    bins: int = Field(DEFAULT_BINS, ge=2, le=100, description="equal-width confidence bins of the ECE and the "
                      "reliability diagram")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters on the trunk instead of full "
                             "finetuning (the head is always trained; the scorer stores the merged trunk)")
    train: ScorerTrainConfig = Field(default_factory=ScorerTrainConfig, description="optimisation; batch_size "
                                     "counts sequences")
    eval: ScorerEvalConfig = Field(default_factory=ScorerEvalConfig, description="validation metrics")

    @field_validator("data", mode="before")
    @classmethod
    def _paths_as_samples(cls, v):
        return as_data_specs(v)

    @field_validator("synthetic", mode="before")
    @classmethod
    def _paths_as_specs(cls, v):
        return as_data_specs(v, format="preference")


# ----------------------------------------------------------------------------- the objective

class VerifierObjective:
    """Binary cross-entropy of the verifier over weighted sources of labelled examples (see scorer_losses)."""

    progress_metrics = {"accuracy": "acc"}

    def __init__(self, ex: Examples, train_idx: np.ndarray, val_idx: np.ndarray, weights: list[float],
                 cfg: Config, pad_id: int) -> None:
        self.ex, self.train_idx, self.val_idx = ex, train_idx, val_idx
        self.level = cfg.level
        self.bins = cfg.bins
        self.batch_size, self.grad_accum = cfg.train.batch_size, cfg.train.grad_accum
        self.pad_id = pad_id
        self.labels = np.asarray(ex.label, dtype=np.float32)
        self.by_source, self.mix, self.epoch_tokens = mix_sources(ex.source, train_idx, weights, cfg.train.seed,
                                                                  ex.seqs.tokens, "examples", "add data")
        self.epoch_len = self.mix.block
        # The mixture's share of correct examples: each source's share of a block times its own rate.
        shares = np.asarray(self.mix.counts, dtype=np.float64) / self.mix.block
        self.positive_share = float(sum(w * self.labels[ix].mean() for w, ix in zip(shares, self.by_source)))
        self.class_weights = ((0.5 / (1 - self.positive_share), 0.5 / self.positive_share)
                              if cfg.balance and 0 < self.positive_share < 1 else (1.0, 1.0))
        # evaluate() scores a fixed shuffle of the held-out samples, so a capped subset mixes problems
        order = np.random.default_rng([cfg.train.seed, 7]).permutation(len(val_idx))
        self.eval_idx = val_idx[order][:cfg.eval.batches * cfg.train.batch_size]
        self._correct = None
        self._seen = 0

    def indices(self, step: int, micro: int, rows: slice | None = None) -> np.ndarray:
        return mixture_indices(self.mix, self.by_source, self.batch_size, self.grad_accum, step, micro, rows)

    def collate(self, idx) -> dict:
        batch = self.ex.seqs.collate(idx, self.pad_id)
        labels = self.labels[np.asarray(idx, dtype=np.int64)]
        batch["labels"] = torch.from_numpy(labels)
        w0, w1 = self.class_weights
        batch["weights"] = torch.from_numpy(np.where(labels > 0.5, w1, w0).astype(np.float32))
        return batch

    def batch(self, step: int, micro: int, rows: slice | None = None) -> dict:
        return self.collate(self.indices(step, micro, rows))

    def tokens(self, batch: dict) -> int:
        return batch["n_tokens"]

    def _losses(self, model, batch: dict):
        """-> (loss sum, number of terms, logits at the last token)."""
        from lmlab.infer.scorer import read_scores

        scores = model(batch["x"])
        last = read_scores(scores, batch["last"]).float()
        if self.level == "token":
            losses = token_bce(scores, batch["labels"], batch["mask"], batch["weights"])
            return losses.sum(), int(batch["mask"].sum()), last
        losses = outcome_bce(last, batch["labels"], batch["weights"])
        return losses.sum(), losses.shape[0], last

    def loss(self, model, batch: dict):
        total, n, last = self._losses(model, batch)
        correct = ((last >= 0) == (batch["labels"] > 0.5)).float().sum().detach()  # σ(z) >= 0.5 iff z >= 0
        self._correct = correct if self._correct is None else self._correct + correct
        self._seen += last.shape[0]
        return total, n

    def train_metrics(self) -> dict:
        """`accuracy` over the examples trained since the last call (the loop calls it at log steps)."""
        if not self._seen:
            return {}
        acc = self._correct.item() / self._seen
        self._correct, self._seen = None, 0
        return {"accuracy": acc}

    def score(self, model, device, idx) -> tuple[np.ndarray, float, int]:
        """(P(correct) at the last token, loss sum, terms) of examples `idx`, longest first in batches."""
        idx = np.asarray(idx, dtype=np.int64)
        order = idx[np.argsort([-self.ex.seqs.tokens(i) for i in idx], kind="stable")]
        probs = {}
        loss_sum, terms = 0.0, 0
        for s in range(0, len(order), self.batch_size):
            part = order[s:s + self.batch_size]
            batch = to_device(self.collate(part), device)
            batch["weights"] = torch.ones_like(batch["weights"])  # validation: the plain (unweighted) loss
            total, n, last = self._losses(model, batch)
            loss_sum += float(total)
            terms += n
            for i, p in zip(part.tolist(), torch.sigmoid(last).cpu().tolist()):
                probs[i] = p
        return np.array([probs[i] for i in idx.tolist()], dtype=np.float64), loss_sum, terms

    def metrics(self, model, device, idx) -> tuple[dict, np.ndarray]:
        probs, loss_sum, terms = self.score(model, device, idx)
        m = binary_metrics(probs, self.labels[idx], self.bins)
        out = {"val_loss": loss_sum / max(terms, 1), "val_accuracy": m["accuracy"], "val_auroc": m["auroc"],
               "val_ece": m["ece"], "val_brier": m["brier"]}
        return {k: v for k, v in out.items() if v is not None}, probs

    def evaluate(self, model, device) -> dict:
        """val_loss, val_accuracy, val_auroc, val_ece, val_brier on the first eval.batches batches of held-out
        samples. Every process scores them all (AUROC needs every score), so the metrics agree."""
        if not len(self.eval_idx):
            return {}
        return self.metrics(model, device, self.eval_idx)[0]


# ----------------------------------------------------------------------------- outputs

def reliability_plot(table: list[dict], probs: np.ndarray, path: Path, title: str) -> Path:
    """The reliability diagram (accuracy per confidence bin against the diagonal) over a histogram of confidences."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: runs are written on headless machines
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.6, 6.2), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    lo = [r["lo"] for r in table]
    width = [r["hi"] - r["lo"] for r in table]
    filled = [r for r in table if r["count"]]
    top.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
    top.bar([r["lo"] for r in filled], [r["accuracy"] for r in filled], width=[r["hi"] - r["lo"] for r in filled],
            align="edge", color="#4c72b0", edgecolor="white", alpha=0.85, label="fraction correct")
    top.plot([r["confidence"] for r in filled], [r["accuracy"] for r in filled], "o", color="#dd8452",
             markersize=4, label="(mean confidence, fraction correct)")
    top.set_xlim(0, 1)
    top.set_ylim(-0.02, 1.02)  # points at 0 and 1 stay visible
    top.set_ylabel("fraction correct")
    top.set_title(title, fontsize=10)
    top.grid(alpha=0.3)
    top.legend(fontsize=7, loc="upper left")
    bottom.bar(lo, [r["count"] for r in table], width=width, align="edge", color="#55a868", edgecolor="white")
    bottom.set_xlabel("verifier confidence: predicted P(correct)")
    bottom.set_ylabel("samples")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_val_scores(path: Path, ex: Examples, idx: np.ndarray, probs: np.ndarray, names: list[str]) -> None:
    rows = []
    for i, p in zip(idx.tolist(), probs.tolist()):
        info = ex.info[i] or {}
        rows.append({"source": names[ex.source[i]], "problem": info.get("problem"), "k": info.get("k"),
                     "task": info.get("task"), "score": round(float(p), 6), "correct": bool(ex.label[i])})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


# ----------------------------------------------------------------------------- the stage

def run(cfg: Config) -> Path:
    from lmlab.data.formats import read_preferences
    from lmlab.infer.scorer import pad_id_of
    from lmlab.train.finetune import data_fingerprint, report_skipped

    if not cfg.data and not cfg.synthetic:
        raise UserError("no verifier data: set data=DIR (a directory from `lmlab samples`, or its samples.jsonl) "
                        "and optionally synthetic=runs/tasks/dpo_train.jsonl (synthetic wrong solutions)")
    sr = ScorerRun(cfg, "verifier")
    cfg, out, timer, tokenizer, max_len = sr.cfg, sr.out, sr.timer, sr.tokenizer, sr.max_len
    sr.label = f"{sr.mode}, {cfg.level} level"
    names = [s.name() for s in cfg.data] + [s.name() for s in cfg.synthetic]
    if sr.up_to_date({**{f"data_{i}": {"path": s.path, "fingerprint": artifacts.sha256_file(samples_path(s))}
                         for i, s in enumerate(cfg.data)},
                      **{f"synthetic_{i}": {"path": s.name(), "fingerprint": data_fingerprint(s)}
                         for i, s in enumerate(cfg.synthetic)}}):
        return out

    with timer("data"):
        samples = [read_samples(s) for s in cfg.data]
        read_stats: list[dict] = [{} for _ in cfg.synthetic]
        where: list[list[str]] = [[] for _ in cfg.synthetic]
        synthetic = [read_preferences(s, stats=st, locations=w) for s, st, w in zip(cfg.synthetic, read_stats, where)]
        invalid = report_skipped(cfg.synthetic, read_stats, "verifier")
        ex, counts = tokenize_examples(samples, synthetic, where, sr.template, tokenizer, max_len, cfg.truncation)
        counts["samples_read"] = sum(len(s) for s in samples)
        counts["synthetic_pairs_read"] = sum(len(p) for p in synthetic)
        del samples, synthetic, where
    if len(ex) == 0:
        raise UserError(f"no usable examples: {counts['examples_read']} read, {counts['examples_dropped']} dropped "
                        f"because their solutions leave fewer than {MIN_PROMPT_TOKENS} prompt tokens within "
                        f"max_len={max_len}; raise max_len")
    labels = np.asarray(ex.label)
    if labels.min() == labels.max():
        which = "correct" if labels[0] else "wrong"
        raise UserError(f"all {len(ex)} examples are {which}: the verifier needs both correct and wrong samples; "
                        f"add synthetic wrong solutions (synthetic=runs/tasks/dpo_train.jsonl) or sample more "
                        f"(more samples per problem, a higher temperature, harder problems)")
    note_truncated("verifier", counts, "examples", max_len, "solution too long")
    t = cfg.train
    n_samples_src = len(cfg.data)
    source = np.asarray(ex.source)
    eligible = source < n_samples_src if (source < n_samples_src).any() else np.ones(len(ex), dtype=bool)
    train_idx, val_idx, dropped_val = split_by_problem(ex, eligible, cfg.val_fraction, t.seed)
    if labels[train_idx].min() == labels[train_idx].max():
        raise UserError(f"the training examples (after holding out val_fraction={cfg.val_fraction} of the problems) "
                        f"are all {'correct' if labels[train_idx][0] else 'wrong'}: the verifier needs both correct "
                        f"and wrong samples; add synthetic wrong solutions or more samples, or lower val_fraction")
    if len(val_idx) and labels[val_idx].min() == labels[val_idx].max():
        print(f"verifier: warning: the {len(val_idx)} held-out samples are all "
              f"{'correct' if labels[val_idx][0] else 'wrong'}, so val_auroc is undefined; add samples or raise "
              f"val_fraction", file=sys.stderr)
    weights = [s.weight for s in cfg.data] + [s.weight for s in cfg.synthetic]
    objective = VerifierObjective(ex, train_idx, val_idx, weights, cfg, pad_id_of(tokenizer))
    steps = total_steps(t, objective.epoch_len, "verifier")
    resume_config = sr.resume_config({"examples": ex.fingerprint()}, weights, steps, level=cfg.level,
                                     balance=cfg.balance)
    summary = sr.train(objective, resume_config, steps, unit="examples",
                       sizes=f"{len(train_idx)} train / {len(val_idx)} val examples, {objective.positive_share:.1%} "
                             f"of the training mixture correct")
    trained = summary.get("model")

    steps = summary["steps"]
    examples_trained = steps * t.batch_size * t.grad_accum
    val_keys = {ex.key[i] for i in val_idx.tolist()}
    stats = {
        "mode": "lora" if cfg.lora.enabled else "full",
        "params": sr.total,
        "trainable_params": sr.trainable,
        "template": sr.template,
        "level": cfg.level,
        "balance": cfg.balance,
        "class_weights": {"wrong": objective.class_weights[0], "correct": objective.class_weights[1]},
        **counts,
        **invalid,
        "examples_train": int(len(train_idx)),
        "examples_val": int(len(val_idx)),
        "synthetic_dropped_val_problems": dropped_val,
        "problems_train": len({ex.key[i] for i in train_idx.tolist()}),
        "problems_val": len(val_keys),
        "train_positive_share": round(objective.positive_share, 6),
        "max_len": max_len,
        "steps": steps,
        "examples_trained": examples_trained,
        "tokens_trained": summary["tokens"],
        "epochs": round(examples_trained / objective.epoch_len, 4),
        "final_train_loss": summary["final_loss"],
        "final_train_accuracy": summary["final_train"].get("accuracy"),
    }
    val_probs = None
    if lmdist.is_main() and trained is not None and len(val_idx):
        # Every held-out sample, scored by the final model in float32 (as the Python API scores).
        device = next(trained.parameters()).device
        trained.eval()
        with timer("final_eval"), torch.no_grad():
            final, val_probs = objective.metrics(trained, device, val_idx)
        stats["final_val_metrics"] = {**final, "n": int(len(val_idx)),
                                      "base_rate": float(labels[val_idx].mean())}
        stats["reliability"] = reliability_table(val_probs, labels[val_idx], cfg.bins)

    def write_more(out: Path) -> None:
        if val_probs is None:
            return
        fm = stats["final_val_metrics"]
        auroc = f"AUROC {fm['val_auroc']:.3f}, " if "val_auroc" in fm else ""
        try:
            write_val_scores(out / VAL_SCORES, ex, val_idx, val_probs, names)
            reliability_plot(stats["reliability"], val_probs, out / RELIABILITY_PNG,
                             f"verifier reliability: {len(val_idx)} held-out samples ({auroc}ECE {fm['val_ece']:.3f})")
        except OSError as e:
            raise artifacts.disk_error(e, out) from None

    fm = stats.get("final_val_metrics")
    shown = (f", held-out accuracy {fm['val_accuracy']:.3f}" + (f", AUROC {fm['val_auroc']:.3f}" if "val_auroc" in fm
                                                                else "") + f", ECE {fm['val_ece']:.3f}") if fm else ""
    sr.finish(summary, stats, cfg.level, shown, write_more)
    return out
