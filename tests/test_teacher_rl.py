"""TeacherRL: the policy-gradient math against brute force, and the module's contracts."""
import lightning as L
import pytest
import torch

from lit_distill.diffusion import gaussian_log_prob
from lit_distill.losses import RunningNormalizer, group_advantages, ppo_clip_loss
from lit_distill.methods.teacher_rl import TeacherRL
from lit_distill.rewards import Reward

TINY = {"resolution": 8, "block_channels": (16, 32), "text_hidden": 32}


def tiny_rl(sampling=None, updates=None, optim=None, **kwargs):
    defaults = dict(model="embedded", model_kwargs=TINY, reward="brightness",
                    sampling={"num_steps": 4, "rollouts_per_prompt": 4, "eval_steps": 4, **(sampling or {})},
                    updates={"minibatch_size": 16, **(updates or {})}, optim={"lr": 1e-4, **(optim or {})})
    defaults.update(kwargs)
    return TeacherRL(**defaults)


def prompt_batch(n=2):
    return {"prompt": ["a handwritten seven", "a handwritten one"][:n], "task": ["brightness"] * n,
            "digit": torch.tensor([7, 1][:n])}


def test_ppo_gradient_at_ratio_one_is_reinforce():
    torch.manual_seed(0)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 5, dtype=torch.float64)
    adv = torch.randn(6, dtype=torch.float64)
    log_prob = gaussian_log_prob(x.view(6, 5, 1, 1), theta.view(1, 5, 1, 1).expand(6, 5, 1, 1), torch.tensor(0.5, dtype=torch.float64))
    (g_ppo,) = torch.autograd.grad(ppo_clip_loss(log_prob, log_prob.detach(), adv, 0.2).sum(), theta, retain_graph=True)
    (g_reinforce,) = torch.autograd.grad(-(adv * log_prob).sum(), theta)
    torch.testing.assert_close(g_ppo, g_reinforce)


def test_ppo_clipping_zeroes_the_gradient_where_active():
    log_prob = torch.tensor([0.5, 0.5, -0.5, -0.5, 0.05], requires_grad=True)
    old = torch.zeros(5)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0])
    ppo_clip_loss(log_prob, old, adv, 0.2).sum().backward()
    # ratio e^0.5 > 1.2 with A > 0 and ratio e^-0.5 < 0.8 with A < 0 are clipped: no gradient
    assert log_prob.grad[0] == 0 and log_prob.grad[2] == 0
    # the pessimistic side keeps its gradient: -A * ratio
    torch.testing.assert_close(log_prob.grad[1], torch.exp(torch.tensor(0.5)))
    torch.testing.assert_close(log_prob.grad[3], -torch.exp(torch.tensor(-0.5)))
    torch.testing.assert_close(log_prob.grad[4], -torch.exp(torch.tensor(0.05)))


def test_group_advantages_are_standardised_per_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 20.0, 0.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(rewards, 4, eps=0.0 + 1e-12).view(3, 4)
    torch.testing.assert_close(adv[:2].mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv[:2].std(1, unbiased=False), torch.ones(2), atol=1e-5, rtol=0)
    assert torch.equal(adv[2], torch.zeros(4))  # equal rewards: no signal
    with pytest.raises(ValueError, match="group_size=1"):
        group_advantages(rewards, 1)
    with pytest.raises(ValueError, match="do not split"):
        group_advantages(rewards, 5)


def test_running_normalizer_matches_global_statistics():
    norm = RunningNormalizer(eps=0.0)
    a, b = torch.randn(7) * 3 + 1, torch.randn(5) * 2 - 4
    norm(a)
    out = norm(b)
    both = torch.cat([a, b]).double()
    torch.testing.assert_close(out.double(), (b.double() - both.mean()) / both.std(unbiased=False), atol=1e-6, rtol=1e-6)


