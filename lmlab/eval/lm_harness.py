"""lmlab models under lm-evaluation-harness (EleutherAI's `lm-eval`), as its model `lmlab`.

    pip install 'lmlab[lm_eval]'                      # lm-eval >= 0.4 (tested with 0.4.13)

    # lm-eval's own command line, with `lmlab` registered first (lm-eval has no plugin entry
    # point for models, so the plain `lm_eval --model lmlab` does not know the name):
    python -m lmlab.eval.lm_harness --model lmlab --model_args path=runs/smoke/model \\
        --tasks my_task --include_path my_tasks/ --batch_size 16 --device cpu

    # from Python
    import lmlab.eval.lm_harness                      # registers the model name "lmlab"
    from lm_eval import simple_evaluate
    res = simple_evaluate(model="lmlab", model_args="path=runs/smoke/model", tasks=["my_task"])
    lm = LmlabLM(path="runs/smoke/model")             # or LmlabLM(model=model, tokenizer=tokenizer)
    res = simple_evaluate(model=lm, tasks=["my_task"], task_manager=TaskManager(include_path="my_tasks"))

    # as an eval section (lmlab/eval/evaluate.py)
    lmlab eval runs/smoke/model "lm_eval={tasks: [my_task], include_path: my_tasks}"

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
max_gen_toks (default 256, as hf), add_bos_token, prefix_token_id, seed (sampling).

Importing this module needs lm-eval; nothing else in lmlab imports it at module level.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from lmlab.errors import UserError

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'lmlab[lm_eval]' (or pip install 'lm-eval>=0.4')"

try:
    import lm_eval  # noqa: F401
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
                 **unknown) -> None:
        super().__init__()
        if unknown:
            raise UserError(f"unknown lmlab model_args {sorted(unknown)}; known: path (or pretrained), device, "
                            f"batch_size, max_length, max_gen_toks, add_bos_token, prefix_token_id, seed")
        path = path or pretrained
        if model is None:
            if not path:
                raise UserError("the lmlab model needs a run dir: --model_args path=runs/x/model")
            if not Path(path).is_dir():
                raise UserError(f"model directory not found: {path} (fix path=...)")
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
    """The model name `lmlab` for lm-eval (once: `python -m` runs this file as __main__ too)."""
    from lm_eval.api.registry import model_registry

    if "lmlab" not in model_registry:
        register_model("lmlab")(LmlabLM)


if __name__ != "__main__":
    _register()


# ---------------------------------------------------------------------- results and tasks

def task_manager(tasks: list[str], include_path=None, include_defaults: Optional[bool] = None):
    """A TaskManager that knows every name in `tasks` (or a UserError naming the unknown ones).

    include_defaults=None: lm-eval's built-in tasks (~15k YAML files, ~20 s to index) only when
    some task is not under include_path.
    """
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    for p in paths:
        if not Path(p).exists():
            raise UserError(f"lm_eval.include_path not found: {p}")
    paths = [str(p) for p in paths] or None

    def unknown(tm) -> list[str]:
        return [t for t in tasks if not Path(t).is_file() and not tm.match_tasks([t])]

    if paths and include_defaults is not True:
        tm = TaskManager(include_path=paths, include_defaults=False)
        missing = unknown(tm)
        if not missing:
            return tm
        if include_defaults is False:
            raise UserError(f"unknown lm-eval task(s) {missing}: not defined under include_path {paths} "
                            f"(include_defaults=false); tasks there: {tm.all_tasks[:20]}")
    tm = TaskManager(include_path=paths, include_defaults=include_defaults is not False)
    missing = unknown(tm)
    if missing:
        from lm_eval.api.registry import _suggest_similar

        hints = {t: _suggest_similar(t, tm.all_tasks) for t in missing}
        raise UserError(f"unknown lm-eval task(s) {missing}" + "".join(f"; {t}: did you mean {h}?" for t, h in
                                                                      hints.items() if h)
                        + (f" (include_path {paths})" if paths else " (give include_path for local task YAMLs)"))
    return tm


def tree_sha256(path) -> str:
    """sha256 over a file, or over every file under a directory (relative names and contents;
    hidden entries and __pycache__ skipped): what an include_path's task definitions hash to."""
    import hashlib

    from lmlab.artifacts import sha256_file

    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p)
        if not f.is_file() or any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        h.update(f"{rel.as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def run_tasks(model, tokenizer, spec, tm, device=None, seed: int = 0, path: Optional[str] = None) -> dict:
    """The eval section (`lmlab eval ... lm_eval={...}`): simple_evaluate on the loaded model with the
    spec's settings (lmlab.eval.evaluate.LmEvalSpec) -> {version, settings, tasks: summarize(...)}."""
    from lm_eval import simple_evaluate

    lm = LmlabLM(path=path, model=model, tokenizer=tokenizer, device=device, batch_size=spec.batch_size,
                 max_length=spec.max_length, max_gen_toks=spec.max_gen_toks, add_bos_token=spec.add_bos_token,
                 seed=seed)
    limit = spec.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    try:
        res = simple_evaluate(model=lm, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot, limit=limit,
                              task_manager=tm, log_samples=False, bootstrap_iters=spec.bootstrap_iters)
    except UserError:
        raise
    except Exception as e:
        mod = type(e).__module__ or ""
        if isinstance(e, (OSError, ConnectionError)) or mod.startswith(("datasets", "huggingface_hub", "fsspec",
                                                                          "requests", "urllib3")):
            raise UserError(f"lm_eval: a task's data could not be loaded ({type(e).__name__}: {e}); local "
                            f"tasks need `dataset_path: json` with `dataset_kwargs: {{data_files: ...}}`, hub "
                            f"tasks a reachable (or cached, HF_DATASETS_OFFLINE=1) Hugging Face hub") from None
        raise
    return {"version": lm_eval.__version__,
            "settings": {"max_length": lm.max_length, "add_bos_token": lm.add_bos_token,
                         "prefix_token_id": lm.prefix_token_id, "batch_size": lm.batch_size,
                         "num_fewshot": spec.num_fewshot, "limit": limit},
            "tasks": summarize(res)}


def _number(v):
    """A metric value for JSON: floats kept, 'N/A' and NaN -> None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return None if v != v or v in (float("inf"), float("-inf")) else v


def summarize(res: dict) -> list[dict]:
    """simple_evaluate's output -> [{task, alias, n, n_total, version, num_fewshot, output_type, group,
    metrics: [{metric, filter, value, stderr, higher_is_better}]}], tasks and groups in lm-eval's order
    (a value or stderr lm-eval gives as "N/A" or NaN is None)."""
    out = []
    n_samples = res.get("n-samples") or {}
    configs = res.get("configs") or {}
    for name, values in (res.get("results") or {}).items():
        metrics = []
        better = (res.get("higher_is_better") or {}).get(name) or {}
        for key, v in values.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            hib = better.get(metric)
            metrics.append({"metric": metric, "filter": filt, "value": _number(v),
                            "stderr": _number(values.get(f"{metric}_stderr,{filt}")),
                            "higher_is_better": hib if isinstance(hib, bool) else None})
        cfg = configs.get(name) or {}
        ns = n_samples.get(name) or {}
        out.append({"task": name, "alias": str(values.get("alias", name)).strip(),
                    "n": ns.get("effective"), "n_total": ns.get("original"),
                    "version": (res.get("versions") or {}).get(name), "num_fewshot": (res.get("n-shot") or {}).get(name),
                    "output_type": cfg.get("output_type"), "group": name in (res.get("groups") or {}),
                    "metrics": metrics})
    return out


def stat_key(task: str, m: dict) -> str:
    """The manifest stats key of a metric: lm_eval_TASK_METRIC (+ _FILTER unless the filter is 'none')."""
    suffix = "" if m["filter"] == "none" else f"_{m['filter']}"
    return f"lm_eval_{task}_{m['metric']}{suffix}"


def metrics_line(t: dict) -> str:
    """'acc 0.500 ± 0.167, acc_norm 0.333 ± 0.157 (6 docs, 0-shot)'."""
    parts = []
    for m in t["metrics"]:
        name = m["metric"] if m["filter"] == "none" else f"{m['metric']} ({m['filter']})"
        val = "–" if m["value"] is None else f"{m['value']:.4g}"
        se = f" ± {m['stderr']:.3g}" if m["stderr"] is not None else ""
        parts.append(f"{name} {val}{se}")
    docs = f"{t['n']} docs" if t.get("n") is not None else "group"
    shots = f", {t['num_fewshot']}-shot" if t.get("num_fewshot") is not None else ""
    return ", ".join(parts) + f" ({docs}{shots})"


def main(argv: Optional[list[str]] = None) -> None:
    """lm-eval's command line with the model `lmlab` registered (this module's import did it)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    from lmlab.eval.lm_harness import main as _main  # the importable module registers its class

    _main()
