"""Bad input -> a clear ValueError / TypeError naming the argument, never a crash or a
silently wrong result. Every row runs on every path: the public functions (native), the
raw torch.ops.diffkern.* op (whose C++ checks are the only ones the public functions
use), and the reference fallback (what runs without the extension: diffkern.ops.fallback,
checked by diffkern/_validate.py). Same exception type, same argument named."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import NATIVE, gen, needs_cuda, randn

import diffkern as dk


class NotApplicable(Exception):
    """The row's bad value cannot be written in the raw op's schema (a schedule object, a
    string for an int, clip_sample <= 0, which the schema reads as "no clipping")."""


class Raw:
    """The public signatures, converted to the schemas with no checks at all (ints to
    tensors, names to codes, the default table), so every error comes from the op."""

    TABLE = dk.NoiseSchedule.linear().table("cpu")
    PRED = {"epsilon": 0, "sample": 1, "v_prediction": 2}
    VAR = {"fixed_small": 0, "fixed_large": 1}

    @staticmethod
    def _t(t):
        if isinstance(t, torch.Tensor):
            return t
        if isinstance(t, (bool, int, float)):
            return torch.tensor([t])
        raise NotApplicable(t)

    @classmethod
    def _common(cls, schedule, prediction_type, clip_sample, generator):
        if schedule is not None and not isinstance(schedule, dk.NoiseSchedule):
            raise NotApplicable(schedule)
        if clip_sample is not None and not (isinstance(clip_sample, float) and clip_sample > 0):
            raise NotApplicable(clip_sample)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise NotApplicable(generator)
        table = cls.TABLE if schedule is None else schedule.table("cpu")
        return table, cls.PRED.get(prediction_type, 99), clip_sample or 0.0

    @staticmethod
    def _tensors(*vals):
        """torch.ops' own argument parser refuses non-tensors (a RuntimeError, before the op)."""
        if any(v is not None and not isinstance(v, torch.Tensor) for v in vals):
            raise NotApplicable(vals)

    @staticmethod
    def _float(v):
        if isinstance(v, torch.Tensor) or not isinstance(v, (int, float)) or isinstance(v, bool):
            raise NotApplicable(v)
        return float(v)

    @classmethod
    def q_sample(cls, x0, t, noise=None, *, schedule=None, generator=None):
        table, _, _ = cls._common(schedule, "epsilon", None, generator)
        cls._tensors(x0, noise)
        return torch.ops.diffkern.q_sample(x0, cls._t(t), table, noise, generator, 0, 0)

    @classmethod
    def ddim_step(cls, x, eps, t, eta=0.0, *, t_prev=None, schedule=None, prediction_type="epsilon",
                  clip_sample=None, noise=None, generator=None):
        table, pred, clip = cls._common(schedule, prediction_type, clip_sample, generator)
        cls._tensors(x, eps, noise)
        return torch.ops.diffkern.ddim_step(x, eps, cls._t(t), None if t_prev is None else cls._t(t_prev), table,
                                            cls._float(eta), pred, clip, noise, generator, 0, 0)

    @classmethod
    def ddpm_step(cls, x, eps, t, *, t_prev=None, schedule=None, variance="fixed_small", prediction_type="epsilon",
                  clip_sample=None, noise=None, generator=None):
        table, pred, clip = cls._common(schedule, prediction_type, clip_sample, generator)
        cls._tensors(x, eps, noise)
        return torch.ops.diffkern.ddpm_step(x, eps, cls._t(t), None if t_prev is None else cls._t(t_prev), table,
                                            cls.VAR.get(variance, 99), pred, clip, noise, generator, 0, 0)

    @classmethod
    def langevin_step(cls, x, score, step_size, *, noise=None, generator=None):
        cls._common(None, "epsilon", None, generator)
        cls._tensors(x, score, noise)
        return torch.ops.diffkern.langevin_step(x, score, cls._float(step_size), noise, generator, 0, 0)

    @classmethod
    def gmm_annealed_langevin(cls, x, weights, means, stds, sigmas, *, n_steps_each=100, step_lr=2e-5,
                              denoise=False, generator=None):
        if not isinstance(sigmas, torch.Tensor):
            sigmas = torch.tensor(list(sigmas), dtype=torch.float64)
        if isinstance(n_steps_each, float):
            raise NotApplicable(n_steps_each)
        cls._tensors(x, weights, means, stds)
        return torch.ops.diffkern.gmm_annealed_langevin(x, weights, means, stds, sigmas, n_steps_each,
                                                        cls._float(step_lr), denoise, generator, 0, 0)

    # ---- the sampler families: levels as the schemas take them (a number, or a tensor
    # beside a 0.0), names to codes; no checks of their own
    @staticmethod
    def _lvl(v):
        if isinstance(v, torch.Tensor):
            return v, 0.0
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return None, float(v)
        raise NotApplicable(v)

    @classmethod
    def euler_step(cls, x, denoised, sigma, sigma_next, *, eta=0.0, s_noise=1.0, gamma=0.0, prediction_type="sample",
                   noise=None, generator=None):
        cls._common(None, prediction_type, None, generator)
        cls._tensors(x, denoised, noise)
        (st, s), (snt, sn) = cls._lvl(sigma), cls._lvl(sigma_next)
        return torch.ops.diffkern.euler_step(x, denoised, st, snt, s, sn, cls._float(eta), cls._float(s_noise),
                                             cls._float(gamma), cls.PRED.get(prediction_type, 99), noise, generator,
                                             0, 0)

    @classmethod
    def heun_step(cls, x, denoised, x_proposal, denoised_proposal, sigma, sigma_next, *, prediction_type="sample"):
        cls._tensors(x, denoised, x_proposal, denoised_proposal)
        (st, s), (snt, sn) = cls._lvl(sigma), cls._lvl(sigma_next)
        return torch.ops.diffkern.heun_step(x, denoised, x_proposal, denoised_proposal, st, snt, s, sn,
                                            cls.PRED.get(prediction_type, 99))

    @classmethod
    def dpmpp_2m_step(cls, x, denoised, old_denoised, sigma, sigma_next, sigma_prev=None, *, prediction_type="sample",
                      solver_type="midpoint", variance_preserving=False, return_denoised=False):
        cls._tensors(x, denoised, old_denoised)
        (st, s), (snt, sn) = cls._lvl(sigma), cls._lvl(sigma_next)
        spt, sp = cls._lvl(sigma_prev) if sigma_prev is not None else (None, 0.0)
        out, den = torch.ops.diffkern.dpmpp_2m_step(x, denoised, old_denoised, st, snt, spt, s, sn, sp,
                                                    cls.PRED.get(prediction_type, 99),
                                                    {"midpoint": 0, "heun": 1}.get(solver_type, 99),
                                                    variance_preserving, return_denoised)
        return (out, den) if return_denoised else out

    @classmethod
    def flow_step(cls, x, velocity, sigma, sigma_next, *, stochastic=False, noise=None, generator=None):
        cls._common(None, "epsilon", None, generator)
        cls._tensors(x, velocity, noise)
        (st, s), (snt, sn) = cls._lvl(sigma), cls._lvl(sigma_next)
        return torch.ops.diffkern.flow_step(x, velocity, st, snt, s, sn, stochastic, noise, generator, 0, 0)

    @classmethod
    def flow_q_sample(cls, x0, sigma, noise=None, *, generator=None):
        cls._common(None, "epsilon", None, generator)
        cls._tensors(x0, noise)
        st, s = cls._lvl(sigma)
        return torch.ops.diffkern.flow_q_sample(x0, st, s, noise, generator, 0, 0)

    @classmethod
    def lcm_step(cls, x, model_output, t, t_prev, *, schedule=None, prediction_type="epsilon", timestep_scaling=10.0,
                 sigma_data=0.5, clip_sample=None, noise=None, generator=None, return_denoised=False):
        table, pred, clip = cls._common(schedule, prediction_type, clip_sample, generator)
        cls._tensors(x, model_output, noise)
        out, den = torch.ops.diffkern.lcm_step(x, model_output, cls._t(t), cls._t(t_prev), table,
                                               cls._float(timestep_scaling), cls._float(sigma_data), pred, clip,
                                               True, noise, generator, 0, 0, return_denoised)
        return (out, den) if return_denoised else out

    @staticmethod
    def annealed_langevin(*args, **kwargs):
        raise NotApplicable("no op")

    @staticmethod
    def gmm_score(*args, **kwargs):
        raise NotApplicable("no op")


