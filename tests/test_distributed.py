"""Multi-process training: DDP and FSDP keep every rank's weights equal and match one process.

The processes are launched the way torchrun does (environment variables ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR/PORT`` in each spawned process), so Lightning creates no launcher of its own
and the same helper runs DDP and FSDP, on CPU (gloo) and on GPUs (NCCL).

Equal-global-batch comparisons. Rollout noise is drawn from ``seed + global_step * 1009 + rank``, so one
process with the global batch draws different noise from two ranks with half of it each. The tests use
:class:`VirtualRanksRL`, which overrides only the ``sample_trajectories`` seam: the rollout batch of a
process is split into ``virtual_world / world_size`` parts and part ``j`` of rank ``r`` is drawn from the
generator of *virtual rank* ``r * parts + j``. One process with ``virtual_world=2`` then rolls out exactly
the union of what two ranks roll out (same noise, same prompts). Every (sample, step) pair is trained in
one minibatch per step (``steps_per_sample=None``, ``minibatch_size`` = pairs per process), so the mean
loss over the union equals the average of the two ranks' means, which is what DDP's gradient averaging
computes; only the order of summation differs. On CPU in float32 the rewards then agree to 1e-5 and, trained with plain SGD,
the weight updates to 5e-4 of their size (Adam would amplify rounding of ~0 gradient elements); on GPUs in
bf16 the tests compare the difference with that caused by changing the rollout seed (a statistical
yardstick: bf16 rounding must move the result far less than new noise does).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from lit_distill.diffusion import Trajectory
from lit_distill.distributed import (
    DiffusionDDPStrategy, DiffusionFSDPStrategy, check_fsdp_supported, fsdp_block_classes,
    needs_find_unused_parameters)
from lit_distill.lightning_internals import ddp_find_unused_parameters
from lit_distill.methods.teacher_rl import TeacherRL

ROOT = Path(__file__).resolve().parents[1]
TINY = {"resolution": 8, "block_channels": (16, 32), "text_hidden": 32}
PROMPT = "a handwritten seven"


class VirtualRanksRL(TeacherRL):
    """TeacherRL whose rollouts are drawn as ``virtual_world`` ranks would draw them (see module docstring)."""

    def __init__(self, virtual_world: int = 2, sgd_lr: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.virtual_world, self.sgd_lr = virtual_world, sgd_lr

    def make_optimizer(self, params, lr=None):
        """Plain SGD when ``sgd_lr`` is set: the update is then linear in the averaged gradient, so the
        comparison measures the gradient reduction itself (Adam's first steps divide every element by its
        own size and turn summation-order rounding of ~0 gradients into +-lr)."""
        if self.sgd_lr is None:
            return super().make_optimizer(params, lr)
        return torch.optim.SGD([p for p in params if p.requires_grad], lr=self.sgd_lr)

    @torch.no_grad()
    def sample_trajectories(self, model, cond, uncond, batch_size, generator):
        world = self.trainer.world_size if self._trainer is not None else 1
        parts = self.virtual_world // world
        size = batch_size // parts
        rank = self.trainer.global_rank if self._trainer is not None else 0
        trajs = []
        for j in range(parts):
            gen = torch.Generator(self.device).manual_seed(self.seed + self.global_step * 1009 + rank * parts + j)
            pick = lambda c: None if c is None else {k: v[j * size:(j + 1) * size] for k, v in c.items()}  # noqa: E731
            trajs.append(super().sample_trajectories(model, pick(cond), pick(uncond), size, gen))
        return Trajectory.cat(trajs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, fn: str, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.save(globals()[fn](world=world, **kwargs), Path(out) / f"rank{rank}.pt")


def launch(world: int, tmp_path: Path, fn: str = "train_rl", **kwargs) -> list[dict]:
    """Run ``fn`` (:func:`train_rl`) in ``world`` processes (in this process when ``world == 1``); the
    per-rank results."""
    if world == 1:
        return [globals()[fn](world=1, **kwargs)]
    tmp_path.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path), fn, kwargs), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


class Record(L.Callback):
    """Global mean reward of each step (all-gathered: ranks hold equal-size halves) and the full weights of
    the trained net at the end of training."""

    def __init__(self):
        self.rewards, self.final = [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        local = trainer.callback_metrics["train/reward"].detach().to(pl_module.device)
        self.rewards.append(float(pl_module.all_gather(local).float().mean()))

    def on_train_end(self, trainer, pl_module):
        self.final = full_net_state(pl_module)


def full_net_state(module) -> dict:
    """The trained net's parameters as full float32 CPU tensors (gathered from FSDP2 shards; every rank
    must call it)."""
    from torch.distributed.tensor import DTensor

    return {k.replace("_checkpoint_wrapped_module.", ""):
            (v.full_tensor() if isinstance(v, DTensor) else v).detach().float().cpu().clone()
            for k, v in module.model.net.named_parameters()}


def train_rl(world: int, strategy: str = "ddp", accelerator: str = "cpu", precision: str = "32-true",
             prompts: int = 4, group_size: int = 4, num_steps: int = 4, batches: int = 2, seed: int = 0,
             virtual: bool = True, epochs: int = 1, save: str | None = None, resume: str | None = None,
             strategy_kwargs: dict | None = None, module_kwargs: dict | None = None,
             sgd_lr: float | None = None) -> dict:
    """Fit TeacherRL (``VirtualRanksRL`` when ``virtual``) for ``epochs`` x ``batches`` steps with ``prompts``
    prompts in the global batch (resuming from ``resume``; saving a checkpoint to ``save`` at the end);
    returns the initial and final weights of the denoiser, the step count and the rewards."""
    torch.manual_seed(0)
    per_rank = prompts // world
    pairs = per_rank * group_size * num_steps
    cls, extra = (VirtualRanksRL, {"virtual_world": 2, "sgd_lr": sgd_lr}) if virtual else (TeacherRL, {})
    module = cls(model="embedded", model_kwargs=TINY, reward="brightness",
                 sampling={"num_steps": num_steps, "rollouts_per_prompt": group_size, "eval_steps": num_steps},
                 updates={"minibatch_size": pairs if virtual else max(1, pairs // 4)},
                 optim={"lr": 1e-3}, runtime={"seed": seed}, **extra, **(module_kwargs or {}))
    initial = full_net_state(module)
    data = [{"prompt": PROMPT, "task": "brightness"}] * (prompts * batches)
    loader = torch.utils.data.DataLoader(
        data, batch_size=per_rank, collate_fn=lambda rows: {"prompt": [r["prompt"] for r in rows],
                                                           "task": [r["task"] for r in rows]})
    if world == 1:
        strat = "auto"
    elif strategy == "fsdp":
        strat = DiffusionFSDPStrategy(**(strategy_kwargs or {}))
    else:
        strat = DiffusionDDPStrategy(**(strategy_kwargs or {}))
    record = Record()
    trainer = L.Trainer(accelerator=accelerator, devices=world, strategy=strat, precision=precision,
                        max_epochs=epochs, limit_train_batches=batches, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[record])
    trainer.fit(module, loader, ckpt_path=resume)
    if save:
        trainer.save_checkpoint(save)
    return {"initial": initial, "final": record.final, "global_step": trainer.global_step, "rewards": record.rewards}


def train_disback(world: int) -> dict:
    """Four training steps of Diff-Instruct (DisBack without backtracking) under DiffusionDDPStrategy."""
    from lit_distill.data import ImageDataModule
    from lit_distill.methods.disback import DisBackStudent

    torch.manual_seed(0)
    module = DisBackStudent("embedded", TINY, backtracking=False, optim={"lr": 1e-3})
    initial = {k: v.detach().clone() for k, v in module.named_parameters()}
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=DiffusionDDPStrategy(), max_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module, ImageDataModule(resolution=8, batch_size=2))
    return {"initial": initial, "final": {k: v.detach().clone() for k, v in module.named_parameters()},
            "find_unused": ddp_find_unused_parameters(trainer.strategy)}


def relative_difference(a: dict, b: dict, initial: dict) -> float:
    """``||(a - initial) - (b - initial)|| / ||a - initial||``: how much two updates of the same start differ."""
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
    den = sum(float((a[k] - initial[k]).pow(2).sum()) for k in a) ** 0.5
    return num / den


# -- CPU ---------------------------------------------------------------------------------------------
def test_ddp_ranks_hold_identical_weights_after_teacher_rl_steps(tmp_path):
    """Two gloo processes, TeacherRL with 4 minibatch updates (4 manual backward + step) per training step:
    Lightning's manual_backward prepares the DDP reducer before every backward, so every update is
    all-reduced and both ranks end with identical weights. (With a plain ``loss.backward()`` only the first
    backward after DDP's forward is synchronised and the ranks drift apart: checked once by hand, 8e-3.)"""
    ranks = launch(2, tmp_path, strategy="ddp", virtual=False, batches=1)
    assert ranks[0]["global_step"] == 1  # one training step: 2 prompts x 4 rollouts x 4 steps = 32 pairs per rank, minibatch 8
    for k in ranks[0]["final"]:
        assert torch.equal(ranks[0]["final"][k], ranks[1]["final"][k]), k
    assert any(not torch.equal(ranks[0]["final"][k], ranks[0]["initial"][k]) for k in ranks[0]["final"])


SGD_LR = 0.5  # with the gradient clipped to norm 1: a visible update of every weight in float32


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return launch(1, tmp_path_factory.mktemp("single"), sgd_lr=SGD_LR)[0]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_the_same_global_batch(strategy, one_process, tmp_path):
    """fp32 on CPU: one process rolling out both virtual ranks' samples and two ranks (DDP, or
    DiffusionFSDPStrategy on gloo) reach the same rewards and weights after two steps. Trained with plain
    SGD, so the weights differ only through the summation order of the averaged gradient (float32 rounding,
    carried through the second step's rollouts and group-normalised advantages: 5e-5 of the update); with AdamW the same comparison gave 4e-4 on one CPU and 2.2e-3 on another, because Adam's first steps
    turn the rounding of ~0 gradient elements into +-lr. A new rollout seed moves the update by ~100%."""
    single, ranks = one_process, launch(2, tmp_path, strategy=strategy, sgd_lr=SGD_LR)
    assert single["global_step"] == ranks[0]["global_step"] == 2
    assert relative_difference(ranks[0]["final"], ranks[1]["final"], single["initial"]) == 0.0
    assert relative_difference(single["final"], ranks[0]["final"], single["initial"]) < 5e-4  # 5e-5 measured
    assert ranks[0]["rewards"] == pytest.approx(single["rewards"], rel=1e-5, abs=1e-6)


def test_fsdp_checkpoint_resumes_exactly(tmp_path):
    """Two FSDP ranks: one step, a checkpoint (one file with the full state), a resumed second step, gives
    the weights of two uninterrupted steps (optimizer moments restored by name, not by position)."""
    ckpt = str(tmp_path / "step1.ckpt")
    straight = launch(2, tmp_path / "straight", strategy="fsdp", virtual=False, batches=1, epochs=2)
    launch(2, tmp_path / "first", strategy="fsdp", virtual=False, batches=1, epochs=1, save=ckpt)
    resumed = launch(2, tmp_path / "resumed", strategy="fsdp", virtual=False, batches=1, epochs=2, resume=ckpt)
    assert resumed[0]["global_step"] == straight[0]["global_step"] == 2  # one step per epoch
    assert relative_difference(straight[0]["final"], resumed[0]["final"], straight[0]["initial"]) < 1e-5
    state = torch.load(ckpt, weights_only=False)["state_dict"]  # plain full tensors: loads on one device
    assert state["model.net.conv_in.weight"].shape == straight[0]["initial"]["conv_in.weight"].shape


def test_fsdp_without_block_classes_names_the_model():
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.SiLU(), torch.nn.Conv2d(4, 1, 3))
    with pytest.raises(ValueError, match="Sequential.*block_classes"):
        fsdp_block_classes(conv)
    module = TeacherRL(model="embedded", model_kwargs=TINY, reward="brightness",
                       sampling={"num_steps": 2, "rollouts_per_prompt": 2})
    assert {c.__name__ for c in fsdp_block_classes(module.model.net)} == {"ResnetBlock2D", "BasicTransformerBlock"}
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        fsdp_block_classes(module.model.net, ["JointTransformerBlock"])


