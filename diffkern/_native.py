"""Loading the compiled libraries, and why they may be missing.

At import: pick the CPU level (the highest this CPU runs, or DIFFKERN_CPU_CAPABILITY),
then load `_C` and exactly one `_cpu_<level>`: the ahead-of-time build installed in the
package when its recorded build info matches the running torch and sources, else a JIT
build (diffkern/_jit.py: compiled once, cached). Every check happens before a library is
loaded, so a stale build is refused with a message instead of crashing or failing the
import; `import diffkern` never raises because of the native part.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import sys

import torch

from . import _buildcfg as B
from . import _jit

_PKG = os.path.dirname(os.path.abspath(__file__))
AOT_INFO = "_build_info.json"

_error: str | None = None
_loaded = False
_cuda = False
_fast = None  # the _C module, when it has the eager entry points (fast_call.cpp)
# What was chosen and why (diffkern.show_config() prints it).
_state: dict = {"kind": None, "level": None, "supported_levels": None, "forced_level": None, "libraries": {},
                "build": None, "aot_skipped": None, "jit_enabled": _jit.enabled(), "jit_cache": _jit.cache_root()}


def select_level(requested: str | None, supported: list[str], known: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(level, None), or (None, why) when DIFFKERN_CPU_CAPABILITY asks for a level that is
    unknown or that this CPU lacks: running it would die on an illegal instruction."""
    if not requested:
        return supported[-1], None
    r = requested.strip().lower()
    if r not in known:
        return None, (f"DIFFKERN_CPU_CAPABILITY={requested!r} is not a level of this architecture "
                      f"({', '.join(known)})")
    if r not in supported:
        return None, (f"DIFFKERN_CPU_CAPABILITY={r} but this CPU supports only {', '.join(supported)}: "
                      "refusing to run instructions it lacks")
    return r, None


def _aot_file(name: str) -> str | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = os.path.join(_PKG, name + suffix)
        if os.path.isfile(p):
            return p
    return None


def aot_mismatch(info: dict, csrc: str | None) -> list[str]:
    """How a recorded ahead-of-time build differs from what runs now (empty: usable)."""
    out = []
    now = {"torch": str(torch.__version__), "torch_cuda": torch.version.cuda,
           "python": f"{sys.version_info[0]}.{sys.version_info[1]}", "machine": B.machine()}
    for k, v in now.items():
        if info.get(k) != v:
            out.append(f"built for {k} {info.get(k)}, running {v}")
    if csrc is not None and info.get("source_hash") and info["source_hash"] != B.source_hash(csrc):
        out.append(f"the sources in {csrc} changed since it was built")
    return out


def _aot(level: str) -> tuple[dict | None, str | None]:
    """(plan, None) for a usable ahead-of-time build, else (None, why not)."""
    core = _aot_file("_C")
    if core is None:
        return None, "no ahead-of-time build in the package"
    try:
        with open(os.path.join(_PKG, AOT_INFO)) as fh:
            info = json.load(fh)
    except (OSError, ValueError):
        return None, (f"{os.path.basename(core)} has no build info ({AOT_INFO}; built by an older setup.py): "
                      "not loaded, it may not match this torch or this CPU")
    bad = aot_mismatch(info, _jit.find_csrc())
    if bad:
        return None, f"the ahead-of-time build is stale ({'; '.join(bad)}): not loaded"
    cpu = _aot_file(f"_cpu_{level}")
    if cpu is None or level not in info.get("levels", []):  # a file left from another build is not this one
        return None, (f"the ahead-of-time build has no CPU library for level {level} "
                      f"(built: {', '.join(info.get('levels', [])) or 'none'})")
    info = dict(info, kind="aot")
    return {"libs": [{"name": "_C", "so": core}, {"name": f"_cpu_{level}", "so": cpu}], "info": info}, None


def _load_libs(p: dict) -> None:
    global _fast
    for lib in p["libs"]:
        if lib["name"] == "_C":
            # Imported as the Python module diffkern._C (whatever its file is called): its
            # module functions are the eager entry points of the public ops.
            # RTLD_GLOBAL: the CPU-level library loaded next binds the front door's checks and
            # the generator keying (csrc/torch/validate.cpp, cpu_generator.cpp) from _C.
            spec = importlib.util.spec_from_file_location(f"{__package__}._C", lib["so"])
            flags = sys.getdlopenflags()
            sys.setdlopenflags(flags | os.RTLD_GLOBAL)
            try:
                mod = importlib.util.module_from_spec(spec)  # the dlopen happens here
                spec.loader.exec_module(mod)
            finally:
                sys.setdlopenflags(flags)
            sys.modules[spec.name] = mod
            if hasattr(mod, "_ddim_step"):  # an older build lacks them
                _fast = mod
        else:
            torch.ops.load_library(lib["so"])
        _state["libraries"][lib["name"]] = lib["so"]


def _load() -> str | None:
    """Loads the libraries; returns None, or why the reference runs instead."""
    global _loaded, _cuda
    if os.environ.get("DIFFKERN_DISABLE_NATIVE", "0") not in ("", "0"):
        return "disabled by DIFFKERN_DISABLE_NATIVE"
    supported = B.supported_levels()
    _state["supported_levels"] = supported
    _state["forced_level"] = os.environ.get("DIFFKERN_CPU_CAPABILITY") or None
    level, why = select_level(_state["forced_level"], supported, B.levels())
    if why:
        return why
    _state["level"] = level
    p, why = _aot(level)
    if p is not None:
        try:
            _load_libs(p)
        except Exception as e:  # e.g. an undefined symbol: nothing registered when _C fails
            if _state["libraries"]:
                return f"{type(e).__name__} loading {p['libs'][1]['so']}: {e}"
            why = f"the ahead-of-time build failed to load ({type(e).__name__}: {e})"
            p = None
    if p is None:
        _state["aot_skipped"] = why
        if not _jit.enabled():
            return f"{why}; JIT compilation is off (DIFFKERN_JIT=0)"
        if why.startswith("the ahead-of-time build"):
            _jit._log(why)
        try:
            p = _jit.ensure(level)
        except _jit.JitError as e:
            return str(e)
        except OSError as e:  # e.g. a read-only cache directory
            return f"JIT build impossible: {e} (set DIFFKERN_CACHE_DIR)"
        _load_libs(p)
    _state["kind"] = p["info"]["kind"]
    _state["build"] = p["info"]
    _loaded = True
    _cuda = bool(torch.ops.diffkern.built_with_cuda())
    return None


try:
    _error = _load()
except Exception as e:  # pragma: no cover - whatever happens, the reference still runs
    _error = f"the native libraries failed to load: {type(e).__name__}: {e}"
if _error is not None:
    _loaded = False


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


def state() -> dict:
    """How the native libraries were chosen: kind (aot/jit), level, supported levels, paths,
    recorded build info, the JIT cache (a copy)."""
    return json.loads(json.dumps(_state))
