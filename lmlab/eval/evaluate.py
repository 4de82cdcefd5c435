"""Evaluate a trained model: perplexity and bits per byte, a unigram baseline, sample generations,
generative exact match / pass@k / maj@k on problems with checkable answers, multiple choice.

    lmlab eval runs/smoke/model
    lmlab eval runs/smoke/model packed='[runs/smoke/packed]' max_batches=20
    lmlab eval runs/smoke/model texts='[../shared/data/wikitext-2/valid.txt]' max_text_bytes=200000
    lmlab eval --config configs/stages/eval.yaml model=runs/cpu/model
    lmlab eval runs/x/sft packed_default=false max_new_tokens=0 \
        generative='[{path: runs/x/tasks/test.jsonl, n: 200, n_samples: 4, k: [1, 4]}]'
    lmlab eval runs/x/model generative='[{path: ../shared/data/gsm8k/test.jsonl, fewshot: ../shared/data/gsm8k/train.jsonl}]'
    lmlab eval runs/x/model choice='[data/arc_easy.jsonl, data/boolq.jsonl]'
    lmlab eval runs/h/sft packed_default=false max_new_tokens=0 \
        proofs='[{path: data/herald_proofs.parquet, n: 200, lean: {project: ~/lean/mathproj}}]'
    lmlab eval runs/x/model 'lm_eval={tasks: [my_task], include_path: my_tasks/, limit: 100}'

What it measures (all written to `OUT/eval.json`):

* packed: for each packed artifact in `packed` (default: the data the model was trained
  on, from its manifest), the model's mean loss, perplexity and bits
  per byte on its val split (rows scored as training scores them), next to the unigram
  baseline's bits per byte on the same split (lmlab/eval/baseline.py). A packed artifact
  made with another tokenizer is refused, naming both sha256s.
* texts: for each UTF-8 `.txt` file, the whole file is one document scored with
  lm-evaluation-harness's rolling windows (lmlab/eval/perplexity.py) and reported as
  `word_perplexity`, `byte_perplexity` and `bits_per_byte`, as lm-eval reports WikiText.
* generations: every prompt in `prompts`, greedy and with one sampled setting, written to
  `OUT/generations.jsonl` via lmlab.infer.engine.generate.
* generative: for each GSM8K-format file (`question`, `answer` ending `#### N`, optional
  `task`; `lmlab tasks` writes one, real GSM8K files work unchanged), greedy exact match
  (strict and flexible extraction), pass@k and maj@k from sampled completions, per task
  (lmlab/eval/generative.py). A model with `chat.json` is prompted with its chat template,
  a base model few-shot from `fewshot`. Every metric comes with its standard error over
  problems (`<metric>_stderr`). A few prompt/completion/correct records per file go to
  `OUT/samples.jsonl`, every problem's outcome to `OUT/problems.jsonl` (the report pairs
  them across stages for the error bar of a difference).
* choice: for each BoolQ- or ARC-style jsonl file, multiple-choice acc and acc_norm by
  summed log-likelihood (lmlab/eval/choice.py).
* proofs: for each Herald_proofs file, the model writes Lean 4 proofs of its theorems
  (prompted as SFT trained it) and Lean judges them (lmlab/eval/proofs.py, docs/lean.md):
  pass@1 (the proof success rate) and pass@k with standard errors, inference time per proof
  and per token, verification time per proof, counts by outcome. Each theorem's samples and
  verdicts go to `OUT/problems.jsonl`, a few sample proofs to `OUT/samples.jsonl` (`kind`
  "proofs"; the generative section's records have `kind` "generative").
* long_context: a text `factor` x the context long (a file, or the packed val tokens) read
  with attention sinks, a plain rolling window and dense recomputation: perplexity per mode
  and per position range (lmlab/eval/long_context.py; plotted in the report).
* lm_eval: lm-evaluation-harness tasks (`{tasks: [...], include_path: DIR}`) run on this model
  through lmlab/eval/lm_harness.py (`pip install 'lmlab[lm_eval]'`; docs/lm_eval.md): every
  task's metrics with their standard errors, as lm-eval reports them.

`out` defaults to `eval` next to the model directory (runs/smoke/model -> runs/smoke/eval),
the pipeline layout; another model's eval is named after it (runs/smoke/sft ->
runs/smoke/eval_sft), so one eval never replaces another's. The artifact is fingerprinted over this config, the model's
fingerprint, the packed artifacts' fingerprints and the sha256 of the text, problem,
few-shot, multiple-choice and Herald files, and the Lean settings that change verdicts (its
project, with the sha256 of its lean-toolchain and lake-manifest.json, command, limits; not
its worker count), so re-running with nothing changed is a no-op.
`backend=jax` (a Griffin, the jax extra): every section runs on DeepMind's recurrentgemma.jax
model: the generating ones (prompts, generative, proofs, lm-eval's generations) decode with it
and packed data, texts, choices, long_context and lm-eval's log-likelihoods are scored with it
(lmlab.jax_backend.griffin.decode and .score, docs/jax.md).
Packed and text evaluation are optional: `packed_default=false` with `packed` empty skips
packed data (an SFT model's training data is not packed; it is skipped anyway).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from lmlab import artifacts
from lmlab.config import Strict
from lmlab.errors import UserError
from lmlab.eval import perplexity
from lmlab.eval.choice import read_choice_file, score_choices
from lmlab.eval.long_context import LongContextSpec
from lmlab.eval.proofs import ProofSpec
from lmlab.runtime import progress, seed_everything

POSITIONAL = ("model", "the model run directory to evaluate (written by `lmlab pretrain`)")

DEFAULT_PROMPTS = [
    "The os module provides",
    "def ",
    "Return the",
    "This function",
    "import ",
]


class RerankSpec(Strict):
    verifier: Optional[str] = Field(None, description="a `lmlab verifier` directory scoring each sample's P(correct)")
    reward: Optional[str] = Field(None, description="a `lmlab reward` directory scoring each sample (instead of a "
                                  "verifier)")
    n: list[int] = Field(default_factory=lambda: [1, 2, 4, 8], description="N values for best-of-N, weighted vote, "
                         "maj@N and pass@N (each <= n_samples)")

    def path(self) -> str:
        return self.verifier or self.reward or ""


class GenerativeSpec(Strict):
    path: str = Field(description="GSM8K-format jsonl: question, answer (worked solution ending '#### N'), optional task")
    name: str = Field("", description="name in eval.json and manifest stats (default: the file's parent dir and stem, e.g. tasks_test)")
    n: int = Field(200, ge=0, description="score the first n problems (0 = all)")
    n_samples: int = Field(4, ge=0, description="sampled completions per problem for pass@k / maj@k (0 = greedy only)")
    k: list[int] = Field(default_factory=lambda: [1, 4], description="k values for pass@k and maj@k (each <= n_samples)")
    temperature: float = Field(0.8, gt=0, description="temperature of the sampled completions")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus top-p of the sampled completions")
    max_new_tokens: int = Field(128, ge=1, description="tokens generated per completion at most")
    prompting: Literal["auto", "fewshot", "chat"] = Field("auto", description="auto = the chat template when the model has chat.json, else few-shot")
    fewshot: Optional[str] = Field(None, description="GSM8K-format jsonl of worked examples for few-shot prompts (tasks: fewshot.jsonl)")
    n_shot: int = Field(4, ge=0, description="few-shot examples per prompt for a base model (fewer when the context is short)")
    chat_n_shot: int = Field(0, ge=0, description="examples given as earlier turns to a chat-template model (0 = zero-shot)")
    batch_size: int = Field(32, ge=1, description="prompts decoded together")
    thinking: bool = Field(True, description="a model with a thinking template (think): false ends each prompt "
                           "with an empty thinking block, so the model answers without thinking")
    rerank: Optional[RerankSpec] = Field(None, description="rerank the n_samples samples with a verifier or reward "
                                         "model: {verifier: DIR | reward: DIR, n: [1, 2, 4, 8]} -> best_of_N, "
                                         "weighted_vote@N, maj@N, pass@N")


class LmEvalSpec(Strict):
    tasks: list[str] = Field(min_length=1, description="lm-eval task, group or tag names (or task YAML files)")
    include_path: Optional[str] = Field(None, description="a directory of task YAMLs (and their data); its files are "
                                        "fingerprinted")
    include_defaults: Optional[bool] = Field(None, description="also index lm-eval's built-in tasks (~20 s); "
                                             "default: only when a task is not under include_path")
    num_fewshot: Optional[int] = Field(None, ge=0, description="few-shot examples per prompt (default: each task's own)")
    limit: Optional[float] = Field(None, gt=0, description="score the first N documents per task (< 1: a fraction)")
    batch_size: int = Field(16, ge=1, description="requests per forward pass / decoding batch")
    max_length: Optional[int] = Field(None, ge=1, description="tokens per window (default: the model's context)")
    max_gen_toks: int = Field(256, ge=1, description="generate_until's token budget when a task sets none")
    add_bos_token: bool = Field(False, description="bos before every context, as lm-eval's hf backend with "
                                "add_bos_token=True (default: as the exported HF tokenizer, none)")
    bootstrap_iters: int = Field(100000, ge=0, description="bootstrap resamples for the stderr of non-mean metrics")


class Config(Strict):
    model: str = Field("", description="model run directory (kind 'model') to evaluate")
    out: str = Field("", description="output directory; default: 'eval' next to the model directory "
                     "(runs/x/model -> runs/x/eval, runs/x/sft -> runs/x/eval_sft)")
    packed: list[str] = Field(default_factory=list,
                              description="packed artifacts whose val split is scored (perplexity, bits per byte, unigram baseline); "
                                          "empty = the packed data the model was trained on")
    max_batches: int = Field(50, ge=0, description="batches of val rows scored per packed artifact (0 = the whole split)")
    batch_size: int = Field(8, ge=1, description="rows (packed) or windows (texts) per forward pass")
    texts: list[str] = Field(default_factory=list,
                             description="UTF-8 .txt files scored with lm-eval rolling windows (word/byte perplexity, bits per byte)")
    max_text_bytes: int = Field(0, ge=0,
                                description="score only the first N bytes of each text file, cut at a whitespace (0 = whole file)")
    prefix_token: str = Field("auto", pattern="^(auto|bos|eos)$",
                              description="token that starts the first rolling window: auto = bos if the tokenizer has one, else eos (lm-eval's rule)")
    baseline: bool = Field(True, description="compute the unigram baseline's bits per byte for each packed artifact")
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS),
                               description="prompts for sample generations (greedy and one sampled setting each)")
    max_new_tokens: int = Field(48, ge=0, description="tokens generated per prompt (0 = no generations)")
    temperature: float = Field(0.8, gt=0, description="temperature of the sampled generation setting")
    top_k: int = Field(50, ge=0, description="top-k of the sampled setting (0 = off)")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus top-p of the sampled setting (1 = off)")
    seed: int = Field(0, description="seed of the sampled generations (and of generative sampling)")
    packed_default: bool = Field(True, description="when `packed` is empty, score the packed data the model was trained on")
    generative: list[GenerativeSpec] = Field(default_factory=list,
                                             description="problem files scored by generated answers: exact match, pass@k, maj@k")
    choice: list[str] = Field(default_factory=list, description="BoolQ- or ARC-style jsonl files scored by multiple-choice log-likelihood")
    proofs: list[ProofSpec] = Field(default_factory=list,
                                    description="Herald_proofs files whose theorems the model proves and Lean checks: "
                                                "pass@k, time per proof (docs/lean.md)")
    long_context: list[LongContextSpec] = Field(default_factory=list, description="long-context stability: a text "
                                                "factor x the context long read with attention sinks, a plain "
                                                "rolling window and dense recomputation (lmlab.eval.long_context)")
    lm_eval: Optional[LmEvalSpec] = Field(None, description="lm-evaluation-harness tasks run on the model: "
                                          "{tasks: [...], include_path: DIR, num_fewshot, limit, batch_size} "
                                          "(docs/lm_eval.md)")
    choice_n: int = Field(0, ge=0, description="score the first n items of each choice file (0 = all)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    backend: Literal["torch", "jax"] = Field("torch", description="what runs the model: torch, or jax (a "
                                             "Griffin: every section decodes and scores with recurrentgemma.jax)")


# ------------------------------------------------------------------------------ inputs

def default_out(model_dir: str | Path) -> Path:
    """runs/x/model -> runs/x/eval, runs/x/sft -> runs/x/eval_sft: the pipeline layout the report discovers.

    One name per model, so evaluating the SFT model does not replace the base model's eval.
    """
    d = Path(model_dir).resolve()
    return d.parent / ("eval" if d.name == "model" else f"eval_{d.name}")


def read_text_file(path: str | Path, max_bytes: int = 0) -> tuple[str, bool]:
    """The text of a UTF-8 file, optionally cut to at most `max_bytes` at a whitespace. Returns (text, truncated)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text file not found: {p} (fix the path in `texts`)")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"text file {p} is not UTF-8 (bad byte at offset {e.start}); "
                        f"convert it, e.g. `iconv -f latin1 -t utf-8 {p.name}`, or drop it from `texts`") from None
    if max_bytes and len(raw) > max_bytes:
        # Cut at a whitespace so no word is split: word and byte counts then describe exactly
        # the text the model scored.
        cut = raw[:max_bytes].decode("utf-8", errors="ignore")
        space = max(cut.rfind(" "), cut.rfind("\n"))
        return (cut[:space] if space > 0 else cut), True
    return text, False


