"""Data-parallel training for ``peftfast train`` under ``torchrun`` / ``accelerate launch``.

Which process this is, how many there are and which device it drives come from accelerate's
``PartialState``, which reads what the launcher set (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, or MPI's
variables) and joins the process group (NCCL on CUDA, gloo on CPU). With more than one process the job
wraps the patched model in DistributedDataParallel and gives each rank its share of the rows of every
global micro-batch. Losses are weighted by the *global* count of target tokens, so N ranks with
``--batch-size b`` compute the same step as one process with ``N * b``. Only rank 0 prints, writes
checkpoints and saves the adapter.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch


class Ranks:
    """This process's place in the job (a single process when no launcher started several).

    Creating it joins the launcher's process group, if there is one. Off CUDA the job is a CPU job even where
    accelerate would pick another device (MPS, XPU): the kernels and bitsandbytes' CPU path are what is tested.
    """

    def __init__(self) -> None:
        from accelerate import PartialState

        dist = torch.distributed
        # A group the caller made (a script that set one up before calling run_train) is theirs to close.
        self._owns_group = not (dist.is_available() and dist.is_initialized())
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self._devnull: Optional[object] = None

    @property
    def world(self) -> int:
        return self.state.num_processes

    @property
    def rank(self) -> int:
        return self.state.process_index

    @property
    def enabled(self) -> bool:
        """Whether several processes train together."""
        return self.state.use_distributed

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    def device(self) -> str:
        """``cuda:<local rank>`` (or ``cuda`` for one process) on a GPU, else ``cpu``."""
        return str(self.state.device)

    def start(self) -> None:
        """Silence stdout on ranks other than 0 (errors still reach stderr)."""
        if self.enabled and not self.is_main:
            self._devnull = open(os.devnull, "w")
            sys.stdout = self._devnull

    def stop(self) -> None:
        if self._devnull is not None:
            sys.stdout = sys.__stdout__
            self._devnull.close()
            self._devnull = None
        if self._owns_group and torch.distributed.is_available() and torch.distributed.is_initialized():
            from accelerate import PartialState

            self.state.destroy_process_group()
            # The singleton still describes the group just closed; a later run in this process starts afresh.
            PartialState._reset_state()

    def barrier(self) -> None:
        self.state.wait_for_everyone()

    def total(self, value: float) -> float:
        """Sum of ``value`` over ranks."""
        if not self.enabled:
            return value
        from accelerate.utils import reduce

        return float(reduce(torch.tensor([float(value)], dtype=torch.float64, device=self.state.device),
                            reduction="sum").item())

    def shard(self, batch: dict) -> dict:
        """This rank's rows of a global batch (a contiguous share; the first ranks take one more row when the
        batch does not divide evenly)."""
        with self.state.split_between_processes(dict(batch)) as mine:
            return mine

    def wrap(self, model: torch.nn.Module, device: str) -> torch.nn.Module:
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.state.local_process_index] if device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=ids)
