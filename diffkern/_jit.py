"""Compiling the native libraries on first use, for installs that did not build them.

A plain `pip install .` builds in an isolated environment without torch, so it installs
the C++/CUDA sources (diffkern/_csrc) instead of compiled libraries. The first
`import diffkern` then compiles them against the torch that is running, with
torch.utils.cpp_extension.load (ninja), into a cache directory keyed by everything the
result depends on:

    $DIFFKERN_CACHE_DIR (default ~/.cache/diffkern)/
        torch<version>-<cpu|cu<version>>-py<X.Y>-<machine>-<source hash>-<flags hash>/
            _C/             schemas, autograd, CUDA (the capability-independent library)
            _cpu_<level>/   the CPU kernels for one instruction-set level
            build.log       the compiler's output
            .lock

A later process finds the libraries there and loads them in milliseconds. Building runs in
a child process (its output goes to build.log, a crash there cannot take the importing
process down, and the libraries are loaded once before they are declared good) under an
exclusive file lock, so processes started together compile once: the others wait, then
load. A failed build is recorded next to the log and not retried on every import.

This module must also run as a plain file, without the package (the child process loads
it by path so that it does not import diffkern, which would start another build): only
the parent-side functions import the package's other modules, and only lazily.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

PKG_DIR = os.path.dirname(os.path.abspath(__file__))
PROGRESS_EVERY_S = 30.0


class JitError(RuntimeError):
    """The libraries could not be built; the message says why (with the compiler's error)."""


def enabled() -> bool:
    return os.environ.get("DIFFKERN_JIT", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_root() -> str:
    d = os.environ.get("DIFFKERN_CACHE_DIR")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "diffkern")
    return os.path.abspath(d)


def find_csrc(pkg_dir: str = PKG_DIR) -> str | None:
    """The C++/CUDA sources: shipped in the package (diffkern/_csrc), or the checkout's csrc/
    beside it (source tree, editable install)."""
    for d in (os.path.join(pkg_dir, "_csrc"), os.path.join(os.path.dirname(pkg_dir), "csrc")):
        if os.path.isfile(os.path.join(d, "torch", "registration.cpp")):
            return d
    return None


def _log(msg: str) -> None:
    print(f"diffkern: {msg}", file=sys.stderr, flush=True)


def cuda_plan(torch) -> tuple[bool, str | None, str | None]:
    """(build CUDA, nvcc version, why not) from DIFFKERN_CUDA=auto|0|1, as setup.py decides."""
    want = os.environ.get("DIFFKERN_CUDA", "auto").lower()
    if want in ("0", "false", "no") or not torch.version.cuda:
        if want in ("1", "true", "yes"):
            raise JitError("DIFFKERN_CUDA=1 but this torch was built without CUDA")
        return False, None, "torch has no CUDA" if not torch.version.cuda else "DIFFKERN_CUDA=0"
    from torch.utils import cpp_extension as ce

    nvcc = os.path.join(ce.CUDA_HOME, "bin", "nvcc") if ce.CUDA_HOME else None
    if not nvcc or not os.path.exists(nvcc):
        if want in ("1", "true", "yes"):
            raise JitError("DIFFKERN_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return False, None, "nvcc not found (set CUDA_HOME)"
    nv = nvcc_version(nvcc)
    if nv and nv.split(".")[0] != torch.version.cuda.split(".")[0]:
        why = f"nvcc is CUDA {nv} but torch was built with CUDA {torch.version.cuda}"
        if want in ("1", "true", "yes"):
            raise JitError(why + ": point CUDA_HOME at a matching toolkit")
        return False, nv, why
    return True, nv, None


def nvcc_version(nvcc: str) -> str | None:
    try:
        out = subprocess.check_output([nvcc, "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    for tok in out.replace(",", " ").split():
        if tok.startswith("V") and tok[1:2].isdigit():
            return tok[1:]
    return None


def plan(level: str) -> dict:
    """What a JIT build for CPU level `level` compiles, where, and the info recorded with it."""
    import hashlib

    import torch

    from . import _buildcfg as B

    csrc = find_csrc()
    if csrc is None:
        raise JitError("the C++ sources are not installed (no diffkern/_csrc): reinstall diffkern with pip")
    with_cuda, nv, cuda_skipped = cuda_plan(torch)
    arch = (os.environ.get("TORCH_CUDA_ARCH_LIST") or B.DEFAULT_CUDA_ARCH_LIST) if with_cuda else None
    src_hash = B.source_hash(csrc)
    mach = B.machine()
    pyver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    libs = [
        {"name": "_C", "sources": B.core_sources(csrc, with_cuda), "cflags": B.core_cxx(),
         "cuda_cflags": list(B.NVCC) if with_cuda else [], "ldflags": list(B.COMMON_LD), "with_cuda": with_cuda},
        {"name": f"_cpu_{level}", "sources": B.cpu_sources(csrc), "cflags": B.cpu_cxx(level, mach),
         "cuda_cflags": [], "ldflags": list(B.COMMON_LD), "with_cuda": False},
    ]
    cfg = json.dumps([[lib["cflags"], lib["cuda_cflags"], lib["ldflags"]] for lib in libs] + [arch, nv],
                     sort_keys=True)
    cuda_tag = f"cu{torch.version.cuda}" if with_cuda else "cpu"
    key = (f"torch{torch.__version__}-{cuda_tag}-py{pyver}-{mach}-{src_hash[:16]}-"
           f"{hashlib.sha256(cfg.encode()).hexdigest()[:8]}")
    key_dir = os.path.join(cache_root(), key)
    for lib in libs:
        lib["dir"] = os.path.join(key_dir, lib["name"])
    info = {
        "kind": "jit", "key": key, "torch": str(torch.__version__), "torch_cuda": torch.version.cuda,
        "with_cuda": with_cuda, "cuda_skipped": cuda_skipped, "nvcc": nv, "cuda_arch_list": arch,
        "nvcc_flags": list(B.NVCC) if with_cuda else None, "source_hash": src_hash, "sources": csrc,
        "levels": [level], "cxx_flags": {"_C": libs[0]["cflags"], libs[1]["name"]: libs[1]["cflags"]},
        "python": pyver, "machine": mach, "compiler": os.environ.get("CXX", "c++"),
    }
    return {"key_dir": key_dir, "libs": libs, "info": info}


def so_path(lib: dict) -> str:
    return os.path.join(lib["dir"], lib["name"] + ".so")


def _done(lib: dict, key: str) -> bool:
    try:
        with open(os.path.join(lib["dir"], "build_info.json")) as fh:
            ok = json.load(fh).get("key") == key
    except (OSError, ValueError):
        return False
    return ok and os.path.isfile(so_path(lib))


def _failed(lib: dict) -> str | None:
    try:
        with open(os.path.join(lib["dir"], "failed.json")) as fh:
            return json.load(fh)["error"]
    except (OSError, ValueError, KeyError):
        return None


def ensure(level: str) -> dict:
    """Builds (if needed) and returns the plan of _C and _cpu_<level>: paths under "libs"
    ("so" set for each), the build info under "info". Raises JitError."""
    p = plan(level)
    key = p["info"]["key"]
    libs = p["libs"]
    for lib in libs:
        lib["so"] = so_path(lib)
    if all(_done(lib, key) for lib in libs):
        p["info"].update(_read_info(libs[-1]))
        return p
    for lib in libs:
        err = _failed(lib)
        if err and not _done(lib, key):
            raise JitError(f"an earlier JIT build failed (delete {p['key_dir']} to retry): {err}")
    os.makedirs(p["key_dir"], exist_ok=True)
    with _FileLock(os.path.join(p["key_dir"], ".lock")):
        need = [lib for lib in libs if not _done(lib, key)]  # another process may have built them
        for lib in need:  # ... or failed while we waited
            err = _failed(lib)
            if err:
                raise JitError(f"an earlier JIT build failed (delete {p['key_dir']} to retry): {err}")
        if need:
            _build(p, need)
    p["info"].update(_read_info(libs[-1]))
    return p


def _read_info(lib: dict) -> dict:
    with open(os.path.join(lib["dir"], "build_info.json")) as fh:
        info = json.load(fh)
    return {k: info[k] for k in ("built_at", "build_seconds") if k in info}


def _build(p: dict, need: list[dict]) -> None:
    import torch

    key_dir = p["key_dir"]
    log_path = os.path.join(key_dir, "build.log")
    for lib in need:
        os.makedirs(lib["dir"], exist_ok=True)
        # We hold the lock, so a `lock` file of torch's (FileBaton) left there was left by
        # a build that was killed: torch would wait for it forever.
        for stale in ("lock", "failed.json"):
            try:
                os.remove(os.path.join(lib["dir"], stale))
            except FileNotFoundError:
                pass
    spec = {"libs": need, "preload": [lib["so"] for lib in p["libs"] if lib not in need],
            "with_cuda": p["info"]["with_cuda"]}
    spec_path = os.path.join(key_dir, f"spec-{os.getpid()}.json")
    with open(spec_path, "w") as fh:
        json.dump(spec, fh)
    env = dict(os.environ)
    if p["info"]["with_cuda"]:
        env["TORCH_CUDA_ARCH_LIST"] = p["info"]["cuda_arch_list"]
    what = ", ".join(lib["name"] for lib in need)
    _log(f"compiling the native kernels ({what}) for torch {torch.__version__}"
         f"{' with CUDA ' + str(torch.version.cuda) if p['info']['with_cuda'] else ''}: once per torch version, "
         f"CPU level and source version, about a minute or more. Cache: {key_dir} (log: {log_path}; "
         "DIFFKERN_JIT=0 turns this off)")
    t0 = time.monotonic()
    child = ("import importlib.util as u, sys; s = u.spec_from_file_location('_diffkern_jit_child', sys.argv[1]); "
             "m = u.module_from_spec(s); s.loader.exec_module(m); sys.exit(m._child(sys.argv[2]))")
    with open(log_path, "a") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: building {what}\n")
        log.flush()
        proc = subprocess.Popen([sys.executable, "-c", child, os.path.abspath(__file__), spec_path],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            next_note = PROGRESS_EVERY_S
            while True:
                try:
                    rc = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    el = time.monotonic() - t0
                    if el >= next_note:
                        _log(f"still compiling ({el:.0f} s)")
                        next_note += PROGRESS_EVERY_S
        except BaseException:  # KeyboardInterrupt: stop the compiler too, record nothing
            proc.kill()
            proc.wait()
            raise
        finally:
            try:
                os.remove(spec_path)
            except OSError:
                pass
    el = time.monotonic() - t0
    if rc != 0:
        err = f"the JIT build failed ({'exit ' + str(rc) if rc > 0 else 'killed by signal ' + str(-rc)}" \
              f" after {el:.0f} s; log: {log_path}): {_error_lines(log_path)}"
        if rc > 0:  # a compile error: do not try again on every import (a kill may be transient)
            for lib in need:
                _write_json(os.path.join(lib["dir"], "failed.json"), {"error": err})
        _log(err)
        raise JitError(err)
    for lib in need:
        info = dict(p["info"], built_at=time.strftime("%Y-%m-%dT%H:%M:%S"), build_seconds=round(el, 1),
                    library=lib["name"])
        _write_json(os.path.join(lib["dir"], "build_info.json"), info)
    _log(f"native kernels compiled in {el:.0f} s")


def _error_lines(log_path: str, limit: int = 20) -> str:
    """The compiler's error lines from the end of the log (the last attempt), else its tail."""
    try:
        with open(log_path, errors="replace") as fh:
            text = fh.read()
    except OSError:
        return "(no log)"
    last = text[text.rfind("\n===== "):].splitlines()
    errs = [ln for ln in last if "error" in ln.lower() and not ln.startswith("[")]
    return "\n".join((errs or last)[-limit:]).strip()


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)  # readers never see half a file


class _FileLock:
    """An exclusive lock on a file, released when the holder exits however it exits (flock),
    with a note on stderr while another process holds it."""

    def __init__(self, path: str):
        self.path = path
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # not POSIX: torch's lock file (not released if the holder dies)
            from torch.utils.file_baton import FileBaton

            self._baton = FileBaton(self.path + ".baton")
            while not self._baton.try_acquire():
                self._baton.wait()
            return self
        self._baton = None
        t0 = time.monotonic()
        noted = False
        next_note = PROGRESS_EVERY_S
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                el = time.monotonic() - t0
                if not noted or el >= next_note:
                    _log(f"waiting for another process compiling the native kernels ({el:.0f} s; {self.path})")
                    noted = True
                    if el >= next_note:
                        next_note += PROGRESS_EVERY_S
                time.sleep(0.2)

    def __exit__(self, *exc):
        if self._baton is not None:
            self._baton.release()
        os.close(self.fd)  # releases the flock


# ---- the child process ----------------------------------------------------------------
def _child(spec_path: str) -> int:
    """Builds the libraries in the spec with torch's JIT builder (verbose: the output is the
    log) and loads them once, so that only libraries that load are declared built."""
    import traceback

    with open(spec_path) as fh:
        spec = json.load(fh)
    _ninja_on_path()
    try:
        import ctypes

        import torch
        from torch.utils import cpp_extension as ce

        # _C globally visible, as diffkern/_native.py loads it: the CPU-level library binds
        # the front door's checks and the generator keying from it.
        for so in spec["preload"]:
            ctypes.CDLL(so, mode=os.RTLD_GLOBAL)
            torch.ops.load_library(so)
        for lib in spec["libs"]:
            t0 = time.monotonic()
            print(f"== {lib['name']}: {len(lib['sources'])} sources, flags {' '.join(lib['cflags'])}", flush=True)
            ce.load(name=lib["name"], sources=lib["sources"], extra_cflags=lib["cflags"],
                    extra_cuda_cflags=lib["cuda_cflags"] or None, extra_ldflags=lib["ldflags"],
                    build_directory=lib["dir"], verbose=True, with_cuda=lib["with_cuda"], is_python_module=False)
            if lib["name"] == "_C":  # promote the loaded library to global symbol lookup
                ctypes.CDLL(os.path.join(lib["dir"], lib["name"] + ".so"), mode=os.RTLD_GLOBAL)
            print(f"== {lib['name']}: built and loaded in {time.monotonic() - t0:.1f} s", flush=True)
        if bool(torch.ops.diffkern.built_with_cuda()) != bool(spec["with_cuda"]):
            raise RuntimeError("built_with_cuda() disagrees with the build")
        ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("diffkern::")]
        if not any(torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU") for n in ops):
            raise RuntimeError("the CPU library registered no CPU kernel")
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        return 1
    return 0


def _ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the pip package `ninja` may be installed in an
    environment whose bin folder is not on PATH (a venv used without activating it)."""
    import shutil

    if shutil.which("ninja"):
        return
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja

        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for d in dirs:
        if os.path.exists(os.path.join(d, "ninja")):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return
