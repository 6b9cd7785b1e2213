"""The diffusion core against references: diffusers' own schedulers, torch.distributions, Monte Carlo."""
import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from lit_distill.diffusion import (
    FlowSchedule, OneStepGenerator, VPSchedule, convert, from_x0_eps, gaussian_kl, gaussian_log_prob,
    mean_matching, noise_levels, rollout, schedule_from_scheduler_config, to_x0_eps,
)
from lit_distill.diffusion.kernels import flow_sde_kernel

torch.set_default_dtype(torch.float32)


def ddim_config(prediction_type="epsilon", spacing="leading", offset=1):
    return dict(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=offset,
                              clip_sample=False, set_alpha_to_one=False).config)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_kernel_matches_diffusers_step(prediction_type, spacing, offset, eta):
    config = ddim_config(prediction_type, spacing, offset)
    schedule = schedule_from_scheduler_config(config)
    reference = DDIMScheduler.from_config(config)
    reference.set_timesteps(10)
    # diffusers keeps alphas in float32, where 1 - abar_s - std^2 cancels badly at eta=1: compare in float64
    reference.alphas_cumprod = reference.alphas_cumprod.double()
    reference.final_alpha_cumprod = reference.final_alpha_cumprod.double()
    grid = schedule.grid(10)
    assert torch.equal(grid.timesteps, reference.timesteps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    for i, t in enumerate(reference.timesteps):
        out = torch.randn(x.shape, generator=g, dtype=torch.float64)
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
        mean, std = schedule.kernel(out, x, grid.at(i).to(dtype=torch.float64), eta)
        ref_mean = reference.step(out, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        ref_sample = reference.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        prev = t - reference.config.num_train_timesteps // 10
        ref_std = eta * reference._get_variance(t, prev).sqrt()
        torch.testing.assert_close(mean, ref_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(std.double(), ref_std.double(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(mean + std * noise, ref_sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_ode_step_matches_diffusers_euler(shift):
    config = dict(FlowMatchEulerDiscreteScheduler(shift=shift).config)
    schedule = schedule_from_scheduler_config(config)
    assert isinstance(schedule, FlowSchedule)
    reference = FlowMatchEulerDiscreteScheduler.from_config(config)
    reference.set_timesteps(8)
    grid = schedule.grid(8)
    torch.testing.assert_close(grid.timesteps, reference.timesteps)
    torch.testing.assert_close(grid.sigma_t, reference.sigmas[:-1].double())
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for i, t in enumerate(reference.timesteps):
        v = torch.randn_like(x)
        mean, std = schedule.kernel(v, x, grid.at(i).to(dtype=torch.float64), 0.0)
        ref = reference.step(v, t, x).prev_sample
        torch.testing.assert_close(mean, ref.double(), atol=1e-5, rtol=1e-5)
        assert float(std) == 0.0


def test_flow_sde_kernel_formula_and_a_zero():
    x, v = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    t, s, a = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64), 0.7
    mean, std = flow_sde_kernel(x, v, t, s, a)
    sig = a * math.sqrt(0.6 / 0.4)
    dt = -0.1
    torch.testing.assert_close(mean, x + (v + sig**2 / (2 * 0.6) * (x + 0.4 * v)) * dt)
    assert float(std) == pytest.approx(sig * math.sqrt(0.1))
    mean0, std0 = flow_sde_kernel(x, v, t, s, 0.0)
    torch.testing.assert_close(mean0, x + v * dt)
    assert float(std0) == 0.0
    # at t = 1 the noise level is evaluated with 1 - s in the denominator (finite)
    _, std1 = flow_sde_kernel(x, v, torch.tensor(1.0, dtype=torch.float64), s, a)
    assert math.isfinite(float(std1))


def test_log_prob_matches_torch_distributions():
    mean, x = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    std = torch.rand(5, dtype=torch.float64) + 0.1
    ref = torch.distributions.Normal(mean, std.view(5, 1, 1, 1)).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), ref)
    ref_scalar = torch.distributions.Normal(mean, 0.3).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, torch.tensor(0.3, dtype=torch.float64)), ref_scalar)


def test_kl_matches_torch_and_monte_carlo():
    g = torch.Generator().manual_seed(1)
    mp, mq = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    std = torch.tensor(0.7, dtype=torch.float64)
    kl = gaussian_kl(mp, mq, std)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mp, std), torch.distributions.Normal(mq, std))
    torch.testing.assert_close(kl, ref.flatten(1).sum(1))
    # Monte Carlo: E_p[log p - log q]
    n = 20000
    xs = mp + std * torch.randn((n,) + mp.shape, generator=g, dtype=torch.float64)
    diffs = torch.stack([gaussian_log_prob(x, mp, std) - gaussian_log_prob(x, mq, std) for x in xs])
    est, se = diffs.mean(0), diffs.std(0) / math.sqrt(n)
    assert ((est - kl).abs() < 3 * se + 1e-9).all(), (est, kl, se)
    torch.testing.assert_close(mean_matching(mp, mq), 2 * std**2 * kl)


