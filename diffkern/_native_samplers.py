"""The native side of the sampler-family ops (diffkern.sampler_ops): validated arguments
-> the raw ``torch.ops.diffkern`` ops (csrc/torch/{cpu,cuda}/<op>.cpp over the functors of
csrc/kernels/<op>.h), and the ops' fake kernels for torch.compile / opcheck.
diffkern.unchecked calls these functions (the public ops through it); nothing here
imports either.

Each impl takes the arguments of the reference's private ``_<op>`` function. Levels go
to the kernel as a number, or as a float32/float64 tensor on x's device in one of the
level layouts (per sample, or broadcasting to x: csrc/torch/levels.h) that the kernel
reads per element (no host sync). Operands go in their own dtypes: the op promotes
them (its CPU loop reads each in its own dtype; exact), so the result is the
reference's. An impl returns ``NotImplemented`` where the reference must run: a noise
level that needs a gradient. Noise is keyed as the older ops key it
(``_noise_key``): a CPU generator here (diffkern._rng's rule), a CUDA generator's Philox
state in the kernel (graph-safe), per-sample keys (seeds=, step=) in the kernel's own
pass.
"""

from __future__ import annotations

import torch

from . import _rng
from . import _validate as V
from ._native import native_available

_ops = torch.ops.diffkern if native_available() else None
_LEVEL_DTYPES = (torch.float32, torch.float64)
_SOLVERS = {"midpoint": 0, "heun": 1}


class _Fallback(Exception):
    """This call is one for the reference (see the module docstring)."""


def _level(v):
    """A validated noise level -> (tensor or None, number) as the raw ops take it."""
    if isinstance(v, torch.Tensor):
        if v.requires_grad:
            raise _Fallback
        return (v if v.dtype in _LEVEL_DTYPES else v.to(torch.float64)), 0.0
    return None, float(v)


def _noise_key(x, generator, draws: bool):
    """(generator, seed, offset, seeds, step_t, step) for a raw op: per-sample keys
    (_rng.Keyed) go to the op, drawn in its own pass; CUDA generators go to the op (it
    reads torch's Philox state, graph-safe); CPU ones are keyed here, as the older ops key
    them."""
    if isinstance(generator, _rng.Keyed):
        return (None, 0, 0, *generator.op_args())
    if not draws:
        return None, 0, 0, None, None, 0
    if x.device.type == "cuda" and (generator is None or generator.device.type == "cuda"):
        return (generator if generator is not None else _rng.default_cuda_generator(x.device)), 0, 0, None, None, 0
    seed, offset = _rng.cpu_generator_key(generator)
    return None, _rng._to_int64(seed), _rng._to_int64(offset), None, None, 0


def _native(fn):
    def impl(*args):
        try:
            return fn(*args)
        except _Fallback:
            return NotImplemented
    impl.__name__ = fn.__name__
    impl.__doc__ = fn.__doc__
    return impl


@_native
def euler_step(x, m, sigma, sigma_next, eta, s_noise, gamma, prediction, noise, generator):
    noisy = eta > 0 or gamma > 0
    (st, s), (snt, sn) = _level(sigma), _level(sigma_next)
    key = _noise_key(x, generator, noisy and noise is None)
    return _ops.euler_step(x, m, st, snt, s, sn, eta, s_noise, gamma, prediction, noise, *key)


@_native
def heun_step(x, m, x_proposal, m_proposal, sigma, sigma_next, prediction):
    (st, s), (snt, sn) = _level(sigma), _level(sigma_next)
    return _ops.heun_step(x, m, x_proposal, m_proposal, st, snt, s, sn, prediction)


@_native
def dpmpp_2m_step(x, m, old_denoised, sigma, sigma_next, sigma_prev, prediction, solver_type, variance_preserving,
                  return_denoised):
    (st, s), (snt, sn) = _level(sigma), _level(sigma_next)
    spt, sp = _level(sigma_prev) if sigma_prev is not None else (None, 0.0)
    out, den = _ops.dpmpp_2m_step(x, m, old_denoised, st, snt, spt, s, sn, sp, prediction, _SOLVERS[solver_type],
                                  variance_preserving, return_denoised)
    return (out, den) if return_denoised else out