class Fallback:
    """What runs without the extension: diffkern.ops.fallback for the DDPM/DDIM ops, the
    families' reference (diffkern.reference.<op>, which checks with the same Python
    checks, _validate.py) for the sampler families."""

    def __getattr__(self, name):
        return getattr(dk.ops.fallback, name, None) or getattr(dk.reference, name)


IMPLS = [
    pytest.param(Fallback(), id="fallback"),
    pytest.param(dk, id="public", marks=pytest.mark.skipif(not NATIVE, reason="native ops not built")),
    pytest.param(Raw, id="raw", marks=pytest.mark.skipif(not NATIVE, reason="native ops not built")),
]


def _raises(impl, f, exc, match):
    try:
        with pytest.raises(exc, match=match):
            f(impl)
    except NotApplicable:
        pytest.skip("not expressible in the op's schema")

B = 4
X = randn(B, 3, 5, seed=1)
EPS = randn(B, 3, 5, seed=2)
Z = randn(B, 3, 5, seed=3)
W2 = torch.tensor([0.8, 0.2])
MU2 = torch.tensor([[5.0, 5.0], [-5.0, -5.0]])
SD2 = torch.tensor([1.0, 1.0])
P2 = randn(16, 2, seed=4, scale=3.0)


def score_fn(x, sigma):
    return -x / (1 + sigma**2)