def test_rollout_log_probs_give_ratio_one_before_any_update():
    torch.manual_seed(0)
    module = tiny_rl(sampling={"guidance_scale": 2.0, "sde_steps": [0, 1, 3]})
    batch = prompt_batch()
    cond, uncond = module.encode(batch["prompt"] * 2)
    traj = module.sample_trajectories(module.model, cond, uncond, 4, torch.Generator().manual_seed(0))
    rows, steps = module.training_pairs(traj, None, torch.Generator().manual_seed(1))
    assert set(steps.tolist()) == {0, 1, 3}
    module.model.eval()
    mean, std = module.kernel(module.model, traj, rows, steps, cond, uncond)
    log_probs = gaussian_log_prob(traj.latents[rows, steps + 1], mean, std)
    ratio = torch.exp(log_probs - traj.log_probs[rows, steps])
    # float32: the recomputation runs the net on other batch shapes than the rollout; with one CPU thread the
    # summed log-densities of a step then differ by up to ~3e-4
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-3, rtol=0)


def test_kl_to_identical_reference_is_zero_with_zero_gradient():
    torch.manual_seed(0)
    module = tiny_rl(policy={"kl_weight": 1.0})
    batch = prompt_batch()
    cond, uncond = module.encode(batch["prompt"])
    traj = module.sample_trajectories(module.model, cond, uncond, 2, torch.Generator().manual_seed(0))
    rows, steps = module.training_pairs(traj, None, torch.Generator().manual_seed(1))
    mean, std = module.kernel(module.model, traj, rows, steps, cond, uncond)
    from lit_distill.diffusion import gaussian_kl
    kl = gaussian_kl(mean, module.reference_mean(traj, rows, steps, cond, uncond), std).mean()
    assert float(kl.detach()) == 0.0
    kl.backward()
    grads = [p.grad for p in module.model.net.parameters() if p.grad is not None]
    assert grads and all(float(g.abs().max()) == 0.0 for g in grads)


def test_training_steps_run_and_log():
    torch.manual_seed(0)
    module = tiny_rl(updates={"steps_per_sample": 2, "inner_epochs": 2})
    loader = torch.utils.data.DataLoader([0, 1], batch_size=2, collate_fn=lambda _: prompt_batch())
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    before = [p.detach().clone() for p in module.model.net.parameters()]
    trainer.fit(module, loader)
    assert "train/reward" in trainer.callback_metrics and "train/clipfrac" in trainer.callback_metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, module.model.net.parameters()))


class BadShape(Reward):
    name = "bad_shape"

    def forward(self, images, prompts, tasks, **metadata):
        return torch.zeros(images.shape[0], 2)


class NaNReward(Reward):
    name = "nan_reward"

    def forward(self, images, prompts, tasks, **metadata):
        return torch.full((images.shape[0],), float("nan"))


def test_bad_input_errors_name_the_field():
    with pytest.raises(ValueError, match="no_such_reward"):
        tiny_rl(reward="no_such_reward")
    with pytest.raises(ValueError, match="rollouts_per_prompt=1"):
        tiny_rl(sampling={"rollouts_per_prompt": 1})
    with pytest.raises(ValueError, match="reference='lora_base' needs lora_rank"):
        tiny_rl(policy={"kl_weight": 0.1, "reference": "lora_base"})
    batch = prompt_batch()
    for reward, match in ((BadShape(), "bad_shape"), (NaNReward(), "nan_reward")):
        module = tiny_rl(reward=reward)
        with pytest.raises(ValueError, match=match):
            module.compute_rewards(torch.zeros(2, 1, 8, 8), batch)


def test_vp_models_train_with_the_same_code():
    torch.manual_seed(0)
    module = tiny_rl(model_kwargs={**TINY, "family": "vp"}, sampling={"noise_level": 1.0})
    assert module.model.schedule.family == "vp"
    loader = torch.utils.data.DataLoader([0, 1], batch_size=2, collate_fn=lambda _: prompt_batch())
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, loader)
    assert torch.isfinite(trainer.callback_metrics["train/policy_loss"])


