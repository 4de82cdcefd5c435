"""`lmlab slurm`: write (and with --submit, submit) an sbatch script that runs a training verb on a cluster.

    lmlab slurm pretrain --config configs/stages/pretrain_tiny.yaml data=runs/packed \\
        --nodes 2 --gpus-per-node 4 --time 12:00:00 --partition gpu --submit
    lmlab slurm --from configs/slurm/four_nodes_4gpu.yaml sft init=runs/tiny data=chat.jsonl --submit

Everything after the slurm options is what `lmlab VERB` takes (`--config F.yaml`, key=value
overrides); it is validated here, as `lmlab VERB` would build it, so a typo fails now and not
hours later in the queue. `--from F.yaml` reads the slurm options from a file (their names
with underscores, see configs/slurm/); options on the command line win.

The script asks for N nodes with one task each; on every node `srun` starts one `torchrun`
with K processes of `lmlab VERB ...`, meeting at a c10d rendezvous on the first node. A
relative `out` is put under the checkpoint root (--root: default $SCRATCH/lmlab when SCRATCH
is set, else the current directory), the script and its log in `slurm/` beside the run. Shortly
before the time limit SLURM sends the batch shell SIGUSR1 (--signal-seconds); the script sends
SIGTERM to every training process, which saves a checkpoint and stops, and requeues the job,
whose rerun of the same command continues from that checkpoint. docs/cluster.md has the rest.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from pydantic import Field

from lmlab import __version__
from lmlab.artifacts import check_out
from lmlab.config import (OneLineParser, Strict, build_config, load_config, parse_override, read_yaml,
                          stage_arguments)
from lmlab.errors import Preempted, UserError
from lmlab.stages import STAGES, training_verbs


class Options(Strict):
    """The slurm options: flags on the command line (`--gpus-per-node`) or keys of a --from file."""

    nodes: int | None = Field(None, description="nodes to run on (one torchrun per node); required")
    gpus_per_node: int | None = Field(None, description="GPUs per node; 0 for a CPU job (then give "
                                      "--procs-per-node); required")
    procs_per_node: int | None = Field(None, description="training processes per node (default: one per GPU)")
    cpus_per_task: int | None = Field(None, description="CPU cores per node for the torchrun and its processes "
                                      "(default: one per process)")
    time: str | None = Field(None, description="time limit, HH:MM:SS or D-HH:MM:SS; required")
    partition: str | None = Field(None, description="SLURM partition (default: the site's default)")
    account: str | None = Field(None, description="account to charge (default: your default account)")
    root: str | None = Field(None, description="checkpoint root: a relative out= is put under it (default: "
                             "$SCRATCH/lmlab when SCRATCH is set, else the current directory)")
    modules: list[str] | str | None = Field(None, description="environment modules to load first, e.g. "
                                            "'cuda python' (runs `module load cuda python`)")
    setup: str | None = Field(None, description="shell lines run first on the node (a site hook), after modules")
    venv: str | None = Field(None, description="virtual environment to activate (default: the one running "
                             "lmlab now; '' for none)")
    job_name: str | None = Field(None, description="SLURM job name (default: lmlab-<out's name>)")
    output: str | None = Field(None, description="where to write the script (default: <out's parent>/slurm/"
                               "<job name>.sbatch)")
    signal_seconds: int = Field(120, description="seconds before the time limit at which the run is asked to "
                                "checkpoint and stop (the job is then requeued)")
    port: int = Field(29500, description="TCP port of the c10d rendezvous on the first node")
    max_requeues: int = Field(100, description="requeue the job at most this many times")
    sbatch: list[str] = Field(default_factory=list, description="extra #SBATCH options, repeatable: "
                              "--sbatch=--qos=preempt --sbatch=--constraint=a100")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="lmlab slurm", usage="lmlab slurm VERB [--config F.yaml] [key=value ...] --nodes N "
                "--gpus-per-node G --time HH:MM:SS [options]", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--from", dest="from_file", metavar="FILE.yaml", help="read the options below from a YAML "
                   "file (keys with underscores: gpus_per_node); command-line flags win")
    p.add_argument("--submit", action="store_true", help="run sbatch on the script and print the job id")
    for name, field in Options.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name == "sbatch":
            p.add_argument(flag, action="append", metavar="OPTION", help=field.description)
        else:
            p.add_argument(flag, dest=name, metavar=name.upper(), default=argparse.SUPPRESS, help=field.description)
    return p



def time_seconds(text: str | None) -> int:
    """SLURM's HH:MM:SS or D-HH:MM:SS as seconds; UserError otherwise."""
    if not text:
        raise UserError("--time is missing: give the job's time limit as HH:MM:SS or D-HH:MM:SS, e.g. --time 04:00:00")
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):([0-5]\d):([0-5]\d)", text)
    if not m:
        raise UserError(f"--time {text!r} is not a time limit SLURM reads here: write HH:MM:SS or D-HH:MM:SS, "
                        f"e.g. --time 12:00:00 or --time 2-00:00:00")
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def read_options(from_file: str | None, given: dict) -> Options:
    data: dict = {}
    if from_file:
        if not Path(from_file).is_file():
            raise UserError(f"--from {from_file}: no such file (examples: configs/slurm/one_node_8gpu.yaml)")
        data = read_yaml(from_file)
        if isinstance(data.get("time"), int):  # YAML 1.1 reads an unquoted 12:00:00 as sexagesimal 43200
            raise UserError(f"time in {from_file} must be quoted, e.g. time: \"12:00:00\" (YAML reads an unquoted "
                            f"12:00:00 as a number)")
    extra = given.pop("sbatch", None) or []
    data.update(given)
    data["sbatch"] = list(data.get("sbatch") or []) + extra
    source = f"the slurm options ({from_file} and the command line)" if from_file else "the slurm options"
    return build_config(Options, data, source)


