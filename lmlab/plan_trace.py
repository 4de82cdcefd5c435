"""One process's training step traced on fake tensors: `lmlab plan`'s memory measure for any family.

lmlab.plan's analytic model follows the transformer tensor by tensor. Every other family
(Griffin now), and the transformer with `--method trace`, is measured instead: the stage's
model is built on the meta device and turned into fake tensors (FakeTensorMode: shapes, dtypes
and devices, no memory and no arithmetic), wrapped the way lmlab.train.parallelize wraps it
for the run (LoRA adapters, activation checkpointing, DDP or FSDP2 over a fake process group of
the planned world size), and takes a training step the way lmlab.train.loop does (AdamW's
moments allocated first, then the micro-batches' forward/backward passes under autocast, the
gradient divided by the count, clipping, the optimizer step). A dispatch mode adds up the
bytes of every storage the step creates and subtracts them when the storage is freed, so the
result is the peak of live tensor bytes that the same step on real tensors reaches
(tests/test_plan_trace.py checks the two), from the model's own code, not a description of it.
A Griffin 2B step of 8 x 2,048 positions traces in 7-14 s on 2 cores.

What a trace cannot see: what a kernel allocates inside itself, except the buffers named in
KERNEL_TEMPORARIES (logsumexp's, the one that mattered on scripts/plan_check.py's CPU cases);
and CUDA's own kernels. The fake tensors live on the CPU (a CPU-only torch cannot fake CUDA
tensors), so ops that save other tensors on CUDA (the fused RMSNorm, the attention kernel
picked) are counted as the CPU runs them; on a CUDA target AdamW is the fused kernel, as the
loop builds it there. torch.compile is not traced (it usually saves less than eager). The
allowance for the CUDA context or the CPU process comes from lmlab.plan.

torch.distributed._tools.MemTracker does the same bookkeeping with per-module statistics, but it
walks every live tensor at every op: 51 s for one forward/backward of that model at 1 x 2,048
against 4 s untracked, so this file keeps its own counter (same peaks on the cases we compared).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Bytes of the live storages that the ops run under it created, and their peak.

    A view shares its base's storage and an in-place op returns its input's, so each storage
    counts once; a weakref finalizer subtracts it when the storage is freed. FSDP2 frees and
    re-allocates its unsharded parameters by resizing their storages (`resize_`, which no
    dispatch mode sees), so `UntypedStorage.resize_` is wrapped while the counter runs. `phase`
    labels the peak (what the step was doing when it was reached).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.phase = self.peak_phase = ""
        self._size: dict[int, int] = {}  # id(storage) -> its bytes now

    def _set(self, storage, n: int) -> None:
        key = id(storage)
        if key not in self._size:
            weakref.finalize(storage, self._free, key)
            self._size[key] = 0
        self.live += n - self._size[key]
        self._size[key] = n
        if self.live > self.peak:
            self.peak, self.peak_phase = self.live, self.phase

    def hold(self, t: torch.Tensor) -> None:
        """Count a tensor made outside any op (a parameter converted to a fake tensor)."""
        for storage in _storages(t):
            if id(storage) not in self._size:
                self._set(storage, storage.nbytes())

    def _free(self, key: int) -> None:
        self.live -= self._size.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inside = KERNEL_TEMPORARIES.get(func)
        if inside is not None and self.live + inside(*args) > self.peak:
            self.peak, self.peak_phase = self.live + inside(*args), self.phase
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            for storage in _storages(t):
                if id(storage) in self._size:
                    continue
                if inputs is None:  # a view of an input made outside the counter is no allocation
                    inputs = {s._cdata for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)
                              for s in _storages(a)}
                if storage._cdata not in inputs:
                    self._set(storage, storage.nbytes())
        return out

    def __enter__(self):
        resize, counter = torch.UntypedStorage.resize_, self

        def counted_resize(storage, size):
            out = resize(storage, size)
            counter._set(storage, storage.nbytes())
            return out
        self._resize = resize
        torch.UntypedStorage.resize_ = counted_resize
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)


def _storages(t: torch.Tensor) -> list:
    """The storages holding a tensor's data: its own, or for a wrapper subclass (FSDP2's DTensor
    parameters and gradients) its inner tensors' — the wrapper's own storage is a stand-in of the
    global shape that holds no memory."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return [s for name in names if isinstance(inner := getattr(t, name), torch.Tensor) for s in _storages(inner)]
    return [t.untyped_storage()]


