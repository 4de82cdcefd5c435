"""Collect, clean, deduplicate and shard raw text into a corpus artifact.

    lmlab corpus                                   # CPython's own docs (the embedded default)
    lmlab corpus --analyze-only                    # table of docs/chars/tokens per source, writes nothing
    lmlab corpus sources='[{kind: files, paths: [data/*.jsonl]}]' out=runs/corpus
    python -c "from lmlab.data import corpus; corpus.run(corpus.Config(out='runs/c', sources=[{'kind': 'stdlib', 'max_docs': 100}]))"

Each source (see lmlab/data/sources.py) yields documents; each document is Unicode-normalised,
line endings unified, stripped, dropped when shorter than `min_chars`, and dropped when an
exact duplicate of one already kept (sha256 of the cleaned text, across all sources). Kept
documents go to `shard_00000.jsonl`, ... (`{"text", "source"}` per line, `docs_per_shard`
each). The manifest holds per-source statistics. Same config + same inputs -> no-op.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path
from typing import Literal

from pydantic import Field

from lmlab import artifacts
from lmlab.config import Strict
from lmlab.data.sources import BadRecords, FilesSource, HFSource, Source, StdlibSource
from lmlab.errors import UserError
from lmlab.runtime import progress

KIND = "corpus"
CHARS_PER_TOKEN = 4  # the usual rule of thumb for English with a ~32k BPE vocabulary


def _source_options() -> str:
    """The per-kind options, for `lmlab corpus --help` (the sources list is not flattened there)."""
    return "; ".join(f"{m.model_fields['kind'].default}: " + ", ".join(k for k in m.model_fields if k != "kind")
                     for m in (StdlibSource, FilesSource, HFSource))


class Config(Strict):
    out: str = Field("runs/corpus", description="output corpus artifact directory")
    sources: list[Source] = Field(default_factory=lambda: [StdlibSource()],
                                  description="list of sources, each {kind: ..., options}; options per kind: "
                                              + _source_options() + " (meanings in docs/data.md)")
    normalize: Literal["NFC", "NFKC", "none"] = Field("NFC", description="Unicode normalisation applied to every document")
    min_chars: int = Field(32, ge=0, description="drop documents shorter than this many characters after cleaning")
    dedup: bool = Field(True, description="drop exact duplicate documents (by hash of the cleaned text, across sources)")
    docs_per_shard: int = Field(10_000, ge=1, description="documents per output shard_NNNNN.jsonl")
    on_bad_record: Literal["skip", "stop"] = Field("skip", description="a bad JSON line or non-UTF-8/binary file: skip it with a warning, or stop with an error")
    analyze_only: bool = Field(False, description="only print documents/characters/estimated tokens per source; write nothing")


FLAGS = {"--analyze-only": ("analyze_only", True, "print per-source statistics as a table and write nothing")}


def clean_text(text: str, normalize: str) -> str:
    if normalize != "none":
        text = unicodedata.normalize(normalize, text)
    # Windows/old-Mac line endings would otherwise become distinct tokens for the same thing.
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def new_stats(label: str) -> dict:
    return {"source": label, "documents": 0, "characters": 0, "bytes": 0, "dropped_empty": 0,
            "dropped_duplicates": 0, "bad_records": 0, "estimated_tokens": 0}


def iter_clean_documents(cfg: Config, stats: list[dict], bad: BadRecords):
    """Yield (source_label, text) for every kept document, updating `stats` in place."""
    seen: set[bytes] = set()
    for source, st in zip(cfg.sources, stats):
        before_bad = bad.count
        for raw in source.documents(bad):
            if (source.max_docs and st["documents"] >= source.max_docs) or \
               (source.max_chars and st["characters"] >= source.max_chars):
                break
            text = clean_text(raw, cfg.normalize)
            if len(text) < max(cfg.min_chars, 1):
                st["dropped_empty"] += 1
                continue
            if cfg.dedup:
                digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:16]
                if digest in seen:
                    st["dropped_duplicates"] += 1
                    continue
                seen.add(digest)
            st["documents"] += 1
            st["characters"] += len(text)
            st["bytes"] += len(text.encode("utf-8", "surrogatepass"))
            yield st["source"], text
        st["bad_records"] = bad.count - before_bad
        st["estimated_tokens"] = st["characters"] // CHARS_PER_TOKEN


def format_table(stats: list[dict]) -> str:
    cols = ["source", "documents", "characters", "estimated_tokens", "dropped_empty", "dropped_duplicates", "bad_records"]
    total = {c: sum(s[c] for s in stats) for c in cols[1:]}
    rows = [[s["source"]] + [f"{s[c]:,}" for c in cols[1:]] for s in stats]
    rows.append(["total"] + [f"{total[c]:,}" for c in cols[1:]])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _warn_bad(bad: BadRecords) -> None:
    if bad.count:
        print(f"corpus: warning: skipped {bad.count} bad record(s); first: " + "; ".join(bad.examples))


def _empty_error(stats: list[dict], cfg: Config) -> UserError:
    said = "; ".join(f"{s['source']}: {s['documents']} kept, {s['dropped_empty']} shorter than min_chars={cfg.min_chars}, "
                     f"{s['dropped_duplicates']} duplicates, {s['bad_records']} bad records" for s in stats)
    return UserError(f"the corpus is empty after cleaning ({said}); add input text or lower min_chars")


def run(cfg: Config) -> Path:
    out = Path(cfg.out)
    if not cfg.sources:
        raise UserError("no sources given; set sources, e.g. sources='[{kind: stdlib}]'")
    stats = [new_stats(s.label()) for s in cfg.sources]
    bad = BadRecords(cfg.on_bad_record)

    if cfg.analyze_only:
        for _ in iter_clean_documents(cfg, stats, bad):
            pass
        _warn_bad(bad)
        print(format_table(stats))
        return out

    artifacts.check_out(out, KIND, "corpus")
    config = cfg.model_dump(mode="json", exclude={"analyze_only"})
    inputs = {f"{i}:{s.label()}": s.fingerprint_inputs() for i, s in enumerate(cfg.sources)}
    fp = artifacts.stage_fingerprint(KIND, config, {"sources": artifacts.fingerprint(inputs)})
    if artifacts.is_up_to_date(out, fp):
        print(f"corpus: up to date ({out}), nothing to do")
        return out

    timer = artifacts.Timer()
    try:
        with artifacts.atomic_dir(out) as tmp, timer("collect"):
            shard, n_in_shard, n_shards, f = 0, 0, 0, None
            bar = progress(None, desc="corpus", unit="doc")
            try:
                for label, text in iter_clean_documents(cfg, stats, bad):
                    if f is None or n_in_shard >= cfg.docs_per_shard:
                        if f is not None:
                            f.close()
                            shard += 1
                        f = open(tmp / f"shard_{shard:05d}.jsonl", "w", encoding="utf-8")
                        n_in_shard, n_shards = 0, n_shards + 1
                    f.write(json.dumps({"text": text, "source": label}, ensure_ascii=False) + "\n")
                    n_in_shard += 1
                    bar.update(1)
            finally:
                bar.close()
                if f is not None:
                    f.close()
            total = {k: sum(s[k] for s in stats) for k in
                     ("documents", "characters", "bytes", "dropped_empty", "dropped_duplicates", "bad_records", "estimated_tokens")}
            if total["documents"] == 0:
                raise _empty_error(stats, cfg)
            artifacts.write_manifest(tmp, KIND, config, fp, verb="corpus",
                                     inputs={"sources": {"path": None, "fingerprint": inputs}},
                                     timings=timer.total(), stats={**total, "shards": n_shards, "per_source": stats})
    except OSError as e:
        raise artifacts.disk_error(e, out) from None
    _warn_bad(bad)
    print(format_table(stats))
    print(f"corpus: wrote {total['documents']:,} documents ({total['characters']:,} chars) in {n_shards} shard(s) to {out}")
    return out


def corpus_shards(corpus_dir: str | Path) -> list[Path]:
    """The shard files of a corpus artifact, in order."""
    return sorted(Path(corpus_dir).glob("shard_*.jsonl"))


def iter_corpus_texts(corpus_dir: str | Path):
    """Stream the documents of a corpus artifact, one shard open at a time."""
    for shard in corpus_shards(corpus_dir):
        with open(shard, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]
