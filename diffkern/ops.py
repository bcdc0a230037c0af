"""The public ops: validate once, run the native kernel when it is built for the input's
device, else the pure-PyTorch reference (same numbers, including the drawn noise).

The fake (shape) functions follow at the end, with q_sample's autograd; the step ops'
autograd is C++ (csrc/torch/autograd.cpp), where it costs no Python per call.
"""

from __future__ import annotations

import torch

from . import _rng
from . import _validate as V
from . import reference as R
from ._native import native_available

__all__ = ["q_sample", "ddpm_step", "ddim_step", "langevin_step", "annealed_langevin", "gmm_score",
           "gmm_annealed_langevin"]

_NATIVE = native_available()
_ops = torch.ops.diffkern if _NATIVE else None
if _NATIVE:
    from ._C import cpu_key as _cpu_key


def _use_native(x: torch.Tensor) -> bool:
    return _NATIVE and native_available(x.device)


def _noise_source(x: torch.Tensor, generator, draws: bool):
    """(generator, seed, offset) for a native call. CUDA generators are passed through so
    the kernel reads torch's Philox state (graph-safe); CPU generators are keyed here by
    their next two 64-bit words (_rng.cpu_generator_key), taken in C++ under the
    generator's lock (~0.1 us; a Generator argument through torch.ops costs ~2.5 us)."""
    if not draws:
        return None, 0, 0
    if x.device.type == "cuda" and (generator is None or generator.device.type == "cuda"):
        return (generator if generator is not None else _rng.default_cuda_generator(x.device)), 0, 0
    seed, offset = _cpu_key(generator if generator is not None else torch.default_generator)
    return None, seed, offset


# ---- q_sample ----------------------------------------------------------------------
def q_sample(x0, t, noise=None, *, schedule=None, generator=None, seeds=None, step=None):
    """Noise clean samples to timestep ``t`` (diffusers' ``add_noise``).

    ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise`` with ``ab = schedule.alphas_cumprod``.

    Args:
        x0: (B, ...) float16/bfloat16/float32/float64 tensor, any strides.
        t: int, or int64 tensor of shape () or (B,) (per-sample), on the CPU or x0's device.
        noise: optional tensor broadcastable to x0; drawn in-kernel (Philox) when None.
        schedule: :class:`NoiseSchedule` (default: linear 1e-4..0.02, T = 1000).
        generator: torch.Generator for the drawn noise (CPU or CUDA).
        seeds, step: per-sample keys instead: the noise of sample b is a pure function of
            (seeds[b], step) (README "Reproducible noise"); seeds an int or (B,) int64.

    Returns:
        ``(x_t, noise)``, both of x0's dtype; ``noise`` is the tensor used.
    """
    x0 = V.check_x(x0, "x0")
    noise = _rng.keyed_noise(x0, seeds, step, generator, noise)
    sched = V.check_schedule(schedule)
    tt = V.check_timesteps(t, x0, sched.num_timesteps)
    if noise is not None:
        V.check_like(x0, noise, "noise")
    V.check_generator(generator, x0, noise)
    table = sched.table(x0.device)
    if not _use_native(x0):
        return R._q_sample(x0, tt, table, noise, generator)
    gen, seed, offset = _noise_source(x0, generator, noise is None)
    xt, drawn = _ops.q_sample(x0, tt, table, noise, gen, seed, offset)
    return xt, (noise if noise is not None else drawn)


# ---- ddim_step ---------------------------------------------------------------------
def ddim_step(x, eps, t, eta=0.0, *, t_prev=None, schedule=None, prediction_type="epsilon", clip_sample=None,
              noise=None, generator=None, seeds=None, step=None):
    """One DDIM step (Song et al. 2021, eq. 12) from ``t`` to ``t_prev``.

    ``x' = sqrt(ab') x0 + sqrt(1 - ab' - std^2) eps + std z``, ``std = eta sqrt(var)``,
    ``var = (1-ab')/(1-ab) (1 - ab/ab')``; x0 and eps come from the model output ``eps``
    per ``prediction_type`` (``"epsilon"``, ``"sample"``, ``"v_prediction"``), x0 clamped
    to ``[-clip_sample, clip_sample]`` when given. ``eta=0`` is deterministic (no noise
    drawn); ``eta=1`` with ``t_prev=t-1`` is DDPM with the posterior variance.

    Args:
        x: (B, ...) current sample. eps: model output, x's dtype/device, broadcastable.
        t, t_prev: int or int64 (B,) tensors; ``t_prev`` defaults to ``t - 1``, and
            ``t_prev < 0`` is the final step (``ab' = 1``).
        noise / generator: the z to use, or the generator to draw it from (in-kernel).
        seeds, step: per-sample keys instead of a generator (:func:`q_sample`).

    Returns: ``x_{t_prev}``, x's dtype and shape (contiguous).
    """
    noise = _rng.keyed_noise(V.check_x(x), seeds, step, generator, noise, draws=_rng.nonzero(eta))
    a = R._step_args(x, eps, t, t_prev, schedule, prediction_type, clip_sample, noise, generator)
    eta = V.check_nonneg(eta, "eta")
    if not _use_native(x):
        return R._ddim(x, eps, a, eta, noise, generator)
    gen, seed, offset = _noise_source(x, generator, eta > 0 and noise is None)
    return _ops.ddim_step(x, eps, a.t, a.t_prev_arg, a.table, eta, a.prediction, a.clip or 0.0,
                          noise if eta > 0 else None, gen, seed, offset)


