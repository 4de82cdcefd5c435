"""LatentReasoner: the part of LLM-TRM that a frozen LLM answers with (phase 3; docs/llm_trm.md).

    from lmlab.models.latent_reasoner import LatentReasoner, load_reasoner
    r = LatentReasoner(compressor, seqtrm, d_model=256, k=4, halt="mse_cosine", threshold=0.95,
                       slots=llm.embed.weight[gap_ids])      # (k, d_model): where training starts
    vectors, h, steps = r(pre, mask)    # pre (B, W, D) left-padded prompt states, mask (B, W)
    # vectors (B, k, d_model): the LLM's input vectors in place of <think> ... </think>'s text
    # h (B, D): the decompressed prediction of the LLM's state at </think>; steps (B,): TRM steps

The chain is the phases before it: the compressor (phase 1) reads the LLM's last-layer prompt
states, the SequenceTRM (phase 2) predicts the compressed state at `</think>`, the transposed
compressor decompresses it, and a projection `Linear(D -> k * d_model)` (with bias) turns it into
k input vectors. The projection's weight starts at zero and its bias at the embeddings of the
tokens an empty thinking block holds (repeated to k), so an untrained reasoner shows the LLM an
empty thinking block, whatever the prompt: exactly the one it knows when k is the block's
length in tokens. Training moves away from there (as LoRA starts at the base model).

The SequenceTRM runs its supervision steps until its halting head stops a row (the rule and
threshold it was trained with; all `n_sup` at most), or exactly `steps` when given (`lmlab
latent` fixes them, lmlab/train/latent.py says why). Only the last step keeps gradients, from
the detached state of the one before, as in training TRMs; the compressor gets gradients
through the context it compresses.

Saved as reasoner.safetensors (every part's weights) and reasoner.json (the parts' configs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from lmlab.models.compressor import DimensionCompressor
from lmlab.models.seqtrm import SequenceTRM, halting

WEIGHTS, META = "reasoner.safetensors", "reasoner.json"


class LatentReasoner(nn.Module):
    def __init__(self, compressor: DimensionCompressor, trm: SequenceTRM, d_model: int, k: int, halt: str,
                 threshold: float, slots: Optional[torch.Tensor] = None, steps: Optional[int] = None):
        super().__init__()
        if trm.cfg.d != compressor.k:
            raise ValueError(f"the SequenceTRM's width {trm.cfg.d} is not the compressor's D'={compressor.k}")
        self.compressor, self.trm = compressor, trm
        self.d_model, self.k, self.halt, self.threshold, self.steps = d_model, k, halt, float(threshold), steps
        self.project = nn.Linear(compressor.d, k * d_model)
        with torch.no_grad():
            self.project.weight.zero_()
            self.project.bias.copy_(slots.reshape(-1) if slots is not None else torch.zeros(k * d_model))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def reason(self, pre: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(compressed prediction (B, D'), supervision steps taken (B,)) of left-padded prompt states."""
        trm = self.trm
        x = self.compressor.compress(pre)
        y, z = trm.initial_state(x, mask)
        b, n_sup = x.shape[0], self.steps or trm.cfg.n_sup
        ys, zs = [y], [z]
        stop = torch.full((b,), n_sup, dtype=torch.long, device=x.device)
        with torch.no_grad():  # find each row's halting step; the state before it is kept
            for s in range(1, n_sup):
                (y, z), _, q = trm.supervision_step(x.detach(), mask, y, z)
                if self.steps is None:
                    stop = torch.where((stop == n_sup) & halting(q.float(), self.halt, self.threshold),
                                       torch.full_like(stop, s), stop)
                    if bool((stop < n_sup).all()):
                        break
                ys.append(y)
                zs.append(z)
        rows = torch.arange(b, device=x.device)
        y0 = torch.stack(ys)[(stop - 1).clamp_max(len(ys) - 1), rows]
        z0 = torch.stack(zs)[(stop - 1).clamp_max(len(zs) - 1), rows]
        _, pred, _ = trm.supervision_step(x, mask, y0, z0)  # the halting step again, with gradients
        return pred, stop

    def forward(self, pre: torch.Tensor, mask: torch.Tensor):
        """(input vectors (B, k, d_model), decompressed prediction (B, D), steps (B,))."""
        pred, steps = self.reason(pre, mask)
        h = self.compressor.decompress(pred)
        return self.project(h).view(-1, self.k, self.d_model), h, steps

    def config(self) -> dict:
        return {"d": self.compressor.d, "d_prime": self.compressor.k, "d_model": self.d_model, "k": self.k,
                "halt": self.halt, "threshold": self.threshold, "steps": self.steps,
                "seqtrm": self.trm.cfg.model_dump(mode="json")}


