"""FusedUniPCMultistepScheduler, FusedPNDMScheduler, FusedCogVideoXDDIMScheduler against
their stock diffusers classes (CogVideoX has no test file among diffusers' own).

Whole loops on the same deterministic model (a nonlinear function of the sample and the
timestep, returned as a non-contiguous tensor): the fused loop must be within 1e-5
relative (max|a-b| / max|b|) of a float64 run of stock (every float32 table it holds
upcast after set_timesteps, the same arithmetic), and within 1e-5 of stock float32.
"""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("diffusers", reason="diffusers is needed for the fused schedulers")
from diffusers import CogVideoXDDIMScheduler, PNDMScheduler, UniPCMultistepScheduler  # noqa: E402

from diffkern.integrations.diffusers import (  # noqa: E402
    FusedCogVideoXDDIMScheduler,
    FusedPNDMScheduler,
    FusedUniPCMultistepScheduler,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOL = 1e-5
SHAPE = (2, 3, 5, 7)  # odd sizes


def model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for a network: nonlinear in x, dependent on t, and handed
    back as a non-contiguous view."""
    out = torch.sin(1.3 * x + 0.001 * float(t)) * 0.7 + 0.1 * x
    return out.transpose(-1, -2).contiguous().transpose(-1, -2)


def upcast(sched):
    """The same scheduler computing in float64 (every float32 tensor it holds upcast)."""
    s = copy.deepcopy(sched)
    for k, v in list(vars(s).items()):
        if isinstance(v, torch.Tensor) and v.dtype == torch.float32:
            setattr(s, k, v.double())
    return s


def loop(cls, cfg, n, dtype=torch.float32, f64=False, x=None):
    s = cls(**cfg)
    s.set_timesteps(n)
    if f64:
        s = upcast(s)
    if x is None:
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x.to(dtype)
    for t in s.timesteps:
        x = s.step(model(x, t).to(dtype), t, x).prev_sample
    return x


def rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def check_loop(stock_cls, fused_cls, cfg, n):
    ref = loop(stock_cls, cfg, n, torch.float64, f64=True)
    s32 = loop(stock_cls, cfg, n)
    f32 = loop(fused_cls, cfg, n)
    assert torch.isfinite(ref).all()
    assert f32.dtype == torch.float32
    # Where stock's own float32 loop is far from its float64 run, the formula is what
    # amplifies float32 rounding (UniPC predict_x0=False on "sample" outputs: eps =
    # (x - alpha x0) / sigma cancels at small sigma, 1e-3 over 10 steps at order 3), and
    # any float32 evaluation is that far: the bound is then stock's measured distance
    # (times 3: two rounding errors of one size), the float64 loop below checks the formula.
    e_stock = rel(s32, ref)
    assert rel(f32, ref) <= max(TOL, 3 * e_stock)
    f64 = loop(fused_cls, cfg, n, torch.float64)
    assert f64.dtype == torch.float64
    # the same amplification of float64's unit roundoff (2**-29 of float32's)
    assert rel(f64, ref) <= max(1e-12, 3 * e_stock * 2.0**-29)


class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


# ---- UniPC --------------------------------------------------------------------------
UNIPC_GRID = list(itertools.product(("bh1", "bh2"), (1, 2, 3), (True, False), (True, False),
                                    ("epsilon", "v_prediction", "sample")))


@pytest.mark.parametrize("solver_type,order,predict_x0,lower_order_final,prediction_type", UNIPC_GRID)
def test_unipc_loop_matches_stock(solver_type, order, predict_x0, lower_order_final, prediction_type):
    cfg = dict(solver_type=solver_type, solver_order=order, predict_x0=predict_x0,
               lower_order_final=lower_order_final, prediction_type=prediction_type, final_sigmas_type="sigma_min")
    check_loop(UniPCMultistepScheduler, FusedUniPCMultistepScheduler, cfg, 10)


UNIPC_OPTIONS = [
    # Wan 2.1 / 2.2
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, solver_order=2, solver_type="bh2",
         final_sigmas_type="zero"),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=5.0, solver_order=3, solver_type="bh2",
         final_sigmas_type="zero"),
    dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True, solver_order=2),
    dict(use_karras_sigmas=True, solver_order=3),
    dict(use_exponential_sigmas=True, solver_order=2, final_sigmas_type="sigma_min"),
    dict(use_beta_sigmas=True, solver_order=3, final_sigmas_type="sigma_min"),
    dict(disable_corrector=[0, 1, 4], solver_order=3),
    dict(thresholding=True, solver_order=3, prediction_type="sample", sample_max_value=1.5),
    dict(thresholding=True, solver_order=2, sample_max_value=1.1, solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(final_sigmas_type="zero", solver_order=3),
    dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, final_sigmas_type="zero"),
    dict(beta_schedule="squaredcos_cap_v2", solver_order=3, timestep_spacing="leading", steps_offset=1),
]


@pytest.mark.parametrize("cfg", UNIPC_OPTIONS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("n", [4, 13])
def test_unipc_options_match_stock(cfg, n):
    if cfg.get("use_beta_sigmas"):
        pytest.importorskip("scipy")
    if cfg.get("use_dynamic_shifting"):
        # set_timesteps needs mu: run the loop by hand
        out = []
        for cls, dt, f64 in ((UniPCMultistepScheduler, torch.float64, True), (FusedUniPCMultistepScheduler,
                                                                               torch.float32, False)):
            s = cls(**cfg)
            s.set_timesteps(n, mu=0.8)
            s = upcast(s) if f64 else s
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dt)
            for t in s.timesteps:
                x = s.step(model(x, t).to(dt), t, x).prev_sample
            out.append(x)
        assert rel(out[1], out[0]) <= TOL
        return
    check_loop(UniPCMultistepScheduler, FusedUniPCMultistepScheduler, cfg, n)


def test_unipc_bh1_final_zero_sigma_is_finite():
    """bh1 to sigma 0: stock multiplies B_h = -inf by a zero residual (NaN); the fused
    first-order last step is its limit, the corrected x0, as bh2 gives it."""
    cfg = dict(solver_type="bh1", final_sigmas_type="zero", solver_order=2)
    s = FusedUniPCMultistepScheduler(**cfg)
    s.set_timesteps(6)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for t in s.timesteps:
        x = s.step(model(x, t), t, x).prev_sample
    assert torch.isfinite(x).all()
    # the last step returns the history's x0: the last converted output
    assert torch.equal(x, s.model_outputs[-1].to(x.dtype))


def test_unipc_under_torch_compile_equals_eager():
    """A compiled step takes stock's Python step index as stock does (the coefficients
    are host Python, kept out of the graph): the loop is the eager one, bit for bit."""
    outs = []
    for compiled in (False, True):
        s = FusedUniPCMultistepScheduler(solver_order=3)
        s.set_timesteps(6)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

        def f(m, t, x, s=s):
            return s.step(m, t, x).prev_sample

        g = torch.compile(f, backend="eager") if compiled else f
        for t in s.timesteps:
            x = g(model(x, t), t, x)
        outs.append(x)
    assert torch.equal(outs[0], outs[1])


def test_unipc_reused_scheduler_equals_fresh():
    """The coefficients kept across set_timesteps calls: loops of 9, 5, 9 steps on one
    scheduler equal the same loops on fresh ones, bit for bit."""
    cfg = dict(solver_order=3, disable_corrector=[2])
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    reused = FusedUniPCMultistepScheduler(**cfg)
    for n in (9, 5, 9):
        outs = []
        for s in (reused, FusedUniPCMultistepScheduler(**cfg)):
            s.set_timesteps(n)
            x = x0
            for t in s.timesteps:
                x = s.step(model(x, t), t, x).prev_sample
            outs.append(x)
        assert torch.equal(outs[0], outs[1])


def test_unipc_no_host_sync_and_one_pass():
    from diffkern import unchecked as U
    s = FusedUniPCMultistepScheduler(solver_order=3, final_sigmas_type="zero")
    s.set_timesteps(8)
    x = torch.randn(SHAPE)
    calls = []
    real = U.linear_step

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    U.linear_step = counted
    try:
        with CountSyncs() as c:
            for t in s.timesteps:
                x = s.step(torch.randn(SHAPE), t, x).prev_sample
    finally:
        U.linear_step = real
    assert c.n == 0
    assert len(calls) == len(s.timesteps)


def strip(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def test_unipc_config_round_trip(tmp_path):
    cfg = dict(solver_order=3, solver_type="bh1", use_flow_sigmas=True, prediction_type="flow_prediction",
               flow_shift=4.0, disable_corrector=[1])
    s = FusedUniPCMultistepScheduler(**cfg)
    s.save_config(tmp_path)
    d = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert d["_class_name"] == "UniPCMultistepScheduler"
    stock = UniPCMultistepScheduler.from_pretrained(tmp_path)
    back = FusedUniPCMultistepScheduler.from_pretrained(tmp_path)
    assert type(back) is FusedUniPCMultistepScheduler
    assert strip(back.config) == strip(stock.config) == strip(s.config)
    back = FusedUniPCMultistepScheduler.from_config(UniPCMultistepScheduler(**cfg).config)
    assert strip(back.config) == strip(s.config)


def test_unipc_refusals():
    with pytest.raises(NotImplementedError, match="solver_p"):
        FusedUniPCMultistepScheduler(solver_p=UniPCMultistepScheduler())
    s = FusedUniPCMultistepScheduler()
    s.set_timesteps(5)
    x = torch.randn(SHAPE)
    with pytest.raises(NotImplementedError, match="one timestep"):
        s.step(torch.randn(SHAPE), s.timesteps[:2], x)
    s = FusedUniPCMultistepScheduler(prediction_type="flow_prediction", predict_x0=False)
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="prediction_type"):  # stock raises it at step too
        s.step(torch.randn(SHAPE), s.timesteps[0], x)


# ---- PNDM ---------------------------------------------------------------------------
PNDM_GRID = list(itertools.product((False, True), ("epsilon", "v_prediction"), ("leading", "linspace", "trailing"),
                                   (False, True)))


@pytest.mark.parametrize("skip_prk_steps,prediction_type,spacing,set_alpha_to_one", PNDM_GRID)
@pytest.mark.parametrize("n", [7, 25])
def test_pndm_loop_matches_stock(skip_prk_steps, prediction_type, spacing, set_alpha_to_one, n):
    cfg = dict(skip_prk_steps=skip_prk_steps, prediction_type=prediction_type, timestep_spacing=spacing,
               set_alpha_to_one=set_alpha_to_one, steps_offset=1 if spacing == "leading" else 0)
    check_loop(PNDMScheduler, FusedPNDMScheduler, cfg, n)


def test_pndm_direct_prk_and_plms_calls_match_stock():
    """step_prk / step_plms called directly on a state set by hand (as diffusers' own tests
    do), int timesteps, a float16 model output with float32 samples (a float32 result)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=g)
    ets = [torch.randn(SHAPE, generator=g) for _ in range(4)]
    m = torch.randn(SHAPE, generator=g).half()
    for stage in ("prk", "plms"):
        for counter in range(6):
            outs = []
            for cls in (PNDMScheduler, FusedPNDMScheduler):
                s = cls()
                s.set_timesteps(10)
                s.ets = ets[:]
                s.counter = counter
                s.cur_sample = x + 1
                fn = s.step_prk if stage == "prk" else s.step_plms
                # stock rounds its float16 products to float16; the fused step computes in
                # float32 from the float16 values, as stock does given them in float32
                mm = m.float() if cls is PNDMScheduler else m
                outs.append([fn(mm, t, x).prev_sample for t in (801, 501, 1)])
            for a, b in zip(*outs, strict=True):
                assert b.dtype == a.dtype
                assert rel(b, a) <= TOL