def test_reward_callback_logs_per_task_writes_grids_and_keeps_the_best(tmp_path):
    from lit_distill.callbacks import RewardCallback

    rows = [{"prompt": "a handwritten seven", "task": "bright", "digit": 7},
            {"prompt": "a handwritten one", "task": "dark", "digit": 1}]
    reward = {"name": "per_task", "rewards": {"bright": {"name": "brightness", "target": 1.0},
                                              "dark": {"name": "brightness", "target": 0.0}}}
    callback = RewardCallback(rows, reward=reward, num_prompts=None, samples_per_prompt=2, every_n_steps=1,
                              output_dir=str(tmp_path))
    module = tiny_rl()
    loader = torch.utils.data.DataLoader([0, 1], batch_size=2, collate_fn=lambda _: prompt_batch())
    L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[callback]).fit(module, loader)
    first = callback.history[0]
    assert set(first) == {"step", "bright", "dark", "reward"} and first["step"] == 0
    assert first["reward"] == pytest.approx((first["bright"] + first["dark"]) / 2)
    assert len(callback.history) >= 2 and (tmp_path / "best.ckpt").is_file()
    assert len(list(tmp_path.glob("step_*.png"))) == len(callback.history)


def test_non_finite_losses_stop_with_the_step_and_tensor_named_or_are_skipped_and_counted():
    from lit_distill.methods import NonFiniteLossError

    module = tiny_rl()
    with pytest.raises(NonFiniteLossError, match="policy loss is NaN at global step 0.*nan_policy='skip'"):
        module.check_finite("policy loss", torch.tensor(float("nan")))
    module = tiny_rl(runtime={"nan_policy": "skip"})
    assert module.check_finite("policy loss", torch.tensor(float("inf"))) is False
    assert module.nonfinite_skipped == 1
    with pytest.raises(ValueError, match="nan_policy='ignore'"):
        tiny_rl(runtime={"nan_policy": "ignore"})


def test_reward_callback_spreads_prompts_over_tasks_and_labels_its_grid(tmp_path):
    from PIL import Image

    from lit_distill.callbacks import RewardCallback
    from lit_distill.callbacks.reward import spread_over_tasks

    rows = [{"prompt": f"a handwritten {w}", "task": t} for t in ("bright", "dark") for w in ("one", "two", "three")]
    assert spread_over_tasks(rows, 3) == [0, 1, 3] and spread_over_tasks(rows[:3], 2) == [0, 1]
    reward = {"name": "per_task", "rewards": {"bright": {"name": "brightness", "target": 1.0},
                                              "dark": {"name": "brightness", "target": 0.0}}}
    callback = RewardCallback(rows, reward=reward, num_prompts=2, samples_per_prompt=2, every_n_steps=0,
                              output_dir=str(tmp_path), save_best=False, eval_at_start=False)
    assert [row["task"] for row in callback.rows] == ["bright", "bright", "dark", "dark"]
    module = tiny_rl()
    scored = callback.score(module, grid=tmp_path / "base.png")  # no trainer needed
    assert set(scored) == {"bright", "dark", "reward"}
    loader = torch.utils.data.DataLoader([0, 1], batch_size=2, collate_fn=lambda _: prompt_batch())
    L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[callback]).fit(module, loader)
    assert [h["step"] for h in callback.history] == [callback.history[-1]["step"]]  # no evaluation at start
    grids = sorted(tmp_path.glob("step_*.png"))
    assert [g.name for g in grids] == [f"step_{callback.history[-1]['step']:06d}.png"]
    with Image.open(grids[0]) as grid:  # a row per prompt (2 samples each), a label left of it
        cell = module.model.sample_shape[-1] * 3 + 2
        assert grid.size[1] == 2 * cell + 2 and grid.size[0] > 2 * cell + 2


