#!/bin/bash
# End-to-end check of `lmlab slurm` against a real one-node SLURM started on this machine.
#
#   sudo scripts/slurm_selftest.sh            # as root; about 6 minutes on 2 cores; CI does not run it
#   LMLAB_SLURM_SELFTEST_DIR=/tmp/x scripts/slurm_selftest.sh
#
# It installs slurm-wlm and munge with apt-get when they are missing, starts munged, slurmctld and
# slurmd with their own socket, ports, state and logs under the work directory (nothing in /etc is
# changed; slurm.conf names this host with the CPUs and memory `slurmd -C` finds, and uses
# proctrack/linuxproc, which needs neither systemd nor cgroups), builds a micro corpus, tokenizer
# and packed data, then submits jobs written by `lmlab slurm` that train with 2 CPU processes
# (torchrun, gloo):
#   A  a short pretraining run: COMPLETED, exit 0, a manifest from a 2-process run;
#   B  SIGUSR1 to the batch shell mid-run (what --signal=B:USR1 delivers): the processes save a
#      checkpoint, the job is requeued and its rerun resumes and finishes;
#   C  the real time-limit path: the job's TimeLimit is cut mid-run, so SLURM itself sends the
#      warning; the job is requeued; its rerun is then stopped with a plain scancel, which must end
#      the job (CANCELLED, not requeued again) and keep a checkpoint.
# Every check prints PASS or FAIL; the daemons are stopped at the end; the exit code is the number
# of failures. Re-running starts from a clean SLURM state (the data artifacts are reused).
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
W=${LMLAB_SLURM_SELFTEST_DIR:-/tmp/lmlab-slurm-selftest}
PY=$REPO/.venv/bin/python
export SLURM_CONF=$W/etc/slurm.conf LMLAB_NO_PROGRESS=1
failures=0 finished=0 T0=$SECONDS

say() { printf '[%4ds] %s\n' $((SECONDS - T0)) "$*"; }
pass() { say "PASS $*"; }
fail() { say "FAIL $*"; failures=$((failures + 1)); }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
die() { fail "$*"; exit 1; }

[ "$(id -u)" = 0 ] || { echo "FAIL run as root: it installs packages and starts slurmd"; exit 1; }
[ -x "$PY" ] || { echo "FAIL no $PY: run ./test.sh or ./speedrun.sh once to create the venv"; exit 1; }

stop_daemons() {
  # Only the daemons this script started, by the pid files it gave them.
  local f pid
  for f in "$W/run/slurmd.pid" "$W/run/slurmctld.pid" "$W/munge/munged.pid"; do
    pid=$(cat "$f" 2>/dev/null) || continue
    kill "$pid" 2>/dev/null && for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    rm -f "$f"
  done
}
cleanup() {
  [ -f "$W/run/slurmctld.pid" ] && scancel --quiet --user=root 2>/dev/null
  sleep 1
  stop_daemons
  say "daemons stopped; logs and runs kept in $W"
  if [ "$finished" != 1 ]; then
    say "INTERRUPTED after $((SECONDS - T0)) s with $failures failure(s): not every check ran"; exit 1
  fi
  say "$([ "$failures" = 0 ] && echo "ALL PASSED" || echo "$failures FAILED") in $((SECONDS - T0)) s"
  exit "$failures"
}