# (id, f(ops), exception, match)
CASES = [
    # x
    ("x-list", lambda o: o.ddim_step([1.0, 2.0], EPS, 5), TypeError, "x"),
    ("x-numpy", lambda o: o.ddpm_step(X.numpy(), EPS, 5, noise=Z), TypeError, "x"),
    ("x0-int", lambda o: o.q_sample(torch.randint(1, 5, (4, 3)), 5), TypeError, "x0"),
    ("x-int", lambda o: o.ddim_step(torch.randint(1, 5, (4, 3)), torch.randint(1, 5, (4, 3)), 5), TypeError, "x"),
    ("x-complex", lambda o: o.langevin_step(X.to(torch.complex64), EPS.to(torch.complex64), 0.1), TypeError, "x"),
    ("x-int-langevin", lambda o: o.langevin_step(torch.randint(1, 5, (4,)), torch.randint(1, 5, (4,)), 0.1),
     TypeError, "x"),
    # eps / score / noise shapes and types
    ("eps-shape", lambda o: o.ddim_step(X, randn(B, 4, 5, seed=5), 5), ValueError, "eps"),
    ("eps-bigger", lambda o: o.ddim_step(X, randn(2, B, 3, 5, seed=5), 5), ValueError, "eps"),
    ("eps-not-tensor", lambda o: o.ddpm_step(X, 1.0, 5, noise=Z), TypeError, "eps"),
    ("noise-shape-ddim", lambda o: o.ddim_step(X, EPS, 5, 0.5, noise=randn(B, 3, 4, seed=6)), ValueError, "noise"),
    ("noise-shape-ddpm", lambda o: o.ddpm_step(X, EPS, 5, noise=randn(3, 5, 2, seed=6)), ValueError, "noise"),
    ("noise-shape-q", lambda o: o.q_sample(X, 5, randn(B + 1, 3, 5, seed=6)), ValueError, "noise"),
    ("score-shape", lambda o: o.langevin_step(X, randn(B, 5, 3, seed=7), 0.1), ValueError, "score"),
    ("noise-shape-langevin", lambda o: o.langevin_step(X, EPS, 0.1, noise=randn(7, seed=7)), ValueError, "noise"),
    # t
    ("t-too-big", lambda o: o.ddim_step(X, EPS, 1000), ValueError, "t"),
    ("t-negative", lambda o: o.ddpm_step(X, EPS, -1, noise=Z), ValueError, "t"),
    ("t-tensor-too-big", lambda o: o.q_sample(X, torch.tensor([1, 2, 1000, 3]), Z), ValueError, "t"),
    ("t-tensor-negative", lambda o: o.ddim_step(X, EPS, torch.tensor([1, -2, 10, 3])), ValueError, "t"),
    ("t-small-schedule", lambda o: o.ddim_step(X, EPS, 10, schedule=dk.NoiseSchedule.linear(10)), ValueError, "t"),
    ("t-float", lambda o: o.ddim_step(X, EPS, 5.0), TypeError, "t"),
    ("t-float-tensor", lambda o: o.q_sample(X, torch.tensor([1.0, 2.0, 3.0, 4.0]), Z), TypeError, "t"),
    ("t-bool", lambda o: o.ddpm_step(X, EPS, True, noise=Z), TypeError, "t"),
    ("t-str", lambda o: o.ddpm_step(X, EPS, "5", noise=Z), TypeError, "t"),
    ("t-wrong-length", lambda o: o.ddim_step(X, EPS, torch.tensor([5, 6, 7])), ValueError, "t"),
    ("t-wrong-length-q", lambda o: o.q_sample(X, torch.tensor([5, 6, 7, 8, 9]), Z), ValueError, "t"),
    ("t-2d", lambda o: o.ddim_step(X, EPS, torch.tensor([[5, 6], [7, 8]])), ValueError, "t"),
    ("t_prev-too-big", lambda o: o.ddim_step(X, EPS, 5, t_prev=1000), ValueError, "t_prev"),
    ("t_prev-not-below-t", lambda o: o.ddim_step(X, EPS, 5, t_prev=5), ValueError, "t_prev"),
    ("t_prev-above-t-ps", lambda o: o.ddpm_step(X, EPS, torch.tensor([5, 6, 7, 8]), t_prev=torch.tensor([4, 5, 9, 7]),
                                                noise=Z), ValueError, "t_prev"),
    ("t_prev-wrong-length", lambda o: o.ddim_step(X, EPS, 5, t_prev=torch.tensor([1, 2])), ValueError, "t_prev"),
    ("t_prev-float", lambda o: o.ddim_step(X, EPS, 5, t_prev=2.0), TypeError, "t_prev"),
    # eta / step sizes
    ("eta-negative", lambda o: o.ddim_step(X, EPS, 5, -0.1), ValueError, "eta"),
    ("eta-nan", lambda o: o.ddim_step(X, EPS, 5, float("nan")), ValueError, "eta"),
    ("eta-str", lambda o: o.ddim_step(X, EPS, 5, "1"), TypeError, "eta"),
    ("eta-tensor-vector", lambda o: o.ddim_step(X, EPS, 5, torch.tensor([0.1, 0.2])), ValueError, "eta"),
    ("step_size-negative", lambda o: o.langevin_step(X, EPS, -1e-3), ValueError, "step_size"),
    ("step_size-nan", lambda o: o.langevin_step(X, EPS, float("nan")), ValueError, "step_size"),
    ("step_size-none", lambda o: o.langevin_step(X, EPS, None), TypeError, "step_size"),
    # dtypes: floating ones promote (tests/test_front_door.py); others are refused
    ("eps-int", lambda o: o.ddim_step(X, EPS.long(), 5), TypeError, "eps"),
    ("noise-int", lambda o: o.ddpm_step(X, EPS, 5, noise=Z.int()), TypeError, "noise"),
    ("noise-complex-q", lambda o: o.q_sample(X, 5, Z.to(torch.complex64)), TypeError, "noise"),
    ("score-bool", lambda o: o.langevin_step(X, EPS > 0, 0.1), TypeError, "score"),
    ("eta-inf", lambda o: o.ddim_step(X, EPS, 5, float("inf")), ValueError, "eta"),
    ("t-per-sample-wrong-length-ps", lambda o: o.ddpm_step(X, EPS, torch.tensor([5, 6]), noise=Z), ValueError, "t"),
    ("t_prev-ps-vs-int-t", lambda o: o.ddim_step(X, EPS, 5, t_prev=torch.tensor([1, 2, 5, 3])), ValueError,
     "t_prev"),
    # options
    ("prediction_type", lambda o: o.ddim_step(X, EPS, 5, prediction_type="eps"), ValueError, "prediction_type"),
    ("prediction_type-ddpm", lambda o: o.ddpm_step(X, EPS, 5, prediction_type="x0", noise=Z), ValueError,
     "prediction_type"),
    ("variance", lambda o: o.ddpm_step(X, EPS, 5, variance="learned", noise=Z), ValueError, "variance"),
    ("clip_sample-negative", lambda o: o.ddim_step(X, EPS, 5, clip_sample=-1.0), ValueError, "clip_sample"),
    ("clip_sample-zero", lambda o: o.ddpm_step(X, EPS, 5, clip_sample=0.0, noise=Z), ValueError, "clip_sample"),
    ("schedule-type", lambda o: o.ddim_step(X, EPS, 5, schedule="linear"), TypeError, "schedule"),
    ("schedule-type-q", lambda o: o.q_sample(X, 5, Z, schedule=torch.ones(1000)), TypeError, "schedule"),
    # noise / generator
    ("noise-and-generator-ddim", lambda o: o.ddim_step(X, EPS, 5, 1.0, noise=Z, generator=gen(0)), ValueError,
     "noise"),
    ("noise-and-generator-ddpm", lambda o: o.ddpm_step(X, EPS, 5, noise=Z, generator=gen(0)), ValueError, "noise"),
    ("noise-and-generator-q", lambda o: o.q_sample(X, 5, Z, generator=gen(0)), ValueError, "noise"),
    ("noise-and-generator-langevin", lambda o: o.langevin_step(X, EPS, 0.1, noise=Z, generator=gen(0)), ValueError,
     "noise"),
    ("generator-type", lambda o: o.ddpm_step(X, EPS, 5, generator=1234), TypeError, "generator"),
    ("generator-type-q", lambda o: o.q_sample(X, 5, generator="cpu"), TypeError, "generator"),
    # annealed Langevin
    ("sigmas-empty", lambda o: o.annealed_langevin(score_fn, X, []), ValueError, "sigmas"),
    ("sigmas-empty-tensor", lambda o: o.annealed_langevin(score_fn, X, torch.tensor([])), ValueError, "sigmas"),
    ("sigmas-ascending", lambda o: o.annealed_langevin(score_fn, X, [0.1, 1.0, 10.0]), ValueError, "sigmas"),
    ("sigmas-repeated", lambda o: o.annealed_langevin(score_fn, X, [1.0, 1.0]), ValueError, "sigmas"),
    ("sigmas-negative", lambda o: o.annealed_langevin(score_fn, X, [1.0, -0.5]), ValueError, "sigmas"),
    ("sigmas-not-numbers", lambda o: o.annealed_langevin(score_fn, X, 3.0), TypeError, "sigmas"),
    ("n_steps_each-negative", lambda o: o.annealed_langevin(score_fn, X, [1.0], n_steps_each=-1), ValueError,
     "n_steps_each"),
    ("n_steps_each-float", lambda o: o.annealed_langevin(score_fn, X, [1.0], n_steps_each=2.5), TypeError,
     "n_steps_each"),
    ("step_lr-zero", lambda o: o.annealed_langevin(score_fn, X, [1.0], step_lr=0.0), ValueError, "step_lr"),
    ("step_lr-negative", lambda o: o.annealed_langevin(score_fn, X, [1.0], step_lr=-1e-3), ValueError, "step_lr"),
    ("anneal-x-int", lambda o: o.annealed_langevin(score_fn, torch.randint(1, 5, (3,)), [1.0]), TypeError, "x"),
    # Gaussian mixtures
    ("gmm-sigmas-empty", lambda o: o.gmm_annealed_langevin(P2, W2, MU2, SD2, [], n_steps_each=1, step_lr=0.1),
     ValueError, "sigmas"),
    ("gmm-sigmas-ascending", lambda o: o.gmm_annealed_langevin(P2, W2, MU2, SD2, [1.0, 2.0], n_steps_each=1,
                                                               step_lr=0.1), ValueError, "sigmas"),
    ("gmm-weights-sum", lambda o: o.gmm_annealed_langevin(P2, torch.tensor([0.5, 0.2]), MU2, SD2, [1.0],
                                                          n_steps_each=1, step_lr=0.1), ValueError, "weights"),
    ("gmm-weights-negative", lambda o: o.gmm_score(P2, torch.tensor([1.2, -0.2]), MU2, SD2, 1.0), ValueError,
     "weights"),
    ("gmm-means-shape", lambda o: o.gmm_score(P2, W2, torch.ones(2, 3), SD2, 1.0), ValueError, "means"),
    ("gmm-stds-shape", lambda o: o.gmm_score(P2, W2, MU2, torch.ones(3), 1.0), ValueError, "stds"),
    ("gmm-stds-nonpositive", lambda o: o.gmm_score(P2, W2, MU2, torch.tensor([1.0, -1.0]), 1.0), ValueError, "stds"),
    ("gmm-weights-int", lambda o: o.gmm_score(P2, torch.tensor([1, 0]), MU2, SD2, 1.0), TypeError, "weights"),
    ("gmm-sigma-negative", lambda o: o.gmm_score(P2, W2, MU2, SD2, -1.0), ValueError, "sigma"),
    ("gmm-n_steps_each", lambda o: o.gmm_annealed_langevin(P2, W2, MU2, SD2, [1.0], n_steps_each=-3, step_lr=0.1),
     ValueError, "n_steps_each"),
    ("gmm-step_lr", lambda o: o.gmm_annealed_langevin(P2, W2, MU2, SD2, [1.0], n_steps_each=3, step_lr=0.0),
     ValueError, "step_lr"),
    ("gmm-x-list", lambda o: o.gmm_annealed_langevin([[1.0, 2.0]], W2, MU2, SD2, [1.0], n_steps_each=1,
                                                     step_lr=0.1), TypeError, "x"),
]


