"""Noise schedules: the alphas_cumprod table every step op reads.

Tables are built exactly as the ``diffusers`` schedulers build them (float32 result,
``torch.cumprod`` on the CPU accumulates in double), so a diffkern schedule and a
diffusers scheduler with the same config hold bitwise-identical ``alphas_cumprod``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["NoiseSchedule", "default_schedule"]


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    # Lin et al. 2023, Algorithm 1, in the order diffusers computes it.
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sqrt_ab = alphas_cumprod.sqrt()
    first = sqrt_ab[0].clone()
    last = sqrt_ab[-1].clone()
    sqrt_ab -= last
    sqrt_ab *= first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - alphas


class NoiseSchedule:
    """A discrete diffusion schedule of ``num_timesteps`` steps.

    Attributes (float32 CPU tensors of length ``num_timesteps``): ``betas``, ``alphas``
    (``1 - betas``) and ``alphas_cumprod`` (``ab_t = prod_{s<=t} alphas_s``).

    Build one with :meth:`linear` (the DDPM paper's default), :meth:`scaled_linear`,
    :meth:`cosine`, :meth:`from_betas` or :meth:`from_alphas_cumprod`. Every builder
    takes ``rescale_zero_terminal_snr=True`` to shift the table so that
    ``alphas_cumprod[-1] == 0`` (Lin et al. 2023); epsilon-prediction steps at that last
    timestep are then undefined and diffkern raises instead of returning inf/NaN.
    """

    def __init__(self, betas: torch.Tensor | None = None, *, alphas_cumprod: torch.Tensor | None = None):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("NoiseSchedule needs exactly one of betas or alphas_cumprod")
        if betas is not None:
            betas = torch.as_tensor(betas).detach().to("cpu", torch.float32).flatten()
            if betas.numel() == 0:
                raise ValueError("betas must not be empty")
            if not bool(((betas >= 0) & (betas <= 1)).all()):
                raise ValueError("betas must lie in [0, 1]")
            self.betas = betas
            self.alphas = 1.0 - betas
            self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        else:
            ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float32).flatten()
            if ac.numel() == 0:
                raise ValueError("alphas_cumprod must not be empty")
            if not bool(((ac >= 0) & (ac <= 1)).all()):
                raise ValueError("alphas_cumprod must lie in [0, 1]")
            if ac.numel() > 1 and not bool((ac[1:] <= ac[:-1]).all()):
                raise ValueError("alphas_cumprod must be non-increasing")
            self.alphas_cumprod = ac.clone()
            prev = torch.cat([torch.ones(1), ac[:-1]])
            self.alphas = torch.where(prev > 0, ac / prev.clamp_min(1e-38), torch.zeros_like(ac))
            self.betas = 1.0 - self.alphas
        self.num_timesteps = int(self.alphas_cumprod.numel())
        # A plain bool, read on every step: no tensor op (and no graph break under compile).
        self._zero_terminal_snr = bool(self.alphas_cumprod[-1] == 0)
        self._tables: dict[tuple, torch.Tensor] = {}

    # ---- builders ---------------------------------------------------------------
    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, *,
               rescale_zero_terminal_snr: bool = False) -> NoiseSchedule:
        """``betas = linspace(beta_start, beta_end, T)`` (Ho et al. 2020)."""
        betas = torch.linspace(beta_start, beta_end, _check_T(num_timesteps), dtype=torch.float32)
        return cls._build(betas, rescale_zero_terminal_snr)

    @classmethod
    def scaled_linear(cls, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, *,
                      rescale_zero_terminal_snr: bool = False) -> NoiseSchedule:
        """``betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`` (latent diffusion)."""
        T = _check_T(num_timesteps)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
        return cls._build(betas, rescale_zero_terminal_snr)

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999, *,
               rescale_zero_terminal_snr: bool = False) -> NoiseSchedule:
        """Nichol & Dhariwal's ``squaredcos_cap_v2``: ``beta_i = min(1 - f(i+1)/f(i), max_beta)``,
        ``f(u) = cos((u/T + s)/(1 + s) * pi/2) ** 2``, computed in double then stored as float32."""
        T = _check_T(num_timesteps)

        def f(u):
            return math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - f(i + 1) / f(i), max_beta) for i in range(T)], dtype=torch.float32)
        return cls._build(betas, rescale_zero_terminal_snr)

    @classmethod
    def from_betas(cls, betas, *, rescale_zero_terminal_snr: bool = False) -> NoiseSchedule:
        return cls._build(torch.as_tensor(betas, dtype=torch.float32), rescale_zero_terminal_snr)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod, *, rescale_zero_terminal_snr: bool = False) -> NoiseSchedule:
        """Use a table as given, e.g. ``scheduler.alphas_cumprod`` of a diffusers scheduler."""
        sched = cls(alphas_cumprod=alphas_cumprod)
        if rescale_zero_terminal_snr:
            sched = cls(_rescale_zero_terminal_snr(sched.betas))
        return sched

    @classmethod
    def _build(cls, betas, rescale):
        if rescale:
            betas = _rescale_zero_terminal_snr(betas.to(torch.float32))
        return cls(betas)

    # ---- tables -----------------------------------------------------------------
    def table(self, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``alphas_cumprod`` on ``device`` in ``dtype``, cached so a sampling loop pays the
        host-to-device copy once."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (device, dtype)
        tab = self._tables.get(key)
        if tab is None:
            # Never an inference tensor (the first call may come inside torch.inference_mode):
            # a later call with autograd on saves the table for backward, which those refuse.
            with torch.inference_mode(False):
                tab = self.alphas_cumprod.to(device=device, dtype=dtype)
                if tab.is_inference():
                    tab = tab.clone()
            self._tables[key] = tab
        return tab

    @property
    def has_zero_terminal_snr(self) -> bool:
        return self._zero_terminal_snr

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        ac = self.alphas_cumprod
        return (f"NoiseSchedule(num_timesteps={self.num_timesteps}, alphas_cumprod[0]={ac[0].item():.6g}, "
                f"alphas_cumprod[-1]={ac[-1].item():.6g})")


def _check_T(num_timesteps) -> int:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    return num_timesteps


# Built at import (about a millisecond), not lazily: building it inside a torch.compile
# region would be traced.
_DEFAULT = NoiseSchedule.linear()


def default_schedule() -> NoiseSchedule:
    """The DDPM paper's schedule (linear betas 1e-4..0.02, T = 1000)."""
    return _DEFAULT
