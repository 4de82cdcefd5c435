"""A scorer: a language-model trunk with a scalar head (the outcome verifier and the reward model).

    from lmlab.models.scorer import ScorerModel, save_scorer, load_scorer
    scorer = ScorerModel(trunk)                  # any family meeting the model contract
    scores = scorer(idx)                         # (B, T): a score after every prefix idx[:, :t+1]
    save_scorer(scorer, "runs/verifier", {"kind": "verifier", "template": "chatml", ...}, tokenizer)
    scorer, tokenizer, meta = load_scorer("runs/verifier")

The score at position t is `head(trunk.hidden(idx)[:, t])`: a linear map of the final hidden
state (after the final norm, the family contract's `hidden`), so it reads the whole prefix
up to and including token t. Stages read it where they need it: at a reply's last token
(its end-of-turn marker) for an outcome score or a reward, at every reply token for the
token-level verifier (lmlab.train.scorer_losses).

The head is `nn.Linear(d_model, 1)` with weight and bias initialised to zero, so every score
starts at exactly 0: a verifier starts at p = σ(0) = 0.5 for every input (the loss is log 2
whatever the trunk, the uninformed prior) and a reward model gives every reply the same
reward, so the first updates are not spent undoing a random projection of the hidden state;
the trunk's gradient is zero on the first step only (it flows through the head's weight)
and the trunk starts learning as soon as the head has a direction. The head is computed in
float32 even under bf16 autocast: a Bradley-Terry loss depends on small differences of two
rewards, which bf16's 8-bit mantissa would round (the head is one dot product per token).

Directory layout (`save_scorer`; `lmlab verifier` and `lmlab reward` write it, with their
manifest, metrics and checkpoints):

    model.safetensors, model.json  the trunk, written by lmlab.models.save_model: an ordinary
                                   model directory (LoRA adapters merged in) that other tools
                                   read with load_weights
    head.safetensors               {"weight": (1, d_model), "bias": (1,)}
    scorer.json                    {"kind": "verifier" | "reward", "template", "level":
                                   "outcome" | "token", "tokenizer_sha256", "max_len",
                                   "d_model", "score": "probability" | "reward", "version"}
    tokenizer/                     a copy of the tokenizer (its sha256 is in scorer.json)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lmlab.errors import UserError

SCORER_FILE = "scorer.json"
HEAD_FILE = "head.safetensors"
KINDS = ("verifier", "reward")
LEVELS = ("outcome", "token")
VERSION = 1


def _base(model: nn.Module) -> nn.Module:
    """The family's model inside a PEFT (LoRA) wrapper; the model itself otherwise."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


