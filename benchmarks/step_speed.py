#!/usr/bin/env python
"""How fast is one diffkern step compared with what a user would otherwise run?

    python benchmarks/step_speed.py --quick                      # < 1 min on a 2-core CPU
    python benchmarks/step_speed.py --ops ddim_step --sizes 64x4x128x128 --dtypes float32
    python benchmarks/step_speed.py --device cuda --dtypes float32,bfloat16

For every op (q_sample, ddpm_step, ddim_step at eta=0 and eta=1, langevin_step and the
annealed GMM loop), size, dtype and device, all implementations run in the same process
on the same inputs (see IMPLS below and README.md). Each is warmed up, then timed call
by call (wall clock on the CPU, CUDA events on the GPU) while rotating through enough
input buffers to overflow the last-level cache; the summary is the median and the IQR.
torch.compile's compile time is reported separately from its run time.

Roofline: an op that draws its noise in-kernel must at least read its inputs and write
its outputs once (``bytes``, e.g. 12 B/element for fp32 DDIM: read x and eps, write the
result); ``floor_ms = bytes / copy bandwidth``, the bandwidth of a large tensor copy
measured in the same run. ``%copy = floor_ms / median``.

On CUDA the host cost per call at 1x4x64x64 is measured too: microseconds of Python and
launch time per call (many calls issued before one synchronisation) and, via
torch.profiler, GPU launches (kernels, memcpys, memsets) and host syncs per call.

Writes ``<out>/step_speed-<tag>.json`` (machine, versions, every number) and a log-log
plot ``<out>/step_speed-<tag>.png``; prints tables to stdout and progress to stderr.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import common as C
import torch

dk = C.import_diffkern()

SCHEMA = "diffkern.benchmarks.step_speed/1"
T_STEP, T_PREV_DDIM = 500, 480  # a mid-trajectory step; DDIM jumps 20 steps (50-step schedule)

# Rows of every table, in this order. "native" is what the ratios are relative to.
IMPLS = {
    "native": "diffkern public op with the compiled kernel (in-kernel Philox noise, generator=)",
    "copy": "x.clone() of the same tensor: the cheapest op that reads and writes it once",
    "eager": "textbook formula in eager PyTorch, Python-float coefficients, torch.randn(generator=)",
    "diffusers": "diffusers scheduler: DDIMScheduler/DDPMScheduler.step(generator=), randn_like + add_noise",
    "compile": "torch.compile of the formula with the noise passed in (or eta=0): no RNG in the graph",
    "compile+randn": "torch.compile of the formula drawing torch.randn_like inside (global RNG, fused)",
    "compile+gen": "torch.compile of the formula drawing torch.randn(generator=) inside (dynamo graph-breaks)",
    "reference": "dk.reference.*: pure-PyTorch oracle, Philox noise evaluated with tensor ops",
}
OPS = ("q_sample", "ddpm_step", "ddim_step", "langevin_step", "gmm_annealed_langevin")
# The sampler families (euler_step runs at each --etas value: 0 Euler, 1 Euler ancestral).
SAMPLER_OPS = ("euler_step", "heun_step", "dpmpp_2m_step", "flow_step", "flow_q_sample", "lcm_step")
OPS += SAMPLER_OPS
OP_ALIASES = {"gmm": "gmm_annealed_langevin", "langevin": "langevin_step", "ddim": "ddim_step", "ddpm": "ddpm_step",
              "euler": "euler_step", "heun": "heun_step", "dpmpp": "dpmpp_2m_step", "flow": "flow_step",
              "lcm": "lcm_step"}

IMAGE_SIZES = ["1x4x64x64", "8x4x64x64", "64x4x128x128", "16x3x512x512"]
DEFAULT_SIZES = {
    "q_sample": IMAGE_SIZES, "ddpm_step": IMAGE_SIZES, "ddim_step": IMAGE_SIZES,
    "langevin_step": ["1x4x64x64", "64x4x128x128", "16x3x512x512", "1e7x2"],
    "gmm_annealed_langevin": {"cpu": ["1e4x2", "1e5x2", "1e6x2"], "cuda": ["1e4x2", "1e6x2", "1e7x2"]},
} | {op: IMAGE_SIZES for op in SAMPLER_OPS}
QUICK_SIZES = {op: ["1x4x64x64"] for op in OPS} | {"gmm_annealed_langevin": ["1e4x2"]}
OVERHEAD_SHAPE = (1, 4, 64, 64)


class NotApplicable(Exception):
    """This implementation does not exist for this op / device / input."""


@dataclass
class Case:
    device: torch.device
    op: str
    params: dict
    dtype: torch.dtype
    shape: tuple[int, ...]
    time_it: bool = True
    overhead: bool = False

    @property
    def label(self) -> str:
        p = ",".join(f"{k}={v:g}" for k, v in self.params.items() if k == "eta")
        return f"{self.op}({p})" if p else self.op

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def elem_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def logical_bytes(self) -> int | None:
        """Bytes a fused kernel with in-kernel noise must move: every op here reads two
        tensors and writes one (q_sample: reads x0, writes x_t and the noise). None for the
        GMM loop, which is compute-bound (it reads and writes x once for the whole chain)."""
        if self.op == "gmm_annealed_langevin":
            return None
        return SAMPLER_TENSORS.get(self.op, 3) * self.numel * self.elem_size


# ---- the formulas, written once for floats (eager) and 1-element tensors (compiled) -------
def ddim_coefficients(ab, abp, eta):
    std = eta * ((1 - abp) / (1 - ab) * (1 - ab / abp)) ** 0.5
    return ab**0.5, (1 - ab) ** 0.5, abp**0.5, (1 - abp - std * std) ** 0.5, std


def ddim_update(x, m, c, z=None):
    sa, s1a, sap, direction, std = c
    x0 = (x - s1a * m) / sa
    out = sap * x0 + direction * m
    return out if z is None else out + std * z


def ddpm_coefficients(ab, abp):
    a = ab / abp
    b = 1 - a
    return (ab**0.5, (1 - ab) ** 0.5, abp**0.5 * b / (1 - ab), a**0.5 * (1 - abp) / (1 - ab),
            ((1 - abp) / (1 - ab) * b) ** 0.5)


def ddpm_update(x, m, c, z=None):
    sa, s1a, c_x0, c_x, std = c
    x0 = (x - s1a * m) / sa
    out = c_x0 * x0 + c_x * x
    return out if z is None else out + std * z


def gmm_score(x, logw, means, var0, sigma):
    """Score of sum_k w_k N(mu_k, diag(var0_k)) convolved with N(0, sigma^2): x (N, D)."""
    var = var0 + sigma * sigma                        # (K, D)
    diff = means - x[:, None, :]                      # (N, K, D)
    logp = logw - 0.5 * (diff * diff / var + torch.log(2 * math.pi * var)).sum(-1)
    r = torch.softmax(logp, dim=-1)
    return (r[..., None] * diff / var).sum(-2)


def randn(x, gen):
    return torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)


def _cast(coeffs, dtype):
    return tuple(c.to(dtype) for c in coeffs)


# Compiled variants take the alphas_cumprod table and t as device tensors (no recompile
# per step, no host sync) and cast the float32 coefficients to x's dtype.
def c_q_sample(x0, z, table, t):
    ab = table[t].view(-1, *([1] * (x0.dim() - 1)))
    return (ab.sqrt().to(x0.dtype) * x0 + (1 - ab).sqrt().to(x0.dtype) * z), z


def c_q_sample_randn(x0, table, t):
    return c_q_sample(x0, torch.randn_like(x0), table, t)


def c_q_sample_gen(x0, table, t, gen):
    return c_q_sample(x0, randn(x0, gen), table, t)


def c_ddim(x, m, table, t, tp, eta, z=None):
    return ddim_update(x, m, _cast(ddim_coefficients(table[t], table[tp], eta), x.dtype), z)


def c_ddim_randn(x, m, table, t, tp, eta):
    return c_ddim(x, m, table, t, tp, eta, torch.randn_like(x))


def c_ddim_gen(x, m, table, t, tp, eta, gen):
    return c_ddim(x, m, table, t, tp, eta, randn(x, gen))


def c_ddpm(x, m, table, t, tp, z):
    return ddpm_update(x, m, _cast(ddpm_coefficients(table[t], table[tp]), x.dtype), z)


def c_ddpm_randn(x, m, table, t, tp):
    return c_ddpm(x, m, table, t, tp, torch.randn_like(x))


def c_ddpm_gen(x, m, table, t, tp, gen):
    return c_ddpm(x, m, table, t, tp, randn(x, gen))


def c_langevin(x, s, a, z):
    return x + a * s + (2 * a) ** 0.5 * z


def c_langevin_randn(x, s, a):
    return c_langevin(x, s, a, torch.randn_like(x))


def c_langevin_gen(x, s, a, gen):
    return c_langevin(x, s, a, randn(x, gen))


def c_gmm_step(x, logw, means, var0, sigma, alpha, z):
    return x + alpha * gmm_score(x, logw, means, var0, sigma) + (2 * alpha).sqrt() * z


def c_gmm_step_randn(x, logw, means, var0, sigma, alpha):
    return c_gmm_step(x, logw, means, var0, sigma, alpha, torch.randn_like(x))


def c_gmm_step_gen(x, logw, means, var0, sigma, alpha, gen):
    return c_gmm_step(x, logw, means, var0, sigma, alpha, randn(x, gen))


# ---- building the implementations of one case ----------------------------------------------
class Ctx:
    """Inputs of one case: rotating buffer sets, a generator, the schedule's tables."""

    def __init__(self, case: Case, n_buffers: int, diffusers_mod):
        self.case, self.device, self.dtype = case, case.device, case.dtype
        self.diffusers = diffusers_mod
        self.gen = torch.Generator(device=self.device).manual_seed(0)
        init = torch.Generator(device=self.device).manual_seed(1)
        names = ("x",) if case.op == "gmm_annealed_langevin" else ("x", "m", "z")
        self.bufs = []
        for _ in range(n_buffers):
            if case.op == "gmm_annealed_langevin":  # start points uniform on [-8, 8]^2
                s = {"x": torch.rand(case.shape, generator=init, device=self.device, dtype=self.dtype) * 16 - 8}
            else:
                s = {k: torch.randn(case.shape, generator=init, device=self.device, dtype=self.dtype) for k in names}
            self.bufs.append(s)
        sched = dk.NoiseSchedule.linear()
        self.ac = sched.alphas_cumprod.tolist()           # host floats, as a hand-written loop has them
        self.table = sched.alphas_cumprod.to(self.device)  # float32 on the device, for compiled code

    def b(self, i: int) -> dict:
        return self.bufs[i % len(self.bufs)]

    def dev_t(self, *values: int) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)


