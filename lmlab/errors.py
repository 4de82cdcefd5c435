"""User-facing errors.

`UserError` is raised for anything the user can fix (a missing file, a bad config value, a
tokenizer mismatch). The CLI prints its message on one line, without a traceback, and exits
with code 2. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input, with a message that names the problem and the fix."""

    exit_code = 2


class Diverged(UserError):
    """Training reached a loss that is not finite: the run stopped without saving past it."""


class Interrupted(UserError):
    """Ctrl-C: the stage stopped cleanly; re-running the same command continues it."""

    exit_code = 130


class Preempted(Interrupted):
    """SIGTERM / SIGUSR1 (a SLURM time limit or preemption, torchrun stopping the workers):
    every rank saved a checkpoint and the stage stopped; the same command continues it.

    The exit code is EX_TEMPFAIL (75, "try again"): the generated sbatch scripts requeue the
    job on it, and torchrun's `--max-restarts` restarts the workers on any non-zero code.
    """

    exit_code = 75
