"""Model families: the contract every family's model meets, and the registry that builds them.

`model.json` names its family (`"family": "transformer"`; a file without the key is a
transformer, as every model before families was). Stages never construct a model class
themselves: `build_model(model_json)` and `load_model` go through `FAMILIES`, so a new family
(Griffin, TRM) plugs in by adding an entry here and passing tests/test_family_conformance.py.

The contract, as Protocols (checked by that suite for every registered family):

    model.hidden(idx, doc_ids=None, cache=None) -> h (B, T, D)   final hidden states
    model.logits(h) -> (B, T, V)                                 the output head (a fused loss,
                                                                 completion-only logits and a
                                                                 soft-capped head go through it)
    model(idx, targets=None, *, doc_ids, cache, return_logits, last_only, logits_at) -> (logits, loss)
                                                                 logits_at: a (B, T) bool mask ->
                                                                 (n, V) logits at those positions
    model.new_cache(batch, max_len, device=None, dtype=None, left_pad=None) -> Cache
    model.max_context  (int, or None when unbounded), model.num_params(), model.flops_per_token(T)
    model.family, model.cfg (a pydantic config whose model_dump is the rest of model.json)

    cache.pos, cache.max_len, cache.batch, cache.select(rows)    the engine's only operations
    cache.merge(other)                                           append another cache's rows (the
                                                                 server's continuous batching)

Optional, for LLM-TRM's latent thinking (the transformer has it; lmlab.models.family.takes_vectors
tells): `vectors=(mask (B, T) bool, values (n, D))` on `hidden` and `forward` puts input vectors
in place of the token embeddings at the masked positions, gradients flowing into the values.

Optional, a decoder elsewhere: a model may carry `model.decoder`, a `Decoder` that
lmlab.infer.engine.generate_ids hands the decoding to (so `generate`, `complete`, the eval's
generations, problems and proofs go through it), and `model.scorer`, a `Scorer` that
lmlab.eval's perplexity, multiple choice, long context and lm-eval hand their forward passes
to; backend=jax sets them to the JAX Griffin's (lmlab.jax_backend.griffin.decode, .score). Everything
else still reads the torch model.

A family's `kind` says which contract it meets: "lm" families are LanguageModels (every stage
that reads, generates or trains text takes them); "puzzle" families (TRM) are PuzzleModels,
which fill a whole grid per call and are trained and evaluated by `lmlab trm` and
`lmlab puzzle-eval` only:

    model.initial_carry(batch_size, device=None) -> carry        every row halted
    model(carry, batch) -> (carry, outputs)                      one supervision step; batch and
                                                                 outputs as lmlab.models.trm.model
    model.num_params(), model.flops_per_example(), model.family, model.cfg
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable

import torch

from lmlab.errors import UserError

DEFAULT_FAMILY = "transformer"


@runtime_checkable
class Cache(Protocol):
    """Decoding state a model builds for itself; the engine reads `pos`/`batch`, selects rows and
    merges in newly prefilled rows; every row decodes on as it would alone."""

    pos: int
    max_len: int

    @property
    def batch(self) -> int: ...

    def select(self, rows: Sequence[int]) -> None: ...

    def merge(self, other: "Cache") -> None: ...


@runtime_checkable
class LanguageModel(Protocol):
    family: str
    cfg: Any

    @property
    def max_context(self) -> Optional[int]: ...

    def hidden(self, idx: torch.Tensor, *, doc_ids: Optional[torch.Tensor] = None,
               cache: Optional[Cache] = None) -> torch.Tensor: ...

    def logits(self, h: torch.Tensor) -> torch.Tensor: ...

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                doc_ids: Optional[torch.Tensor] = None, cache: Optional[Cache] = None,
                return_logits: bool = True, last_only: bool = False,
                logits_at: Optional[torch.Tensor] = None): ...

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None,
                  left_pad: Optional[Sequence[int]] = None) -> Cache: ...

    def num_params(self, non_embedding: bool = False) -> int: ...

    def flops_per_token(self, seq_len: int) -> float: ...


@runtime_checkable
class Decoder(Protocol):
    """Decodes a language model's prompts in its place, as lmlab.infer.engine.generate_ids: per
    step, each row's new token (None once the row has ended at eos, should_stop or the limit)."""

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, eos_id: Optional[int] = None, seed: int = 0,
                     pad_id: int = 0, should_stop: Optional[Callable[[int, list[int]], bool]] = None): ...


