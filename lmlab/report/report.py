"""Write a pipeline's report: `report.md` with numbers, tables and PNG plots.

    lmlab report runs/smoke                      # a pipeline root: subdirs found by manifest kind
    lmlab report inputs='[runs/smoke/eval]'      # or artifact dirs; their inputs are followed
    lmlab report --config configs/stages/report.yaml out=runs/smoke/report

The report opens with a one-paragraph summary (val bits per byte against the unigram
baseline, tokens trained, training time, hardware), then: time per stage, data (corpus per
source, tokenizer, packed token counts), model (parameters, FLOPs per token), training
curves from `metrics.jsonl`, the evaluation table, Lean proof checking of every eval with a
`proofs` section (lmlab/report/lean.py), sample generations, a section per
hyperparameter sweep (a directory with a sweep.json from `lmlab sweep`, named in `inputs` or
directly under root; lmlab/report/sweep.py), TRM runs on puzzle sets with their puzzle
evaluations and rendered puzzles (lmlab/report/trm.py; a pipeline of only puzzle artifacts
skips the language-model sections), and every stage's resolved config in a collapsed block.
A piece that is missing (say, no eval artifact yet) is named in the report instead of
stopping it. The output is written atomically; `run` prints and returns the path
of report.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from pydantic import Field

from lmlab import artifacts
from lmlab.config import Strict
from lmlab.errors import UserError
from lmlab.report import alignment, families, plots, trm
from lmlab.report import lean as lean_report
from lmlab.report.llm_trm import compressor_section, hidden_pairs_section, seqtrm_section
from lmlab.report.llm_trm_outcome import latent_section, outcome_section
from lmlab.report.long_context import long_context_section
from lmlab.report.lm_eval import lm_eval_section
from lmlab.report import sweep as sweep_report
from lmlab.report.markdown import fmt_count, fmt_duration, hardware_line, table
from lmlab.runtime import hardware_summary

POSITIONAL = ("root", "pipeline root directory whose artifact subdirectories are discovered (e.g. runs/smoke)")

STAGE_ORDER = ["corpus", "tokenizer", "packed", "tasks", "model", "samples", "verifier", "reward", "compressor",
               "hidden_pairs", "seqtrm", "latent_reasoner", "llm_trm_outcome", "eval", "puzzles", "trm", "puzzle_eval", "hf_export", "export"]
LADDER_ORDER = ["Base", "SFT", "DPO", "GRPO"]
STAGE_VERB = {"corpus": "corpus", "tokenizer": "tokenizer", "packed": "pack", "tasks": "tasks", "model": "pretrain",
              "eval": "eval", "hf_export": "export", "export": "export", "samples": "samples", "verifier": "verifier",
              "reward": "reward", "puzzles": "puzzles", "trm": "trm", "puzzle_eval": "puzzle-eval",
              "compressor": "compressor", "hidden_pairs": "hidden-pairs", "seqtrm": "seqtrm",
              "latent_reasoner": "latent", "llm_trm_outcome": "llm-trm-eval"}


class Config(Strict):
    root: str = Field("", description="pipeline root directory; every subdirectory with a manifest.json is included")
    inputs: list[str] = Field(default_factory=list, description="artifact directories to include (besides those under root)")
    follow_inputs: bool = Field(True, description="also include the artifacts each included manifest names as its inputs")
    out: str = Field("", description="output directory; default: ROOT/report, or 'report' next to the first input")
    title: str = Field("", description="report title; default: the root directory's name")
    smoothing: float = Field(0.9, ge=0, lt=1, description="EMA factor for the train loss curve (0 = raw)")
    max_generations: int = Field(12, ge=0, description="sample generations shown in the report")


# ------------------------------------------------------------------------- formatting

def fmt_num(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 1e4:
        return f"{x:,.0f}"
    if x != 0 and abs(x) < 1e-3:
        return f"{x:.{digits}g}"
    return f"{x:.{digits}f}".rstrip("0").rstrip(".")


# -------------------------------------------------------------------------- discovery

def discover(root: str, inputs: list[str], follow: bool = True, skip: Path | None = None) -> dict[str, list[tuple[Path, dict]]]:
    """Artifacts by kind: the subdirectories of `root`, the `inputs`, and (if `follow`) their inputs."""
    queue: list[Path] = []
    if root:
        r = Path(root)
        if not r.is_dir():
            raise UserError(f"report root not found: {r} (run the pipeline first, or fix the path)")
        if artifacts.read_manifest(r) is not None:
            queue.append(r)
        queue.extend(sorted(p for p in r.iterdir() if p.is_dir() and not p.name.startswith(".")))
    for p in inputs:
        if not Path(p).exists():
            raise UserError(f"report input not found: {p} (fix the path in `inputs`)")
        queue.append(Path(p))
    found: dict[str, list[tuple[Path, dict]]] = {}
    seen: set[Path] = set()
    while queue:
        p = queue.pop(0)
        rp = p.resolve()
        if rp in seen or (skip is not None and rp == skip.resolve()):
            continue
        seen.add(rp)
        m = artifacts.read_manifest(p)
        if m is None or m.get("kind") == "report":
            continue
        found.setdefault(m.get("kind", "?"), []).append((p, m))
        if follow:
            for inp in (m.get("inputs") or {}).values():
                ip = inp.get("path") if isinstance(inp, dict) else None
                if ip and Path(ip).is_dir():
                    queue.append(Path(ip))
    return found


def read_metrics(model_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train lines, eval lines) of a model's metrics.jsonl; unreadable lines are skipped."""
    train, val = [], []
    path = model_dir / "metrics.jsonl"
    if not path.is_file():
        return train, val
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        if "val_loss" in rec:
            val.append(rec)
        elif "loss" in rec:
            train.append(rec)
    return train, val


