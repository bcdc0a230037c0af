"""The sampler-family ops of today's pipelines: Euler, Euler ancestral, Heun,
DPM-Solver++(2M), flow-matching Euler, flow noising and LCM (CONTRACT.md,
SAMPLER_SEMANTICS.md).

Each function validates once, then runs the native kernel when one is registered for the
op and built for x's device, else the pure-PyTorch reference
(:mod:`diffkern.reference_samplers`, same numbers, same drawn noise).

Conventions shared by every op here:

- Noise levels (``sigma``, ``sigma_next``, ``sigma_prev``; ``t``, ``t_prev`` of lcm_step as
  integer tensors) are broadcast operands, floating tensors on the CPU or on x's device,
  in one of three layouts:

  - a Python number or a 0-d tensor: shared by the batch;
  - a 1-D tensor of length 1 or B = ``x.shape[0]``: per sample, aligned with x's FIRST
    dim. This is not torch's broadcasting, which would align a 1-D tensor with x's last
    dim; write ``(1, N)`` for a level that varies along x's last dim;
  - a tensor with 2 <= ndim <= x.ndim that broadcasts to x's shape torch-style
    (right-aligned, each dim 1 or x's), e.g. per frame ``(B, 1, F, 1, 1)`` of a video
    latent ``(B, C, F, H, W)`` (diffusion forcing) or per token ``(B, N, 1)`` of ``(B, N,
    C)``.

  The levels of one call may mix layouts (a (B,) ``sigma`` beside a per-frame
  ``sigma_next``); each element of the result is the op with that element's levels.
  Range checks (finite, > 0 where the step divides, orderings) hold elementwise and run
  for host values only: a device tensor is never read back, so a GPU loop does not
  stall.
- Dtypes: float16/bfloat16/float32/float64 storage, float32 math (float64 when any
  operand is float64). The model outputs and ``noise`` may differ in dtype from x; the
  result has the promoted dtype of x, the model outputs and the noise where the step
  uses it (as ``x + d * dt + sigma_up * z`` in torch, and as q_sample/ddim_step), so with
  matching dtypes it is x's dtype. A deterministic step ignores ``noise`` and its dtype.
- Shapes: any shape and strides; model outputs and ``noise`` broadcast to x's shape;
  every result has x's shape, x's layout (channels_last / channels_last_3d when x is,
  contiguous otherwise, whatever the other operands' layouts) and storage of its own
  (never an input; flow_q_sample's second value is the caller's noise when given).
- A zero batch (with (0,) levels) gives empty results.
- Noise: ``noise=`` is used exactly as given; otherwise, when the step is stochastic, one
  x-shaped draw of the in-kernel Philox stream keyed by ``generator`` (as the DDPM/DDIM
  ops draw it). An op that draws, draws on every call whatever the sigma values (so the
  generator advances the same way with host or device scalars).
- Differentiable w.r.t. the tensor inputs.

How a call runs: with plain tensors on a device with kernels (the CPU; CUDA in a CUDA
build), eager, nothing traced, the arguments go as given to the extension's eager entry
(csrc/torch/fast_call.cpp), and the op checks everything in C++ (csrc/torch/validate.h
and sampler_args.h: operands, options, level layouts, level values and orderings where
they are on the host; the messages are the Python checks'). lcm_step's timesteps on CUDA
are ddim_step's: ints checked in Python and cached on the device. Elsewhere
(torch.compile, tensor subclasses, no kernel for the device, a level that needs a
gradient) each op is its Python checks (diffkern/_validate.py, the reference's ``_<op>_args``) followed by
the same function of :mod:`diffkern.unchecked`, which runs the native op
(diffkern/_native_samplers.py) when it is built for x's device, else the reference's
private ``_<op>`` (same numbers, same drawn noise).
"""

from __future__ import annotations

from . import _rng
from . import _validate as V
from . import reference_samplers as R
from . import unchecked as U
from .ops import _F, _clip, _cpu_table, _eager, _fast, _float, _keys, _prediction, _t_cpu, _timesteps

_SOLVERS = {"midpoint": 0, "heun": 1}


