"""The few collective operations the suite needs under DDP, as no-ops in a single process.

Validation and test cases are spread over the ranks (rank r scores cases r, r + world, ...) and the per-case
results gathered, so every rank ends with all of them; weights that only rank 0 can read (its best checkpoint,
on its own disk) are broadcast from it. ``torch.distributed`` object collectives pickle their payloads, which is
fine for per-case scores and one network's state dict, and works over gloo (CPU) and NCCL alike. Methods keep
their training state identical on all ranks with the two tensor collectives: a memory bank enqueues the keys of
every rank (``gather_across_ranks``), running class statistics sum per-class counts over the ranks (``all_reduce_sum``).
"""
from __future__ import annotations

from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

from core.errors import UserError

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of the initialised process group ((0, 1) without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def my_share(items: Sequence[T]) -> list[T]:
    """This rank's items: every world-th, from its rank on (balanced to one item, order kept)."""
    rank, world = rank_and_world()
    return list(items[rank::world])


def check_shareable(case_count: int, world_size: int, stage: str) -> None:
    """A rank without a case would skip the evaluation loop and leave the others waiting in the gather."""
    if case_count < world_size:
        raise UserError(f"the {stage} set has {case_count} cases, fewer than the {world_size} devices that share it",
                        where=f"DEVICES x num_nodes = {world_size} ranks", fix="use fewer DEVICES (or more evaluation cases: data.max_eval_cases)")


def gather_to_all(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    rank, world = rank_and_world()
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def gather_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` of every rank concatenated along dim 0 in rank order (no gradient); itself in one process."""
    _, world = rank_and_world()
    if world == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place (unchanged in one process)."""
    _, world = rank_and_world()
    if world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the others pass anything, e.g. None)."""
    rank, world = rank_and_world()
    if world == 1:
        return value
    holder = [value if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def release_process_group() -> None:
    """Destroy the default process group, if this process has one, once its run has finished.

    Lightning leaves it alive, and at interpreter exit gloo's worker threads can then abort the process ("terminate
    called without an active exception", SIGABRT; pytorch/pytorch#190489): torchrun reports a finished run, rows
    written, as failed. Only after success: a rank that failed may leave others inside a collective, and destroying
    the group under them can deadlock (torchtitan calls it on success only, for the same reason).
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_world_fits(config: dict, datamodule, uses_unlabeled: bool) -> None:
    """Before Lightning launches the ranks (each would raise, and print, the same error): the global batches split
    evenly over the devices of every stage, and each rank gets at least one validation and test case."""
    trainer = config["trainer"]
    world = int(trainer["devices"]) * int(trainer["num_nodes"])
    if world == 1:
        return
    where = f"DEVICES={trainer['devices']} x num_nodes={trainer['num_nodes']} = {world} ranks"
    sections = [("", config["data"])] + [(f"per_stage.{stage}.", values["data"])
                                        for stage, values in (config.get("per_stage") or {}).items() if "data" in (values or {})]
    for prefix, data in sections:
        for key in ("labeled_batch_size", "unlabeled_batch_size") if uses_unlabeled else ("labeled_batch_size",):
            if key in data and int(data[key]) % world:
                raise UserError(f"{prefix}data.{key}={data[key]} cannot be split evenly over {world} devices", where=where,
                                fix="choose DEVICES dividing the labeled and unlabeled batch sizes (or change the batch sizes)")
    for stage in ("val", "test"):
        check_shareable(len(datamodule.cases(stage)), world, stage)