# ---- the sampler families and levels in broadcast layouts (issue 20) ---------------------
XV = randn(B, 3, 5, 2, 2, seed=20)          # a video latent (B, C, F, H, W)
PF = randn(B, 1, 5, 1, 1, seed=21).abs() + 1.0  # per-frame sigma in [1, ~4): > 0
TF = torch.randint(300, 900, (B, 1, 5, 1, 1), generator=gen(22))  # per-frame t
XT = randn(B, 7, 3, seed=23)                # tokens (B, N, C)
PT = randn(B, 7, 1, seed=24).abs() * 0.5 + 0.3  # per-token sigma in (0.3, ~1.5)


def _poke(v: torch.Tensor, value) -> torch.Tensor:
    """v with one entry (not the first) set to `value`: the check must hold elementwise."""
    v = v.clone()
    v.view(-1)[v.numel() // 2 + 1] = value
    return v


FAMILY_CASES = [
    # the families' own arguments
    ("fam-x-int", lambda o: o.euler_step(torch.randint(1, 5, (4, 3)), EPS[:, :, 0], 1.0, 0.5), TypeError, "x"),
    ("fam-denoised-shape", lambda o: o.euler_step(X, randn(B, 4, 5, seed=5), 1.0, 0.5), ValueError, "denoised"),
    ("fam-x_proposal-shape", lambda o: o.heun_step(X, EPS, randn(B, 3, 4, seed=5), EPS, 1.0, 0.5), ValueError,
     "x_proposal"),
    ("fam-velocity-int", lambda o: o.flow_step(X, EPS.long(), 0.5, 0.2), TypeError, "velocity"),
    ("fam-old_denoised-shape", lambda o: o.dpmpp_2m_step(X, EPS, randn(2, B, 3, 5, seed=5), 1.0, 0.5, 2.0),
     ValueError, "old_denoised"),
    ("fam-model_output-shape-lcm", lambda o: o.lcm_step(X, randn(B + 1, 3, 5, seed=5), 500, 300), ValueError,
     "model_output"),
    ("fam-noise-shape-flow_q", lambda o: o.flow_q_sample(X, 0.5, randn(B, 3, 2, seed=6)), ValueError, "noise"),
    ("fam-noise-and-generator-euler", lambda o: o.euler_step(X, EPS, 1.0, 0.5, eta=1.0, noise=Z, generator=gen(0)),
     ValueError, "noise"),
    ("fam-sigma-zero", lambda o: o.euler_step(X, EPS, 0.0, 0.0), ValueError, "sigma"),
    ("fam-sigma_next-zero-heun", lambda o: o.heun_step(X, EPS, Z, EPS, 1.0, 0.0), ValueError, "sigma_next"),
    ("fam-sigma-nan-dpm", lambda o: o.dpmpp_2m_step(X, EPS, None, float("nan"), 0.5), ValueError, "sigma"),
    ("fam-eta-negative", lambda o: o.euler_step(X, EPS, 1.0, 0.5, eta=-0.5), ValueError, "eta"),
    ("fam-sigma-above-one-flow_q", lambda o: o.flow_q_sample(X, 1.5, Z), ValueError, "sigma"),
    ("fam-t-too-big-lcm", lambda o: o.lcm_step(X, EPS, 1000, 500), ValueError, "t"),
    ("fam-t_prev-not-below-t-lcm", lambda o: o.lcm_step(X, EPS, 500, 500), ValueError, "t_prev"),
    ("fam-sigma_prev-missing", lambda o: o.dpmpp_2m_step(X, EPS, EPS, 1.0, 0.5), ValueError, "sigma_prev"),
    # wrong layouts: a dim neither 1 nor x's, more dims than x, 1-D of a length neither 1 nor B
    ("lvl-sigma-dim", lambda o: o.euler_step(XV, XV, randn(B, 2, 5, 1, 1, seed=7).abs() + 1, 0.5), ValueError,
     "sigma"),
    ("lvl-sigma-ndim", lambda o: o.euler_step(XV, XV, PF[None], 0.5), ValueError, "sigma"),
    ("lvl-sigma-1d-length", lambda o: o.euler_step(XV, XV, PF.reshape(-1)[:5], 0.5), ValueError, "sigma"),
    ("lvl-sigma_next-dim-flow", lambda o: o.flow_step(XT, XT, 0.5, torch.full((B, 2, 1), 0.2)), ValueError,
     "sigma_next"),
    ("lvl-sigma_next-ndim-heun", lambda o: o.heun_step(XT, XT, XT, XT, PT, PT[None] * 0.5), ValueError,
     "sigma_next"),
    ("lvl-sigma_prev-dim-dpm", lambda o: o.dpmpp_2m_step(XV, XV, XV, PF, PF * 0.5, torch.full((B, 1, 2, 1, 1), 9.0)),
     ValueError, "sigma_prev"),
    ("lvl-sigma-1d-length-flow_q", lambda o: o.flow_q_sample(XT, torch.full((3,), 0.5), XT), ValueError, "sigma"),
    ("lvl-t-dim-lcm", lambda o: o.lcm_step(XV, XV, torch.randint(500, 900, (B, 2, 5, 1, 1)), 100), ValueError, "t"),
    ("lvl-t_prev-ndim-lcm", lambda o: o.lcm_step(XV, XV, TF, (TF - 200)[None]), ValueError, "t_prev"),
    ("lvl-t-ndim-q", lambda o: o.q_sample(XT, torch.randint(1, 999, (1, B, 7, 1)), XT), ValueError, "t"),
    ("lvl-t_prev-dim-ddim", lambda o: o.ddim_step(XV, XV, TF, t_prev=torch.zeros(2, 5, 1, 1, dtype=torch.int64)),
     ValueError, "t_prev"),
    ("lvl-t-1d-length-ddpm", lambda o: o.ddpm_step(XT, XT, torch.tensor([5, 6, 7]), noise=XT), ValueError, "t"),
    # integer or bool levels, float timesteps
    ("lvl-sigma-int", lambda o: o.euler_step(XV, XV, torch.ones(B, 1, 5, 1, 1, dtype=torch.int64), 0.5), TypeError,
     "sigma"),
    ("lvl-sigma-bool-heun", lambda o: o.heun_step(XT, XT, XT, XT, PT > 0, PT), TypeError, "sigma"),
    ("lvl-sigma_next-int-flow", lambda o: o.flow_step(XT, XT, PT * 0.5, torch.zeros(B, 7, 1, dtype=torch.int32)),
     TypeError, "sigma_next"),
    ("lvl-sigma_prev-int-dpm", lambda o: o.dpmpp_2m_step(XV, XV, XV, PF, PF * 0.5, (PF * 2).long()), TypeError,
     "sigma_prev"),
    ("lvl-sigma-int-flow_q", lambda o: o.flow_q_sample(XV, torch.zeros(B, 1, 5, 1, 1, dtype=torch.int64), XV),
     TypeError, "sigma"),
    ("lvl-t-float-lcm", lambda o: o.lcm_step(XV, XV, TF.double(), -1), TypeError, "t"),
    ("lvl-t_prev-float-ddpm", lambda o: o.ddpm_step(XV, XV, TF, t_prev=(TF - 5).float(), noise=XV), TypeError,
     "t_prev"),
    ("lvl-t-bool-q", lambda o: o.q_sample(XV, TF > 500, XV), TypeError, "t"),
    ("lvl-t_prev-bool-lcm", lambda o: o.lcm_step(XV, XV, TF, TF < 0), TypeError, "t_prev"),
    # levels on another device
    ("lvl-sigma-meta", lambda o: o.euler_step(XV, XV, PF.to("meta"), 0.5), ValueError, "sigma"),
    ("lvl-sigma_next-meta-flow", lambda o: o.flow_step(XT, XT, 0.5, (PT * 0.1).to("meta")), ValueError,
     "sigma_next"),
    ("lvl-t-meta-lcm", lambda o: o.lcm_step(XV, XV, TF.to("meta"), -1), ValueError, "t"),
    ("lvl-t-meta-ddim", lambda o: o.ddim_step(XV, XV, TF.to("meta")), ValueError, "t"),
    ("lvl-t_prev-meta-ddpm", lambda o: o.ddpm_step(XT, XT, 500, t_prev=torch.zeros(B, 7, 1, dtype=torch.int64,
                                                                                   device="meta"), noise=XT),
     ValueError, "t_prev"),
    # NaN / negative / inf / out-of-range entries of host levels
    ("lvl-sigma-nan", lambda o: o.euler_step(XV, XV, _poke(PF, float("nan")), 0.5), ValueError, "sigma"),
    ("lvl-sigma-inf-heun", lambda o: o.heun_step(XT, XT, XT, XT, _poke(PT, float("inf")), PT), ValueError, "sigma"),
    ("lvl-sigma-zero-dpm", lambda o: o.dpmpp_2m_step(XV, XV, None, _poke(PF, 0.0), 0.5), ValueError, "sigma"),
    ("lvl-sigma_next-negative", lambda o: o.euler_step(XV, XV, 5.0, _poke(PF, -0.5)), ValueError, "sigma_next"),
    ("lvl-sigma_next-nan-flow", lambda o: o.flow_step(XT, XT, PT * 0.5, _poke(PT * 0.1, float("nan"))), ValueError,
     "sigma_next"),
    ("lvl-sigma-negative-flow_q", lambda o: o.flow_q_sample(XV, _poke(PF * 0.2, -0.1), XV), ValueError, "sigma"),
    ("lvl-sigma-above-one-flow_q", lambda o: o.flow_q_sample(XT, _poke(PT * 0.5, 1.5), XT), ValueError, "sigma"),
    ("lvl-sigma_prev-inf-dpm", lambda o: o.dpmpp_2m_step(XV, XV, XV, PF, PF * 0.5, _poke(PF * 2, float("inf"))),
     ValueError, "sigma_prev"),
    ("lvl-t-negative-lcm", lambda o: o.lcm_step(XV, XV, _poke(TF, -3), -1), ValueError, "t"),
    ("lvl-t-too-big-ddim", lambda o: o.ddim_step(XV, XV, _poke(TF, 1000)), ValueError, "t"),
    ("lvl-t_prev-too-big-ddpm", lambda o: o.ddpm_step(XT, XT, 999, t_prev=_poke(torch.zeros(B, 7, 1,
                                                                                           dtype=torch.int64), 1000),
                                                      noise=XT), ValueError, "t_prev"),
    # orderings violated at one element, in mixed layouts
    ("lvl-ancestral-order", lambda o: o.euler_step(XV, XV, PF, _poke(PF * 0.5, 9.0), eta=1.0), ValueError,
     "sigma_next"),
    ("lvl-ancestral-order-mixed", lambda o: o.euler_step(XV, XV, torch.tensor([1.0, 2.0, 3.0, 4.0]),
                                                         torch.full((B, 1, 5, 1, 1), 1.5), eta=1.0), ValueError,
     "sigma_next"),
    ("lvl-dpm-sigma_prev-order", lambda o: o.dpmpp_2m_step(XV, XV, XV, PF, PF * 0.5, _poke(PF * 2, 1.0)),
     ValueError, "sigma_prev"),
    ("lvl-dpm-sigma_next-order", lambda o: o.dpmpp_2m_step(XT, XT, XT, PT, _poke(PT * 0.5, 2.0), PT * 2),
     ValueError, "sigma_next"),
    ("lvl-t_prev-order-lcm", lambda o: o.lcm_step(XV, XV, TF, _poke(TF - 5, 950)), ValueError, "t_prev"),
    ("lvl-t_prev-order-ddim-mixed", lambda o: o.ddim_step(XV, XV, torch.tensor([100, 900, 500, 700]),
                                                          t_prev=torch.full((B, 1, 5, 1, 1), 150)), ValueError,
     "t_prev"),
    ("lvl-t_prev-order-ddpm-token", lambda o: o.ddpm_step(XT, XT, torch.full((7, 1), 400),
                                                          t_prev=_poke(torch.full((B, 7, 1), 300), 400), noise=XT),
     ValueError, "t_prev"),
]
CASES += FAMILY_CASES


_RANGE_T = r"outside \[0, 1000\)"
_ORDER = r"t_prev must be smaller than t\b"
_LENGTH = r"has \d+ entries but x has batch size 4"
_BROADCAST = r"does not broadcast to x's shape"
_NONNEG = r"finite number >= 0"
_DESCENDING = "strictly descending"
# The words of each ValueError's message that name the bound it violates. The argument's
# name alone is not enough: with the t < T check removed, an out-of-bounds read further on
# raised an unrelated error that still said "t" (issue 26).
BOUNDS = {
    "eps-shape": _BROADCAST, "eps-bigger": _BROADCAST, "noise-shape-ddim": _BROADCAST,
    "noise-shape-ddpm": _BROADCAST, "noise-shape-q": _BROADCAST, "score-shape": _BROADCAST,
    "noise-shape-langevin": _BROADCAST,
    "t-too-big": _RANGE_T, "t-negative": _RANGE_T, "t-tensor-too-big": _RANGE_T, "t-tensor-negative": _RANGE_T,
    "t-small-schedule": r"outside \[0, 10\)",
    "t-wrong-length": _LENGTH, "t-wrong-length-q": _LENGTH, "t-per-sample-wrong-length-ps": _LENGTH,
    "t_prev-wrong-length": _LENGTH,
    "t-2d": _BROADCAST,
    "t_prev-too-big": r"outside \[-1, 1000\)",
    "t_prev-not-below-t": _ORDER, "t_prev-above-t-ps": _ORDER, "t_prev-ps-vs-int-t": _ORDER,
    "eta-negative": _NONNEG, "eta-nan": _NONNEG, "eta-inf": _NONNEG, "eta-tensor-vector": "scalar",
    "step_size-negative": _NONNEG, "step_size-nan": _NONNEG,
    "prediction_type": "v_prediction", "prediction_type-ddpm": "v_prediction", "variance": "fixed_large",
    "clip_sample-negative": _NONNEG, "clip_sample-zero": "> 0",
    "noise-and-generator-ddim": "not both", "noise-and-generator-ddpm": "not both",
    "noise-and-generator-q": "not both", "noise-and-generator-langevin": "not both",
    "sigmas-empty": "empty", "sigmas-empty-tensor": "empty", "gmm-sigmas-empty": "empty",
    "sigmas-ascending": _DESCENDING, "sigmas-repeated": _DESCENDING, "gmm-sigmas-ascending": _DESCENDING,
    "sigmas-negative": "positive",
    "n_steps_each-negative": ">= 1", "gmm-n_steps_each": ">= 1",
    "step_lr-zero": "> 0", "step_lr-negative": ">= 0", "gmm-step_lr": "> 0",
    "gmm-weights-sum": "sum to 1", "gmm-weights-negative": "non-negative",
    "gmm-means-shape": r"\(K, D\) = \(2, 2\)", "gmm-stds-shape": r"\(K, D\) = \(2, 2\)",
    "gmm-stds-nonpositive": "positive", "gmm-sigma-negative": _NONNEG,
}

_FINITE = "finite"
_META = "is on meta"
BOUNDS.update({
    "fam-denoised-shape": _BROADCAST, "fam-x_proposal-shape": _BROADCAST, "fam-old_denoised-shape": _BROADCAST,
    "fam-model_output-shape-lcm": _BROADCAST, "fam-noise-shape-flow_q": _BROADCAST,
    "fam-noise-and-generator-euler": "not both", "fam-sigma-zero": "> 0", "fam-sigma_next-zero-heun": "> 0",
    "fam-sigma-nan-dpm": _FINITE, "fam-eta-negative": _NONNEG, "fam-sigma-above-one-flow_q": "<= 1",
    "fam-t-too-big-lcm": _RANGE_T, "fam-t_prev-not-below-t-lcm": _ORDER, "fam-sigma_prev-missing": "required",
    "lvl-sigma-dim": _BROADCAST, "lvl-sigma-ndim": _BROADCAST, "lvl-sigma-1d-length": _LENGTH,
    "lvl-sigma_next-dim-flow": _BROADCAST, "lvl-sigma_next-ndim-heun": _BROADCAST,
    "lvl-sigma_prev-dim-dpm": _BROADCAST, "lvl-sigma-1d-length-flow_q": _LENGTH, "lvl-t-dim-lcm": _BROADCAST,
    "lvl-t_prev-ndim-lcm": _BROADCAST, "lvl-t-ndim-q": _BROADCAST, "lvl-t_prev-dim-ddim": _BROADCAST,
    "lvl-t-1d-length-ddpm": _LENGTH,
    "lvl-sigma-meta": _META, "lvl-sigma_next-meta-flow": _META, "lvl-t-meta-lcm": _META, "lvl-t-meta-ddim": _META,
    "lvl-t_prev-meta-ddpm": _META,
    "lvl-sigma-nan": _FINITE, "lvl-sigma-inf-heun": _FINITE, "lvl-sigma-zero-dpm": "> 0",
    "lvl-sigma_next-negative": ">= 0", "lvl-sigma_next-nan-flow": _FINITE, "lvl-sigma-negative-flow_q": ">= 0",
    "lvl-sigma-above-one-flow_q": "<= 1", "lvl-sigma_prev-inf-dpm": _FINITE,
    "lvl-t-negative-lcm": _RANGE_T, "lvl-t-too-big-ddim": _RANGE_T,
    # the Python check of a t_prev tensor names [0, 1000) (its int check and C++ say [-1, 1000))
    "lvl-t_prev-too-big-ddpm": r"outside \[(0|-1), 1000\)",
    "lvl-ancestral-order": "sigma_next must be <= sigma", "lvl-ancestral-order-mixed": "sigma_next must be <= sigma",
    "lvl-dpm-sigma_prev-order": "sigma_prev must be > sigma", "lvl-dpm-sigma_next-order": "sigma_next must be < sigma",
    "lvl-t_prev-order-lcm": _ORDER, "lvl-t_prev-order-ddim-mixed": _ORDER, "lvl-t_prev-order-ddpm-token": _ORDER,
})


def test_every_value_error_row_names_its_bound():
    assert {i for i, _, e, _ in CASES if e is ValueError} == set(BOUNDS)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ident,f,exc,match,bound",
                         [pytest.param(i, f, e, m, BOUNDS.get(i), id=i) for i, f, e, m in CASES])
