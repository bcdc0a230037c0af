"""Bad input -> a clear ValueError / TypeError naming the argument, never a crash or a
silently wrong result. Every row runs against the public ops and the reference."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import NATIVE, gen, needs_cuda, randn

import diffkern as dk

IMPLS = [
    pytest.param(dk.reference, id="reference"),
    pytest.param(dk, id="public", marks=pytest.mark.skipif(not NATIVE, reason="native ops not built")),
]

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
    # dtype mixes
    ("eps-dtype", lambda o: o.ddim_step(X, EPS.double(), 5), dk.MismatchError, "eps"),
    ("eps-half", lambda o: o.ddpm_step(X, EPS.half(), 5, noise=Z), dk.MismatchError, "eps"),
    ("noise-dtype", lambda o: o.ddim_step(X, EPS, 5, 0.5, noise=Z.double()), dk.MismatchError, "noise"),
    ("noise-dtype-q", lambda o: o.q_sample(X.double(), 5, Z), dk.MismatchError, "noise"),
    ("score-dtype", lambda o: o.langevin_step(X, EPS.bfloat16(), 0.1), dk.MismatchError, "score"),
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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("f,exc,match", [pytest.param(f, e, m, id=i) for i, f, e, m in CASES])
def test_bad_input_raises(impl, f, exc, match):
    """The message names the argument as a word (``t`` is not matched by ``t_prev``)."""
    with pytest.raises(exc, match=rf"\b{re.escape(match)}\b"):
        f(impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("f", [pytest.param(f, id=i) for i, f, _, _ in CASES if i.startswith("noise-and-generator")])
def test_noise_and_generator_message_names_both(impl, f):
    with pytest.raises(ValueError, match=r"\bnoise\b") as info:
        f(impl)
    assert re.search(r"\bgenerator\b", str(info.value))


def test_mismatch_error_is_both_type_and_value_error():
    assert issubclass(dk.MismatchError, TypeError) and issubclass(dk.MismatchError, ValueError)
    with pytest.raises(TypeError, match="eps"):
        dk.ddim_step(X, EPS.double(), 5)
    with pytest.raises(ValueError, match="eps"):
        dk.ddim_step(X, EPS.double(), 5)


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


@pytest.mark.parametrize("impl", IMPLS)
def test_errors_leave_inputs_untouched(impl):
    """A rejected call does not modify its inputs (no half-written state)."""
    x, eps = X.clone(), EPS.clone()
    with pytest.raises(ValueError):
        impl.ddim_step(x, eps, 5, 0.5, noise=randn(B, 3, 4, seed=9))
    assert torch.equal(x, X) and torch.equal(eps, EPS)


@needs_cuda
@pytest.mark.parametrize("impl", IMPLS)
def test_device_mismatch_raises(impl):
    with pytest.raises(dk.MismatchError, match="eps"):
        impl.ddim_step(X, EPS.cuda(), 5)
    with pytest.raises(dk.MismatchError, match="noise"):
        impl.ddpm_step(X.cuda(), EPS.cuda(), 5, noise=Z)
    with pytest.raises(dk.MismatchError, match="t"):
        impl.q_sample(X, torch.tensor([1, 2, 3, 4], device="cuda"), Z)
    with pytest.raises(dk.MismatchError, match="generator"):
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