def check_resources(o: Options) -> tuple[int, int]:
    """Validate the allocation; returns (procs_per_node, cpus_per_task)."""
    for value, flag, example in ((o.nodes, "--nodes", "--nodes 2"), (o.gpus_per_node, "--gpus-per-node",
                                                                     "--gpus-per-node 4 (0 for a CPU job)")):
        if value is None:
            raise UserError(f"{flag} is missing: lmlab slurm needs the allocation's shape, e.g. {example}")
    if o.nodes < 1:
        raise UserError(f"--nodes must be 1 or more (got {o.nodes}): give the number of nodes, e.g. --nodes 2")
    if o.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node must be 1 or more, or 0 for a CPU job with --procs-per-node K "
                        f"(got {o.gpus_per_node}), e.g. --gpus-per-node 4")
    if o.gpus_per_node == 0 and o.procs_per_node is None:
        raise UserError("--gpus-per-node 0 is a CPU job: say how many processes each node runs, e.g. --procs-per-node 2")
    procs = o.procs_per_node if o.procs_per_node is not None else o.gpus_per_node
    if procs < 1:
        raise UserError(f"--procs-per-node must be 1 or more (got {procs})")
    if o.gpus_per_node and procs > o.gpus_per_node:
        raise UserError(f"--procs-per-node {procs} is more than --gpus-per-node {o.gpus_per_node}: each process needs "
                        f"a GPU of its own; use --procs-per-node {o.gpus_per_node} or fewer")
    cpus = o.cpus_per_task if o.cpus_per_task is not None else procs
    if cpus < 1:
        raise UserError(f"--cpus-per-task must be 1 or more (got {cpus})")
    limit = time_seconds(o.time)
    if not 1 <= o.signal_seconds <= 65535:  # SLURM's --signal takes at most 65535 seconds
        raise UserError(f"--signal-seconds must be between 1 and 65535 (got {o.signal_seconds}), e.g. 120")
    if limit <= o.signal_seconds:
        raise UserError(f"--time {o.time} is not longer than --signal-seconds {o.signal_seconds}, so the run would be "
                        f"asked to stop as it starts: give a longer --time or a smaller --signal-seconds")
    if not 1 <= o.port <= 65535:
        raise UserError(f"--port must be a TCP port between 1 and 65535 (got {o.port})")
    return procs, cpus


