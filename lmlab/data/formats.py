"""Reading conversation, prompt/completion and preference data: local files or Hugging Face datasets, validated.

    from lmlab.data.formats import DataSpec, read_completions, read_conversations, read_preferences, read_sft_data
    convs = read_conversations(DataSpec(path="data/sft.jsonl"))                 # format: auto
    convs = read_conversations(DataSpec(hf="openai/gsm8k", hf_config="main", format="gsm8k"))
    pairs = read_preferences(DataSpec(path="data/hh.jsonl", format="preference"))
    raw = read_completions(DataSpec(path="data/herald.parquet", format="herald"))  # [(prompt, completion)]
    kind, items = read_sft_data("data/x.jsonl")   # ("chat", conversations) or ("raw", (prompt, completion)s)

A conversation is `list[{"role", "content"}]` (see lmlab.data.chat); a preference pair is
`{"prompt": conversation, "chosen": str, "rejected": str}` (the two assistant replies); a raw
example is a `(prompt, completion)` pair of texts. Raw examples are not conversations: SFT
trains them without a chat template, as `[bos] + tokens(prompt) + tokens(completion) + [eos]`
with the loss on the completion and eos only (lmlab.train.sft.completion_ids), so they have a
reader of their own (`read_completions`); `read_conversations` refuses them and
`read_sft_data` returns whichever kind a source holds.

Formats (`format: auto` picks one from the first record's keys):
  messages    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
  alpaca      {"instruction", "input", "output"} -> user (with the input) / assistant
  oasst1      OpenAssistant message rows {message_id, parent_id, role: prompter|assistant,
              text, lang, rank}: the trees are rebuilt and flattened, by default into one
              conversation per leaf (the path from the root; a trailing prompter message is
              dropped), or with `oasst1_threads: best` into one conversation per tree that
              follows the best-ranked reply (rank 0) at each level
  gsm8k       {"question", "answer"} -> user / assistant (the answer ends "#### N")
  prompt_completion
              {"prompt": str, "completion": str} -> a raw (prompt, completion) example; both
              must be non-empty text
  herald      FrenzyMath/Herald_proofs rows {id, name, formal_theorem, informal_theorem,
              formal_proof, header, ...}, cleaned and renamed by lmlab.data.herald and made
              into herald.to_record's (prompt, completion); `herald_split` picks the train
              part (default), the valid part or all of herald.split_examples' deterministic
              split (`herald_valid_fraction`, default 0.1). Never chosen by `auto`: name it.
              Rows the cleaning drops are counted in `stats["herald"]` (`herald_summary`)
  preference  {"chosen", "rejected"} and optionally "prompt":
              - text pairs with a prompt: prompt -> user, chosen/rejected are the replies
              - hh-rlhf transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ..."): the shared prefix up
                to the last "Assistant:" is the prompt, the rest the replies
              - message lists (UltraFeedback-binarized): chosen/rejected end with the
                assistant reply; the messages before it are the prompt

Local files: .jsonl (errors name file:line), .json (a list of records, or {"data": [...]};
errors name file:record N), .parquet. `hf: NAME` loads `datasets.load_dataset(NAME,
hf_config, split=split, data_files=data_files)` (offline: `hf: json` with `data_files`).

A malformed record (not JSON, a missing field, an unknown role, an empty turn or reply, an
hh-rlhf transcript without an "Assistant:" turn, ...) raises UserError naming where it is
and what is wrong. With `invalid: skip` it is skipped instead and counted per reason; the
readers' `stats` dict receives the counts and the first few locations with their messages
(`skipped_summary` words them as one line), and a source whose every record is malformed
is still an error. `locations`, when given, receives the location of each returned
conversation or pair, so later errors (after templating, tokenizing) can name the record:

    stats, where = {}, []
    pairs = read_preferences(DataSpec(path="hh.jsonl", invalid="skip"), stats=stats, locations=where)
    # where[i] == "hh.jsonl:17" for pairs[i]; skipped_summary(stats, "hh.jsonl") -> "skipped 3 ..."
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from lmlab.config import Strict
from lmlab.data.chat import validate_conversation
from lmlab.data.records import RecordError, iter_records
from lmlab.errors import UserError

FORMATS = ("messages", "alpaca", "oasst1", "gsm8k", "preference", "prompt_completion", "herald")
# Formats whose records are raw (prompt, completion) examples rather than conversations.
RAW_FORMATS = ("prompt_completion", "herald")

# Default record keys per logical field; `DataSpec.fields` renames them.
DEFAULT_FIELDS = {
    "messages": "messages", "instruction": "instruction", "input": "input", "output": "output",
    "question": "question", "answer": "answer", "prompt": "prompt", "chosen": "chosen", "rejected": "rejected",
    "completion": "completion",
}


class DataSpec(Strict):
    path: Optional[str] = Field(None, description="local .jsonl, .json or .parquet file (or give hf)")
    hf: Optional[str] = Field(None, description="Hugging Face dataset name for datasets.load_dataset (or give path)")
    hf_config: Optional[str] = Field(None, description="dataset configuration name, e.g. 'main' for gsm8k")
    data_files: Optional[list[str]] = Field(None, description="data_files for load_dataset, e.g. hf=json data_files=[a.jsonl]")
    split: str = Field("train", description="dataset split to read (hf datasets)")
    format: Literal["auto", "messages", "alpaca", "oasst1", "gsm8k", "preference", "prompt_completion",
                    "herald"] = Field("auto", description="record format; auto detects it from the first record's "
                                      "keys (every format but herald)")
    weight: float = Field(1.0, gt=0, description="relative sampling weight when several datasets are mixed")
    max_records: Optional[int] = Field(None, ge=1, description="use at most this many conversations/pairs/examples (the first ones)")
    fields: dict[str, str] = Field(default_factory=dict, description=(
        "rename record keys, e.g. {messages: conversations} or {question: problem}; keys: " + ", ".join(DEFAULT_FIELDS)))
    oasst1_threads: Literal["leaves", "best"] = Field(
        "leaves", description="oasst1: one conversation per leaf (path from root), or per tree following rank-0 replies")
    lang: Optional[str] = Field(None, description="oasst1: keep only messages in this language, e.g. en")
    herald_split: Literal["train", "valid", "all"] = Field(
        "train", description="herald: which side of lmlab.data.herald's deterministic split to read (valid is "
        "what a proof evaluation of the same file holds out)")
    herald_valid_fraction: float = Field(0.1, ge=0, lt=1, description="herald: the share of rows (by id hash) "
                                         "in the valid side of the split")
    identical_pairs: Literal["error", "skip"] = Field(
        "error", description="preference pairs whose chosen equals rejected: stop with an error, or skip and count them")
    invalid: Literal["error", "skip"] = Field(
        "error", description="what to do with a malformed record (not JSON, a missing field, an unknown role, an empty "
        "turn or reply, an hh-rlhf transcript without an Assistant turn): stop with an error naming file:line, or "
        "skip it and count it (reported per reason; a source with no valid record is still an error)")

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


# ----------------------------------------------------------------------------- malformed records

# validate_conversation (lmlab.data.chat) raises plain UserErrors: their reasons by message.
_CHAT_REASONS = (("unknown role", "unknown_role"), ("empty or missing content", "empty_turn"),
                 ("no assistant turn", "no_assistant_turn"), ("may only come first", "system_not_first"),
                 ("non-empty list", "empty_conversation"), ("expected an object", "wrong_type"),
                 ("may carry a text 'input'", "wrong_type"))

SKIP_EXAMPLES = 3  # locations (with their messages) of skipped records kept for the report


def _reason(err: UserError) -> str:
    if isinstance(err, RecordError):
        return err.reason
    msg = str(err)
    return next((r for key, r in _CHAT_REASONS if key in msg), "invalid_record")


class _BadLine:
    """A .jsonl line that is not JSON, standing in for its record: reading any field raises `error`."""

    def __init__(self, error: RecordError) -> None:
        self.error = error


class _Invalid:
    """What `DataSpec.invalid` says to do with malformed records: raise, or skip and count them."""

    def __init__(self, spec: "DataSpec") -> None:
        self.spec, self.skip = spec, spec.invalid == "skip"
        self.reasons: dict[str, int] = {}
        self.order: dict[str, int] = {}  # location -> position in the source, so `first` is in file order
        self._first: list[tuple[float, str]] = []

    def __call__(self, err: UserError, where: str) -> None:
        """Handle malformed record `where`: re-raise (with the hint) under invalid=error, else count it."""
        if not self.skip:
            err.args = (f"{err}; or set invalid=skip on this data spec to skip malformed records",)
            raise err
        reason = _reason(err)
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self._first = sorted(self._first + [(self.order.get(where, math.inf), str(err))],
                             key=lambda x: x[0])[:SKIP_EXAMPLES]

    @property
    def first(self) -> list[str]:
        """The messages of the first SKIP_EXAMPLES skipped records, in file order."""
        return [m for _, m in self._first]

    def read(self) -> list[tuple[str, Any]]:
        """The source's records, in order; a .jsonl line that is not JSON is kept as a `_BadLine`,
        which fails where the record is read (so it is handled, in file order, like any malformed record)."""
        records: list[tuple[str, Any]] = []

        def bad_line(where: str, message: str) -> None:
            records.append((where, _BadLine(RecordError(f"{where}: {message}", "not_json"))))

        for where, rec in iter_records(self.spec, bad_line):
            records.append((where, rec))
        self.order = {where: i for i, (where, _) in enumerate(records)}
        return records

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def report(self, stats: Optional[dict]) -> None:
        """Add the counts to `stats` (under invalid=skip; keys as documented in read_preferences)."""
        if stats is None or not self.skip:
            return
        stats["invalid_skipped"] = stats.get("invalid_skipped", 0) + self.count
        by = stats.setdefault("invalid_by_reason", {})
        for r, n in self.reasons.items():
            by[r] = by.get(r, 0) + n
        first = stats.setdefault("invalid_first", [])
        first += self.first[:SKIP_EXAMPLES - len(first)]

    def nothing_left(self, what: str) -> UserError:
        """The error for a source with nothing usable: every record malformed (skip) or none found."""
        if self.count:
            n = self.count
            return UserError(f"{self.spec.name()}: no {what} left after skipping {n} malformed record"
                             f"{'s' if n != 1 else ''} ({_describe(self.reasons, self.first)}); fix the data or "
                             f"check format= and fields=")
        return UserError(f"{self.spec.name()}: no {what} found")


def _describe(reasons: dict[str, int], first: list[str]) -> str:
    counts = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{counts}; first: " + "; ".join(first)


def skipped_summary(stats: dict, name: str) -> Optional[str]:
    """One line about the malformed records a reader skipped into `stats`, or None when there were none.

    e.g. "skipped 12 malformed records in data/hh.jsonl (empty_reply 9, missing_field 3; first:
    data/hh.jsonl:17: the chosen reply is empty; ...)"
    """
    n = stats.get("invalid_skipped", 0)
    if not n:
        return None
    return (f"skipped {n} malformed record{'s' if n != 1 else ''} in {name} "
            f"({_describe(stats.get('invalid_by_reason', {}), stats.get('invalid_first', []))})")


# ----------------------------------------------------------------------------- records

def detect_format(record: Any, where: str, fields: dict[str, str] | None = None) -> str:
    """The format of a record from its keys (the `auto` rule)."""
    f = {**DEFAULT_FIELDS, **(fields or {})}
    if isinstance(record, _BadLine):
        raise record.error
    if not isinstance(record, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(record).__name__}", "not_an_object")
    keys = set(record)
    if f["chosen"] in keys and f["rejected"] in keys:
        return "preference"
    if f["messages"] in keys:
        return "messages"
    if f["prompt"] in keys and f["completion"] in keys:
        return "prompt_completion"
    if {"message_id", "parent_id", "text", "role"} <= keys:
        return "oasst1"
    if f["instruction"] in keys and f["output"] in keys:
        return "alpaca"
    if f["question"] in keys and f["answer"] in keys:
        return "gsm8k"
    if {"formal_theorem", "formal_proof", "header"} <= keys:
        # Herald rows are never detected: the format also picks a side of a split, which should be said.
        raise RecordError(f"{where}: these look like Herald_proofs rows (formal_theorem, formal_proof, header); "
                          f"set format=herald (and herald_split=train|valid|all, default train)", "unknown_format")
    raise RecordError(f"{where}: cannot tell the data format from the keys {sorted(keys)}; expected one of: "
                    f"messages {{messages}}, alpaca {{instruction, input, output}}, oasst1 {{message_id, parent_id, "
                    f"role, text}}, gsm8k {{question, answer}}, preference {{prompt, chosen, rejected}}, "
                    f"prompt_completion {{prompt, completion}}, herald (Herald_proofs rows, format=herald only); "
                    f"or set format=... and fields={{...}}", "unknown_format")


def _get(rec: Any, key: str, where: str, kind=str, optional: bool = False):
    if isinstance(rec, _BadLine):
        raise rec.error
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(rec).__name__}", "not_an_object")
    if key not in rec or rec[key] is None:
        if optional:
            return None
        raise RecordError(f"{where}: missing field '{key}' (present: {', '.join(sorted(rec)) or 'none'}); "
                          f"fix the record or map the field with fields={{...}}", "missing_field")
    v = rec[key]
    if not isinstance(v, kind):
        raise RecordError(f"{where}: field '{key}' must be {getattr(kind, '__name__', kind)}, got "
                          f"{type(v).__name__}", "wrong_type")
    return v


# ----------------------------------------------------------------------------- conversations

def _resolve_format(spec: DataSpec, records: list[tuple[str, Any]], invalid: _Invalid) -> str:
    """spec.format, or (auto) the format of the first record; with invalid=skip, of the first that tells."""
    if spec.format != "auto":
        return spec.format
    if not records:
        if invalid.count:
            raise invalid.nothing_left("records")
        raise UserError(f"{spec.name()}: holds no records")
    first_error = None
    for where, rec in records if invalid.skip else records[:1]:
        try:
            return detect_format(rec, where, spec.fields)
        except UserError as e:
            first_error = first_error or e
    raise first_error


def _read(spec: DataSpec, invalid: _Invalid) -> tuple[list[tuple[str, Any]], str]:
    """(records, format) of a source; lines that are not JSON are handled as `invalid` says."""
    records = invalid.read()
    return records, _resolve_format(spec, records, invalid)


def read_conversations(source, stats: Optional[dict] = None, locations: Optional[list] = None) -> list[list[dict]]:
    """Conversations from a DataSpec (or dict / path); preference data gives prompt + chosen reply.

    `stats` and `locations` as for read_preferences: the skip counts (invalid=skip; for preference
    data also `identical_skipped`), and the location of each returned conversation (`file:line`;
    for oasst1 the conversation's last message). Raw prompt/completion data (RAW_FORMATS) is a
    UserError: it is not a conversation (read it with read_completions or read_sft_data).
    """
    spec = as_spec(source)
    invalid = _Invalid(spec)
    records, fmt = _read(spec, invalid)
    if fmt in RAW_FORMATS:
        raise UserError(f"{spec.name()}: is '{fmt}' data, raw prompt/completion examples rather than "
                        f"conversations; read it with read_completions (sft trains it without a chat template)")
    return _conversations(spec, records, fmt, invalid, stats, locations)


def read_completions(source, stats: Optional[dict] = None, locations: Optional[list] = None) -> list[tuple[str, str]]:
    """Raw (prompt, completion) examples from a DataSpec (or dict / path) in a RAW_FORMATS format.

    `stats` and `locations` as for read_preferences (malformed records under invalid=skip, each
    example's location); for herald data `stats["herald"]` also gets lmlab.data.herald's counts
    (see `herald_summary`). Conversation or preference data is a UserError naming the format.
    """
    spec = as_spec(source)
    invalid = _Invalid(spec)
    records, fmt = _read(spec, invalid)
    if fmt not in RAW_FORMATS:
        raise UserError(f"{spec.name()}: is '{fmt}' data, not prompt/completion examples; a raw example is "
                        f"{{prompt, completion}} (format=prompt_completion) or a Herald_proofs row (format=herald)")
    return _completions(spec, records, fmt, invalid, stats, locations)


def read_sft_data(source, stats: Optional[dict] = None,
                  locations: Optional[list] = None) -> tuple[Literal["chat", "raw"], list]:
    """("chat", conversations) or ("raw", (prompt, completion) examples): whichever the source
    holds, read once. `stats` and `locations` as for read_conversations / read_completions."""
    spec = as_spec(source)
    invalid = _Invalid(spec)
    records, fmt = _read(spec, invalid)
    if fmt in RAW_FORMATS:
        return "raw", _completions(spec, records, fmt, invalid, stats, locations)
    return "chat", _conversations(spec, records, fmt, invalid, stats, locations)


def _conversations(spec: DataSpec, records: list[tuple[str, Any]], fmt: str, invalid: _Invalid,
                   stats: Optional[dict], locations: Optional[list]) -> list[list[dict]]:
    """The conversations of a chat-format source's records (the body of read_conversations)."""
    f = {**DEFAULT_FIELDS, **spec.fields}
    out: list[list[dict]] = []
    where_out: list[str] = []
    if fmt == "oasst1":
        out, where_out = _oasst1_conversations(records, spec, invalid)
    elif fmt == "preference":
        pairs, where_out = _pairs(spec, records, invalid, stats)
        out = [p["prompt"] + [{"role": "assistant", "content": p["chosen"]}] for p in pairs]
    else:
        for where, rec in records:
            try:
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
                conv = validate_conversation(msgs, where)
            except UserError as e:
                invalid(e, where)
                continue
            out.append(conv)
            where_out.append(where)
            if spec.max_records and len(out) >= spec.max_records:
                break
    invalid.report(stats)
    if not out:
        raise invalid.nothing_left("conversations")
    if spec.max_records:
        out, where_out = out[:spec.max_records], where_out[:spec.max_records]
    if locations is not None:
        locations.extend(where_out)
    return out


# ----------------------------------------------------------------------------- raw prompt/completion examples

def _completions(spec: DataSpec, records: list[tuple[str, Any]], fmt: str, invalid: _Invalid,
                 stats: Optional[dict], locations: Optional[list]) -> list[tuple[str, str]]:
    """The (prompt, completion) examples of a RAW_FORMATS source's records."""
    herald_stats: dict = {}
    if fmt == "herald":
        if stats is not None:
            herald_stats = stats.setdefault("herald", {})
        out, where_out = _herald_completions(spec, records, invalid, herald_stats)
    else:
        f = {**DEFAULT_FIELDS, **spec.fields}
        out, where_out = [], []
        for where, rec in records:
            try:
                prompt, completion = _get(rec, f["prompt"], where), _get(rec, f["completion"], where)
                for key, value in ((f["prompt"], prompt), (f["completion"], completion)):
                    if not value.strip():
                        raise RecordError(f"{where}: field '{key}' is empty; a prompt/completion record needs text "
                                          f"in both fields", "empty_field")
            except UserError as e:
                invalid(e, where)
                continue
            out.append((prompt, completion))
            where_out.append(where)
            if spec.max_records and len(out) >= spec.max_records:
                break
    invalid.report(stats)
    if not out:
        if herald_stats.get("examples"):
            raise UserError(f"{spec.name()}: none of its {herald_stats['examples']} usable Herald_proofs rows is in "
                            f"the '{spec.herald_split}' split (herald_valid_fraction={spec.herald_valid_fraction:g}); "
                            f"use herald_split=all or change herald_valid_fraction")
        if herald_stats.get("rows"):
            from lmlab.data.herald import summary
            raise UserError(f"{spec.name()}: no usable Herald_proofs row ({summary(herald_stats)}); check the data")
        raise invalid.nothing_left("prompt/completion examples")
    if locations is not None:
        locations.extend(where_out)
    return out


def _herald_row(rec: Any, where: str):
    """lmlab.data.herald.clean_row of one record: (example, None) or (None, drop reason); a record
    that is not a Herald_proofs row (not JSON, missing columns, wrong types) is a RecordError."""
    from lmlab.data import herald

    if isinstance(rec, _BadLine):
        raise rec.error
    try:
        row = herald.check_columns(rec, where)
    except UserError as e:
        raise RecordError(str(e), "missing_field" if isinstance(rec, dict) else "not_an_object") from None
    try:
        return herald.clean_row(row, where)
    except UserError as e:
        raise RecordError(str(e), "wrong_type") from None


def _herald_completions(spec: DataSpec, records: list[tuple[str, Any]], invalid: _Invalid,
                        st: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """Herald_proofs rows -> (herald.to_record's (prompt, completion) of the rows in spec.herald_split,
    their locations). Rows are cleaned as lmlab.data.herald.read_herald does, and its counts (`rows`,
    `examples`, `dropped`, `dropped_first`, the layout herald.summary words) are added to `st`, with
    the split's `split`, `valid_fraction` and `in_split` (examples on the chosen side).

    The loop is read_herald's, run on the records already read here: so that malformed rows follow
    the spec's `invalid` rule (read_herald always stops at them) and `hf:` sources keep their
    hf_config and data_files.
    """
    from lmlab.data import herald

    for key in ("rows", "examples", "in_split"):
        st.setdefault(key, 0)
    dropped, first = st.setdefault("dropped", {}), st.setdefault("dropped_first", {})
    st["split"], st["valid_fraction"] = spec.herald_split, spec.herald_valid_fraction
    out, where_out = [], []
    for where, rec in records:
        try:
            ex, reason = _herald_row(rec, where)
        except UserError as e:
            invalid(e, where)
            continue
        st["rows"] += 1
        if ex is None:
            dropped[reason] = dropped.get(reason, 0) + 1
            locs = first.setdefault(reason, [])
            if len(locs) < herald.FIRST_LOCATIONS:
                name = str(rec.get("name") or "").strip()
                locs.append(f"{where} ({name})" if name else where)
            continue
        st["examples"] += 1
        # herald.split_examples decides the side, so the proof evaluation's split is this one by construction.
        in_valid = bool(herald.split_examples([ex], spec.herald_valid_fraction)[1])
        if spec.herald_split != "all" and in_valid != (spec.herald_split == "valid"):
            continue
        record = herald.to_record(ex)
        out.append((record["prompt"], record["completion"]))
        where_out.append(where)
        st["in_split"] += 1
        if spec.max_records and len(out) >= spec.max_records:
            break
    return out, where_out


def herald_summary(stats: dict, name: str) -> Optional[str]:
    """One line about a herald source's rows (from read_completions' stats["herald"]), or None for
    other data: e.g. "data/h.parquet: kept 191 of 200 rows; dropped unanalyzable_header 8 (first:
    ...); self_citation 1 (...); 172 examples in the train split (herald_valid_fraction 0.1)"."""
    from lmlab.data import herald

    st = stats.get("herald")
    if not st:
        return None
    return (f"{name}: {herald.summary(st)}; {st['in_split']} example{'s' if st['in_split'] != 1 else ''} in the "
            f"{st['split']} split (herald_valid_fraction {st['valid_fraction']:g})")


def _oasst1_conversations(records: list[tuple[str, Any]], spec: DataSpec,
                          invalid: _Invalid) -> tuple[list[list[dict]], list[str]]:
    """Rebuild the message trees and flatten them (see the module docstring). -> (conversations, locations)

    Under invalid=skip a malformed message row is skipped, and with it the replies below it
    (they are no longer reachable from a root); a malformed thread is skipped whole.
    """
    roles = {"prompter": "user", "assistant": "assistant"}
    nodes: dict[str, dict] = {}
    children: dict[Optional[str], list[str]] = {}
    for where, rec in records:
        try:
            mid = _get(rec, "message_id", where)
            role = _get(rec, "role", where)
            if role not in roles:
                raise RecordError(f"{where}: unknown oasst1 role {role!r}; valid: prompter, assistant", "unknown_role")
            text = _get(rec, "text", where)
            if rec.get("deleted") or (spec.lang and rec.get("lang") != spec.lang):
                continue
            if not text.strip():
                raise RecordError(f"{where}: empty text in oasst1 message {mid}", "empty_turn")
        except UserError as e:
            invalid(e, where)
            continue
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
                raise RecordError(f"{nodes[path[0]]['where']}: oasst1 thread has two {a['role']} messages in a row",
                                  "repeated_role")
        return validate_conversation(msgs, nodes[path[-1]]["where"])

    out, where_out = [], []
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
            try:
                msgs = path_msgs(path)
            except UserError as e:
                invalid(e, nodes[path[0]]["where"])
                continue
            if msgs is not None:
                out.append(msgs)
                where_out.append(nodes[path[-1]]["where"])
    return out, where_out


# ----------------------------------------------------------------------------- preference pairs

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def _parse_hh(text: str, where: str) -> list[dict]:
    """An hh-rlhf transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." as messages."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RecordError(f"{where}: expected an hh-rlhf transcript starting with '\\n\\nHuman:'", "bad_transcript")
    msgs = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return msgs


def _split_hh(chosen: str, rejected: str, where: str) -> tuple[list[dict], str, str]:
    """Split two hh-rlhf transcripts into the shared prompt and the two final replies."""
    marker = "\n\nAssistant:"
    cut = chosen.rfind(marker)
    if cut < 0:
        raise RecordError(f"{where}: the chosen transcript has no '\\n\\nAssistant:' turn", "no_assistant_turn")
    prompt_text = chosen[:cut + len(marker)]
    if not rejected.startswith(prompt_text):
        raise RecordError(f"{where}: chosen and rejected transcripts do not share the prompt before the last "
                          f"'Assistant:' turn; an hh-rlhf pair must differ only in the final reply", "prompts_differ")
    prompt = _parse_hh(prompt_text[:-len(marker)], where)
    if prompt[-1]["role"] != "user":
        raise RecordError(f"{where}: the prompt must end with a Human turn", "prompt_not_user")
    return prompt, chosen[cut + len(marker):].strip(), rejected[len(prompt_text):].strip()


def _pair(rec: Any, where: str, f: dict[str, str]) -> dict:
    chosen = _get(rec, f["chosen"], where, (str, list))
    rejected = _get(rec, f["rejected"], where, (str, list))
    prompt = _get(rec, f["prompt"], where, (str, list), optional=True)
    if isinstance(chosen, list) or isinstance(rejected, list):
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise RecordError(f"{where}: chosen and rejected must both be text or both be message lists", "wrong_type")
        for name, msgs in (("chosen", chosen), ("rejected", rejected)):
            if not msgs or not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
                raise RecordError(f"{where}: '{name}' must be a message list ending with the assistant reply",
                                  "no_assistant_turn")
        head_c, head_r = chosen[:-1], rejected[:-1]
        if head_c and head_r and head_c != head_r:
            raise RecordError(f"{where}: chosen and rejected have different conversations before the reply",
                              "prompts_differ")
        conv = head_c or head_r
        if not conv:
            if not isinstance(prompt, str):
                raise RecordError(f"{where}: no prompt: give 'prompt' or put the user turn in chosen/rejected",
                                  "missing_prompt")
            conv = [{"role": "user", "content": prompt}]
        chosen_t, rejected_t = chosen[-1].get("content"), rejected[-1].get("content")
    elif prompt is None:
        conv, chosen_t, rejected_t = _split_hh(chosen, rejected, where)
    else:
        conv = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        chosen_t, rejected_t = chosen, rejected
    conv = validate_conversation(conv, where, need_assistant=False)
    if conv[-1]["role"] != "user":
        raise RecordError(f"{where}: the prompt must end with a user turn", "prompt_not_user")
    for name, t in (("chosen", chosen_t), ("rejected", rejected_t)):
        if not isinstance(t, str) or not t.strip():
            raise RecordError(f"{where}: the {name} reply is empty", "empty_reply")
    return {"prompt": conv, "chosen": chosen_t, "rejected": rejected_t}


def read_preferences(source, stats: Optional[dict] = None, locations: Optional[list] = None) -> list[dict]:
    """Preference pairs {prompt: conversation, chosen: str, rejected: str} from a DataSpec.

    `stats`, when given, receives `identical_skipped` (pairs skipped with identical_pairs=skip)
    and, with invalid=skip, `invalid_skipped` (malformed records skipped), `invalid_by_reason`
    ({reason: count}, e.g. missing_field, empty_reply, no_assistant_turn, not_json) and
    `invalid_first` (the first 3 skipped records' messages, each starting with its location);
    counts add up over calls with the same dict. `locations`, when given, is extended with the
    location of each returned pair (`file:line`, `file:record N`, `hf:name[split]:row N`).
    """
    spec = as_spec(source)
    invalid = _Invalid(spec)
    records, fmt = _read(spec, invalid)
    if fmt != "preference":
        raise UserError(f"{spec.name()}: is '{fmt}' data, not preference pairs; DPO needs records with "
                        f"chosen and rejected (and optionally prompt)")
    out, where_out = _pairs(spec, records, invalid, stats)
    invalid.report(stats)
    if not out:
        raise invalid.nothing_left("preference pairs")
    if locations is not None:
        locations.extend(where_out)
    return out


def _pairs(spec: DataSpec, records: list[tuple[str, Any]], invalid: _Invalid,
           stats: Optional[dict]) -> tuple[list[dict], list[str]]:
    """(pairs, their locations) of preference records; identical pairs per `spec.identical_pairs`."""
    f = {**DEFAULT_FIELDS, **spec.fields}
    out, where_out, skipped = [], [], 0
    for where, rec in records:
        try:
            pair = _pair(rec, where, f)
        except UserError as e:
            invalid(e, where)
            continue
        if pair["chosen"].strip() == pair["rejected"].strip():
            if spec.identical_pairs == "error":
                raise UserError(f"{where}: chosen and rejected are identical, so the pair teaches nothing; "
                                f"fix the record or set identical_pairs=skip")
            skipped += 1
            continue
        out.append(pair)
        where_out.append(where)
        if spec.max_records and len(out) >= spec.max_records:
            break
    if stats is not None:
        stats["identical_skipped"] = stats.get("identical_skipped", 0) + skipped
    return out, where_out
