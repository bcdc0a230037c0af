"""Training: DDPM (L_simple via :func:`diffkern.q_sample`), denoising score matching at one
sigma or over a geometric set, EMA, safe resumable checkpoints, tqdm progress."""

from .checkpoint import load_checkpoint, save_checkpoint
from .ema import EMA
from .losses import DDPMLoss, DSMLoss, ddpm_loss, dsm_loss, geometric_sigmas
from .trainer import Trainer, load_model, train_ddpm, train_score

__all__ = ["Trainer", "train_ddpm", "train_score", "load_model", "EMA", "save_checkpoint", "load_checkpoint",
           "ddpm_loss", "dsm_loss", "DDPMLoss", "DSMLoss", "geometric_sigmas"]