def _total_seconds(m: dict) -> float | None:
    t = m.get("timings") or {}
    if "total_s" in t:
        return float(t["total_s"])
    vals = [v for v in t.values() if isinstance(v, (int, float))]
    return float(sum(vals)) if vals else None


def _first(found, kind):
    items = found.get(kind) or []
    return items[0] if items else (None, None)


_STAGE_OF_VERB = {"pretrain": "Base", "sft": "SFT", "dpo": "DPO", "grpo": "GRPO"}


def model_stage(m: dict) -> str:
    """Which training stage made a model artifact, from the verb in its manifest: Base (pretrain),
    SFT, DPO, or the verb in capitals for any other training stage."""
    verb = artifacts.manifest_verb(m or {"kind": "model"}) or "pretrain"
    return _STAGE_OF_VERB.get(verb, verb.upper())


def _same(a, b) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def _model_of_eval(found, eval_m) -> tuple[Path | None, dict | None]:
    ref = ((eval_m or {}).get("inputs") or {}).get("model", {}).get("path")
    for p, m in found.get("model") or []:
        if _same(p, ref):
            return p, m
    return None, None


def _label(kind: str, p: Path, m: dict, found) -> str:
    """Time-per-stage label: the verb, with the training stage for models and evals."""
    if kind == "model":
        return artifacts.manifest_verb(m) or "pretrain"
    if kind == "eval":
        _, mm = _model_of_eval(found, m)
        return f"eval ({model_stage(mm).lower()})" if mm else "eval"
    if kind == "puzzle_eval":
        return f"puzzle-eval ({p.name})"
    return STAGE_VERB.get(kind, kind)


def _load_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------- stage

def run(cfg: Config) -> Path:
    if not cfg.root and not cfg.inputs:
        raise UserError("nothing to report on: pass a pipeline root (`lmlab report runs/smoke`) or inputs='[DIR, ...]'")
    if cfg.out:
        out = Path(cfg.out)
    elif cfg.root:
        out = Path(cfg.root) / "report"
    else:
        out = Path(cfg.inputs[0]).resolve().parent / "report"
    artifacts.check_out(out, "report", "report", inputs={f"input {p}": p for p in cfg.inputs})
    found = discover(cfg.root, cfg.inputs, cfg.follow_inputs, skip=out)
    # Models and their evals read best in training order: base, SFT, DPO.
    rank = {s: i for i, s in enumerate(LADDER_ORDER)}
    found.get("model", []).sort(key=lambda pm: (rank.get(model_stage(pm[1]), 9), pm[1].get("created", "")))
    found.get("eval", []).sort(key=lambda pm: (rank.get(model_stage(_model_of_eval(found, pm[1])[1]), 9),
                                               pm[1].get("created", "")))
    sweeps = sweep_report.find_sweeps(cfg.root, cfg.inputs)
    if not found and not sweeps:
        raise UserError(f"no lmlab artifacts (directories with manifest.json) found in {cfg.root or cfg.inputs}; "
                        f"run the pipeline first")

    # The report depends on every artifact it shows; the model's metrics.jsonl grows while
    # training continues, so its size is part of the fingerprint too.
    deps = {}
    for kind, items in found.items():
        for p, m in items:
            metrics = p / "metrics.jsonl"
            deps[str(p.resolve())] = [m.get("fingerprint"), m.get("created"),
                                      metrics.stat().st_size if metrics.is_file() else None]
    deps.update(sweep_report.fingerprints(sweeps))
    fp = artifacts.stage_fingerprint("report", cfg.model_dump(mode="json", exclude={"out"}), deps)
    if artifacts.is_up_to_date(out, fp):
        print(f"report: up to date ({out}), nothing to do")
        print(out / "report.md")
        return out / "report.md"

    timer = artifacts.Timer()
    try:
        with artifacts.atomic_dir(out) as tmp:
            with timer("write"):
                text = build_report(found, cfg, tmp)
                (tmp / "report.md").write_text(text, encoding="utf-8")
            artifacts.write_manifest(tmp, "report", cfg.model_dump(mode="json"), fp, verb="report",
                                     inputs={f"{k}_{i}": {"path": str(p), "fingerprint": m.get("fingerprint")}
                                             for k, items in found.items() for i, (p, m) in enumerate(items)},
                                     timings=timer.total(),
                                     stats={"plots": sorted(x.name for x in tmp.glob("*.png"))})
    except OSError as e:
        raise artifacts.disk_error(e, out) from None
    path = out / "report.md"
    print(path)
    return path


