"""What every fused scheduler shares: the constructor hook that checks the config, the
per-device tables prepared in ``set_timesteps``, finding the step index without reading a
tensor, noise arguments, and the calls into the fused ops.

The ops are called below their public wrappers (``torch.ops.diffkern.*`` or the
reference), with arguments validated once in ``set_timesteps``: the public wrappers
check CPU-resident timesteps on the host on every call (``int(t)``, ``aminmax``), which
is a host read per step, and their argument checks cost more host time than the step
itself at small sizes.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import numbers
import sys

import torch
from diffusers.utils.torch_utils import randn_tensor

from ... import _rng
from ... import _validate as V
from ... import unchecked as U

__all__ = ["FusedSchedulerMixin", "promote", "unsupported", "output", "NOISE_MODES"]

# Where a step's noise comes from (README "Noise"):
# - "stock": the numbers stock draws, from stock's own randn_tensor call (same seed, same
#   image), handed to the fused step as its noise operand;
# - "kernel": drawn inside the fused step from the generator (diffkern._rng's Philox
#   keying): no separate randn pass, but other numbers than stock's;
# - "keyed": each sample's noise a pure function of (its seed, the draw count), so an
#   image does not depend on the batch it was made in.
NOISE_MODES = ("stock", "kernel", "keyed")
_NOISE_KWARGS = ("dk_noise", "dk_seeds")


def compiling() -> bool:
    return V._compiling()


def unsupported(sched, option: str, value, why: str):
    """The NotImplementedError every fused class raises for a config value it cannot
    reproduce: it names the option and points at the stock class."""
    stock = type(sched)._dk_stock.__name__
    return NotImplementedError(
        f"{type(sched).__name__} does not support {option}={value!r} ({why}); use diffusers' {stock} for it")


class _State:
    """Device tensors for one device, built once per ``set_timesteps``."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _device_key(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def const_tensor(values, device, dtype) -> torch.Tensor:
    """A tensor made outside inference mode (a cached inference tensor could not be saved
    for backward by a later differentiable call)."""
    with torch.inference_mode(False):
        return torch.as_tensor(values, dtype=dtype).to(device)


def per_step(values: torch.Tensor) -> list[torch.Tensor]:
    """A (1,) view per entry: what a step hands the kernel, with no tensor op per step."""
    return [values[i:i + 1] for i in range(values.shape[0])]


