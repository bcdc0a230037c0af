"""Sampling loops built on the public ops: DDPM, DDIM (any number of steps, any eta, and
truncated chains started from ``x_start`` at ``t_start``), deterministic score ascent,
plain Langevin and annealed Langevin.

Every loop takes ``generator=`` (the same generator and inputs give the same samples; a
CPU generator works for samples on any device) and ``progress=`` (a tqdm bar). Timesteps
are passed to the ops as int64 tensors on the sample's device, so on a GPU the loops
never wait on the host. The loops run under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch

from . import _rng
from .ops import annealed_langevin as _annealed_langevin
from .ops import ddim_step, ddpm_step, langevin_step, q_sample
from .schedules import NoiseSchedule

__all__ = ["timesteps", "ddpm_sample", "ddim_sample", "score_ascent", "langevin", "annealed_langevin"]


def _progress(iterable, *, total, desc, enabled):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _randn(shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    gen_dev = generator.device if generator is not None else torch.device(device)
    return torch.randn(shape, generator=generator, device=gen_dev, dtype=dtype).to(device)


def timesteps(n_steps: int, num_timesteps: int = 1000, spacing: str = "leading") -> list[int]:
    """The descending timesteps a sampler visits, as diffusers spaces them.

    - ``"leading"`` (diffusers' DDIM default): ``[0, k, 2k, ...]`` with ``k = T // n_steps``, reversed;
    - ``"trailing"``: ``round(arange(T, 0, -T / n_steps)) - 1`` (starts at ``T - 1``);
    - ``"linspace"``: ``round(linspace(0, T - 1, n_steps))`` reversed.

    Each step goes from ``ts[i]`` to ``ts[i + 1]`` and the last one to ``-1`` (the
    ``alphas_cumprod_prev = 1`` convention), given to the ops as an explicit ``t_prev``.
    """
    T = int(num_timesteps)
    if not 1 <= n_steps <= T:
        raise ValueError(f"n_steps must be in [1, {T}], got {n_steps}")
    if spacing == "leading":
        ts = [i * (T // n_steps) for i in range(n_steps)][::-1]
    elif spacing == "trailing":
        ts = [int(round(T - i * T / n_steps)) - 1 for i in range(n_steps)]
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, n_steps, dtype=torch.float64).round().long().tolist()[::-1]
    else:
        raise ValueError(f"spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}")
    if len(set(ts)) != len(ts):
        raise ValueError(f"{n_steps} steps with {spacing!r} spacing repeat a timestep")
    return ts


def _model_eps(model, x, t, labels):
    return model(x, t) if labels is None else model(x, t, labels)


def _truncate(ts, sched, x_T, x_start, t_start, start_noise, start_kw, device):
    """ES-DDPM / SDEdit start: ``x_start`` noised to ``t_start`` by :func:`diffkern.q_sample`
    (``start_noise`` or noise from ``generator``); the chain then runs ``t_start`` followed by
    the schedule's timesteps below it, so ``t_start`` on the schedule keeps its tail as is
    and all-steps DDPM visits ``t_start, t_start - 1, ..., 0``."""
    if x_start is None:
        if t_start is not None or start_noise is not None:
            raise ValueError("t_start and start_noise need x_start")
        return ts, None
    if x_T is not None:
        raise ValueError("give x_T or x_start, not both")
    if t_start is None:
        raise ValueError("x_start needs t_start")
    t_start = int(t_start)
    if not 0 <= t_start < sched.num_timesteps:
        raise ValueError(f"t_start must be in [0, {sched.num_timesteps}), got {t_start}")
    x_start = x_start.to(device)
    if start_noise is None:
        x, _ = q_sample(x_start, t_start, schedule=sched, **start_kw)
    else:
        x, _ = q_sample(x_start, t_start, start_noise.to(device), schedule=sched)
    return [t_start] + [t for t in ts if t < t_start], x


def _step_loop(step, model, shape, *, n_steps, spacing, schedule, labels, x_T, generator, device, progress, desc,
               return_intermediates, x_start=None, t_start=None, start_noise=None, seeds=None, **step_kwargs):
    sched = schedule or NoiseSchedule.linear()
    ts = timesteps(n_steps, sched.num_timesteps, spacing)
    if seeds is not None and generator is not None:
        raise ValueError("pass either seeds or generator, not both")
    # x_T (or the truncated chain's start noise) of sample b from (seeds[b], X_T_STEP)
    start_kw = {"generator": generator} if seeds is None else {"seeds": seeds, "step": _rng.X_T_STEP}
    ts, x = _truncate(ts, sched, x_T, x_start, t_start, start_noise, start_kw, device)
    if x is None:
        if x_T is not None:
            x = x_T.to(device)
        elif seeds is not None:
            x = _rng.keyed_randn(seeds, shape, step=_rng.X_T_STEP, device=device)
        else:
            x = _randn(shape, generator, device)
    noise_kw = {"generator": generator} if seeds is None else {"seeds": seeds}
    B = x.shape[0]
    # One contiguous (B,) row of timesteps per step, made once on x's device.
    t_all = torch.tensor(ts + [-1], dtype=torch.int64, device=x.device)[:, None].repeat(1, B)
    intermediates = []
    with torch.no_grad():
        for i in _progress(range(len(ts)), total=len(ts), desc=desc, enabled=progress):
            t, t_prev = t_all[i], t_all[i + 1]
            eps = _model_eps(model, x, t, labels)
            if seeds is not None:
                noise_kw["step"] = i  # step i of the loop draws with step=i
            x = step(x, eps.to(x.dtype), t, t_prev=t_prev, schedule=sched, **noise_kw, **step_kwargs)
            if return_intermediates:
                intermediates.append(x)
    return (x, intermediates) if return_intermediates else x


def ddpm_sample(model, shape, *, n_steps: int | None = None, spacing: str = "leading", schedule=None, labels=None,
                variance: str = "fixed_small", clip_sample: float | None = None, x_T: torch.Tensor | None = None,
                x_start: torch.Tensor | None = None, t_start: int | None = None,
                start_noise: torch.Tensor | None = None, generator: torch.Generator | None = None, device=None,
                progress: bool = False, return_intermediates: bool = False, seeds=None):
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) with :func:`diffkern.ddpm_step`.

    ``model(x, t[, labels]) -> eps``. ``n_steps=None`` visits all ``T`` timesteps (1000
    for the default schedule); fewer steps jump ``t -> t_prev`` with the effective beta of
    the jump. Starts from ``x_T`` or N(0, I) of ``shape`` drawn from ``generator``.

    Truncated chain (ES-DDPM, Lyu et al. 2022; SDEdit, Meng et al. 2022): with ``x_start``
    (samples of another generator, or images to edit) and ``t_start``, the chain starts
    from ``q_sample(x_start, t_start, start_noise)`` and visits ``t_start`` and then the
    schedule's timesteps below it (``t_start + 1`` steps with all timesteps). ``shape`` may
    be None.
    ``seeds=`` (int or (B,) int64) instead of a generator: sample ``b`` is a pure function
    of ``seeds[b]`` (x_T from ``keyed_randn(seeds, shape, step=X_T_STEP)``, loop step ``i``
    drawing with ``step=i``), whatever the batch it runs in; sample k of a large run can be
    regenerated alone with ``seeds=[k]``.
    Returns the samples (and the list of every step's x if ``return_intermediates``)."""
    sched = schedule or NoiseSchedule.linear()
    given = x_T if x_T is not None else x_start
    device = device or (given.device if given is not None else next(model.parameters()).device)
    return _step_loop(ddpm_step, model, shape, n_steps=n_steps or sched.num_timesteps, spacing=spacing,
                      schedule=sched, labels=labels, x_T=x_T, generator=generator, device=device, progress=progress,
                      desc="ddpm", return_intermediates=return_intermediates, x_start=x_start, t_start=t_start,
                      start_noise=start_noise, variance=variance, clip_sample=clip_sample, seeds=seeds)


def ddim_sample(model, shape, *, n_steps: int = 50, eta: float = 0.0, spacing: str = "leading", schedule=None,
                labels=None, clip_sample: float | None = None, x_T: torch.Tensor | None = None,
                x_start: torch.Tensor | None = None, t_start: int | None = None,
                start_noise: torch.Tensor | None = None, generator: torch.Generator | None = None, device=None,
                progress: bool = False, return_intermediates: bool = False, seeds=None):
    """DDIM sampling (Song et al. 2021) with :func:`diffkern.ddim_step` over ``n_steps``
    timesteps chosen by ``spacing`` (see :func:`timesteps`), each step given its explicit
    ``t_prev``. ``eta=0`` is deterministic given ``x_T``; ``eta=1`` adds the DDPM
    posterior noise. ``x_start``/``t_start``: a truncated chain, as in :func:`ddpm_sample`
    (the steps are those of the ``n_steps`` schedule below ``t_start``, so the step size
    stays that of the full chain). Other arguments as in :func:`ddpm_sample`."""
    given = x_T if x_T is not None else x_start
    device = device or (given.device if given is not None else next(model.parameters()).device)
    sched = schedule or NoiseSchedule.linear()
    return _step_loop(ddim_step, model, shape, n_steps=n_steps, spacing=spacing, schedule=sched, labels=labels,
                      x_T=x_T, generator=generator, device=device, progress=progress, desc=f"ddim{n_steps}",
                      return_intermediates=return_intermediates, x_start=x_start, t_start=t_start,
                      start_noise=start_noise, eta=eta, clip_sample=clip_sample, seeds=seeds)


def score_ascent(score_fn, x: torch.Tensor, sigma: float, *, n_steps: int = 1000, step_size: float = 0.01,
                 progress: bool = False, return_trajectory: bool = False):
    """Deterministic gradient ascent on log p_sigma: ``x <- x + step_size * s(x, sigma)``
    (Langevin without noise: every point climbs to the nearest mode).
    ``return_trajectory`` also returns a (n_steps + 1, *x.shape) tensor of the path."""
    traj = [x]
    with torch.no_grad():
        for _ in _progress(range(n_steps), total=n_steps, desc="ascent", enabled=progress):
            x = x + step_size * score_fn(x, sigma)
            if return_trajectory:
                traj.append(x)
    return (x, torch.stack(traj)) if return_trajectory else x


def langevin(score_fn, x: torch.Tensor, sigma: float, *, n_steps: int = 1000, step_size: float = 0.01,
             generator: torch.Generator | None = None, progress: bool = False, return_trajectory: bool = False):
    """Plain (unadjusted) Langevin dynamics at one noise level with :func:`diffkern.langevin_step`:
    ``x <- x + step_size * s(x, sigma) + sqrt(2 step_size) z`` (NCSN code convention)."""
    traj = [x]
    with torch.no_grad():
        for _ in _progress(range(n_steps), total=n_steps, desc="langevin", enabled=progress):
            x = langevin_step(x, score_fn(x, sigma).to(x.dtype), step_size, generator=generator)
            if return_trajectory:
                traj.append(x)
    return (x, torch.stack(traj)) if return_trajectory else x


def annealed_langevin(score_fn, x: torch.Tensor, sigmas, *, n_steps_each: int = 100, step_lr: float = 2e-5,
                      denoise: bool = False, generator: torch.Generator | None = None, progress: bool = False,
                      return_trajectory: bool = False, trajectory_every: int = 1, seeds=None):
    """NCSN annealed Langevin via :func:`diffkern.annealed_langevin`: level ``i`` runs
    ``n_steps_each`` steps with ``alpha_i = step_lr (sigma_i / sigma_L)^2``. Stable for
    ``step_lr < 2 sigma_L^2``. ``return_trajectory`` also returns every
    ``trajectory_every``-th state, stacked. ``seeds=``: per-sample keys (chain step k draws
    with ``step=k``)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    total = sigmas.numel() * n_steps_each
    traj = [x]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="annealed", leave=False, dynamic_ncols=True)
    count = [0]

    def callback(level, step, sigma, x_):
        count[0] += 1
        if bar is not None:
            bar.update(1)
        if return_trajectory and count[0] % trajectory_every == 0:
            traj.append(x_)

    def score(x_, sigma):
        return score_fn(x_, sigma).to(x_.dtype)

    try:
        with torch.no_grad():
            out = _annealed_langevin(score, x, sigmas, n_steps_each=n_steps_each, step_lr=step_lr, denoise=denoise,
                                     generator=generator, callback=callback, seeds=seeds)
    finally:
        if bar is not None:
            bar.close()
    if return_trajectory:
        if denoise:
            traj.append(out)
        return out, torch.stack(traj)
    return out


# ---- k-diffusion's samplers (k_samplers.py): swap-in for k_diffusion.sampling ----------------
from .k_samplers import (  # noqa: E402
    DiscreteEpsDDPMDenoiser,
    DiscreteSchedule,
    DiscreteVDDPMDenoiser,
    EpsDenoiser,
    VDenoiser,
    append_zero,
    default_noise_sampler,
    get_ancestral_step,
    get_sigmas_exponential,
    get_sigmas_karras,
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_flow_euler,
    sample_heun,
    sample_lcm,
    sample_lms,
    to_d,
)

__all__ += ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpmpp_2m", "sample_flow_euler",
            "sample_lcm", "get_sigmas_karras", "get_sigmas_exponential", "to_d", "get_ancestral_step", "append_zero",
            "default_noise_sampler", "DiscreteSchedule", "EpsDenoiser", "VDenoiser", "DiscreteEpsDDPMDenoiser",
            "DiscreteVDDPMDenoiser", "sample_dpm_2", "sample_dpm_2_ancestral",
            "sample_lms", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m_sde",
            "sample_dpmpp_3m_sde"]

# ---- ComfyUI's multistep samplers (comfy_samplers.py) ----------------------------------------
from .comfy_samplers import (  # noqa: E402
    sample_deis,
    sample_ipndm,
    sample_ipndm_v,
    sample_res_multistep,
    sample_res_multistep_ancestral,
    sample_unipc,
    sample_unipc_bh2,
)

__all__ += ["sample_ipndm", "sample_ipndm_v", "sample_deis", "sample_res_multistep", "sample_res_multistep_ancestral",
            "sample_unipc", "sample_unipc_bh2"]