# Buffers a kernel allocates inside itself, which no dispatch mode sees: op -> bytes from its
# inputs. logsumexp computes exp(x - max) as a tensor the size of its input (CPU and CUDA alike):
# in the fused loss that is one chunk of logits, 256 rows x the vocabulary, the whole gap between
# a trace and the measured peak on scripts/plan_check.py's fused-loss cases before this rule.
KERNEL_TEMPORARIES = {
    torch.ops.aten.logsumexp.default: lambda x, *rest: x.numel() * x.element_size(),
}


@dataclass(frozen=True)
class Traced:
    """What a traced step held: the peak and the persistent parts, in bytes (one process)."""

    peak: int
    peak_phase: str        # "forward/backward" or "optimizer step"
    weights: int           # the process's parameters (FSDP: its shards)
    gradients: int         # of the trainable parameters
    optimizer: int         # the optimizer's state (AdamW: two moments)
    ddp_buckets: int       # DDP's flat gradient buckets (added: see trace_step)
    params: int            # parameters of the whole model (a tied matrix once)
    trainable: int         # of which trained (LoRA: the adapters)
    seconds: float

    @property
    def working(self) -> int:
        """Everything else at the peak: activations, gradients so far, temporaries, FSDP's gathers."""
        return self.peak - self.weights - self.optimizer - self.ddp_buckets


