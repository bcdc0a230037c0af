"""pytest plugin for scripts/gpu_check.sh: keep only the tests that exercise CUDA, in every
test file, however they say so.

    PYTHONPATH=scripts pytest -p pytest_cuda_select tests

The suite marks CUDA tests three ways: ``pytest.mark.cuda`` (tests/test_cuda.py), the
``needs_cuda`` skipif of conftest.py (a skip, not a marker, so ``-m cuda`` misses it), and
parametrization over devices (ids containing ``cuda``); a test named ``*cuda*`` counts
too. A test is kept when any of these holds; the others are deselected (reported as
such). ``--cuda-list FILE`` writes the kept node ids, so the report can say what ran.
"""

from __future__ import annotations

import re

import pytest

_CUDA_WORD = re.compile(r"(?<![a-z])cuda(?![a-z])", re.IGNORECASE)


def pytest_addoption(parser):
    parser.addoption("--cuda-list", default=None, help="write the selected CUDA test ids to this file")


def is_cuda_test(item) -> bool:
    if item.get_closest_marker("cuda") is not None:
        return True
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", ""))
        if _CUDA_WORD.search(reason) and ("device" in reason.lower() or "gpu" in reason.lower()):
            return True
    if _CUDA_WORD.search(item.originalname if hasattr(item, "originalname") else item.name):
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        if _CUDA_WORD.search(callspec.id):
            return True
        for value in callspec.params.values():
            if str(value) == "cuda" or getattr(value, "type", None) == "cuda":
                return True
    return False


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        (keep if is_cuda_test(item) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    path = config.getoption("--cuda-list")
    if path:
        with open(path, "w") as f:
            f.write("".join(f"{item.nodeid}\n" for item in keep))