def build_report(found: dict[str, list[tuple[Path, dict]]], cfg: Config, out_dir: Path) -> str:
    """The markdown text; PNGs are written into `out_dir` next to it."""
    missing: list[str] = []
    # A pipeline of puzzle sets, TRM runs and puzzle evals only: no language-model sections.
    puzzles_only = bool(found) and set(found) <= set(trm.KINDS)
    # The pretraining sections describe the base model (and its eval); SFT/DPO models
    # appear in the ladder.
    models = found.get("model") or []
    bases = [(p, m) for p, m in models if model_stage(m) == "Base"]
    # several base models (a Griffin beside a transformer): describe the one most artifacts build on
    model_dir, model_m = max(bases, key=lambda pm: _users(found, pm[0])) if bases else _first(found, "model")
    evals = found.get("eval") or []
    eval_dir, eval_m = next(((p, m) for p, m in evals if _same(_model_of_eval(found, m)[0], model_dir)),
                            _first(found, "eval"))
    packed_dir, packed_m = _first(found, "packed")
    tok_dir, tok_m = _first(found, "tokenizer")
    corpus_dir, corpus_m = _first(found, "corpus")
    eval_json = _load_json(eval_dir / "eval.json") if eval_dir else None
    train, val = read_metrics(model_dir) if model_dir else ([], [])

    title = cfg.title or (Path(cfg.root).resolve().name if cfg.root else Path(cfg.inputs[0]).resolve().parent.name)
    parts = [f"# lmlab report: {title}", "",
             trm.summary_line(found) if puzzles_only else summary(model_m, eval_json, train, val, tok_m), ""]

    # --- run
    commits = sorted({m.get("git_commit") for items in found.values() for _, m in items if m.get("git_commit")})
    hw_m = _first(found, "trm")[1] if puzzles_only else model_m
    hw = (hw_m or {}).get("stats", {}).get("hardware") or {}
    here = hardware_summary()
    parts += ["## Run", "", table(["", ""], [
        ["git commit", ", ".join(f"`{c}`" for c in commits) or "–"],
        ["lmlab version", ", ".join(sorted({str(m.get("lmlab_version")) for it in found.values() for _, m in it})) or "–"],
        ["trained on", hardware_line(hw) if hw else (str((hw_m or {}).get("stats", {}).get("device", "–")))],
        ["report written on", f"{hardware_line(here)}, {here.get('platform')}, Python {here.get('python')}, torch {here.get('torch')}"],
        ["artifacts", ", ".join(f"{k} (`{p}`)" for k in _ordered(found) for p, _ in found[k])],
    ]), ""]

    # --- time per stage
    times = [(_label(k, p, m, found), _total_seconds(m)) for k in _ordered(found) for p, m in found[k]]
    times = [(n, s) for n, s in times if s is not None]
    parts += ["## Time per stage", ""]
    if times:
        rows = [[n, fmt_duration(s), f"{100 * s / max(sum(t for _, t in times), 1e-9):.0f}%"] for n, s in times]
        rows.append(["**total**", f"**{fmt_duration(sum(s for _, s in times))}**", ""])
        parts += [table(["stage", "wall clock", "share"], rows), ""]
        plots.stage_times(times, out_dir / "stage_times.png")
        parts += ["![time per stage](stage_times.png)", ""]
    else:
        parts += ["_No stage recorded timings._", ""]

    # --- data
    parts += ["## Data", ""]
    if not puzzles_only:
        parts += corpus_section(corpus_dir, corpus_m, missing)
        parts += tokenizer_section(tok_dir, tok_m, missing)
        parts += packed_section(found.get("packed") or [], missing)
    parts += trm.puzzle_sets_section(found)

    if not puzzles_only:
        # --- model + training
        parts += ["## Model", ""]
        if model_m:
            parts += model_section(model_dir, model_m, train, val)
        else:
            missing.append("model (run `lmlab pretrain`)")
            parts += ["_No model artifact found._", ""]

        parts += ["## Training curves", ""]
        if train or val:
            plots.loss_curves([(r["step"], r["loss"]) for r in train], [(r["step"], r["val_loss"]) for r in val],
                              out_dir / "loss.png", smoothing=cfg.smoothing)
            parts += ["![train and val loss](loss.png)", ""]
            bpb_points = [(r["step"], r["val_bpb"]) for r in val if r.get("val_bpb") is not None]
            unigram = _unigram_bpb(eval_json)
            if bpb_points or unigram is not None:
                plots.val_bpb(bpb_points, unigram, out_dir / "val_bpb.png")
                parts += ["![val bits per byte vs unigram baseline](val_bpb.png)", ""]
            if unigram is None:
                parts += ["_The unigram baseline line needs an eval artifact with `packed` data._", ""]
        else:
            if model_m:
                missing.append(f"training metrics ({model_dir}/metrics.jsonl)")
            parts += ["_No training metrics found._", ""]

        # --- eval
        parts += ["## Evaluation", ""]
        if eval_json:
            parts += eval_section(eval_dir, eval_json)
        else:
            missing.append("evaluation (run `lmlab eval MODEL_DIR`)")
            parts += ["_No eval artifact found: run `lmlab eval runs/…/model` and then this report again._", ""]

    parts += families.pretrain_comparison(found, out_dir, read_metrics, lambda m: model_stage(m) == "Base")
    parts += ladder_section(found, out_dir)
    def eval_stage(eval_m: dict) -> Optional[str]:
        model_m = _model_of_eval(found, eval_m)[1]
        return model_stage(model_m) if model_m else None

    parts += lean_report.proofs_section(found, eval_stage)
    parts += long_context_section(found, out_dir, eval_stage)
    parts += lm_eval_section(found, eval_stage)
    parts += alignment.grpo_section(found, out_dir, read_metrics)
    parts += trm.trm_section(found, out_dir, read_metrics)
    parts += alignment.scorer_sections(found, out_dir)
    parts += compressor_section(found, out_dir)
    parts += hidden_pairs_section(found)
    parts += seqtrm_section(found, out_dir)
    parts += latent_section(found, out_dir)
    parts += outcome_section(found, out_dir)

    if not puzzles_only:
        parts += ["## Sample generations", ""]
        gens = _read_generations(eval_dir) if eval_dir else []
        if gens:
            parts += generations_section(gens, cfg.max_generations)
        else:
            parts += ["_No generations recorded._", ""]

    parts += sweep_report.report_sections(sweep_report.find_sweeps(cfg.root, cfg.inputs), out_dir)

    # --- configs
    parts += ["## Resolved configs", ""]
    for kind in _ordered(found):
        for p, m in found[kind]:
            body = json.dumps(m.get("config", {}), indent=2, sort_keys=True)
            parts += [f"<details><summary>{kind} — <code>{p}</code></summary>", "", "```json", body, "```", "",
                      "</details>", ""]

    if missing:
        parts += ["## Missing", "", "This report is incomplete; not found:", ""] + [f"- {m}" for m in missing] + [""]
    return "\n".join(parts).rstrip() + "\n"