def test_fsdp_refuses_methods_it_cannot_shard_with_a_reason():
    from lit_distill.methods.pretrain import DiffusionPretrain

    pretrain = DiffusionPretrain(model="embedded", model_kwargs=TINY)
    with pytest.raises(ValueError, match="EMA.*DDP"):
        check_fsdp_supported(pretrain)
    rl = TeacherRL(model="embedded", model_kwargs=TINY, reward="brightness",
                   sampling={"num_steps": 2, "rollouts_per_prompt": 2}, policy={"kl_weight": 0.1},
                   runtime={"gradient_checkpointing": True})
    assert [name for name, _ in check_fsdp_supported(rl)] == ["model"]  # the reference copy stays replicated
    assert [name for name, _ in check_fsdp_supported(rl, frozen="shard")] == ["model", "reference"]
    with pytest.raises(ValueError, match="twice"):
        check_fsdp_supported(rl, activation_checkpointing=True)
    with pytest.raises(ValueError, match="frozen="):
        DiffusionFSDPStrategy(frozen="offload")


def test_ddp_strategy_runs_one_step_methods_in_sync(tmp_path):
    """DisBack updates its fake score and its generator in turn: DiffusionDDPStrategy turns on
    find_unused_parameters for it (plain DDP stops with "parameters that were not used in producing the
    loss"), and both ranks end with the same weights of both networks."""
    ranks = launch(2, tmp_path, fn="train_disback")
    assert ranks[0]["find_unused"] is True
    assert all(torch.equal(ranks[0]["final"][k], ranks[1]["final"][k]) for k in ranks[0]["final"])
    assert any(not torch.equal(ranks[0]["final"][k], ranks[0]["initial"][k]) for k in ranks[0]["final"])


