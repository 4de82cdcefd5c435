"""`lmlab tpu`: the gcloud commands that run an lmlab verb on every worker of a Cloud TPU VM.

    lmlab tpu trm data=runs/s/puzzles out=runs/s/trm train.steps=20000 --tpu my-v4-64 --zone us-central2-b
    lmlab tpu puzzles kind=sudoku out=runs/s/puzzles --tpu my-v4-64 --zone us-central2-b --run
    lmlab tpu trm ... --tpu my-v4-8 --zone us-central2-b --setup --run     # copy + install, then run

It prints (and with --run executes, in order, stopping at the first that fails):
1. with --setup: this checkout packed into a tarball (`git ls-files`: what is committed or
   added, not runs/ or .venv), copied to every worker with `gcloud compute tpus tpu-vm scp
   --worker=all`, and installed there into a virtual environment (the CPU build of torch,
   lmlab with the jax extra, `jax[tpu]`, recurrentgemma without its dependencies);
2. the run: `gcloud compute tpus tpu-vm ssh NAME --worker=all --command '...'`, the same
   command on every worker. A verb with a JAX backend (trm) gets `backend=jax` and
   `LMLAB_TPU_POD=1`: each worker finds its process index, the worker count and worker 0's
   address from the TPU VM (lmlab.jax_backend.tpu_pod_env), so every host joins one
   jax.distributed run and one mesh of all chips; process 0 writes the run directory, on worker
   0's disk. A data verb (puzzles, tokenize ...) runs on each worker alone, so each has its copy.
3. the command that copies the finished run back from worker 0.

The verb's arguments are validated here as `lmlab VERB` would (a typo fails now, not on the
pod). A training verb without a JAX backend is refused, naming those with one. docs/tpu.md
walks through a v4-8 and a v4-64. (These commands cannot be tried from lmlab's development
machines, which reach no cloud: tests/test_tpu.py runs them against a stand-in `gcloud` that
records its arguments.)
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from lmlab.config import OneLineParser, load_config, stage_arguments
from lmlab.errors import UserError
from lmlab.stages import STAGES, training_verbs

ROOT = Path(__file__).resolve().parent.parent  # the checkout lmlab runs from
DIR, VENV, PORT = "~/lmlab", "~/lmlab-venv", 29500


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="lmlab tpu", usage="lmlab tpu VERB [--config F.yaml] [key=value ...] --tpu NAME --zone ZONE "
                "[--project P] [--setup] [--run]", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--tpu", required=True, metavar="NAME", help="the TPU VM's name (gcloud compute tpus tpu-vm list)")
    p.add_argument("--zone", required=True, metavar="ZONE", help="its zone, e.g. us-central2-b")
    p.add_argument("--project", metavar="PROJECT", help="the Google Cloud project (default: gcloud's)")
    p.add_argument("--setup", action="store_true", help="first copy this checkout to every worker and install it")
    p.add_argument("--run", action="store_true", help="execute the commands (default: print them)")
    p.add_argument("--port", type=int, default=PORT, help=f"MASTER_PORT on worker 0 (default {PORT}; JAX's "
                   f"coordinator takes the next one)")
    p.add_argument("--src", default=str(ROOT), metavar="DIR", help="the lmlab checkout to copy (default: this one)")
    return p


def _where(o) -> list[str]:
    return ["--zone", o.zone, *(["--project", o.project] if o.project else [])]


def ssh(o, command: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", o.tpu, *_where(o), "--worker=all", "--command", command]


def scp(o, *paths: str, worker: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", *paths, *_where(o), f"--worker={worker}"]


def install_command() -> str:
    pip = f"{VENV}/bin/pip install -q"
    return " && ".join([
        "set -e", f"mkdir -p {DIR}", f"tar xzf ~/lmlab-src.tar.gz -C {DIR}", f"python3 -m venv {VENV}",
        # the CPU build of torch: the default wheel would pull several GB of CUDA libraries onto a TPU VM
        f"{pip} torch --index-url https://download.pytorch.org/whl/cpu",
        f'{pip} -e "$HOME/lmlab[jax]" "jax[tpu]"',  # (quoted: no ~ expansion, so $HOME)
        f"{pip} --no-deps recurrentgemma==1.0.1",
    ])


def run_command(verb: str, args: list[str], jax: bool, port: int) -> str:
    env = f"LMLAB_TPU_POD=1 MASTER_PORT={port} " if jax else ""
    return f"cd {DIR} && {env}{VENV}/bin/python -m lmlab {verb} " + " ".join(shlex.quote(a) for a in args)


def plan(verb: str, stage_args: list[str], o, tarball: str = "lmlab-src.tar.gz") -> dict:
    """The commands, in order; raises UserError naming what is wrong."""
    if verb not in STAGES:
        raise UserError(f"{verb!r} is not an lmlab verb; e.g. lmlab tpu trm data=runs/s/puzzles --tpu NAME --zone Z")
    module = importlib.import_module(STAGES[verb][0])
    if not hasattr(module, "Config"):
        raise UserError(f"`lmlab {verb}` is not a stage lmlab tpu runs (it takes no stage config)")
    jax = "backend" in module.Config.model_fields
    if verb in training_verbs() and not jax:
        jax_verbs = [v for v in training_verbs()
                     if "backend" in getattr(importlib.import_module(STAGES[v][0]), "Config").model_fields]
        raise UserError(f"`lmlab {verb}` has no JAX backend, so it cannot use the TPU's chips; lmlab tpu trains "
                        f"{', '.join(jax_verbs)} (data stages such as puzzles run on every worker as given)")
    args = list(stage_args)
    if jax and not any(a.startswith("backend=") for a in args):
        args.append("backend=jax")
    config_file, overrides = stage_arguments(verb, module, args, hint="the tpu options are listed by "
                                             "`lmlab tpu --help`, and ")
    cfg = load_config(module.Config, config_file, overrides)
    if jax and cfg.backend != "jax":
        raise UserError(f"lmlab tpu runs {verb} with backend=jax (got backend={cfg.backend})")
    steps = []
    if o.setup:
        steps.append(("pack", None))
        steps.append(("copy", scp(o, tarball, f"{o.tpu}:~/lmlab-src.tar.gz", worker="all")))
        steps.append(("install", ssh(o, install_command())))
    steps.append(("run", ssh(o, run_command(verb, args, jax, o.port))))
    out = getattr(cfg, "out", None)
    fetch = None
    if out:
        remote = out if str(out).startswith(("/", "~")) else f"{DIR}/{out}"
        fetch = scp(o, "--recurse", f"{o.tpu}:{remote}", str(Path(out).parent), worker="0")
    return {"steps": steps, "fetch": fetch, "verb": verb}


def pack(src: Path, dest: Path) -> Path:
    """The checkout's tracked files (git ls-files: committed or added) as a .tar.gz."""
    if shutil.which("git") is None or not (src / ".git").exists():
        raise UserError(f"--src {src} is not a git checkout (lmlab tpu --setup copies what git tracks there); give "
                        f"--src with the lmlab checkout to copy")
    files = subprocess.run(["git", "-C", str(src), "ls-files", "-z", "--cached"], capture_output=True, check=True)
    listed = [f for f in files.stdout.decode().split("\0") if f and (src / f).is_file()]
    subprocess.run(["tar", "czf", str(dest), "-C", str(src), "--null", "-T", "-"], check=True,
                   input="\0".join(listed).encode())
    return dest


