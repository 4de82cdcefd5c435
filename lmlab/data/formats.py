"""Reading conversation and preference data: local files or Hugging Face datasets, validated.

    from lmlab.data.formats import DataSpec, read_conversations, read_preferences
    convs = read_conversations(DataSpec(path="data/sft.jsonl"))                 # format: auto
    convs = read_conversations(DataSpec(hf="openai/gsm8k", hf_config="main", format="gsm8k"))
    pairs = read_preferences(DataSpec(path="data/hh.jsonl", format="preference"))

A conversation is `list[{"role", "content"}]` (see lmlab.data.chat); a preference pair is
`{"prompt": conversation, "chosen": str, "rejected": str}` (the two assistant replies).

Formats (`format: auto` picks one from the first record's keys):
  messages    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
  alpaca      {"instruction", "input", "output"} -> user (with the input) / assistant
  oasst1      OpenAssistant message rows {message_id, parent_id, role: prompter|assistant,
              text, lang, rank}: the trees are rebuilt and flattened, by default into one
              conversation per leaf (the path from the root; a trailing prompter message is
              dropped), or with `oasst1_threads: best` into one conversation per tree that
              follows the best-ranked reply (rank 0) at each level
  gsm8k       {"question", "answer"} -> user / assistant (the answer ends "#### N")
  preference  {"chosen", "rejected"} and optionally "prompt":
              - text pairs with a prompt: prompt -> user, chosen/rejected are the replies
              - hh-rlhf transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ..."): the shared prefix up
                to the last "Assistant:" is the prompt, the rest the replies
              - message lists (UltraFeedback-binarized): chosen/rejected end with the
                assistant reply; the messages before it are the prompt

Local files: .jsonl (errors name file:line), .json (a list of records, or {"data": [...]};
errors name file:record N), .parquet. `hf: NAME` loads `datasets.load_dataset(NAME,
hf_config, split=split, data_files=data_files)` (offline: `hf: json` with `data_files`).
A malformed record raises UserError naming where it is and what is wrong.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from pydantic import Field, model_validator

from lmlab.config import Strict
from lmlab.data.chat import validate_conversation
from lmlab.errors import UserError

FORMATS = ("messages", "alpaca", "oasst1", "gsm8k", "preference")

# Default record keys per logical field; `DataSpec.fields` renames them.
DEFAULT_FIELDS = {
    "messages": "messages", "instruction": "instruction", "input": "input", "output": "output",
    "question": "question", "answer": "answer", "prompt": "prompt", "chosen": "chosen", "rejected": "rejected",
}


class DataSpec(Strict):
    path: Optional[str] = Field(None, description="local .jsonl, .json or .parquet file (or give hf)")
    hf: Optional[str] = Field(None, description="Hugging Face dataset name for datasets.load_dataset (or give path)")
    hf_config: Optional[str] = Field(None, description="dataset configuration name, e.g. 'main' for gsm8k")
    data_files: Optional[list[str]] = Field(None, description="data_files for load_dataset, e.g. hf=json data_files=[a.jsonl]")
    split: str = Field("train", description="dataset split to read (hf datasets)")
    format: Literal["auto", "messages", "alpaca", "oasst1", "gsm8k", "preference"] = Field(
        "auto", description="record format; auto detects it from the first record's keys")
    weight: float = Field(1.0, gt=0, description="relative sampling weight when several datasets are mixed")
    max_records: Optional[int] = Field(None, ge=1, description="use at most this many conversations/pairs (the first ones)")
    fields: dict[str, str] = Field(default_factory=dict, description=(
        "rename record keys, e.g. {messages: conversations} or {question: problem}; keys: " + ", ".join(DEFAULT_FIELDS)))
    oasst1_threads: Literal["leaves", "best"] = Field(
        "leaves", description="oasst1: one conversation per leaf (path from root), or per tree following rank-0 replies")
    lang: Optional[str] = Field(None, description="oasst1: keep only messages in this language, e.g. en")
    identical_pairs: Literal["error", "skip"] = Field(
        "error", description="preference pairs whose chosen equals rejected: stop with an error, or skip and count them")

    @model_validator(mode="after")
    def _one_source(self):
        if bool(self.path) == bool(self.hf):
            raise ValueError("give exactly one of path (a local file) or hf (a dataset name)")
        bad = set(self.fields) - set(DEFAULT_FIELDS)
        if bad:
            raise ValueError(f"unknown fields key(s) {sorted(bad)}; valid: {', '.join(DEFAULT_FIELDS)}")
        return self

    def name(self) -> str:
        return self.path or f"hf:{self.hf}" + (f"/{self.hf_config}" if self.hf_config else "") + f"[{self.split}]"


def as_spec(source) -> DataSpec:
    """A DataSpec from a DataSpec, a dict, or a plain path string."""
    if isinstance(source, DataSpec):
        return source
    if isinstance(source, (str, Path)):
        return DataSpec(path=str(source))
    from lmlab.config import build_config
    return build_config(DataSpec, dict(source), "data spec")


# ----------------------------------------------------------------------------- records

def iter_jsonl(path: str | Path):
    """(line number, parsed object) for each non-empty line of a jsonl file.

    A line that is not JSON, or a file that is not UTF-8, is a UserError naming file:line.
    """
    p = Path(path)
    with open(p, encoding="utf-8") as f:
        n = 0
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{p}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        except UnicodeDecodeError:
            raise UserError(f"{p}:{n + 1}: not UTF-8 text; convert the file to UTF-8") from None


def iter_records(spec: DataSpec) -> Iterator[tuple[str, Any]]:
    """(location, record) pairs; location is `file:line`, `file:record N` or `hf:name[split]:row N`."""
    if spec.hf:
        yield from _iter_hf(spec)
        return
    p = Path(spec.path)
    if not p.is_file():
        raise UserError(f"data file not found: {p} (check the path, or use hf=NAME for a Hugging Face dataset)")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        for n, rec in iter_jsonl(p):
            yield f"{p}:{n}", rec
    elif suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise UserError(f"{p}: a .json data file must hold a list of records (or {{\"data\": [...]}})")
        for n, rec in enumerate(data, 1):
            yield f"{p}:record {n}", rec
    elif suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(p)
        for n, rec in enumerate(table.to_pylist(), 1):
            yield f"{p}:row {n}", rec
    else:
        raise UserError(f"{p}: unsupported data file type '{suffix}'; use .jsonl, .json or .parquet")


def _iter_hf(spec: DataSpec) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise UserError("reading hf datasets needs the `datasets` package; pip install datasets") from None
    try:
        ds = datasets.load_dataset(spec.hf, spec.hf_config, split=spec.split, data_files=spec.data_files)
    except FileNotFoundError as e:
        raise UserError(f"{spec.name()}: dataset not found ({e}); check hf/hf_config/data_files") from None
    except ValueError as e:
        raise UserError(f"{spec.name()}: {e}".split("\n")[0]) from None
    except ConnectionError as e:
        raise UserError(f"{spec.name()}: cannot reach the Hugging Face hub ({e}); download the data and use path=FILE") from None
    for n, rec in enumerate(ds, 1):
        yield f"{spec.name()}:row {n}", rec


def detect_format(record: Any, where: str, fields: dict[str, str] | None = None) -> str:
    """The format of a record from its keys (the `auto` rule)."""
    f = {**DEFAULT_FIELDS, **(fields or {})}
    if not isinstance(record, dict):
        raise UserError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    keys = set(record)
    if f["chosen"] in keys and f["rejected"] in keys:
        return "preference"
    if f["messages"] in keys:
        return "messages"
    if {"message_id", "parent_id", "text", "role"} <= keys:
        return "oasst1"
    if f["instruction"] in keys and f["output"] in keys:
        return "alpaca"
    if f["question"] in keys and f["answer"] in keys:
        return "gsm8k"
    raise UserError(f"{where}: cannot tell the data format from the keys {sorted(keys)}; expected one of: "
                    f"messages {{messages}}, alpaca {{instruction, input, output}}, oasst1 {{message_id, parent_id, "
                    f"role, text}}, gsm8k {{question, answer}}, preference {{prompt, chosen, rejected}}; "
                    f"or set format=... and fields={{...}}")


def _get(rec: Any, key: str, where: str, kind=str, optional: bool = False):
    if not isinstance(rec, dict):
        raise UserError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if key not in rec or rec[key] is None:
        if optional:
            return None
        raise UserError(f"{where}: missing field '{key}' (present: {', '.join(sorted(rec)) or 'none'}); "
                        f"fix the record or map the field with fields={{...}}")
    v = rec[key]
    if not isinstance(v, kind):
        raise UserError(f"{where}: field '{key}' must be {getattr(kind, '__name__', kind)}, got {type(v).__name__}")
    return v


# ----------------------------------------------------------------------------- conversations

def _resolve_format(spec: DataSpec, records: list[tuple[str, Any]]) -> str:
    if spec.format != "auto":
        return spec.format
    if not records:
        raise UserError(f"{spec.name()}: holds no records")
    return detect_format(records[0][1], records[0][0], spec.fields)


def read_conversations(source) -> list[list[dict]]:
    """Conversations from a DataSpec (or dict / path); preference data gives prompt + chosen reply."""
    spec = as_spec(source)
    f = {**DEFAULT_FIELDS, **spec.fields}
    records = list(iter_records(spec))
    fmt = _resolve_format(spec, records)
    out: list[list[dict]] = []
    if fmt == "oasst1":
        out = _oasst1_conversations(records, spec)
    elif fmt == "preference":
        out = [p["prompt"] + [{"role": "assistant", "content": p["chosen"]}] for p in read_preferences(spec)]
    else:
        for where, rec in records:
            if fmt == "messages":
                msgs = _get(rec, f["messages"], where, list)
            elif fmt == "alpaca":
                user = {"role": "user", "content": _get(rec, f["instruction"], where)}
                extra = _get(rec, f["input"], where, optional=True)
                if extra and extra.strip():
                    user["input"] = extra
                msgs = [user, {"role": "assistant", "content": _get(rec, f["output"], where)}]
            else:  # gsm8k
                msgs = [{"role": "user", "content": _get(rec, f["question"], where)},
                        {"role": "assistant", "content": _get(rec, f["answer"], where)}]
            out.append(validate_conversation(msgs, where))
            if spec.max_records and len(out) >= spec.max_records:
                break
    if not out:
        raise UserError(f"{spec.name()}: no conversations found")
    return out[:spec.max_records] if spec.max_records else out


def _oasst1_conversations(records: list[tuple[str, Any]], spec: DataSpec) -> list[list[dict]]:
    """Rebuild the message trees and flatten them (see the module docstring)."""
    roles = {"prompter": "user", "assistant": "assistant"}
    nodes: dict[str, dict] = {}
    children: dict[Optional[str], list[str]] = {}
    for where, rec in records:
        mid = _get(rec, "message_id", where)
        role = _get(rec, "role", where)
        if role not in roles:
            raise UserError(f"{where}: unknown oasst1 role {role!r}; valid: prompter, assistant")
        text = _get(rec, "text", where)
        if rec.get("deleted") or (spec.lang and rec.get("lang") != spec.lang):
            continue
        if not text.strip():
            raise UserError(f"{where}: empty text in oasst1 message {mid}")
        rank = rec.get("rank")
        nodes[mid] = {"role": roles[role], "content": text, "rank": 1e9 if rank is None else float(rank),
                      "parent": rec.get("parent_id"), "where": where}
    for mid, node in nodes.items():
        children.setdefault(node["parent"], []).append(mid)
    roots = [m for m in children.get(None, []) if nodes[m]["role"] == "user"]

    def path_msgs(path: list[str]) -> Optional[list[dict]]:
        while path and nodes[path[-1]]["role"] != "assistant":
            path = path[:-1]  # a thread ending in an unanswered prompt trains nothing
        if len(path) < 2:
            return None
        msgs = [{"role": nodes[m]["role"], "content": nodes[m]["content"]} for m in path]
        for a, b in zip(msgs, msgs[1:]):
            if a["role"] == b["role"]:
                raise UserError(f"{nodes[path[0]]['where']}: oasst1 thread has two {a['role']} messages in a row")
        return validate_conversation(msgs, nodes[path[-1]]["where"])

    out = []
    for root in roots:
        if spec.oasst1_threads == "best":
            path = [root]
            while children.get(path[-1]):
                path.append(min(children[path[-1]], key=lambda m: nodes[m]["rank"]))
            paths = [path]
        else:
            paths, stack = [], [[root]]
            while stack:
                path = stack.pop()
                kids = children.get(path[-1], [])
                if not kids:
                    paths.append(path)
                stack.extend(path + [k] for k in reversed(kids))
        for path in paths:
            msgs = path_msgs(path)
            if msgs is not None:
                out.append(msgs)
    return out


# ----------------------------------------------------------------------------- preference pairs

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def _parse_hh(text: str, where: str) -> list[dict]:
    """An hh-rlhf transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." as messages."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise UserError(f"{where}: expected an hh-rlhf transcript starting with '\\n\\nHuman:'")
    msgs = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return msgs


