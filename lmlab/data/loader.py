"""Read packed token shards (written by `lmlab pack`) without loading them into memory.

    from lmlab.data.loader import PackedDataset, check_tokenizer
    ds = PackedDataset("runs/packed", "train")
    check_tokenizer(ds.manifest, tokenizer)       # refuse data made with another tokenizer
    batch = ds.rows([0, 5, 9])                    # int64 array (3, seq_len)

Each `{split}_NNNNN.bin` is memory-mapped read-only; `rows(indices)` gathers rows across
shards by global row index, so a sampler can pick any rows without reading the rest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmlab import artifacts
from lmlab.errors import UserError


class PackedDataset:
    """The rows of one split of a packed artifact: `len()`, `.seq_len`, `rows(indices)`."""

    def __init__(self, path: str | Path, split: str = "train") -> None:
        if split not in ("train", "val"):
            raise UserError(f"unknown split {split!r}; valid: train, val")
        self.path = Path(path)
        self.split = split
        self.manifest = artifacts.require_artifact(self.path, "packed", what="packed data")
        stats = self.manifest["stats"]
        self.seq_len: int = int(stats["seq_len"])
        self.dtype = np.dtype(stats["dtype"])
        self.tokenizer_sha256: str = self.manifest["tokenizer_sha256"]
        self.shards = [np.memmap(f, dtype=self.dtype, mode="r").reshape(-1, self.seq_len)
                       for f in sorted(self.path.glob(f"{split}_*.bin"))]
        # offsets[i] = first global row of shard i; searchsorted maps row -> shard.
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        expected = int(stats.get(f"{split}_rows", self.offsets[-1]))
        if self.offsets[-1] != expected:
            raise UserError(f"packed data {self.path}: {split} shards hold {self.offsets[-1]} rows but the manifest says "
                            f"{expected}; the artifact is damaged, re-run `lmlab pack`")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def tokens(self) -> int:
        return len(self) * self.seq_len

    @property
    def bytes(self) -> int:
        """UTF-8 bytes of the text behind this split's tokens (for bits per byte)."""
        return int(self.manifest["stats"].get(f"{self.split}_bytes", 0))

    def rows(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for {self.split} split with {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        out = np.empty((len(idx), self.seq_len), dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(shard_of):
            sel = shard_of == s
            out[sel] = self.shards[s][idx[sel] - self.offsets[s]]
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        return self.rows([i])[0]


def check_tokenizer(packed_manifest: dict, tokenizer) -> None:
    """Refuse to combine packed data with a tokenizer other than the one that made it."""
    want = packed_manifest.get("tokenizer_sha256")
    have = getattr(tokenizer, "sha256", tokenizer)
    if want != have:
        data_tok = packed_manifest.get("inputs", {}).get("tokenizer", {}).get("path", "?")
        tok_path = getattr(tokenizer, "path", "?")
        raise UserError(f"tokenizer mismatch: the packed data was made with tokenizer {data_tok} (sha256 {want}) but the "
                        f"tokenizer given is {tok_path} (sha256 {have}); re-run `lmlab pack` with this tokenizer or use "
                        f"the one the data was packed with")