# ---- ddpm_step ---------------------------------------------------------------------
def ddpm_step(x, eps, t, *, t_prev=None, schedule=None, variance="fixed_small", prediction_type="epsilon",
              clip_sample=None, noise=None, generator=None, seeds=None, step=None):
    """One ancestral DDPM step (Ho et al. 2020, Algorithm 2) from ``t`` to ``t_prev``.

    With ``a = ab/ab'``, ``b = 1 - a``: ``mean = sqrt(ab') b/(1-ab) x0 + sqrt(a)(1-ab')/(1-ab) x``
    (for epsilon prediction and ``t_prev = t-1``: ``(x - b/sqrt(1-ab) eps)/sqrt(a)``), plus
    ``std z`` with ``std^2 = max((1-ab')/(1-ab) b, 1e-20)`` (``"fixed_small"``) or ``b``
    (``"fixed_large"``); no noise where ``t == 0``. Arguments as in :func:`ddim_step`.
    """
    noise = _rng.keyed_noise(V.check_x(x), seeds, step, generator, noise)
    a = R._step_args(x, eps, t, t_prev, schedule, prediction_type, clip_sample, noise, generator)
    var = V.check_variance(variance)
    if not _use_native(x):
        return R._ddpm(x, eps, a, var, noise, generator)
    gen, seed, offset = _noise_source(x, generator, noise is None)
    return _ops.ddpm_step(x, eps, a.t, a.t_prev_arg, a.table, var, a.prediction, a.clip or 0.0, noise, gen, seed,
                          offset)


# ---- langevin_step -----------------------------------------------------------------
def langevin_step(x, score, step_size, *, noise=None, generator=None, seeds=None, step=None):
    """One Langevin step ``x + step_size * score + sqrt(2 step_size) z``.

    This is the NCSN *code* convention; the NCSN paper writes ``x + (e/2) s + sqrt(e) z``,
    i.e. its ``e`` is ``2 * step_size`` here. ``seeds``/``step``: per-sample keys
    (:func:`q_sample`)."""
    V.check_x(x)
    noise = _rng.keyed_noise(x, seeds, step, generator, noise)
    V.check_like(x, score, "score")
    step = V.check_nonneg(step_size, "step_size")
    if noise is not None:
        V.check_like(x, noise, "noise")
    V.check_generator(generator, x, noise)
    if not _use_native(x):
        return R._langevin(x, score, step, noise, generator)
    gen, seed, offset = _noise_source(x, generator, noise is None)
    return _ops.langevin_step(x, score, step, noise, gen, seed, offset)


def annealed_langevin(score_fn, x, sigmas, *, n_steps_each=100, step_lr=2e-5, denoise=False, generator=None,
                      callback=None, seeds=None):
    """NCSN annealed Langevin dynamics; ``score_fn(x, sigma)`` is the (learned) score.

    Level ``i`` uses ``alpha_i = step_lr (sigma_i / sigma_L)^2`` for ``n_steps_each`` steps
    of :func:`langevin_step` (fused, in-kernel noise); ``denoise=True`` adds NCSNv2's final
    ``x + sigma_L^2 s(x, sigma_L)``. ``callback(level, step, sigma, x)`` runs after each step.
    Stable for ``step_lr < 2 sigma_L^2``. ``seeds=``: per-sample keys, chain step ``k``
    (counting over all levels from 0) drawing with ``step=k``."""
    return R.annealed_langevin(score_fn, x, sigmas, n_steps_each=n_steps_each, step_lr=step_lr, denoise=denoise,
                               generator=generator, callback=callback, seeds=seeds,
                               _step=lambda x_, s_, a_, k_=None: langevin_step(
                                   x_, s_, a_, generator=generator, seeds=seeds,
                                   step=k_ if seeds is not None else None))


