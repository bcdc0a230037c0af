"""A small run of every CUDA op (vector and strided paths, noise drawn and given,
backward, the fused GMM loop) for compute-sanitizer."""

import torch

import diffkern as dk

dev = "cuda"
g = torch.Generator(device=dev).manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    x = torch.randn(3, 5, 17, device=dev, dtype=dtype)
    m = torch.randn(3, 5, 17, device=dev, dtype=dtype)
    t = torch.tensor([900, 300, 2], device=dev)
    xs = x.transpose(1, 2)
    ms = m.transpose(1, 2)
    for xx, mm in ((x, m), (xs, ms), (x[:, :, 1:], m[:, :, 1:])):
        dk.ddim_step(xx, mm, t, 0.5, generator=g, clip_sample=1.0)
        dk.ddim_step(xx, mm, t, 0.0, prediction_type="v_prediction")
        dk.ddpm_step(xx, mm, t, generator=g)
        dk.ddpm_step(xx, mm, t, noise=torch.randn_like(xx))
        dk.q_sample(xx, t, generator=g)
        dk.langevin_step(xx, mm, 0.01, generator=g)
    xr = x.clone().requires_grad_()
    dk.ddim_step(xr, m, t, 0.5, noise=torch.randn_like(x)).sum().backward()
pts = torch.rand(1000, 2, device=dev) * 16 - 8
w = torch.tensor([0.8, 0.2], device=dev)
mu = torch.tensor([[5.0, 5.0], [-5.0, -5.0]], device=dev)
dk.gmm_annealed_langevin(pts, w, mu, torch.ones(2, device=dev), [10.0, 3.0, 1.0], n_steps_each=3, step_lr=0.1,
                         denoise=True, generator=g)
torch.cuda.synchronize()
print("sanitizer workload finished")