def test_bad_input_raises(impl, ident, f, exc, match, bound):
    """The message names the argument as a word (``t`` is not matched by ``t_prev``) and,
    for a ValueError, the bound the value violates. Every path checks: the raw ops too
    (csrc/torch/validate.h, sampler_args.h), with the Python checks' messages."""
    name = rf"\b{re.escape(match)}\b"
    _raises(impl, f, exc, name if bound is None else rf"^(?=.*{name})(?=.*{bound})")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("f", [pytest.param(f, id=i) for i, f, _, _ in CASES if i.startswith("noise-and-generator")])
def test_noise_and_generator_message_names_both(impl, f):
    _raises(impl, f, ValueError, r"\bnoise\b.*\bgenerator\b")


def test_mismatch_error_is_both_type_and_value_error():
    """Device mismatches raise ValueError natively; the fallback's MismatchError is one too."""
    assert issubclass(dk.MismatchError, TypeError) and issubclass(dk.MismatchError, ValueError)
    with pytest.raises(ValueError, match="eps"):
        dk.ops.fallback.ddim_step(X, EPS.to("meta"), 5)
    if NATIVE:
        with pytest.raises(ValueError, match="eps"):
            dk.ddim_step(X, EPS.to("meta"), 5)


SCHEDULE_CASES = [
    ("T-zero", lambda: dk.NoiseSchedule.linear(0), ValueError, "num_timesteps"),
    ("T-float", lambda: dk.NoiseSchedule.cosine(10.0), ValueError, "num_timesteps"),
    ("betas-above-1", lambda: dk.NoiseSchedule.from_betas(torch.tensor([0.1, 1.5])), ValueError, "betas"),
    ("betas-empty", lambda: dk.NoiseSchedule.from_betas(torch.tensor([])), ValueError, "betas"),
    ("ac-increasing", lambda: dk.NoiseSchedule.from_alphas_cumprod(torch.tensor([0.9, 0.95])), ValueError,
     "alphas_cumprod"),
    ("ac-above-1", lambda: dk.NoiseSchedule.from_alphas_cumprod(torch.tensor([1.2, 0.5])), ValueError,
     "alphas_cumprod"),
]


