"""One-step students: the score-distillation and density-ratio gradients by hand, DisBack's stages, smoke runs."""
import math
from dataclasses import replace

import lightning as L
import pytest
import torch

from lit_distill.data import ImageDataModule
from lit_distill.diffusion import from_x0_eps
from lit_distill.losses.density_ratio import (
    classifier_loss, density_ratio_generator_loss, generator_loss_js, generator_loss_kl,
)
from lit_distill.losses.score_distillation import (
    WEIGHTINGS, score_distillation_from_predictions, score_distillation_loss, score_weight,
)
from lit_distill.methods.disback import DisBackStudent
from lit_distill.methods.nodistill import NoDistillOneStep
from lit_distill.models import DiffusionModel
from lit_distill.utils.checkpoint_files import side_file_state

TINY = dict(resolution=8, block_channels=(16, 32), text_hidden=32)


# -- score distillation ------------------------------------------------------------------------------
def linear_generator(batch=5, dim=6, seed=0):
    """x0 = z W^T + b on flattened pixels, everything float64; returns (W, b, z, eps, alpha, sigma)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(dim, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(dim, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(batch, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    alpha = torch.rand(batch, 1, generator=g, dtype=torch.float64) * 0.8 + 0.1
    return W, b, z, eps, alpha, (1 - alpha**2).sqrt()


def test_surrogate_gradient_equals_weighted_score_difference():
    W, b, z, eps, alpha, sigma = linear_generator()
    g = torch.Generator().manual_seed(1)
    s_fake, s_real = (torch.randn(eps.shape, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.rand(z.shape[0], generator=g, dtype=torch.float64) + 0.5
    x_t = alpha * (z @ W.T + b) + sigma * eps
    score_distillation_loss(x_t.view(-1, 1, 2, 3), s_fake.view(-1, 1, 2, 3), s_real.view(-1, 1, 2, 3), w).backward()
    # by hand: d x_t / dW[i, j] = alpha z_j on pixel i; the surrogate averages over the batch
    direction = w[:, None] * (s_fake - s_real) * alpha  # [B, D]
    assert torch.allclose(W.grad, direction.T @ z / z.shape[0], atol=1e-12)
    assert torch.allclose(b.grad, direction.sum(0) / z.shape[0], atol=1e-12)


def test_equal_scores_give_zero_gradient():
    W, b, z, eps, alpha, sigma = linear_generator()
    x_t = alpha * (z @ W.T + b) + sigma * eps
    s = torch.randn(eps.shape, dtype=torch.float64)
    score_distillation_loss(x_t, s, s.clone(), torch.ones(z.shape[0], dtype=torch.float64)).backward()
    assert W.grad.abs().max() == 0 and b.grad.abs().max() == 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("normalize", [False, True])
def test_weightings_give_documented_gradient_on_x0(prediction_type, weighting, normalize):
    """From network predictions: x0 weighting -> x0_fake - x0_real, eps -> eps_real - eps_fake, and
    generally w alpha (s_fake - s_real) with s = -eps_hat / sigma; DMD divides by mean|x0 - x0_real|."""
    g = torch.Generator().manual_seed(2)
    B, shape = 4, (4, 1, 3, 3)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(B, 1, 1, 1, generator=g, dtype=torch.float64) * 0.8 + 0.1
    sigma = (1 - alpha**2).sqrt()
    x_t = alpha * x0 + sigma * torch.randn(shape, generator=g, dtype=torch.float64)
    x0_fake, x0_real = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    eps_of = lambda x0_hat: (x_t.detach() - alpha * x0_hat) / sigma  # noqa: E731
    pred_fake = from_x0_eps(x0_fake, eps_of(x0_fake), alpha, sigma, prediction_type)
    pred_real = from_x0_eps(x0_real, eps_of(x0_real), alpha, sigma, prediction_type)
    out = score_distillation_from_predictions(x_t, pred_fake, pred_real, alpha, sigma, prediction_type,
                                              weight=weighting, normalize=normalize, x0=x0.detach())
    out.loss.backward()
    expected = {"x0": x0_fake - x0_real, "eps": eps_of(x0_real) - eps_of(x0_fake)}.get(
        weighting, score_weight(alpha, sigma, weighting) * alpha * alpha * (x0_fake - x0_real) / sigma**2)
    if normalize:
        expected = expected / (x0.detach() - x0_real).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    assert torch.allclose(x0.grad, expected / B, atol=1e-9)
    assert torch.allclose(out.x0_fake, x0_fake) and torch.allclose(out.x0_real, x0_real)


# -- density ratio -----------------------------------------------------------------------------------
def test_density_ratio_generator_gradients():
    """KL: -w grad_x d; JS: -w sigmoid(d)/2 grad_x d, for an analytic logit d(x) = x^T A x + c^T x."""
    g = torch.Generator().manual_seed(3)
    A, c = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, generator=g, dtype=torch.float64)
    d = lambda x: ((x @ A) * x).sum(-1) + x @ c  # noqa: E731
    grad_d = x.detach() @ (A + A.T) + c
    generator_loss_kl(d(x), w).backward()
    assert torch.allclose(x.grad, -w[:, None] * grad_d / 5)
    x.grad = None
    density_ratio_generator_loss(d(x), "js", w).backward()
    assert torch.allclose(x.grad, -w[:, None] * torch.sigmoid(d(x.detach()))[:, None] / 2 * grad_d / 5)
    assert torch.allclose(generator_loss_js(torch.zeros(2)), torch.tensor(-math.log(2) / 2))


def test_logistic_classifier_recovers_log_density_ratio():
    """Data N(m1, s1^2 I) and generator N(m2, s2^2 I), both noised at a fixed t (alpha, sigma): the noised
    marginals are Gaussian and the optimal logit is their log ratio, quadratic in x. A classifier in that
    family (features x, x^2), trained with classifier_loss on 20k samples a side, matches it to within a mean
    absolute error of 0.06 nats (max 0.3 in the data's 2-sigma region)."""
    alpha, sigma = 0.8, 0.6
    m1, s1 = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.7
    m2, s2 = torch.tensor([0.0, 0.3], dtype=torch.float64), 1.4
    v1, v2 = alpha**2 * s1**2 + sigma**2, alpha**2 * s2**2 + sigma**2
    g = torch.Generator().manual_seed(4)
    noised = lambda m, s, n: alpha * (m + s * torch.randn(n, 2, generator=g, dtype=torch.float64)) \
        + sigma * torch.randn(n, 2, generator=g, dtype=torch.float64)  # noqa: E731
    real, fake = noised(m1, s1, 20000), noised(m2, s2, 20000)
    log_ratio = lambda x: (-(x - alpha * m1).pow(2).sum(-1) / (2 * v1) + (x - alpha * m2).pow(2).sum(-1) / (2 * v2)
                           - math.log(v1 / v2))  # noqa: E731
    params = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    logit = lambda x: torch.cat([x, x**2], -1) @ params[:4] + params[4]  # noqa: E731
    opt = torch.optim.LBFGS([params], lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = classifier_loss(logit(real), logit(fake))
        loss.backward()
        return loss

    opt.step(closure)
    x = noised(m1, s1, 4000)
    central = (x - alpha * m1).pow(2).sum(-1) < 4 * v1
    err = (logit(x) - log_ratio(x)).abs().detach()
    assert err.mean() < 0.06 and err[central].max() < 0.3, (err.mean(), err[central].max())


# -- modules -----------------------------------------------------------------------------------------
def trainer(steps: int, **kw) -> L.Trainer:
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, **kw)


@pytest.fixture(scope="module")
def data():
    return ImageDataModule(resolution=8, batch_size=2)


def params_distance(state, reference):
    return math.sqrt(sum(float((state[k].float() - reference[k].float()).pow(2).sum()) for k in reference))


def test_disback_stages_checkpoints_ordered_and_resumable(tmp_path, data):
    """The recording keeps candidates in order (each further from the teacher); a run saved mid-recording resumes
    with its candidates, recording losses and stage, ends the recording (here at max_recording_updates), goes on
    to backtrack, and a checkpoint saved mid-backtracking restores the stage, the path and the current target."""
    torch.manual_seed(0)
    stages = {"num_checkpoints": 3, "degradation_interval": 2, "max_recording_updates": 6, "recording_patience": 10,
              "iterations_per_stage": 1}
    kw = dict(stages=stages, optim={"lr": 1e-3}, checkpoint_dir=str(tmp_path / "path"), runtime={"seed": 0})
    first, t1 = DisBackStudent("embedded", TINY, **kw), trainer(3)
    t1.fit(first, data)  # 3 fake-score updates: one candidate kept, still recording
    assert first.stage_schedule.stage == 0 and len(first.candidates) == 1 and first.generator_updates == 0
    assert first.recording_updates == 3 and not first.path
    ckpt = tmp_path / "mid_stage1.ckpt"
    t1.save_checkpoint(ckpt)

    resumed = DisBackStudent("embedded", TINY, **kw)
    t2 = trainer(7)  # 6 recording steps, then one step of (fake-score, generator) updates
    t2.fit(resumed, data, ckpt_path=ckpt)
    assert resumed.recording_updates == 6 and not resumed.candidates
    assert [p.split("/")[-1] for p in resumed.path] == [f"degradation_{k:06d}.pt" for k in (2, 4, 6)]
    assert resumed.generator_updates == 1 and resumed.stage_schedule.stage == 2  # 1 update per stage: now at target c_1
    teacher = resumed.teacher.net.state_dict()
    path = [torch.load(p, weights_only=True) for p in resumed.path]
    distances = [params_distance(c, teacher) for c in path]
    assert 0 < distances[0] < distances[1] < distances[2], distances

    ckpt2 = tmp_path / "mid_stage2.ckpt"
    t2.save_checkpoint(ckpt2)
    loaded = DisBackStudent.load_from_checkpoint(ckpt2)
    schedule = loaded.stage_schedule
    assert schedule.stage == 2 and loaded.path == resumed.path and schedule.target_index(2) == 1
    assert params_distance(loaded.real_score.net.state_dict(), path[0]) == 0
    schedule.next_stage()  # the last stage's target is the teacher
    loaded.load_target()
    assert schedule.target_index() == 0 and params_distance(loaded.real_score.net.state_dict(), teacher) == 0


def test_disback_recording_runs_until_the_loss_converges_and_spreads_its_path():
    """``BacktrackingSchedule.recording_converged``: the last ``recording_patience`` losses improve by less than
    ``recording_tol`` on the ones before (or the cap). ``path_indices``: candidates at equal steps of the smoothed loss between the start
    (the teacher's score on g_0) and the end (the converged score), not at equal numbers of updates."""
    module = DisBackStudent("embedded", TINY, stages={"num_checkpoints": 4, "recording_patience": 10,
                                                      "recording_tol": 0.01, "max_recording_updates": 500})
    schedule = module.stage_schedule
    losses = [1.0 + 9.0 * math.exp(-u / 20) for u in range(400)]  # falls fast, then flattens at 1
    stop = next(u for u in range(1, 401) if schedule.recording_converged(losses[:u]))
    assert 100 < stop < 200  # converged once 10 more updates gain < 1%: 1 + 9 exp(-u/20) flat to 1%
    assert not schedule.recording_converged(losses[:stop - 1])
    assert schedule.recording_converged([1.0] * 500)  # the cap
    updates = list(range(5, stop + 1, 5))  # a candidate every 5 updates, the converged state last
    chosen = schedule.path_indices(updates, losses[:stop])
    assert len(chosen) == 4 and chosen[-1] == len(updates) - 1 and chosen == sorted(set(chosen))
    k = schedule.stages.recording_patience
    smooth = [sum(losses[max(0, u - k):u]) / len(losses[max(0, u - k):u]) for u in updates]
    start, end = sum(losses[:k]) / k, smooth[-1]
    fractions = [(start - smooth[i]) / (start - end) for i in chosen]
    assert all(abs(f - j / 4) < 0.1 for f, j in zip(fractions[:3], (1, 2, 3))), fractions
    assert updates[chosen[0]] < 40  # the first target sits early, where the loss still falls fast


@pytest.mark.parametrize("kind", ["disback_memory", "diff_instruct_vp", "nodistill_kl", "nodistill_js_random"])
def test_modules_run_a_few_steps(kind, data, tmp_path):
    torch.manual_seed(0)
    if kind == "disback_memory":
        module = DisBackStudent("embedded", TINY, stages={"num_checkpoints": 2, "degradation_interval": 1,
                                                          "max_recording_updates": 2, "iterations_per_stage": 1})
    elif kind == "diff_instruct_vp":
        module = DisBackStudent("embedded", {**TINY, "family": "vp"}, backtracking=False, real_guidance_scale=2.0,
                                optim={"aux_updates_per_generator_update": 2})
    elif kind == "nodistill_kl":
        module = NoDistillOneStep("embedded", TINY, divergence="kl")
    else:
        module = NoDistillOneStep("embedded", TINY, divergence="js", generator={"init": "random"},
                                  classifier={"init": "random"})
    before = {k: v.clone() for k, v in module.model.net.state_dict().items()}
    t = trainer(5)
    t.fit(module, data)
    assert module.generator_updates >= 1
    assert params_distance(module.model.net.state_dict(), before) > 0  # the generator moved
    if kind == "disback_memory":
        assert module.stage_schedule.stage == 2 and len(module.path) == 2 and isinstance(module.path[0], dict)
        t.save_checkpoint(tmp_path / "m.ckpt")
        loaded = DisBackStudent.load_from_checkpoint(tmp_path / "m.ckpt")
        assert loaded.stage_schedule.stage == 2 and all(params_distance(side_file_state(a), side_file_state(b)) == 0
                                                        for a, b in zip(loaded.path, module.path))  # kept inside
    images = module.sample(3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 8, 8) and images.abs().max() <= 1
    exported = DiffusionModel.from_pretrained(module.export(tmp_path / "generator"))
    with module.ema.swap(module.generator):
        ema_weights = {k: v.clone() for k, v in module.model.net.state_dict().items()}
    assert params_distance(exported.net.state_dict(), ema_weights) == 0


def test_nodistill_classifier_is_truncated_backbone():
    module = NoDistillOneStep("embedded", TINY)
    frozen = {n.split(".")[0] for n, p in module.classifier.backbone.net.named_parameters() if not p.requires_grad}
    assert {"up_blocks", "conv_out"} <= frozen and "down_blocks" not in frozen
    x = torch.randn(2, 1, 8, 8)
    cond = module.encode(["a handwritten one", "a handwritten two"])
    logit = module.classifier(x, torch.tensor([100.0, 900.0]), cond)
    assert logit.shape == (2,) and torch.all(logit == 0)  # zero-initialised last layer: ratio 1 at start
    with pytest.raises(ValueError, match="feature_layer"):
        NoDistillOneStep("embedded", TINY, classifier={"feature_layer": "nope"})


def test_disback_switch_rules():
    module = DisBackStudent("embedded", TINY, stages={"switch_rule": "plateau", "plateau_patience": 3,
                                                      "plateau_tol": 0.1, "iterations_per_stage": 100})
    schedule = module.stage_schedule
    assert schedule.should_advance(6, [1.0] * 6)  # no improvement over the last 3 updates
    assert not schedule.should_advance(6, [2, 2, 2, 1, 1, 1])  # still improving
    assert not schedule.should_advance(5, [1.0] * 5)  # too few updates to judge
    assert schedule.should_advance(100, [])  # the cap
    schedule.stages = replace(schedule.stages, switch_rule="fixed")
    assert not schedule.should_advance(99, [1.0] * 6) and schedule.should_advance(100, [])
    with pytest.raises(ValueError, match="switch_rule"):
        DisBackStudent("embedded", TINY, stages={"switch_rule": "sometimes"})


def test_disback_recording_ends_when_the_loss_converges_and_spreads_the_path_along_the_loss():
    """BacktrackingSchedule: a candidate every degradation_interval updates, the end once the mean DSM loss of the
    last recording_patience updates improves by less than recording_tol on the patience before (or at
    max_recording_updates), and a path chosen at equal steps of the smoothed loss, not bunched at its flat end."""
    from lit_distill.methods import BacktrackingSchedule
    from lit_distill.methods.settings import Stages

    schedule = BacktrackingSchedule(Stages(num_checkpoints=3, degradation_interval=2, recording_patience=2,
                                           recording_tol=0.1, max_recording_updates=100))
    losses = [10, 8, 6, 4, 3, 2.5, 2.4, 2.35, 2.33]
    events = [schedule.fake_score_updated(torch.tensor(loss)) for loss in losses]
    # update 9: the last two (2.34 on average) improve on the two before (2.45) by 4.5% < 10%: converged
    assert events == [None, "keep", None, "keep", None, "keep", None, "keep", "finish"]
    # smoothed losses of the candidates at updates 2, 4, 6, 8, 9: 9, 5, 2.75, 2.375, 2.34; targets 6.78 and 4.56
    assert schedule.path_indices([2, 4, 6, 8, 9], schedule.recording_losses) == [1, 2, 4]
    schedule.recording_finished(3)
    assert schedule.stage == 1 and schedule.target_index() == 2 and schedule.fake_score_updated(torch.tensor(1.0)) is None
    capped = BacktrackingSchedule(Stages(degradation_interval=5, max_recording_updates=3))
    assert [capped.fake_score_updated(torch.tensor(1.0)) for _ in range(3)] == [None, None, "finish"]