def check_packed_tokenizer(packed_dir: str | Path, tokenizer) -> dict:
    """The packed artifact's manifest; refuses one tokenized with another tokenizer than the model's."""
    from lmlab.data.loader import check_tokenizer

    m = artifacts.require_artifact(packed_dir, "packed", "packed artifact")
    try:
        check_tokenizer(m, tokenizer)
    except UserError as e:
        raise UserError(f"cannot evaluate on {packed_dir}: {e}") from None
    return m


def training_data(model_manifest: dict) -> list[str]:
    """The packed artifacts a model was trained on (its manifest's `data_*` inputs) that still exist."""
    return artifacts.packed_inputs(model_manifest)


def resolve_prefix_token(tokenizer, choice: str) -> int:
    bos = getattr(tokenizer, "bos_id", None)
    eos = getattr(tokenizer, "eos_id", None)
    has_bos = bos is not None and bos >= 0
    if choice == "bos" or (choice == "auto" and has_bos):
        if not has_bos:
            raise UserError("prefix_token=bos but the tokenizer has no bos token; use prefix_token=eos or auto")
        return int(bos)
    if eos is None or eos < 0:
        raise UserError("the tokenizer has neither a bos nor an eos token to start the first rolling window")
    return int(eos)


# ------------------------------------------------------------------------------- stage