def _split_hh(chosen: str, rejected: str, where: str) -> tuple[list[dict], str, str]:
    """Split two hh-rlhf transcripts into the shared prompt and the two final replies."""
    marker = "\n\nAssistant:"
    cut = chosen.rfind(marker)
    if cut < 0:
        raise UserError(f"{where}: the chosen transcript has no '\\n\\nAssistant:' turn")
    prompt_text = chosen[:cut + len(marker)]
    if not rejected.startswith(prompt_text):
        raise UserError(f"{where}: chosen and rejected transcripts do not share the prompt before the last "
                        f"'Assistant:' turn; an hh-rlhf pair must differ only in the final reply")
    prompt = _parse_hh(prompt_text[:-len(marker)], where)
    if prompt[-1]["role"] != "user":
        raise UserError(f"{where}: the prompt must end with a Human turn")
    return prompt, chosen[cut + len(marker):].strip(), rejected[len(prompt_text):].strip()


def _pair(rec: Any, where: str, f: dict[str, str]) -> dict:
    chosen = _get(rec, f["chosen"], where, (str, list))
    rejected = _get(rec, f["rejected"], where, (str, list))
    prompt = _get(rec, f["prompt"], where, (str, list), optional=True)
    if isinstance(chosen, list) or isinstance(rejected, list):
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise UserError(f"{where}: chosen and rejected must both be text or both be message lists")
        for name, msgs in (("chosen", chosen), ("rejected", rejected)):
            if not msgs or not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
                raise UserError(f"{where}: '{name}' must be a message list ending with the assistant reply")
        head_c, head_r = chosen[:-1], rejected[:-1]
        if head_c and head_r and head_c != head_r:
            raise UserError(f"{where}: chosen and rejected have different conversations before the reply")
        conv = head_c or head_r
        if not conv:
            if not isinstance(prompt, str):
                raise UserError(f"{where}: no prompt: give 'prompt' or put the user turn in chosen/rejected")
            conv = [{"role": "user", "content": prompt}]
        chosen_t, rejected_t = chosen[-1].get("content"), rejected[-1].get("content")
    elif prompt is None:
        conv, chosen_t, rejected_t = _split_hh(chosen, rejected, where)
    else:
        conv = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        chosen_t, rejected_t = chosen, rejected
    conv = validate_conversation(conv, where, need_assistant=False)
    if conv[-1]["role"] != "user":
        raise UserError(f"{where}: the prompt must end with a user turn")
    for name, t in (("chosen", chosen_t), ("rejected", rejected_t)):
        if not isinstance(t, str) or not t.strip():
            raise UserError(f"{where}: the {name} reply is empty")
    return {"prompt": conv, "chosen": chosen_t, "rejected": rejected_t}


