"""Tokenize a corpus and pack it into fixed-length rows in numpy memmap shards.

    lmlab pack corpus=runs/corpus tokenizer=runs/tokenizer out=runs/packed seq_len=1024
    python -c "from lmlab.data import pack; pack.run(pack.Config(corpus='runs/c', tokenizer='runs/t', out='runs/p', seq_len=64))"

Each document becomes `[bos] + tokens + [eos]` (bos only with add_bos) and documents are
concatenated and cut into rows of `seq_len` tokens; the tail that does not fill a row is
dropped and counted. Documents, not rows, are split between train and val (a seeded
choice of document indices, so the split is deterministic and no document straddles the
two). Rows go to `train_00000.bin`, `val_00000.bin`, ... (raw uint16/uint32, shape
(rows, seq_len)); read them with `lmlab.data.loader.PackedDataset`.

Memory stays flat as the corpus grows: corpus shards are read one at a time, a pool of
`workers` processes tokenizes batches of documents in order, and full rows are appended to
the open shard file as soon as they exist; at most one row's worth of tokens is held per split.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
from pydantic import Field

from lmlab import artifacts
from lmlab.config import Strict
from lmlab.data.corpus import iter_corpus_texts
from lmlab.data.tokenizer import Tokenizer
from lmlab.errors import UserError
from lmlab.runtime import progress

KIND = "packed"
BATCH_DOCS = 64  # documents per task sent to a worker: large enough to amortise IPC


class Config(Strict):
    corpus: str = Field("runs/corpus", description="corpus artifact to tokenize")
    tokenizer: str = Field("runs/tokenizer", description="tokenizer artifact to tokenize with, or a model run "
                           "directory (an imported checkpoint, say): its own tokenizer")
    out: str = Field("runs/packed", description="output packed artifact directory")
    seq_len: int = Field(1024, ge=2, description="tokens per packed row (training uses row[:-1] -> row[1:])")
    add_bos: bool = Field(True, description="start every document with the bos token (eos always ends it)")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of documents that go to the val split")
    seed: int = Field(0, description="seed of the train/val document split")
    rows_per_shard: int = Field(65536, ge=1, description="rows per .bin shard file")
    workers: int = Field(min(4, os.cpu_count() or 1), ge=1, description="tokenizer processes")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids < 65536 at half the disk and bandwidth of uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def val_mask(n_docs: int, n_val: int, seed: int) -> np.ndarray:
    """Which document indices are val: a seeded choice, the same for the same (n_docs, seed)."""
    mask = np.zeros(n_docs, dtype=bool)
    if n_val:
        mask[np.random.default_rng(seed).permutation(n_docs)[:n_val]] = True
    return mask


class ShardWriter:
    """Appends full rows to `{split}_NNNNN.bin`, starting a new file every `rows_per_shard` rows."""

    def __init__(self, out: Path, split: str, seq_len: int, dtype: np.dtype, rows_per_shard: int) -> None:
        self.out, self.split, self.seq_len, self.dtype, self.rows_per_shard = out, split, seq_len, dtype, rows_per_shard
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.rows = 0
        self.file = None
        self.rows_in_file = 0
        self.shards = 0

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.n_pending += len(tokens)
        if self.n_pending >= self.seq_len * 16:
            self._flush_rows()

    def _flush_rows(self) -> None:
        buf = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        n_rows = len(buf) // self.seq_len
        rest = buf[n_rows * self.seq_len:]
        self.pending, self.n_pending = ([rest], len(rest)) if len(rest) else ([], 0)
        rows = buf[: n_rows * self.seq_len].reshape(n_rows, self.seq_len)
        while len(rows):
            if self.file is None or self.rows_in_file >= self.rows_per_shard:
                if self.file is not None:
                    self.file.close()
                self.file = open(self.out / f"{self.split}_{self.shards:05d}.bin", "wb")
                self.shards += 1
                self.rows_in_file = 0
            take = min(len(rows), self.rows_per_shard - self.rows_in_file)
            rows[:take].astype(self.dtype).tofile(self.file)
            self.rows_in_file += take
            self.rows += take
            rows = rows[take:]

    def close(self) -> int:
        """Write what fills whole rows; return the number of dropped tail tokens."""
        if self.n_pending:
            self._flush_rows()
        if self.file is not None:
            self.file.close()
        return self.n_pending


# Worker processes: each loads the tokenizer once (pool initializer) and encodes batches.
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _worker_tokenizer = Tokenizer.load(tokenizer_dir)
    _worker_tokenizer._threads = 1


def _encode_batch(texts: list[str]) -> tuple[list[np.ndarray], list[int], list[int]]:
    """ids, UTF-8 bytes and special-token strings (which encode as the specials) per document."""
    tok = _worker_tokenizer
    ids = tok.encode_batch(texts)
    return ([np.asarray(x, dtype=np.uint32) for x in ids], [len(t.encode("utf-8", "surrogatepass")) for t in texts],
            [tok.count_specials(t) for t in texts])


def _batches(corpus: Path):
    batch: list[str] = []
    for text in iter_corpus_texts(corpus):
        batch.append(text)
        if len(batch) == BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def pack_documents(cfg: Config, tok: Tokenizer, n_docs: int, is_val: np.ndarray, out: Path) -> dict:
    """One streaming pass: tokenize every document and write both splits' shards into `out`."""
    dtype = token_dtype(tok.vocab_size)
    writers = {s: ShardWriter(out, s, cfg.seq_len, dtype, cfg.rows_per_shard) for s in ("train", "val")}
    counts = {s: {"documents": 0, "bytes": 0, "doc_tokens": 0} for s in ("train", "val")}
    prefix = np.asarray([tok.bos_id] if cfg.add_bos else [], dtype=np.uint32)
    suffix = np.asarray([tok.eos_id], dtype=np.uint32)
    pool = None
    if cfg.workers > 1 and n_docs > BATCH_DOCS:
        pool = mp.get_context("fork" if hasattr(os, "fork") else "spawn").Pool(
            cfg.workers, initializer=_init_worker, initargs=(str(tok.path),))
        results = pool.imap(_encode_batch, _batches(Path(cfg.corpus)), chunksize=1)  # imap keeps order
    else:
        _init_worker(str(tok.path))
        results = map(_encode_batch, _batches(Path(cfg.corpus)))
    bar = progress(n_docs, desc="pack", unit="doc")
    index = 0
    special_strings, special_docs = 0, 0
    try:
        for ids_list, byte_lens, specials in results:
            special_strings += sum(specials)
            special_docs += sum(1 for n in specials if n)
            for ids, n_bytes in zip(ids_list, byte_lens):
                split = "val" if is_val[index] else "train"
                writers[split].add(np.concatenate([prefix, ids, suffix]))
                c = counts[split]
                c["documents"] += 1
                c["bytes"] += n_bytes
                c["doc_tokens"] += len(ids) + len(prefix) + 1
                index += 1
            bar.update(len(ids_list))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    stats = {}
    for s, w in writers.items():
        dropped = w.close()
        c = counts[s]
        kept = w.rows * cfg.seq_len
        # bytes are scaled to the kept tokens so that tokens/bytes (bits per byte) stay honest
        # after the dropped tail.
        stats.update({f"{s}_rows": w.rows, f"{s}_tokens": kept, f"{s}_documents": c["documents"],
                      f"{s}_bytes": round(c["bytes"] * kept / c["doc_tokens"]) if c["doc_tokens"] else 0,
                      f"{s}_shards": w.shards, f"{s}_dropped_tail_tokens": dropped})
    stats["dropped_tail_tokens"] = stats["train_dropped_tail_tokens"] + stats["val_dropped_tail_tokens"]
    stats["total_tokens"] = counts["train"]["doc_tokens"] + counts["val"]["doc_tokens"]
    stats["documents"] = index
    # Text that spells a special token (`<|eos|>`) encodes as that token, as the exported HF
    # tokenizer does (docs/data.md, "Special tokens in text"); say how often that happened.
    stats["special_token_strings"] = special_strings
    stats["documents_with_special_token_strings"] = special_docs
    return stats


