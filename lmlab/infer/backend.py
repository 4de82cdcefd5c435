"""Load a model for the verbs that generate or score (`generate`, `chat`, `eval`, the lm-eval
model), on the backend asked for.

    model, tokenizer, manifest, device = load_for_decoding(run_dir, backend="jax", device="auto")

backend=torch is lmlab.models.load_model on the device. backend=jax (a Griffin, the jax extra)
loads the torch weights on the CPU, where they stay for whatever else reads the model, and
hands decoding and scoring to the JAX Griffin on JAX's devices (attach_jax),
so torch takes no accelerator memory from JAX. `chunk` is how many tokens JAX decodes per call:
what a stream shows at a time.
"""

from __future__ import annotations

from pathlib import Path

from lmlab.errors import UserError


def attach_jax(model, where, chunk: int = 32):
    """Hand a loaded torch Griffin's decoding and scoring to JAX: model.decoder and model.scorer
    (lmlab.models.family.Decoder and Scorer), sharing one copy of the parameters on the devices."""
    from lmlab.jax_backend.griffin.decode import Decoder, check
    from lmlab.jax_backend.griffin.score import Scorer

    check(model.family, model.cfg, where)
    model.decoder = Decoder.of(model, chunk=chunk)
    model.scorer = Scorer(model.decoder)
    return model


def load_for_decoding(run_dir: str | Path, backend: str = "torch", device: str = "auto", chunk: int = 32):
    """-> (model, tokenizer, manifest, the torch device the model is on)."""
    from lmlab.models import load_model
    from lmlab.runtime import pick_device

    if backend == "jax":
        if device not in ("auto", "cpu"):
            raise UserError(f"device={device} places torch's model; backend=jax decodes on JAX's devices (every "
                            f"accelerator JAX sees): drop device, or use backend=torch")
        dev = pick_device("cpu")
    else:
        dev = pick_device(device)
    model, tokenizer, manifest = load_model(run_dir, device=dev)
    model.eval()
    if backend == "jax":
        attach_jax(model, run_dir, chunk=chunk)
    return model, tokenizer, manifest, dev