def read_preferences(source, stats: Optional[dict] = None) -> list[dict]:
    """Preference pairs {prompt: conversation, chosen: str, rejected: str} from a DataSpec.

    `stats`, when given, receives `identical_skipped` (pairs skipped with identical_pairs=skip).
    """
    spec = as_spec(source)
    f = {**DEFAULT_FIELDS, **spec.fields}
    records = list(iter_records(spec))
    fmt = _resolve_format(spec, records)
    if fmt != "preference":
        raise UserError(f"{spec.name()}: is '{fmt}' data, not preference pairs; DPO needs records with "
                        f"chosen and rejected (and optionally prompt)")
    out, skipped = [], 0
    for where, rec in records:
        pair = _pair(rec, where, f)
        if pair["chosen"].strip() == pair["rejected"].strip():
            if spec.identical_pairs == "error":
                raise UserError(f"{where}: chosen and rejected are identical, so the pair teaches nothing; "
                                f"fix the record or set identical_pairs=skip")
            skipped += 1
            continue
        out.append(pair)
        if spec.max_records and len(out) >= spec.max_records:
            break
    if stats is not None:
        stats["identical_skipped"] = stats.get("identical_skipped", 0) + skipped
    if not out:
        raise UserError(f"{spec.name()}: no preference pairs found")
    return out