@_native
def flow_step(x, v, sigma, sigma_next, stochastic, noise, generator):
    (st, s), (snt, sn) = _level(sigma), _level(sigma_next)
    key = _noise_key(x, generator, stochastic and noise is None)
    return _ops.flow_step(x, v, st, snt, s, sn, stochastic, noise, *key)


@_native
def flow_q_sample(x0, sigma, noise, generator):
    st, s = _level(sigma)
    key = _noise_key(x0, generator, noise is None)
    xt, drawn = _ops.flow_q_sample(x0, st, s, noise, *key)
    return xt, (noise if noise is not None else drawn)


@_native
def lcm_step(x, m, a, noise, generator):
    # One draw per call, also on the final step (the reference's generator advances the
    # same way); the kernel skips the noise when every sample is at its final step.
    renoise = not (a.t_prev.device.type == "cpu" and a.t_prev.numel() == 1 and int(a.t_prev) < 0)
    t, tp = a.t, a.t_prev
    gen, seed, offset, *keys = _noise_key(x, generator, noise is None)
    out, den = _ops.lcm_step(x, m, t, tp, a.table, a.timestep_scaling, a.sigma_data, a.prediction,
                             a.clip or 0.0, renoise, noise, gen, seed, offset, a.return_denoised, *keys)
    return (out, den) if a.return_denoised else out


@_native
def linear_step(inputs, c, cn, K, noise, generator):
    if not hasattr(_ops, "linear_step"):  # an extension built before the op existed
        raise _Fallback
    noisy = cn is not None
    x, *rest = inputs
    J = len(inputs)
    if isinstance(c, torch.Tensor) or isinstance(cn, torch.Tensor):
        if (isinstance(c, torch.Tensor) and c.requires_grad) or (isinstance(cn, torch.Tensor) and cn.requires_grad):
            raise _Fallback
        tab = c if isinstance(c, torch.Tensor) else torch.tensor(c, dtype=torch.float64, device=x.device)[None]
        if cn is None:
            ntab = tab.new_zeros((1, K, 1))
        else:
            ntab = cn if isinstance(cn, torch.Tensor) else torch.tensor(cn, dtype=torch.float64, device=x.device)[None]
            ntab = ntab.unsqueeze(-1)
        # 1 broadcasts to B, also to a zero batch's 0 (max() would give 1 there)
        rows = ntab.shape[0] if tab.shape[0] == 1 else tab.shape[0]
        full = torch.cat((tab.expand(rows, K, J), ntab.expand(rows, K, 1)), dim=2).reshape(rows, K * (J + 1))
        flat, table = [], full.contiguous()
    else:
        ncs = cn if cn is not None else (0.0,) * K
        flat, table = [v for k in range(K) for v in (*c[k], ncs[k])], None
    key = _noise_key(x, generator, noisy and noise is None)
    return tuple(_ops.linear_step([x, *rest], flat, table, K, noisy, noise, *key))


