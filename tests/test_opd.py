"""OPDStudent: the per-step objective against Monte Carlo, gradient paths, routing, both modes."""
import math

import lightning as L
import pytest
import torch

from lit_distill.diffusion import gaussian_log_prob
from lit_distill.losses import per_step_kl
from lit_distill.methods.opd import OPDStudent
from lit_distill.models.builders import build_embedded_model

TINY = {"resolution": 8, "block_channels": (16, 32), "text_hidden": 32}


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    dirs = {}
    for name, seed in (("bright", 1), ("dark", 2)):
        build_embedded_model(**TINY, seed=seed).save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


def batch(tasks=("bright", "dark", "bright")):
    return {"prompt": ["a handwritten seven", "a handwritten one", "a handwritten two"][: len(tasks)], "task": list(tasks)}


def student(teacher_dirs, model=None, sampling=None, updates=None, **kwargs):
    defaults = dict(model=model or "embedded", model_kwargs=None if model else {**TINY, "seed": 0},
                    teachers=teacher_dirs, sampling={"num_steps": 4, "eval_steps": 4, **(sampling or {})},
                    updates={"minibatch_size": 8, **(updates or {})}, optim={"lr": 1e-3})
    defaults.update(kwargs)
    return OPDStudent(**defaults)


def test_per_step_kl_equals_monte_carlo_and_mean_matching_on_ode_rows():
    g = torch.Generator().manual_seed(0)
    ms, mt = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    std = torch.tensor([0.4, 0.0, 0.8], dtype=torch.float64)
    loss = per_step_kl(ms, mt, std, ode_weight=0.5)
    n = 20000
    for row in (0, 2):
        x = ms[row] + std[row] * torch.randn((n,) + ms.shape[1:], generator=g, dtype=torch.float64)
        log_ratio = gaussian_log_prob(x, ms[row].expand_as(x), std[row]) - gaussian_log_prob(x, mt[row].expand_as(x), std[row])
        est, se = log_ratio.mean(), log_ratio.std() / math.sqrt(n)
        assert abs(float(est - loss[row])) < 3 * float(se)
    torch.testing.assert_close(loss[1], 0.5 * (ms[1] - mt[1]).pow(2).sum())


def test_gradient_reaches_the_student_only_and_vanishes_when_equal(teacher_dirs):
    torch.manual_seed(0)
    module = student(teacher_dirs)
    b = batch()
    cond, uncond = module.encode(b["prompt"])
    traj = module.sample_trajectories(module.model, cond, uncond, 3, torch.Generator().manual_seed(0))
    rows, steps = module.training_pairs(traj, None, torch.Generator().manual_seed(1), stochastic_only=False)
    target = module.teacher_means(traj, rows, steps, b["prompt"], b["task"])
    mean, std = module.kernel(module.model, traj, rows, steps, cond, uncond)
    per_step_kl(mean, target, std).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.net.parameters())
    assert all(p.grad is None for t in module.teachers.values() for p in t.parameters())

    same = student({"bright": teacher_dirs["bright"]}, model=teacher_dirs["bright"])
    b = batch(("bright", "bright"))
    cond, uncond = same.encode(b["prompt"])
    traj = same.sample_trajectories(same.model, cond, uncond, 2, torch.Generator().manual_seed(0))
    rows, steps = same.training_pairs(traj, None, torch.Generator().manual_seed(1), stochastic_only=False)
    same.model.eval()
    target = same.teacher_means(traj, rows, steps, b["prompt"], b["task"])
    mean, std = same.kernel(same.model, traj, rows, steps, cond, uncond)
    loss = per_step_kl(mean, target, std).mean()
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert all(float(p.grad.abs().max()) == 0.0 for p in same.model.net.parameters() if p.grad is not None)


def test_routing_sends_each_row_to_its_own_teacher(teacher_dirs):
    torch.manual_seed(0)
    module = student(teacher_dirs)
    b = batch(("bright", "dark", "bright"))
    cond, uncond = module.encode(b["prompt"])
    traj = module.sample_trajectories(module.model, cond, uncond, 3, torch.Generator().manual_seed(0))
    rows, steps = module.training_pairs(traj, None, torch.Generator().manual_seed(1), stochastic_only=False)
    routed = module.teacher_means(traj, rows, steps, b["prompt"], b["task"])
    for name in ("bright", "dark"):
        teacher = module.teachers[name]
        own = module.kernel(teacher, traj, rows, steps, teacher.encode_prompts(b["prompt"]), None)[0]
        mask = torch.tensor([b["task"][r] == name for r in rows.tolist()])
        torch.testing.assert_close(routed[mask], own[mask])
        assert not torch.allclose(routed[~mask], own[~mask])  # the teachers really differ
    # the training step computes every target before its updates, each teacher in calls of up to a rollout batch
    batched = module.teacher_means(traj, rows, steps, b["prompt"], b["task"], batch_size=4)
    torch.testing.assert_close(batched, routed, atol=1e-6, rtol=1e-5)