def test_ddp_strategy_finds_unused_parameters_only_for_one_step_methods():
    class Fake(torch.nn.Module):
        ddp_find_unused_parameters = True

    assert needs_find_unused_parameters(Fake())
    Fake.ddp_find_unused_parameters = False
    assert not needs_find_unused_parameters(Fake())


def test_cuda_only_options_on_cpu():
    """An explicit compiled mode (True reads as "full") or CUDA graphs on CPU stop with a message; "auto" compiles
    nothing there. (bf16-mixed autocast is allowed by Lightning on CPU and runs TeacherRL, slowly: checked by hand,
    not here.)"""
    module = TeacherRL(model="embedded", model_kwargs=TINY, reward="brightness",
                       sampling={"num_steps": 2, "rollouts_per_prompt": 2}, runtime={"compile": True})
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader([{"prompt": PROMPT, "task": "brightness"}], batch_size=1,
                                         collate_fn=lambda rows: {"prompt": [PROMPT], "task": ["brightness"]})
    with pytest.raises(ValueError, match="compile='full' needs a CUDA device"):
        trainer.fit(module, loader)
    graphs = TeacherRL(model="embedded", model_kwargs=TINY, reward="brightness",
                       sampling={"num_steps": 2, "rollouts_per_prompt": 2}, runtime={"rollout_cuda_graphs": True})
    with pytest.raises(ValueError, match="rollout_cuda_graphs=True needs a CUDA device"):
        trainer.fit(graphs, loader)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_strategy_configs_parse_with_a_method_config(strategy, capsys):
    import yaml

    from lit_distill.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/teacher_rl/brightness.yaml"), "--config",
              str(ROOT / f"configs/strategies/{strategy}.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = {"ddp": "DiffusionDDPStrategy", "fsdp": "DiffusionFSDPStrategy"}[strategy]
    assert printed["trainer"]["strategy"]["class_path"] == f"lit_distill.distributed.{expected}"


# -- GPU ---------------------------------------------------------------------------------------------
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs 2 CUDA devices")


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_match_one_gpu_with_the_same_global_batch(strategy, tmp_path):
    """bf16-mixed on 2 GPUs (NCCL) vs 1 GPU with the same global batch and the same rollout noise: the
    weight update after 3 steps differs by far less than a change of rollout seed moves it, the ranks agree
    exactly, and the per-step rewards agree within bf16 rounding. (The same comparison in bf16 on CPU gave
    0.03 for DDP and 0.07 for FSDP, whose parameters are gathered in bf16, against a yardstick of 1.04.)"""
    kw = dict(accelerator="gpu", precision="bf16-mixed", batches=3)
    single = launch(1, tmp_path, **kw)[0]
    reseeded = launch(1, tmp_path, seed=1, **kw)[0]
    multi = launch(2, tmp_path / strategy, strategy=strategy, **kw)
    yardstick = relative_difference(single["final"], reseeded["final"], single["initial"])
    difference = relative_difference(single["final"], multi[0]["final"], single["initial"])
    assert relative_difference(multi[0]["final"], multi[1]["final"], single["initial"]) == 0.0
    assert difference < 0.15 and difference < 0.2 * yardstick, (difference, yardstick)
    assert multi[0]["rewards"][0] == pytest.approx(single["rewards"][0], abs=2e-3)  # same weights, same noise
    assert multi[0]["rewards"] == pytest.approx(single["rewards"], abs=5e-3)