def sets_out(config_file: str | None, overrides: list[str]) -> bool:
    if any(parse_override(o)[0] == ["out"] for o in overrides):
        return True
    return bool(config_file) and "out" in read_yaml(config_file)


def default_root() -> Path:
    scratch = os.environ.get("SCRATCH")
    return Path(scratch) / "lmlab" if scratch else Path.cwd()


def default_venv() -> str:
    # The compute nodes see the same file system, so the environment running this command is the one to use.
    return sys.prefix if sys.prefix != sys.base_prefix else ""


def yaml_value(text: str) -> str:
    """`text` as an override value that YAML reads back as the same string."""
    try:
        if yaml.safe_load(text) == text:
            return text
    except yaml.YAMLError:
        pass
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


def sbatch_value(what: str, value: str) -> str:
    # sbatch splits #SBATCH lines at whitespace, and a newline would end the line.
    if re.search(r"\s", value):
        raise UserError(f"{what} {value!r} holds whitespace, which an #SBATCH line cannot carry: choose one without")
    return value


def plan(verb: str, stage_args: list[str], o: Options) -> dict:
    """Check everything and return what `render` needs; raises UserError naming the problem and the fix."""
    procs, cpus = check_resources(o)
    verbs = training_verbs()
    if verb not in verbs:
        kind = "not a training verb" if verb in STAGES else "not an lmlab verb"
        raise UserError(f"{verb!r} is {kind}: lmlab slurm runs one of {', '.join(verbs)}, "
                        f"e.g. lmlab slurm pretrain data=runs/packed --nodes 1 --gpus-per-node 8 --time 04:00:00")
    module = importlib.import_module(STAGES[verb][0])
    config_file, overrides = stage_arguments(verb, module, stage_args,
                                             hint="the slurm options are listed by `lmlab slurm --help`, and ")
    cfg = load_config(module.Config, config_file, overrides)
    root = Path(o.root).expanduser() if o.root else default_root()
    out = Path(cfg.out if sets_out(config_file, overrides) else Path("runs") / verb).expanduser()
    out = (out if out.is_absolute() else root / out).absolute()
    check_out(out, getattr(module, "KIND", "model"), verb)  # refuse now, not in the queue, what the stage would refuse
    name = sbatch_value("--job-name", o.job_name or f"lmlab-{out.name}")
    script = Path(o.output).expanduser().absolute() if o.output else out.parent / "slurm" / f"{name}.sbatch"
    venv = default_venv() if o.venv is None else o.venv
    if venv and not (Path(venv).expanduser() / "bin" / "activate").is_file():
        raise UserError(f"--venv {venv} has no bin/activate: give the virtual environment that has lmlab installed, "
                        f"or --venv '' to use what --modules/--setup put on PATH")
    modules = o.modules.split() if isinstance(o.modules, str) else list(o.modules or [])
    for line in o.sbatch:
        if not line.startswith("-"):
            raise UserError(f"--sbatch {line!r} is not an sbatch option: write it as --sbatch=--qos=preempt")
    return {
        "verb": verb, "stage_args": [*stage_args, f"out={yaml_value(str(out))}"], "out": out,
        "nodes": o.nodes, "gpus": o.gpus_per_node, "procs": procs, "cpus": cpus,
        "time": o.time, "partition": o.partition and sbatch_value("--partition", o.partition),
        "account": o.account and sbatch_value("--account", o.account), "name": name, "script": script,
        "log": Path(sbatch_value("the log path", str(script.parent / f"{name}-%j.log"))),
        "chdir": sbatch_value("the current directory", str(Path.cwd())),
        "modules": modules, "setup": o.setup or "", "venv": str(Path(venv).expanduser().absolute()) if venv else "",
        "signal_seconds": o.signal_seconds, "port": o.port, "max_requeues": o.max_requeues,
        "sbatch": [sbatch_value("--sbatch", line) for line in o.sbatch],
    }