def _direct(x, m) -> bool:
    """The extension's eager entry applies: plain tensors on a device with kernels (the
    CPU, or CUDA in a CUDA build), nothing traced."""
    return _fast(x, m) or (_eager(x, m) and x.is_cuda and U._native_for(x))

__all__ = ["euler_step", "heun_step", "dpmpp_2m_step", "flow_step", "flow_q_sample", "lcm_step", "linear_step"]

# ---- euler_step ----------------------------------------------------------------------
def euler_step(x, denoised, sigma, sigma_next, *, eta=0.0, s_noise=1.0, gamma=0.0, prediction_type="sample",
               noise=None, generator=None, seeds=None, step=None):
    """One Euler step in k-diffusion's sigma space, from ``sigma`` to ``sigma_next``.

    ``D`` is the denoised sample formed from ``denoised`` (the model output m) per
    ``prediction_type``: ``"sample"`` ``D = m``; ``"epsilon"`` ``D = x - sigma m``;
    ``"v_prediction"`` ``D = m (-sigma/sqrt(sigma^2+1)) + x/(sigma^2+1)``. Then
    ``d = (x - D)/sigma`` and:

    - ``eta == 0, gamma == 0`` (k-diffusion's sample_euler): ``x + d (sigma_next - sigma)``.
      No noise is drawn; ``noise`` is ignored.
    - ``eta > 0`` (sample_euler_ancestral): ``sigma_up = min(sigma_next, eta sqrt(sigma_next^2
      (sigma^2 - sigma_next^2)/sigma^2))``, ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``,
      ``x + d (sigma_down - sigma) + s_noise sigma_up z``, the noise term only where
      ``sigma_next > 0``. Needs ``sigma_next <= sigma``.
    - ``gamma > 0`` (diffusers' EulerDiscreteScheduler churn, after the model ran at
      ``sigma``): ``sigma_hat = sigma (1 + gamma)``, ``x_hat = x + s_noise sqrt(sigma_hat^2 -
      sigma^2) z``, D from (x_hat, m) with ``sigma_hat`` (``"v_prediction"``: with ``sigma``,
      as diffusers), ``x_hat + (x_hat - D)/sigma_hat (sigma_next - sigma_hat)``.
      ``eta`` and ``gamma`` are exclusive.

    Args:
        x: (B, ...) state. denoised: model output, broadcastable to x.
        sigma: > 0, finite. sigma_next: >= 0 (0 is the final step). Numbers or tensors
            shared, per sample (B,) or broadcasting to x (per frame, per token; see the
            module docstring).
        eta, s_noise, gamma: Python numbers >= 0.
        noise / generator: z as given, or drawn (one x-shaped draw when eta > 0 or gamma > 0).

    Returns: the state at ``sigma_next``.
    """
    if _direct(x, denoised):
        r = _F._euler_step(x, denoised, sigma, sigma_next, eta if type(eta) is float else _float(eta, "eta"),
                           s_noise if type(s_noise) is float else _float(s_noise, "s_noise"),
                           gamma if type(gamma) is float else _float(gamma, "gamma"), _prediction(prediction_type),
                           noise, generator, *_keys(x, "x", seeds, step, generator, noise))
        if r is not NotImplemented:
            return r
    gen = _rng.keyed(V.check_x(x), seeds, step, generator, noise)
    a = R._euler_args(x, denoised, sigma, sigma_next, eta, s_noise, gamma, prediction_type, noise, generator)
    return U.euler_step(x, denoised, *a, noise, gen)


