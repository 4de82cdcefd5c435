"""lm-evaluation-harness's model `lmlab`: class LmlabLM, an lmlab run dir as an lm-eval LM.

Importing this module registers the name `lmlab` with lm-eval; lmlab/eval/lm_harness.py (the
public face: the eval section, `python -m lmlab.eval.lm_harness`) re-exports the class.

`LmlabLM` loads a run dir with `lmlab.models.load_model` (transformer and griffin, merged
LoRA runs too) and implements lm-eval's three request types:

* `loglikelihood` (multiple choice, ...): (log p(continuation | context), is_greedy); the
  requests are sorted longest first, right-padded into batches of `batch_size`, and scored
  by one forward pass per batch, logits taken only at the continuation's positions.
* `loglikelihood_rolling` (perplexity): the document's tokens in lm-eval's rolling windows
  (`get_rolling_token_windows(..., context_len=1)` + `make_disjoint_window`) of `max_length`
  tokens, the first conditioned on `prefix_token_id`; all windows of all documents batched.
* `generate_until`: lmlab.infer.engine (batched KV-cache decoding, left padding), greedy or
  the request's `temperature` / `top_p` / `top_k` with `do_sample`; it stops at eos, at any
  `until` string and after `max_gen_toks` tokens, the text cut before the first `until`.

Tokenization follows lm-eval's Hugging Face backend (`--model hf`) on the model that
`lmlab export` writes, so the two give the same numbers (tests/test_lm_harness.py checks it):
a context and its continuation are encoded together and split after `encode(context)`
(trailing spaces of the context move to the continuation); an empty context is
`prefix_token_id` (bos, else eos); `add_bos_token` (default False, as the exported
tokenizer: `add_bos_token: false`) puts bos before every encoded context, rolling documents
included, exactly as `hf` with `add_bos_token=True`; contexts longer than the model are cut
from the left; a generation's context keeps its last `max_length - max_gen_toks` tokens and
special tokens are dropped from the generated text (`skip_special_tokens`). lmlab's own
multiple-choice eval (`choice=`) puts bos first, as documents start in training; pass
`add_bos_token=True` for that convention.

Model arguments (`--model_args k=v,...`): path (or pretrained) = the run dir, device
(auto | cpu | cuda[:N] | mps; an unavailable CUDA device falls back as lm-eval's hf does),
batch_size (an int; "auto" = 16), max_length (default: the model's context, max_seq_len),
max_gen_toks (default 256, as hf), add_bos_token, prefix_token_id, seed (sampling), backend
(torch | jax: a Griffin whose log-likelihoods and generations run on recurrentgemma.jax, the
model's `scorer` and `decoder`, lmlab.models.family; device then does not apply).

Importing this module needs lm-eval (without it: a UserError naming INSTALL_HINT); only
lmlab/eval/lm_harness.py imports it, and nothing in lmlab imports that at module level.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from lmlab.errors import UserError

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'lmlab[lm_eval]' (or pip install 'lm-eval>=0.4')"

try:
    import lm_eval  # noqa: F401  (lm_harness takes it from here: lm_eval.__version__)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval import utils as lm_utils
except ImportError as e:  # pragma: no cover - exercised only without lm-eval
    raise UserError(f"{INSTALL_HINT} ({e})") from None

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's hf backend


def _as_bool(v) -> bool:
    if isinstance(v, str):
        if v.lower() in ("1", "true", "yes", "on"):
            return True
        if v.lower() in ("0", "false", "no", "off", ""):
            return False
        raise UserError(f"expected a boolean, got {v!r}")
    return bool(v)


def _device(name) -> torch.device:
    from lmlab.runtime import pick_device

    if name is None or str(name) in ("", "auto"):
        return pick_device("auto")
    name = str(name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        # lm-eval's CLI passes cuda:0 when no --device is given; its hf backend then falls back too
        log.warning("lmlab: device %s asked for but CUDA is not available; using %s", name, pick_device("auto"))
        return pick_device("auto")
    return pick_device(name)


class LmlabLM(TemplateLM):
    """An lmlab model run dir as an lm-eval LM (see the module docstring for the conventions)."""

    backend = "causal"

    def __init__(self, path: Optional[str] = None, pretrained: Optional[str] = None, *, model=None, tokenizer=None,
                 device=None, batch_size=DEFAULT_BATCH_SIZE, max_batch_size=None, max_length=None,
                 max_gen_toks=DEFAULT_MAX_GEN_TOKS, add_bos_token=False, prefix_token_id=None, seed=0,
                 backend="torch", **unknown) -> None:
        super().__init__()
        if unknown:
            raise UserError(f"unknown lmlab model_args {sorted(unknown)}; known: path (or pretrained), device, "
                            f"batch_size, max_length, max_gen_toks, add_bos_token, prefix_token_id, seed, backend")
        if backend not in ("torch", "jax"):
            raise UserError(f"backend must be torch or jax, got {backend!r}")
        path = path or pretrained
        if model is None:
            if not path:
                raise UserError("the lmlab model needs a run dir: --model_args path=runs/x/model")
            if not Path(path).is_dir():
                raise UserError(f"model directory not found: {path} (fix path=...)")
            if backend == "jax":  # a Griffin scored and decoded by recurrentgemma.jax (lmlab.infer.backend)
                from lmlab.infer.backend import load_for_decoding

                model, tokenizer, manifest, self._device = load_for_decoding(path, "jax", "cpu")
            else:
                from lmlab.models import load_model

                self._device = _device(device)
                model, tokenizer, manifest = load_model(path, device=self._device)
            self.manifest = manifest
        else:
            if tokenizer is None:
                raise UserError("LmlabLM(model=...) needs its tokenizer too")
            self._device = torch.device(device) if device is not None else next(model.parameters()).device
            self.manifest = {}
        self.path = str(path) if path else None
        self.model = model.eval()
        self.tokenizer = tokenizer
        bs = str(batch_size if batch_size is not None else DEFAULT_BATCH_SIZE)
        if bs.startswith("auto"):
            log.warning("lmlab: batch_size=%s is not detected automatically; using %d", bs, DEFAULT_BATCH_SIZE)
            bs = str(DEFAULT_BATCH_SIZE)
        try:
            self._batch_size = int(bs)
        except ValueError:
            raise UserError(f"batch_size must be an integer, got {batch_size!r}") from None
        if self._batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self._batch_size}")
        self._max_length = int(max_length) if max_length not in (None, "") else None
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _as_bool(add_bos_token)
        self.custom_prefix_token_id = int(prefix_token_id) if prefix_token_id not in (None, "") else None
        self.seed = int(seed)
        self._bos = tokenizer.bos_id if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else None
        self._eos = tokenizer.eos_id if tokenizer.eos_id is not None and tokenizer.eos_id >= 0 else None
        self._pad = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else 0
        specials = dict(getattr(tokenizer, "special_tokens", {}) or {})
        self._special = set(int(i) for i in specials.values())
        # special tokens' text as the exported HF tokenizer decodes them (ours decodes bos/eos to "")
        self._text_of = {int(i): t for t, i in specials.items()}
        if self.add_bos_token and self._bos is None:
            raise UserError("add_bos_token=True but the tokenizer has no bos token")

    # ------------------------------------------------------------------ properties lm-eval reads

    @property
    def eot_token_id(self) -> int:
        if self._eos is None:
            raise UserError("the tokenizer has no eos token, which lm-eval needs as its end of text")
        return self._eos

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and a document's first rolling window) starts from: bos, else eos."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return self._bos if self._bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        return int(getattr(self.model, "max_context", None) or self.model.cfg.max_seq_len)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"lmlab-{getattr(self.tokenizer, 'sha256', '')[:16]}"

    def get_model_info(self) -> dict:
        return {"lmlab_path": self.path, "lmlab_family": getattr(self.model, "family", "transformer"),
                "lmlab_fingerprint": self.manifest.get("fingerprint"),
                "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "max_length": self.max_length, "add_bos_token": self.add_bos_token}

    # ------------------------------------------------------------------ tokens

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        """encode(string), with bos first when add_bos_token (and add_special_tokens is not False),
        unless the string already starts with bos's text: the hf backend's rule."""
        add = self.add_bos_token if add_special_tokens is None else (add_special_tokens and self.add_bos_token)
        if add_special_tokens is None and string.startswith(self._token_text(self.prefix_token_id)):
            add = False
        ids = list(self.tokenizer.encode(string))
        if add:
            ids = [self._bos] + ids
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def _token_text(self, i: int) -> str:
        return self._text_of.get(int(i)) or self.tokenizer.decode([int(i)]) or "\0"

    def tok_decode(self, ids, skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special]
        return self.tokenizer.decode(list(ids))

    # ------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def _score_batch(self, batch: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(summed log p, greedy) of each (context ids, continuation ids), one right-padded forward."""
        inps, conts = [], []
        for ctx, cont in batch:
            if len(cont) > self.max_length:
                raise UserError(f"a continuation of {len(cont)} tokens is longer than the model's context "
                                f"({self.max_length}); lm-eval's hf backend refuses it too")
            inps.append((ctx + cont)[-(self.max_length + 1):][:-1])
            conts.append(cont)
        width = max(len(s) for s in inps)
        x = torch.full((len(inps), width), self._pad, dtype=torch.long)
        at = torch.zeros((len(inps), width), dtype=torch.bool)
        for i, (s, cont) in enumerate(zip(inps, conts)):
            x[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            at[i, len(s) - len(cont):len(s)] = True  # the positions that predict the continuation
        scorer = getattr(self.model, "scorer", None)  # lmlab.models.family.Scorer: the JAX Griffin
        if scorer is not None:
            y = torch.full_like(x, -100)
            y[at] = torch.tensor([t for cont in conts for t in cont], dtype=torch.long)
            nll, greedy = scorer.row_scores(x.numpy(), y.numpy())
            return [(-float(v), bool(g)) for v, g in zip(nll, greedy)]
        x, at = x.to(self._device), at.to(self._device)
        logits, _ = self.model(x, logits_at=at)
        logp = F.log_softmax(logits.float(), dim=-1)  # (n, V) in row-major order of `at`
        out, pos = [], 0
        for cont in conts:
            rows = logp[pos:pos + len(cont)]
            pos += len(cont)
            target = torch.tensor(cont, dtype=torch.long, device=rows.device)
            lp = rows.gather(-1, target[:, None]).squeeze(-1)
            out.append((float(lp.double().sum()), bool((rows.argmax(-1) == target).all())))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (cache key or None, context ids, continuation ids); longest first, batched."""
        from tqdm import tqdm

        res: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        todo = []
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                res[i] = (0.0, True)  # nothing to score (hf asserts on it)
            else:
                todo.append(i)
        todo.sort(key=lambda i: (-len(requests[i][1] + requests[i][2]), tuple(requests[i][1] + requests[i][2])))
        bar = tqdm(total=len(todo), disable=disable_tqdm, desc="lmlab loglikelihood")
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start:start + self.batch_size]
            for i, ans in zip(idx, self._score_batch([(requests[i][1], requests[i][2]) for i in idx])):
                res[i] = ans
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], ans)
            bar.update(len(idx))
        bar.close()
        return res  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood over lm-eval's disjoint rolling windows of max_length tokens."""
        windows, owner = [], []
        for r, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, scores):
            totals[r] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Completions by lmlab.infer.engine, requests with the same gen_kwargs batched together."""
        from tqdm import tqdm

        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
        from lmlab.infer.engine import complete_ids
        from lmlab.infer.prompting import Stops
        from lmlab.infer.sampling import Sampling

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[Optional[str]] = [None] * len(requests)
        eos_text = self._token_text(self.eot_token_id)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="lmlab generate_until")
        for g, idx in enumerate(groups.values()):
            gen_kwargs = dict(requests[idx[0]].args[1])
            kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos_text)
            max_gen = int(kw.pop("max_gen_toks"))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0) or 0.0)
            if do_sample and temperature <= 0:
                temperature = 1.0  # do_sample without a temperature: transformers' default
            if not do_sample:
                temperature = 0.0
            top_p = float(kw.pop("top_p", 1.0) or 1.0)
            top_k = int(kw.pop("top_k", 0) or 0)
            ignored = sorted(k for k in kw if k not in ("max_length",))
            if ignored:
                log.warning("lmlab generate_until: ignoring gen_kwargs %s", ignored)
            room = self.max_length - max_gen
            if room <= 0:
                raise UserError(f"max_gen_toks={max_gen} leaves no room for a context in the model's "
                                f"{self.max_length} tokens; lower max_gen_toks")
            prompts = []
            for i in idx:
                ids = self.tok_encode(requests[i].args[0], left_truncate_len=room)
                prompts.append(ids or [self.prefix_token_id])
            sampling = Sampling(max_new_tokens=max_gen, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=self.seed + g)
            stops = Stops(tuple(s for s in until if s and s != eos_text))
            comps = complete_ids(self.model, self.tokenizer, prompts, sampling, stops, batch_size=self.batch_size,
                                 device=self._device)
            for i, c in zip(idx, comps):
                ids = c.ids[:-1] if c.ids and self._eos is not None and c.ids[-1] == self._eos else c.ids
                text = postprocess_generated_text(self.tok_decode(ids), until, None)
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]


def _register() -> None:
    """The model name `lmlab` for lm-eval, this class (once: another class under the name would raise)."""
    from lm_eval.api.registry import model_registry

    if "lmlab" not in model_registry:
        register_model("lmlab")(LmlabLM)


# on import, also when lm_harness runs as __main__: that file imports this class, never redefines it
_register()