def run(cfg: Config) -> Path:
    out = Path(cfg.out)
    artifacts.check_out(out, KIND, "pack", inputs={"corpus": cfg.corpus, "tokenizer": cfg.tokenizer})
    corpus_m = artifacts.require_artifact(cfg.corpus, "corpus", what="corpus")
    tok_dir = Path(cfg.tokenizer)
    tok_m = artifacts.require_artifact(tok_dir, ("tokenizer", "model"), what="tokenizer")
    if tok_m["kind"] == "model":  # a model run (an imported checkpoint, say): text in its own tokens
        tok_dir = tok_dir / "tokenizer"
        tok = Tokenizer.load(tok_dir)
    else:
        tok = Tokenizer.load(tok_dir)
        if tok_m.get("tokenizer_sha256") != tok.sha256:
            raise UserError(f"tokenizer {cfg.tokenizer}: manifest sha256 {tok_m.get('tokenizer_sha256')} differs from "
                            f"its model file {tok.sha256}; re-run `lmlab tokenizer`")
    config = cfg.model_dump(mode="json", exclude={"workers"})  # workers do not change the output
    inputs = {"corpus": {"path": str(cfg.corpus), "fingerprint": corpus_m["fingerprint"]},
              "tokenizer": {"path": str(tok_dir), "fingerprint": tok.sha256}}
    fp = artifacts.stage_fingerprint(KIND, config, {k: v["fingerprint"] for k, v in inputs.items()})
    if artifacts.is_up_to_date(out, fp):
        print(f"pack: up to date ({out}), nothing to do")
        return out

    n_docs = int(corpus_m.get("stats", {}).get("documents", 0))
    if n_docs < 2:
        raise UserError(f"corpus {cfg.corpus} has {n_docs} document(s); pack splits train/val by document and needs at "
                        f"least 2 (add text, or split a large file into several documents)")
    n_val = max(1, round(n_docs * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    timer = artifacts.Timer()
    try:
        with artifacts.atomic_dir(out) as tmp:
            while True:
                with timer("tokenize_and_pack"):
                    for f in tmp.glob("*.bin"):
                        f.unlink()
                    stats = pack_documents(cfg, tok, n_docs, val_mask(n_docs, n_val, cfg.seed), tmp)
                # A small corpus whose val documents do not fill one row: give val more
                # documents (deterministically) rather than hand training an empty val split.
                if n_val == 0 or stats["val_rows"] > 0 or n_val * 2 >= n_docs or stats["total_tokens"] < 2 * cfg.seq_len:
                    break
                n_val = min(n_val * 2, n_docs - 1)
            if stats["train_rows"] == 0 or (n_val and stats["val_rows"] == 0):
                raise UserError(f"corpus {cfg.corpus} is too small for seq_len={cfg.seq_len}: {stats['total_tokens']:,} tokens "
                                f"in {n_docs} documents give {stats['train_rows']} train and {stats['val_rows']} val rows; "
                                f"each split needs at least one full row. Lower seq_len (e.g. seq_len="
                                f"{max(2, stats['total_tokens'] // 8)}) or add text")
            stats.update({"seq_len": cfg.seq_len, "dtype": str(token_dtype(tok.vocab_size)), "vocab_size": tok.vocab_size,
                          "val_documents_chosen": n_val})
            artifacts.write_manifest(tmp, KIND, config, fp, inputs=inputs, verb="pack", tokenizer_sha256=tok.sha256,
                                     timings=timer.total(), stats=stats)
    except OSError as e:
        raise artifacts.disk_error(e, out) from None
    secs = timer.timings["tokenize_and_pack"]
    print(f"pack: {stats['train_rows']:,} train rows ({stats['train_tokens']:,} tokens), {stats['val_rows']:,} val rows "
          f"({stats['val_tokens']:,} tokens), {stats['dropped_tail_tokens']} tail tokens dropped, "
          f"{stats['total_tokens'] / max(secs, 1e-9):,.0f} tokens/s -> {out}")
    if stats["special_token_strings"]:
        print(f"pack: note: {stats['documents_with_special_token_strings']:,} document(s) spell special tokens "
              f"({stats['special_token_strings']:,} times, e.g. `<|eos|>`); each became that token, as the exported "
              f"tokenizer reads it (docs/data.md, \"Special tokens in text\")")
    return out