# ---- heun_step -----------------------------------------------------------------------
def heun_step(x, denoised, x_proposal, denoised_proposal, sigma, sigma_next, *, prediction_type="sample"):
    """Heun's second stage (k-diffusion's sample_heun; Karras et al. 2022, Alg. 1).

    ``d = (x - D)/sigma`` with D formed from ``denoised`` at ``sigma``;
    ``d' = (x_proposal - D')/sigma_next`` with D' formed from ``denoised_proposal`` at
    ``sigma_next``; ``x + (d + d')/2 (sigma_next - sigma)``. The first stage is
    ``x_proposal = euler_step(x, denoised, sigma, sigma_next)``; in sample_heun with churn
    ``sigma`` is sigma_hat. The last step to sigma 0 is a plain :func:`euler_step`.

    Args: x, x_proposal: (B, ...) states; denoised, denoised_proposal: model outputs
    (``prediction_type`` as in :func:`euler_step`); sigma, sigma_next: > 0, in any layout
    of the module docstring (shared, per sample, broadcasting to x).
    No noise. Returns the state at ``sigma_next``.
    """
    if _direct(x, denoised):
        r = _F._heun_step(x, denoised, x_proposal, denoised_proposal, sigma, sigma_next, _prediction(prediction_type))
        if r is not NotImplemented:
            return r
    a = R._heun_args(x, denoised, x_proposal, denoised_proposal, sigma, sigma_next, prediction_type)
    return U.heun_step(x, denoised, x_proposal, denoised_proposal, *a)


# ---- dpmpp_2m_step -------------------------------------------------------------------
def dpmpp_2m_step(x, denoised, old_denoised, sigma, sigma_next, sigma_prev=None, *, prediction_type="sample",
                  solver_type="midpoint", variance_preserving=False, return_denoised=False):
    """One DPM-Solver++(2M) step (Lu et al. 2022; k-diffusion's sample_dpmpp_2m).

    With ``t = -log sigma``, ``h = t_next - t`` and D the denoised sample formed from
    ``denoised`` (per ``prediction_type``):

    - ``old_denoised`` None (first step): ``x' = (sigma_next/sigma) x - expm1(-h) D``;
    - else ``r = (t - t_prev)/h``, ``t_prev = -log sigma_prev``; ``"midpoint"`` (k-diffusion):
      ``D_d = (1 + 1/(2r)) D - (1/(2r)) old_denoised``, ``x' = (sigma_next/sigma) x -
      expm1(-h) D_d``; ``"heun"`` (diffusers): ``x' = (sigma_next/sigma) x - expm1(-h) D +
      (expm1(-h)/h + 1) (D - old_denoised)/r``;
    - ``sigma_next == 0``: ``x' = D`` exactly.

    ``variance_preserving=True``: x and x' are diffusers' VP state ``x_ve/sqrt(sigma^2+1)``;
    with ``alpha = 1/sqrt(sigma^2+1)``, ``sigma_vp = sigma alpha``, D is ``(x - sigma_vp m)/alpha``
    (epsilon), ``alpha x - sigma_vp m`` (v_prediction) or m (sample), and
    ``x'_vp = x'_ve / sqrt(sigma_next^2+1)`` (DPMSolverMultistepScheduler, dpmsolver++, order 2).

    Args:
        x: (B, ...) state. denoised: model output. old_denoised: the previous step's
            *denoised sample* D (not its raw model output; see ``return_denoised``) or None.
        sigma > 0; sigma_next >= 0; sigma_prev (needed with old_denoised) > sigma; with
            old_denoised also sigma_next < sigma, elementwise. Any layout of the module
            docstring (shared, per sample, broadcasting to x).
        return_denoised: also return D (the next call's ``old_denoised``), promoted dtype.
    No noise. Returns x' or ``(x', D)``.
    """
    solver = _SOLVERS.get(solver_type) if type(solver_type) is str else None
    if solver is not None and _direct(x, denoised):
        r = _F._dpmpp_2m_step(x, denoised, old_denoised, sigma, sigma_next, sigma_prev, _prediction(prediction_type),
                              solver, variance_preserving, return_denoised)
        if r is not NotImplemented:
            return r
    a = R._dpmpp_2m_args(x, denoised, old_denoised, sigma, sigma_next, sigma_prev, prediction_type, solver_type,
                         variance_preserving, return_denoised)
    return U.dpmpp_2m_step(x, denoised, old_denoised, *a)