@runtime_checkable
class Scorer(Protocol):
    """Scores a language model's text in its place (lmlab.eval hands its forward passes to it)."""

    def row_scores(self, x, y):
        """For (B, T) token ids x and targets y (-100: not scored), numpy: each row's summed
        -log p(y | x) ((B,) float64) and whether every scored target is the greedy token ((B,)
        bool). Perplexity of packed data and texts, multiple choice, lm-eval's log-likelihoods."""

    def stream_nll(self, ids):
        """-log p(ids[t+1] | ids[:t+1]) for every t of one stream of any length ((len - 1,)
        float64), read with the model's cache: the eval's long_context."""


@runtime_checkable
class PuzzleModel(Protocol):
    family: str
    cfg: Any

    def initial_carry(self, batch_size: int, device=None) -> Any: ...

    def forward(self, carry: Any, batch: dict) -> tuple[Any, dict]: ...

    def num_params(self, non_embedding: bool = False) -> int: ...

    def flops_per_example(self) -> float: ...


@dataclass(frozen=True)
class Family:
    """How to build one family's model: `config(dict or config, vocab_size=None)` -> its resolved
    config (presets filled, the tokenizer's vocabulary when the config sets none), `build(config)`
    -> the model."""

    name: str
    config: Callable[..., Any]
    build: Callable[[Any], torch.nn.Module]
    exports_hf: bool  # `lmlab export` writes a Hugging Face directory for it
    kind: str = "lm"  # "lm": a LanguageModel; "puzzle": a PuzzleModel (see the module docstring)


def _transformer() -> Family:
    from lmlab.models.transformer import Transformer, resolve_model_config
    return Family("transformer", resolve_model_config, Transformer, exports_hf=True)


def _griffin() -> Family:
    from lmlab.models.griffin import Griffin, resolve_griffin_config
    return Family("griffin", resolve_griffin_config, Griffin, exports_hf=True)


def _trm() -> Family:
    from lmlab.models.trm import TRM, resolve_trm_config
    return Family("trm", resolve_trm_config, TRM, exports_hf=False, kind="puzzle")


# name -> a function returning the Family (imported on first use, so `import lmlab.models` stays light)
FAMILIES: dict[str, Callable[[], Family]] = {"transformer": _transformer, "griffin": _griffin, "trm": _trm}


def takes_vectors(model) -> bool:
    """Whether the model's forward accepts input vectors in place of embeddings (`vectors=`)."""
    import inspect

    return "vectors" in inspect.signature(type(model).forward).parameters


def families_of_kind(kind: str) -> list[str]:
    return [name for name in FAMILIES if get_family(name).kind == kind]


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"unknown model family '{name}'; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]()


def split_model_json(data: dict) -> tuple[str, dict]:
    """model.json's content -> (family name, the family's config fields)."""
    data = dict(data)
    return str(data.pop("family", DEFAULT_FAMILY)), data


def build_model(data: dict) -> torch.nn.Module:
    """A freshly initialised model from model.json's content (family + config)."""
    name, fields = split_model_json(data)
    fam = get_family(name)
    return fam.build(fam.config(fields))


def model_json(model) -> dict:
    """What save_model writes to model.json: the family, then the resolved config."""
    fields = {k: v for k, v in model.cfg.model_dump(mode="json").items() if k != "family"}
    return {"family": getattr(model, "family", DEFAULT_FAMILY), **fields}