def _users(found: dict, path: Path) -> int:
    """How many artifacts list `path` among their inputs."""
    target = path.resolve()
    return sum(1 for items in found.values() for _, m in items for inp in (m.get("inputs") or {}).values()
               if isinstance(inp, dict) and inp.get("path") and Path(inp["path"]).resolve() == target)


def _ordered(found: dict) -> list[str]:
    return [k for k in STAGE_ORDER if k in found] + sorted(k for k in found if k not in STAGE_ORDER)


def _unigram_bpb(eval_json) -> float | None:
    for p in (eval_json or {}).get("packed", []):
        if p.get("unigram_bits_per_byte") is not None:
            return float(p["unigram_bits_per_byte"])
    return None


def summary(model_m, eval_json, train, val, tok_m) -> str:
    """The one paragraph a reader wants first."""
    bits = []
    packed = (eval_json or {}).get("packed") or []
    bpb = packed[0]["bits_per_byte"] if packed else (val[-1].get("val_bpb") if val else None)
    unigram = _unigram_bpb(eval_json)
    if bpb is not None:
        s = f"**val bits per byte {bpb:.3f}**"
        if unigram is not None:
            gain = 1 - bpb / unigram
            s += (f" vs unigram {unigram:.3f} ({100 * gain:.0f}% lower)" if gain >= 0 else
                  f" vs unigram {unigram:.3f} (**{100 * -gain:.0f}% worse than the unigram baseline**: train longer)")
        bits.append(s)
    stats = (model_m or {}).get("stats", {})
    tokens = stats.get("tokens_trained") or stats.get("tokens") or (train[-1].get("tokens") if train else None)
    if tokens:
        bits.append(f"after {fmt_count(tokens)} tokens")
    secs = stats.get("train_time_s") or (_total_seconds(model_m) if model_m else None)
    if secs:
        bits.append(f"in {fmt_duration(secs)}")
    hw = stats.get("hardware")
    if hw:
        bits.append(f"on {hardware_line(hw)}")
    if stats.get("params"):
        bits.append(f"({fmt_count(stats['params'])} parameters)")
    lines = [" ".join(bits) + "." if bits else "_No trained model or evaluation found yet._"]
    texts = (eval_json or {}).get("texts") or []
    for t in texts:
        lines.append(f"On `{t['name']}`: word perplexity {t['word_perplexity']:.1f}, "
                     f"bits per byte {t['bits_per_byte']:.3f}.")
    return " ".join(lines)