def test_kl_gradient_equals_autograd_of_log_ratio_expectation():
    """d/dmu_p of the closed form = d/dmu_p E_{x~p}[log p(x) - log q(x)] with x reparametrised."""
    g = torch.Generator().manual_seed(2)
    mp = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    mq, std = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    (grad_closed,) = torch.autograd.grad(gaussian_kl(mp, mq, std).sum(), mp)
    eps = torch.randn((4000,) + mp.shape, generator=g, dtype=torch.float64)
    x = mp + std * eps
    est = (gaussian_log_prob(x.flatten(0, 1), mp.repeat(4000, 1, 1, 1), std)
           - gaussian_log_prob(x.flatten(0, 1), mq.repeat(4000, 1, 1, 1), std)).mean() * 3
    (grad_mc,) = torch.autograd.grad(est, mp)
    torch.testing.assert_close(grad_mc, grad_closed, atol=0.08, rtol=0.05)


@pytest.mark.parametrize("family,types", [("vp", ["epsilon", "v_prediction", "sample"]),
                                          ("flow", ["velocity", "epsilon", "sample"])])
def test_prediction_conversions_round_trip(family, types):
    x0, eps = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    if family == "vp":
        alpha = torch.tensor(0.6, dtype=torch.float64)
        sigma = (1 - alpha**2).sqrt()
    else:
        sigma = torch.tensor(0.3, dtype=torch.float64)
        alpha = 1 - sigma
    x_t = alpha * x0 + sigma * eps
    for ptype in types:
        pred = from_x0_eps(x0, eps, alpha, sigma, ptype)
        rx0, reps = to_x0_eps(pred, x_t, alpha, sigma, ptype)
        torch.testing.assert_close(rx0, x0)
        torch.testing.assert_close(reps, eps)
        for other in types:
            torch.testing.assert_close(convert(pred, x_t, alpha, sigma, ptype, other),
                                       from_x0_eps(x0, eps, alpha, sigma, other))


def test_prediction_type_errors_name_the_field():
    with pytest.raises(ValueError, match="prediction_type='velocity'.*'flow'"):
        schedule_from_scheduler_config(ddim_config(), prediction_type="velocity")
    with pytest.raises(ValueError, match="prediction_type='v_prediction'.*'vp'"):
        FlowSchedule("v_prediction")
    with pytest.raises(ValueError, match="prediction_type='banana'"):
        VPSchedule(torch.linspace(0.99, 0.01, 10), "banana")


class MixtureVelocity(torch.nn.Module):
    """Exact rectified-flow velocity E[eps - x0 | x_t] of a 2-D Gaussian mixture (isotropic components)."""

    def __init__(self, means, stds, weights):
        super().__init__()
        self.m, self.s, self.w = means, stds, weights

    def forward(self, x, timestep, cond=None):
        t = (timestep.to(x.dtype) / 1000).view(-1, 1, 1, 1)
        xf = x.flatten(1)  # [B, 2]
        tt = t.view(-1, 1)
        var = (1 - tt) ** 2 * self.s**2 + tt**2  # [B, K]
        center = (1 - tt)[..., None] * self.m  # [B, K, 2]
        d = xf[:, None, :] - center
        logits = self.w.log() - (d.pow(2).sum(-1)) / (2 * var) - var.log()  # 2-D: det = var^2
        r = logits.softmax(-1)[..., None]
        e_x0 = self.m + ((1 - tt) * self.s**2 / var)[..., None] * d
        e_eps = (tt / var)[..., None] * d
        return ((r * (e_eps - e_x0)).sum(1)).view_as(x)


