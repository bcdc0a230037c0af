"""Training: DDPM (L_simple via :func:`diffkern.q_sample`), flow matching (via
:func:`diffkern.flow_q_sample`), denoising and sliced score matching at one sigma or over a
geometric set, VAEs; EMA, safe resumable checkpoints, tqdm progress."""

from .checkpoint import load_checkpoint, save_checkpoint
from .ema import EMA
from .flow_matching import FlowMatchingLoss, VelocityModel, flow_matching_loss, sample_flow_sigmas
from .losses import DDPMLoss, DSMLoss, VAELoss, ddpm_loss, dsm_loss, geometric_sigmas
from .sliced import SlicedScoreMatchingLoss, exact_score_matching_loss, sliced_score_matching_loss
from .trainer import Trainer, load_model, train_ddpm, train_flow, train_score, train_sliced_score, train_vae

__all__ = ["Trainer", "train_ddpm", "train_flow", "train_score", "train_sliced_score", "train_vae", "load_model",
           "EMA", "save_checkpoint", "load_checkpoint", "ddpm_loss", "dsm_loss", "flow_matching_loss",
           "sliced_score_matching_loss", "exact_score_matching_loss", "sample_flow_sigmas", "DDPMLoss", "DSMLoss",
           "FlowMatchingLoss", "SlicedScoreMatchingLoss", "VAELoss", "VelocityModel", "geometric_sigmas"]