def corpus_section(corpus_dir, m, missing) -> list[str]:
    out = ["### Corpus", ""]
    if not m:
        missing.append("corpus artifact")
        return out + ["_No corpus artifact found._", ""]
    stats = m.get("stats", {})
    per_source = stats.get("per_source") or stats.get("sources") or []
    if isinstance(per_source, dict):  # {name: {...}} -> [{"source": name, ...}]
        per_source = [{"source": k, **v} for k, v in per_source.items() if isinstance(v, dict)]
    per_source = [s for s in per_source if isinstance(s, dict)]
    if per_source:
        preferred = ["documents", "characters", "bytes", "estimated_tokens", "dropped_duplicates", "dropped_empty", "bad_records"]
        keys = [k for k in preferred if any(k in s for s in per_source)]
        keys += sorted({k for s in per_source for k in s} - set(keys) - {"source"})
        rows = [[f"`{s.get('source', '?')}`"] + [_cell(s.get(k)) for k in keys] for s in per_source]
        if len(per_source) > 1:
            rows.append(["**total**"] + [_cell(stats.get(k)) if not isinstance(stats.get(k), (dict, list)) else "" for k in keys])
        out += [table(["source"] + [k.replace("_", " ") for k in keys], rows), ""]
        return out + [f"`{corpus_dir}`", ""]
    totals = {k: v for k, v in stats.items() if not isinstance(v, (dict, list))}
    if totals:
        out += [table(["", ""], [[k, _cell(v)] for k, v in totals.items()]), ""]
    return out + [f"`{corpus_dir}`", ""]


def _cell(v) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return fmt_count(v) if isinstance(v, int) and abs(v) >= 10000 else fmt_num(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v)[:80]
    return str(v)


def tokenizer_section(tok_dir, m, missing) -> list[str]:
    out = ["### Tokenizer", ""]
    if not m:
        missing.append("tokenizer artifact")
        return out + ["_No tokenizer artifact found._", ""]
    meta = _load_json(tok_dir / "tokenizer_meta.json") or {}
    stats, config = m.get("stats", {}), m.get("config", {})

    def pick(*keys):
        for src in (meta, stats, config):
            for k in keys:
                if isinstance(src, dict) and src.get(k) is not None:
                    return src[k]
        return None

    rows = [["type", pick("type", "kind", "algorithm", "model_type") or "–"],
            ["vocab size", fmt_num(pick("vocab_size"))],
            ["sha256", f"`{m.get('tokenizer_sha256') or pick('sha256') or '–'}`"]]
    specials = pick("special_tokens")
    if specials:
        rows.append(["special tokens", ", ".join(f"`{k}`={v}" for k, v in specials.items()) if isinstance(specials, dict) else str(specials)])
    for k in ("bytes_per_token", "chars_per_token", "tokens_per_byte"):
        if stats.get(k) is not None:
            rows.append([k.replace("_", " "), fmt_num(stats[k])])
    return out + [table(["", ""], rows), ""]