@pytest.mark.parametrize("f,exc,match", [pytest.param(f, e, m, id=i) for i, f, e, m in SCHEDULE_CASES])
def test_bad_schedule_raises(f, exc, match):
    with pytest.raises(exc, match=rf"\b{re.escape(match)}\b"):
        f()


@pytest.mark.parametrize("impl", IMPLS[:2])
def test_errors_leave_inputs_untouched(impl):
    """A rejected call does not modify its inputs (no half-written state)."""
    x, eps = X.clone(), EPS.clone()
    with pytest.raises(ValueError):
        impl.ddim_step(x, eps, 5, 0.5, noise=randn(B, 3, 4, seed=9))
    assert torch.equal(x, X) and torch.equal(eps, EPS)


@needs_cuda
@pytest.mark.parametrize("impl", IMPLS)
def test_device_mismatch_raises(impl):
    with pytest.raises(ValueError, match="eps"):
        impl.ddim_step(X, EPS.cuda(), 5)
    with pytest.raises(ValueError, match="noise"):
        impl.ddpm_step(X.cuda(), EPS.cuda(), 5, noise=Z)
    with pytest.raises(ValueError, match=r"\bt is on cuda"):
        impl.q_sample(X, torch.tensor([1, 2, 3, 4], device="cuda"), Z)
    with pytest.raises(ValueError, match="generator"):
        impl.ddpm_step(X, EPS, 5, generator=gen(0, "cuda"))


def test_scalar_tensor_timesteps_match_ints():
    """0-d and one-element CPU tensors take the int path (read once on the host): the same
    step, the same errors."""
    x, e = torch.randn(3, 5, generator=torch.Generator().manual_seed(1)), torch.randn(3, 5)
    want = dk.ddim_step(x, e, 500, 0.0, t_prev=480)
    pairs = ((torch.tensor(500), torch.tensor(480)), (torch.tensor([500]), torch.tensor([480], dtype=torch.int32)))
    for t, tp in pairs:
        assert torch.equal(dk.ddim_step(x, e, t, 0.0, t_prev=tp), want)
    with pytest.raises(ValueError, match="t_prev must be smaller"):
        dk.ddim_step(x, e, torch.tensor(480), 0.0, t_prev=torch.tensor(480))
    with pytest.raises(ValueError, match="outside"):
        dk.ddim_step(x, e, torch.tensor(1000), 0.0)
    with pytest.raises(TypeError):
        dk.ddim_step(x, e, torch.tensor(5.0), 0.0)
    with pytest.raises(TypeError):
        dk.ddim_step(x, e, torch.tensor(True), 0.0)