def run(cfg: Config) -> Path:
    if not cfg.model:
        raise UserError("no model given: pass the model run directory, e.g. `lmlab eval runs/smoke/model`")
    model_dir = Path(cfg.model)
    if not model_dir.exists():
        raise UserError(f"model directory not found: {model_dir} (train one with `lmlab pretrain`, or fix the path)")
    model_manifest = artifacts.require_artifact(model_dir, "model", "model")
    out = Path(cfg.out) if cfg.out else default_out(model_dir)
    artifacts.check_out(out, "eval", "eval", inputs={"model": model_dir, **{f"packed data {p}": p for p in cfg.packed}},
                        suggest=default_out(model_dir))
    from lmlab.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(model_dir / "tokenizer")  # cheap; needed to vet the inputs first

    # Fingerprint everything the numbers depend on: config (minus where they go and which
    # device computes them), the model, the packed artifacts and the text files' contents.
    fp_config = cfg.model_dump(mode="json", exclude={"out", "device"})
    inputs = {"model": {"path": str(model_dir), "fingerprint": model_manifest.get("fingerprint")}}
    if not cfg.packed and cfg.packed_default:  # default: the val splits of the model's own training data
        cfg = cfg.model_copy(update={"packed": training_data(model_manifest)})
    if cfg.backend == "jax":
        _vet_jax(model_dir)
    for i, p in enumerate(cfg.packed):
        pm = check_packed_tokenizer(p, tokenizer)
        inputs[f"packed_{i}"] = {"path": str(p), "fingerprint": pm.get("fingerprint")}
    texts = []
    for i, p in enumerate(cfg.texts):
        text, truncated = read_text_file(p, cfg.max_text_bytes)
        texts.append((p, text, truncated))
        inputs[f"text_{i}"] = {"path": str(p), "fingerprint": artifacts.sha256_file(p)}
    gen_inputs = _vet_generative(cfg, inputs)
    choice_inputs = []
    for i, p in enumerate(cfg.choice):
        fmt, items = read_choice_file(p, cfg.choice_n)  # vets the file before any model work
        choice_inputs.append((p, fmt, items))
        inputs[f"choice_{i}"] = {"path": str(p), "fingerprint": artifacts.sha256_file(p)}
    proof_inputs = _vet_proofs(cfg, inputs, fp_config)
    for i, spec in enumerate(cfg.long_context):
        if spec.path:
            if not Path(spec.path).is_file():
                raise UserError(f"long_context[{i}]: text file not found: {spec.path}")
            inputs[f"long_context_{i}"] = {"path": spec.path, "fingerprint": artifacts.sha256_file(spec.path)}
    if not cfg.long_context:  # left out, so evals made before it existed keep their fingerprint
        fp_config.pop("long_context", None)
    for g in fp_config.get("generative", []):  # its default left out: older evals keep their fingerprint
        if g.get("thinking", True):
            g.pop("thinking", None)
    lm_eval_tasks = _vet_lm_eval(cfg, inputs, fp_config)
    if cfg.backend == "torch":  # left out, so evals made before backends existed keep their fingerprint
        fp_config.pop("backend", None)
    fp = artifacts.stage_fingerprint("eval", fp_config, {k: v["fingerprint"] for k, v in inputs.items()})
    if artifacts.is_up_to_date(out, fp):
        print(f"eval: up to date ({out}), nothing to do")
        return out

    from lmlab.infer.backend import load_for_decoding

    timer = artifacts.Timer()
    with timer("load"):  # backend=jax: the engine hands decoding to the JAX Griffin (lmlab.infer.backend)
        model, tokenizer, _, device = load_for_decoding(model_dir, cfg.backend, cfg.device)
    tok_sha = tokenizer.sha256
    max_seq_len = int(model.cfg.max_seq_len)

    results: dict = {"model": {"path": str(model_dir), "fingerprint": model_manifest.get("fingerprint"),
                               "tokenizer_sha256": tok_sha, "max_seq_len": max_seq_len, "backend": cfg.backend,
                               **{k: model_manifest.get("stats", {}).get(k) for k in ("params", "flops_per_token", "tokens_trained")}},
                     "packed": [], "texts": []}

    with timer("packed"):
        for p in cfg.packed:
            results["packed"].append(_eval_packed(model, p, cfg, device, max_seq_len, tokenizer))
    with timer("texts"):
        for path, text, truncated in texts:
            results["texts"].append(_eval_text(model, tokenizer, path, text, truncated, cfg, device, max_seq_len))
    with timer("generate"):
        generations = _generate(model, tokenizer, cfg, device)
    results["generations"] = len(generations)
    samples: list[dict] = []
    problems: list[dict] = []
    with timer("generative"):
        results["generative"] = _eval_generative(model, tokenizer, model_dir, gen_inputs, cfg, device, samples,
                                                 problems)
    with timer("choice"):
        results["choice"] = []
        for path, fmt, items in choice_inputs:
            res = score_choices(model, tokenizer, items, cfg.batch_size, device)
            for r in res.pop("records"):
                samples.append({"file": str(path), "kind": "choice", **r})
            results["choice"].append({"path": str(path), "name": _file_name(path), "format": fmt, **res})
    with timer("proofs"):
        results["proofs"] = _eval_proofs(model, tokenizer, proof_inputs, cfg, device, samples, problems)
    with timer("long_context"):
        results["long_context"] = _eval_long_context(model, tokenizer, cfg, device)
    if cfg.lm_eval is not None:
        with timer("lm_eval"):
            results["lm_eval"] = _eval_lm_eval(model, tokenizer, model_dir, lm_eval_tasks, cfg, device)

    try:
        with artifacts.atomic_dir(out) as tmp:
            artifacts.write_json_atomic(tmp / "eval.json", results)
            with open(tmp / "generations.jsonl", "w", encoding="utf-8") as f:
                for g in generations:
                    f.write(json.dumps(g, ensure_ascii=False) + "\n")
            with open(tmp / "samples.jsonl", "w", encoding="utf-8") as f:
                for r in samples:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            if problems:
                with open(tmp / "problems.jsonl", "w", encoding="utf-8") as f:
                    for r in problems:
                        f.write(json.dumps(r, ensure_ascii=False) + "\n")
            artifacts.write_manifest(tmp, "eval", _manifest_config(cfg), fp, inputs=inputs, verb="eval",
                                     tokenizer_sha256=tok_sha, timings=timer.total(), stats=summary_stats(results))
    except OSError as e:
        raise artifacts.disk_error(e, out) from None
    _print_summary(results, out)
    return out