def render(job: dict, command: list[str]) -> str:
    """The sbatch script's text."""
    q = shlex.quote
    signal_s = job["signal_seconds"]
    gpus = f" x {job['gpus']} GPU(s)" if job["gpus"] else " (CPU)"
    sb = [f"--job-name={job['name']}", f"--nodes={job['nodes']}", "--ntasks-per-node=1"]
    if job["gpus"]:
        sb.append(f"--gpus-per-node={job['gpus']}")
    sb += [f"--cpus-per-task={job['cpus']}", f"--time={job['time']}"]
    sb += [f"--partition={job['partition']}"] if job["partition"] else []
    sb += [f"--account={job['account']}"] if job["account"] else []
    sb += [f"--chdir={job['chdir']}", f"--output={job['log']}", f"--error={job['log']}", "--open-mode=append",
           "--requeue", f"--signal=B:USR1@{signal_s}", *job["sbatch"]]
    hook = ([f"module load {' '.join(q(m) for m in job['modules'])}"] if job["modules"] else []) + \
        ([job["setup"]] if job["setup"] else [])
    venv = [f"source {q(job['venv'] + '/bin/activate')}"] if job["venv"] else []
    launch = " ".join(q(a) for a in ["-m", "lmlab", job["verb"], *job["stage_args"]])
    verb = job["verb"]
    lines = [
        "#!/bin/bash",
        f"# {verb} on {job['nodes']} node(s){gpus}, {job['procs']} process(es) per node; written by lmlab "
        f"{__version__}:",
        "#   " + shlex.join(command).replace("\n", "\\n"),
        f"# Submit it with `sbatch {q(str(job['script']))}`; the log is {job['log']} (%j: the job id).",
        *[f"#SBATCH {s}" for s in sb],
        "",
        "# After a requeue SLURM runs this script again from the top, and the run continues from its checkpoint.",
        'echo "lmlab: job $SLURM_JOB_ID (requeued ${SLURM_RESTART_COUNT:-0} times) on $SLURM_JOB_NODELIST, $(date)"',
        "",
        f"# SLURM sends this shell SIGUSR1 {signal_s} s before the time limit (--signal=B:USR1). The training",
        "# processes are asked to checkpoint and stop with SIGTERM, sent by scancel to every process of the job",
        "# step (srun itself would turn SIGTERM into SIGKILL), and the job is requeued below. A SIGTERM to this",
        "# shell means SLURM itself is ending the job (scancel, preemption, the time limit): it signals the",
        "# processes too, and the job is left to SLURM (a site that preempts with requeue requeues it).",
        "warned=0 ending=0 interrupted=0",
        "on_warning() {",
        "  interrupted=1",
        '  [ "$warned" = 1 ] && return',
        f'  warned=1; echo "lmlab: SIGUSR1 (the time limit is {signal_s} s away): asking the run to save a checkpoint '
        'and stop"',
        '  scancel --signal=TERM "$SLURM_JOB_ID"',
        "}",
        "trap on_warning USR1",
        "trap 'interrupted=1 ending=1' TERM",
        "",
        *(["# site hook", *hook, ""] if hook else []),
        *venv,
        "command -v torchrun >/dev/null || { echo \"lmlab: torchrun is not on PATH: check --venv, --modules or "
        "--setup\" >&2; exit 2; }",
        f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{max(1, job['cpus'] // job['procs'])}}}  # the node's cores, "
        "shared by its processes",
        "# torchrun waits this long for its processes to save a checkpoint after SIGTERM before it kills them",
        f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-{signal_s}}}",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f'echo "lmlab: c10d rendezvous at $head_node:{job["port"]}"',
        "",
        f'srun --ntasks-per-node=1 --cpus-per-task={job["cpus"]} --kill-on-bad-exit=0 \\',
        f'  torchrun --nnodes="$SLURM_NNODES" --nproc_per_node={job["procs"]} --max_restarts=0 \\',
        f'    --rdzv_backend=c10d --rdzv_endpoint="$head_node:{job["port"]}" --rdzv_id="$SLURM_JOB_ID" \\',
        f"    {launch} &",
        "step=$!",
        "# a trapped signal ends `wait` early; wait again until the step itself has ended",
        'while :; do interrupted=0; wait "$step"; rc=$?; [ "$interrupted" = 1 ] || break; done',
        "",
        'if [ "$rc" = 0 ]; then',
        f'  echo "lmlab: {verb} finished"; exit 0',
        "fi",
        'if [ "$ending" = 1 ]; then',
        '  echo "lmlab: SLURM ended the job (exit $rc); the newest checkpoint is kept: submit again to continue"',
        '  exit "$rc"',
        "fi",
        f'# {Preempted.exit_code}: the run saved a checkpoint and stopped. torchrun reports 1 when its processes stop',
        "# on a signal, so after the warning any failure counts: the rerun resumes from the newest good checkpoint.",
        f'if [ "$rc" = {Preempted.exit_code} ] || [ "$warned" = 1 ]; then',
        f'  if [ "${{SLURM_RESTART_COUNT:-0}}" -ge {job["max_requeues"]} ]; then',
        f'    echo "lmlab: not requeuing: already requeued {job["max_requeues"]} times (--max-requeues)"; exit "$rc"',
        "  fi",
        '  echo "lmlab: the run stopped at a checkpoint (exit $rc): requeuing job $SLURM_JOB_ID to continue it"',
        '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
        '  echo "lmlab: scontrol requeue failed: submit this script again to continue"; exit "$rc"',
        "fi",
        f'echo "lmlab: {verb} failed (exit $rc), see the errors above"',
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def write_script(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (a temporary file renamed over it), mode 0755."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def submit(script: Path, log: Path) -> str:
    if shutil.which("sbatch") is None:
        raise UserError(f"--submit: sbatch is not on PATH; the script was still written to {script}: run "
                        f"`sbatch {script}` on a machine of the cluster")
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}").splitlines()[-1]
        raise UserError(f"sbatch refused {script}: {reason}")
    job_id = done.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}; log: {str(log).replace('%j', job_id)}")
    return job_id


def main(argv: list[str]) -> int:
    ns, rest = build_parser().parse_known_args(argv)
    given = vars(ns)
    do_submit, from_file = given.pop("submit"), given.pop("from_file")
    options = read_options(from_file, given)
    if not rest or rest[0].startswith("-"):
        what = f"unknown option {rest[0]}" if rest else "no verb given"
        raise UserError(f"{what}: write lmlab slurm VERB [key=value ...] --nodes N --gpus-per-node G --time HH:MM:SS "
                        f"(VERB: {', '.join(training_verbs())}; see `lmlab slurm --help`)")
    job = plan(rest[0], rest[1:], options)
    job["log"].parent.mkdir(parents=True, exist_ok=True)  # SLURM does not create the log's directory
    write_script(job["script"], render(job, ["lmlab", "slurm", *argv]))
    print(f"wrote {job['script']}: {job['verb']} on {job['nodes']} node(s) x "
          f"{job['gpus'] or 'CPU'}{' GPU(s)' if job['gpus'] else ''}, {job['procs']} process(es) per node, "
          f"out={job['out']}")
    if do_submit:
        submit(job["script"], job["log"])
    else:
        print(f"submit it with: sbatch {shlex.quote(str(job['script']))}")
    return 0
