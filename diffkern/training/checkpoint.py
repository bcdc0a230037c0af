"""Checkpoints that are safe to load: only tensors and plain Python containers are stored,
and they are read back with ``torch.load(weights_only=True)`` (no arbitrary unpickling)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "diffkern.checkpoint/1"


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists/tuples/dicts of them) to ``path``
    atomically: a temporary file in the same folder is renamed over the target, so an
    interrupted save never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, **state}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path, *, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``."""
    state = torch.load(Path(path), map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a diffkern checkpoint (format {CHECKPOINT_FORMAT!r})")
    return state
