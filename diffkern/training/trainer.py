"""A small, resumable training loop: Adam, gradient clipping, EMA, checkpoints, tqdm."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..schedules import NoiseSchedule
from .checkpoint import load_checkpoint, save_checkpoint
from .ema import EMA
from .flow_matching import FlowMatchingLoss
from .losses import DDPMLoss, DSMLoss, VAELoss
from .sliced import SlicedScoreMatchingLoss

__all__ = ["Trainer", "train_ddpm", "train_flow", "train_score", "train_sliced_score", "train_vae", "load_model"]


def _step_seed(seed: int, step: int) -> int:
    # Every step reseeds from (seed, step), so the batch and noise of step k do not depend
    # on how the run got there: stopping, saving and resuming gives the same weights.
    return ((seed & 0xFFFFFFFF) << 32) | (step & 0xFFFFFFFF)


class Trainer:
    """Trains ``model`` on an in-memory data set with ``loss_fn(model, x, y, generator)``.

    Each step draws ``batch_size`` random rows of ``data`` (and ``labels``), takes one
    Adam step (linear learning-rate warm-up over ``warmup_steps``, gradients clipped to
    norm ``grad_clip``) and updates the :class:`EMA`. ``fit(n_steps)`` trains until
    ``self.step == n_steps`` and returns ``self.loss_history`` (one float per step), so a
    resumed trainer continues towards the same total.
    """

    def __init__(self, model: torch.nn.Module, loss_fn, data: torch.Tensor, *, labels: torch.Tensor | None = None,
                 batch_size: int = 128, lr: float = 2e-4, weight_decay: float = 0.0, warmup_steps: int = 0,
                 grad_clip: float | None = 1.0, ema_decay: float = 0.999, seed: int = 0, device=None):
        if device is None:
            device = data.device
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
        self.data = data.to(self.device)
        self.labels = labels.to(self.device) if labels is not None else None
        if self.labels is not None and self.labels.shape[0] != self.data.shape[0]:
            raise ValueError("labels must have one entry per row of data")
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.warmup_steps = int(warmup_steps)
        self.grad_clip = grad_clip
        self.seed = int(seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.ema = EMA(self.model, ema_decay)
        self.step = 0
        self.loss_history: list[float] = []
        self._generator = torch.Generator()

    # ---- training ----------------------------------------------------------------
    def train_step(self) -> float:
        g = self._generator.manual_seed(_step_seed(self.seed, self.step))
        idx = torch.randint(0, self.data.shape[0], (self.batch_size,), generator=g).to(self.device)
        x = self.data[idx]
        y = self.labels[idx] if self.labels is not None else None
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * min(1.0, (self.step + 1) / self.warmup_steps) if self.warmup_steps else self.lr
        self.model.train()
        loss = self.loss_fn(self.model, x, y, g)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {self.step}")
        self.loss_history.append(value)
        return value

    def fit(self, n_steps: int, *, progress: bool = True, desc: str = "train", callback=None,
            callback_every: int | None = None, checkpoint_path=None,
            checkpoint_every: int | None = None) -> list[float]:
        """Train until ``self.step == n_steps``.

        ``callback(trainer)`` runs every ``callback_every`` steps; the checkpoint at
        ``checkpoint_path`` is written every ``checkpoint_every`` steps and at the end.
        A tqdm bar shows the smoothed loss unless ``progress=False``."""
        from tqdm.auto import tqdm

        bar = tqdm(total=n_steps, initial=self.step, desc=desc, disable=not progress, dynamic_ncols=True)
        smooth = None
        try:
            while self.step < n_steps:
                value = self.train_step()
                smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
                bar.update(1)
                if self.step % 10 == 0 or self.step == n_steps:
                    bar.set_postfix(loss=f"{smooth:.4f}")
                if callback is not None and callback_every and self.step % callback_every == 0:
                    callback(self)
                if checkpoint_path is not None and checkpoint_every and self.step % checkpoint_every == 0:
                    self.save(checkpoint_path)
        finally:
            bar.close()
        if checkpoint_path is not None:
            self.save(checkpoint_path)
        return self.loss_history

    # ---- checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict:
        model_config = getattr(self.model, "config", None)
        return {
            "model_class": type(self.model).__name__,
            "model_config": dict(model_config) if model_config is not None else None,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "seed": self.seed,
            "loss_history": torch.tensor(self.loss_history, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.seed = int(state["seed"])
        self.loss_history = [float(v) for v in state["loss_history"].tolist()]

    def save(self, path) -> Path:
        """Atomic checkpoint: model, EMA, optimizer, step, seed, loss history, model config."""
        return save_checkpoint(path, self.state_dict())

    def load(self, path) -> Trainer:
        """Resume from a checkpoint written by :meth:`save` (loaded with ``weights_only=True``)."""
        self.load_state_dict(load_checkpoint(path, map_location=self.device))
        return self


def load_model(path, *, ema: bool = True, map_location="cpu") -> torch.nn.Module:
    """Rebuild the model stored in a trainer checkpoint (the EMA weights by default), in eval mode."""
    from ..models import build_model

    state = load_checkpoint(path, map_location=map_location)
    if state.get("model_config") is None:
        raise ValueError(f"{path} holds no model config; build the model yourself and load state['model']")
    model = build_model(state["model_class"], state["model_config"])
    model.load_state_dict(state["ema"]["model"] if ema else state["model"])
    return model.to(map_location).eval()


def _run(trainer: Trainer, n_steps, checkpoint_path, resume, **fit_kwargs) -> Trainer:
    if checkpoint_path is not None and resume and Path(checkpoint_path).exists():
        trainer.load(checkpoint_path)
    trainer.fit(n_steps, checkpoint_path=checkpoint_path, **fit_kwargs)
    return trainer


def train_ddpm(model, images: torch.Tensor, *, n_steps: int, labels: torch.Tensor | None = None,
               schedule: NoiseSchedule | None = None, class_dropout: float = 0.1, batch_size: int = 128,
               lr: float = 2e-4, warmup_steps: int = 100, ema_decay: float = 0.999, grad_clip: float | None = 1.0,
               seed: int = 0, device=None, checkpoint_path=None, checkpoint_every: int | None = None,
               resume: bool = True, progress: bool = True, callback=None, callback_every: int | None = None) -> Trainer:
    """Train an epsilon-prediction model with DDPM's L_simple (:func:`~diffkern.training.ddpm_loss`).

    With ``checkpoint_path`` and ``resume=True`` an existing checkpoint is loaded first and
    training continues to ``n_steps`` total. Returns the :class:`Trainer`
    (``.loss_history``, ``.ema.model``, ``.model``)."""
    trainer = Trainer(model, DDPMLoss(schedule, class_dropout if labels is not None else 0.0), images, labels=labels,
                      batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, grad_clip=grad_clip,
                      ema_decay=ema_decay, seed=seed, device=device)
    return _run(trainer, n_steps, checkpoint_path, resume, progress=progress, desc="ddpm", callback=callback,
                callback_every=callback_every, checkpoint_every=checkpoint_every)


def train_score(model, points: torch.Tensor, sigmas, *, n_steps: int, batch_size: int = 512, lr: float = 1e-3,
                warmup_steps: int = 0, ema_decay: float = 0.995, grad_clip: float | None = 1.0, seed: int = 0,
                device=None, checkpoint_path=None, checkpoint_every: int | None = None, resume: bool = True,
                progress: bool = True, callback=None, callback_every: int | None = None) -> Trainer:
    """Denoising score matching (:func:`~diffkern.training.dsm_loss`) at one ``sigmas`` value
    or over a set of them (NCSN weighting sigma^2). Same checkpoint/resume behaviour as
    :func:`train_ddpm`; returns the :class:`Trainer`."""
    trainer = Trainer(model, DSMLoss(sigmas), points, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                      grad_clip=grad_clip, ema_decay=ema_decay, seed=seed, device=device)
    return _run(trainer, n_steps, checkpoint_path, resume, progress=progress, desc="dsm", callback=callback,
                callback_every=callback_every, checkpoint_every=checkpoint_every)


def train_flow(model, images: torch.Tensor, *, n_steps: int, labels: torch.Tensor | None = None,
               sigma_sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
               time_scale: float = 1000.0, q_sample=None, class_dropout: float = 0.1, batch_size: int = 128,
               lr: float = 2e-4, warmup_steps: int = 100, ema_decay: float = 0.999, grad_clip: float | None = 1.0,
               seed: int = 0, device=None, checkpoint_path=None, checkpoint_every: int | None = None,
               resume: bool = True, progress: bool = True, callback=None, callback_every: int | None = None) -> Trainer:
    """Train a velocity model ``model(x_t, sigma * time_scale) ~ noise - x0`` by flow matching
    (:func:`~diffkern.training.flow_matching_loss`; ``q_sample`` defaults to
    :func:`diffkern.flow_q_sample`). EMA, checkpoints, resume and progress as
    :func:`train_ddpm`; sample the EMA model through
    :class:`~diffkern.training.VelocityModel` ``(trainer.ema.model, time_scale)``."""
    loss = FlowMatchingLoss(sigma_sampling, logit_mean, logit_std, time_scale,
                            class_dropout if labels is not None else 0.0, q_sample)
    trainer = Trainer(model, loss, images, labels=labels, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                      grad_clip=grad_clip, ema_decay=ema_decay, seed=seed, device=device)
    return _run(trainer, n_steps, checkpoint_path, resume, progress=progress, desc="flow", callback=callback,
                callback_every=callback_every, checkpoint_every=checkpoint_every)


def train_sliced_score(model, points: torch.Tensor, sigmas, *, n_steps: int, n_projections: int = 1,
                       projection: str = "rademacher", variance_reduced: bool = True, batch_size: int = 512,
                       lr: float = 1e-3, warmup_steps: int = 0, ema_decay: float = 0.995,
                       grad_clip: float | None = 1.0, seed: int = 0, device=None, checkpoint_path=None,
                       checkpoint_every: int | None = None, resume: bool = True, progress: bool = True,
                       callback=None, callback_every: int | None = None) -> Trainer:
    """Sliced score matching (:func:`~diffkern.training.sliced_score_matching_loss`, SSM-VR by
    default) of ``model(x, sigma)`` on ``points`` perturbed at ``sigmas`` (sigma^2-weighted,
    comparable with :func:`train_score`'s DSM), or of ``model(x)`` with ``sigmas=None``.
    Same checkpoint/resume behaviour as :func:`train_ddpm`."""
    loss = SlicedScoreMatchingLoss(sigmas, n_projections, projection, variance_reduced)
    trainer = Trainer(model, loss, points, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                      grad_clip=grad_clip, ema_decay=ema_decay, seed=seed, device=device)
    return _run(trainer, n_steps, checkpoint_path, resume, progress=progress, desc="ssm", callback=callback,
                callback_every=callback_every, checkpoint_every=checkpoint_every)


def train_vae(model, images: torch.Tensor, *, n_steps: int, beta: float = 1.0, batch_size: int = 128,
              lr: float = 1e-3, warmup_steps: int = 0, ema_decay: float = 0.99, grad_clip: float | None = 1.0,
              seed: int = 0, device=None, checkpoint_path=None, checkpoint_every: int | None = None,
              resume: bool = True, progress: bool = True) -> Trainer:
    """Train a :class:`~diffkern.models.VAE` on its negative ELBO (:class:`VAELoss`), with the
    same EMA and checkpoints as the other loops."""
    trainer = Trainer(model, VAELoss(beta), images, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                      grad_clip=grad_clip, ema_decay=ema_decay, seed=seed, device=device)
    return _run(trainer, n_steps, checkpoint_path, resume, progress=progress, desc="vae",
                checkpoint_every=checkpoint_every)