def _eval_packed(model, packed_dir, cfg: Config, device, max_seq_len: int, tokenizer) -> dict:
    from lmlab.data.loader import PackedDataset

    ds = PackedDataset(packed_dir, "val")
    if len(ds) == 0:
        raise UserError(f"packed artifact {packed_dir} has an empty val split; re-pack with a val fraction > 0")
    # Rows longer than the model's context are cut to it, as the trainer does.
    seq_len = min(ds.seq_len, max_seq_len + 1)
    stats = ds.manifest.get("stats", {})
    n_batches = math.ceil(len(ds) / cfg.batch_size)
    if cfg.max_batches:
        n_batches = min(n_batches, cfg.max_batches)
    with progress(n_batches, f"eval {Path(packed_dir).name} val", "batch") as bar:
        nll, count, rows = perplexity.packed_nll(model, ds, cfg.batch_size, cfg.max_batches, device, bar, seq_len)
    loss = nll / count
    tokens, n_bytes = int(stats["val_tokens"]), int(stats["val_bytes"])
    res = {
        "path": str(packed_dir),
        "split": "val",
        "rows": rows,
        "rows_total": len(ds),
        "seq_len": seq_len,
        "tokens_scored": count,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": perplexity.bits_per_byte(loss, tokens, n_bytes),
        "tokens_per_byte": tokens / n_bytes,
    }
    if cfg.baseline:
        from lmlab.eval.baseline import unigram_baseline

        base = unigram_baseline(packed_dir, int(tokenizer.vocab_size))
        res["unigram_bits_per_byte"] = base["bits_per_byte"]
        res["unigram_nats_per_token"] = base["nats_per_token"]
        res["unigram_train_tokens"] = base["train_tokens"]
        # How much of the unigram's cost the model removes: 1 - model/unigram.
        res["improvement_over_unigram"] = 1.0 - res["bits_per_byte"] / base["bits_per_byte"]
    return res