@contextlib.contextmanager
def fake_process_group(world: int):
    """A process group of `world` ranks in this process (we are rank 0) whose collectives do
    nothing: what DDP and FSDP2 need to be built and run on fake tensors. Left alone when a real
    process group exists (a plan run under torchrun)."""
    import torch.distributed as dist
    if dist.is_initialized():
        yield
        return
    # importing it registers the "fake" backend (torch's own tool for memory estimation)
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group(backend="fake", rank=0, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _micro_loss(verb: str, model, rows: int, seq: int, vocab: int, packed: bool) -> tuple[torch.Tensor, int]:
    """One micro-batch's summed loss and its count, as the stage's objective computes it.

    pretrain and sft: the model's fused (soft-capped) cross entropy over every position, sft's
    packing with two documents per row; dpo: logits at every position (an upper bound: DPO asks
    for them at the completion tokens only) and their log-probabilities, chosen and rejected rows.
    """
    x = torch.randint(0, vocab, (rows, seq))
    y = torch.randint(0, vocab, (rows, seq))
    if verb == "dpo":
        from lmlab.train.dpo_losses import dpo_loss, sequence_logps
        logits, _ = model(x)
        logps, _ = sequence_logps(logits, y)
        half = rows // 2
        ref = torch.zeros(half)
        losses, _, _ = dpo_loss(logps[:half], logps[half:], ref, ref, beta=0.1, loss="sigmoid")
        return losses.sum(), half
    doc = (torch.arange(seq)[None, :] >= seq // 2).long().expand(rows, seq).contiguous() if packed else None
    _, loss = model(x, y, doc_ids=doc, return_logits=False)
    return loss * y.numel(), y.numel()


def _bytes(tensors) -> int:
    from lmlab import dist as lmdist
    total = 0
    for t in tensors:
        local = t.to_local() if lmdist.is_dtensor(t) else t
        total += local.numel() * local.element_size()
    return total


def trace_step(verb: str, model_cfg, cfg, shape, target_device: str) -> Traced:
    """Trace one optimizer step of `verb` on rank 0 of `shape` (a lmlab.plan.RunShape).

    `model_cfg` is the resolved config of the model's family, `cfg` the stage config (train,
    parallel and lora sections), `target_device` the device planned for ("cuda" | "cpu").
    A model whose step needs real values (a data-dependent shape, `.item()`) cannot be traced:
    a UserError says so and how to measure it instead.
    """
    from torch._subclasses import fake_tensor as ft

    from lmlab.errors import UserError
    try:
        return _trace_step(verb, model_cfg, cfg, shape, target_device)
    except (ft.DataDependentOutputException, ft.DynamicOutputShapeException, ft.UnsupportedOperatorException,
            ft.UnsupportedFakeTensorException) as e:
        family = getattr(model_cfg, "family", "transformer")
        raise UserError(f"lmlab plan cannot trace a training step of this '{family}' model on fake tensors: "
                        f"{type(e).__name__} ({e}) needs real values; measure its peak with a short run instead "
                        f"(the run's manifest records peak_memory_gib)") from None


def _trace_step(verb: str, model_cfg, cfg, shape, target_device: str) -> Traced:
    """trace_step's work.

    DDP's reducer reads its buckets' data, which fake tensors do not have, so a DDP process is
    traced as one plain process plus the buckets: a flat copy of the trainable parameters'
    gradients that DDP allocates when it wraps the model and keeps for the whole run.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lmlab.models.family import get_family
    from lmlab.train.optim import build_optimizer
    from lmlab.train.parallelize import grad_sync, parallelize

    t, family = cfg.train, get_family(getattr(model_cfg, "family", "transformer"))
    parallel = cfg.parallel.model_copy(update={"activation_checkpointing": shape.checkpointing,
                                               "fsdp_param_dtype": "bfloat16" if shape.fsdp_param_bf16 else "float32",
                                               "reshard_after_forward": shape.reshard_after_forward})
    amp = torch.bfloat16 if shape.bf16 else None
    strategy = "none" if shape.strategy == "ddp" else shape.strategy
    distributed = strategy == "fsdp"
    start = time.perf_counter()
    with fake_process_group(shape.world) if distributed else contextlib.nullcontext():
        mesh = None
        if distributed:
            from torch.distributed.device_mesh import init_device_mesh
            mesh = init_device_mesh("cpu", (shape.world,))  # outside the fake mode: it reads real ranks
        # built (and given its adapters) on the meta device, then made fake: PEFT moves its
        # adapters with Module.to, which cannot swap a fake parameter; and no init runs
        with torch.device("meta"):
            model = family.build(model_cfg)
        lora = getattr(cfg, "lora", None)
        if lora is not None and lora.enabled:
            from lmlab.models.lora import apply_lora
            model = apply_lora(model, lora)
        tensors, counter = _meta_tensors(model), LiveBytes()
        with FakeTensorMode() as mode, counter:
            _make_fake(tensors, mode, counter)
            del tensors  # the converter keeps each fake tensor while its meta tensor lives
            forward_model = parallelize(model, strategy, parallel, torch.device("cpu"), amp,
                                        compile=False, mesh=mesh)
            optimizer = build_optimizer(model, t.lr, t.weight_decay, t.betas, torch.device(target_device))
            trainable = [p for p in model.parameters() if p.requires_grad]
            # AdamW allocates its moments at its first step: take one on zero gradients, so the
            # traced step runs with them allocated, as every step after the first does
            counter.phase = "optimizer step"
            for p in trainable:
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            passes, n_total = min(shape.forwards, 2), 0  # a third pass holds what the second did
            for i in range(passes):
                counter.phase = "forward/backward"
                with grad_sync(forward_model, strategy, sync=i == passes - 1):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=shape.bf16):
                        loss, n = _micro_loss(verb, forward_model, shape.rows, shape.seq,
                                              _vocab(model_cfg), shape.packed_mask)
                    loss.backward()
                    del loss
                n_total += n
            counter.phase = "optimizer step"
            for p in trainable:
                p.grad.div_(n_total)
            torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip or float("inf"))
            optimizer.step()
            opt_bytes = _bytes(v for state in optimizer.state.values() for v in state.values()
                               if isinstance(v, torch.Tensor))
            optimizer.zero_grad(set_to_none=True)
            weights = _bytes(model.parameters())
            grads = _bytes(trainable)
            params = sum(p.numel() for p in model.parameters())
            n_trainable = sum(p.numel() for p in trainable)
    buckets = grads if shape.strategy == "ddp" else 0
    return Traced(peak=counter.peak + buckets, peak_phase=counter.peak_phase, weights=weights, gradients=grads,
                  optimizer=opt_bytes, ddp_buckets=buckets, params=params, trainable=n_trainable,
                  seconds=time.perf_counter() - start)


def _meta_tensors(model: torch.nn.Module) -> list[tuple[dict, str, torch.Tensor, torch.Tensor]]:
    """Every (parameter, buffer or tensor-attribute table, name, tensor, its detached data) of the
    meta model, taken before the fake mode runs (which refuses a meta tensor as an op's input).
    Tensor attributes: tables a module keeps outside its buffers (the transformer's RoPE)."""
    return [(table, name, t, t.detach()) for module in model.modules()
            for table in (module._parameters, module._buffers, vars(module))
            for name, t in table.items() if isinstance(t, torch.Tensor)]


def _make_fake(tensors: list, mode, counter: LiveBytes) -> None:
    """Replace the meta model's parameters and buffers by fake CPU tensors of the same shapes
    (a tied parameter stays one), each counted as held."""
    made: dict[int, torch.Tensor] = {}
    for table, name, t, data in tensors:
        if id(t) not in made:
            f = mode.fake_tensor_converter.from_meta_and_device(mode, data, torch.device("cpu"))
            made[id(t)] = torch.nn.Parameter(f, requires_grad=t.requires_grad) \
                if isinstance(t, torch.nn.Parameter) else f
            counter.hold(f)
        table[name] = made[id(t)]


def _vocab(model_cfg) -> int:
    return int(model_cfg.vocab_size)
