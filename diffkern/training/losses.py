"""Training objectives: DDPM's L_simple and denoising score matching (NCSN weighting).

Every loss is a callable ``loss(model, x, y, generator) -> scalar`` so one
:class:`~diffkern.training.Trainer` runs them all. Random numbers (timesteps, sigmas,
noise) come from ``generator`` (a CPU generator works for data on any device), which the
trainer reseeds from the step number: that is what makes resumed runs bitwise identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ops import q_sample
from ..schedules import NoiseSchedule

__all__ = ["ddpm_loss", "dsm_loss", "DDPMLoss", "DSMLoss", "VAELoss", "geometric_sigmas"]


def _gen_device(generator) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def geometric_sigmas(sigma_max: float, sigma_min: float, n: int) -> torch.Tensor:
    """``exp(linspace(log sigma_max, log sigma_min, n))``, descending (NCSN's noise levels)."""
    if not (sigma_max > 0 and sigma_min > 0):
        raise ValueError("sigma_max and sigma_min must be positive")
    if n == 1:
        return torch.tensor([float(sigma_max)], dtype=torch.float64)
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))


def ddpm_loss(model, x0: torch.Tensor, *, schedule: NoiseSchedule | None = None, labels: torch.Tensor | None = None,
              class_dropout: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """L_simple of Ho et al. (2020): ``E ||eps - model(x_t, t)||^2`` (mean over elements).

    ``t`` is drawn per sample, uniform on ``[0, T)``; ``x_t`` and its noise come from
    :func:`diffkern.q_sample` (noise drawn in-kernel from ``generator``). With ``labels``
    the model is called as ``model(x_t, t, y)``, and a fraction ``class_dropout`` of the
    labels is replaced by the "no label" index ``model.num_classes`` (classifier-free
    guidance training)."""
    T = (schedule.num_timesteps if schedule is not None else 1000)
    B = x0.shape[0]
    gd = _gen_device(generator)
    t = torch.randint(0, T, (B,), generator=generator, device=gd).to(x0.device)
    x_t, noise = q_sample(x0, t, schedule=schedule, generator=generator)
    if labels is None:
        eps = model(x_t, t)
    else:
        y = labels
        if class_dropout > 0:
            drop = (torch.rand(B, generator=generator, device=gd) < class_dropout).to(labels.device)
            y = torch.where(drop, torch.full_like(labels, model.num_classes), labels)
        eps = model(x_t, t, y)
    return torch.nn.functional.mse_loss(eps.float(), noise.float())


def dsm_loss(model, x: torch.Tensor, sigmas, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Denoising score matching with NCSN's weighting ``lambda(sigma) = sigma^2``:

    ``0.5 E_sigma E ||sigma s(x + sigma z, sigma) + z||^2`` (sum over dimensions, mean over
    the batch), i.e. ``sigma^2 ||s - target||^2`` with the target score ``-z / sigma``.
    ``sigmas`` is a float (one fixed level) or a 1-D set; each sample draws its level
    uniformly from the set."""
    B = x.shape[0]
    gd = _gen_device(generator)
    s = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    idx = torch.randint(0, s.numel(), (B,), generator=generator, device=gd)
    sigma = s[idx.cpu()].to(x.device, x.dtype)
    z = torch.randn(x.shape, generator=generator, device=gd, dtype=x.dtype).to(x.device)
    shape = (B,) + (1,) * (x.dim() - 1)
    x_noisy = x + sigma.reshape(shape) * z
    out = model(x_noisy, sigma)
    return 0.5 * ((sigma.reshape(shape) * out + z) ** 2).reshape(B, -1).sum(1).mean()


@dataclass
class DDPMLoss:
    """:func:`ddpm_loss` as a trainer objective."""
    schedule: NoiseSchedule | None = None
    class_dropout: float = 0.0

    def __call__(self, model, x, y, generator):
        return ddpm_loss(model, x, schedule=self.schedule, labels=y, class_dropout=self.class_dropout,
                         generator=generator)


@dataclass
class DSMLoss:
    """:func:`dsm_loss` at one sigma or over a set, as a trainer objective."""
    sigmas: object = 1.0

    def __call__(self, model, x, y, generator):
        return dsm_loss(model, x, self.sigmas, generator=generator)


@dataclass
class VAELoss:
    """The negative ELBO of a :class:`~diffkern.models.VAE` (``model.loss``), as a trainer objective."""
    beta: float = 1.0

    def __call__(self, model, x, y, generator):
        return model.loss(x, beta=self.beta, generator=generator)
