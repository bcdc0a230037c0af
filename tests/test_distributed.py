"""diffkern.distributed: sharding global sample indices over ranks and gathering in order,
and a 2-process gloo run (loopback, torch.multiprocessing) giving the same samples as one
process, bitwise."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import diffkern as dk
import diffkern.distributed as dkd
from diffkern import _rng


# ---- sharding ------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_shard_bounds_contiguous_balanced_cover(world):
    for n in range(0, 30):
        bounds = [dkd.shard_bounds(n, r, world) for r in range(world)]
        flat = [i for a, b in bounds for i in range(a, b)]
        assert flat == list(range(n))  # contiguous, in rank order, each index once
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_bad_inputs():
    with pytest.raises(ValueError, match="rank"):
        dkd.shard_bounds(10, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        dkd.shard_bounds(10, 0, 0)
    with pytest.raises(ValueError, match="n"):
        dkd.shard_bounds(-1, 0, 1)
    with pytest.raises(TypeError, match="n"):
        dkd.shard_bounds(2.0, 0, 1)
    with pytest.raises(TypeError, match="local"):
        dkd.gather_shards([1, 2], 2)
    with pytest.raises(ValueError, match="shard"):
        dkd.gather_shards(torch.zeros(3, 2), 4)


def test_single_process_is_rank_0_of_1():
    assert not dist.is_initialized()
    assert dkd.rank_and_world() == (0, 1)
    assert dkd.shard_range(5) == range(5)
    assert torch.equal(dkd.shard_indices(5), torch.arange(5))
    x = torch.randn(5, 3)
    assert dkd.gather_shards(x, 5) is x


# ---- the workload: a short DDPM chain with noise keyed by (global index, step) ------------
T_STEPS = (999, 800, 600, 400, 200, 50, 10, 0)
SHAPE = (3, 5, 7)  # per sample: odd, not a multiple of 4


def _eps_model(x, t):
    """A fixed nonlinear 'network' (per-sample, so sharding cannot change it)."""
    return 0.3 * torch.tanh(x) + 1e-4 * t * x.flip(-1)


def sample_shard(idx: torch.Tensor) -> torch.Tensor:
    """Samples of the global indices ``idx``: x_T and every step's noise keyed by index."""
    inner = int(torch.tensor(SHAPE).prod())
    x = _rng.keyed_normal(idx, 10_000, inner).reshape(-1, *SHAPE)
    for k, t in enumerate(T_STEPS):
        t_prev = T_STEPS[k + 1] if k + 1 < len(T_STEPS) else -1
        z = _rng.keyed_normal(idx, t, inner).reshape(x.shape)
        x = dk.ddpm_step(x, _eps_model(x, t), t, t_prev=t_prev, noise=z)
    return x


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SIZES = (7, 1)  # 7 samples on 2 ranks (4 + 3); 1 sample (rank 1 holds none)


def _worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {}
        for n in SIZES:
            idx = dkd.shard_indices(n)
            res[n] = {"idx": idx, "all": dkd.gather_shards(sample_shard(idx), n)}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-process gloo run (spawning costs seconds) serving the tests below."""
    out = tmp_path_factory.mktemp("dist")
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("n", SIZES)
def test_two_gloo_processes_match_one_process_bitwise(two_ranks, n):
    one = sample_shard(torch.arange(n))
    for r, res in enumerate(two_ranks):
        assert res[n]["idx"].tolist() == list(range(*dkd.shard_bounds(n, r, len(two_ranks))))
        assert torch.equal(res[n]["all"], one)