def _native(c: Ctx, fn):
    """The native row, or why there is none (the public op would silently run the reference)."""
    if not dk.native_available(c.device):
        return NotApplicable(dk.native_error() or f"diffkern was built without {c.device.type} kernels")
    return fn


def _diffusers(c: Ctx, scheduler: str, make_row, **config):
    """``make_row(scheduler instance)`` -> the diffusers row, or why there is none."""
    if c.diffusers is None:
        return NotApplicable("diffusers is not installed")
    return make_row(getattr(c.diffusers, scheduler)(**config))


def build_q_sample(c: Ctx) -> dict:
    B = c.case.shape[0]
    t = torch.randint(0, 1000, (B,), generator=torch.Generator().manual_seed(2)).to(c.device)  # per sample
    g, table_x = c.gen, c.table.to(c.dtype)
    view = (-1,) + (1,) * (len(c.case.shape) - 1)

    def eager(i):
        x0 = c.b(i)["x"]
        z = randn(x0, g)
        ab = table_x[t].view(view)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * z, z

    def diffusers_row(sched):
        def add_noise(i):  # as diffusers' training scripts do
            x0 = c.b(i)["x"]
            z = torch.randn_like(x0)
            return sched.add_noise(x0, z, t), z
        return add_noise

    return {
        "native": _native(c, lambda i: dk.q_sample(c.b(i)["x"], t, generator=g)),
        "eager": eager,
        "diffusers": _diffusers(c, "DDPMScheduler", diffusers_row),
        "compile": (c_q_sample, lambda f, i: f(c.b(i)["x"], c.b(i)["z"], c.table, t)),
        "compile+randn": (c_q_sample_randn, lambda f, i: f(c.b(i)["x"], c.table, t)),
        "compile+gen": (c_q_sample_gen, lambda f, i: f(c.b(i)["x"], c.table, t, g)),
        "reference": lambda i: dk.reference.q_sample(c.b(i)["x"], t, generator=g),
    }


