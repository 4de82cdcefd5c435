"""The report's Lean section: how often Lean accepts the proofs each evaluated model wrote.

    parts += proofs_section(found, stage_of)   # a table per Herald file, then sample proofs

`found` is report.discover's {kind: [(dir, manifest)]}; every eval artifact whose eval.json
has a `proofs` entry (lmlab.eval.proofs, written by `lmlab eval ... proofs=[...]`) gives one
row per proofs file: theorems, samples, pass@1 ± its standard error, pass@k, inference seconds
per proof and milliseconds per token, Lean's seconds per proof, and the failed samples by
reason. `stage_of(eval_manifest)` names the model (Base, SFT, ...; None: the model directory's
name is shown). Below each table, a few
sample proofs from the evals' samples.jsonl (`kind` "proofs") with their verdicts, as Lean code
blocks: the text is shown exactly as the model wrote it. No eval with proofs, no section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from lmlab.report.markdown import table

SHOWN = 3  # sample proofs per file
FAILURE_WORDS = {"lean_error": "Lean error", "sorry": "sorry", "timeout": "timeout", "crash": "crash",
                 "too_long": "prompt too long", "other": "other"}


def _load(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _num(x, fmt: str) -> str:
    return "–" if not isinstance(x, (int, float)) or isinstance(x, bool) else format(x, fmt)


def _pm(entry: dict, key: str) -> str:
    se = entry.get(f"{key}_stderr")
    return _num(entry.get(key), ".3f") + (f" ± {se:.3f}" if isinstance(se, (int, float)) else "")


def _ks(entry: dict) -> list[int]:
    return sorted(int(k[5:]) for k in entry if k.startswith("pass@") and k[5:].isdigit())


def _failures(entry: dict) -> str:
    failed = entry.get("failed") or {}
    return ", ".join(f"{FAILURE_WORDS.get(k, k)} {n}" for k, n in failed.items() if n) or "none"


def _stage(eval_m: dict, stage_of: Callable[[dict], Optional[str]]) -> str:
    model = ((eval_m.get("inputs") or {}).get("model") or {}).get("path")
    return stage_of(eval_m) or (Path(model).name if model else "?")


def collect(found: dict, stage_of: Callable[[dict], Optional[str]]) -> dict[str, list[dict]]:
    """{proofs file name: [{stage, eval, entry, samples}]} over every eval artifact, in `found`'s order."""
    by_file: dict[str, list[dict]] = {}
    for eval_dir, eval_m in found.get("eval") or []:
        ev = _load(Path(eval_dir) / "eval.json") or {}
        entries = [e for e in ev.get("proofs") or [] if isinstance(e, dict) and e.get("name")]
        if not entries:
            continue
        samples = [s for s in _jsonl(Path(eval_dir) / "samples.jsonl") if s.get("kind") == "proofs"]
        for e in entries:
            by_file.setdefault(e["name"], []).append({
                "stage": _stage(eval_m, stage_of), "eval": str(eval_dir), "entry": e,
                "samples": [s for s in samples if s.get("name") == e["name"]]})
    return by_file


def proofs_section(found: dict, stage_of: Callable[[dict], Optional[str]]) -> list[str]:
    """The section's markdown lines: per Herald file a table of every evaluated model, then sample proofs."""
    by_file = collect(found, stage_of)
    if not by_file:
        return []
    out = ["## Lean proofs", "",
           "Each model proved Herald_proofs theorems, prompted as SFT trained it (header, informal statement, "
           "renamed theorem statement), and Lean judged every proof: valid means no error, no `sorry`. pass@1 is "
           "the share of proofs Lean accepts (± its standard error over theorems), pass@k the unbiased chance "
           "that one of k samples is accepted. Inference time is each batch's generation time shared among "
           "its proofs; verification is Lean's time per proof, the header elaborated once per REPL process.", ""]
    for name, rows in by_file.items():
        ks = sorted({k for r in rows for k in _ks(r["entry"]) if k > 1})
        first = rows[0]["entry"]
        st = first.get("settings") or {}
        sampling = ("greedy" if st.get("greedy") else
                    f"{st.get('n_samples')} samples at temperature {st.get('temperature')}, top-p {st.get('top_p')}")
        out += [f"### `{name}`", "",
                f"`{first.get('path')}`, {st.get('split', '?')} split; {sampling}, at most "
                f"{st.get('max_new_tokens', '?')} new tokens; Lean timeout "
                f"{(st.get('lean') or {}).get('timeout_s', '?')} s.", ""]
        body = []
        for r in rows:
            e = r["entry"]
            body.append([f"**{r['stage']}**", e.get("theorems", "–"), e.get("samples", "–"), e.get("valid", "–"),
                         _pm(e, "pass@1")] + [_pm(e, f"pass@{k}") for k in ks] +
                        [_num(e.get("inference_s_per_proof"), ".3f"), _num(e.get("inference_ms_per_token"), ".1f"),
                         _num(e.get("verify_s_per_proof"), ".3f"), _failures(e)])
        out += [table(["model", "theorems", "samples", "valid", "pass@1"] + [f"pass@{k}" for k in ks] +
                      ["inference s/proof", "ms/token", "verification s/proof", "failed"], body), ""]
        out += sample_proofs(rows)
    return out


def _pick(rows: list[dict]) -> list[tuple[str, dict]]:
    """Up to SHOWN (stage, sample): an accepted proof first when there is one, then failures."""
    flat = [(r["stage"], s) for r in reversed(rows) for s in r["samples"]]  # the last model (e.g. SFT) first
    good = [x for x in flat if x[1].get("ok")]
    bad = [x for x in flat if not x[1].get("ok")]
    return (good[:1] + bad + good[1:])[:SHOWN]


def sample_proofs(rows: list[dict]) -> list[str]:
    picked = _pick(rows)
    if not picked:
        return []
    out = ["Sample proofs:", ""]
    for stage, s in picked:
        verdict = "**valid**" if s.get("ok") else f"**failed** ({s.get('reason') or s.get('failure')})"
        text = f"{s.get('theorem', '')} {str(s.get('proof', '')).strip()}"
        fence = "~~~~" if "```" in text else "```"  # a fence the text itself cannot close
        out += [f"{stage} — `{s.get('theorem_name', '?')}`: {verdict}", "", f"{fence}lean", text, fence, ""]
    return out