def test_sde_window_limits_the_trained_pairs_to_its_steps(teacher_dirs):
    module = student(teacher_dirs, sampling={"num_steps": 6, "sde_window": {"size": 2, "mode": "sliding"}},
                     updates={"timestep_fraction": 1.0})
    b = batch()
    cond, uncond = module.encode(b["prompt"])
    traj = module.sample_trajectories(module.model, cond, uncond, 3, torch.Generator().manual_seed(0))
    assert [float(s) > 0 for s in traj.stds] == [True, True, False, False, False, False]
    rows, steps = module.training_pairs(traj, None, torch.Generator().manual_seed(1), stochastic_only=False)
    assert sorted(steps.tolist()) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("sde_steps", [None, []], ids=["sde", "ode"])
def test_sde_and_ode_modes_train(teacher_dirs, sde_steps):
    torch.manual_seed(0)
    module = student(teacher_dirs, sampling={"sde_steps": sde_steps}, updates={"steps_per_sample": 2})
    loader = torch.utils.data.DataLoader([0], batch_size=1, collate_fn=lambda _: batch())
    trainer = L.Trainer(max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, loader)
    assert "train/kl/bright" in trainer.callback_metrics and "train/kl/dark" in trainer.callback_metrics
    assert math.isfinite(float(trainer.callback_metrics["train/kl"]))


def test_bad_input_errors(teacher_dirs, tmp_path):
    module = student(teacher_dirs)
    with pytest.raises(ValueError, match=r"tasks \['compress'\] are served by no teacher"):
        module.check_tasks(["bright", "compress"])
    with pytest.raises(ValueError, match="teachers is empty"):
        student({})
    build_embedded_model(resolution=16, block_channels=(16, 32), text_hidden=32).save_pretrained(tmp_path / "big")
    with pytest.raises(ValueError, match=r"teachers\['big'\] does not match the student.*sample_shape"):
        student({"big": str(tmp_path / "big")})
    build_embedded_model(**TINY, family="vp").save_pretrained(tmp_path / "vp")
    with pytest.raises(ValueError, match=r"teachers\['vp'\] does not match.*schedule vp"):
        student({"vp": str(tmp_path / "vp")})


def test_teacher_from_a_lightning_checkpoint(tmp_path):
    from lit_distill.methods import TeacherRL

    rl = TeacherRL("embedded", "brightness", {**TINY, "seed": 3}, sampling={"num_steps": 4, "rollouts_per_prompt": 2,
                   "eval_steps": 4}, updates={"minibatch_size": 8})
    loader = torch.utils.data.DataLoader([0], batch_size=1, collate_fn=lambda _: batch(("bright",)))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(rl, loader)
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    module = student({"bright": str(tmp_path / "teacher.ckpt")})
    for name, p in rl.model.net.state_dict().items():
        assert torch.equal(module.teachers["bright"].net.state_dict()[name], p), name
    with pytest.raises(FileNotFoundError, match="no such directory"):
        student({"bright": str(tmp_path / "missing.ckpt")})


def test_mean_weighting_turns_every_step_into_mean_matching(teacher_dirs):
    module = student(teacher_dirs, distill={"step_weighting": "mean"})
    steps = torch.arange(module.sampling.num_steps)
    mean_s, mean_t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    stds = torch.tensor(module.step_stds)
    for s in steps[stds > 0][:2]:
        weighted = per_step_kl(mean_s, mean_t, stds[s]) * module.step_weight(s.view(1))
        torch.testing.assert_close(weighted, (mean_s - mean_t).pow(2).flatten(1).sum(1))
    with pytest.raises(ValueError, match="step_weighting='x'"):
        student(teacher_dirs, distill={"step_weighting": "x"})


