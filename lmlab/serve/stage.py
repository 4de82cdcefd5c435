"""`lmlab serve`: an OpenAI-compatible server and a web chat for a model run directory.

    lmlab serve runs/sft                                   # http://127.0.0.1:8000, web chat at /
    lmlab serve runs/sft port=0                            # any free port (printed)
    lmlab serve runs/sft host=0.0.0.0 api_key=$KEY         # reachable from elsewhere: a key is required
    lmlab serve runs/sft max_batch=32 max_tokens=512 cors_origins='[http://localhost:3000]'

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "Hi"}])

The model answers with its own chat template (the run's chat.json, else chatml; a tokenizer
with neither still serves /v1/completions, and chat answers 400); the model id
is the run directory's name unless `name=` says otherwise. Requests are decoded together by a
continuous-batching scheduler (lmlab.serve.scheduler); the limits below keep a public demo
alive. Once the server accepts connections it prints `serve: listening on URL (model ID)`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from lmlab.config import Strict
from lmlab.errors import UserError

POSITIONAL = ("model", "model run directory (model.safetensors, model.json, tokenizer/, chat.json)")


class Config(Strict):
    model: str = Field("", description="model run directory to serve")
    name: Optional[str] = Field(None, description="model id clients ask for (default: the run directory's name)")
    template: Optional[str] = Field(None, description="chat template; default: the run's chat.json, else chatml")
    host: str = Field("127.0.0.1", description="address to bind; anything but loopback needs api_key")
    port: int = Field(8000, ge=0, le=65535, description="port to bind; 0 = any free port")
    api_key: Optional[str] = Field(None, description="require `Authorization: Bearer KEY` on /v1 and /metrics "
                                   "(default: $LMLAB_API_KEY, else none)")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed to call the API from a "
                                    "browser (CORS); empty = CORS off")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    context: Optional[int] = Field(None, ge=8, description="prompt + completion tokens per request (default: the "
                                   "model's max_seq_len)")
    truncate: Literal["refuse", "oldest", "sinks"] = Field(
        "refuse", description="a prompt + reply longer than the context: refuse (400), drop the oldest messages / "
        "tokens, or read and write past it with attention sinks (a transformer keeps the first `sinks` tokens and "
        "the most recent ones)")
    sinks: int = Field(4, ge=1, description="attention sinks kept with truncate=sinks")
    max_batch: int = Field(16, ge=1, description="sequences decoded together at most")
    max_queue: int = Field(64, ge=1, description="sequences waiting for a slot at most; then 429")
    max_tokens: int = Field(1024, ge=1, description="most tokens per completion (and the default when a request "
                            "sets none, as far as the context allows)")
    max_n: int = Field(8, ge=1, description="most completions per request (n)")
    max_messages: int = Field(500, ge=1, description="most messages per chat request")
    max_message_chars: int = Field(8000, ge=1, description="most characters per message")
    max_prompt_chars: int = Field(32000, ge=1, description="most characters in all of a request's messages")
    request_timeout: float = Field(300.0, gt=0, description="seconds a request may take; then 408")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
            raise UserError(f"port {port} on {host} is in use: pick another with port=N (port=0 takes a free one)") \
                from None
        raise UserError(f"cannot bind {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(cfg: Config) -> int:
    import uvicorn

    from lmlab.infer.prompting import resolve_template
    from lmlab.models import load_model
    from lmlab.runtime import pick_device
    from lmlab.serve.app import create_app

    if not cfg.model:
        raise UserError("no model given; run `lmlab serve RUN_DIR`")
    key = cfg.api_key or os.environ.get("LMLAB_API_KEY") or None
    if not _is_loopback(cfg.host) and not key:
        raise UserError(f"binding {cfg.host} makes the server reachable from other machines: set api_key=KEY "
                        f"(or $LMLAB_API_KEY) so only clients with the key can use it")
    run_dir = Path(cfg.model)
    if not (run_dir / "model.json").is_file():
        raise UserError(f"{run_dir} is not a model run directory (no model.json); give the output of "
                        f"pretrain, sft, dpo, grpo or import")
    sock = _bind(cfg.host, cfg.port)  # before the weights load: a busy port fails in a second
    device = pick_device(cfg.device)
    model, tokenizer, _ = load_model(run_dir, device=device)
    if getattr(model, "family", "transformer") not in ("transformer", "griffin") or not hasattr(model, "new_cache"):
        raise UserError(f"{run_dir} holds a {model.family} model, which does not generate text")
    model.eval()
    try:
        template = resolve_template(run_dir, tokenizer, cfg.template)
    except UserError:
        if cfg.template:  # asked for by name: its error stands
            raise
        # a base model whose tokenizer has no chat tokens still serves /v1/completions
        template = None
        print(f"serve: {run_dir} has no chat template its tokenizer can render (no chat.json, no chatml tokens): "
              f"/v1/chat/completions answers 400; pass template=NAME to choose one", file=sys.stderr)
    model_id = cfg.name or run_dir.resolve().name
    settings = cfg.model_copy(update={"api_key": key})
    created = int((run_dir / "model.json").stat().st_mtime)
    app = create_app(model, tokenizer, template, model_id, settings, created=created)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("lmlab.serve").setLevel(logging.INFO)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            print(f"serve: listening on {url} (model {model_id}, template {template}, context "
                  f"{settings.context or model.cfg.max_seq_len}, batch {cfg.max_batch}; web chat at {url}/)",
                  flush=True)

    server = Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0
