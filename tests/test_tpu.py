"""`lmlab tpu` (lmlab/tpu.py) and how a TPU VM worker finds its place in the pod
(lmlab.jax_backend.tpu_pod_env).

No cloud is reachable from here, so `--run` runs against a stand-in `gcloud` on PATH that
records its arguments (and keeps the tarball it is asked to copy); the metadata server is a
function given to tpu_pod_env. What is checked: the commands and their order, the tarball
holding exactly the checkout's tracked files, the arguments validated before anything runs,
and one clear line (exit 2) for a verb without a JAX backend, a missing gcloud or a failing
step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

from lmlab.cli import main

ARGS = ["data=runs/s/puzzles", "out=runs/s/trm", "train.steps=50", "--tpu", "pod", "--zone", "us-central2-b"]

STANDIN = r"""#!{python}
import json, os, shutil, sys
log = os.environ["GCLOUD_LOG"]
args = sys.argv[1:]
if "scp" in args and os.path.isfile(args[4]):
    shutil.copy(args[4], os.path.join(os.path.dirname(log), "copied.tar.gz"))
with open(log, "a") as f:
    f.write(json.dumps(args) + "\n")
sys.exit(int(os.environ.get("GCLOUD_EXIT", "0")))
"""


def test_prints_the_run_on_every_worker_and_the_copy_back(capsys):
    assert main(["tpu", "trm", *ARGS, "--project", "p1"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("gcloud")]
    run, fetch = lines
    assert run.startswith("gcloud compute tpus tpu-vm ssh pod --zone us-central2-b --project p1 --worker=all --command")
    assert ("cd ~/lmlab && LMLAB_TPU_POD=1 MASTER_PORT=29500 ~/lmlab-venv/bin/python -m lmlab trm data=runs/s/puzzles "
            "out=runs/s/trm train.steps=50 backend=jax") in run
    assert fetch.endswith("scp --recurse 'pod:~/lmlab/runs/s/trm' runs/s --zone us-central2-b --project p1 --worker=0")


def test_setup_and_run_against_a_standin_gcloud(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    (src / "lmlab").mkdir(parents=True)
    (src / "lmlab" / "a.py").write_text("x = 1\n")
    (src / "untracked.txt").write_text("not copied\n")
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    subprocess.run(["git", "-C", str(src), "add", "lmlab/a.py"], check=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(STANDIN.format(python=sys.executable))
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp_path / "gcloud.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("GCLOUD_LOG", str(log))
    assert main(["tpu", "trm", *ARGS, "--setup", "--run", "--src", str(src)]) == 0
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[3] for c in calls] == ["scp", "ssh", "ssh"]
    assert calls[0][5:] == ["pod:~/lmlab-src.tar.gz", "--zone", "us-central2-b", "--worker=all"]
    install, run = calls[1][-1], calls[2][-1]
    assert "tar xzf ~/lmlab-src.tar.gz -C ~/lmlab" in install
    assert "--index-url https://download.pytorch.org/whl/cpu" in install
    assert '"$HOME/lmlab[jax]" "jax[tpu]"' in install and "--no-deps recurrentgemma==1.0.1" in install
    assert "LMLAB_TPU_POD=1" in run and run.endswith("backend=jax")
    with tarfile.open(tmp_path / "copied.tar.gz") as t:
        assert t.getnames() == ["lmlab/a.py"]

    monkeypatch.setenv("GCLOUD_EXIT", "1")
    assert main(["tpu", "trm", *ARGS, "--run"]) == 2
    assert "(run) exited with 1" in capsys.readouterr().err


def test_bad_invocations_are_one_line_before_anything_runs(tmp_path, monkeypatch, capsys):
    assert main(["tpu", "pretrain", "data=x", "--tpu", "pod", "--zone", "z"]) == 2
    err = capsys.readouterr().err
    assert "`lmlab pretrain` has no JAX backend" in err and "trm" in err
    assert main(["tpu", "trm", "train.stpes=5", "--tpu", "pod", "--zone", "z"]) == 2
    assert "stpes" in capsys.readouterr().err
    assert main(["tpu", "trm", "data=x"]) == 2
    assert "--tpu" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcloud
    assert main(["tpu", "trm", *ARGS, "--run"]) == 2
    err = capsys.readouterr().err
    assert "gcloud is not on PATH" in err and "Traceback" not in err


def test_a_tpu_worker_finds_its_rank_and_worker_zero():
    from lmlab.errors import UserError
    from lmlab.jax_backend import tpu_pod_env

    assert tpu_pod_env({}) is None  # not under lmlab tpu
    assert tpu_pod_env({"LMLAB_TPU_POD": "1", "RANK": "0", "WORLD_SIZE": "2"}) is None  # torchrun's win
    gke = {"LMLAB_TPU_POD": "1", "TPU_WORKER_ID": "2", "TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}
    assert tpu_pod_env(gke) == {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "w0",
                                "MASTER_PORT": "29500"}
    served = {"agent-worker-number": "1",
              "worker-network-endpoints": "unknown:unknown:10.0.0.5,unknown:unknown:10.0.0.6"}
    got = tpu_pod_env({"LMLAB_TPU_POD": "1", "MASTER_PORT": "8470"}, metadata=served.__getitem__)
    assert got == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "8470"}

    def unreachable(key):
        raise OSError("metadata.google.internal: Name or service not known")

    with pytest.raises(UserError, match=r"does not say which TPU worker it is"):
        tpu_pod_env({"LMLAB_TPU_POD": "1"}, metadata=unreachable)