def _eval_text(model, tokenizer, path, text: str, truncated: bool, cfg: Config, device, max_seq_len: int) -> dict:
    tokens = tokenizer.encode(text)
    if not tokens:
        raise UserError(f"text file {path} is empty; remove it from `texts`")
    prefix = resolve_prefix_token(tokenizer, cfg.prefix_token)
    n_windows = len(perplexity.rolling_windows(tokens, prefix, max_seq_len))
    with progress(n_windows, f"eval {Path(path).name}", "window") as bar:
        nll, predicted, windows = perplexity.text_nll(model, tokens, prefix, max_seq_len, cfg.batch_size, device, bar)
    words, n_bytes = perplexity.count_words(text), perplexity.count_bytes(text)
    return {
        "path": str(path),
        "name": Path(path).name,
        "truncated": truncated,
        "bytes": n_bytes,
        "words": words,
        "tokens": predicted,
        "windows": windows,
        "nll": nll,
        **perplexity.text_metrics(nll, words, n_bytes),
    }


def _file_name(path) -> str:
    """runs/x/tasks/test.jsonl -> tasks_test: short, and distinct for the usual layouts."""
    p = Path(path)
    return f"{p.parent.name}_{p.stem}" if p.parent.name else p.stem


def _vet_generative(cfg: Config, inputs: dict) -> list[tuple]:
    """Read every problem and few-shot file up front (errors before any model work); record their sha256."""
    from lmlab.tasks.problems import read_problems

    out = []
    for i, spec in enumerate(cfg.generative):
        problems = read_problems(spec.path, spec.n)
        if spec.n_samples and any(k > spec.n_samples for k in spec.k):
            raise UserError(f"generative[{i}]: k={spec.k} needs n_samples >= {max(spec.k)}, got n_samples={spec.n_samples}")
        inputs[f"generative_{i}"] = {"path": spec.path, "fingerprint": artifacts.sha256_file(spec.path)}
        if spec.rerank is not None:
            r = spec.rerank
            if bool(r.verifier) == bool(r.reward):
                raise UserError(f"generative[{i}].rerank: give exactly one of verifier=DIR and reward=DIR")
            if not r.n or max(r.n) > spec.n_samples or min(r.n) < 1:
                raise UserError(f"generative[{i}].rerank: n={r.n} needs 1 <= N <= n_samples={spec.n_samples}; "
                                f"raise n_samples to {max(r.n or [1])} or lower n")
            kind = "verifier" if r.verifier else "reward"
            m = artifacts.require_artifact(r.path(), kind, kind)
            inputs[f"rerank_{i}"] = {"path": r.path(), "fingerprint": m.get("fingerprint")}
        fewshot = []
        if spec.fewshot:
            fewshot = read_problems(spec.fewshot)
            inputs[f"fewshot_{i}"] = {"path": spec.fewshot, "fingerprint": artifacts.sha256_file(spec.fewshot)}
        out.append((spec, problems, fewshot))
    return out


