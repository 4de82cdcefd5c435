"""Where raw text comes from: the corpus sources and the readers that yield their documents.

Three kinds of source, chosen by `kind` in the corpus config (see docs/data.md):

    stdlib  the English documentation that ships with every CPython: pydoc topics and the
            docstrings of the standard library, read by parsing its .py files with `ast`
            (nothing is imported, nothing is downloaded); optionally the source code too.
    files   local .txt/.md (one document per file), .jsonl (one document per line, text in
            `text_field`) and .parquet (text column `text_field`); paths, directories or globs.
    hf      a Hugging Face dataset through `datasets.load_dataset(..., streaming=True)`; with
            `name: json|parquet|text` and `data_files` it reads local files the same way.

Each source model has `documents(bad)` (yields raw document strings, reporting malformed
records to a `BadRecords`) and `fingerprint_inputs()` (what the no-op check hashes).
`lmlab.data.corpus` does the cleaning, deduplication and sharding.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Annotated, Iterator, Literal, Optional, Union

from pydantic import Field

from lmlab.config import Strict
from lmlab.errors import UserError

TEXT_SUFFIXES = (".txt", ".md")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")


class BadRecords:
    """Collects malformed inputs (bad JSON lines, non-UTF-8 files) under `on_bad_record`.

    `stop` raises at the first one; `skip` counts them and keeps the first few locations so
    the corpus stage can print one warning instead of thousands.
    """

    def __init__(self, mode: str, keep: int = 5) -> None:
        self.mode = mode
        self.keep = keep
        self.count = 0
        self.examples: list[str] = []

    def report(self, where: str, problem: str) -> None:
        if self.mode == "stop":
            raise UserError(f"{where}: {problem} (set on_bad_record=skip to skip such records with a warning)")
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(f"{where}: {problem}")


# ---------------------------------------------------------------------------------------------
# stdlib: the documentation every CPython carries


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_stdlib_module_file(rel: Path) -> bool:
    """Skip tests, third-party packages and vendored/tooling trees: they are not documentation."""
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "ensurepip",
            "turtledemo", "venv", "pydoc_data"}
    return not any(part in skip or part.startswith("test_") for part in rel.parts)


def stdlib_module_files() -> list[Path]:
    root = stdlib_dir()
    files = [p for p in root.rglob("*.py") if _is_stdlib_module_file(p.relative_to(root))]
    return sorted(files)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return f"{node.name}({ast.unparse(node.args)})"
    except Exception:  # ast.unparse is robust, but a doc collector must never die on one file
        return f"{node.name}(...)"


def module_docstrings(source: str, module: str) -> str:
    """One document for a module: its docstring, then each public class/function docstring.

    Headers like `class json.JSONDecoder` keep the text readable and tie each docstring to
    the name it documents, which is what a language model should learn from it.
    """
    tree = ast.parse(source)
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {module}\n\n{doc}")

    def visit(body, prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name.startswith("_") and not (node.name.startswith("__") and node.name.endswith("__")):
                    continue
                d = ast.get_docstring(node)
                if isinstance(node, ast.ClassDef):
                    if d:
                        parts.append(f"class {prefix}{node.name}\n\n{d}")
                    visit(node.body, f"{prefix}{node.name}.")
                elif d:
                    parts.append(f"def {prefix}{_signature(node)}\n\n{d}")

    visit(tree.body, f"{module}.")
    return "\n\n".join(parts)


class StdlibSource(Strict):
    """The embedded default: CPython's own English documentation, read at run time."""

    kind: Literal["stdlib"] = Field("stdlib", description="source kind: CPython's bundled documentation")
    include_topics: bool = Field(True, description="include pydoc_data.topics (the language reference topics of `help()`), one document per topic")
    include_docstrings: bool = Field(True, description="include module/class/function docstrings, one document per stdlib module")
    include_source: bool = Field(False, description="also include the stdlib .py source code, one document per file")
    max_docs: Optional[int] = Field(None, ge=1, description="stop after this many kept documents from this source")
    max_chars: Optional[int] = Field(None, ge=1, description="stop after this many kept characters from this source")

    def label(self) -> str:
        return "stdlib"

    def fingerprint_inputs(self) -> dict:
        # The stdlib only changes with the Python installation.
        return {"python": sys.version, "stdlib": str(stdlib_dir())}

    def documents(self, bad: BadRecords) -> Iterator[str]:
        if self.include_topics:
            from pydoc_data.topics import topics
            for name in sorted(topics):
                yield topics[name]
        root = stdlib_dir()
        if self.include_docstrings or self.include_source:
            for path in stdlib_module_files():
                rel = path.relative_to(root)
                module = ".".join(rel.with_suffix("").parts)
                if module.endswith(".__init__"):
                    module = module[: -len(".__init__")]
                try:
                    source = path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as e:
                    bad.report(str(path), f"unreadable stdlib file ({e})")
                    continue
                if self.include_docstrings:
                    try:
                        yield module_docstrings(source, module)
                    except SyntaxError:
                        pass  # a few stdlib files are templates/py2 leftovers; they are not documentation
                if self.include_source:
                    yield source


