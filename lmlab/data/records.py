"""Reading records from a data file or a Hugging Face dataset, with locations for errors.

The file layer under lmlab.data.formats (conversations, preferences, raw examples) and
lmlab.data.herald (Herald_proofs rows): .jsonl (errors name file:line), .json (a list, or
{"data": [...]}), .parquet, or `datasets.load_dataset(hf, hf_config, split=split,
data_files=data_files)`.

    for where, rec in iter_records(Source(path="data/x.jsonl")):   # where == "data/x.jsonl:3"
        ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from lmlab.errors import UserError


class RecordError(UserError):
    """A malformed record: the message names where it is; `reason` is a short key for the skip counts."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Source:
    """Where records come from: a local `path`, or a dataset `hf` (as DataSpec names them)."""

    path: Optional[str] = None
    hf: Optional[str] = None
    hf_config: Optional[str] = None
    data_files: Optional[list[str]] = None
    split: str = "train"

    def name(self) -> str:
        return self.path or f"hf:{self.hf}" + (f"/{self.hf_config}" if self.hf_config else "") + f"[{self.split}]"


def iter_jsonl(path: str | Path, on_bad: Optional[Callable[[str, str], None]] = None):
    """(line number, parsed object) for each non-empty line of a jsonl file.

    A line that is not JSON, or a file that is not UTF-8, is a UserError naming file:line;
    with `on_bad(location, message)` given, a line that is not JSON is passed to it and skipped.
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
                    if on_bad is None:
                        raise RecordError(f"{p}:{n}: not valid JSON ({e.msg}); each line must be one JSON object",
                                          "not_json") from None
                    on_bad(f"{p}:{n}", f"not valid JSON ({e.msg}); each line must be one JSON object")
        except UnicodeDecodeError:
            raise UserError(f"{p}:{n + 1}: not UTF-8 text; convert the file to UTF-8") from None


def iter_records(spec, on_bad: Optional[Callable[[str, str], None]] = None) -> Iterator[tuple[str, Any]]:
    """(location, record) pairs of `spec` (a lmlab.data.formats.DataSpec, or a `Source`); location
    is `file:line`, `file:record N` or `hf:name[split]:row N`.

    `on_bad(location, message)`, when given, receives .jsonl lines that are not JSON instead of an error.
    """
    if spec.hf:
        yield from _iter_hf(spec)
        return
    p = Path(spec.path)
    if not p.is_file():
        raise UserError(f"data file not found: {p} (check the path, or use hf=NAME for a Hugging Face dataset)")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        for n, rec in iter_jsonl(p, on_bad):
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


def _iter_hf(spec) -> Iterator[tuple[str, Any]]:
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