def test_pndm_no_host_sync_and_one_pass():
    from diffkern import unchecked as U
    s = FusedPNDMScheduler()
    s.set_timesteps(8)
    x = torch.randn(SHAPE)
    calls = []
    real = U.linear_step

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    U.linear_step = counted
    try:
        with CountSyncs() as c:
            for t in s.timesteps:
                x = s.step(torch.randn(SHAPE), t, x).prev_sample
    finally:
        U.linear_step = real
    assert c.n == 0
    assert len(calls) == len(s.timesteps)


def test_pndm_pipeline_gives_the_stock_image():
    """pipe.scheduler = FusedPNDMScheduler.from_config(pipe.scheduler.config) on a tiny
    randomly initialised UNet pipeline: the stock image for the same seed."""
    from diffusers import PNDMPipeline, UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    imgs = []
    for cls in (PNDMScheduler, FusedPNDMScheduler):
        pipe = PNDMPipeline(unet=unet, scheduler=PNDMScheduler())
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(1),
                   output_type="np").images
        imgs.append(torch.from_numpy(out))
    assert type(pipe.scheduler) is FusedPNDMScheduler
    assert imgs[0].std() > 0.1
    assert (imgs[0] - imgs[1]).abs().max() <= TOL  # images in [0, 1]


def test_pndm_config_round_trip(tmp_path):
    cfg = dict(skip_prk_steps=True, set_alpha_to_one=True, prediction_type="v_prediction", steps_offset=1)
    s = FusedPNDMScheduler(**cfg)
    s.save_config(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == "PNDMScheduler"
    stock = PNDMScheduler.from_pretrained(tmp_path)
    back = FusedPNDMScheduler.from_pretrained(tmp_path)
    assert type(back) is FusedPNDMScheduler
    assert strip(back.config) == strip(stock.config) == strip(s.config)


def test_pndm_refusals():
    s = FusedPNDMScheduler(prediction_type="sample")
    s.set_timesteps(5)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="prediction_type"):  # stock raises it at step too
        s.step(torch.randn(SHAPE), s.timesteps[0], x)
    s = FusedPNDMScheduler()
    s.set_timesteps(5)
    with pytest.raises(NotImplementedError, match="one timestep"):
        s.step(torch.randn(SHAPE), s.timesteps[:2], x)


