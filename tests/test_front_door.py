"""One front door (issue 10): the checks live in C++ at the op, so a raw
torch.ops.diffkern.* call, torch.compile and the public functions get the same errors, and
the reference fallback rejects the same inputs (tests/test_bad_inputs.py runs the table on
every path); mixed dtypes promote; channels_last stays channels_last; the holes found in
review stay closed; concurrent calls, long loops and broken builds behave.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.machinery
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from conftest import NATIVE, gen, max_rel_err, needs_cuda, needs_native, randn

import diffkern as dk
from diffkern import _rng
from diffkern import ops as O

ROOT = Path(__file__).resolve().parent.parent
OPS = torch.ops.diffkern if NATIVE else None
TABLE = dk.NoiseSchedule.linear().table("cpu")
F = O.fallback
PATHS = [pytest.param(F, id="fallback"),
         pytest.param(dk, id="native", marks=needs_native)]


def _t(v):
    return torch.tensor([v]) if isinstance(v, int) else v


def _raw_ddim(x, m, t, t_prev=None, eta=0.0, prediction=0, clip=0.0, noise=None, table=TABLE):
    return OPS.ddim_step(x, m, _t(t), None if t_prev is None else _t(t_prev), table, eta, prediction, clip, noise,
                         None, 0, 0)


# ---- hole 1: raw ops and timestep lengths ------------------------------------------------
@needs_native
@pytest.mark.parametrize("n", [2, 3, 5])
def test_raw_op_rejects_t_of_wrong_length(n):
    """Before: t of length neither 1 nor B was read past its end (batch index b of t)."""
    x, m = randn(4, 3, seed=1), randn(4, 3, seed=2)
    with pytest.raises(ValueError, match=r"\bt\b has \d+ entries"):
        _raw_ddim(x, m, torch.arange(n) + 10)
    with pytest.raises(ValueError, match=r"\bt_prev\b has \d+ entries"):
        _raw_ddim(x, m, torch.full((4,), 50), torch.arange(n))
    with pytest.raises(ValueError, match=r"\bt\b"):
        OPS.q_sample(x, torch.arange(n) + 10, TABLE, m, None, 0, 0)


@needs_native
def test_raw_op_range_and_order_checks():
    x, m = randn(4, 3, seed=1), randn(4, 3, seed=2)
    with pytest.raises(ValueError, match=r"\bt\b.*outside"):
        _raw_ddim(x, m, 1000)
    with pytest.raises(ValueError, match=r"\bt_prev\b must be smaller"):
        _raw_ddim(x, m, 10, 10)
    with pytest.raises(ValueError, match=r"\bt_prev\b must be smaller"):  # t (1,) against per-sample t_prev
        _raw_ddim(x, m, 10, torch.tensor([1, 2, 10, 3]))
    with pytest.raises(ValueError, match=r"\beta\b"):
        _raw_ddim(x, m, 10, eta=-1.0)
    with pytest.raises(ValueError, match=r"\bprediction_type\b"):
        _raw_ddim(x, m, 10, prediction=7)
    with pytest.raises(TypeError, match=r"\bt\b must be an integer"):
        _raw_ddim(x, m, torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"\balphas_cumprod\b"):
        _raw_ddim(x, m, 10, table=TABLE[None])
    with pytest.raises(ValueError, match=r"\bmodel_output\b.*\beps\b.*broadcast"):
        _raw_ddim(x, randn(5, 3, seed=3), 10)
    with pytest.raises(ValueError, match=r"\bkind\b"):
        OPS.step_backward(x, x, m, _t(10), None, TABLE, 2, 0.0, 0, 0, 0.0, False)
    with pytest.raises(ValueError, match=r"\bn_steps_each\b"):
        OPS.gmm_annealed_langevin(randn(8, 2, seed=4), torch.tensor([0.5, 0.5]), torch.zeros(2, 2), torch.ones(2),
                                  torch.tensor([1.0]), 0, 0.1, False, None, 0, 0)


@needs_native
def test_raw_op_mixed_lengths_expand():
    """t of length 1 with a per-sample t_prev is one step per sample, as the public face."""
    x, m = randn(4, 3, seed=1), randn(4, 3, seed=2)
    tp = torch.tensor([5, -1, 0, 30])
    got = _raw_ddim(x, m, 40, tp)
    assert torch.equal(got, dk.ddim_step(x, m, torch.full((4,), 40), t_prev=tp))


# ---- the same errors under torch.compile and opcheck --------------------------------------
@needs_native
def test_compiled_call_gets_the_op_errors():
    x, m = randn(4, 3, seed=1), randn(4, 3, seed=2)

    @torch.compile(backend="aot_eager", fullgraph=False)
    def f(x, m, t):
        return dk.ddim_step(x, m, t, 0.0)

    assert max_rel_err(f(x, m, torch.tensor([10, 20, 30, 40])),
                       dk.ddim_step(x, m, torch.tensor([10, 20, 30, 40]))) == 0
    with pytest.raises(ValueError, match=r"\bt\b.*outside"):
        f(x, m, torch.tensor([10, 20, 1000, 40]))


@needs_native
def test_zero_snr_checked_under_compile():
    """Before: the zero-terminal-SNR check was skipped under torch.compile (NaN out)."""
    zs = dk.NoiseSchedule.linear(rescale_zero_terminal_snr=True)
    x, m = randn(4, 3, seed=1), randn(4, 3, seed=2)
    t = torch.tensor([999, 500, 20, 3])

    @torch.compile(backend="aot_eager")
    def f(x, m, t):
        return dk.ddim_step(x, m, t, 0.0, schedule=zs)

    for call in (lambda: f(x, m, t), lambda: dk.ddim_step(x, m, t, schedule=zs),
                 lambda: _raw_ddim(x, m, t, table=zs.table("cpu")), lambda: F.ddim_step(x, m, t, schedule=zs)):
        with pytest.raises(ValueError, match="zero-terminal-SNR"):
            call()
    assert torch.isfinite(dk.ddim_step(x, m, t, schedule=zs, prediction_type="v_prediction")).all()


@needs_native
@pytest.mark.parametrize("case", ["promote", "channels_last", "broadcast"])
def test_opcheck_new_layouts(case):
    x, m, z = randn(2, 3, 4, 5, seed=1), randn(2, 3, 4, 5, seed=2), randn(2, 3, 4, 5, seed=3)
    if case == "promote":
        m = m.half()
    elif case == "channels_last":
        x, m, z = (v.contiguous(memory_format=torch.channels_last) for v in (x, m, z))
    else:
        m = m[:1]
    t, tp = torch.tensor([500, 20]), torch.tensor([480, -1])
    torch.library.opcheck(OPS.ddim_step, (x, m, t, tp, TABLE, 0.5, 0, 0.0, z, None, 0, 0))
    torch.library.opcheck(OPS.ddpm_step, (x, m, t, tp, TABLE, 0, 2, 1.0, z, None, 0, 0))
    torch.library.opcheck(OPS.langevin_step, (x, m, 0.01, z, None, 0, 0))
    torch.library.opcheck(OPS.q_sample, (x, t, TABLE, z.double() if case == "promote" else z, None, 0, 0))


# ---- promotion and memory format ---------------------------------------------------------
STEP_CALLS = {
    "q_sample": lambda o, x, m, z: o.q_sample(x, torch.tensor([700, 3]), z)[0],
    "ddim": lambda o, x, m, z: o.ddim_step(x, m, torch.tensor([700, 3]), 0.7, t_prev=torch.tensor([650, -1]),
                                           noise=z),
    "ddpm": lambda o, x, m, z: o.ddpm_step(x, m, 600, noise=z, prediction_type="v_prediction", clip_sample=2.0),
    "langevin": lambda o, x, m, z: o.langevin_step(x, m, 0.02, noise=z),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(STEP_CALLS))
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float16, torch.float32),
                                    (torch.float16, torch.float32, torch.float16),
                                    (torch.bfloat16, torch.bfloat16, torch.float64),
                                    (torch.float32, torch.bfloat16, torch.float16)],
                         ids=["x32-m16", "x16-m32", "bf16-z64", "x32-mbf16-z16"])
def test_mixed_dtypes_promote_as_torch(path, name, dtypes):
    """An fp16 model output with fp32 latents gives fp32 (as diffusers' eager math does),
    instead of the MismatchError of before; the numbers are those of the promoted inputs."""
    dx, dm, dz = dtypes
    x, m, z = randn(2, 3, 5, seed=1, dtype=dx), randn(2, 3, 5, seed=2, dtype=dm), randn(2, 3, 5, seed=3, dtype=dz)
    want = torch.promote_types(torch.promote_types(dx, dm if name != "q_sample" else dx), dz)
    got = STEP_CALLS[name](path, x, m, z)
    assert got.dtype == want
    same = STEP_CALLS[name](F, x.to(want), m.to(want), z.to(want))
    assert max_rel_err(got, same) <= (1e-6 if want != torch.float16 and want != torch.bfloat16 else 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(STEP_CALLS))
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.channels_last_3d])
def test_channels_last_stays_channels_last(path, name, fmt):
    shape = (2, 3, 4, 5) if fmt == torch.channels_last else (2, 3, 2, 4, 5)
    x, m, z = (randn(*shape, seed=s).contiguous(memory_format=fmt) for s in (1, 2, 3))
    got = STEP_CALLS[name](path, x, m, z)
    assert got.is_contiguous(memory_format=fmt) and not got.is_contiguous()
    assert torch.equal(got, STEP_CALLS[name](path, x.contiguous(), m.contiguous(), z.contiguous()))
    # drawn noise too (same numbers as the contiguous call: noise follows the logical index)
    a = path.ddim_step(x, m, 500, 1.0, generator=gen(5))
    b = path.ddim_step(x.contiguous(), m.contiguous(), 500, 1.0, generator=gen(5))
    assert a.is_contiguous(memory_format=fmt) and torch.equal(a, b)


@pytest.mark.parametrize("path", PATHS)
def test_other_layouts_stay_contiguous(path):
    x = randn(5, 4, seed=1).t()
    assert path.ddim_step(x, x, 10).is_contiguous()


# ---- hole 2: t_prev < t for CUDA x with t from the CPU -----------------------------------
@needs_cuda
@pytest.mark.parametrize("path", PATHS)
def test_cuda_t_prev_order_checked_with_cpu_t(path):
    x, m = randn(4, 3, seed=1, device="cuda"), randn(4, 3, seed=2, device="cuda")
    for t, tp in ((torch.tensor([5, 6, 7, 8]), torch.tensor([4, 6, 1, 0])), (torch.tensor(5), 5), (5, 5),
                  (torch.tensor([5, 6, 7, 8]), 6)):
        with pytest.raises(ValueError, match=r"\bt_prev\b must be smaller"):
            path.ddim_step(x, m, t, t_prev=tp)


@needs_cuda
@needs_native
def test_cuda_device_t_prev_not_below_t_is_nan_without_sync():
    x, m = randn(4, 3, seed=1, device="cuda"), randn(4, 3, seed=2, device="cuda")
    t = torch.tensor([5, 6, 7, 8], device="cuda")
    tp = torch.tensor([4, 6, 1, 0], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = dk.ddim_step(x, m, t, t_prev=tp)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2, 3]]).all()


# ---- hole 3: zero-terminal SNR on a device t: no sync, NaN; host t: raise -------------------
@needs_cuda
@needs_native
def test_cuda_zero_snr_no_sync():
    zs = dk.NoiseSchedule.linear(rescale_zero_terminal_snr=True)
    x, m = randn(4, 3, seed=1, device="cuda"), randn(4, 3, seed=2, device="cuda")
    t = torch.tensor([999, 500, 20, 3], device="cuda")
    zs.table(x.device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = dk.ddim_step(x, m, t, schedule=zs, clip_sample=1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1:]).all()  # NaN, not a clamped inf
    for tt in (999, torch.tensor([999, 500, 20, 3])):
        with pytest.raises(ValueError, match="zero-terminal-SNR"):
            dk.ddim_step(x, m, tt, schedule=zs)


# ---- hole 4: eta as a device tensor ----------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_eta_device_tensor_refused_without_reading(path):
    """Before: .item() on it (a host sync; on a meta tensor, a RuntimeError)."""
    x, m = randn(4, 3, seed=1), randn(4, 3, seed=2)
    with pytest.raises(TypeError, match=r"\beta\b.*synchronize"):
        path.ddim_step(x, m, 10, torch.tensor(0.5, device="meta"))
    with pytest.raises(TypeError, match=r"\bstep_size\b"):
        path.langevin_step(x, m, torch.tensor(0.5, device="meta"))
    assert torch.equal(path.ddim_step(x, m, 10, torch.tensor(0.5), noise=m),
                       path.ddim_step(x, m, 10, 0.5, noise=m))


@needs_cuda
def test_eta_cuda_tensor_refused():
    x, m = randn(4, 3, seed=1, device="cuda"), randn(4, 3, seed=2, device="cuda")
    with pytest.raises(TypeError, match=r"\beta\b"):
        dk.ddim_step(x, m, 10, torch.tensor(0.5, device="cuda"))


# ---- hole 5: double backward -----------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("kind", ["ddim", "ddim_eta0", "ddpm", "langevin", "q_sample"])
def test_double_backward(kind):
    """Before: create_graph=True returned gradients without a graph (silently cut)."""
    x = randn(3, 4, dtype=torch.float64, seed=1).requires_grad_()
    m = randn(3, 4, dtype=torch.float64, seed=2).requires_grad_()
    z = randn(3, 4, dtype=torch.float64, seed=3).requires_grad_()
    t, tp = torch.tensor([700, 30, 5]), torch.tensor([650, -1, 4])
    fns = {
        "ddim": lambda o, x, m, z: o.ddim_step(x, m, t, 0.6, t_prev=tp, noise=z, clip_sample=1.5),
        "ddim_eta0": lambda o, x, m, z: o.ddim_step(x, m, t, 0.0, t_prev=tp) * z,  # no noise gradient
        "ddpm": lambda o, x, m, z: o.ddpm_step(x, m, t, t_prev=tp, noise=z, prediction_type="v_prediction"),
        "langevin": lambda o, x, m, z: o.langevin_step(x, m, 0.05, noise=z),
        "q_sample": lambda o, x, m, z: o.q_sample(x, t, z)[0] * m,
    }
    f = fns[kind]
    assert torch.autograd.gradgradcheck(lambda x, m, z: f(dk, x, m, z), (x, m, z))
    g = randn(3, 4, dtype=torch.float64, seed=4).requires_grad_()
    for o in (dk, dk.reference):
        grads = torch.autograd.grad(f(o, x, m, z), (x, m, z), g, create_graph=True)
        assert all(gr.requires_grad for gr in grads)
    native = torch.autograd.grad(f(dk, x, m, z), (x, m, z), g, create_graph=True)
    ref = torch.autograd.grad(f(dk.reference, x, m, z), (x, m, z), g, create_graph=True)
    for a, b in zip(native, ref, strict=True):
        assert max_rel_err(a, b) <= 1e-12
        ga = torch.autograd.grad(a.sum(), g, retain_graph=True)[0]
        gb = torch.autograd.grad(b.sum(), g, retain_graph=True)[0]
        assert max_rel_err(ga, gb) <= 1e-12


# ---- hole 6: CUDA mixture score with leading zero weights --------------------------------------
@needs_cuda
@needs_native
def test_cuda_gmm_zero_weights_first():
    x = randn(64, 2, seed=1, device="cuda", scale=3.0)
    w = torch.tensor([0.0, 0.0, 0.6, 0.4], device="cuda")
    mu = torch.tensor([[9.0, 9.0], [-9.0, 9.0], [2.0, -1.0], [-2.0, 1.0]], device="cuda")
    sd = torch.tensor([1.0, 1.0, 0.7, 1.2], device="cuda")
    kw = dict(n_steps_each=5, step_lr=0.05)
    out = dk.gmm_annealed_langevin(x, w, mu, sd, [2.0, 1.0], generator=gen(3, "cuda"), **kw)
    assert torch.isfinite(out).all()
    # components of weight 0 add exp(-inf) = 0 to every sum: the chain equals the one
    # without them, drawn from the same CUDA stream (a CPU generator keys other noise)
    trim = dk.gmm_annealed_langevin(x, w[2:], mu[2:], sd[2:], [2.0, 1.0], generator=gen(3, "cuda"), **kw)
    assert max_rel_err(out, trim) <= 1e-6


def test_gmm_zero_weights_first_cpu():
    x = randn(64, 2, seed=1, scale=3.0)
    w, mu = torch.tensor([0.0, 0.0, 0.6, 0.4]), torch.tensor([[9.0, 9.0], [-9.0, 9.0], [2.0, -1.0], [-2.0, 1.0]])
    sd = torch.tensor([1.0, 1.0, 0.7, 1.2])
    out = dk.gmm_annealed_langevin(x, w, mu, sd, [2.0, 1.0], n_steps_each=5, step_lr=0.05, generator=gen(3))
    ref = F.gmm_annealed_langevin(x, w, mu, sd, [2.0, 1.0], n_steps_each=5, step_lr=0.05, generator=gen(3))
    assert torch.isfinite(out).all() and max_rel_err(out, ref) <= 1e-5


# ---- holes 8, 9: CUDA launches from several threads; launch errors are ours ---------------------
@needs_cuda
@needs_native
def test_cuda_concurrent_first_launches():
    xs = [randn(1000, seed=i, device="cuda") for i in range(8)]
    outs = [None] * 8

    def run(i):
        outs[i] = dk.ddim_step(xs[i], xs[i], 500, 1.0, generator=gen(i, "cuda"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i in range(8):
        assert torch.equal(outs[i], dk.ddim_step(xs[i], xs[i], 500, 1.0, generator=gen(i, "cuda")))


def _cudart():
    for line in Path("/proc/self/maps").read_text().splitlines():
        if "libcudart" in line:
            return ctypes.CDLL(line.split()[-1])
    return None


@needs_cuda
@needs_native
def test_cuda_call_without_launch_does_not_report_a_stale_error():
    """Before: a zero-element call read cudaGetLastError and raised someone else's error."""
    rt = _cudart()
    if rt is None:
        pytest.skip("libcudart not found in the process")
    v = ctypes.c_int()
    assert rt.cudaDeviceGetAttribute(ctypes.byref(v), 16, 10_000) != 0  # invalid device: a pending error
    x = torch.empty(0, 3, device="cuda")
    assert dk.ddim_step(x, x, 10).shape == (0, 3)
    rt.cudaGetLastError()


# ---- hole 10: one rule for n_steps_each --------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_n_steps_each_zero_rejected_everywhere(path):
    x = randn(16, 2, seed=1)
    with pytest.raises(ValueError, match=r"\bn_steps_each\b must be >= 1"):
        path.annealed_langevin(lambda v, s: -v, x, [1.0], n_steps_each=0)
    with pytest.raises(ValueError, match=r"\bn_steps_each\b must be >= 1"):
        path.gmm_annealed_langevin(x, torch.tensor([0.5, 0.5]), torch.zeros(2, 2), torch.ones(2), [1.0],
                                   n_steps_each=0, step_lr=0.1)


# ---- hole 12: CPU noise is bitwise the reference's ---------------------------------------------
@needs_native
@pytest.mark.parametrize("n", [303, 65536])
def test_cpu_noise_bitwise_equal_to_reference(n):
    """Before: 10198 of 65536 normals (seed 0) were 1 ulp off: torch's vectorized float32
    sqrt (Sleef) is not correctly rounded; _rng now takes the root in float64."""
    _, z = dk.q_sample(torch.zeros(n), 5, generator=gen(0))
    assert torch.equal(z, _rng.philox_normal(n, *_rng.py_cpu_generator_key(gen(0))))
    _, zf = F.q_sample(torch.zeros(n), 5, generator=gen(0))
    assert torch.equal(z, zf)


# ---- generator keying: C++ and Python give the same keys -----------------------------------------
@needs_native
def test_cpu_generator_keying_native_equals_python():
    def history(key):
        g = torch.Generator().manual_seed(123)
        out = [key(g), key(g)]
        torch.randn(3, generator=g)  # used elsewhere: a jump drawn from the generator
        out += [key(g), key(g)]
        g.manual_seed(123)  # reseeded: back to offset 0
        out.append(key(g))
        st = g.get_state()
        out.append(key(g))
        g.set_state(st)  # restored: the same key again (the key is a function of the state)
        out.append(key(g))
        torch.randn(1, dtype=torch.float64, generator=g)  # leaves a cached normal in the state
        out += [key(g), key(g)]
        g.manual_seed(2**63 + 5)
        out += [key(g), key(g)]
        return out

    native, python = history(dk._native._fast._cpu_generator_key), history(_rng.py_cpu_generator_key)
    assert native == python
    w = torch.empty(4, dtype=torch.int64).random_(-(1 << 63), None, generator=gen(123)).tolist()
    assert native[0] == (w[0] % 2**64, w[1] % 2**64) and native[1] == (w[2] % 2**64, w[3] % 2**64)
    # reseeded: the same keys again; restored state: the same key again; else fresh ones
    assert native[4] == native[0] and native[5] == native[1] and native[6] == native[5]
    assert len({native[i] for i in (0, 1, 2, 3, 7, 9, 10)}) == 7


# ---- thread safety, memory, broken builds --------------------------------------------------------
@needs_native
def test_concurrent_calls_equal_serial_calls():
    xs = [randn(2, 64, seed=i) for i in range(6)]

    def work(i):
        g = gen(100 + i)
        x = xs[i]
        for k in range(200):
            x = dk.ddim_step(x, xs[i], 900 - 4 * k, 1.0, t_prev=896 - 4 * k, generator=g)
            x = dk.langevin_step(x, xs[i], 0.001, generator=g)
        return x

    serial = [work(i) for i in range(6)]
    results = [None] * 6
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, work(i))) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for a, b in zip(results, serial, strict=True):
        assert torch.equal(a, b)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@needs_native
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_memory_flat_over_100k_calls(one_thread):
    x, e = randn(1, 4, 8, 8, seed=1), randn(1, 4, 8, 8, seed=2)
    tt = torch.tensor([500])

    def loop(n):
        g = gen(7)
        for i in range(n):
            dk.ddim_step(x, e, 500, 1.0, t_prev=480, generator=g)
            dk.q_sample(x, tt, generator=g)
            if i % 1000 == 0:
                g = gen(i)  # fresh generators: their key entries must not pile up

    loop(5000)
    gc.collect()
    before = _rss_bytes()
    loop(50_000)  # x2 ops: 100k calls
    gc.collect()
    grown = _rss_bytes() - before
    assert grown < 8 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 100k calls"