def show(step: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in step)


def main(argv: list[str]) -> int:
    ns, rest = build_parser().parse_known_args(argv)
    if not rest or rest[0].startswith("-"):
        what = f"unknown option {rest[0]}" if rest else "no verb given"
        raise UserError(f"{what}: write lmlab tpu VERB [key=value ...] --tpu NAME --zone ZONE (see `lmlab tpu --help`)")
    with tempfile.TemporaryDirectory(prefix="lmlab-tpu-") as tmp:
        tarball = Path(tmp) / "lmlab-src.tar.gz"
        job = plan(rest[0], rest[1:], ns, str(tarball) if ns.run else "lmlab-src.tar.gz")
        if ns.run and shutil.which("gcloud") is None:
            raise UserError("gcloud is not on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/"
                            "install) and run `gcloud auth login`, or leave out --run and run the printed commands")
        for name, step in job["steps"]:
            if name == "pack":
                line = f"(cd {shlex.quote(ns.src)} && git ls-files -z | tar czf lmlab-src.tar.gz --null -T -)"
                print(f"# copy this checkout to every worker and install it\n{line}")
                if ns.run:
                    pack(Path(ns.src).expanduser().resolve(), tarball)
                continue
            if name == "run":
                print(f"# run `lmlab {job['verb']}` on every worker")
            print(show(step), flush=True)
            if ns.run:
                r = subprocess.run(step)
                if r.returncode:
                    raise UserError(f"`{show(step[:6])} ...` ({name}) exited with {r.returncode}; its output is above")
    if job["fetch"]:
        print(f"# then copy the run back from worker 0 (process 0 wrote it)\n{show(job['fetch'])}")
    return 0