# ---- CogVideoX DDIM -----------------------------------------------------------------
COG_GRID = [c for c in itertools.product(("epsilon", "v_prediction", "sample"), ("leading", "linspace", "trailing"),
                                         ("scaled_linear", "linear"), (False, True))
            # epsilon at a zero terminal SNR: stock's x0 divides by sqrt(alphas_cumprod) = 0 at t = 999
            if not (c[0] == "epsilon" and c[3] and c[1] != "leading")]


@pytest.mark.parametrize("prediction_type,spacing,beta_schedule,zero_snr", COG_GRID)
@pytest.mark.parametrize("n", [7, 50])
def test_cogvideox_loop_matches_stock(prediction_type, spacing, beta_schedule, zero_snr, n):
    cfg = dict(prediction_type=prediction_type, timestep_spacing=spacing, beta_schedule=beta_schedule,
               rescale_betas_zero_snr=zero_snr, snr_shift_scale=1.0 if beta_schedule == "linear" else 3.0)
    check_loop(CogVideoXDDIMScheduler, FusedCogVideoXDDIMScheduler, cfg, n)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_cogvideox_pred_original_sample_and_batch_timesteps(prediction_type):
    """pred_original_sample is stock's; a (B,) timestep (on the device path, no host
    read) equals B separate calls."""
    g = torch.Generator().manual_seed(5)
    stock, fused = CogVideoXDDIMScheduler(prediction_type=prediction_type), \
        FusedCogVideoXDDIMScheduler(prediction_type=prediction_type)
    stock.set_timesteps(20)
    fused.set_timesteps(20)
    x = torch.randn(SHAPE, generator=g)
    m = torch.randn(SHAPE, generator=g)
    for t in fused.timesteps[[0, 7, 19]]:
        a, b = stock.step(m, int(t), x), fused.step(m, t, x)
        assert rel(b.prev_sample, a.prev_sample) <= TOL
        assert rel(b.pred_original_sample, a.pred_original_sample) <= TOL
    tb = torch.tensor([961, 11])
    with CountSyncs() as c:
        both = fused.step(m, tb, x)
    assert c.n == 0
    for k in range(2):
        one = fused.step(m[k:k + 1], int(tb[k]), x[k:k + 1])
        assert rel(both.prev_sample[k:k + 1], one.prev_sample) <= 1e-6
        assert rel(both.pred_original_sample[k:k + 1], one.pred_original_sample) <= 1e-6


def test_cogvideox_no_host_sync_and_one_pass():
    from diffkern import unchecked as U
    s = FusedCogVideoXDDIMScheduler()
    s.set_timesteps(8)
    x = torch.randn(SHAPE)
    calls = []
    real = U.linear_step

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    U.linear_step = counted
    try:
        with CountSyncs() as c:
            for t in s.timesteps:
                x = s.step(torch.randn(SHAPE), t, x).prev_sample
    finally:
        U.linear_step = real
    assert c.n == 0
    assert len(calls) == len(s.timesteps)


def test_cogvideox_config_round_trip(tmp_path):
    cfg = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
               snr_shift_scale=1.5)
    s = FusedCogVideoXDDIMScheduler(**cfg)
    s.save_config(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == "CogVideoXDDIMScheduler"
    stock = CogVideoXDDIMScheduler.from_pretrained(tmp_path)
    back = FusedCogVideoXDDIMScheduler.from_pretrained(tmp_path)
    assert type(back) is FusedCogVideoXDDIMScheduler
    assert strip(back.config) == strip(stock.config) == strip(s.config)