# ---- flow_step -----------------------------------------------------------------------
def flow_step(x, velocity, sigma, sigma_next, *, stochastic=False, noise=None, generator=None, seeds=None,
              step=None):
    """One flow-matching Euler step on ``x_sigma = (1 - sigma) x0 + sigma z`` with the
    velocity ``v = z - x0`` (diffusers' FlowMatchEulerDiscreteScheduler.step).

    - ``stochastic=False``: ``x + (sigma_next - sigma) v``; no noise.
    - ``stochastic=True`` (``stochastic_sampling=True``): ``x0 = x - sigma v``,
      ``(1 - sigma_next) x0 + sigma_next z``, z drawn (one x-shaped draw) or ``noise``.

    Args: x: (B, ...); velocity: model output, broadcastable; sigma, sigma_next: finite,
    >= 0, shared, per sample or broadcasting to x (module docstring). Returns the state at ``sigma_next``.
    """
    if _direct(x, velocity):
        r = _F._flow_step(x, velocity, sigma, sigma_next, stochastic, noise, generator,
                          *_keys(x, "x", seeds, step, generator, noise))
        if r is not NotImplemented:
            return r
    gen = _rng.keyed(V.check_x(x), seeds, step, generator, noise)
    a = R._flow_args(x, velocity, sigma, sigma_next, stochastic, noise, generator)
    return U.flow_step(x, velocity, *a, noise, gen)


# ---- flow_q_sample -------------------------------------------------------------------
def flow_q_sample(x0, sigma, noise=None, *, generator=None, seeds=None, step=None):
    """Noise clean samples for rectified-flow / flow-matching training (diffusers'
    ``scale_noise``): ``x_sigma = (1 - sigma) x0 + sigma noise``; the velocity target is
    ``noise - x0``.

    Args: x0: (B, ...); sigma: in [0, 1], shared, per sample or broadcasting to x0 (a
    per-frame or per-token training level; module docstring); noise: broadcastable to x0, drawn
    (one x0-shaped draw) when None. Returns ``(x_sigma, noise)``: x_sigma of the promoted
    dtype of x0 and noise (as q_sample), noise the tensor used (drawn: x0's dtype and
    layout).
    """
    if _direct(x0, x0):
        r = _F._flow_q_sample(x0, sigma, noise, generator, *_keys(x0, "x0", seeds, step, generator, noise))
        if r is not NotImplemented:
            return r
    gen = _rng.keyed(V.check_x(x0, "x0"), seeds, step, generator, noise)
    s = R._flow_q_sample_args(x0, sigma, noise, generator)
    return U.flow_q_sample(x0, s, noise, gen)


# ---- lcm_step ------------------------------------------------------------------------
def lcm_step(x, model_output, t, t_prev, *, schedule=None, prediction_type="epsilon", timestep_scaling=10.0,
             sigma_data=0.5, clip_sample=None, noise=None, generator=None, return_denoised=False, seeds=None,
             step=None):
    """One latent-consistency step (Luo et al. 2023; diffusers' LCMScheduler.step) on the
    VP state, from timestep ``t`` to ``t_prev``.

    With ``ab = alphas_cumprod[t]``, ``ab' = alphas_cumprod[t_prev]`` and ``u = t *
    timestep_scaling``: ``c_skip = sigma_data^2/(u^2 + sigma_data^2)``, ``c_out = u/sqrt(u^2
    + sigma_data^2)``; x0 from the model output as DDIM forms it (epsilon ``(x -
    sqrt(1-ab) m)/sqrt(ab)``, sample ``m``, v ``sqrt(ab) x - sqrt(1-ab) m``), clamped to
    ``[-clip_sample, clip_sample]`` if given; ``denoised = c_out x0 + c_skip x``;
    ``x_prev = sqrt(ab') denoised + sqrt(1 - ab') z``, and ``x_prev = denoised`` where
    ``t_prev < 0`` (the final step).

    Args:
        x: (B, ...). model_output: broadcastable to x.
        t, t_prev: int or integer tensors on the CPU or x's device, shared (0-d), per
            sample (B,) or broadcasting to x (per frame, per token; module docstring);
            ``t_prev < t`` elementwise.
        schedule: :class:`NoiseSchedule` (default: linear 1e-4..0.02, T = 1000).
        noise / generator: z as given, or one x-shaped draw per call (also on the final
            step, whose result does not use it).
        return_denoised: also return ``denoised`` (diffusers' ``denoised`` output).
    Returns ``x_prev`` or ``(x_prev, denoised)``.
    """
    if _fast(x, model_output):
        return _F._lcm_step(x, model_output, _t_cpu(t), _t_cpu(t_prev, "t_prev"), _cpu_table(schedule),
                            timestep_scaling if type(timestep_scaling) is float else
                            _float(timestep_scaling, "timestep_scaling"),
                            sigma_data if type(sigma_data) is float else _float(sigma_data, "sigma_data"),
                            _prediction(prediction_type), _clip(clip_sample), noise, generator, return_denoised,
                            *_keys(x, "x", seeds, step, generator, noise))
    if _direct(x, model_output):
        sched = V.check_schedule(schedule)
        pred = _prediction(prediction_type)
        tt, tp = _timesteps(t, t_prev, x, sched, pred)
        return _F._lcm_step(x, model_output, tt, tp, sched.table(x.device),
                            _float(timestep_scaling, "timestep_scaling"), _float(sigma_data, "sigma_data"), pred,
                            _clip(clip_sample), noise, generator, return_denoised,
                            *_keys(x, "x", seeds, step, generator, noise))
    gen = _rng.keyed(V.check_x(x), seeds, step, generator, noise)
    a = R._lcm_args(x, model_output, t, t_prev, schedule, prediction_type, timestep_scaling, sigma_data,
                    clip_sample, noise, generator, return_denoised)
    return U.lcm_step(x, model_output, a.t, a.t_prev, a.table, a.prediction, a.timestep_scaling, a.sigma_data, a.clip,
                      a.return_denoised, noise, gen)


