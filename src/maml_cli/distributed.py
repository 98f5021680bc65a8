"""One meta-training over several processes (ranks) with ``torch.distributed``, as ``torchrun`` starts them.

    torchrun --standalone --nproc_per_node=2 $(which maml-train) experiment=maml_omniglot_5w1s

Every rank draws the same meta-batch from the same generator and computes its own share of the tasks
(rank r of N takes tasks r*B/N .. (r+1)*B/N - 1 of a meta-batch of B), so the union of the ranks' tasks is
the single-process meta-batch. The ranks' gradients are summed with an all-reduce (gloo on CPUs, NCCL on
GPUs) and every rank takes the same optimizer step, so all ranks hold the same meta-parameters, and a run
on N ranks follows the curve of the same run in one process (to the rounding of a sum taken in another
order). Meta-validation and meta-test episodes are shared out the same way and their scores gathered.
Rank 0 alone writes TensorBoard, checkpoints and ``config.yaml`` and shows the progress bar.

A rank that stops answering ends the job once a collective has waited ``MAML_CLI_COLLECTIVE_TIMEOUT``
seconds (default 300); a rank that dies is noticed by ``torchrun``, which stops the others.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from maml_cli.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")
TIMEOUT_VARIABLE = "MAML_CLI_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 300


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of one meta-training: ``rank`` of ``world_size`` (1: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this rank writes the run's files and shows its progress."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of ``items`` (a meta-batch), whose length the world size divides."""
        size = len(items) // self.world_size
        return list(items[self.rank * size:(self.rank + 1) * size])

    def owns(self, index: int) -> bool:
        """Whether this rank computes evaluation chunk ``index`` (chunks go round the ranks)."""
        return index % self.world_size == self.rank

    def sum_gradients(self, model: nn.Module) -> None:
        """Sum the parameters' ``.grad`` over the ranks, in one all-reduce (a missing gradient counts as zeros)."""
        if not self.several:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        collective(dist.all_reduce, flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def sum_metrics(self, metrics: dict[str, float], device: torch.device) -> dict[str, float]:
        """``metrics`` summed over the ranks (every rank has the same names)."""
        if not self.several:
            return metrics
        names = sorted(metrics)
        values = torch.tensor([metrics[n] for n in names], dtype=torch.float64, device=device)
        collective(dist.all_reduce, values)
        return dict(zip(names, values.tolist()))

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` is true on any rank (a stop asked of one rank stops all after the same iteration)."""
        if not self.several:
            return flag
        value = torch.tensor([int(flag)], device=device)
        collective(dist.all_reduce, value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def gather(self, item: T) -> list[T]:
        """Every rank's ``item`` (any picklable value), in rank order."""
        if not self.several:
            return [item]
        items: list[T] = [item] * self.world_size
        collective(dist.all_gather_object, items, item)
        return items


SINGLE = Ranks()


def collective(operation: Callable[..., object], *args: object, **kwargs: object) -> None:
    """Run a collective, turning a timeout (a rank that died or hangs) into an error that names this rank."""
    try:
        operation(*args, **kwargs)
    except (RuntimeError, dist.DistBackendError) as err:
        rank, size = dist.get_rank(), dist.get_world_size()
        raise UserError(f"rank {rank} of {size}: a collective operation with the other ranks failed or did not complete "
                        f"within {timeout_seconds()} s ({str(err).splitlines()[0]}). Another rank has stopped or hangs; "
                        f"see its own output. ({TIMEOUT_VARIABLE} sets the time limit.)") from err


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` (it sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_seconds() -> int:
    """The collective time limit: ``MAML_CLI_COLLECTIVE_TIMEOUT`` seconds, else :data:`DEFAULT_TIMEOUT_S`.

    Raises:
        UserError: the variable is not a positive whole number.
    """
    text = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_S))
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"{TIMEOUT_VARIABLE}={text!r}: give the collective time limit in whole seconds, e.g. {DEFAULT_TIMEOUT_S}.")
    return int(text)


def start() -> Ranks:
    """Join the ranks ``torchrun`` started (its ``env://`` rendezvous); a single process when it did not.

    CPU tensors go through gloo and, where CUDA is available, CUDA tensors through NCCL, in one process group.
    """
    if not launched():
        return SINGLE
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()))
    return current()


def current() -> Ranks:
    """This process's ranks: those of the process group, or a single process when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def stop() -> None:
    """Leave the process group (at the end of a run, or after an error)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_main(value: T) -> T:
    """Rank 0's ``value`` on every rank (the run's start time, so that every rank names the same run directory)."""
    ranks = current()
    if not ranks.several:
        return value
    box = [value]
    collective(dist.broadcast_object_list, box, src=0)
    return box[0]


def check_meta_batch(meta_batch_size: int, ranks: Ranks) -> None:
    """Refuse, before any work, a meta-batch that the ranks cannot share equally.

    Raises:
        UserError: ``meta_batch_size`` is not a multiple of the world size.
    """
    if meta_batch_size % ranks.world_size:
        raise UserError(f"meta_batch_size={meta_batch_size} cannot be shared equally by {ranks.world_size} ranks: each rank computes "
                        f"meta_batch_size / {ranks.world_size} tasks of every meta-batch. Use a multiple of {ranks.world_size} "
                        f"(e.g. meta_batch_size={ranks.world_size * max(1, round(meta_batch_size / ranks.world_size))}), or fewer ranks. "
                        f"An algorithm whose presets train one episode per step (ProtoNet) scales by taking more episodes per step.")


def device_of(device: torch.device, ranks: Ranks) -> torch.device:
    """A rank's device: with several ranks on CUDA, the GPU of its local rank."""
    if ranks.several and device.type == "cuda":
        return torch.device("cuda", ranks.local_rank)
    return device