def build_reasoner(config: dict) -> LatentReasoner:
    """An untrained reasoner of `config` (LatentReasoner.config()'s dict)."""
    return LatentReasoner(DimensionCompressor(config["d"], config["d_prime"]), SequenceTRM(config["seqtrm"]),
                          config["d_model"], config["k"], config["halt"], config["threshold"], steps=config["steps"])


def reasoner_from_seqtrm(seqtrm_dir: str | Path, llm, llm_fingerprint: Optional[str], k: int,
                         slots: Optional[torch.Tensor] = None, steps: Optional[int] = None):
    """(a reasoner started from a `lmlab seqtrm` run and the compressor it was trained on, the
    SequenceTRM weights' sha256); UserError when it read another LLM's states."""
    from safetensors.torch import load_file

    from lmlab import artifacts
    from lmlab.errors import UserError
    from lmlab.models.compressor import load_compressor

    d = Path(seqtrm_dir)
    artifacts.require_artifact(d, "seqtrm", "SequenceTRM")
    meta = json.loads((d / "seqtrm.json").read_text())
    if meta.get("llm_fingerprint") != llm_fingerprint:
        raise UserError(f"{d} was trained on the states of another LLM (fingerprint "
                        f"{str(meta.get('llm_fingerprint'))[:12]}) than this one ({str(llm_fingerprint)[:12]}); use "
                        f"the SequenceTRM of the same LLM")
    comp, _ = load_compressor(meta["compressor"], meta["d_prime"])
    trm = SequenceTRM(meta["config"])
    trm.load_state_dict(load_file(str(d / "seqtrm.safetensors")))
    threshold = json.loads((d / "results.json").read_text()).get("threshold", 0.7)
    r = LatentReasoner(comp, trm, llm.cfg.d_model, k, meta["halt"], threshold, slots, steps)
    return r, artifacts.sha256_file(d / "seqtrm.safetensors")


def save_reasoner(out: Path, reasoner: LatentReasoner, meta: dict) -> None:
    """reasoner.safetensors and reasoner.json (the config plus `meta`) in `out`."""
    from safetensors.torch import save_file

    from lmlab.artifacts import write_json_atomic

    save_file({k: v.detach().float().contiguous().cpu() for k, v in reasoner.state_dict().items()},
              str(Path(out) / WEIGHTS))
    write_json_atomic(Path(out) / META, {**meta, "config": reasoner.config()})


def load_reasoner(run_dir: str | Path) -> tuple[LatentReasoner, dict]:
    """The reasoner of a `lmlab latent` run and its reasoner.json."""
    from safetensors.torch import load_file

    from lmlab.errors import UserError

    d = Path(run_dir)
    try:
        meta = json.loads((d / META).read_text())
        weights = load_file(str(d / WEIGHTS))
    except (OSError, ValueError) as e:
        raise UserError(f"{d} is not a latent reasoner ({META} and {WEIGHTS}; `lmlab latent` writes them): "
                        f"{e}") from None
    r = build_reasoner(meta["config"])
    r.load_state_dict(weights)
    return r, meta