class FusedSchedulerMixin:
    """Mixed in before the stock class: ``class FusedX(FusedSchedulerMixin, X)``.

    Subclasses implement ``_dk_check_config()`` (raise :func:`unsupported`) and
    ``_dk_build(device) -> _State``; set_timesteps calls ``_dk_reset()``."""

    _dk_stock: type

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        stock = next((b for b in cls.__mro__[1:] if b.__module__.startswith("diffusers.")), None)
        if stock is None:  # another mixin
            return
        cls._dk_stock = stock
        stock_init = stock.__init__

        # functools.wraps keeps the stock signature visible (inspect follows __wrapped__):
        # ConfigMixin reads the config keys from it.
        @functools.wraps(stock_init)
        def __init__(self, *args, dk_noise: str = "stock", dk_seeds=None, **kw):
            # The noise options stay out of stock's __init__, so register_to_config never
            # sees them: the saved config is stock's.
            stock_init(self, *args, **kw)
            self._dk_states = {}
            self.set_noise_mode(dk_noise, dk_seeds)
            self._dk_check_config()

        cls.__init__ = __init__

        if "set_timesteps" not in cls.__dict__:
            stock_set = stock.set_timesteps

            # wraps: pipelines read set_timesteps' signature (retrieve_timesteps checks for
            # `timesteps` / `sigmas` parameters).
            @functools.wraps(stock_set)
            def set_timesteps(self, *args, **kw):
                out = stock_set(self, *args, **kw)
                self._dk_reset(prebuild=(self.timesteps.device,))
                return out

            cls.set_timesteps = set_timesteps

    # ---- config ---------------------------------------------------------------------
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Stock's from_config; also takes ``dk_noise=`` / ``dk_seeds=`` (stock's would drop
        them: they are not in the signature it reads)."""
        noise = {k: kwargs.pop(k) for k in _NOISE_KWARGS if k in kwargs}
        out = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        if noise:
            (out[0] if return_unused_kwargs else out).set_noise_mode(**noise)
        return out

    def set_noise_mode(self, dk_noise: str = "stock", dk_seeds=None) -> None:
        """Where the steps' noise comes from (see NOISE_MODES): ``"stock"`` (default, the
        numbers stock draws for the same generator), ``"kernel"`` (drawn in the fused step)
        or ``"keyed"`` with ``dk_seeds`` (an int or one int64 per sample; the generator
        argument is then ignored). Not part of the config."""
        if dk_noise not in NOISE_MODES:
            raise ValueError(f"dk_noise must be one of {', '.join(NOISE_MODES)}, got {dk_noise!r}")
        if (dk_noise == "keyed") != (dk_seeds is not None):
            raise ValueError("dk_seeds= goes with dk_noise='keyed' (and it needs them)")
        if dk_seeds is not None:
            _rng.check_seeds(dk_seeds, 1 if isinstance(dk_seeds, int) else int(dk_seeds.shape[0]),
                             torch.device("cpu") if isinstance(dk_seeds, int) else dk_seeds.device)
        self._dk_noise, self._dk_seeds, self._dk_draws = dk_noise, dk_seeds, 0

    @property
    def noise_mode(self) -> str:
        return self.__dict__.get("_dk_noise", "stock")

    @classmethod
    def _get_compatibles(cls):
        # stock's list (stock looks its own name up in diffusers, which has no Fused* names)
        return cls._dk_stock._get_compatibles()

    def to_json_string(self) -> str:
        # The stock class name, so a saved config (and a pipeline saved with a fused
        # scheduler) loads with plain diffusers.
        d = json.loads(super().to_json_string())
        d["_class_name"] = type(self)._dk_stock.__name__
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    def _dk_check_config(self) -> None:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def _dk_build(self, device: torch.device) -> _State:  # pragma: no cover
        raise NotImplementedError

    # ---- per-device state -------------------------------------------------------------
    def _dk_reset(self, prebuild=()) -> None:
        """Forget the tables (the schedule changed) and build them for ``prebuild``
        devices now, so that a compiled step finds them ready."""
        self._dk_check_config()
        self._dk_states = {}
        self._dk_draws = 0  # keyed noise: draw k of a loop is keyed by k
        for d in prebuild:
            if d is not None:
                self._dk_state(d)

    def _dk_state(self, device) -> _State:
        states = self.__dict__.get("_dk_states")
        if states is None:
            states = self._dk_states = {}
        st = states.get(device)
        if st is not None and st.timesteps is not self.timesteps:
            # timesteps replaced after set_timesteps: positions (and tables) are rebuilt
            states.clear()
            st = None
        if st is None:
            key = _device_key(device)
            st = states.get(key)
            if st is None:
                st = self._dk_build(key)
                st.finals = {1: const_tensor([-1], key, torch.int64)}  # ready for a compiled step
                st.timesteps = self.timesteps
                states[key] = st
            states[device] = st
        return st

    def _dk_index_of(self, timestep) -> int | None:
        """The position of ``timestep`` in ``self.timesteps`` when it is one of its elements
        (``for t in scheduler.timesteps`` yields views), read from the view's storage
        offset: no read of the value, so no host sync. None for any other tensor."""
        if not isinstance(timestep, torch.Tensor) or timestep.dim() != 0 or compiling():
            return None
        ts = self.timesteps
        base = timestep._base
        if base is None or not isinstance(ts, torch.Tensor) or ts.dim() != 1 or not (base is ts or base is ts._base):
            return None
        d = timestep.storage_offset() - ts.storage_offset()
        st = ts.stride(0)
        if st <= 0 or d % st:
            return None
        i = d // st
        return i if 0 <= i < ts.shape[0] else None


# ---- outputs --------------------------------------------------------------------------
_odict_new = collections.OrderedDict.__new__
_odict_set = collections.OrderedDict.__setitem__
_attr_set = object.__setattr__
_FIELDS: dict = {}


def output(cls, *values):
    """``cls(*values)`` for one of diffusers' output dataclasses (``BaseOutput``), built
    as its constructor leaves it: every field an attribute (missing ones at their
    defaults), the non-None ones also dict entries in field order. The generated
    ``__init__`` and ``BaseOutput.__post_init__`` (``dataclasses.fields``, a getattr per
    field) cost 2-3 us a step, as much as a whole fused step at small sizes. The first
    field is always a tensor here (``__post_init__``'s dict-unpacking case never applies).
    Under torch.compile the constructor itself runs: dynamo traces it, not the
    OrderedDict internals (a graph break)."""
    if compiling():
        return cls(*values)
    spec = _FIELDS.get(cls)
    if spec is None:
        spec = _FIELDS[cls] = tuple((f.name, f.default) for f in dataclasses.fields(cls))
    o = _odict_new(cls)
    n = len(values)
    for k, (name, default) in enumerate(spec):
        v = values[k] if k < n else default
        if v is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__} needs {name}")
        _attr_set(o, name, v)
        if v is not None:
            _odict_set(o, name, v)
    return o


# ---- arguments ------------------------------------------------------------------------
def promote(sample: torch.Tensor, model_output: torch.Tensor):
    """Both operands in the dtype torch's promotion gives them (an fp16 model output with
    fp32 latents is computed and returned in fp32, as stock returns it)."""
    if not isinstance(sample, torch.Tensor) or not isinstance(model_output, torch.Tensor):
        raise TypeError("sample and model_output must be tensors")
    if sample.dtype == model_output.dtype:
        return sample, model_output
    dt = torch.promote_types(sample.dtype, model_output.dtype)
    return sample.to(dt), model_output.to(dt)


def int_timestep(timestep) -> int | None:
    if isinstance(timestep, bool):
        return None
    if isinstance(timestep, numbers.Integral):
        return int(timestep)
    return None


def timestep_tensor(timestep, x: torch.Tensor) -> torch.Tensor:
    """An integer timestep tensor (0-d, (1,) or (B,)) -> (1,) or (B,) int64 on x's device,
    without reading it on the host."""
    if not isinstance(timestep, torch.Tensor):
        raise TypeError(f"timestep must be an int or a tensor, got {type(timestep).__name__}")
    if timestep.dim() > 1 or (timestep.dim() == 1 and timestep.numel() not in (1, x.shape[0])):
        raise ValueError(f"timestep must be a scalar or hold one entry per sample ({x.shape[0]}), "
                         f"got shape {tuple(timestep.shape)}")
    t = timestep.reshape(-1)
    if t.dtype != torch.int64:
        t = t.to(torch.int64)
    if t.device != x.device:
        t = t.to(x.device, non_blocking=True)
    return t


def noise_args(x: torch.Tensor, generator, variance_noise, draws: bool):
    """(noise, generator) for a step that draws when ``draws``: ``variance_noise`` as given
    (stock DDIM / DPM-Solver semantics: not together with a generator), a generator list
    drawn with diffusers' randn_tensor (one generator per sample, as stock), else the
    generator for the in-kernel draw."""
    if not draws:
        return None, None
    if variance_noise is not None:
        return _check_variance_noise(x, generator, variance_noise)
    if isinstance(generator, (list, tuple)):
        return randn_tensor(x.shape, generator=list(generator), device=x.device, dtype=x.dtype), None
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
    if generator is not None and generator.device.type == "cuda" and x.device.type != "cuda":
        raise ValueError(f"generator is on {generator.device} but the sample is on {x.device}")
    return None, generator


def _check_variance_noise(x, generator, variance_noise):
    if generator is not None:
        raise ValueError(
            "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
            " `variance_noise` stays `None`.")
    if not isinstance(variance_noise, torch.Tensor):
        raise TypeError(f"variance_noise must be a tensor, got {type(variance_noise).__name__}")
    if tuple(variance_noise.shape) != tuple(x.shape):
        raise ValueError(f"variance_noise has shape {tuple(variance_noise.shape)}, expected {tuple(x.shape)}")
    return variance_noise.to(device=x.device, dtype=x.dtype), None


def step_noise(sched, x: torch.Tensor, generator, variance_noise, draws: bool, *, shape=None, dtype=None,
               tensor: bool = False):
    """(noise, generator) for a fused step, by the scheduler's noise mode.

    ``draws``: whether stock draws at this step. ``shape`` / ``dtype``: those of stock's
    ``randn_tensor`` call (default x's). In "stock" mode the noise is that call itself,
    looked up in stock's module at call time (so a test patching it patches both), with
    stock's shape, dtype, device and generator; a step that stock draws nothing for draws
    nothing (generator and global RNG untouched). In "keyed" mode the per-sample keys go
    to the op as its generator (drawn in the step's own pass, float32 noise), unless the
    caller needs the noise as a ``tensor`` or of another ``shape`` than x's."""
    if not draws:
        return None, None
    mode = sched.noise_mode
    if variance_noise is not None:
        return _check_variance_noise(x, generator, variance_noise)
    if mode == "stock":
        randn = sys.modules[type(sched)._dk_stock.__module__].randn_tensor
        z = randn(tuple(x.shape) if shape is None else shape, generator=generator, device=x.device,
                  dtype=x.dtype if dtype is None else dtype)
        return (z if z.dtype == x.dtype else z.to(x.dtype)), None
    if mode == "keyed":
        k = sched._dk_draws
        sched._dk_draws = k + 1
        if not tensor and (shape is None or tuple(shape) == tuple(x.shape)):
            return None, _rng.keyed(x, sched._dk_seeds, k)
        return _rng.keyed_noise(x, sched._dk_seeds, k), None
    return noise_args(x, generator, None, True)


# ---- compositions of the ops below their checks (diffkern.unchecked) ------------------
def pred_x0(x, m, t, st, prediction, clip, table=None):
    """The predicted x0 (clipped) in one fused pass: a DDIM step with eta = 0 to
    alphas_cumprod' = 1 (t_prev = -1) is exactly ``1 * x0 + 0 * eps``."""
    return U.ddim_step(x, m, t, final_like(st, t), st.table if table is None else table, 0.0, prediction, clip)


def final_like(st, t: torch.Tensor) -> torch.Tensor:
    """t_prev = -1 with t's length (the kernel takes t_prev of t's length), cached."""
    n = t.shape[0]
    finals = st.finals
    f = finals.get(n)
    if f is None:
        f = finals[n] = const_tensor([-1] * n, t.device, torch.int64)
    return f


def denoised(x, m, sigma, prediction, vp=False):
    """The denoised sample D(x, m; sigma) in one fused pass: a DPM++ step to sigma 0 is D exactly."""
    return U.dpmpp_2m_step(x, m, None, sigma, 0.0, None, prediction, "midpoint", vp, False)


# ---- schedulers indexed by a step counter (Euler, Heun, DPM-Solver, flow, LCM) -----------
class IndexedSchedulerMixin(FusedSchedulerMixin):
    """Stock keeps ``_step_index`` (a Python int) and reads sigmas from a CPU table; the
    fused classes read the same index into host lists built in set_timesteps, so a step
    passes Python floats to the kernel. The first step finds its index as stock does
    (``begin_index``, else the timestep's position), from the view's storage offset
    when the timestep is an element of ``self.timesteps`` (no read), else with stock's
    ``index_for_timestep`` (one host read, once per loop).

    A (B,) timestep, and any step under torch.compile, find each sample's position from
    the timestep's value on the device instead (no read, no Python int to specialise on)
    and leave ``step_index`` alone."""

    _dk_first_match_second = True  # stock's index_for_timestep takes the 2nd of several matches

    def _dk_sigma_tables(self, device):
        """sigmas (host list + device tensor), timesteps on the device, and stock's first
        index for the timestep at each position."""
        sig = self.sigmas.detach().to("cpu", torch.float32)
        ts = self.timesteps.detach().to("cpu")
        vals = ts.tolist()
        where: dict = {}
        for i, v in enumerate(vals):
            where.setdefault(v, []).append(i)
        init = []
        for v in vals:
            pos = where[v]
            init.append(pos[1] if len(pos) > 1 and self._dk_first_match_second else pos[0])
        return dict(sig_host=sig.tolist(), sig_dev=const_tensor(sig, device, torch.float32),
                    ts_dev=const_tensor(ts, device, ts.dtype), init_index=init, n=len(vals))

    def _dk_host_index(self, timestep, st) -> int | None:
        """Stock's step index (advancing nothing); None for the device-lookup path."""
        if compiling() or (isinstance(timestep, torch.Tensor) and timestep.dim() > 0 and timestep.numel() > 1):
            return None
        if self._step_index is None:
            if self._begin_index is not None:
                self._step_index = self._begin_index
            else:
                i = self._dk_index_of(timestep)
                if i is not None:
                    self._step_index = st.init_index[i]
                else:
                    self._init_step_index(timestep)  # stock's lookup: one host read
        return self._step_index

    def _dk_positions(self, timestep, x, st, last=False):
        """Each sample's position in ``timesteps`` from the timestep's value, on the device:
        (idx, valid) as (B,) / (1,) tensors; the first match (the last with ``last``)."""
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(timestep)
        t = timestep.reshape(-1)
        if t.device != x.device:
            t = t.to(x.device, non_blocking=True)
        if t.numel() not in (1, x.shape[0]):
            raise ValueError(f"timestep must be a scalar or hold one entry per sample ({x.shape[0]}), "
                             f"got shape {tuple(timestep.shape)}")
        eq = st.ts_dev[None, :] == t.to(st.ts_dev.dtype)[:, None]
        if last:
            idx = (st.n - 1) - eq.flip(1).to(torch.uint8).argmax(1)
        else:
            idx = eq.to(torch.uint8).argmax(1)
        return idx, eq.any(1)

    @staticmethod
    def _dk_take(table: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """table[idx] per sample, NaN where the timestep was not in the schedule (stock
        raises there; a device value is not read back to check)."""
        v = table.index_select(0, idx.clamp(0, table.shape[0] - 1))
        return torch.where(valid, v, torch.full_like(v, float("nan")))
