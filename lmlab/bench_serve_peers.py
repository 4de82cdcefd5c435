"""The peers that `lmlab bench serve` (lmlab/bench_serve.py) measures beside lmlab's own server:
llama.cpp's and vLLM's OpenAI servers, each started from a venv of its own on the model's
export and sent the same requests; and Side, the record that describes every server under
test, lmlab's too (here, below bench_serve, so that the peers can build theirs).

- llama.cpp: llama-cpp-python's OpenAI server (`python -m llama_cpp.server`, `llamacpp_python`,
  default $LMLAB_LLAMACPP_PYTHON or /work/peers/llamacpp-venv/bin/python) on the model's f32
  GGUF export (not llama.cpp's C++ `llama-server`, which batches with `--parallel`). Its
  /v1/completions takes text only, so it gets each prompt decoded (the bench checks with its
  /extras/tokenize that llama.cpp reads the same token ids, bos included). It has no
  `ignore_eos`: `min_tokens` = max_tokens (eos masked) and a logit bias of -1e9 on every special
  token give fixed-length completions; its stream has no `usage`, so a completion that ends with
  finish_reason "length" counts max_tokens tokens. It serialises requests (one lock around the
  model) and by default cuts a stream short when another request arrives (`interrupt_requests`):
  the bench turns that off, and `logits_all` too (only logprobs need it).
- vLLM: its OpenAI server (`python -m vllm.entrypoints.openai.api_server`, `vllm_python`,
  default $LMLAB_VLLM_PYTHON) on the model's HF export, float32, the same token-id prompts and
  `ignore_eos`; VLLM_CPU_KVCACHE_SPACE=1 (GiB) and VLLM_CPU_OMP_THREADS_BIND=nobind unless set.
  Up to 5 minutes to start.
`threads=N`: llama.cpp's n_threads and n_threads_batch, vLLM's OMP_NUM_THREADS (0: their defaults).
A peer that cannot start raises PeerError (or any error) with the reason, which bench_serve
reports as not measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

LLAMACPP = "llama.cpp (llama-cpp-python server)"
VLLM = "vLLM (vllm-cpu)"
LLAMACPP_VENV = Path("/work/peers/llamacpp-venv/bin/python")  # where this project's machines have it
PEER_START_S = {LLAMACPP: 120, VLLM: 300}
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only: no proxy


class PeerError(Exception):
    """A peer that cannot be measured: the message says why."""


@dataclass
class Side:
    """One server under test: where it is and how its requests differ."""
    name: str
    url: str
    model: str
    prompts: list                   # token-id lists, or their decoded text (llama.cpp)
    body: Callable[[int], dict]     # the extra request fields for n tokens
    threads: str                    # what it runs on, in words
    key: str = "unused"
    notes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def client(self):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key, max_retries=0, timeout=600)


def _peer_python_setting(value: Optional[str], env: str, default: Optional[Path], name: str, how: str):
    """The peer's python (a Path) or why it is not measured (a str)."""
    if value is not None and value.strip().lower() in ("", "none", "off", "false"):
        return f"not measured: turned off ({how.split('=')[0]}={value!r})"
    p = value or os.environ.get(env) or (str(default) if default and default.is_file() else "")
    if not p:
        return f"not measured: no {name} python given ({how} or ${env})"
    if not Path(p).is_file():
        return f"not measured: {p} is not a file ({how} or ${env})"
    return Path(p)


def _llamacpp_python(cfg):
    return _peer_python_setting(getattr(cfg, "llamacpp_python", None), "LMLAB_LLAMACPP_PYTHON", LLAMACPP_VENV,
                                "llama-cpp-python", "llamacpp_python=PATH to a venv's python with "
                                "llama-cpp-python[server]")


def _vllm_python(cfg):
    return _peer_python_setting(getattr(cfg, "vllm_python", None), "LMLAB_VLLM_PYTHON", None, "vLLM",
                                "vllm_python=PATH to a venv's python with vllm (vllm-cpu)")


def _short(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}" if not isinstance(e, PeerError) else str(e)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _version(py: Path, code: str, what: str) -> str:
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=180)
    if r.returncode:
        last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1:] or ["(no output)"]
        raise PeerError(f"{what} does not import in {py}: {last[0].strip()}")
    return r.stdout.strip().splitlines()[-1]


def _log_reason(log_path: Path) -> str:
    """The error a failed peer left in its log: its last line naming an error, else its last line."""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln.lower()]
    return (errors or lines or ["(empty log)"])[-1][:400]