def test_flow_sde_and_ode_share_the_marginal_at_t0():
    torch.manual_seed(0)
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    stds = torch.tensor([0.3, 0.5], dtype=torch.float64)
    weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
    velocity = MixtureVelocity(means, stds, weights)
    schedule = FlowSchedule("velocity", dict(FlowMatchEulerDiscreteScheduler(shift=1.0).config))
    grid = schedule.grid(200).to(dtype=torch.float64)
    n = 8000
    noise = torch.randn(n, 2, 1, 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    ode = rollout(velocity, noise, None, schedule, grid, noise_level=0.0, store_means=False).sample.flatten(1)
    sde = rollout(velocity, noise, None, schedule, grid, noise_level=0.7, generator=g, store_means=False).sample.flatten(1)
    true_mean = (weights[:, None] * means).sum(0)
    true_second = (weights[:, None] * (means**2 + stds[:, None] ** 2)).sum(0)
    for xs in (ode, sde):
        assert (xs.mean(0) - true_mean).abs().max() < 0.06, xs.mean(0)
        assert (xs.pow(2).mean(0) - true_second).abs().max() < 0.15, xs.pow(2).mean(0)
    # mass in each mode (the mixture weight) agrees too
    assert abs((sde[:, 0] < 0).double().mean() - 0.3) < 0.03
    assert abs((ode[:, 0] < 0).double().mean() - 0.3) < 0.03


class TinyDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, timestep, cond=None):
        return self.conv(x) * (1 + timestep.float().view(-1, 1, 1, 1) / 1000) + (0 if cond is None else cond["bias"].view(-1, 1, 1, 1))


@pytest.mark.parametrize("family", ["vp", "flow"])
def test_rollout_log_probs_equal_recomputed(family):
    torch.manual_seed(0)
    schedule = (schedule_from_scheduler_config(ddim_config("epsilon", "trailing", 0)) if family == "vp"
                else schedule_from_scheduler_config(dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)))
    net = TinyDenoiser()
    grid = schedule.grid(6)
    levels = noise_levels(6, 0.8, sde_steps=[0, 2, 3])
    cond, uncond = {"bias": torch.randn(4)}, {"bias": torch.zeros(4)}
    traj = rollout(net, torch.randn(4, 2, 4, 4), cond, schedule, grid, noise_level=levels,
                   generator=torch.Generator().manual_seed(0), guidance_scale=2.0, uncond=uncond)
    assert traj.latents.shape == (4, 7, 2, 4, 4) and traj.log_probs.shape == (4, 6)
    assert traj.stochastic.tolist() == [True, False, True, True, False, False]
    from lit_distill.diffusion import guided_prediction
    for i in range(6):
        x = traj.latents[:, i]
        pred = guided_prediction(net, x, grid.timesteps[i].expand(4), cond, uncond, 2.0)
        mean, std = schedule.kernel(pred, x, grid.at(i), levels[i])
        torch.testing.assert_close(mean, traj.means[:, i])
        if levels[i] > 0:
            torch.testing.assert_close(gaussian_log_prob(traj.latents[:, i + 1], mean, std), traj.log_probs[:, i])
        else:
            torch.testing.assert_close(traj.latents[:, i + 1], mean)
    # the same generator seed reproduces the rollout exactly
    again = rollout(net, traj.latents[:, 0], cond, schedule, grid, noise_level=levels,
                    generator=torch.Generator().manual_seed(0), guidance_scale=2.0, uncond=uncond)
    assert torch.equal(again.sample, traj.sample)


def test_one_step_generator_maps_to_x0():
    schedule = FlowSchedule()
    net = TinyDenoiser()
    gen = OneStepGenerator(net, schedule)
    z = torch.randn(3, 2, 4, 4)
    v = net(z, torch.full((3,), 1000.0))
    torch.testing.assert_close(gen(z), z - v)
    vp = schedule_from_scheduler_config(ddim_config("epsilon"))
    gen_vp = OneStepGenerator(net, vp)
    assert gen_vp.t_star == 999
    eps = net(z, torch.full((3,), 999))
    abar = vp.alphas_cumprod[999].float()
    torch.testing.assert_close(gen_vp(z), (z - (1 - abar).sqrt() * eps) / abar.sqrt())


def test_ddim_last_step_onto_clean_data_has_no_density_but_stays_finite():
    """With set_alpha_to_one the last DDIM step lands on abar = 1: std 0 even at eta = 1."""
    config = dict(DDIMScheduler(set_alpha_to_one=True, timestep_spacing="trailing", clip_sample=False).config)
    schedule = schedule_from_scheduler_config(config)
    grid = schedule.grid(4)
    stds = [float(schedule.kernel_std(grid.at(i), 1.0)) for i in range(4)]
    assert stds[-1] == 0.0 and all(s > 0 for s in stds[:-1])
    traj = rollout(TinyDenoiser(), torch.randn(2, 2, 4, 4), None, schedule, grid, noise_level=1.0,
                   generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(traj.log_probs).all() and (traj.log_probs[:, -1] == 0).all()
    assert traj.stochastic.tolist() == [True, True, True, False]