def packed_section(items, missing) -> list[str]:
    out = ["### Packed data", ""]
    if not items:
        missing.append("packed artifact")
        return out + ["_No packed artifact found._", ""]
    rows = []
    for p, m in items:
        s = m.get("stats", {})
        tpb = s["val_tokens"] / s["val_bytes"] if s.get("val_tokens") and s.get("val_bytes") else None
        rows.append([f"`{p}`", s.get("seq_len", "–"), fmt_count(s.get("train_tokens")), fmt_count(s.get("val_tokens")),
                     fmt_count(s.get("train_bytes")), fmt_count(s.get("val_bytes")),
                     f"{1 / tpb:.2f}" if tpb else "–"])
    return out + [table(["artifact", "seq len", "train tokens", "val tokens", "train bytes", "val bytes", "bytes/token"], rows), ""]


def model_section(model_dir: Path, m: dict, train, val) -> list[str]:
    stats = m.get("stats", {})
    mcfg = _load_json(model_dir / "model.json") or {}
    rows = [["parameters", fmt_count(stats.get("params"))]]
    if stats.get("non_embedding_params"):
        rows.append(["non-embedding parameters", fmt_count(stats["non_embedding_params"])])
    rows.append(["FLOPs per token (train, 6N + attention)", fmt_count(stats.get("flops_per_token"))])
    tokens = stats.get("tokens_trained") or stats.get("tokens") or (train[-1].get("tokens") if train else None)
    rows.append(["tokens trained", fmt_count(tokens)])
    if tokens and stats.get("flops_per_token"):
        rows.append(["training compute", f"{fmt_count(tokens * stats['flops_per_token'])}FLOP"])
    if train:
        rows.append(["steps", fmt_num(train[-1]["step"])])
        if stats.get("resolved_steps") and stats.get("time_budget_min"):
            rows.append(["run length", f"{stats['resolved_steps']:,} of at most {stats['max_steps']:,} steps: what fit "
                                       f"a time budget of {stats['time_budget_min']:g} min at "
                                       f"{stats['measured_step_s']:.3g} s/step"])
        if stats.get("precision"):
            rows.append(["precision", stats["precision"]])
        par = stats.get("parallel") or {}
        if par.get("strategy", "none") != "none":  # ddp or fsdp, on any number of processes
            rows.append(["processes", f"{par['world_size']} ({par['strategy']})"])
        preset = stats.get("hardware_preset") or {}
        if preset.get("preset"):
            rows.append(["hardware preset", f"{preset['preset']}{' (auto-detected)' if preset.get('detected') else ''}"])
        tps = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
        if tps:
            rows.append(["throughput (median)", f"{fmt_count(sorted(tps)[len(tps) // 2])} tokens/s"])
        rows.append(["final train loss", fmt_num(train[-1]["loss"])])
    if val:
        rows.append(["final val loss", fmt_num(val[-1]["val_loss"])])
        if val[-1].get("val_bpb") is not None:
            rows.append(["final val bits per byte", fmt_num(val[-1]["val_bpb"])])
    arch = ", ".join(f"{k}={mcfg[k]}" for k in ("family", "preset", "n_layer", "d_model", "n_head", "n_kv_head",
                                               "ffn_dim", "width", "num_heads", "lru_width", "mlp_expanded_width",
                                               "attention_window_size", "vocab_size", "max_seq_len") if k in mcfg)
    if arch:
        rows.append(["architecture", arch])
    return [table(["", ""], rows), "", f"`{model_dir}`", ""]


def eval_section(eval_dir: Path, ev: dict) -> list[str]:
    out = []
    packed = ev.get("packed") or []
    if packed:
        rows = []
        for p in packed:
            u = p.get("unigram_bits_per_byte")
            rows.append([f"`{p['path']}` ({p.get('split', 'val')})", fmt_count(p.get("tokens_scored")), fmt_num(p["loss"]),
                         fmt_num(p["perplexity"], 2), f"**{p['bits_per_byte']:.4f}**",
                         f"{u:.4f}" if u is not None else "–",
                         f"{100 * p['improvement_over_unigram']:.1f}%" if p.get("improvement_over_unigram") is not None else "–"])
        out += ["### Held-out packed data", "",
                table(["data", "tokens scored", "loss (nats)", "perplexity", "bits/byte", "unigram bits/byte",
                       "better than unigram by"], rows), ""]
    texts = ev.get("texts") or []
    if texts:
        rows = [[f"`{t['name']}`" + (" (truncated)" if t.get("truncated") else ""), fmt_count(t["bytes"]),
                 fmt_count(t["words"]), fmt_count(t["tokens"]), fmt_num(t["word_perplexity"], 2),
                 fmt_num(t["byte_perplexity"]), f"**{t['bits_per_byte']:.4f}**"] for t in texts]
        out += ["### Text files (lm-eval rolling windows)", "",
                table(["file", "bytes", "words", "tokens", "word perplexity", "byte perplexity", "bits/byte"], rows), ""]
    if not packed and not texts:
        out += ["_The eval artifact scored no data (set `packed` or `texts`)._", ""]
    return out + [f"`{eval_dir}`", ""]


