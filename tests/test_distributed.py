"""Training on several processes (torchrun, gloo on CPU): the same global batch gives the same
run on 1 or 2 processes, DDP and FSDP2; sharded checkpoints reshard (2 -> 1 process); a rank
killed with SIGKILL under `torchrun --max-restarts 1` and a SIGTERM'd job both resume to the
bitwise result of an uninterrupted run; two simulated nodes; the launch errors users hit."""

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmlab.train.logging import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_packed  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

ENV = {**os.environ, "LMLAB_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
STEPS = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_args(packed: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "lmlab", "pretrain", f"data={packed}", f"out={out}", "model.preset=micro", f"train.steps={STEPS}",
            "train.batch_size=4", "train.grad_accum=2", "train.warmup_steps=5", "train.device=cpu",
            # float32: on a CPU with native bf16, train.dtype=auto autocasts, and bf16 rounding differs
            # between 2-row and 4-row passes far beyond these tests' tolerances
            "train.dtype=float32", "eval.every=20",
            "eval.batches=2", "checkpoint.every=10", "checkpoint.keep=2", "log.every=1", *extra]


def torchrun(n: int, *rest: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
            "--max-restarts", str(restarts), *rest]


def run(cmd: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    return r


def ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stderr[-4000:]


def solo(args: list[str]) -> str:
    """`python -m lmlab ...` (args from "-m" on) run in this process, on one thread as the launched
    ranks run (OMP_NUM_THREADS=1), so that runs compare to the bit; -> what it printed on stderr.
    A process of its own would cost ~3.5 s more to start: importing torch, then torch._dynamo
    (which the first optimizer imports)."""
    from lmlab.cli import main

    assert args[:2] == ["-m", "lmlab"], args
    threads, err = torch.get_num_threads(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stderr(err):
            code = main(args[2:])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err.getvalue()[-4000:]
    return err.getvalue()


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "model.safetensors"))


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def curve(run_dir: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    return make_packed(tmp_path_factory.mktemp("dist_data"))


@pytest.fixture(scope="module")
def runs(packed, tmp_path_factory) -> dict:
    """The reference runs: 1 process, 2 DDP processes, 2 FSDP2 processes (2-row forward passes,
    activation checkpointing)."""
    root = tmp_path_factory.mktemp("dist_runs")
    out = {"one": root / "one", "ddp": root / "ddp", "fsdp": root / "fsdp"}
    solo(stage_args(packed, out["one"]))
    ok(run(torchrun(2, *stage_args(packed, out["ddp"])[1:])))
    ok(run(torchrun(2, *stage_args(packed, out["fsdp"], "parallel.strategy=fsdp", "train.micro_batch=2",
                                   "parallel.activation_checkpointing=true")[1:])))
    return out


def test_two_ddp_processes_train_exactly_like_one(runs):
    # The step's two micro-batches go one to each rank; the loss sum and count are all-reduced:
    # with gloo on CPU the result is the same to the last bit here.
    assert curve(runs["ddp"]) == curve(runs["one"])
    assert max_diff(runs["ddp"], runs["one"]) == 0.0
    m = json.loads((runs["ddp"] / "manifest.json").read_text())
    assert m["stats"]["parallel"] == {"strategy": "ddp", "world_size": 2}
    # rank 0 alone writes: one line per step, no duplicates
    steps = [r["step"] for r in read_metrics(runs["ddp"]) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))


def test_report_names_the_processes(runs, tmp_path):
    from lmlab.report import report

    out = report.run(report.Config(inputs=[str(runs["ddp"])], out=str(tmp_path / "report"), follow_inputs=False))
    assert "| processes | 2 (ddp) |" in Path(out).read_text()


def test_fsdp2_with_two_row_passes_matches_one_process_within_float_tolerance(runs):
    a, b = curve(runs["fsdp"]), curve(runs["one"])
    assert [x[0] for x in a] == [x[0] for x in b]
    for (_, la, va), (_, lb, vb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-5) if la is not None else la == lb
        assert va == pytest.approx(vb, abs=1e-5) if va is not None else va == vb
    assert max_diff(runs["fsdp"], runs["one"]) < 1e-5
    # the final model is one plain safetensors file with the one-process names
    assert weights(runs["fsdp"]).keys() == weights(runs["one"]).keys()
    ckpt = sorted((runs["fsdp"] / "checkpoints").iterdir())[-1]
    assert (ckpt / "dcp").is_dir() and not (ckpt / "model.safetensors").exists()


def test_activation_checkpointing_recomputes_to_the_same_bits(runs, packed, tmp_path):
    out = tmp_path / "ac"
    solo(stage_args(packed, out, "parallel.activation_checkpointing=true"))
    assert curve(out) == curve(runs["one"])
    assert max_diff(out, runs["one"]) == 0.0


def test_sharded_checkpoint_saved_on_two_processes_resumes_on_one(runs, packed, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["fsdp"], resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS:06d}")  # the run stopped after the one before
    (resumed / "manifest.json").unlink()
    (resumed / "model.safetensors").unlink()
    err = solo(stage_args(packed, resumed))
    assert f"resuming from {resumed / 'checkpoints' / f'step_{STEPS - 10:06d}'}" in err
    assert curve(resumed)[-1][1] == pytest.approx(curve(runs["one"])[-1][1], abs=1e-5)
    assert max_diff(resumed, runs["one"]) < 1e-5


def test_fsdp2_on_one_process_checkpoints_shards_and_resumes_in_a_plain_process(packed, tmp_path):
    """`torchrun --nproc_per_node 1` with FSDP2 (one GPU, as a cluster config is tried first):
    its parameters are DTensors, so its checkpoints are sharded (dcp/) like those of 2 processes;
    the run equals the plain one within float tolerance, its manifest names the strategy, and its
    checkpoint resumes in a plain process."""
    extra = ("train.steps=12", "checkpoint.every=4", "eval.every=0")
    one, fsdp, resumed = tmp_path / "one", tmp_path / "fsdp", tmp_path / "resumed"
    solo(stage_args(packed, one, *extra))
    ok(run(torchrun(1, *stage_args(packed, fsdp, *extra, "parallel.strategy=fsdp")[1:])))
    assert max_diff(fsdp, one) < 1e-5
    assert json.loads((fsdp / "manifest.json").read_text())["stats"]["parallel"] == {"strategy": "fsdp",
                                                                                     "world_size": 1}
    assert (fsdp / "checkpoints" / "step_000008" / "dcp").is_dir()
    shutil.copytree(fsdp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000012")
    (resumed / "manifest.json").unlink()
    assert "step_000008" in solo(stage_args(packed, resumed, *extra))
    assert max_diff(resumed, one) < 1e-5


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _wait_for(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        rows = read_metrics(run_dir)
        if (run_dir / "checkpoints" / "step_000010").is_dir() and rows and rows[-1]["step"] >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended or stalled before step {step}: {proc.poll()}")


def test_kill_9_of_one_rank_under_max_restarts_resumes_bitwise(runs, packed, tmp_path):
    out = tmp_path / "killed"
    p = subprocess.Popen(torchrun(2, *stage_args(packed, out)[1:], restarts=1), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    _wait_for(out, 12, p)
    workers = _children(p.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    _, err = p.communicate(timeout=180)
    assert p.returncode == 0, err[-4000:]
    assert "resuming from" in err
    assert max_diff(out, runs["ddp"]) == 0.0


def test_sigterm_checkpoints_every_rank_and_the_same_command_resumes(runs, packed, tmp_path):
    out = tmp_path / "term"
    cmd = torchrun(2, *stage_args(packed, out)[1:])
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    _wait_for(out, 12, p)
    for w in _children(p.pid):  # what torchrun (and SLURM, with --signal) delivers to the workers
        os.kill(w, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert "SIGTERM: finishing this step, then saving a checkpoint" in err
    assert "Run the same command to continue" in err
    assert p.returncode != 0
    stopped = max(int(c.name[5:]) for c in (out / "checkpoints").iterdir() if c.name.startswith("step_"))
    assert 12 <= stopped < STEPS
    assert not (out / "manifest.json").exists()
    r = run(cmd)
    ok(r)
    assert f"resuming from {out / 'checkpoints' / f'step_{stopped:06d}'}" in r.stderr
    assert max_diff(out, runs["ddp"]) == 0.0


def test_two_simulated_nodes_train_like_two_local_processes(runs, packed, tmp_path):
    out, port = tmp_path / "nodes", free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               *stage_args(packed, out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=ENV) for r in (0, 1)]
    errs = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert max_diff(out, runs["ddp"]) == 0.0


def test_ranks_that_time_their_steps_differently_train_rank_0s_budgeted_length(packed, tmp_path):
    """train.time_budget on 2 processes whose steps take 0.5 s (rank 0) and 0.25 s (rank 1): both
    train the 12 steps rank 0 measured (0.1 min / 0.5 s), not 12 and 24 (which would hang)."""
    out = tmp_path / "budget"
    args = stage_args(packed, out, "train.time_budget=0.1", "checkpoint.every=0")[2:]
    r = run(torchrun(2, str(Path(__file__).parent / "budget_ranks.py"), *args), timeout=120)
    ok(r)
    assert "measured 0.5 s/step over steps 3-5 -> 12 of 60 steps" in r.stderr
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert stats["steps"] == stats["resolved_steps"] == 12 and stats["parallel"]["world_size"] == 2


def test_launch_errors_are_one_clear_line(packed, tmp_path):
    # fsdp in a plain process: says how to launch it
    r = run([sys.executable, *stage_args(packed, tmp_path / "a", "parallel.strategy=fsdp")])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "needs a process group" in r.stderr and "torchrun --nproc_per_node N -m lmlab" in r.stderr
    # a world size that does not divide the global batch: says which do
    r = run(torchrun(2, *stage_args(packed, tmp_path / "b", "train.batch_size=3", "train.grad_accum=1")[1:]))
    assert r.returncode != 0
    assert "2 processes cannot share a global batch" in r.stderr and "world sizes that can: 1, 3" in r.stderr
    assert not (tmp_path / "b").exists()
    # launched as rank 0 of 2 without a rendezvous endpoint
    env = {k: v for k, v in ENV.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run([sys.executable, *stage_args(packed, tmp_path / "c")], capture_output=True, text=True,
                       env={**env, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "MASTER_ADDR and MASTER_PORT are not set" in r.stderr
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> dict:
    """A micro pretrained model (context 64) and the embedded tasks' SFT and DPO files."""
    from conftest import build_micro_pipeline

    from lmlab.tasks import stage as tasks

    root = tmp_path_factory.mktemp("dist_chat")
    built = build_micro_pipeline(root)
    tasks.run(tasks.Config(out=str(root / "tasks")))
    return {"model": built["model"], "tasks": root / "tasks"}


def test_sft_and_dpo_on_two_processes_match_one(chat_model, tmp_path):
    """SFT under DDP is bit-identical to one process, LoRA SFT under FSDP2 close; DPO under FSDP2
    with one-pair forward passes agrees within float tolerance (the loop normalises by the
    step's pairs over both ranks)."""
    common = ["train.steps=6", "train.batch_size=4", "train.grad_accum=2", "eval.every=3", "eval.batches=1",
              "checkpoint.every=3", "train.device=cpu", "train.dtype=float32"]
    sft = ["-m", "lmlab", "sft", f"init={chat_model['model']}", f"data={chat_model['tasks'] / 'sft_train.jsonl'}",
           *common]
    solo([*sft, f"out={tmp_path / 'sft1'}"])
    ok(run(torchrun(2, *sft[1:], f"out={tmp_path / 'sft2'}")))
    assert curve(tmp_path / "sft2") == curve(tmp_path / "sft1")
    assert max_diff(tmp_path / "sft2", tmp_path / "sft1") == 0.0
    # LoRA under FSDP2: the adapters are rebuilt around the gathered weights for saving
    solo([*sft, f"out={tmp_path / 'lora1'}", "lora.enabled=true"])
    ok(run(torchrun(2, *sft[1:], f"out={tmp_path / 'lora2'}", "lora.enabled=true", "parallel.strategy=fsdp")))
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("lora1", "lora2"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    dpo = ["-m", "lmlab", "dpo", f"init={tmp_path / 'sft1'}", f"data={chat_model['tasks'] / 'dpo_train.jsonl'}",
           *common]
    solo([*dpo, f"out={tmp_path / 'dpo1'}"])
    ok(run(torchrun(2, *dpo[1:], f"out={tmp_path / 'dpo2'}", "parallel.strategy=fsdp", "train.micro_batch=1")))
    assert max_diff(tmp_path / "dpo2", tmp_path / "dpo1") < 1e-5
    m1, m2 = (json.loads((tmp_path / d / "manifest.json").read_text())["stats"] for d in ("dpo1", "dpo2"))
    assert m2["parallel"] == {"strategy": "fsdp", "world_size": 2}
    assert m2["final_train_loss"] == pytest.approx(m1["final_train_loss"], abs=1e-5)


@pytest.mark.parametrize("batch_size,grad_accum,world,micro", [
    (4, 2, 1, None), (4, 2, 2, None), (8, 1, 2, None), (8, 1, 4, 1), (4, 3, 2, None), (6, 4, 8, None),
    (8, 2, 4, 3), (16, 1, 8, 2), (4, 6, 3, 1)])
def test_rank_pieces_cover_the_global_batch_once_in_equal_passes(batch_size, grad_accum, world, micro):
    from lmlab.train.batching import rank_pieces

    seen, passes = [], set()
    for rank in range(world):
        pieces = rank_pieces(batch_size, grad_accum, world, rank, micro)
        passes.add(len(pieces))  # FSDP: every rank runs as many forward passes
        for m, rows in pieces:
            idx = range(batch_size)[rows] if rows is not None else range(batch_size)
            assert micro is None or len(idx) <= micro
            seen += [(m, r) for r in idx]
    assert sorted(seen) == [(m, r) for m in range(grad_accum) for r in range(batch_size)]
    assert len(passes) == 1
    shares = {rank: sum(len(range(batch_size)[rows] if rows else range(batch_size))
                        for _, rows in rank_pieces(batch_size, grad_accum, world, rank, micro)) for rank in range(world)}
    assert len(set(shares.values())) == 1


def test_world_sizes_that_cannot_split_the_batch_are_named():
    from lmlab.errors import UserError
    from lmlab.train.batching import rank_pieces, valid_world_sizes

    assert valid_world_sizes(4, 2, limit=16) == [1, 2, 4, 8]
    with pytest.raises(UserError, match=r"3 processes cannot share .* world sizes that can: 1, 2, 4, 8"):
        rank_pieces(4, 2, 3, 0)


def test_eval_shard_splits_batches_only_when_active():
    from lmlab.train.batching import EvalShard

    assert EvalShard(1, 3, active=True).take(range(7)) == [1, 4]
    assert EvalShard(1, 3, active=False).take(range(3)) == [0, 1, 2]  # fsdp: every rank runs every batch
    assert EvalShard().total([1.5, 2]) == [1.5, 2]
    assert EvalShard(0, 2, active=True).writes and not EvalShard(1, 2, active=True).writes
    assert EvalShard(1, 2, active=False).writes


def test_activation_checkpointing_runs_each_block_again_in_backward():
    from lmlab.models.family import build_model
    from lmlab.train.parallelize import apply_activation_checkpointing

    model = build_model({"preset": "micro", "vocab_size": 64, "max_seq_len": 16})
    calls = []
    for i, block in enumerate(model.blocks):
        inner = block.forward
        block.forward = lambda *a, _i=i, _f=inner, **k: (calls.append(_i), _f(*a, **k))[1]
    apply_activation_checkpointing(model)
    x = torch.randint(0, 64, (2, 16))
    _, loss = model(x, x, return_logits=False)
    assert calls == list(range(len(model.blocks)))
    loss.backward()  # each block's forward is recomputed once
    assert sorted(calls) == sorted(list(range(len(model.blocks))) * 2)
    with torch.no_grad():  # no recomputation where there is no backward
        calls.clear()
        model(x)
        assert calls == list(range(len(model.blocks)))


def test_srun_style_launch_without_torchrun(runs, packed, tmp_path):
    """`srun --ntasks 2 python -m lmlab ...`: rank and world size from SLURM's variables."""
    out, port = tmp_path / "srun", free_port()
    base = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [subprocess.Popen([sys.executable, *stage_args(packed, out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**base, "SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                                   "SLURM_STEP_ID": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in (0, 1)]
    errs = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert max_diff(out, runs["ddp"]) == 0.0


def test_ema_under_fsdp_is_sharded_checkpointed_and_resumes_on_one_process(packed, tmp_path):
    """train.ema with FSDP2: the average is kept in shards, saved with the model's shards (DCP),
    read back on one process, and the saved model is the average, as on one process."""
    extra = ("train.steps=12", "checkpoint.every=4", "train.ema=0.9")
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    solo(stage_args(packed, one, *extra))
    ok(run(torchrun(2, *stage_args(packed, two, *extra, "parallel.strategy=fsdp")[1:])))
    assert max_diff(two, one) < 1e-6
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000012")
    (resumed / "manifest.json").unlink()
    assert not (resumed / "checkpoints" / "step_000008" / "ema.pt").exists()  # it is in dcp/
    err = solo(stage_args(packed, resumed, *extra))
    assert "resuming from" in err and "step_000008" in err
    assert max_diff(resumed, one) < 1e-6


def test_a_pipeline_under_torchrun_runs_the_other_stages_on_rank_0(tmp_path):
    root = tmp_path / "pipe"
    cmd = torchrun(2, "-m", "lmlab", "pipeline", str(Path(__file__).parent.parent / "configs/pipelines/smoke.yaml"),
                   f"root={root}", "only=[corpus, tokenizer, pack, pretrain]", "stages.3.config.train.steps=10")
    r = run(cmd)
    ok(r)
    for d in ("corpus", "tokenizer", "packed", "model"):
        assert (root / d / "manifest.json").is_file(), d
    assert json.loads((root / "model" / "manifest.json").read_text())["stats"]["parallel"]["world_size"] == 2
    assert r.stdout.count("=== [smoke] done in") == 1  # rank 0 alone speaks


def test_other_verbs_refuse_a_multi_process_launch(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmlab", "corpus", f"out={tmp_path / 'c'}"], capture_output=True,
                       text=True, env={**ENV, "RANK": "1", "WORLD_SIZE": "2"}, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "`lmlab corpus` runs in one process" in r.stderr and not (tmp_path / "c").exists()


PER_RANK_SCRIPT = '''
import sys, torch
from lmlab import dist
from lmlab.train.loop import CheckpointConfig, EvalConfig, RunOptions, TrainConfig, train

class Cfg(RunOptions):
    train: TrainConfig
    eval: EvalConfig

class PerRank:
    """A carry that differs per rank (as TRM's halting state does: each rank holds its own rows)."""
    def __init__(self):
        self.carry = torch.zeros(3)
    def before_step(self, model, step):
        self.carry = self.carry * 0.5 + step + 10 * dist.rank()
    def batch(self, step, micro):
        return torch.full((2, 3), float(step + micro))
    def loss(self, model, batch):
        return (model(batch) - self.carry).pow(2).sum(), batch.numel()
    def evaluate(self, model, device):
        return {}
    def state_dict(self):
        return {"carry": self.carry.clone()}
    def load_state_dict(self, state):
        self.carry = state["carry"].clone()

out = sys.argv[1]
cfg = Cfg(train={"steps": 6, "grad_accum": 2, "batch_size": 2, "device": "cpu", "dtype": "float32", "warmup_steps": 0,
                 "lr": 0.05},
          eval={"batches": 0}, log={"every": 1}, checkpoint=CheckpointConfig(every=2, keep=5))
torch.manual_seed(0)
model = torch.nn.Linear(3, 3)
objective = PerRank()
train(model, objective, cfg, out, total_steps=6, resume_config={"toy": 1})
torch.save({"carry": objective.carry, "weight": model.weight.detach()}, f"{out}/final_{dist.rank()}.pt")
'''


def test_per_rank_objective_state_is_checkpointed_per_rank_and_resumes_exactly(tmp_path):
    script = tmp_path / "toy.py"
    script.write_text(PER_RANK_SCRIPT)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    ok(run(torchrun(2, str(script), str(full))))
    saved = torch.load(full / "checkpoints" / "step_000002" / "objective.pt", weights_only=True)
    assert len(saved["__per_rank__"]) == 2
    assert not torch.equal(saved["__per_rank__"][0]["carry"], saved["__per_rank__"][1]["carry"])
    shutil.copytree(full, resumed)
    for step in (4, 6):
        shutil.rmtree(resumed / "checkpoints" / f"step_{step:06d}")
    for f in resumed.glob("final_*.pt"):
        f.unlink()
    r = run(torchrun(2, str(script), str(resumed)))
    ok(r)
    assert "resuming from" in r.stderr
    for rank in (0, 1):
        a = torch.load(full / f"final_{rank}.pt", weights_only=True)
        b = torch.load(resumed / f"final_{rank}.pt", weights_only=True)
        assert torch.equal(a["carry"], b["carry"]) and torch.equal(a["weight"], b["weight"])
    # per-rank state that differs cannot be split over another number of processes
    again = tmp_path / "again"
    shutil.copytree(full, again)
    shutil.rmtree(again / "checkpoints" / "step_000006")
    r = run([sys.executable, str(script), str(again)])
    assert r.returncode != 0 and "per-process objective state of 2 processes" in r.stderr


def test_grpo_on_two_processes_gathers_groups_and_resumes_exactly(chat_model, tmp_path):
    """GRPO under DDP: a group of 8 split over 2 processes (4 rows each) gets its advantages from
    the gathered rewards; each process's rollout is its checkpointed state, so a resume is exact."""
    import shutil

    env = {**ENV, "PYTHONPATH": str(Path(__file__).resolve().parent)}  # test_grpo's reward function
    problems = tmp_path / "short.jsonl"  # the micro model's 64-token context: short questions
    problems.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
                                + "\n" for a, b in [(2, 3), (4, 1), (7, 2), (5, 5), (3, 6), (8, 1)]))
    out = tmp_path / "g2"
    args = ["-m", "lmlab", "grpo", f"init={chat_model['model']}", f"problems={problems}",
            "num_generations=8", "max_completion_length=16", "long_prompts=skip", "train.steps=3",
            "train.batch_size=8", "train.lr=1e-3", "train.device=cpu", "train.dtype=float32", "eval.batches=0",
            "log.every=1",
            "checkpoint.every=1", "rewards=[{name: test_grpo:digits_reward}]", f"out={out}"]
    r = subprocess.run(torchrun(2, *args[1:]), capture_output=True, text=True, env=env, timeout=240)
    ok(r)
    lines = [x for x in read_metrics(out) if "loss" in x]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(x["frac_reward_zero_std"] < 1 and x["grad_norm"] > 0 for x in lines), lines
    assert json.loads((out / "manifest.json").read_text())["stats"]["parallel"] == {"strategy": "ddp", "world_size": 2}
    again = tmp_path / "again"
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / "step_000003")
    for f in ("manifest.json", "model.safetensors"):
        (again / f).unlink()
    r = subprocess.run(torchrun(2, *args[1:-1], f"out={again}"), capture_output=True, text=True, env=env, timeout=240)
    ok(r)
    assert max_diff(again, out) == 0.0


def test_trm_on_two_processes_matches_one_and_resumes_exactly(tmp_path):
    """TRM under DDP: each process carries the ACT state of its rows (checkpointed per rank); the
    exploration draws and batches are per (batch, row), so 2 processes train like 1 (within float
    tolerance), and a resumed 2-process run is bitwise the uninterrupted one."""
    import shutil

    from test_trm_train import trm_args, write_toy_set

    data = write_toy_set(tmp_path / "set")
    one, two = tmp_path / "one", tmp_path / "two"
    solo(trm_args(data, one, 12, "train.device=cpu")[1:])
    ok(run(torchrun(2, *trm_args(data, two, 12, "train.device=cpu")[1:]), timeout=240))
    assert json.loads((two / "manifest.json").read_text())["stats"]["parallel"] == {"strategy": "ddp", "world_size": 2}
    assert max_diff(one, two) < 1e-4
    a, b = ([x for x in read_metrics(d) if "loss" in x] for d in (one, two))
    assert [x["exact_accuracy"] for x in a] == [x["exact_accuracy"] for x in b]  # the same rows halt, the same right
    assert all(abs(x["loss"] - y["loss"]) < 1e-4 for x, y in zip(a, b))
    again = tmp_path / "again"
    shutil.copytree(two, again)
    shutil.rmtree(again / "checkpoints" / "step_000012")
    for f in ("manifest.json", "model.safetensors"):
        (again / f).unlink()
    ok(run(torchrun(2, *trm_args(data, again, 12, "train.device=cpu")[1:]), timeout=240))
    assert max_diff(again, two) == 0.0