# ---- linear_step ---------------------------------------------------------------------
def linear_step(inputs, coeffs, *, noise_coeffs=None, noise=None, generator=None, seeds=None, step=None):
    """The update of a multistep or multistage solver, fused: K outputs that are linear
    combinations of J inputs and one noise draw, in one pass over memory::

        out[k] = sum_j coeffs[k][j] * inputs[j]  +  noise_coeffs[k] * z

    Every solver of the families here is such a combination once its per-step scalars are
    known: the model output -> denoised conversion (prediction types) is linear in (x, m),
    and DPM-Solver(++) of orders 1-3 (ODE and SDE), UniPC's predictor and corrector,
    PLMS/LMS/iPNDM/DEIS and the stages of DPM2/DPM++ 2S/DPM++ SDE combine x, the model
    output and a short history with coefficients that depend on the noise levels only.
    The samplers (:mod:`diffkern.samplers`) and the diffusers drop-ins form those
    coefficients in float64 on the host, from host sigmas, and call this op once per step.

    Args:
        inputs: 1 to 6 tensors, x first (its shape, batch and device are the output's);
            the others broadcast to x's shape. Any float dtypes: the math is float32
            (float64 if any input or the given noise is float64), outputs have the
            promoted dtype of the inputs and, with noise_coeffs, the given noise.
        coeffs: K rows (1 <= K <= 3) of J = len(inputs) numbers, shared by the batch; or a
            float tensor (K, J) or (B, K, J) (per sample), on x's device (or the CPU).
        noise_coeffs: None (no noise; nothing is drawn), or K numbers / a (K,) or (B, K)
            tensor. A sample whose coefficient is 0 gets no noise term at all (a select,
            not ``0 * z``).
        noise / generator / seeds, step: z as given (broadcastable to x), or one x-shaped
            draw per call of the in-kernel Philox stream keyed by ``generator``, or keyed
            per sample by ``(seeds[b], step)`` (batch-invariant).

    Returns: a tuple of K new tensors (never an input). Differentiable w.r.t. the inputs
    (and, on the reference path, tensor coefficients).
    """
    x0 = inputs[0] if isinstance(inputs, (list, tuple)) and inputs else inputs
    gen = _rng.keyed(V.check_x(x0, "inputs[0]"), seeds, step, generator, noise)
    c, cn, K = R._linear_args(inputs, coeffs, noise_coeffs, noise, generator)
    inputs = list(inputs)
    return U.linear_step(inputs, c, cn, noise, gen)
