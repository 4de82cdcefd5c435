"""The `parallel:` section of every training stage's config (how a run spreads over processes).

Kept apart from lmlab.train.parallelize (which wraps models with DDP/FSDP2) so that configs,
the planner and the SLURM script writer read it without importing torch.distributed code.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from lmlab.config import Strict


class ParallelConfig(Strict):
    strategy: Literal["auto", "none", "ddp", "fsdp"] = Field(
        "auto", description="auto: ddp when launched on several processes (torchrun, srun), none on one; ddp: "
        "replicate the model, all-reduce gradients; fsdp: FSDP2 (fully_shard per block: parameters, gradients "
        "and optimizer state sharded over the processes); none: one process only")
    activation_checkpointing: bool = Field(False, description="recompute each block's activations in the "
                                           "backward pass instead of storing them (less memory, ~30% more compute)")
    fsdp_param_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="fsdp only: dtype of the gathered parameters for compute (auto: bfloat16 when the "
        "run trains under bf16 autocast); gradients are always reduced in float32")
    mesh: Optional[str] = Field(None, description="backend=jax only: the device mesh over every chip of every "
                                "host, e.g. data:8 or data:2,fsdp:4 (sizes multiply to the device count; one may be "
                                "-1 for the rest). fsdp splits parameters, gradients and optimizer state over its "
                                "devices; unset: data parallel over every device")
    reshard_after_forward: bool = Field(True, description="fsdp only: free gathered parameters after each "
                                        "block's forward (ZeRO-3; false keeps them until backward: ZeRO-2, faster, "
                                        "more memory)")