def build_ddim_step(c: Ctx) -> dict:
    eta, g = c.case.params["eta"], c.gen
    gen = g if eta > 0 else None
    coeffs = ddim_coefficients(c.ac[T_STEP], c.ac[T_PREV_DDIM], eta)
    t, tp = c.dev_t(T_STEP), c.dev_t(T_PREV_DDIM)

    def eager(i):
        s = c.b(i)
        return ddim_update(s["x"], s["m"], coeffs, randn(s["x"], g) if eta > 0 else None)

    def diffusers_row(sched):
        sched.set_timesteps(50)  # its step then goes from t to t - 20, as the other rows do
        return lambda i: sched.step(c.b(i)["m"], T_STEP, c.b(i)["x"], eta=eta, generator=gen, return_dict=False)[0]

    no_noise = NotApplicable("eta=0 draws no noise (see the 'compile' row)")
    return {
        "native": _native(c, lambda i: dk.ddim_step(c.b(i)["x"], c.b(i)["m"], T_STEP, eta, t_prev=T_PREV_DDIM,
                                                    generator=gen)),
        "eager": eager,
        "diffusers": _diffusers(c, "DDIMScheduler", diffusers_row, clip_sample=False),
        "compile": (c_ddim, lambda f, i: f(c.b(i)["x"], c.b(i)["m"], c.table, t, tp, eta,
                                           c.b(i)["z"] if eta > 0 else None)),
        "compile+randn": (c_ddim_randn, lambda f, i: f(c.b(i)["x"], c.b(i)["m"], c.table, t, tp, eta))
        if eta > 0 else no_noise,
        "compile+gen": (c_ddim_gen, lambda f, i: f(c.b(i)["x"], c.b(i)["m"], c.table, t, tp, eta, g))
        if eta > 0 else no_noise,
        "reference": lambda i: dk.reference.ddim_step(c.b(i)["x"], c.b(i)["m"], T_STEP, eta, t_prev=T_PREV_DDIM,
                                                      generator=gen),
    }


def build_ddpm_step(c: Ctx) -> dict:
    g = c.gen
    coeffs = ddpm_coefficients(c.ac[T_STEP], c.ac[T_STEP - 1])
    t, tp = c.dev_t(T_STEP), c.dev_t(T_STEP - 1)

    def eager(i):
        s = c.b(i)
        return ddpm_update(s["x"], s["m"], coeffs, randn(s["x"], g))

    def diffusers_row(sched):  # fixed_small variance; without set_timesteps it steps t -> t - 1
        return lambda i: sched.step(c.b(i)["m"], T_STEP, c.b(i)["x"], generator=g, return_dict=False)[0]

    return {
        "native": _native(c, lambda i: dk.ddpm_step(c.b(i)["x"], c.b(i)["m"], T_STEP, generator=g)),
        "eager": eager,
        "diffusers": _diffusers(c, "DDPMScheduler", diffusers_row, clip_sample=False),
        "compile": (c_ddpm, lambda f, i: f(c.b(i)["x"], c.b(i)["m"], c.table, t, tp, c.b(i)["z"])),
        "compile+randn": (c_ddpm_randn, lambda f, i: f(c.b(i)["x"], c.b(i)["m"], c.table, t, tp)),
        "compile+gen": (c_ddpm_gen, lambda f, i: f(c.b(i)["x"], c.b(i)["m"], c.table, t, tp, g)),
        "reference": lambda i: dk.reference.ddpm_step(c.b(i)["x"], c.b(i)["m"], T_STEP, generator=g),
    }


def build_langevin_step(c: Ctx) -> dict:
    g, a = c.gen, 1e-3
    return {
        "native": _native(c, lambda i: dk.langevin_step(c.b(i)["x"], c.b(i)["m"], a, generator=g)),
        "eager": lambda i: c_langevin(c.b(i)["x"], c.b(i)["m"], a, randn(c.b(i)["x"], g)),
        "diffusers": NotApplicable("diffusers has no plain Langevin step"),
        "compile": (c_langevin, lambda f, i: f(c.b(i)["x"], c.b(i)["m"], a, c.b(i)["z"])),
        "compile+randn": (c_langevin_randn, lambda f, i: f(c.b(i)["x"], c.b(i)["m"], a)),
        "compile+gen": (c_langevin_gen, lambda f, i: f(c.b(i)["x"], c.b(i)["m"], a, g)),
        "reference": lambda i: dk.reference.langevin_step(c.b(i)["x"], c.b(i)["m"], a, generator=g),
    }


GMM_STEP_LR = 0.05


def gmm_problem(device, dtype, levels: int):
    """The classic 2-D test (REFERENCE_SEMANTICS.md): weights 0.8/0.2, means (5,5)/(-5,-5),
    unit stds, sigmas geometric from 20 down to 1."""
    w = torch.tensor([0.8, 0.2], device=device, dtype=dtype)
    means = torch.tensor([[5.0, 5.0], [-5.0, -5.0]], device=device, dtype=dtype)
    stds = torch.ones(2, 2, device=device, dtype=dtype)
    sigmas = torch.exp(torch.linspace(math.log(20.0), 0.0, levels, dtype=torch.float64))
    return w, means, stds, sigmas


def build_gmm_annealed_langevin(c: Ctx) -> dict:
    levels, n_each = c.case.params["levels"], c.case.params["steps_each"]
    g = c.gen
    w, means, stds, sigmas = gmm_problem(c.device, c.dtype, levels)
    logw, var0 = w.log(), stds**2
    sig_host = sigmas.tolist()
    alphas = [GMM_STEP_LR * (s / sig_host[-1]) ** 2 for s in sig_host]
    sig_dev = [torch.tensor(s, device=c.device, dtype=c.dtype) for s in sig_host]
    alpha_dev = [torch.tensor(a, device=c.device, dtype=c.dtype) for a in alphas]
    kw = {"n_steps_each": n_each, "step_lr": GMM_STEP_LR, "generator": g}

    def eager(i):
        x = c.b(i)["x"]
        for s, a in zip(sig_host, alphas, strict=True):
            for _ in range(n_each):
                x = x + a * gmm_score(x, logw, means, var0, s) + (2 * a) ** 0.5 * randn(x, g)
        return x

    def compiled_loop(step_args):
        def run(f, i):
            x = c.b(i)["x"]
            for s, a in zip(sig_dev, alpha_dev, strict=True):
                for _ in range(n_each):
                    x = f(x, logw, means, var0, s, a, *step_args(i))
            return x
        return run

    return {
        "native": _native(c, lambda i: dk.gmm_annealed_langevin(c.b(i)["x"], w, means, stds, sigmas, **kw)),
        "eager": eager,
        "diffusers": NotApplicable("diffusers has no annealed Langevin sampler"),
        # "compile" passes another input set as the noise of every step: the cost without RNG.
        "compile": (c_gmm_step, compiled_loop(lambda i: (c.b(i + 1)["x"],))),
        "compile+randn": (c_gmm_step_randn, compiled_loop(lambda i: ())),
        "compile+gen": (c_gmm_step_gen, compiled_loop(lambda i: (g,))),
        "reference": lambda i: dk.reference.gmm_annealed_langevin(c.b(i)["x"], w, means, stds, sigmas, **kw),
    }


# ---- the sampler families: k-diffusion's formulas (eager / compiled), diffusers' steps -------
# Tensors each fused op reads plus writes (fp32: 4 B each): heun reads x, denoised, the
# proposal and its denoised; dpmpp (second order, "sample") reads x, denoised, old_denoised.
SAMPLER_TENSORS = {"heun_step": 5, "dpmpp_2m_step": 4}
K_STEP = 10  # the diffusers rows step from index 10 of a 30-step schedule (4 for LCM)