class ScorerModel(nn.Module):
    """trunk (any LanguageModel) + a zero-initialised scalar head; forward(idx) -> (B, T) scores."""

    def __init__(self, trunk: nn.Module, d_model: Optional[int] = None) -> None:
        super().__init__()
        self.trunk = trunk
        if d_model is None:
            d_model = getattr(getattr(_base(trunk), "cfg", None), "d_model", None)
        if d_model is None:  # a family whose config does not name its width: measure it
            with torch.no_grad():
                d_model = int(trunk.hidden(torch.zeros(1, 1, dtype=torch.long)).shape[-1])
        self.d_model = int(d_model)
        self.head = nn.Linear(self.d_model, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        # The trunk's blocks, where lmlab.train.parallelize looks for them (FSDP per block,
        # activation checkpointing). Set around nn.Module's registration: registered, they would
        # appear twice in state_dict() (trunk.blocks.* and blocks.*), and checkpoints, the EMA and
        # the optimizer would see two names for one tensor.
        blocks = getattr(_base(trunk), "blocks", None)
        if blocks is not None:
            object.__setattr__(self, "blocks", blocks)

    @property
    def max_context(self) -> Optional[int]:
        return getattr(self.trunk, "max_context", None)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.trunk.hidden(idx)
        with torch.autocast(h.device.type, enabled=False):  # float32 head: see the module docstring
            return self.head(h.float()).squeeze(-1)

    def freeze_unused(self) -> list[str]:
        """Freeze trunk parameters the scores never use (an untied LM output head); -> their names.

        Found by one tiny forward/backward through the trunk rather than by name, so any family
        works. DDP requires every trainable parameter to receive a gradient in every step, and
        an optimizer would otherwise apply weight decay to weights nothing trains.
        """
        params = [(n, p) for n, p in self.trunk.named_parameters() if p.requires_grad]
        saved = {id(p): p.grad for _, p in params}
        for _, p in params:
            p.grad = None
        device = next(self.trunk.parameters()).device
        with torch.enable_grad():
            self.trunk.hidden(torch.zeros(1, 2, dtype=torch.long, device=device)).float().sum().backward()
        unused = [n for n, p in params if p.grad is None]
        for n, p in params:
            if p.grad is None:
                p.requires_grad_(False)
            p.grad = saved[id(p)]
        return unused


# ----------------------------------------------------------------------------- files

def read_scorer_meta(scorer_dir: str | Path) -> dict:
    """scorer.json of a scorer directory, checked; UserError naming what is wrong."""
    d = Path(scorer_dir)
    if not d.is_dir():
        raise UserError(f"scorer directory not found: {d} (train one with `lmlab verifier` or `lmlab reward`)")
    path = d / SCORER_FILE
    if not path.is_file():
        what = "a model run dir, not a scorer" if (d / "model.json").is_file() else "not a scorer directory"
        raise UserError(f"{path} is missing: {d} is {what} (train one with `lmlab verifier` or `lmlab reward`)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); re-run the stage that made {d}") from None
    if not isinstance(meta, dict) or meta.get("kind") not in KINDS or meta.get("level") not in LEVELS:
        raise UserError(f"{path}: expected kind in {KINDS} and level in {LEVELS}; re-run the stage that made {d}")
    return meta


def save_scorer(model: ScorerModel, out_dir: str | Path, meta: dict, tokenizer=None) -> None:
    """Write the trunk (LoRA merged), head.safetensors, scorer.json and tokenizer/, each swapped in whole.

    `meta` holds at least kind, template, level, tokenizer_sha256 and max_len; d_model,
    score and version are added.
    """
    from safetensors.torch import save_file

    from lmlab.artifacts import disk_error, write_json_atomic
    from lmlab.models import save_model, unwrap

    model = unwrap(model)
    if meta.get("kind") not in KINDS or meta.get("level") not in LEVELS:
        raise ValueError(f"scorer meta needs kind in {KINDS} and level in {LEVELS}: {meta}")
    out = Path(out_dir)
    tmp = out / f".scorer.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    trunk = model.trunk
    # A PeftModel exists only if peft was imported: checking so avoids importing it (seconds) for a plain trunk.
    if "peft" in sys.modules and isinstance(trunk, sys.modules["peft"].PeftModel):
        from lmlab.models.lora import merge_lora

        trunk = merge_lora(trunk)
    full = {**meta, "d_model": model.d_model, "score": "probability" if meta["kind"] == "verifier" else "reward",
            "version": VERSION}
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_model(trunk, tmp)
        head = {k: v.detach().float().contiguous().cpu() for k, v in model.head.state_dict().items()}
        save_file(head, str(tmp / HEAD_FILE), metadata={"format": "pt"})
        names = ["model.safetensors", "model.json", HEAD_FILE]
        if tokenizer is not None:
            tokenizer.copy_to(tmp / "tokenizer")
        for name in names:
            os.replace(tmp / name, out / name)
        if tokenizer is not None:
            if (out / "tokenizer").exists():
                shutil.rmtree(out / "tokenizer")
            os.replace(tmp / "tokenizer", out / "tokenizer")
        write_json_atomic(out / SCORER_FILE, full)  # last: a directory with scorer.json is whole
    except OSError as e:
        raise disk_error(e, out) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_scorer(scorer_dir: str | Path, device: str | torch.device = "cpu"):
    """-> (ScorerModel in eval mode, Tokenizer, scorer.json's meta) from a scorer directory.

    The tokenizer's sha256 must equal the one recorded at training: a replaced tokenizer/
    would silently change every score.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lmlab.data.tokenizer import Tokenizer
    from lmlab.models import load_weights

    d = Path(scorer_dir)
    meta = read_scorer_meta(d)
    trunk = load_weights(d, "cpu")
    try:
        head = load_file(str(d / HEAD_FILE), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{d / HEAD_FILE} cannot be read ({e}); the scorer is damaged, retrain or restore it") from None
    if set(head) != {"weight", "bias"} or head["weight"].ndim != 2 or head["weight"].shape[0] != 1:
        raise UserError(f"{d / HEAD_FILE} is not a scalar head (expected weight (1, d_model) and bias (1,))")
    model = ScorerModel(trunk, d_model=int(head["weight"].shape[1]))
    model.head.load_state_dict(head)
    tok_dir = d / "tokenizer"
    if not tok_dir.is_dir():
        raise UserError(f"{tok_dir} is missing; a scorer directory holds a copy of its tokenizer")
    tokenizer = Tokenizer.load(tok_dir)
    if meta.get("tokenizer_sha256") and tokenizer.sha256 != meta["tokenizer_sha256"]:
        raise UserError(f"{tok_dir} (sha256 {tokenizer.sha256[:12]}) is not the tokenizer the scorer was trained with "
                        f"({meta['tokenizer_sha256'][:12]}); restore it or retrain the scorer")
    return model.to(device).eval(), tokenizer, meta
