"""Sharding a range of global sample indices over torch.distributed ranks, and gathering
the results back in global order.

With per-sample keys (``seeds=``) a sample's noise depends on its global index only, so a
run sharded this way gives the same samples, bitwise, on any number of processes::

    import diffkern.distributed as dkd
    idx = dkd.shard_indices(1000)                  # this rank's global indices, contiguous
    x = dk.keyed_randn(idx, (3, 32, 32))           # x_T keyed by index
    x = dk.samplers.ddim_sample(model, x, seeds=idx, ...)
    images = dkd.gather_shards(x, 1000)            # (1000, 3, 32, 32) on every rank

Ranks hold contiguous, balanced slices: with ``n = q W + r``, ranks ``0 .. r-1`` get
``q + 1`` indices and the others ``q`` (a rank may get none when ``n < W``). Works on any
backend; on gloo the tensors are on the CPU, on nccl on the rank's GPU. Without an
initialized process group everything behaves as one process (rank 0 of 1).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["rank_and_world", "shard_bounds", "shard_range", "shard_indices", "gather_shards"]


def rank_and_world(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (the default group when None); ``(0, 1)`` when
    torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _check_count(n, name="n") -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s slice of ``range(n)`` over ``world_size`` ranks."""
    n = _check_count(n)
    world_size = _check_count(world_size, "world_size")
    if world_size == 0:
        raise ValueError("world_size must be >= 1")
    rank = _check_count(rank, "rank")
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
    q, r = divmod(n, world_size)
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


def shard_range(n: int, group=None) -> range:
    """This rank's contiguous slice of ``range(n)``."""
    return range(*shard_bounds(n, *rank_and_world(group)))


def shard_indices(n: int, group=None, device=None) -> torch.Tensor:
    """This rank's global indices of ``range(n)`` as an int64 tensor (use them as seeds)."""
    start, stop = shard_bounds(n, *rank_and_world(group))
    return torch.arange(start, stop, dtype=torch.int64, device=device)


def gather_shards(local: torch.Tensor, n: int, group=None) -> torch.Tensor:
    """Concatenate every rank's ``local`` (its slice of ``n`` along dim 0, as given by
    :func:`shard_range`) in rank order, i.e. in global index order; on every rank.

    Shards may differ in length by one (or be empty), so each is padded to the longest
    before the ``all_gather`` and trimmed after. All ranks must pass tensors of the same
    dtype, trailing shape and device kind."""
    if not isinstance(local, torch.Tensor):
        raise TypeError(f"local must be a torch.Tensor, got {type(local).__name__}")
    if local.dim() == 0:
        raise ValueError("local must have a leading (sample) dimension")
    rank, world = rank_and_world(group)
    bounds = [shard_bounds(n, r, world) for r in range(world)]
    size = bounds[rank][1] - bounds[rank][0]
    if local.shape[0] != size:
        raise ValueError(f"local holds {local.shape[0]} samples but rank {rank}'s shard of {n} has {size}")
    if world == 1:
        return local
    longest = max(b - a for a, b in bounds)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[:size] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:b - a] for p, (a, b) in zip(parts, bounds, strict=True)], dim=0)