# --- helpers over `scontrol show job`
field() { scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p"; }
wait_state() {  # JOB SECONDS STATE...: wait until the job is in one of the states
  local job=$1 limit=$2 s; shift 2
  for _ in $(seq "$limit"); do
    s=$(field "$job" JobState)
    for want in "$@"; do [ "$s" = "$want" ] && return 0; done
    sleep 1
  done
  say "job $job is $s after ${limit}s (wanted $*)"; return 1
}
wait_for() {  # SECONDS COMMAND...: wait until the command succeeds
  local limit=$1; shift
  for _ in $(seq "$limit"); do "$@" && return 0; sleep 1; done
  return 1
}
last_step() { sed -n 's/^{"step": \([0-9]*\), "loss".*/\1/p' "$1/metrics.jsonl" 2>/dev/null | tail -n 1; }
at_step() { [ "$(last_step "$1")" -ge "$2" ] 2>/dev/null; }
checkpoint_steps() { ls "$1/checkpoints" 2>/dev/null | sed -n 's/^step_0*\([0-9]\)/\1/p' | tr '\n' ' '; }
has_checkpoint() { [ -n "$(checkpoint_steps "$1")" ]; }
in_log() { grep -q -- "$2" "$1"; }
restarts_are() { [ "$(field "$1" Restarts)" = "$2" ]; }
node_idle() { [ "$(sinfo -h -o %T 2>/dev/null)" = idle ]; }
submit() {  # NAME EXTRA...: lmlab slurm pretrain on 1 node x 2 CPU processes; prints the job id
  local name=$1; shift
  "$PY" -m lmlab slurm pretrain data="$W/data/packed" out="$name" model.preset=micro train.batch_size=8 \
    train.device=cpu eval.batches=2 log.every=10 "$@" --root "$W/runs" --nodes 1 --gpus-per-node 0 \
    --procs-per-node 2 --time 00:10:00 --submit >"$W/runs/$name.submit" 2>&1
  sed -n 's/^submitted job \([0-9]*\);.*/\1/p' "$W/runs/$name.submit"
}

# --- packages
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  say "installing slurm-wlm and munge (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null \
    || die "apt-get install slurm-wlm munge"
fi
say "$(slurmctld -V), $(munged -V 2>&1 | head -n 1)"

# --- a clean start: stop what an earlier run left, fresh state (the data artifacts stay)
stop_daemons
trap cleanup EXIT
trap 'exit 130' INT TERM
rm -rf "$W/etc" "$W/run" "$W/state" "$W/spool" "$W/runs" "$W/munge"
mkdir -p "$W/etc" "$W/run" "$W/state" "$W/spool" "$W/runs" "$W/munge"

# --- munged on its own socket and key
chown munge:munge "$W/munge" && chmod 711 "$W/munge"  # clients reach the socket; only munge lists it
dd if=/dev/urandom of="$W/munge/munge.key" bs=1024 count=1 status=none
chown munge:munge "$W/munge/munge.key" && chmod 400 "$W/munge/munge.key"
runuser -u munge -- munged --socket="$W/munge/munge.socket" --key-file="$W/munge/munge.key" \
  --pid-file="$W/munge/munged.pid" --log-file="$W/munge/munged.log" --seed-file="$W/munge/munged.seed" \
  || die "munged did not start (see $W/munge/munged.log)"
check "munged answers" bash -c "munge -n -S '$W/munge/munge.socket' | unmunge -S '$W/munge/munge.socket' >/dev/null"

# --- slurm.conf for this host
HOST=$(hostname -s)
NODE=$(slurmd -C | head -n 1)  # NodeName=HOST CPUs=... RealMemory=...: this machine as slurmd sees it
CPUS=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$NODE")
[ "${CPUS:-0}" -ge 2 ] || die "this machine has ${CPUS:-?} CPUs; the jobs need 2"
cat >"$W/etc/slurm.conf" <<EOF
# written by scripts/slurm_selftest.sh: one node, root, no systemd or cgroups needed
ClusterName=lmlabselftest
SlurmctldHost=$HOST
SlurmctldPort=${LMLAB_SLURMCTLD_PORT:-16817}
SlurmdPort=${LMLAB_SLURMD_PORT:-16818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire is also how long SLURM holds a requeued job before it may start again (default 120 s)
AuthInfo=socket=$W/munge/munge.socket,cred_expire=10
StateSaveLocation=$W/state
SlurmdSpoolDir=$W/spool
SlurmctldPidFile=$W/run/slurmctld.pid
SlurmdPidFile=$W/run/slurmd.pid
SlurmctldLogFile=$W/run/slurmctld.log
SlurmdLogFile=$W/run/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=60  # seconds from SIGTERM to SIGKILL when SLURM ends a job: the time to save a checkpoint
MinJobAge=3600
$NODE State=UNKNOWN
PartitionName=selftest Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -i || die "slurmctld did not start (see $W/run/slurmctld.log)"
slurmd || die "slurmd did not start (see $W/run/slurmd.log)"
check "SLURM is up: node $HOST idle with $CPUS CPUs" wait_for 60 node_idle

# --- micro data: corpus -> tokenizer -> pack (a no-op when an earlier run built it)
say "building micro data in $W/data"
(cd "$REPO" && "$PY" -m lmlab pipeline configs/pipelines/smoke.yaml root="$W/data" only='[corpus, tokenizer, pack]' \
  stages.0.config.sources.0.max_docs=60 stages.1.config.vocab_size=400 >"$W/data.log" 2>&1)
check "micro data built" test -f "$W/data/packed/manifest.json"

# --- A: a short run to completion
A=$(submit short train.steps=20 eval.every=10 checkpoint.every=10)
[ -n "$A" ] || die "lmlab slurm --submit printed no job id: $(cat "$W/runs/short.submit")"
say "A: job $A: pretrain 20 steps"
check "A: job $A COMPLETED" wait_state "$A" 300 COMPLETED FAILED CANCELLED TIMEOUT
check "A: state COMPLETED, exit 0:0" test "$(field "$A" JobState) $(field "$A" ExitCode)" = "COMPLETED 0:0"
LOG_A=$W/runs/slurm/lmlab-short-$A.log
check "A: log says the run finished" in_log "$LOG_A" "lmlab: pretrain finished"
check "A: run directory holds a manifest" test -f "$W/runs/short/manifest.json"
check "A: trained by 2 processes" grep -q '"world_size": 2' "$W/runs/short/manifest.json"

# --- B: SIGUSR1 to the batch shell mid-run -> checkpoint, requeue, resume, finish
B=$(submit preempt train.steps=600 eval.every=1000 checkpoint.every=1000)
say "B: job $B: pretrain 600 steps, SIGUSR1 once training runs"
check "B: training reached step 50" wait_for 240 at_step "$W/runs/preempt" 50
scancel --signal=USR1 --batch "$B"
say "B: sent SIGUSR1 to the batch shell at step $(last_step "$W/runs/preempt")"
check "B: job requeued (Restarts=1)" wait_for 120 restarts_are "$B" 1
LOG_B=$W/runs/slurm/lmlab-preempt-$B.log
check "B: training processes got SIGTERM and stopped at a step" in_log "$LOG_B" "SIGTERM: finishing this step"
check "B: a checkpoint was saved (steps: $(checkpoint_steps "$W/runs/preempt"))" has_checkpoint "$W/runs/preempt"
check "B: log says the job was requeued" in_log "$LOG_B" "requeuing job $B"
check "B: rerun COMPLETED" wait_state "$B" 300 COMPLETED FAILED CANCELLED TIMEOUT
check "B: state COMPLETED, exit 0:0" test "$(field "$B" JobState) $(field "$B" ExitCode)" = "COMPLETED 0:0"
check "B: rerun resumed from the checkpoint" in_log "$LOG_B" "resuming from .*step_0"
check "B: run finished (manifest, 600 steps)" test "$(last_step "$W/runs/preempt")" = 600 -a \
  -f "$W/runs/preempt/manifest.json"

# --- C: SLURM's own time-limit warning (--signal=B:USR1@90), then a plain scancel of the rerun
C=$(submit timelimit train.steps=3000 eval.every=10000 checkpoint.every=10000 --signal-seconds 90)
say "C: job $C: pretrain 3000 steps; the time limit is cut to 2 minutes once training runs"
check "C: training reached step 20" wait_for 240 at_step "$W/runs/timelimit" 20
scontrol update JobId="$C" TimeLimit=2  # minutes: SLURM's warning is now due within a minute
check "C: SLURM's warning requeued the job (Restarts=1)" wait_for 180 restarts_are "$C" 1
LOG_C=$W/runs/slurm/lmlab-timelimit-$C.log
check "C: log shows SLURM's warning" in_log "$LOG_C" "lmlab: SIGUSR1"
check "C: a checkpoint was saved (steps: $(checkpoint_steps "$W/runs/timelimit"))" has_checkpoint "$W/runs/timelimit"
first=$(checkpoint_steps "$W/runs/timelimit")
scontrol update JobId="$C" TimeLimit=10  # the rerun gets its ten minutes back
check "C: rerun resumed and trains" wait_for 240 in_log "$LOG_C" "resuming from .*step_0"
sleep 5
scancel "$C"
# CANCELLED shows at once; the node is idle again once the processes have saved and the script has ended
check "C: plain scancel ends the job and frees the node" wait_for 120 node_idle
check "C: state CANCELLED, not requeued again" test "$(field "$C" JobState) $(field "$C" Restarts)" = "CANCELLED 1"
check "C: log says SLURM ended the job" in_log "$LOG_C" "lmlab: SLURM ended the job"
check "C: a newer checkpoint was kept (before: $first, now: $(checkpoint_steps "$W/runs/timelimit"))" \
  test "$(checkpoint_steps "$W/runs/timelimit")" != "$first"
finished=1