def _read_jsonl(path: Path) -> list[dict]:
    """The records of a jsonl file written by a stage; unreadable lines are skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _read_generations(eval_dir: Path) -> list[dict]:
    return _read_jsonl(eval_dir / "generations.jsonl")


def generations_section(gens: list[dict], limit: int) -> list[str]:
    out = []
    for g in gens[:limit]:
        setting = g.get("setting", "")
        if setting == "sampled":
            setting += f" (T={g.get('temperature')}, top_k={g.get('top_k')}, top_p={g.get('top_p')})"
        prompt, completion = g.get("prompt", ""), g.get("completion", "")
        # A fenced block shows the text exactly (code prompts, indentation); the prompt is
        # marked off so a reader sees where the model took over.
        fence = "~~~~" if "```" in prompt + completion else "```"
        out += [f"**{setting}** — prompt `{prompt.strip() or repr(prompt)}`", "", fence,
                f"{prompt}⟨{completion}⟩", fence, ""]
    if len(gens) > limit:
        out += [f"_{len(gens) - limit} more in generations.jsonl._", ""]
    return out


# ----------------------------------------------------------------------------- the ladder

LADDER_METRICS = ["exact_match_strict", "exact_match_flexible"]


def ladder_rows(found) -> list[dict]:
    """One row per evaluated model with generative results, ordered Base -> SFT -> DPO."""
    rows = []
    for eval_dir, eval_m in found.get("eval") or []:
        ev = _load_json(eval_dir / "eval.json") or {}
        gens = ev.get("generative") or []
        if not gens:
            continue
        model_dir, model_m = _model_of_eval(found, eval_m)
        stage = model_stage(model_m) if model_m else "?"
        g = gens[0]
        row = {"stage": stage, "model": str(model_dir or eval_m.get("inputs", {}).get("model", {}).get("path")),
               "eval": str(eval_dir), "result": g, "created": eval_m.get("created", "")}
        rows.append(row)
        rerank = g.get("rerank")
        if rerank:  # the same model's samples reranked: "+verifier" (best-of-N at the largest N)
            N = rerank["ns"][-1]
            rows.append({**row, "stage": f"{stage} + {rerank.get('kind') or 'verifier'} best-of-{N}",
                         "outcome": f"best_of_{N}", "created": row["created"] + "~",
                         "result": {**{k: v for k, v in g.items()
                                       if k not in ("rerank", "per_task") and not k.startswith(("pass@", "maj@"))},
                                    "exact_match_strict": rerank[f"best_of_{N}"],
                                    "exact_match_strict_stderr": rerank.get(f"best_of_{N}_stderr"),
                                    "exact_match_flexible": None,
                                    "settings": {**(g.get("settings") or {}),
                                                 "prompting": f"best of {N} samples"}}})
    order = {s: i for i, s in enumerate(LADDER_ORDER)}
    return sorted(rows, key=lambda r: (order.get(r["stage"].split(" + ")[0], len(order)), r["created"]))


def _ks(g: dict, prefix: str) -> list[int]:
    return sorted(int(k.split("@")[1]) for k in g if k.startswith(prefix + "@") and k.split("@")[1].isdigit())


def _with_stderr(g: dict, col: str) -> str:
    if g.get(col) is None:
        return "–"
    se = g.get(f"{col}_stderr")
    return f"{g[col]:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def paired_difference(a: dict, b: dict) -> dict | None:
    """Strict exact match of ladder row b minus row a on the problems both scored (from their
    problems.jsonl), with the standard error of the per-problem differences; None without them."""
    def outcomes(row: dict) -> dict:
        key = row.get("outcome")  # a reranked row: the problem's best-of-N value, else greedy correctness
        return {(p.get("name"), p.get("question"), p.get("reference")):
                float((p.get("rerank") or {}).get(key, 0.0)) if key else float(bool(p.get("correct")))
                for p in _read_jsonl(Path(row["eval"]) / "problems.jsonl") if p.get("kind") != "proofs"}

    oa, ob = outcomes(a), outcomes(b)
    common = [k for k in ob if k in oa]
    if len(common) < 2:
        return None
    from lmlab.eval.estimators import stderr

    diffs = [ob[k] - oa[k] for k in common]
    return {"diff": sum(diffs) / len(diffs), "stderr": stderr(diffs), "n": len(diffs),
            "gained": sum(d > 0 for d in diffs), "lost": sum(d < 0 for d in diffs)}


def ladder_section(found, out_dir: Path) -> list[str]:
    """Base -> SFT -> DPO on held-out problems: table, bar plot, ladder.csv and ladder.json."""
    rows = ladder_rows(found)
    if not rows:
        return []
    ks = sorted({k for r in rows for k in _ks(r["result"], "pass")})
    cols = LADDER_METRICS + [f"pass@{k}" for k in ks] + [f"maj@{k}" for k in ks if k > 1]
    first = rows[0]["result"]
    settings = first.get("settings") or {}
    out = ["## The ladder: " + " → ".join(dict.fromkeys(r["stage"] for r in rows)), "",
           f"Held-out problems from `{first.get('path')}` (n = {first.get('n')}); greedy exact match with "
           f"lm-eval's GSM8K extraction (strict `#### N`, flexible last number); pass@k (unbiased estimator) "
           f"and maj@k from {settings.get('n_samples', '?')} samples at temperature {settings.get('temperature', '?')}, "
           f"top-p {settings.get('top_p', '?')}. The base model is prompted few-shot, chat models with their template.", ""]
    table_rows = []
    for i, r in enumerate(rows):
        g = r["result"]
        prompting = (g.get("settings") or {}).get("prompting", "")
        r["delta"] = paired_difference(rows[i - 1], r) if i else None
        delta = "–" if not r["delta"] else f"{r['delta']['diff']:+.3f} ± {r['delta']['stderr']:.3f}"
        table_rows.append([f"**{r['stage']}**", prompting] + [_with_stderr(g, c) for c in cols] + [delta,
                                                                                                   f"`{r['model']}`"])
    out += [table(["stage", "prompting"] + cols + ["Δ EM vs row above", "model"], table_rows), "",
            "± is the standard error over problems; Δ is the paired difference in strict exact match on the "
            "same problems, with its standard error (a difference within about two of them is noise).", ""]

    per_task = sorted({t for r in rows for t in (r["result"].get("per_task") or {})})
    if len(per_task) > 1:
        trows = [[r["stage"]] + [fmt_num(((r["result"].get("per_task") or {}).get(t) or {}).get("exact_match_strict"), 3)
                                 for t in per_task] for r in rows]
        out += ["Exact match (strict) per task:", "", table(["stage"] + per_task, trows), ""]

    plot_cols = ["exact_match_strict"] + [f"pass@{k}" for k in ks] + [f"maj@{k}" for k in ks if k > 1]
    plots.ladder([r["stage"] for r in rows], {c: [r["result"].get(c) for r in rows] for c in plot_cols},
                 out_dir / "ladder.png", errors={c: [r["result"].get(f"{c}_stderr") for r in rows] for c in plot_cols},
                 title="held-out problems: " + " → ".join(r["stage"] for r in rows))
    out += ["![the ladder](ladder.png)", ""]

    import csv
    with open(out_dir / "ladder.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["stage", "model", "eval"] + cols + [f"{c}_stderr" for c in cols]
                   + ["delta_exact_match", "delta_exact_match_stderr"])
        for r in rows:
            d = r["delta"] or {}
            w.writerow([r["stage"], r["model"], r["eval"]] + [r["result"].get(c) for c in cols]
                       + [r["result"].get(f"{c}_stderr") for c in cols] + [d.get("diff"), d.get("stderr")])
    (out_dir / "ladder.json").write_text(json.dumps(
        [{"stage": r["stage"], "model": r["model"], "eval": r["eval"], **{c: r["result"].get(c) for c in cols},
          **{f"{c}_stderr": r["result"].get(f"{c}_stderr") for c in cols}, "delta_exact_match": r["delta"]}
         for r in rows], indent=2) + "\n", encoding="utf-8")
    out += ["The ladder is also in `ladder.csv` and `ladder.json`; each stage's full metrics are in its "
            "eval directory's `eval.json`.", ""]
    out += alignment.rerank_section(rows, out_dir)

    out += ["### Sample conversations per stage", ""]
    for r in rows:
        if r.get("outcome"):
            continue  # a reranked row shares its model's eval and samples
        samples = [s for s in _read_jsonl(Path(r["eval"]) / "samples.jsonl") if s.get("kind") != "proofs"][:2]
        for s in samples:
            mark = "correct" if s.get("correct") else f"wrong (reference {s.get('reference')})"
            out += [f"**{r['stage']}** — {mark}", "", "```", f"{s.get('prompt', '')}⟨{s.get('completion', '')}⟩", "```", ""]
    return out
