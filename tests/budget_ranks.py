"""`python tests/budget_ranks.py VERB ARGS...` under torchrun: `lmlab VERB ARGS...` with each
optimizer step "taking" 0.5 s on rank 0 and 0.25 s on the others (lmlab.train.loop.clock
replaced, as tests/test_time_budget.py does in-process), so the ranks measure different step
times: the time-budget test of tests/test_distributed.py."""

import os
import sys

from lmlab.cli import main
from lmlab.train import loop


class FakeClock:
    def __init__(self, step_s: float) -> None:
        self.t, self.step_s = 0.0, step_s

    def __call__(self) -> float:  # the loop calls it twice per step
        self.t += self.step_s
        return self.t


loop.clock = FakeClock(0.5 if os.environ.get("RANK", "0") == "0" else 0.25)
sys.exit(main(sys.argv[1:]))
