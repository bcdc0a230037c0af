"""The drop-ins in a real flow pipeline: ``pipe.scheduler = FusedX.from_config(
pipe.scheduler.config)`` on a tiny randomly initialised Wan 2.1 pipeline (diffusers'
WanPipeline, with the sizes of diffusers' own Wan test) gives the stock video for the same
seed (issue 22's done-when). Prompt embeddings are given directly, so no tokenizer files are
needed; WanPipeline still imports transformers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is needed for the fused schedulers")
pytest.importorskip("transformers", reason="diffusers' WanPipeline imports transformers")
from diffusers import (  # noqa: E402
    AutoencoderKLWan,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)

from diffkern.integrations.diffusers import (  # noqa: E402
    FusedDPMSolverMultistepScheduler,
    FusedFlowMatchEulerDiscreteScheduler,
    FusedUniPCMultistepScheduler,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5  # frames in [0, 1]; the fused loops are within 1e-5 of stock's in float32

CASES = {
    # Wan 2.1/2.2's own scheduler config
    "unipc-wan": (UniPCMultistepScheduler, FusedUniPCMultistepScheduler,
                  dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, solver_order=2,
                       solver_type="bh2", final_sigmas_type="zero")),
    # Sana's: DPM-Solver++ 2M on flow sigmas
    "dpm-flow": (DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler,
                 dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)),
    # the SDE variant draws from torch's global RNG inside the pipeline (no generator is
    # passed to step): the fused step must draw exactly what stock draws
    "dpm-sde-flow": (DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler,
                     dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                          algorithm_type="sde-dpmsolver++")),
    "flowmatch-euler": (FlowMatchEulerDiscreteScheduler, FusedFlowMatchEulerDiscreteScheduler, dict(shift=3.0)),
}


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    p = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
                    scheduler=UniPCMultistepScheduler())
    p.set_progress_bar_config(disable=True)
    return p


def _video(pipe, seed=0):
    g = torch.Generator().manual_seed(1)
    pe, ne = torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g)
    torch.manual_seed(seed)  # the SDE step's noise source
    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=16, width=16, num_frames=5,
                num_inference_steps=6, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
                output_type="pt").frames


@pytest.mark.parametrize("case", list(CASES))
def test_wan_pipeline_gives_the_stock_video(pipe, case):
    stock_cls, fused_cls, cfg = CASES[case]
    pipe.scheduler = stock_cls(**cfg)
    want = _video(pipe)
    pipe.scheduler = fused_cls.from_config(pipe.scheduler.config)
    assert type(pipe.scheduler) is fused_cls
    got = _video(pipe)
    assert want.shape == got.shape == (1, 5, 3, 16, 16)
    assert want.std() > 0.01  # a real video, not a constant
    assert (got - want).abs().max() <= TOL
    if case == "dpm-sde-flow":  # another seed gives another video: the noise matters
        assert (_video(pipe, seed=1) - got).abs().max() > 100 * TOL
