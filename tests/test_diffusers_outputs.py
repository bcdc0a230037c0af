"""The drop-ins build their step outputs with ``_base.output`` (no dataclass __init__ /
BaseOutput.__post_init__, which cost 2-3 us a step): the object must be the one stock's
constructor makes, for every output class they return."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.utils._pytree as pytree
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput
from diffusers.schedulers.scheduling_tcd import TCDSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from diffkern.integrations.diffusers import _base as B

A, C = torch.arange(4.0), -torch.arange(4.0)
CASES = [
    (SchedulerOutput, dict(prev_sample=A)),
    (FlowMatchEulerDiscreteSchedulerOutput, dict(prev_sample=A)),
    (DDIMSchedulerOutput, dict(prev_sample=A, pred_original_sample=C)),
    (DDIMSchedulerOutput, dict(prev_sample=A, pred_original_sample=None)),
    (LCMSchedulerOutput, dict(prev_sample=A, denoised=C)),
    (TCDSchedulerOutput, dict(prev_sample=A, pred_noised_sample=C)),
]


@pytest.mark.parametrize("cls,kw", CASES, ids=[f"{c.__name__}-{len([v for v in k.values() if v is not None])}"
                                               for c, k in CASES])
def test_output_is_stocks(cls, kw):
    want = cls(**kw)
    got = B.output(cls, *kw.values())
    assert type(got) is cls
    assert list(got.keys()) == list(want.keys())
    assert got.__dict__.keys() == want.__dict__.keys()
    assert all(getattr(got, k) is getattr(want, k) for k in kw)
    assert got.to_tuple() == want.to_tuple() or all(a is b for a, b in zip(got.to_tuple(), want.to_tuple(),
                                                                          strict=True))
    assert repr(got) == repr(want)
    assert got[0] is want[0] and got["prev_sample"] is want["prev_sample"]
    back = pickle.loads(pickle.dumps(got))
    assert type(back) is cls and list(back.keys()) == list(want.keys())
    leaves, spec = pytree.tree_flatten(got)
    leaves_w, spec_w = pytree.tree_flatten(want)
    assert spec == spec_w and len(leaves) == len(leaves_w)
    # setting a field later keeps attribute and entry together, as on stock's object
    got.prev_sample = C
    assert got["prev_sample"] is C


def test_output_missing_required_field():
    with pytest.raises(TypeError):
        B.output(DDIMSchedulerOutput)