def _get(url: str, timeout: float = 5):
    with HTTP.open(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def _post(url: str, body: dict, timeout: float = 30):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with HTTP.open(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


@contextlib.contextmanager
def _peer_process(cmd: list[str], env: dict, log_path: Path, url: str, timeout: float):
    """Run a peer server until the block ends, once GET url/v1/models answers (PeerError: why not)."""
    with open(log_path, "w") as log:
        # a session of its own: the peer's workers (vLLM's engine core) go with it
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise PeerError(f"its server exited ({proc.returncode}) before serving: {_log_reason(log_path)}")
                try:
                    _get(url + "/v1/models")
                    break
                except (OSError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise PeerError(f"its server was not serving after {timeout:.0f} s: {_log_reason(log_path)}")
                time.sleep(1)
            yield proc
        finally:
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue


def _peer_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _export(run_dir: Path, out: Path, what: str, **kw) -> Path:
    from lmlab.models.export import Config as ExportConfig
    from lmlab.models.export import run as export

    try:
        return Path(export(ExportConfig(model=str(run_dir), out=str(out), **kw)))
    except Exception as e:  # noqa: BLE001 - e.g. a family that has no such export
        raise PeerError(f"the model does not export to {what}: {_short(e)}") from e


def _start_llamacpp(stack, py: Path, run_dir: Path, tok, prompts, cfg, info, batch: int, tmp: Path) -> Side:
    version = _version(py, "import llama_cpp, llama_cpp.server.app; print(llama_cpp.__version__)",
                       "llama_cpp.server (pip install 'llama-cpp-python[server]')")
    gguf = _export(run_dir, tmp / "model.gguf", "GGUF", dtype="f32")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    threads = (["--n_threads", str(cfg.threads), "--n_threads_batch", str(cfg.threads)] if cfg.threads else [])
    cmd = [str(py), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "lmlab", "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(info["context"]), "--interrupt_requests", "False",
           "--logits_all", "False", *threads]
    stack.enter_context(_peer_process(cmd, _peer_env(cfg.threads), tmp / "llamacpp.log", url,
                                      PEER_START_S[LLAMACPP]))
    texts = [tok.decode(p) for p in prompts]
    same = sum(_post(url + "/extras/tokenize", {"input": t})["tokens"] == p for t, p in zip(texts, prompts))
    bias = {str(i): -1e9 for i in sorted(set(tok.special_tokens.values()) | {tok.eos_id})}
    side = Side(LLAMACPP, url, "lmlab", texts,
                lambda n: {"min_tokens": n, "logit_bias": bias, "repeat_penalty": 1.0},
                (f"--n_threads {cfg.threads} --n_threads_batch {cfg.threads}" if cfg.threads else
                 f"its default threads (n_threads {max(os.cpu_count() // 2, 1)}, n_threads_batch {os.cpu_count()})")
                + ", f32 GGUF, --interrupt_requests False --logits_all False")
    side.notes = [f"text prompts (its /v1/completions takes no token ids): {same}/{len(prompts)} read back as the "
                  "same token ids, bos included",
                  f"fixed length: min_tokens=max_tokens and logit_bias -1e9 on the {len(bias)} special tokens "
                  "(no ignore_eos); tokens counted from finish_reason 'length' (no usage in its stream)",
                  "one request at a time: the server holds one lock around the model (no batching)"]
    side.info = {"version": version, "prompts_same_tokens": same, "command": cmd}
    return side


def _start_vllm(stack, py: Path, run_dir: Path, tok, prompts, cfg, info, batch: int, tmp: Path) -> Side:
    version = _version(py, "import vllm; print(vllm.__version__)", "vllm")
    hf = _export(run_dir, tmp / "hf", "Hugging Face")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = _peer_env(cfg.threads) | {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf), "--served-model-name", "lmlab",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", str(info["context"]),
           "--max-num-seqs", str(batch), "--seed", str(cfg.seed)]
    stack.enter_context(_peer_process(cmd, env, tmp / "vllm.log", url, PEER_START_S[VLLM]))
    side = Side(VLLM, url, "lmlab", prompts, lambda n: {"ignore_eos": True},
                (f"OMP_NUM_THREADS={cfg.threads}" if cfg.threads else "its default threads")
                + f", VLLM_CPU_OMP_THREADS_BIND={env['VLLM_CPU_OMP_THREADS_BIND']}, float32, "
                  f"--max-num-seqs {batch}")
    side.notes = ["the same token-id prompts, ignore_eos, usage in its stream; continuous batching"]
    if cfg.threads and cfg.threads >= (os.cpu_count() or 1):
        side.notes.append(f"its worker's {cfg.threads} threads share the {os.cpu_count()} cores with its API server "
                          "and engine-core processes (its own default leaves one core to them)")
    side.info = {"version": version, "command": cmd}
    return side
