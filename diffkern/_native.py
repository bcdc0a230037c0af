"""Loading the compiled extension, and why it may be missing."""

from __future__ import annotations

import os

import torch

_error: str | None = None
_loaded = False
_cuda = False
_fast = None  # the extension module, when it has the eager entry points (fast_call.cpp)

if os.environ.get("DIFFKERN_DISABLE_NATIVE", "0") not in ("", "0"):
    _error = "disabled by DIFFKERN_DISABLE_NATIVE"
else:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.diffkern.*)

        _cuda = bool(torch.ops.diffkern.built_with_cuda())
        from . import _C as _ext

        _fast = _ext if hasattr(_ext, "_ddim_step") else None  # a stale build lacks the eager entries
        if _fast is not None:
            from . import _rng

            _rng._native_key = _fast._cpu_generator_key
        _loaded = True
    except ImportError as e:  # not built, or built against another torch
        _error = f"diffkern._C could not be imported: {e}"
    except Exception as e:  # pragma: no cover - an ABI mismatch can raise other errors
        _error = f"diffkern._C failed to load: {type(e).__name__}: {e}"


def native_available(device: str | torch.device | None = None) -> bool:
    """True when the compiled ops run (for ``device``, if given: CUDA needs a CUDA build)."""
    if not _loaded:
        return False
    if device is None:
        return True
    dev = torch.device(device)
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        return _cuda
    return False


def native_error() -> str | None:
    """Why the native ops are not used, or None when they are."""
    return _error


def built_with_cuda() -> bool:
    return _cuda
