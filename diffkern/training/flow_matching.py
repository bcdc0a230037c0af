"""Flow matching with the straight (rectified-flow) path.

``x_t = (1 - sigma) x0 + sigma noise`` (:func:`diffkern.flow_q_sample`) joins a data point
(sigma = 0) to a normal draw (sigma = 1); its velocity ``d x_t / d sigma = noise - x0`` is
the regression target (Lipman et al. 2023, conditional flow matching with sigma_min = 0;
Liu et al. 2023, rectified flow). The minimiser of ``E ||v(x_t, sigma) - (noise - x0)||^2``
is the marginal velocity ``E[noise - x0 | x_t]``, whose ODE ``dx/dsigma = v`` carries
N(0, I) at sigma = 1 to the data at sigma = 0 (the flow-Euler sampler integrates it).

Time input: the model is called as ``model(x_t, sigma * time_scale)``. The default
``time_scale = 1000`` puts sigma on the 0..1000 range that :class:`~diffkern.models.UNet`'s
sinusoidal embedding was sized for (DDPM timesteps), as diffusers' flow models do
(``timestep = sigma * num_train_timesteps``); :class:`VelocityModel` applies the same scale
at sampling time, so a sampler can pass sigma itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["sample_flow_sigmas", "flow_matching_loss", "FlowMatchingLoss", "VelocityModel"]

SIGMA_SAMPLINGS = ("uniform", "logit_normal")


def sample_flow_sigmas(n: int, *, sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                       generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """``n`` training sigmas in [0, 1] (float32, on ``device``).

    - ``"uniform"``: U(0, 1) (rectified flow);
    - ``"logit_normal"``: ``sigmoid(logit_mean + logit_std * N(0, 1))`` (Esser et al. 2024,
      SD3's default m = 0, s = 1): more weight on the middle of the path, where the
      velocity is hardest to predict, and little on the nearly trivial ends.
    Drawn on ``generator``'s device (a CPU generator works for any ``device``)."""
    if sampling not in SIGMA_SAMPLINGS:
        raise ValueError(f"sampling must be one of {SIGMA_SAMPLINGS}, got {sampling!r}")
    if not logit_std > 0:
        raise ValueError(f"logit_std must be positive, got {logit_std}")
    gd = generator.device if generator is not None else torch.device("cpu")
    if sampling == "uniform":
        sigma = torch.rand(n, generator=generator, device=gd)
    else:
        sigma = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, device=gd))
    return sigma.to(device if device is not None else gd)


def _default_flow_q_sample():
    from ..sampler_ops import flow_q_sample

    return flow_q_sample


def flow_matching_loss(model, x0: torch.Tensor, *, sigma_sampling: str = "logit_normal", logit_mean: float = 0.0,
                       logit_std: float = 1.0, time_scale: float = 1000.0, labels: torch.Tensor | None = None,
                       class_dropout: float = 0.0, q_sample=None, reduction: str = "mean",
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Conditional flow matching: ``E ||model(x_t, sigma * time_scale) - (noise - x0)||^2``.

    Per sample ``sigma`` comes from :func:`sample_flow_sigmas`; ``x_t`` and ``noise`` from
    ``q_sample(x0, sigma, generator=generator) -> (x_t, noise)``, by default
    :func:`diffkern.flow_q_sample` (noise drawn in-kernel from ``generator``). With
    ``labels`` the model is called as ``model(x_t, t, y)`` and a fraction ``class_dropout``
    of them becomes the "no label" index ``model.num_classes``, as in
    :func:`~diffkern.training.ddpm_loss`.

    ``reduction="mean"``: mean over elements (a scalar); ``"none"``: (B,) per-sample means."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    q_sample = q_sample or _default_flow_q_sample()
    B = x0.shape[0]
    sigma = sample_flow_sigmas(B, sampling=sigma_sampling, logit_mean=logit_mean, logit_std=logit_std,
                               generator=generator, device=x0.device).to(x0.dtype)
    x_t, noise = q_sample(x0, sigma, generator=generator)
    t = sigma * time_scale
    if labels is None:
        v = model(x_t, t)
    else:
        y = labels
        if class_dropout > 0:
            gd = generator.device if generator is not None else torch.device("cpu")
            drop = (torch.rand(B, generator=generator, device=gd) < class_dropout).to(labels.device)
            y = torch.where(drop, torch.full_like(labels, model.num_classes), labels)
        v = model(x_t, t, y)
    err = (v.float() - (noise.float() - x0.float())) ** 2
    return err.mean() if reduction == "mean" else err.reshape(B, -1).mean(1)


@dataclass
class FlowMatchingLoss:
    """:func:`flow_matching_loss` as a trainer objective."""
    sigma_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    time_scale: float = 1000.0
    class_dropout: float = 0.0
    q_sample: object = None

    def __call__(self, model, x, y, generator):
        return flow_matching_loss(model, x, sigma_sampling=self.sigma_sampling, logit_mean=self.logit_mean,
                                  logit_std=self.logit_std, time_scale=self.time_scale, labels=y,
                                  class_dropout=self.class_dropout if y is not None else 0.0,
                                  q_sample=self.q_sample, generator=generator)


class VelocityModel(torch.nn.Module):
    """``VelocityModel(net, time_scale)(x, sigma) = net(x, sigma * time_scale)``: a model
    trained by :func:`flow_matching_loss` as the ``model(x, sigma)`` that flow samplers
    (:func:`diffkern.samplers.sample_flow_euler`) call."""

    def __init__(self, model: torch.nn.Module, time_scale: float = 1000.0):
        super().__init__()
        self.model = model
        self.time_scale = float(time_scale)

    def forward(self, x: torch.Tensor, sigma, *args, **kwargs) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        return self.model(x, sigma * self.time_scale, *args, **kwargs)
