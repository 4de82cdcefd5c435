"""Google DeepMind's Flax/Orbax Griffin checkpoints (Kaggle's `recurrentgemma/flax/2b/1/2b`)
read as lmlab's Griffin, and the Flax parameter tree mapped to and from DeepMind's torch layout.

The Flax tree is DeepMind's torch layout nested by module (lmlab.models.griffin.checkpoints
maps that layout to ours): `{"params": {"blocks.N": {"recurrent_block": {"linear_x": {"kernel",
"bias"}, ...}}, "embedder": ..., "final_norm": ...}}`, where a dense layer's `kernel` is the
torch `weight` transposed (Flax multiplies x @ kernel, torch x @ weight.T). Every other
tensor (the conv's `w`, the gates' block-diagonal `w`, `ffw_up`'s stacked `w`) has the same
shape in both. Reading needs only orbax-checkpoint (the jax extra), not JAX's Griffin.

    model = load_orbax("recurrentgemma/flax/2b/1/2b")       # -> lmlab's Griffin (float32)
    export_orbax(cfg)                                        # `lmlab export RUN out=DIR format=orbax`
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmlab.errors import UserError
from lmlab.models.griffin.checkpoints import config_from_deepmind, from_deepmind_state_dict

# files an Orbax checkpoint directory holds (one of them), whatever its Orbax version
ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint", "_sharding")
INSTALL = "pip install 'lmlab[jax]'"


def deepmind_to_flax(sd: dict[str, torch.Tensor]) -> dict:
    """DeepMind's torch state_dict -> the Flax variables `{"params": ...}` (numpy arrays)."""
    tree: dict = {}
    for name, t in sd.items():
        x = t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
        if name.endswith(".weight") and x.ndim == 2:  # a torch Linear weight: a Flax kernel
            name, x = name[: -len("weight")] + "kernel", x.T
        parts = name.split(".")
        if parts[0] == "blocks":  # "blocks.N" is one Flax module name
            parts = [f"blocks.{parts[1]}", *parts[2:]]
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = np.ascontiguousarray(x)
    return {"params": tree}


def flax_to_deepmind(params: dict) -> dict[str, torch.Tensor]:
    """The Flax variables (or their "params" tree) -> DeepMind's torch state_dict (float32)."""
    tree = params.get("params", params)
    out: dict[str, torch.Tensor] = {}

    def walk(node, prefix):
        for k, v in node.items():
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                walk(v, name)
                continue
            x = np.array(v, dtype=np.float32)  # a copy: JAX's buffers are read-only
            if name.endswith(".kernel") and x.ndim == 2:
                name, x = name[: -len("kernel")] + "weight", x.T
            out[name] = torch.from_numpy(np.ascontiguousarray(x))

    walk(tree, "")
    return out


def is_orbax_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / m).exists() for m in ORBAX_MARKERS)


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        raise UserError(f"reading an Orbax checkpoint needs orbax-checkpoint, which is not installed; "
                        f"{INSTALL}") from None
    return ocp


def read_orbax(path: str | Path) -> dict[str, torch.Tensor]:
    """A DeepMind Orbax checkpoint (Flax parameters) -> its tensors in DeepMind's torch layout."""
    ocp = _orbax()
    p = Path(path).resolve()
    try:
        restored = ocp.PyTreeCheckpointer().restore(p)  # numpy arrays: no device placement needed
    except Exception as e:  # not a checkpoint, or a damaged one: name it, no traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{p} cannot be read as an Orbax checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(restored, dict) or not isinstance(restored.get("params", restored), dict):
        raise UserError(f"{p} holds a {type(restored).__name__}, not a tree of Griffin parameters")
    return flax_to_deepmind(restored)


def orbax_vocab_size(path: str | Path) -> int:
    """The embedding rows of an Orbax checkpoint, from its metadata (no weights read)."""
    ocp = _orbax()
    p = Path(path).resolve()
    try:
        meta = ocp.PyTreeCheckpointer().metadata(p)
        tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
        tree = tree.get("params", tree)
        return int(tree["embedder"]["input_embedding"].shape[0])
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{p} is not a DeepMind recurrentgemma Orbax checkpoint: no params/embedder/input_embedding "
                        f"in its metadata ({type(e).__name__}: {first})") from None