# ---------------------------------------------------------------------------------------------
# files: .txt/.md, .jsonl, .parquet on disk


def expand_paths(patterns: list[str]) -> list[Path]:
    """Paths, directories (searched recursively for supported files) and globs -> sorted files."""
    files: list[Path] = []
    for pattern in patterns:
        p = Path(os.path.expanduser(pattern))
        if any(ch in pattern for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(pattern), recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise UserError(f"input glob matched no files: {pattern} (check the pattern in sources[].paths)")
            files.extend(matches)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES)
            if not found:
                raise UserError(f"input directory {p} holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"input path not found: {p} (fix sources[].paths in the corpus config)")
    for f in files:
        if f.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise UserError(f"unsupported input file type: {f} (supported: {', '.join(SUPPORTED_SUFFIXES)})")
        if not os.access(f, os.R_OK):
            raise UserError(f"input file is not readable: {f} (check its permissions)")
    return files


def _looks_binary(head: bytes) -> bool:
    return b"\x00" in head


def read_text_file(path: Path, bad: BadRecords) -> str | None:
    data = path.read_bytes()
    if _looks_binary(data[:8192]):
        bad.report(str(path), "binary file (contains NUL bytes), not text")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad.report(str(path), f"not valid UTF-8 (byte {e.start}); convert it to UTF-8 first")
        return None


def read_jsonl(path: Path, text_field: str, bad: BadRecords) -> Iterator[str]:
    with open(path, "rb") as f:
        head = f.read(8192)
        if _looks_binary(head):
            bad.report(str(path), "binary file (contains NUL bytes), not JSON lines")
            return
        f.seek(0)
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.report(where, "line is not valid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad.report(where, f"not valid JSON ({e.msg})")
                continue
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
                bad.report(where, f"record has no '{text_field}' field (has: {keys}); set text_field to the right key")
                continue
            text = record[text_field]
            if not isinstance(text, str):
                bad.report(where, f"field '{text_field}' is {type(text).__name__}, not a string")
                continue
            yield text


def read_parquet(path: Path, text_field: str, bad: BadRecords) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid & co. for non-parquet bytes
        bad.report(str(path), f"not a readable parquet file ({e})")
        return
    names = pf.schema_arrow.names
    if text_field not in names:
        raise UserError(f"{path}: parquet file has no column '{text_field}' (columns: {', '.join(names)}); "
                        f"set text_field to the right column")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield text


class FilesSource(Strict):
    """Local files: .txt/.md (one document each), .jsonl (one per line), .parquet (one per row)."""

    kind: Literal["files"] = Field("files", description="source kind: local files")
    paths: list[str] = Field(..., min_length=1, description="files, directories (searched recursively) or globs like data/**/*.jsonl")
    text_field: str = Field("text", description="the JSON key (.jsonl) or column (.parquet) that holds the text")
    max_docs: Optional[int] = Field(None, ge=1, description="stop after this many kept documents from this source")
    max_chars: Optional[int] = Field(None, ge=1, description="stop after this many kept characters from this source")

    def label(self) -> str:
        return "files:" + ",".join(self.paths)

    def fingerprint_inputs(self) -> dict:
        out = {}
        for f in expand_paths(self.paths):
            st = f.stat()
            out[str(f.resolve())] = [st.st_size, st.st_mtime_ns]
        return out

    def documents(self, bad: BadRecords) -> Iterator[str]:
        for path in expand_paths(self.paths):
            suffix = path.suffix.lower()
            try:
                if suffix == ".jsonl":
                    yield from read_jsonl(path, self.text_field, bad)
                elif suffix == ".parquet":
                    yield from read_parquet(path, self.text_field, bad)
                else:
                    text = read_text_file(path, bad)
                    if text is not None:
                        yield text
            except OSError as e:
                raise UserError(f"could not read input file {path}: {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------
# hf: Hugging Face datasets, streamed


class HFSource(Strict):
    """A Hugging Face dataset, streamed with `datasets.load_dataset(name, config, split=..., streaming=True)`."""

    kind: Literal["hf"] = Field("hf", description="source kind: a Hugging Face dataset")
    name: str = Field(..., description="dataset name on the Hub (e.g. HuggingFaceFW/fineweb-edu), or a builder such as json/parquet/text with data_files")
    config: Optional[str] = Field(None, description="dataset configuration (subset) name, if the dataset has several")
    split: str = Field("train", description="which split to read")
    data_files: Optional[list[str]] = Field(None, description="files for the json/parquet/text builders (local paths work offline)")
    text_field: str = Field("text", description="the column that holds the text")
    max_docs: Optional[int] = Field(None, ge=1, description="stop after this many kept documents from this source (streaming stops early)")
    max_chars: Optional[int] = Field(None, ge=1, description="stop after this many kept characters from this source")

    def label(self) -> str:
        return f"hf:{self.name}" + (f"/{self.config}" if self.config else "")

    def fingerprint_inputs(self) -> dict:
        out: dict = {"name": self.name, "config": self.config, "split": self.split}
        for f in self.data_files or []:
            p = Path(f)
            if p.is_file():
                st = p.stat()
                out[str(p.resolve())] = [st.st_size, st.st_mtime_ns]
        return out

    def documents(self, bad: BadRecords) -> Iterator[str]:
        for f in self.data_files or []:
            if "://" not in f and not any(ch in f for ch in "*?[") and not Path(f).exists():
                raise UserError(f"data file not found: {f} (fix sources[].data_files)")
        try:
            import datasets
        except ImportError:
            raise UserError("the 'datasets' package is needed for kind: hf sources; pip install datasets") from None
        try:
            ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True,
                                       data_files=self.data_files)
        except Exception as e:  # the hub/network/builder errors are many; all mean "cannot load this"
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"could not load Hugging Face dataset '{self.label()[3:]}' split '{self.split}': {msg} "
                            f"(check the name/config/split, your network, or use kind: files for local data)") from None
        for i, row in enumerate(ds):
            if self.text_field not in row:
                raise UserError(f"Hugging Face dataset '{self.name}' has no column '{self.text_field}' "
                                f"(columns: {', '.join(row)}); set text_field")
            text = row[self.text_field]
            if not isinstance(text, str):
                bad.report(f"{self.label()} row {i}", f"'{self.text_field}' is {type(text).__name__}, not a string")
                continue
            yield text


Source = Annotated[Union[StdlibSource, FilesSource, HFSource], Field(discriminator="kind")]