def _vp_sigma(ab: float) -> float:
    return ((1 - ab) / ab) ** 0.5


def k_euler(x, den, sigma, sigma_next):
    d = (x - den) / sigma  # k-diffusion's to_d
    return x + d * (sigma_next - sigma)


def k_euler_ancestral(x, den, sigma, sigma_next, z):
    sigma_up = min(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    d = (x - den) / sigma
    x = x + d * (sigma_down - sigma)
    return x + z * sigma_up


def k_euler_ancestral_gen(x, den, sigma, sigma_next, gen):
    return k_euler_ancestral(x, den, sigma, sigma_next, randn(x, gen))


def k_euler_ancestral_randn(x, den, sigma, sigma_next):
    return k_euler_ancestral(x, den, sigma, sigma_next, torch.randn_like(x))


def k_heun2(x, den, x2, den2, sigma, sigma_next):
    d = (x - den) / sigma
    d_2 = (x2 - den2) / sigma_next
    return x + (d + d_2) / 2 * (sigma_next - sigma)


def k_dpmpp_2m(x, den, old, sigma, sigma_next, sigma_prev):
    t, t_next, t_prev = -math.log(sigma), -math.log(sigma_next), -math.log(sigma_prev)
    h = t_next - t
    r = (t - t_prev) / h
    den_d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
    return (sigma_next / sigma) * x - math.expm1(-h) * den_d


def flow_euler(x, v, sigma, sigma_next):
    return x + (sigma_next - sigma) * v


def flow_noising(x0, z, sigma):
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * z, z


def flow_noising_gen(x0, sigma, gen):
    return flow_noising(x0, randn(x0, gen), sigma)


def flow_noising_randn(x0, sigma):
    return flow_noising(x0, torch.randn_like(x0), sigma)


def lcm_update(x, m, c, z):
    c_skip, c_out, sa, s1a, sap, s1ap = c
    x0 = (x - s1a * m) / sa
    den = c_out * x0 + c_skip * x
    return sap * den + s1ap * z


def lcm_update_gen(x, m, c, gen):
    return lcm_update(x, m, c, randn(x, gen))


def lcm_update_randn(x, m, c):
    return lcm_update(x, m, c, torch.randn_like(x))


def _stepper(sched, n_steps: int, k: int, prepare=None):
    """``step(i, model_output, sample, **kw)`` of a diffusers scheduler at index k of an
    n-step schedule on every call (its step index is reset before each)."""
    sched.set_timesteps(n_steps)
    t = sched.timesteps[k]

    def step(i, m, x, **kw):
        sched._step_index = k
        if prepare is not None:
            prepare(sched, i)
        return sched.step(m, t, x, return_dict=False, **kw)[0]

    return step


def build_euler_step(c: Ctx) -> dict:
    eta, g = c.case.params["eta"], c.gen
    s, sn = _vp_sigma(c.ac[T_STEP]), _vp_sigma(c.ac[T_PREV_DDIM])
    gen = g if eta > 0 else None
    no_noise = NotApplicable("eta=0 draws no noise (see the 'compile' row)")
    if eta > 0:
        eager = lambda i: k_euler_ancestral(c.b(i)["x"], c.b(i)["m"], s, sn, randn(c.b(i)["x"], g))  # noqa: E731
        comp = (k_euler_ancestral, lambda f, i: f(c.b(i)["x"], c.b(i)["m"], s, sn, c.b(i)["z"]))
        comp_gen = (k_euler_ancestral_gen, lambda f, i: f(c.b(i)["x"], c.b(i)["m"], s, sn, g))
        comp_randn = (k_euler_ancestral_randn, lambda f, i: f(c.b(i)["x"], c.b(i)["m"], s, sn))
    else:
        eager = lambda i: k_euler(c.b(i)["x"], c.b(i)["m"], s, sn)  # noqa: E731
        comp = (k_euler, lambda f, i: f(c.b(i)["x"], c.b(i)["m"], s, sn))
        comp_gen = comp_randn = no_noise

    def diffusers_row(sched):  # epsilon prediction (its default): x0 = x - sigma m inside the step
        step = _stepper(sched, 30, K_STEP)
        return lambda i: step(i, c.b(i)["m"], c.b(i)["x"], **({"generator": g} if eta > 0 else {}))

    return {
        "native": _native(c, lambda i: dk.euler_step(c.b(i)["x"], c.b(i)["m"], s, sn, eta=eta, generator=gen)),
        "eager": eager,
        "diffusers": _diffusers(c, "EulerAncestralDiscreteScheduler" if eta > 0 else "EulerDiscreteScheduler",
                                diffusers_row),
        "compile": comp, "compile+randn": comp_randn, "compile+gen": comp_gen,
        "reference": lambda i: dk.reference.euler_step(c.b(i)["x"], c.b(i)["m"], s, sn, eta=eta, generator=gen),
    }


def build_heun_step(c: Ctx) -> dict:
    s, sn = _vp_sigma(c.ac[T_STEP]), _vp_sigma(c.ac[T_PREV_DDIM])

    def args(i):  # x, its denoised, the Euler proposal and its denoised: four distinct tensors
        return c.b(i)["x"], c.b(i)["m"], c.b(i)["z"], c.b(i + 1)["m"]

    def diffusers_row(sched):  # HeunDiscreteScheduler's second call, its first call's state set
        def prepare(sc, i):
            sc.dt, sc.prev_derivative, sc.sample = sn - s, c.b(i + 1)["z"], c.b(i)["x"]
        step = _stepper(sched, 30, 2 * K_STEP, prepare)
        return lambda i: step(i, c.b(i + 1)["m"], c.b(i)["z"])

    return {
        "native": _native(c, lambda i: dk.heun_step(*args(i), s, sn)),
        "eager": lambda i: k_heun2(*args(i), s, sn),
        "diffusers": _diffusers(c, "HeunDiscreteScheduler", diffusers_row),
        "compile": (k_heun2, lambda f, i: f(*args(i), s, sn)),
        "reference": lambda i: dk.reference.heun_step(*args(i), s, sn),
    }


def build_dpmpp_2m_step(c: Ctx) -> dict:
    s, sn, sp = _vp_sigma(c.ac[T_STEP]), _vp_sigma(c.ac[T_PREV_DDIM]), _vp_sigma(c.ac[T_STEP + 20])

    def diffusers_row(sched):  # dpmsolver++, order 2, second order: the previous x0 in its history
        def prepare(sc, i):
            sc.lower_order_nums, sc.model_outputs = 2, [None, c.b(i)["z"]]
        step = _stepper(sched, 30, K_STEP, prepare)
        return lambda i: step(i, c.b(i)["m"], c.b(i)["x"])

    return {
        "native": _native(c, lambda i: dk.dpmpp_2m_step(c.b(i)["x"], c.b(i)["m"], c.b(i)["z"], s, sn, sp)),
        "eager": lambda i: k_dpmpp_2m(c.b(i)["x"], c.b(i)["m"], c.b(i)["z"], s, sn, sp),
        "diffusers": _diffusers(c, "DPMSolverMultistepScheduler", diffusers_row, algorithm_type="dpmsolver++",
                                solver_order=2),
        "compile": (k_dpmpp_2m, lambda f, i: f(c.b(i)["x"], c.b(i)["m"], c.b(i)["z"], s, sn, sp)),
        "reference": lambda i: dk.reference.dpmpp_2m_step(c.b(i)["x"], c.b(i)["m"], c.b(i)["z"], s, sn, sp),
    }


def build_flow_step(c: Ctx) -> dict:
    s, sn = 0.62, 0.58  # a step of a 28-step shifted (SD3) schedule

    def diffusers_row(sched):
        step = _stepper(sched, 28, K_STEP)
        return lambda i: step(i, c.b(i)["m"], c.b(i)["x"])

    return {
        "native": _native(c, lambda i: dk.flow_step(c.b(i)["x"], c.b(i)["m"], s, sn)),
        "eager": lambda i: flow_euler(c.b(i)["x"], c.b(i)["m"], s, sn),
        "diffusers": _diffusers(c, "FlowMatchEulerDiscreteScheduler", diffusers_row),
        "compile": (flow_euler, lambda f, i: f(c.b(i)["x"], c.b(i)["m"], s, sn)),
        "reference": lambda i: dk.reference.flow_step(c.b(i)["x"], c.b(i)["m"], s, sn),
    }


def build_flow_q_sample(c: Ctx) -> dict:
    B, g = c.case.shape[0], c.gen
    sigma = torch.rand(B, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(c.device)

    def diffusers_row(sched):  # scale_noise at per-sample training timesteps, as its docstring has it
        sched.set_timesteps(1000)
        idx = torch.randint(0, 1000, (B,), generator=torch.Generator().manual_seed(3))
        ts = sched.timesteps[idx].to(c.device)

        def noising(i):
            x0 = c.b(i)["x"]
            z = torch.randn_like(x0)
            return sched.scale_noise(x0, ts, z), z
        return noising

    return {
        "native": _native(c, lambda i: dk.flow_q_sample(c.b(i)["x"], sigma, generator=g)),
        "eager": lambda i: flow_noising(c.b(i)["x"], randn(c.b(i)["x"], g), sigma),
        "diffusers": _diffusers(c, "FlowMatchEulerDiscreteScheduler", diffusers_row),
        "compile": (flow_noising, lambda f, i: f(c.b(i)["x"], c.b(i)["z"], sigma)),
        "compile+randn": (flow_noising_randn, lambda f, i: f(c.b(i)["x"], sigma)),
        "compile+gen": (flow_noising_gen, lambda f, i: f(c.b(i)["x"], sigma, g)),
        "reference": lambda i: dk.reference.flow_q_sample(c.b(i)["x"], sigma, generator=g),
    }


def build_lcm_step(c: Ctx) -> dict:
    g, t, tp = c.gen, 759, 499  # a 4-step LCM schedule's second step
    ab, abp = c.ac[t], c.ac[tp]
    u = 10.0 * t
    coeffs = (0.25 / (u * u + 0.25), u / (u * u + 0.25) ** 0.5, ab**0.5, (1 - ab) ** 0.5, abp**0.5, (1 - abp) ** 0.5)

    def diffusers_row(sched):
        step = _stepper(sched, 4, 1)
        return lambda i: step(i, c.b(i)["m"], c.b(i)["x"], generator=g)

    return {
        "native": _native(c, lambda i: dk.lcm_step(c.b(i)["x"], c.b(i)["m"], t, tp, generator=g)),
        "eager": lambda i: lcm_update(c.b(i)["x"], c.b(i)["m"], coeffs, randn(c.b(i)["x"], g)),
        "diffusers": _diffusers(c, "LCMScheduler", diffusers_row),
        "compile": (lcm_update, lambda f, i: f(c.b(i)["x"], c.b(i)["m"], coeffs, c.b(i)["z"])),
        "compile+randn": (lcm_update_randn, lambda f, i: f(c.b(i)["x"], c.b(i)["m"], coeffs)),
        "compile+gen": (lcm_update_gen, lambda f, i: f(c.b(i)["x"], c.b(i)["m"], coeffs, g)),
        "reference": lambda i: dk.reference.lcm_step(c.b(i)["x"], c.b(i)["m"], t, tp, generator=g),
    }


# The deterministic rows compute the same step: each is checked against the eager formula.
DETERMINISTIC = {"heun_step", "dpmpp_2m_step", "flow_step"}


BUILDERS = {"q_sample": build_q_sample, "ddim_step": build_ddim_step, "ddpm_step": build_ddpm_step,
            "langevin_step": build_langevin_step, "gmm_annealed_langevin": build_gmm_annealed_langevin,
            "euler_step": build_euler_step, "heun_step": build_heun_step, "dpmpp_2m_step": build_dpmpp_2m_step,
            "flow_step": build_flow_step, "flow_q_sample": build_flow_q_sample, "lcm_step": build_lcm_step}


# ---- measuring -----------------------------------------------------------------------------
def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def prepare(name: str, spec, device: torch.device):
    """-> (callable(i), compile_seconds or None, graph_breaks or None). Compiled
    implementations are compiled here, from a clean dynamo cache, and timed separately."""
    if not isinstance(spec, tuple):
        return spec, None, None
    fn, call = spec
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = torch.compile(fn)
    first = C.time_once(lambda: call(compiled, 0), device)
    again = C.time_once(lambda: call(compiled, 1), device)
    return (lambda i: call(compiled, i)), max(first - again, 0.0), _graph_breaks()


def measure(fn, device: torch.device, args) -> dict:
    est = C.time_once(lambda: fn(2), device)
    for i in range(C.reps_for(est, 0.2 * args.budget, 1, args.warmup)):
        fn(3 + i)
    n = C.reps_for(est, args.budget, args.min_reps, args.reps)
    return C.summarize(C.time_calls(fn, n, device, start=3 + args.warmup))


SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense")


def host_overhead(fn, device: torch.device, calls: int = 200, profiled: int = 10) -> dict:
    """Host microseconds per call (calls issued back to back, one sync at the end), and
    launches / syncs per call counted by torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for i in range(5):
        fn(i)
    C.sync(device)
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    host_s = time.perf_counter() - t0
    C.sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(profiled):
            fn(i)
    events = prof.events()
    gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    copies = sum(1 for e in gpu if e.name.startswith(("Memcpy", "Memset")))
    syncs = sum(1 for e in events if e.device_type == DeviceType.CPU and e.name in SYNC_EVENTS)
    return {"host_us_per_call": host_s / calls * 1e6, "launches_per_call": len(gpu) / profiled,
            "memcpy_memset_per_call": copies / profiled, "syncs_per_call": syncs / profiled}


def n_buffers(case: Case, args) -> int:
    """Input sets to rotate through: enough that a row reading just one tensor per call
    streams twice the cache size between two uses of the same buffer, within a quarter
    of the free memory."""
    tensor_bytes = case.numel * case.elem_size
    set_bytes = tensor_bytes * (1 if case.op == "gmm_annealed_langevin" else 3)
    want = min(args.max_buffers, math.ceil(2 * C.cache_bytes(case.device) / tensor_bytes) + 1)
    fits = int(0.25 * C.free_memory_bytes(case.device) // set_bytes)
    return min(want, fits)


def run_case(case: Case, args, diffusers_mod, impls: list[str], bar) -> tuple[dict, dict | None]:
    result = {"device": str(case.device), "op": case.op, "label": case.label, "params": case.params,
              "dtype": C.dtype_name(case.dtype), "shape": list(case.shape), "numel": case.numel,
              "bytes": case.logical_bytes(), "impls": {}}
    nb = n_buffers(case, args)
    result["n_buffers"] = nb
    if nb < 1:
        result["skipped"] = "inputs do not fit in memory"
        bar.update(len(impls))
        return result, None
    ctx = Ctx(case, nb, diffusers_mod)
    specs = BUILDERS[case.op](ctx)
    specs["copy"] = lambda i: ctx.b(i)["x"].clone()
    # DDIM at eta=0 is deterministic: every row must compute the same step as the eager formula.
    deterministic = (case.op in ("ddim_step", "euler_step") and case.params["eta"] == 0) or case.op in DETERMINISTIC
    check = specs["eager"](0) if deterministic else None
    overhead = {} if case.overhead else None
    ready = {}  # name -> (fn, compile_s, graph_breaks)
    for name in impls:
        bar.set_postfix_str(f"{case.device.type} {case.label} {C.shape_str(case.shape)} "
                            f"{C.dtype_name(case.dtype)}: {name}")
        spec = specs.get(name, NotApplicable("not defined for this op"))
        if isinstance(spec, NotApplicable):
            result["impls"][name] = {"status": "n/a", "reason": str(spec)}
            bar.update()
            continue
        try:
            ready[name] = prepare(name, spec, case.device)
        except Exception as e:  # report and go on: one failing row must not lose the run
            _failed(result, name, e, case, args)
            bar.update()
    try:
        timings = measure_side_by_side({n: r[0] for n, r in ready.items()}, case.device, args) if case.time_it else {}
    except Exception as e:
        timings = {}
        for name in list(ready):
            _failed(result, name, e, case, args)
            ready.pop(name)
    for name, (fn, compile_s, breaks) in ready.items():
        try:
            entry = {"status": "ok", **timings.get(name, {})}
            if compile_s is not None:
                entry.update(compile_s=compile_s, graph_breaks=breaks)
            # the diffusers rows of the sampler families step on their own schedules
            if check is not None and name != "copy" and not (name == "diffusers" and case.op in SAMPLER_OPS):
                entry["max_abs_diff_vs_eager"] = float((fn(0).float() - check.float()).abs().max())
            if case.overhead:
                overhead[name] = host_overhead(fn, case.device)
            result["impls"][name] = entry
        except Exception as e:
            _failed(result, name, e, case, args)
        bar.update()
    result["impls"] = {n: result["impls"][n] for n in impls if n in result["impls"]}
    return result, overhead


def _failed(result: dict, name: str, e: Exception, case: Case, args) -> None:
    if args.debug:
        traceback.print_exc()
    result["impls"][name] = {"status": "error", "reason": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    if case.device.type == "cuda":
        torch.cuda.empty_cache()


def measure_side_by_side(fns: dict, device: torch.device, args, rounds: int = 5) -> dict:
    """Times every row in turns: ``rounds`` rounds, each a block of calls of every row in
    sequence, so a slow spell of a shared machine (another process, frequency changes)
    falls on all rows alike instead of on whichever row happened to be running."""
    plan = {}
    for name, fn in fns.items():
        est = C.time_once(lambda f=fn: f(2), device)
        for i in range(C.reps_for(est, 0.2 * args.budget, 1, args.warmup)):
            fn(3 + i)
        plan[name] = C.reps_for(est, args.budget, args.min_reps, args.reps)
    ms = {name: [] for name in fns}
    faults = dict.fromkeys(fns, 0)
    for r in range(rounds):
        for name, fn in fns.items():
            n = plan[name] // rounds + (1 if r < plan[name] % rounds else 0)
            if n:
                f0 = C.minor_faults()
                ms[name] += C.time_calls(fn, n, device, start=3 + args.warmup + len(ms[name]))
                faults[name] += C.minor_faults() - f0
    # Page faults per call: a CPU row that gets fresh memory from the kernel on every call
    # (glibc hands large freed blocks back) pays for it, and which rows do can change from
    # one process to the next; this column shows it.
    return {name: {**C.summarize(v), "page_faults_per_call": faults[name] / len(v)} for name, v in ms.items() if v}


def copy_bandwidth(device: torch.device, args) -> dict:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written; both
    ``clone`` (allocates, as every op here does) and ``copy_`` into an existing tensor."""
    if args.quick:
        target = 2 * C.cache_bytes(device)
    else:
        target = max(4 * C.cache_bytes(device), (1 << 30) if device.type == "cuda" else (256 << 20))
    nbytes = int(min(target, 0.1 * C.free_memory_bytes(device)))
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    out = {"bytes": nbytes}
    for kind, fn in (("clone", lambda i: src.clone()), ("copy_", lambda i: dst.copy_(src))):
        s = measure(fn, device, args)
        out[f"{kind}_ms"] = s["median_ms"]
        out[f"{kind}_gbps"] = 2 * nbytes / s["median_ms"] / 1e6
    # The floor uses the faster one: a conservative (high) bandwidth.
    out["gbps"] = max(out["clone_gbps"], out["copy__gbps"])
    return out


def add_derived(result: dict, bw: dict) -> None:
    impls = result["impls"]
    native = impls.get("native", {}).get("median_ms")
    b = result["bytes"]
    result["floor_ms"] = b / bw["gbps"] / 1e6 if b else None
    for e in impls.values():
        if e.get("status") != "ok" or "median_ms" not in e:
            continue
        if b:
            e["gbps"] = b / e["median_ms"] / 1e6
            e["frac_copy_bw"] = result["floor_ms"] / e["median_ms"]
        if result["op"] == "gmm_annealed_langevin":
            p = result["params"]
            e["point_steps_per_s"] = (result["numel"] // result["shape"][-1] * p["levels"] * p["steps_each"]
                                      / (e["median_ms"] / 1e3))
        e["vs_native"] = e["median_ms"] / native if native else None


# ---- cases ---------------------------------------------------------------------------------
def build_cases(args, devices) -> list[Case]:
    dtypes = C.parse_dtypes(args.dtypes)
    levels, steps_each = (int(v) for v in args.gmm_chain.lower().split("x"))
    etas = [float(e) for e in C.split_list(args.etas)]
    cases = []
    for device in devices:
        for op in args.op_list:
            for shape in sizes_for(op, device, args):
                for dtype in dtypes:
                    if op == "gmm_annealed_langevin" and dtype not in (torch.float32, torch.float64):
                        continue  # the fused GMM kernel is float32/float64 only
                    variants = [{"eta": e} for e in etas] if op in ("ddim_step", "euler_step") else [{}]
                    if op == "gmm_annealed_langevin":
                        variants = [{"levels": levels, "steps_each": steps_each}]
                    for params in variants:
                        overhead = (device.type == "cuda" and shape == OVERHEAD_SHAPE and dtype == torch.float32
                                    and not args.no_overhead)
                        cases.append(Case(device, op, params, dtype, shape, overhead=overhead))
    # Host overhead is measured at 1x4x64x64 float32 on CUDA even when that size is not timed.
    for device in devices:
        if device.type != "cuda" or args.no_overhead:
            continue
        for op in args.op_list:
            if op == "gmm_annealed_langevin":
                continue
            for params in ([{"eta": e} for e in etas] if op in ("ddim_step", "euler_step") else [{}]):
                if not any(c.overhead and c.op == op and c.params == params and c.device == device for c in cases):
                    cases.append(Case(device, op, params, torch.float32, OVERHEAD_SHAPE, time_it=False, overhead=True))
    return cases


def sizes_for(op: str, device: torch.device, args) -> list[tuple[int, ...]]:
    if args.sizes:
        specs = C.split_list(args.sizes)
    else:
        table = QUICK_SIZES if args.quick else DEFAULT_SIZES
        specs = table[op][device.type] if isinstance(table[op], dict) else table[op]
    shapes = [C.parse_shape(s) for s in specs]
    if op == "gmm_annealed_langevin":  # points in 2-D: a size is read as a number of elements
        shapes = [s if len(s) == 2 and s[1] <= 16 else (max(math.prod(s) // 2, 1), 2) for s in shapes]
    return shapes


# ---- output --------------------------------------------------------------------------------
def print_tables(doc: dict, file=sys.stdout) -> None:
    print(f"\ndiffkern step_speed  ({doc['machine']['cpu_model']}, {doc['machine']['cpu_count']} CPUs"
          + "".join(f"; {g['name']}" for g in doc["machine"]["gpus"]) + f"; torch {doc['versions']['torch']}, "
          f"diffusers {doc['versions']['diffusers'] or 'absent'})", file=file)
    if doc["versions"].get("diffkern_path"):  # an installed copy shadows the checkout: say which ran
        print(f"diffkern from {doc['versions']['diffkern_path']}", file=file)
    for dev, bw in doc["copy_bandwidth"].items():
        print(f"copy bandwidth on {dev}: {bw['gbps']:.1f} GB/s (read+write; clone {bw['clone_gbps']:.1f}, "
              f"copy_ {bw['copy__gbps']:.1f}) over {bw['bytes'] / 2**20:.0f} MiB", file=file)
    print("ratio column: this row's median / native's median (> 1: native is faster)", file=file)
    for r in doc["results"]:
        if r.get("skipped"):
            print(f"\n== {r['device']} {r['label']} {C.shape_str(r['shape'])} {r['dtype']}: skipped, {r['skipped']}",
                  file=file)
            continue
        if not any("median_ms" in e for e in r["impls"].values()):
            continue
        floor = (f"{r['bytes'] / r['numel']:.0f} B/elem, floor {C.fmt_ms(r['floor_ms'])} ms"
                 if r["bytes"] else f"chain {r['params']['levels']}x{r['params']['steps_each']} steps")
        print(f"\n== {r['device']}  {r['label']}  {C.shape_str(r['shape'])}  {r['dtype']}   "
              f"[{floor}; {r['n_buffers']} input sets]", file=file)
        print(f"  {'impl':<14}{'median ms':>11}{'IQR ms':>10}{'reps':>6}{'GB/s':>8}{'%copy':>7}{'ratio':>9}  notes",
              file=file)
        for name, e in r["impls"].items():
            if e["status"] != "ok":
                print(f"  {name:<14}{e['status']:>11}  {e.get('reason', '')}", file=file)
                continue
            notes = []
            if "compile_s" in e:
                notes.append(f"compile {e['compile_s']:.1f}s")
            if e.get("graph_breaks"):
                notes.append(f"{e['graph_breaks']} graph break(s)")
            if "max_abs_diff_vs_eager" in e:
                notes.append(f"max|diff| vs eager {e['max_abs_diff_vs_eager']:.1e}")
            if "point_steps_per_s" in e:
                notes.append(f"{e['point_steps_per_s'] / 1e6:.1f} M point-steps/s")
            if r["device"] == "cpu" and e.get("page_faults_per_call", 0) >= 1:
                notes.append(f"{e['page_faults_per_call']:.0f} page faults/call")
            gbps = f"{e['gbps']:.1f}" if "gbps" in e else "-"
            frac = f"{100 * e['frac_copy_bw']:.0f}%" if "frac_copy_bw" in e else "-"
            print(f"  {name:<14}{C.fmt_ms(e['median_ms']):>11}{C.fmt_ms(e['iqr_ms']):>10}{e['reps']:>6}{gbps:>8}"
                  f"{frac:>7}{C.fmt_ratio(e.get('vs_native')):>9}  {', '.join(notes)}", file=file)
    if doc["host_overhead"]:
        print(f"\nhost cost per call on CUDA at {C.shape_str(OVERHEAD_SHAPE)} float32 "
              "(us of host time; GPU launches; host syncs)", file=file)
        for h in doc["host_overhead"]:
            cells = [f"{n} {v['host_us_per_call']:.0f}us/{v['launches_per_call']:.0f}L/{v['syncs_per_call']:.0f}S"
                     for n, v in h["impls"].items()]
            print(f"  {h['label']:<18} " + "  ".join(cells), file=file)
    print_summary(doc, file)


def print_summary(doc: dict, file) -> None:
    rows = [r for r in doc["results"] if r["impls"].get("native", {}).get("median_ms")]
    if not rows:
        return
    alts = [n for n in IMPLS if n != "native"]
    print("\nsummary: native median (ms) and every other row's median / native's", file=file)
    print(f"  {'case':<46}{'native':>9}" + "".join(f"{a:>14}" for a in alts), file=file)
    for r in rows:
        name = f"{r['device']} {r['label']} {C.shape_str(r['shape'])} {r['dtype']}"
        cells = [C.fmt_ratio(r["impls"].get(a, {}).get("vs_native")) for a in alts]
        print(f"  {name:<46}{C.fmt_ms(r['impls']['native']['median_ms']):>9}" + "".join(f"{c:>14}" for c in cells),
              file=file)


def plot(doc: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return False
    panels: dict[tuple, list] = {}
    for r in doc["results"]:
        if any("median_ms" in e for e in r["impls"].values()):
            panels.setdefault((r["device"], r["label"], r["dtype"]), []).append(r)
    if not panels:
        return False
    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
    colors = dict(zip(IMPLS, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2, strict=False))
    for ax, ((dev, label, dtype), rows) in zip(axes.flat, panels.items(), strict=False):
        rows = sorted(rows, key=lambda r: r["numel"])
        xs = [r["numel"] for r in rows]
        for name in IMPLS:
            pts = [(r["numel"], r["impls"][name]["median_ms"]) for r in rows
                   if "median_ms" in r["impls"].get(name, {})]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=name, color=colors[name],
                        lw=2.2 if name == "native" else 1.2)
        floors = [(r["numel"], r["floor_ms"]) for r in rows if r.get("floor_ms")]
        if floors:
            ax.plot(*zip(*floors, strict=True), "k--", marker="_", ms=14, lw=1, label="bytes / copy BW")
        ax.set(xscale="log", yscale="log", title=f"{dev} {label} {dtype}", xlabel="elements", ylabel="ms")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        if len(xs) == 1:
            ax.set_xlim(xs[0] / 3, xs[0] * 3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
            labels[lab] = lab
    fig.legend(handles.values(), labels.values(), loc="lower center", ncol=min(len(labels), 9), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- main ----------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1x4x64x64 (GMM: 1e4 points), float32, short budgets")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)}")
    p.add_argument("--sizes", default=None, help="comma list like 1x4x64x64,64x4x128x128,1e7x2 (all ops)")
    p.add_argument("--dtypes", default=None, help="comma list of float32,bfloat16,float16 (default: all three; "
                   "--quick: float32)")
    p.add_argument("--device", default="auto", help="auto (cpu, plus cuda if available), cpu, cuda, or a list")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma list of rows to run: " + ", ".join(IMPLS))
    p.add_argument("--etas", default="0,1", help="DDIM eta values (default 0,1)")
    p.add_argument("--gmm-chain", default=None, help="annealed GMM chain LEVELSxSTEPS (default 10x10; quick 5x4)")
    p.add_argument("--reps", type=int, default=None, help="max timed calls per row (default 50; quick 15)")
    p.add_argument("--min-reps", type=int, default=None, help="min timed calls per row (default 5; quick 3)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed calls per row (default 3; quick 0.15)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per row (default 3; quick 2)")
    p.add_argument("--max-buffers", type=int, default=1024, help="max rotating input sets (default 1024)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-overhead", action="store_true", help="skip the CUDA host-overhead pass")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", type=Path, default=C.DEFAULT_OUT, help="output folder (default benchmarks/results/)")
    p.add_argument("--tag", default=None, help="file name tag (default: devices, plus -quick)")
    p.add_argument("--debug", action="store_true", help="print tracebacks of failing rows")
    args = p.parse_args(argv)
    q = args.quick
    args.dtypes = args.dtypes or ("float32" if q else "float32,bfloat16,float16")
    args.gmm_chain = args.gmm_chain or ("5x4" if q else "10x10")
    args.reps = args.reps or (15 if q else 50)
    args.min_reps = min(args.min_reps or (3 if q else 5), args.reps)
    args.budget = args.budget if args.budget is not None else (0.15 if q else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (2 if q else 3)
    args.op_list = []
    for op in C.split_list(args.ops):
        op = OP_ALIASES.get(op, op)
        if op not in OPS:
            raise SystemExit(f"unknown op {op!r}; choose from {', '.join(OPS)}")
        args.op_list.append(op)
    args.impl_list = [n for n in C.split_list(args.impls)]
    for n in args.impl_list:
        if n not in IMPLS:
            raise SystemExit(f"unknown implementation {n!r}; choose from {', '.join(IMPLS)}")
    if "native" not in args.impl_list:
        args.impl_list.insert(0, "native")  # the ratios are relative to it
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*[Oo]nline softmax")  # inductor's note on the GMM reduction
    devices = C.resolve_devices(args.device)
    C.warn_if_busy()
    diffusers_mod, why_not = C.import_diffusers()
    if why_not:
        print(f"note: {why_not}; the diffusers rows say n/a", file=sys.stderr)
    impls = [n for n in IMPLS if n in args.impl_list]
    cases = build_cases(args, devices)
    started = time.perf_counter()
    doc = {
        "schema": SCHEMA, "created": C.now_iso(), "command": [sys.executable, *sys.argv],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": C.machine_info(devices), "versions": C.versions(diffusers_mod), "native": C.native_info(devices),
        "implementations": {n: IMPLS[n] for n in impls}, "copy_bandwidth": {}, "results": [], "host_overhead": [],
    }
    for dev in devices:
        print(f"measuring copy bandwidth on {dev} ...", file=sys.stderr)
        doc["copy_bandwidth"][str(dev)] = copy_bandwidth(dev, args)
    bar = C.progress(len(cases) * len(impls), "step_speed")
    for case in cases:
        result, overhead = run_case(case, args, diffusers_mod, impls, bar)
        if case.time_it:
            add_derived(result, doc["copy_bandwidth"][str(case.device)])
            doc["results"].append(result)
        if overhead:
            doc["host_overhead"].append({"device": str(case.device), "label": case.label, "params": case.params,
                                         "dtype": C.dtype_name(case.dtype), "shape": list(case.shape),
                                         "impls": overhead})
    bar.close()
    doc["machine"]["loadavg_end"] = C.loadavg()
    doc["elapsed_s"] = time.perf_counter() - started
    tag = args.tag or "+".join(d.type for d in devices) + ("-quick" if args.quick else "")
    json_path = args.out / f"step_speed-{tag}.json"
    png_path = json_path.with_suffix(".png")
    doc["files"] = {"json": str(json_path), "plot": None}
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_plot and plot(doc, png_path):
        doc["files"]["plot"] = str(png_path)
    C.write_json(json_path, doc)
    print_tables(doc)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if doc["files"]["plot"] else "")
          + f" in {doc['elapsed_s']:.0f} s", file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