def load_orbax(path: str | Path, **overrides):
    """A DeepMind Orbax checkpoint -> lmlab's Griffin (float32); the shape is read from the
    tensors (config_from_deepmind), `overrides` as there."""
    from lmlab.models.griffin.model import Griffin

    sd = read_orbax(path)
    cfg = config_from_deepmind(sd, str(path), **overrides)
    model = Griffin(cfg)
    model.load_state_dict(from_deepmind_state_dict(sd, cfg, str(path)))
    return model.eval()


def export_orbax(cfg) -> Path:
    """`lmlab export RUN_DIR out=DIR format=orbax` (cfg: lmlab.models.export.Config): a Griffin
    as DeepMind's Flax checkpoint (the tree recurrentgemma's save_parameters writes; `lmlab
    import DIR` reads it back), float32 or bfloat16, with the SentencePiece tokenizer.model
    inside the directory. (recurrentgemma 1.0.1's own load_parameters fails on any checkpoint
    with orbax-checkpoint 0.12's metadata objects; Orbax's PyTreeCheckpointer().restore reads it.)"""
    import json
    import shutil

    from lmlab import artifacts
    from lmlab.models import WEIGHTS, load_model

    dtype = {"f32": "float32", "bf16": "bfloat16"}.get(cfg.dtype, cfg.dtype)
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"format=orbax writes float32 or bfloat16 (DeepMind's checkpoints are bfloat16), not "
                        f"dtype={cfg.dtype}")
    if not cfg.model or not cfg.out:
        raise UserError("run `lmlab export RUN_DIR out=DIR format=orbax`")
    src, out = Path(cfg.model), Path(cfg.out)
    try:
        family = json.loads((src / "model.json").read_text()).get("family", "transformer")
    except (OSError, ValueError):
        family = None  # load_model explains
    if family is not None and family != "griffin":
        raise UserError(f"{src} is a '{family}' model; format=orbax writes DeepMind's Griffin checkpoints (a griffin "
                        f"model); export it with format=hf or format=gguf")
    artifacts.check_out(out, "orbax_export", "export", inputs={"model directory": src})
    in_fp = (artifacts.read_manifest(src) or {}).get("fingerprint") or artifacts.sha256_file(src / WEIGHTS)
    fp = artifacts.stage_fingerprint("orbax_export", {"dtype": dtype}, {"model": in_fp})
    if artifacts.is_up_to_date(out, fp):
        print(f"export: up to date ({out}), nothing to do")
        return out
    ocp = _orbax()
    timer = artifacts.Timer()
    with timer("load"):
        model, tokenizer, _ = load_model(src)
    from lmlab.models.griffin.checkpoints import to_deepmind_state_dict

    tree = deepmind_to_flax(to_deepmind_state_dict(model.state_dict(), model.cfg))
    if dtype == "bfloat16":
        import ml_dtypes

        tree = _map(tree, lambda x: x.astype(ml_dtypes.bfloat16))
    try:
        with artifacts.atomic_dir(out) as tmp:
            with timer("write"):
                ocp.PyTreeCheckpointer().save(tmp.resolve(), tree, force=True)
                spm = Path(tokenizer.path) / "tokenizer.model"
                if spm.is_file():  # beside the tensors, where `lmlab import DIR` looks
                    shutil.copy(spm, tmp / "tokenizer.model")
            artifacts.write_manifest(tmp, "orbax_export", cfg.model_dump(mode="json"), fp, verb="export",
                                     inputs={"model": {"path": str(src), "fingerprint": in_fp}},
                                     tokenizer_sha256=getattr(tokenizer, "sha256", None), timings=timer.total(),
                                     stats={"format": "orbax", "params": model.num_params(), "dtype": dtype})
    except OSError as e:
        raise artifacts.disk_error(e, out) from None
    print(f"export: wrote {out} (DeepMind's Flax/Orbax Griffin checkpoint, {model.num_params():,} params, {dtype})")
    return out


def _map(tree: dict, fn) -> dict:
    return {k: _map(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}
