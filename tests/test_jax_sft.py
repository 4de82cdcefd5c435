"""`lmlab sft backend=jax` (lmlab.train.sft_jax): a Griffin finetuned in JAX (DeepMind's
recurrentgemma.jax) against the torch trainer it mirrors, on prompt/completion examples (the
prompt masked, as Herald_proofs' theorem statements are).

- The whole run: from the same micro Griffin, the torch trainer in one process and the JAX one
  as two hosts of 2 devices (mesh data:2 x fsdp:2), both in float32, log the same loss,
  gradient norm and val_loss at every logged step (1e-4), with weight decay on (the same
  decayed matrices), packing and gradient accumulation; the final weights agree (1e-4) and the
  run directory is what the torch trainer writes.
- Resume: the JAX run's checkpoint at step 3 of 6 (saved on 4 devices), resumed in one process
  on one device, logs what the uninterrupted run logs.
- Refused: a transformer init, LoRA.
"""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("jax", reason="the jax extra is not installed (pip install 'lmlab[jax]')")
try:
    import recurrentgemma.jax  # noqa: F401
except ImportError as e:
    pytest.skip(f"recurrentgemma.jax does not import ({e})", allow_module_level=True)

from lmlab.cli import main
from lmlab.train.logging import read_metrics

ARGS = ["train.steps=6", "train.batch_size=4", "train.grad_accum=2", "train.weight_decay=0.1", "train.lr=3e-3",
        "train.warmup_steps=2", "train.dtype=float32", "train.device=cpu", "eval.every=3", "eval.batches=1",
        "log.every=1", "checkpoint.every=3", "seq_len=32"]


@pytest.fixture(scope="module")
def griffin(tmp_path_factory):
    from conftest import pretrain_griffin

    root = tmp_path_factory.mktemp("jax_sft")
    m = pretrain_griffin(root, 32)
    data = root / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a} plus {b} is", "completion": f" {a + b}."}) + "\n"
                            for a in range(12) for b in range(12)))
    return {"model": m, "data": data, "root": root}


def _sft(griffin, out, *extra):
    return main(["sft", f"init={griffin['model']}", f"data={griffin['data']}", f"out={out}", *ARGS, *extra])


@pytest.fixture(scope="module")
def runs(griffin):
    """The torch run in this process; the JAX run as two hosts (processes) of 2 fake devices
    each, on the mesh data:2 x fsdp:2 (parameters and optimizer state split over 2 devices)."""
    import os
    import subprocess
    import sys

    from test_jax_trm_train import _free_ports, _wait_all

    root = griffin["root"]
    assert _sft(griffin, root / "torch") == 0
    port, coordinator = _free_ports(2)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
           "LMLAB_JAX_COORDINATOR": f"127.0.0.1:{coordinator}", "LMLAB_JAX_INIT_TIMEOUT": "60"}
    cmd = [sys.executable, "-m", "lmlab", "sft", f"init={griffin['model']}", f"data={griffin['data']}",
           f"out={root / 'jax'}", *ARGS, "backend=jax", "parallel.mesh=data:2,fsdp:2"]
    logs = [root / f"rank{r}.log" for r in (0, 1)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env={**env, "RANK": str(r)})
             for r, log in enumerate(logs)]
    _wait_all(procs, logs, 300)
    assert [p.returncode for p in procs] == [0, 0], logs[0].read_text()[-3000:] + logs[1].read_text()[-2000:]
    # every parameter array fsdp can split is split (a (12,) gate bias of 2 x 6 ... all divide by 2)
    assert "4 device(s) (cpu) on 2 host(s), mesh data:2 x fsdp:2 (" in logs[0].read_text()
    split, total = map(int, logs[0].read_text().split("mesh data:2 x fsdp:2 (")[1].split(" parameter")[0].split(" of "))
    assert split == total > 20
    return root / "torch", root / "jax"


def _same_curves(a, b, rel):
    la, lb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for x, y in zip(la, lb):
        for k in ("loss", "grad_norm", "val_loss", "tokens"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=rel, abs=1e-6), (x["step"], k, x[k], y[k])


def test_the_jax_run_logs_and_writes_what_the_torch_run_does(runs):
    from lmlab.models import load_model

    torch_run, jax_run = runs
    _same_curves(torch_run, jax_run, 1e-4)
    a, _, _ = load_model(torch_run)
    b, _, _ = load_model(jax_run)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-4
    assert (jax_run / "tokenizer").is_dir() and (jax_run / "model.safetensors").is_file()
    stats = json.loads((jax_run / "manifest.json").read_text())["stats"]
    assert stats["parallel"]["backend"] == "jax" and stats["steps"] == 6


def test_resume_from_the_middle_logs_what_the_whole_run_logs(runs, tmp_path):
    _, jax_run = runs
    moved = tmp_path / "moved"
    shutil.copytree(jax_run, moved)
    (moved / "manifest.json").unlink()
    shutil.rmtree(moved / "checkpoints_jax" / "6")
    # (the sft stage's own rerun check: same init, data and settings, so it continues)
    assert main(["sft", f"init={jax_run.parent / 'griffin'}", f"data={jax_run.parent / 'sums.jsonl'}",
                 f"out={moved}", *ARGS, "backend=jax"]) == 0
    _same_curves(jax_run, moved, 1e-5)


def test_a_transformer_init_and_lora_are_refused(griffin, tmp_path, capsys):
    from lmlab.errors import UserError
    from lmlab.models.family import build_model
    from lmlab.train.sft import Config
    from lmlab.train.sft_jax import check_supported

    assert _sft(griffin, tmp_path / "lora", "backend=jax", "lora.enabled=true") == 2
    assert "does not take lora.enabled" in capsys.readouterr().err
    assert not (tmp_path / "lora").exists()
    with pytest.raises(UserError, match=r"trains Griffin .* this init model is a transformer: use backend=torch"):
        check_supported(Config(backend="jax"), build_model({"preset": "micro", "vocab_size": 64}))
    griffin_model = build_model({"family": "griffin", "preset": "micro", "vocab_size": 64})
    with pytest.raises(UserError, match=r"does not take parallel.strategy=fsdp: the device mesh decides"):
        check_supported(Config(backend="jax", parallel={"strategy": "fsdp"}), griffin_model)
