"""diffkern: fused CPU/CUDA kernels for the elementwise heart of diffusion and score-based
models, with a pure-PyTorch reference for every op.

    import diffkern as dk
    x = dk.ddim_step(x, eps, t, eta=0.0, t_prev=t_prev)

``dk.native_available()`` says whether the compiled kernels run (``dk.native_error()``
says why not); ``DIFFKERN_DISABLE_NATIVE=1`` forces the reference.
"""

from . import reference
from ._native import native_available, native_error
from ._rng import keyed_randn
from ._validate import MismatchError
from .ops import (
    annealed_langevin,
    ddim_step,
    ddpm_step,
    gmm_annealed_langevin,
    gmm_score,
    langevin_step,
    q_sample,
)
from .sampler_ops import dpmpp_2m_step, euler_step, flow_q_sample, flow_step, heun_step, lcm_step, linear_step
from .schedules import NoiseSchedule

__version__ = "0.1.0"


def show_config(file=None) -> None:
    """Prints how diffkern was built and which implementation each op uses on each device
    (also ``python -m diffkern.info``)."""
    from .info import show_config as _show

    _show(file)


_SUBMODULES = ("models", "training", "samplers", "metrics", "data", "distributed")


def __getattr__(name):
    # The library side (models, training loops, samplers, metrics, data) loads on first
    # use, so `import diffkern` stays as cheap as the ops.
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'diffkern' has no attribute {name!r}")

__all__ = [
    "NoiseSchedule", "q_sample", "ddpm_step", "ddim_step", "langevin_step", "annealed_langevin", "gmm_score",
    "gmm_annealed_langevin", "native_available", "native_error", "reference", "MismatchError",
    "show_config",
]
__all__ += ["euler_step", "heun_step", "dpmpp_2m_step", "flow_step", "flow_q_sample", "lcm_step", "linear_step"]
__all__ += ["keyed_randn"]