def test_sde_window_makes_only_its_steps_stochastic_and_trained():
    """Flow-GRPO-Fast's window: in each training step the rollout is stochastic exactly on the window's steps (ODE
    elsewhere), only those steps enter the loss, and the position is a function of (seed, step)."""
    torch.manual_seed(0)
    module = tiny_rl(sampling={"num_steps": 6, "sde_window": {"size": 2}}, updates={"minibatch_size": 4})
    seen_windows = set()
    calls = []
    original_kernel = module.kernel

    def recording_kernel(model, traj, rows, steps, *args, **kwargs):
        if torch.is_grad_enabled():
            calls.append((module.current_step, set(steps.tolist())))
        return original_kernel(model, traj, rows, steps, *args, **kwargs)

    module.kernel = recording_kernel
    original_rollout = module.sample_trajectories
    rollouts = []

    def recording_rollout(*args, **kwargs):
        traj = original_rollout(*args, **kwargs)
        rollouts.append((module.current_step, traj))
        return traj

    module.sample_trajectories = recording_rollout
    loader = torch.utils.data.DataLoader(list(range(6)), batch_size=2, collate_fn=lambda _: prompt_batch())
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    before = [p.detach().clone() for p in module.model.net.parameters()]
    trainer.fit(module, loader)
    assert len(rollouts) == 6 and len(calls) == 6 * 4  # 16 window pairs per step in 4 updates
    for step, traj in rollouts:
        window = module.window_steps(step)
        seen_windows.add(window.start)
        assert len(window) == 2 and 0 <= window.start and window.stop <= 6
        stochastic = [i for i in range(6) if float(traj.stds[i]) > 0]
        assert stochastic == list(window)  # noisy exactly on the window
        outside = traj.log_probs[:, [i for i in range(6) if i not in window]]
        assert torch.equal(outside, torch.zeros_like(outside)) and bool((traj.log_probs[:, list(window)] != 0).all())
        trained = set().union(*(s for k, s in calls if k == step))
        assert trained == set(window)  # every window step trains, no other
    assert len(seen_windows) > 1  # the window moves between rollout batches
    assert any(not torch.equal(a, b) for a, b in zip(before, module.model.net.parameters()))
    # resumable and rank-independent: a function of (seed, step) alone
    again = tiny_rl(sampling={"num_steps": 6, "sde_window": {"size": 2}})
    assert [again.window_steps(k) for k in range(6)] == [module.window_steps(k) for k in range(6)]
    other_seed = tiny_rl(sampling={"num_steps": 6, "sde_window": {"size": 2}}, runtime={"seed": 1})
    assert [other_seed.window_steps(k) for k in range(20)] != [module.window_steps(k) for k in range(20)]


def test_sliding_sde_window_moves_as_mixgrpo_and_rolls_back():
    module = tiny_rl(sampling={"num_steps": 6, "sde_window": {"size": 2, "mode": "sliding", "shift_every": 2,
                                                               "range": [1, 6]}})
    starts = [module.window_steps(k).start for k in range(10)]
    assert starts == [1, 1, 2, 2, 3, 3, 4, 4, 1, 1]  # windows [1,2] .. [4,5], then back to the start
    assert module.rollout_levels() == [0.0, 0.7, 0.7, 0.0, 0.0, 0.0]  # step 0: the window [1, 2]


def test_sde_window_settings_are_checked():
    with pytest.raises(ValueError, match="either sde_steps"):
        tiny_rl(sampling={"sde_steps": [0, 1], "sde_window": {"size": 2}})
    with pytest.raises(ValueError, match="must lie within the trained steps"):
        tiny_rl(sampling={"num_steps": 4, "sde_window": {"size": 2, "range": [0, 4]}}, updates={"timestep_fraction": 0.5})
    with pytest.raises(ValueError, match="must hold size=3"):
        tiny_rl(sampling={"sde_window": {"size": 3, "range": [0, 2]}})
    with pytest.raises(ValueError, match="choose one of"):
        tiny_rl(sampling={"sde_window": {"mode": "spiral"}})