# ---- Gaussian mixtures -------------------------------------------------------------
def gmm_score(x, weights, means, stds, sigma):
    """Exact score of a diagonal Gaussian mixture convolved with ``N(0, sigma^2 I)``;
    see :func:`diffkern.reference.gmm_score`."""
    return R.gmm_score(x, weights, means, stds, sigma)


def gmm_annealed_langevin(x, weights, means, stds, sigmas, *, n_steps_each=100, step_lr=2e-5, denoise=False,
                          generator=None):
    """Annealed Langevin on the exact mixture score with the whole chain fused: every
    point's levels and steps run in registers in one pass (native), drawing the same
    noise as :func:`diffkern.reference.gmm_annealed_langevin` for the same generator.

    ``x``: (..., D) float32/float64 start points; ``weights`` (K,), ``means`` (K, D),
    ``stds`` (K, D) or (K,); ``sigmas`` descending. Native for D <= 16 (and K <= 64 on CUDA)."""
    V.check_x(x)
    mix = V.check_mixture(x, weights, means, stds)
    s = V.check_sigmas(sigmas, x)
    n = V.check_steps(n_steps_each, "n_steps_each")
    lr = V.check_positive(step_lr, "step_lr")
    V.check_generator(generator, x, None)
    D, K = x.shape[-1], mix.weights.numel()
    native = (native_available(x.device) and x.dtype in (torch.float32, torch.float64) and D <= 16
              and (x.device.type == "cpu" or K <= 64))
    if not native:
        seed, offset = _rng.generator_key(generator, x.device)
        return R._gmm_loop(x, mix, s, n, lr, denoise, seed, offset)
    gen, seed, offset = _noise_source(x, generator, True)
    return _ops.gmm_annealed_langevin(x, mix.weights, mix.means, mix.stds, s, n, lr, denoise,
                                      gen, seed, offset)


# ---- fake kernels and autograd -------------------------------------------------------
if _NATIVE:
    def _empty_like_out(x):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    @torch.library.register_fake("diffkern::q_sample")
    def _(x0, t, table, noise, generator, seed, offset):
        return _empty_like_out(x0), (torch.empty(0, dtype=x0.dtype, device=x0.device) if noise is not None
                                     else _empty_like_out(x0))

    @torch.library.register_fake("diffkern::ddim_step")
    def _(x, m, t, t_prev, table, eta, prediction_type, clip, noise, generator, seed, offset):
        return _empty_like_out(x)

    @torch.library.register_fake("diffkern::ddpm_step")
    def _(x, m, t, t_prev, table, variance, prediction_type, clip, noise, generator, seed, offset):
        return _empty_like_out(x)

    @torch.library.register_fake("diffkern::langevin_step")
    def _(x, score, step_size, noise, generator, seed, offset):
        return _empty_like_out(x)

    @torch.library.register_fake("diffkern::step_backward")
    def _(grad, x, m, t, t_prev, table, kind, eta, variance, prediction_type, clip, noise_grad):
        gz = _empty_like_out(x) if noise_grad else torch.empty(0, dtype=x.dtype, device=x.device)
        return _empty_like_out(x), _empty_like_out(x), gz

    @torch.library.register_fake("diffkern::gmm_annealed_langevin")
    def _(x, weights, means, stds, sigmas, n_steps_each, step_lr, denoise, generator, seed, offset):
        return _empty_like_out(x)

    # ddim_step, ddpm_step and langevin_step have C++ autograd kernels
    # (csrc/torch/autograd.cpp): a Python one would cost more than a small step.

    def _q_setup(ctx, inputs, output):
        x0, t, table, noise = inputs[:4]
        ctx.has_noise = noise is not None
        ctx.save_for_backward(t, table)
        ctx.shape = x0.shape

    def _q_backward(ctx, g_xt, g_noise):
        t, table = ctx.saved_tensors
        ab = R._per_sample(R._lookup(table, t, False), g_xt).to(g_xt.dtype)
        gx0 = g_xt * ab.sqrt()
        gn = g_xt * (1 - ab).sqrt() if ctx.has_noise else None
        return gx0, None, None, gn, None, None, None

    torch.library.register_autograd("diffkern::q_sample", _q_backward, setup_context=_q_setup)


