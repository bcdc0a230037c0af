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

    @staticmethod
    def annealed_langevin(*args, **kwargs):
        raise NotApplicable("no op")

    @staticmethod
    def gmm_score(*args, **kwargs):
        raise NotApplicable("no op")


IMPLS = [
    pytest.param(dk.ops.fallback, id="fallback"),
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


def test_every_value_error_row_names_its_bound():
    assert {i for i, _, e, _ in CASES if e is ValueError} == set(BOUNDS)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("f,exc,match,bound", [pytest.param(f, e, m, BOUNDS.get(i), id=i) for i, f, e, m in CASES])
def test_bad_input_raises(impl, f, exc, match, bound):
    """The message names the argument as a word (``t`` is not matched by ``t_prev``) and,
    for a ValueError, the bound the value violates."""
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
