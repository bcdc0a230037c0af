"""diffkern.distributed: sharding global sample indices over ranks and gathering in order,
and a 2-process gloo run (loopback, torch.multiprocessing) giving the same samples as one
process, bitwise."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

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
TRAIN = [(6, "sgd"), (5, "adam")]  # (global batch, optimizer): 3 + 3 and 3 + 2 examples per rank


def _ddp_train(global_batch: int, optimizer: str, steps: int = 4):
    """A few DDP steps of examples/ddpm_digits.py's trainer on a tiny UNet; parameters and
    losses (1 process when no process group is up)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from ddpm_digits import DDPTrainer

    from diffkern.models import UNet

    torch.manual_seed(0)
    model = UNet(1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, groups=4)
    images = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    tr = DDPTrainer(model, images, global_batch=global_batch, lr=1e-2 if optimizer == "sgd" else 1e-3,
                    warmup_steps=2, ema_decay=0.9, seed=3, optimizer=optimizer).fit(steps)
    return {"params": torch.cat([p.detach().flatten() for p in tr.model.parameters()]),
            "ema": torch.cat([p.detach().flatten() for p in tr.ema.model.parameters()]),
            "loss": torch.tensor(tr.loss_history)}


def _worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {}
        for n in SIZES:
            idx = dkd.shard_indices(n)
            res[n] = {"idx": idx, "all": dkd.gather_shards(sample_shard(idx), n)}
        for cfg in TRAIN:
            res[cfg] = _ddp_train(*cfg)
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


@pytest.mark.parametrize("cfg", TRAIN, ids=["sgd-3+3", "adam-3+2"])
def test_ddp_training_on_two_ranks_matches_one_process(two_ranks, cfg):
    """The same parameters after 4 steps as 1 process on the same global batch, up to the
    all-reduce's rounding (two partial sums added instead of one sum)."""
    one = _ddp_train(*cfg)
    init = _ddp_train(cfg[0], cfg[1], steps=0)["params"]
    moved = (one["params"] - init).abs().max().item()  # how far 4 steps move the parameters
    # SGD passes the gradients' rounding through (measured 4e-8 of `moved`); Adam divides
    # by sqrt(v), which magnifies it for gradients near zero (measured 1.1e-4)
    tol = 1e-6 if cfg[1] == "sgd" else 1e-3
    for res in two_ranks:
        got = res[cfg]
        assert torch.equal(got["params"], two_ranks[0][cfg]["params"])  # the ranks agree exactly
        assert (got["loss"] - one["loss"]).abs().max().item() <= 1e-5 * one["loss"].abs().max().item()
        for k in ("params", "ema"):
            diff = (got[k] - one[k]).abs().max().item()
            assert diff <= tol * moved, (k, diff, moved)
    if cfg[1] == "sgd":  # a test that can fail: another global batch moves the parameters elsewhere
        other = _ddp_train(cfg[0] + 1, cfg[1])["params"]
        assert (other - one["params"]).abs().max().item() > 0.01 * moved