def _eval_generative(model, tokenizer, model_dir, gen_inputs: list[tuple], cfg: Config, device, samples: list,
                     outcomes: list) -> list[dict]:
    from lmlab.eval.generative import score_generative
    from lmlab.infer.prompting import resolve_template

    results = []
    for spec, problems, fewshot in gen_inputs:
        use = None  # prompting=fewshot, or auto for a base model (no chat.json)
        if spec.prompting in ("auto", "chat"):
            use = resolve_template(model_dir, tokenizer, default=None)
        if spec.prompting == "chat" and use is None:
            raise UserError(f"prompting=chat but {model_dir} has no chat.json (it is not an sft/dpo run); "
                            f"use prompting=fewshot or auto")
        scorer = _load_scorer(spec.rerank, tokenizer, device) if spec.rerank is not None else None
        res = score_generative(model, tokenizer, problems, template=use, fewshot=fewshot,
                               n_shot=spec.chat_n_shot if use else spec.n_shot, n_samples=spec.n_samples, k=spec.k,
                               temperature=spec.temperature, top_p=spec.top_p, max_new_tokens=spec.max_new_tokens,
                               batch_size=spec.batch_size, seed=cfg.seed, device=device, scorer=scorer,
                               rerank_n=spec.rerank.n if spec.rerank is not None else (), thinking=spec.thinking)
        name = spec.name or _file_name(spec.path)
        for r in res.pop("records"):
            samples.append({"file": spec.path, "name": name, "kind": "generative", **r})
        outcomes.extend({"file": spec.path, "name": name, "kind": "generative", **r} for r in res.pop("problems"))
        results.append({"path": spec.path, "name": name, **res})
    return results


def _vet_jax(model_dir: Path) -> None:
    """backend=jax, before the weights load: a Griffin the reference can run, recurrentgemma installed."""
    from lmlab.jax_backend.griffin.decode import check
    from lmlab.models.family import get_family, split_model_json

    family, fields = split_model_json(json.loads((model_dir / "model.json").read_text()))
    check(family, get_family(family).config(fields) if family == "griffin" else None, model_dir)


def _vet_proofs(cfg: Config, inputs: dict, fp_config: dict) -> list[tuple]:
    """Read every Herald file and check every Lean setup up front; the files' sha256 go to `inputs`,
    the Lean settings that change verdicts to the fingerprinted config."""
    from lmlab.eval.proofs import check_spec, read_theorems, spec_fingerprint

    out = []
    for i, spec in enumerate(cfg.proofs):
        where = f"proofs[{i}]"
        check_spec(spec, where)
        examples, data = read_theorems(spec, where)
        inputs[f"proofs_{i}"] = {"path": spec.path, "fingerprint": artifacts.sha256_file(spec.path)}
        out.append((spec, examples, data))
    if cfg.proofs:
        fp_config["proofs"] = [spec_fingerprint(spec) for spec in cfg.proofs]
    else:  # left out, so evals made before proofs existed keep their fingerprint
        fp_config.pop("proofs", None)
    return out


def _eval_long_context(model, tokenizer, cfg: Config, device) -> list[dict]:
    from lmlab.eval import long_context as lc

    out = []
    ctx = model.max_context or int(model.cfg.max_seq_len)
    for i, spec in enumerate(cfg.long_context):
        ids = lc.read_tokens(spec, tokenizer, cfg.packed, int(spec.factor * ctx), f"long_context[{i}]")
        modes = 1 if model.max_context is None else 3
        with progress(modes, f"eval long context {lc.spec_name(spec)}", "mode") as bar:
            res = lc.score_long_context(model, ids, spec, device, bar)
        out.append({"name": lc.spec_name(spec), "path": spec.path, **res})
    return out


