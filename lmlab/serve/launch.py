"""`lmlab serve` in a subprocess, for programs that drive a real server (the serving benchmark,
the tests).

    with serve_process(run_dir, log_path, "max_batch=16") as (url, model_id):
        ...                                       # http://127.0.0.1:PORT, any free port

Waits for the `serve: listening on URL (model ID, ...)` line the server prints once it accepts
connections (a UserError with the end of its log when it exits or stays silent), and
stops it when the block ends (terminate, then kill after 15 s).
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional

from lmlab.errors import UserError

LISTENING = "serve: listening on "


@contextlib.contextmanager
def serve_process(run_dir: str | Path, log_path: str | Path, *options: str, env: Optional[dict] = None,
                  timeout: float = 120.0, cwd: Optional[str | Path] = None) -> Iterator[tuple[str, str]]:
    """Run `python -m lmlab serve RUN_DIR port=0 OPTIONS...` until the block ends: yields (url, model id)."""
    env = dict(os.environ if env is None else env, LMLAB_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "lmlab", "serve", str(Path(run_dir).resolve()), "port=0", *options]
    log_path = Path(log_path)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=log, text=True)
        lines: queue.Queue = queue.Queue()

        def drain():  # keep reading stdout so that the server never blocks on a full pipe
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=drain, daemon=True).start()
        try:
            line = ""
            while LISTENING not in line:
                try:
                    line = lines.get(timeout=timeout)
                except queue.Empty:
                    line = None
                if line is None:
                    code = proc.poll()
                    raise UserError(f"lmlab serve {'exited (' + str(code) + ')' if code is not None else 'stayed silent'}"
                                    f" before listening; its log:\n{log_path.read_text()[-3000:]}")
            url, rest = line.split(LISTENING, 1)[1].split(" (model ", 1)
            yield url.rstrip("/"), rest.split(",")[0].rstrip(")\n").strip()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