_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]  # the loader's own first choice, for any Python


def _build_info(**over) -> str:
    """A build record that matches the running torch, Python and machine (the loader's
    aot_mismatch), for the CPU level the loader will pick."""
    from diffkern import _buildcfg as B

    info = {"kind": "aot", "torch": str(torch.__version__), "torch_cuda": torch.version.cuda,
            "python": f"{sys.version_info[0]}.{sys.version_info[1]}", "machine": B.machine(),
            "levels": [B.supported_levels()[-1]]}
    return json.dumps({**info, **over})


def _level() -> str:
    from diffkern import _buildcfg as B

    return B.supported_levels()[-1]


# kind -> (files written into the package copy, the words native_error() must say). Each
# breaks the ahead-of-time build at another stage of the loader; JIT is off in the child,
# so the error is the AOT one and the reference must still run.
BROKEN = {
    "garbage-so": (lambda: {"_C" + _SUFFIX: b"not a shared object", f"_cpu_{_level()}" + _SUFFIX: b"garbage",
                            "_build_info.json": _build_info().encode()}, "failed to load"),
    "no-build-info": (lambda: {"_C" + _SUFFIX: b"not a shared object"}, "has no build info"),
    "stale-build": (lambda: {"_C" + _SUFFIX: b"x", f"_cpu_{_level()}" + _SUFFIX: b"x",
                             "_build_info.json": _build_info(torch="0.0.1").encode()}, "stale"),
    "missing-level": (lambda: {"_C" + _SUFFIX: b"x", "_build_info.json": _build_info(levels=[]).encode()},
                      "no CPU library for level"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_extension_never_breaks_import(tmp_path, kind):
    pkg = tmp_path / "diffkern"
    import shutil

    shutil.copytree(ROOT / "diffkern", pkg,
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "_build_info.json", "__pycache__"))
    files, says = BROKEN[kind]
    for name, content in files().items():
        (pkg / name).write_bytes(content)
    code = textwrap.dedent("""
        import sys, torch, diffkern as dk
        assert not dk.native_available(), dk.native_error()
        assert sys.argv[1] in dk.native_error(), dk.native_error()
        x = torch.randn(2, 3)
        out = dk.ddim_step(x, x, 10, 1.0, generator=torch.Generator().manual_seed(0))
        ref = dk.ops.fallback.ddim_step(x, x, 10, 1.0, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, ref)
        try:
            dk.ddim_step(x, x, 1000)
        except ValueError:
            pass
        else:
            raise SystemExit("no error")
        print("ok", dk.native_error())
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "DIFFKERN_JIT": "0"}
    env.pop("DIFFKERN_DISABLE_NATIVE", None)
    proc = subprocess.run([sys.executable, "-c", code, says], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok")


@needs_native
def test_modes_still_see_the_ops():
    """The eager entry skips torch.ops' Python layer, not the dispatcher: a
    TorchFunctionMode sends the call through torch.ops, and a TorchDispatchMode sees it."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class FunctionMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    class DispatchMode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x, m = randn(2, 3, seed=1), randn(2, 3, seed=2)
    with FunctionMode():
        dk.ddim_step(x, m, 10)
    assert "diffkern.ddim_step" in seen
    seen.clear()
    with DispatchMode():
        dk.ddim_step(x, m, 10, 1.0, generator=gen(0))
    assert "diffkern.ddim_step.default" in seen
