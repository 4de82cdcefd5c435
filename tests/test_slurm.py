"""`lmlab slurm`: the sbatch script it writes, the inputs it refuses, and the script's signal and
requeue logic run locally with stand-ins for srun / scancel / scontrol (no SLURM needed).

The stand-in for the training process is a tiny `lmlab` package put first on PYTHONPATH: it
records its arguments, and on SIGTERM writes a marker and exits 75 like a preempted run. The
real SLURM chain is checked by scripts/slurm_selftest.sh.
"""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab import slurm

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ODD = "data=/tmp/my data/it's \"q\" $HOME `touch pwned` $(touch pwned);x"  # spaces, quotes, $, backticks


def write(tmp_path: Path, *args: str) -> str:
    """Run `lmlab slurm pretrain ...` in-process from tmp_path; returns the script's text."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        slurm.main(["pretrain", *args, "--root", str(tmp_path / "root")])
    finally:
        os.chdir(cwd)
    (script,) = (tmp_path / "root").rglob("*.sbatch")
    return script.read_text()


def sbatch_lines(text: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in text.splitlines() if line.startswith("#SBATCH ")]


def test_one_node_8_gpus(tmp_path):
    text = write(tmp_path, "data=runs/packed", "train.lr=3e-4", "--nodes", "1", "--gpus-per-node", "8",
                 "--time", "04:00:00", "--partition", "gpu")
    out = tmp_path / "root" / "runs" / "pretrain"  # no out given: ROOT/runs/VERB, the stage's default under ROOT
    log = tmp_path / "root" / "runs" / "slurm" / "lmlab-pretrain-%j.log"
    assert sbatch_lines(text) == [
        "--job-name=lmlab-pretrain", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=8",
        "--time=04:00:00", "--partition=gpu", f"--chdir={tmp_path}", f"--output={log}", f"--error={log}",
        "--open-mode=append", "--requeue", "--signal=B:USR1@120"]
    assert "srun --ntasks-per-node=1 --cpus-per-task=8 --kill-on-bad-exit=0 \\" in text
    assert 'torchrun --nnodes="$SLURM_NNODES" --nproc_per_node=8 --max_restarts=0' in text
    assert '--rdzv_backend=c10d --rdzv_endpoint="$head_node:29500" --rdzv_id="$SLURM_JOB_ID"' in text
    assert f"-m lmlab pretrain data=runs/packed train.lr=3e-4 out={out} &" in text
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
    assert f"source {sys.prefix}/bin/activate" in text  # the venv running lmlab now
    assert 'if [ "$rc" = 75 ] || [ "$warned" = 1 ]; then' in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_four_nodes_4_gpus_with_site_hook(tmp_path):
    text = write(tmp_path, "out=tiny", "--nodes", "4", "--gpus-per-node", "4", "--time", "2-00:00:00",
                 "--account", "abc123", "--cpus-per-task", "32", "--modules", "cuda/12.4 python3",
                 "--setup", "export NCCL_DEBUG=WARN", "--venv", "", "--signal-seconds", "300", "--port", "29600",
                 "--sbatch=--qos=preempt", "--job-name", "tiny4x4")
    lines = sbatch_lines(text)
    for want in ["--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=4", "--cpus-per-task=32",
                 "--time=2-00:00:00", "--account=abc123", "--signal=B:USR1@300", "--qos=preempt", "--job-name=tiny4x4"]:
        assert want in lines
    assert not any(line.startswith("--partition") for line in lines)
    assert "module load cuda/12.4 python3\nexport NCCL_DEBUG=WARN\n" in text
    assert "activate" not in text
    assert "--nproc_per_node=4" in text and '"$head_node:29600"' in text
    assert "OMP_NUM_THREADS:-8}" in text and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}" in text
    assert f"out={tmp_path / 'root' / 'tiny'} &" in text  # a relative out goes under --root
    script = tmp_path / "root" / "slurm" / "tiny4x4.sbatch"
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    assert [p.name for p in script.parent.iterdir()] == ["tiny4x4.sbatch"]  # no temporary file left
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_options_from_file_and_command_line(tmp_path):
    cfg = tmp_path / "four.yaml"
    cfg.write_text('nodes: 4\ngpus_per_node: 4\ntime: "12:00:00"\nmodules: [cuda]\nsbatch: [--qos=normal]\n')
    text = write(tmp_path, "--from", str(cfg), "--nodes", "2", "--sbatch=--exclusive")
    lines = sbatch_lines(text)
    assert "--nodes=2" in lines and "--gpus-per-node=4" in lines and "--time=12:00:00" in lines
    assert lines[-2:] == ["--qos=normal", "--exclusive"] and "module load cuda\n" in text


def test_repo_examples_load(tmp_path):
    for name in ("one_node_8gpu.yaml", "four_nodes_4gpu.yaml"):
        text = write(tmp_path, "--from", str(ROOT / "configs" / "slurm" / name))
        assert "--requeue" in sbatch_lines(text)
        for p in (tmp_path / "root").rglob("*.sbatch"):
            p.unlink()


# --- bad input through the CLI (lmlab.cli.main is `python -m lmlab`; the --submit case runs it as a
# process): exit 2, one line, no traceback, no script


def cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMLAB_NO_PROGRESS": "1", **(env or {})}
    return subprocess.run([PY, "-m", "lmlab", "slurm", *args, "--root", str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=120)


GOOD = ["--nodes", "1", "--gpus-per-node", "8", "--time", "01:00:00"]


@pytest.mark.parametrize("args, message", [
    (["pretrain", "--nodes", "1", "--gpus-per-node", "8"], "--time is missing: give the job's time limit as HH:MM:SS"),
    (["pretrain", "--nodes", "1", "--gpus-per-node", "8", "--time", "90min"], "write HH:MM:SS or D-HH:MM:SS"),
    (["pretrain", "--gpus-per-node", "8", "--time", "01:00:00"], "--nodes is missing"),
    (["pretrain", "--nodes", "0", "--gpus-per-node", "8", "--time", "01:00:00"], "--nodes must be 1 or more"),
    (["pretrain", "--nodes", "1", "--gpus-per-node", "-1", "--time", "01:00:00"], "--gpus-per-node must be 1 or more"),
    (["pretrain", "--nodes", "1", "--gpus-per-node", "0", "--time", "01:00:00"], "e.g. --procs-per-node 2"),
    (["pretrain", *GOOD, "--procs-per-node", "9"], "each process needs a GPU of its own"),
    (["pretrian", *GOOD], "'pretrian' is not an lmlab verb: lmlab slurm runs one of pretrain, sft, dpo"),
    (["eval", *GOOD], "'eval' is not a training verb"),
    (["pretrain", *GOOD, "--time", "00:01:00"], "is not longer than --signal-seconds 120"),
    (["pretrain", *GOOD, "--nodez", "2"], "unknown option --nodez"),
    (["pretrain", *GOOD, "--time"], "argument --time: expected one argument"),
    (["pretrain", "train.stpes=5", *GOOD], "unknown config key 'train.stpes'"),
    (["pretrain", *GOOD, "--partition", "a b"], "--partition 'a b' holds whitespace"),
    (["pretrain", *GOOD, "--from", "nope.yaml"], "--from nope.yaml: no such file"),
])
def test_bad_input(tmp_path, monkeypatch, capsys, args, message):
    from lmlab.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["slurm", *args, "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not list(tmp_path.rglob("*.sbatch"))


def test_submit_without_sbatch_keeps_the_script(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    r = cli(tmp_path, "pretrain", *GOOD, "--submit", env={"PATH": str(empty)})
    script = tmp_path / "runs" / "slurm" / "lmlab-pretrain.sbatch"
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"sbatch is not on PATH; the script was still written to {script}" in r.stderr
    assert script.is_file()


# --- the script's body, run locally: stand-ins for srun / scancel / scontrol (and torchrun)

STANDIN = '''\
"""Stand-in for `python -m lmlab VERB ...`: records argv; SIGTERM -> marker, exit 75."""
import json, os, signal, sys, time
d = os.environ["STANDIN_DIR"]
rank = os.environ.get("RANK", "0")
def stop(sig, frame):
    open(os.path.join(d, "signal." + rank), "a").write(signal.Signals(sig).name + "\\n")
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
json.dump(sys.argv[1:], open(os.path.join(d, "argv." + rank), "w"))
open(os.path.join(d, "started." + rank), "w").close()
time.sleep(float(os.environ.get("STANDIN_SECONDS", "60")))
sys.exit(int(os.environ.get("STANDIN_EXIT", "0")))
'''
FAKES = {
    # srun: drop its options, record them, run the command here (its pid is the step's pid)
    "srun": 'opts=(); while [[ $1 == --* ]]; do opts+=("$1"); shift; done\n'
            'echo "${opts[*]}" > "$STANDIN_DIR/srun.opts"; echo $$ > "$STANDIN_DIR/step.pid"; exec "$@"\n',
    # scancel --signal=TERM JOB: SLURM signals every process of the step; here the step's first process
    "scancel": 'echo "$*" >> "$STANDIN_DIR/scancel"; kill -TERM "$(cat "$STANDIN_DIR/step.pid")"\n',
    "scontrol": 'if [ "$1" = show ]; then echo localhost; else echo "$*" >> "$STANDIN_DIR/scontrol"; fi\n',
}
# torchrun without torch: drop the launcher's options, run the module as one process
FAKE_TORCHRUN = 'while [[ $1 == --* ]]; do shift; done\nexec "$PYTHON" -u "$@"\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_job(tmp_path):
    """Returns run(extra_args, signal=None, env={}) -> (exit code, log, standin dir) for a local run."""
    (tmp_path / "lmlab").mkdir()
    (tmp_path / "lmlab" / "__main__.py").write_text(STANDIN)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)

    def run(*args: str, real_torchrun: bool = False, send: int | None = None, env: dict | None = None,
            procs: int = 1):
        torchrun = bin_dir / "torchrun"
        torchrun.unlink(missing_ok=True)
        if not real_torchrun:
            torchrun.write_text("#!/bin/bash\n" + FAKE_TORCHRUN)
            torchrun.chmod(0o755)
        for p in tmp_path.iterdir():
            if p.name.split(".")[0] in ("signal", "argv", "started", "scancel", "scontrol", "srun", "step"):
                p.unlink()
        for p in (tmp_path / "root").rglob("*.sbatch"):
            p.unlink()
        write(tmp_path, *args, "--nodes", "1", "--gpus-per-node", "0", "--procs-per-node", str(procs),
              "--time", "00:10:00", "--port", str(free_port()), *([] if real_torchrun else ["--venv", ""]))
        (script,) = (tmp_path / "root").rglob("*.sbatch")
        e = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(tmp_path),
             "STANDIN_DIR": str(tmp_path), "PYTHON": PY, "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost",
             "SLURM_NNODES": "1", **(env or {})}
        with open(tmp_path / "job.log", "w") as log:
            job = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=e, stdout=log, stderr=subprocess.STDOUT)
            if send is not None:
                deadline = time.time() + 60
                while len(list(tmp_path.glob("started.*"))) < procs:
                    assert time.time() < deadline and job.poll() is None, (tmp_path / "job.log").read_text()
                    time.sleep(0.05)
                job.send_signal(send)
                if send == signal.SIGTERM:  # SLURM ending a job signals the step's processes as well
                    os.kill(int((tmp_path / "step.pid").read_text()), signal.SIGTERM)
            rc = job.wait(timeout=90)
        return rc, (tmp_path / "job.log").read_text(), tmp_path

    return run


def read(d: Path, name: str) -> str:
    p = d / name
    return p.read_text() if p.exists() else ""


def test_warning_reaches_torchrun_workers_and_requeues(local_job):
    """SIGUSR1 to the batch shell -> scancel --signal=TERM -> torchrun -> both workers -> requeue."""
    rc, log, d = local_job(ODD, real_torchrun=True, send=signal.SIGUSR1, procs=2)
    assert rc == 0, log
    assert read(d, "signal.0") == read(d, "signal.1") == "SIGTERM\n", log
    assert read(d, "scancel") == "--signal=TERM 4242\n"
    assert read(d, "scontrol") == "requeue 4242\n"
    # the step's own status once it ended (torchrun reports 1 when its workers stop on a signal), not the 138
    # of the `wait` that SIGUSR1 interrupted
    assert "the run stopped at a checkpoint (exit 1): requeuing job 4242" in log
    argv = json.loads(read(d, "argv.0"))
    assert argv[:2] == ["pretrain", ODD] and argv[2] == f"out={d / 'root' / 'runs' / 'pretrain'}"
    assert not (d / "pwned").exists()
    assert read(d, "srun.opts") == "--ntasks-per-node=1 --cpus-per-task=2 --kill-on-bad-exit=0\n"


def test_finished_run_is_not_requeued(local_job):
    rc, log, d = local_job(env={"STANDIN_SECONDS": "0"})
    assert rc == 0 and "lmlab: pretrain finished" in log and not read(d, "scontrol"), log


def test_exit_75_requeues_and_max_requeues_stops(local_job):
    rc, log, d = local_job(env={"STANDIN_SECONDS": "0", "STANDIN_EXIT": "75"})
    assert rc == 0 and read(d, "scontrol") == "requeue 4242\n", log
    rc, log, d = local_job("--max-requeues", "3", env={"STANDIN_SECONDS": "0", "STANDIN_EXIT": "75",
                                                          "SLURM_RESTART_COUNT": "3"})
    assert rc == 75 and not read(d, "scontrol") and "already requeued 3 times" in log, log


def test_slurm_ending_the_job_is_left_to_slurm(local_job):
    """SIGTERM to the batch shell (scancel, preemption): the run stops at a checkpoint, no requeue."""
    rc, log, d = local_job(send=signal.SIGTERM)
    assert rc == 75 and read(d, "signal.0") == "SIGTERM\n" and not read(d, "scontrol") and not read(d, "scancel")
    assert "SLURM ended the job (exit 75)" in log


def test_crash_is_not_requeued(local_job):
    rc, log, d = local_job(env={"STANDIN_SECONDS": "0", "STANDIN_EXIT": "3"})
    assert rc == 3 and not read(d, "scontrol") and "lmlab: pretrain failed (exit 3)" in log, log
