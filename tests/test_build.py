"""The installed package is the one CI built: with DIFFKERN_REQUIRE_NATIVE=1 (set by
.ci/run) the suite fails instead of silently testing only the pure-PyTorch fallback."""

import os

import diffkern as dk


def test_native_present_when_required():
    if os.environ.get("DIFFKERN_REQUIRE_NATIVE", "0") == "1":
        assert dk.native_available(), f"native ops required but unavailable: {dk.native_error()}"


def test_native_error_says_why_exactly_when_unavailable():
    """native_error() is the reason the summary line prints: a non-empty string when the
    native ops are missing, None when they run."""
    if dk.native_available():
        assert dk.native_error() is None
    else:
        assert isinstance(dk.native_error(), str) and dk.native_error().strip()


def test_summary_line_states_native(pytestconfig):
    """The header and the summary of every run state whether the native ops ran
    (tests/conftest.py): `pytest -q tests` without the build is green but says NO."""
    from conftest import native_line, pytest_report_header

    assert pytest_report_header(pytestconfig) == native_line()
    assert native_line().startswith("diffkern native: yes" if dk.native_available() else "diffkern native: NO")


def test_public_names():
    for name in ("NoiseSchedule", "q_sample", "ddpm_step", "ddim_step", "langevin_step", "annealed_langevin",
                 "gmm_score", "gmm_annealed_langevin", "native_available", "native_error", "reference"):
        assert hasattr(dk, name), name
    for name in ("q_sample", "ddpm_step", "ddim_step", "langevin_step", "annealed_langevin", "gmm_score",
                 "gmm_annealed_langevin"):
        assert callable(getattr(dk.reference, name)), name