def test_timestep_fraction_leaves_out_the_last_steps(teacher_dirs):
    """DiffusionOPD's timestep_fraction 0.99: int(0.99 * N) steps, so the last one, whose kernel std is near zero
    on a flow grid, never enters the loss; 1.0 trains every step."""
    module = student(teacher_dirs, sampling={"num_steps": 5}, updates={"timestep_fraction": 0.99})
    b = batch()
    cond, uncond = module.encode(b["prompt"])
    traj = module.sample_trajectories(module.model, cond, uncond, 3, torch.Generator().manual_seed(0))
    rows, steps = module.training_pairs(traj, None, torch.Generator().manual_seed(1), stochastic_only=False)
    assert sorted(set(steps.tolist())) == [0, 1, 2, 3] and len(rows) == 3 * 4
    every = student(teacher_dirs, sampling={"num_steps": 5}, updates={"timestep_fraction": 1.0})
    assert sorted(set(every.training_pairs(traj, None, torch.Generator().manual_seed(1), False)[1].tolist())) == \
        list(range(5))
    assert module.step_stds[-1] < 0.1 * module.step_stds[0]  # why: the last flow step's std collapses
    with pytest.raises(ValueError, match="timestep_fraction=0.1"):
        student(teacher_dirs, sampling={"num_steps": 5}, updates={"timestep_fraction": 0.1})  # int(0.5) = 0 steps


def test_kl_dt_weighting_divides_by_the_noise_level_not_the_kernel_variance(teacher_dirs):
    """``kl_dt``: KL * (sigma_t - sigma_s) = ||mu_s - mu_T||^2 / (2 a^2 t / (1 - t)), the per-step loss of
    DiffusionOPD's training script with noise (Flow-GRPO's std_dev_t is a sqrt(t / (1 - t)), without sqrt(dt))."""
    module = student(teacher_dirs, distill={"step_weighting": "kl_dt"}, sampling={"noise_level": 0.7})
    grid = module.model.schedule.grid(module.sampling.num_steps)
    mean_s, mean_t = torch.randn(1, 1, 8, 8, dtype=torch.float64), torch.randn(1, 1, 8, 8, dtype=torch.float64)
    for step in range(module.sampling.num_steps - 1):  # the first step starts at t = 1, where 1 - t is read at s
        t = float(grid.sigma_t[step])
        weighted = per_step_kl(mean_s, mean_t, module.step_stds[step]) * module.step_weight(torch.tensor([step]))
        noise_var = 0.7**2 * t / (1 - t) if t < 1 else 0.7**2 * t / (1 - float(grid.sigma_s[step]))
        torch.testing.assert_close(weighted, (mean_s - mean_t).pow(2).sum().view(1) / (2 * noise_var))


def test_each_teacher_has_its_own_guidance_scale(teacher_dirs):
    """teacher_guidance: the routed teacher's kernel mean is computed with its own classifier-free guidance
    (prediction p_uncond + w (p_cond - p_uncond) of that teacher), whatever the student's scale."""
    from lit_distill.diffusion import guided_prediction

    module = student(teacher_dirs, teacher_guidance={"bright": 3.0})
    assert module.teacher_guidance == {"bright": 3.0, "dark": 1.0}
    b = batch(("bright", "dark", "bright"))
    cond, uncond = module.encode(b["prompt"])
    traj = module.sample_trajectories(module.model, cond, uncond, 3, torch.Generator().manual_seed(0))
    rows, steps = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    got = module.teacher_means(traj, rows, steps, b["prompt"], b["task"])
    grid = module.grid().at(steps)
    for i, (name, scale) in enumerate((("bright", 3.0), ("dark", 1.0), ("bright", 3.0))):
        teacher = module.teachers[name]
        x = traj.latents[rows[i:i + 1], steps[i:i + 1]]
        with torch.no_grad():
            prediction = guided_prediction(teacher, x, grid.timesteps[i:i + 1], teacher.encode_prompts([b["prompt"][i]]),
                                           teacher.null_cond(1), scale)
        expected = teacher.schedule.kernel(prediction.float(), x, module.grid().at(steps[i:i + 1]),
                                           traj.noise_levels[steps[i:i + 1]])[0]
        torch.testing.assert_close(got[i:i + 1], expected.float())
    with pytest.raises(ValueError, match=r"teacher_guidance names \['nobody'\]"):
        student(teacher_dirs, teacher_guidance={"nobody": 2.0})
