"""DimensionCompressor: a tied linear map of an LLM's hidden states from D to D' dimensions and
back (LLM-TRM's phase 1), and the linear-algebra references it is judged against.

    from lmlab.models.compressor import DimensionCompressor, reconstruction_metrics, subspace
    c = DimensionCompressor(d=256, k=64)           # Linear(256 -> 64), no bias, orthogonal rows
    z = c.compress(h)                              # (..., 64)
    h_hat = c.decompress(z)                        # (..., 256), with the transposed weight
    m = reconstruction_metrics(h_val, h_hat, mean)  # mse, relative error, cosine, variance explained

The compressor is `z = h W^T` and `h_hat = z W` with W of shape (D', D) and no bias, so its
reconstruction `h W^T W` is linear and of rank at most D'. The best any rank-D' linear map can do
on a set of states (least squares, Eckart-Young) is the projection onto their top D' right
singular vectors, uncentred: `subspace(X, k, centre=False)`. A tied compressor with orthonormal
rows reaches exactly that projection, so it is the bound to report how close training gets.
PCA proper (`centre=True`) subtracts the mean first: an affine map, outside the compressor's
class, shown beside it because hidden states are far from centred.

Saved as `compressor.safetensors` (one weight per D', `d{k}.weight`) and `compressor.json`
(D, the D' list, the LLM it reads; lmlab/train/compressor.py writes both).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS = "compressor.safetensors"
META = "compressor.json"


class DimensionCompressor(nn.Module):
    """Bias-free Linear(D -> D') with orthogonal initialisation; decompression is its transpose."""

    def __init__(self, d: int, k: int, generator: Optional[torch.Generator] = None):
        super().__init__()
        if not 0 < k <= d:
            raise ValueError(f"D'={k} must be in [1, D={d}]")
        self.d, self.k = d, k
        self.weight = nn.Parameter(torch.empty(k, d))
        with torch.no_grad():  # orthonormal rows: the reconstruction starts as a projection
            q, r = torch.linalg.qr(torch.randn(d, k, generator=generator))
            self.weight.copy_((q * torch.sign(torch.diagonal(r))).T)

    def compress(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight.T

    def decompress(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decompress(self.compress(h))

    def num_params(self) -> int:
        return self.weight.numel()


def subspace(x: torch.Tensor, k: int, centre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(basis (k, D), offset (D,)) of the best rank-k reconstruction of the rows of `x` in float64:
    uncentred (offset 0, the optimum of any linear map) or PCA (offset = the mean)."""
    x = x.double()
    offset = x.mean(0) if centre else torch.zeros(x.shape[1], dtype=x.dtype)
    # the Gram matrix is D x D whatever the number of states: its eigenvectors are the right singular vectors
    gram = (x - offset).T @ (x - offset)
    _, vecs = torch.linalg.eigh(gram)
    return vecs[:, -k:].flip(-1).T.contiguous(), offset


def project(x: torch.Tensor, basis: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Reconstruction of `x` from its coordinates in `basis` (rows orthonormal) around `offset`."""
    xd = x.double() - offset
    return ((xd @ basis.T) @ basis + offset).to(x.dtype)


@torch.no_grad()
def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor, mean: torch.Tensor) -> dict:
    """MSE (per dimension), relative error ||x - x_hat||^2 / ||x||^2, mean per-state cosine and
    variance explained 1 - SSE / sum ||x - mean||^2 (`mean`: the training states' mean)."""
    x, x_hat, mean = x.double(), x_hat.double(), mean.double()
    sse = (x - x_hat).pow(2).sum()
    return {"mse": float(sse / x.numel()), "relative_error": float(sse / x.pow(2).sum()),
            "cosine": float(F.cosine_similarity(x, x_hat, dim=-1).mean()),
            "variance_explained": float(1.0 - sse / (x - mean).pow(2).sum())}


def save_compressors(out: Path, compressors: dict[int, DimensionCompressor], meta: dict) -> None:
    """The weights of every D' in one safetensors file, and compressor.json (`meta` plus D and D's)."""
    from safetensors.torch import save_file

    from lmlab.artifacts import write_json_atomic

    first = next(iter(compressors.values()))
    save_file({f"d{k}.weight": c.weight.detach().float().contiguous() for k, c in compressors.items()},
              str(out / WEIGHTS))
    write_json_atomic(out / META, {**meta, "d": first.d, "dims": sorted(compressors)})


def load_compressor(run_dir: str | Path, k: Optional[int] = None) -> tuple[DimensionCompressor, dict]:
    """The compressor of width `k` (default: the widest) of a `lmlab compressor` run, and its meta."""
    from safetensors.torch import load_file

    from lmlab.errors import UserError

    d = Path(run_dir)
    try:
        meta = json.loads((d / META).read_text())
        weights = load_file(str(d / WEIGHTS))
    except (OSError, ValueError) as e:
        raise UserError(f"{d} is not a compressor run ({META} and {WEIGHTS}; `lmlab compressor` writes them): "
                        f"{e}") from None
    k = max(meta["dims"]) if k is None else k
    if k not in meta["dims"]:
        raise UserError(f"{d} has no compressor of D'={k}; it has D'={', '.join(map(str, meta['dims']))}")
    c = DimensionCompressor(meta["d"], k)
    with torch.no_grad():
        c.weight.copy_(weights[f"d{k}.weight"])
    return c, meta