def _eval_proofs(model, tokenizer, proof_inputs: list[tuple], cfg: Config, device, samples: list,
                 outcomes: list) -> list[dict]:
    from lmlab.eval.proofs import score_proofs

    results = []
    for i, (spec, examples, data) in enumerate(proof_inputs):
        res = score_proofs(model, tokenizer, examples, spec, seed=cfg.seed, device=device,
                           option=f"proofs[{i}].max_new_tokens")
        name = spec.name or _file_name(spec.path)
        for r in res.pop("records"):
            samples.append({"file": spec.path, "name": name, "kind": "proofs", **r})
        outcomes.extend({"file": spec.path, "name": name, "kind": "proofs", **r} for r in res.pop("problems"))
        results.append({"path": spec.path, "name": name, "data": data, **res})
    return results


def _vet_lm_eval(cfg: Config, inputs: dict, fp_config: dict):
    """lm-eval installed, every task known (its TaskManager, returned); the task files' sha256 go to
    `inputs`, the spec and lm-eval's version to the fingerprinted config."""
    if cfg.lm_eval is None:  # left out, so evals made before it existed keep their fingerprint
        fp_config.pop("lm_eval", None)
        return None
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("lm_eval: lm-evaluation-harness is not installed; pip install 'lmlab[lm_eval]'")
    from lmlab.eval import lm_harness

    spec = cfg.lm_eval
    tm = lm_harness.task_manager(spec.tasks, spec.include_path, spec.include_defaults)
    if spec.include_path:
        inputs["lm_eval_tasks"] = {"path": spec.include_path, "fingerprint": lm_harness.tree_sha256(spec.include_path)}
    for i, t in enumerate(spec.tasks):
        if Path(t).is_file():
            inputs[f"lm_eval_task_{i}"] = {"path": t, "fingerprint": artifacts.sha256_file(t)}
    fp_config["lm_eval"] = {**spec.model_dump(mode="json"), "lm_eval_version": lm_harness.lm_eval.__version__}
    return tm


def _eval_lm_eval(model, tokenizer, model_dir, task_manager, cfg: Config, device) -> dict:
    from lmlab.eval.lm_harness import run_tasks

    return run_tasks(model, tokenizer, cfg.lm_eval, task_manager, device=device, seed=cfg.seed, path=str(model_dir))


def _manifest_config(cfg: Config) -> dict:
    """The resolved config for the manifest (and the report that prints it), Lean API keys masked."""
    out = cfg.model_dump(mode="json")
    for spec in out.get("proofs") or []:
        if spec["lean"].get("api_key"):
            spec["lean"]["api_key"] = "***"
    return out


def _load_scorer(spec: RerankSpec, tokenizer, device):
    """The verifier / reward model, refused when it reads text with another tokenizer than the model's."""
    from lmlab.infer.scorer import Scorer

    scorer = Scorer.load(spec.path(), device=device)
    if scorer.tokenizer_sha256 != tokenizer.sha256:
        raise UserError(f"the scorer {spec.path()} was trained with another tokenizer than the evaluated model "
                        f"(sha256 {scorer.tokenizer_sha256[:12]} vs {tokenizer.sha256[:12]}); rerank with a verifier "
                        f"or reward model trained from this pipeline's models")
    return scorer