if _ops is not None:
    def _empty_like_out(x, *others):
        """An output of x's shape and layout, in the promoted dtype of x and the operands
        the op uses (validate::operands)."""
        dtype = x.dtype
        for t in others:
            if t is not None:
                dtype = torch.promote_types(dtype, t.dtype)
        return torch.empty(x.shape, dtype=dtype, device=x.device).contiguous(memory_format=V.output_format(x))

    def _empty(x):
        return torch.empty(0, dtype=x.dtype, device=x.device)

    def _on_x(x, levels=(), **operands):
        """The device half of the C++ checks (validate::operands; levels.h: a level on the
        CPU or on x's device) for fake tensors: a call mixing meta and real tensors is
        dispatched here, and must fail as it would natively instead of returning an
        uninitialised output. ``levels``: (name, tensor or None) pairs."""
        for name, v in operands.items():
            if v is not None and v.device != x.device:
                raise V.MismatchError(f"{name} is on {v.device} but x is on {x.device}")
        for name, v in levels:
            if v is not None and v.device != x.device and v.device.type != "cpu":
                raise V.MismatchError(f"{name} is on {v.device} but x is on {x.device}")

    @torch.library.register_fake("diffkern::euler_step")
    def _(x, m, st, snt, s, sn, eta, s_noise, gamma, prediction, noise, generator, seed, offset, seeds=None,
          step_t=None, step=0):
        _on_x(x, (("sigma", st), ("sigma_next", snt)), denoised=m, noise=noise)
        return _empty_like_out(x, m, noise if eta > 0 or gamma > 0 else None)

    @torch.library.register_fake("diffkern::heun_step")
    def _(x, m, xp, mp, st, snt, s, sn, prediction):
        _on_x(x, (("sigma", st), ("sigma_next", snt)), denoised=m, x_proposal=xp, denoised_proposal=mp)
        return _empty_like_out(x, m, xp, mp)

    @torch.library.register_fake("diffkern::dpmpp_2m_step")
    def _(x, m, old, st, snt, spt, s, sn, sp, prediction, solver, vp, return_denoised):
        _on_x(x, (("sigma", st), ("sigma_next", snt), ("sigma_prev", spt if old is not None else None)),
              denoised=m, old_denoised=old)
        out = _empty_like_out(x, m, old)
        return out, (torch.empty_like(out) if return_denoised else _empty(x))

    @torch.library.register_fake("diffkern::flow_step")
    def _(x, v, st, snt, s, sn, stochastic, noise, generator, seed, offset, seeds=None, step_t=None, step=0):
        _on_x(x, (("sigma", st), ("sigma_next", snt)), velocity=v, noise=noise)
        return _empty_like_out(x, v, noise if stochastic else None)

    @torch.library.register_fake("diffkern::flow_q_sample")
    def _(x0, st, s, noise, generator, seed, offset, seeds=None, step_t=None, step=0):
        _on_x(x0, (("sigma", st),), noise=noise)
        return _empty_like_out(x0, noise), (_empty(x0) if noise is not None else _empty_like_out(x0))

    @torch.library.register_fake("diffkern::lcm_step")
    def _(x, m, t, t_prev, table, ts, sd, prediction, clip, renoise, noise, generator, seed, offset,
          return_denoised, seeds=None, step_t=None, step=0):
        _on_x(x, (("t", t), ("t_prev", t_prev)), model_output=m, noise=noise)
        out = _empty_like_out(x, m, noise)
        return out, (torch.empty_like(out) if return_denoised else _empty(x))

    if hasattr(_ops, "linear_step"):
        @torch.library.register_fake("diffkern::linear_step")
        def _(inputs, coeffs, coeffs_t, outputs, noisy, noise, generator, seed, offset, seeds=None, step_t=None,
              step=0):
            return [_empty_like_out(*inputs, noise if noisy else None) for _ in range(outputs)]

    @torch.library.register_fake("diffkern::lcm_step_backward")
    def _(grad, grad_den, x, m, t, t_prev, table, ts, sd, prediction, clip):
        return _empty_like_out(grad), _empty_like_out(grad)

    def _jacobian_rows(x, *levels):
        """(*L, 10): L the levels' common shape aligned to x's dims (csrc/torch/levels.h)."""
        shape = [1] * x.dim()
        for v in levels:
            if v is None or v.numel() <= 1:
                continue
            aligned = (v.shape[0], *([1] * (x.dim() - 1))) if v.dim() == 1 else \
                (1,) * (x.dim() - v.dim()) + tuple(v.shape)
            shape = [a if a != 1 else s for s, a in zip(shape, aligned, strict=True)]
        return torch.empty((*shape, 10), dtype=torch.float64, device=x.device)

    @torch.library.register_fake("diffkern::euler_step_jacobian")
    def _(x, st, snt, s, sn, eta, s_noise, gamma, prediction):
        return _jacobian_rows(x, st, snt)

    @torch.library.register_fake("diffkern::heun_step_jacobian")
    def _(x, st, snt, s, sn, prediction):
        return _jacobian_rows(x, st, snt)

    @torch.library.register_fake("diffkern::dpmpp_2m_step_jacobian")
    def _(x, st, snt, spt, s, sn, sp, prediction, solver, vp, has_old):
        return _jacobian_rows(x, st, snt, spt if has_old else None)

    @torch.library.register_fake("diffkern::flow_step_jacobian")
    def _(x, st, snt, s, sn, stochastic):
        return _jacobian_rows(x, st, snt)

    @torch.library.register_fake("diffkern::flow_q_sample_jacobian")
    def _(x0, st, s):
        return _jacobian_rows(x0, st)

    @torch.library.register_fake("diffkern::lcm_step_jacobian")
    def _(x, t, t_prev, table, ts, sd, prediction, renoise):
        return _jacobian_rows(x, t, t_prev)

