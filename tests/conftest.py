"""Shared helpers and fixtures for the diffkern test suite.

Helpers are plain functions (``from conftest import max_rel_err``); tests/ has no
``__init__.py`` so pytest puts this directory on ``sys.path``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import diffkern as dk

NATIVE = dk.native_available()
HAS_CUDA = torch.cuda.is_available()

needs_native = pytest.mark.skipif(not NATIVE, reason=f"diffkern native ops not built: {dk.native_error()}")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def native_line() -> str:
    """Whether the compiled ops run, and why not: printed in the header and the summary of
    every run, so a suite green with every native test skipped says so in its own output."""
    where = os.path.dirname(dk.__file__)  # the installed package or the checkout (README: pytest vs python -m)
    if NATIVE:
        st = dk._native.state()
        return (f"diffkern native: yes ({st.get('kind')}, {st.get('level')}; cuda: {'yes' if HAS_CUDA else 'no'}) "
                f"from {where}")
    return f"diffkern native: NO ({dk.native_error()}) from {where}; only the pure-PyTorch fallback was tested"


def pytest_report_header(config):
    return native_line()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    native_skips = sum(1 for r in skipped if isinstance(r.longrepr, tuple) and "native" in str(r.longrepr[2]))
    line = native_line()
    if not NATIVE:
        line += f": {native_skips} native tests skipped (DIFFKERN_REQUIRE_NATIVE=1 makes this a failure)"
    terminalreporter.write_sep("=", line, red=not NATIVE, green=NATIVE, bold=True)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Each test starts from a known global RNG state (inputs are random, never zeros)."""
    torch.manual_seed(20240607)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """For modules of small models: a second OpenMP thread gains little there and costs a
    lot when the two cores are shared with other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def gen(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh generator seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed=None, device="cpu", scale=1.0) -> torch.Tensor:
    """Random normal input (never zeros); from its own generator when ``seed`` is given."""
    g = gen(seed) if seed is not None else None
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|, in float64 (b is the oracle)."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    assert a64.shape == b64.shape, (a64.shape, b64.shape)
    denom = b64.abs().max().item()
    assert denom > 0 and math.isfinite(denom), "oracle is all zeros or not finite"
    return (a64 - b64).abs().max().item() / denom


def ulp(r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |r| (float64 result): 2**floor(log2|r|) * eps, with the
    subnormal spacing as the floor."""
    fi = torch.finfo(dtype)
    a = r.detach().double().abs().clamp_min(fi.tiny)
    e = torch.floor(torch.log2(a))
    return torch.exp2(e) * fi.eps


def assert_within_ulp(got: torch.Tensor, ref: torch.Tensor, n_ulp: float = 2.0, what: str = ""):
    assert got.dtype == ref.dtype, (got.dtype, ref.dtype)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    g, r = got.double(), ref.double()
    tol = n_ulp * ulp(ref, ref.dtype)
    diff = (g - r).abs()
    bad = ~(diff <= tol)
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ by more than {n_ulp} ulp; "
            f"first at flat index {i}: got {g.flatten()[i].item()!r}, ref {r.flatten()[i].item()!r}, "
            f"tol {tol.flatten()[i].item():.3g}")


def ab_of(schedule, t: int) -> float:
    """alphas_cumprod[t] as float64, 1.0 for t < 0."""
    return 1.0 if t < 0 else float(schedule.alphas_cumprod.double()[t])