def _generate(model, tokenizer, cfg: Config, device) -> list[dict]:
    if not cfg.prompts or cfg.max_new_tokens == 0:
        return []
    from lmlab.infer.engine import generate

    settings = [
        {"setting": "greedy", "temperature": 0.0, "top_k": 0, "top_p": 1.0},
        {"setting": "sampled", "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p},
    ]
    out = []
    with progress(len(settings), "generate", "setting") as bar:
        for s in settings:
            seed_everything(cfg.seed)
            completions = generate(model, tokenizer, list(cfg.prompts), max_new_tokens=cfg.max_new_tokens,
                                   temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
                                   seed=cfg.seed, device=device)
            for prompt, completion in zip(cfg.prompts, completions):
                out.append({"prompt": prompt, **s, "seed": cfg.seed, "completion": completion})
            bar.update(1)
    return out


def summary_stats(results: dict) -> dict:
    """The headline numbers for the manifest (the report reads them without opening eval.json)."""
    stats: dict = {}
    if results["packed"]:
        first = results["packed"][0]
        stats["val_loss"] = first["loss"]
        stats["val_bpb"] = first["bits_per_byte"]
        if "unigram_bits_per_byte" in first:
            stats["unigram_bpb"] = first["unigram_bits_per_byte"]
    for t in results["texts"]:
        stats[f"{t['name']}_bits_per_byte"] = t["bits_per_byte"]
        stats[f"{t['name']}_word_perplexity"] = t["word_perplexity"]
    stats["generations"] = results.get("generations", 0)
    for i, g in enumerate(results.get("generative", [])):
        if i == 0:  # the headline number the report's ladder reads first
            stats["exact_match"] = g["exact_match"]
        for key, value in g.items():
            if key.startswith(("exact_match", "pass@", "maj@")):
                stats[f"{g['name']}_{key}"] = value
        for key, value in (g.get("rerank") or {}).items():
            if key.startswith(("best_of_", "weighted_vote@", "maj@", "pass@")) and not key.endswith("_stderr"):
                stats[f"{g['name']}_rerank_{key}"] = value
    for c in results.get("choice", []):
        stats[f"{c['name']}_acc"] = c["acc"]
        stats[f"{c['name']}_acc_norm"] = c["acc_norm"]
    for p in results.get("proofs", []):
        for key, value in p.items():
            if key.startswith("pass@") or key in ("inference_s_per_proof", "verify_s_per_proof"):
                stats[f"{p['name']}_proof_{key}"] = value
    for lcx in results.get("long_context", []):
        for mode, m in lcx["modes"].items():
            stats[f"{lcx['name']}_long_{mode}_ppl"] = m["perplexity"]
    for t in (results.get("lm_eval") or {}).get("tasks", []):
        for m in t["metrics"]:  # lm_eval_TASK_METRIC, + _FILTER unless lm-eval's filter is "none"
            stats[f"lm_eval_{t['task']}_{m['metric']}" + ("" if m["filter"] == "none" else f"_{m['filter']}")] = m["value"]
    return stats


def _print_summary(results: dict, out: Path) -> None:
    for p in results["packed"]:
        base = f", unigram {p['unigram_bits_per_byte']:.3f}" if "unigram_bits_per_byte" in p else ""
        print(f"eval {p['path']} val: loss {p['loss']:.4f}, ppl {p['perplexity']:.2f}, "
              f"bits/byte {p['bits_per_byte']:.4f}{base}")
    for t in results["texts"]:
        print(f"eval {t['name']}: word ppl {t['word_perplexity']:.2f}, byte ppl {t['byte_perplexity']:.4f}, "
              f"bits/byte {t['bits_per_byte']:.4f} ({t['tokens']} tokens, {t['windows']} windows)")
    for g in results.get("generative", []):
        extra = "".join(f", {k} {v:.3f}" for k, v in g.items() if k.startswith(("pass@", "maj@")) and "_" not in k)
        print(f"eval {g['name']}: exact match {g['exact_match_strict']:.3f} strict, "
              f"{g['exact_match_flexible']:.3f} flexible ({g['n']} problems, {g['settings']['prompting']}){extra}")
        rr = g.get("rerank")
        if rr:
            top = rr["ns"][-1]
            print(f"eval {g['name']} rerank ({rr['kind']}): best-of-{top} {rr[f'best_of_{top}']:.3f}, weighted vote "
                  f"{rr[f'weighted_vote@{top}']:.3f}, maj@{top} {rr[f'maj@{top}']:.3f}, pass@{top} "
                  f"{rr[f'pass@{top}']:.3f}")
    for c in results.get("choice", []):
        print(f"eval {c['name']}: acc {c['acc']:.3f}, acc_norm {c['acc_norm']:.3f} ({c['n']} items, {c['format']})")
    for p in results.get("proofs", []):
        print(_proofs_line(p))
    for lcx in results.get("long_context", []):
        modes = ", ".join(f"{mode} ppl {m['perplexity']:.2f} (past the context {math.exp(m['loss_past_context']):.2f})"
                          for mode, m in lcx["modes"].items())
        print(f"eval {lcx['name']} long context ({lcx['tokens']:,} tokens, context {lcx['context']}): {modes}")
    for t in (results.get("lm_eval") or {}).get("tasks", []):
        from lmlab.eval.lm_harness import metrics_line

        print(f"eval lm_eval {t['task']}: {metrics_line(t)}")
    print(f"eval: wrote {out} ({time.strftime('%H:%M:%S')})")


def _proofs_line(p: dict) -> str:
    """eval NAME: pass@1 0.250 ± 0.097, pass@4 0.400 (20 theorems, 80 samples: 20 valid; failed ...); times."""
    def num(x, fmt):
        return "–" if x is None else format(x, fmt)

    ks = ", ".join(f"{k} {num(v, '.3f')}" + (f" ± {p[k + '_stderr']:.3f}" if p.get(k + "_stderr") is not None else "")
                   for k, v in p.items() if k.startswith("pass@") and not k.endswith("_stderr"))
    failed = ", ".join(f"{kind.replace('_', ' ')} {n}" for kind, n in p["failed"].items() if n) or "none"
    return (f"eval {p['name']}: {ks} ({p['theorems']} theorems, {p['samples']} samples: {p['valid']} valid; "
            f"failed: {failed}); inference {num(p['inference_s_per_proof'], '.3f')} s/proof "
            f"({num(p['inference_ms_per_token'], '.1f')} ms/token), verification "
            f"{num(p['verify_s_per_proof'], '.3f')} s/proof")
