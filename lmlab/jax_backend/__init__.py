"""lmlab's JAX backend (the optional `jax` extra: `pip install 'lmlab[jax]'`), for the two
families our users train on TPUs: TRM (lmlab.jax_backend.trm) and, later, Griffin.

The core install never imports this package. `require_jax()` is what a stage calls first: a
missing extra is one clear error naming the pip command, not an ImportError traceback.
The PyTorch side stays the reference: the same configs (lmlab.models.trm.config), weights
convertible both ways, parity tests against the torch model (tests/test_jax_trm.py).
"""

from __future__ import annotations

from lmlab.errors import UserError

PACKAGES = ("jax", "flax", "optax")
INSTALL = "pip install 'lmlab[jax]'  (jax, flax, optax, orbax-checkpoint; on TPU: pip install 'jax[tpu]')"


METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"


def _metadata(key: str) -> str:
    """A GCE metadata attribute of this VM (what a TPU VM's worker learns about its pod)."""
    import urllib.request

    req = urllib.request.Request(METADATA + key, headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read().decode().strip()


def tpu_pod_env(environ=None, metadata=_metadata) -> dict[str, str] | None:
    """Under LMLAB_TPU_POD=1 (set by `lmlab tpu`) and without torchrun's variables: RANK,
    WORLD_SIZE, LOCAL_RANK and MASTER_ADDR (MASTER_PORT: 29500 unless set) of this TPU VM
    worker, from TPU_WORKER_ID and TPU_WORKER_HOSTNAMES when set (as on GKE), else from the
    metadata server's agent-worker-number and worker-network-endpoints (entries
    `id:name:IP`), the two sources JAX's own TPU cluster detection reads. None otherwise."""
    import os

    environ = os.environ if environ is None else environ
    if environ.get("LMLAB_TPU_POD") != "1" or ("RANK" in environ and "WORLD_SIZE" in environ):
        return None
    try:
        if "TPU_WORKER_ID" in environ and "TPU_WORKER_HOSTNAMES" in environ:
            rank, hosts = int(environ["TPU_WORKER_ID"]), environ["TPU_WORKER_HOSTNAMES"].split(",")
        else:
            rank = int(metadata("agent-worker-number"))
            hosts = [e.split(":")[2] for e in metadata("worker-network-endpoints").split(",")]
    except (OSError, ValueError, IndexError) as e:
        raise UserError(f"LMLAB_TPU_POD=1 but this machine does not say which TPU worker it is ({type(e).__name__}: "
                        f"{e}); run on a Cloud TPU VM (lmlab tpu ...), or set RANK, WORLD_SIZE, MASTER_ADDR and "
                        f"MASTER_PORT yourself") from None
    hosts = [h.strip() for h in hosts if h.strip()]
    if not 0 <= rank < len(hosts):
        raise UserError(f"TPU worker {rank} is not among the {len(hosts)} workers listed ({', '.join(hosts)})")
    return {"RANK": str(rank), "WORLD_SIZE": str(len(hosts)), "LOCAL_RANK": "0", "MASTER_ADDR": hosts[0],
            "MASTER_PORT": environ.get("MASTER_PORT", "29500")}


def init_distributed(timeout_s: float | None = None) -> int:
    """Join the other hosts' JAX processes when launched as several (-> the process count).

    Launched like torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: torchrun sets them,
    export them on every host, or, on a TPU VM under `lmlab tpu`, tpu_pod_env finds them), each
    process joins `jax.distributed` at the coordinator MASTER_ADDR:MASTER_PORT+1 (or
    $LMLAB_JAX_COORDINATOR), as process RANK of WORLD_SIZE, before
    any JAX computation; the device mesh then spans every host's devices. (lmlab's rank-0 writes
    and barriers go through torch.distributed's CPU group on MASTER_PORT, as for every stage.)
    CPU devices reduce over gloo. A coordinator that does not answer within `timeout_s`
    ($LMLAB_JAX_INIT_TIMEOUT, default 300 s) is one clear error."""
    import os

    from lmlab import dist as lmdist

    pod = tpu_pod_env()
    if pod:  # a TPU VM worker started by `lmlab tpu`: the launch variables from the TPU runtime
        os.environ.update(pod)
    env = lmdist.read_env()
    if env.world == 1:
        return 1
    import jax

    coordinator = os.environ.get("LMLAB_JAX_COORDINATOR")
    if not coordinator:
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not addr or not port:
            raise UserError(f"launched as process {env.rank} of {env.world} but MASTER_ADDR/MASTER_PORT are not set: "
                            f"export them (the first host and a free port) or LMLAB_JAX_COORDINATOR=HOST:PORT")
        coordinator = f"{addr}:{int(port) + 1}"
    timeout = int(timeout_s if timeout_s is not None else float(os.environ.get("LMLAB_JAX_INIT_TIMEOUT", "300")))
    if env.rank != 0 and not _reachable(coordinator, timeout):
        # jax aborts the process (no exception) when its deadline passes: look first, and say so
        raise UserError(f"process {env.rank} of {env.world}: the JAX coordinator at {coordinator} did not answer "
                        f"within {timeout} s; start process 0 (RANK=0) on that host, check the address and port, or "
                        f"raise LMLAB_JAX_INIT_TIMEOUT")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices of several processes
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=env.world, process_id=env.rank,
                                   initialization_timeout=timeout)
    except Exception as e:  # jaxlib raises XlaRuntimeError (DEADLINE_EXCEEDED, UNAVAILABLE ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"process {env.rank} of {env.world} could not join the JAX coordinator at {coordinator} within "
                        f"{timeout} s ({first}); check that process 0 is running and reachable on that port "
                        f"(LMLAB_JAX_COORDINATOR, LMLAB_JAX_INIT_TIMEOUT)") from None
    return env.world


def _reachable(address: str, timeout_s: float) -> bool:
    """Whether a TCP connection to HOST:PORT succeeds within `timeout_s` (retried every 0.2 s)."""
    import socket
    import time

    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def enable_compile_cache() -> None:
    """Keep compiled programs on disk (JAX's persistent compilation cache), so a resumed run, a
    rerun or another run of the same shapes skips XLA's compile (seconds on a CPU, minutes for a
    large model on a pod). $LMLAB_JAX_CACHE names the directory (default ~/.cache/lmlab/jax;
    `off` disables it); a cache the user configured for JAX is left alone."""
    import os
    from pathlib import Path

    import jax

    path = os.environ.get("LMLAB_JAX_CACHE", str(Path("~/.cache/lmlab/jax").expanduser()))
    if path.lower() in ("", "0", "off", "none") or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # not the many tiny programs


def compute_dtype(dtype: str, platform: str) -> str:
    """A `dtype` setting (auto, float32, bfloat16) for JAX on `platform`: auto is bfloat16 on TPUs
    and GPUs, float32 on CPUs (XLA's CPU build gained only 1.1x from bf16 on a CPU with AVX512-BF16,
    torch's autocast 1.6x: docs/jax.md)."""
    if dtype == "auto":
        return "bfloat16" if platform in ("tpu", "gpu", "cuda", "rocm") else "float32"
    return dtype


def require_jax() -> None:
    """UserError naming the pip command unless jax, flax and optax import."""
    import importlib.util

    missing = [p for p in PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise UserError(f"backend=jax needs {', '.join(missing)}, which are not installed; {INSTALL}")
