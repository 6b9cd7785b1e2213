"""The execution settings of ``runtime``: norm precision under autocast, compilation modes, the rollout window's
placement. CPU tests check what runs without compiling; ``-m slow`` compiles on the CPU, ``-m gpu`` on CUDA."""
import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_distill.diffusion import window_start
from lit_distill.methods.settings import Runtime
from lit_distill.methods.teacher_rl import TeacherRL
from lit_distill.models.builders import build_embedded_model, build_sd3_like_transformer, build_sd15_like_unet
from lit_distill.models.compilation import compile_network, drop_compiled, is_compiled, repeated_blocks
from lit_distill.models.norms import InputDtypeGroupNorm, InputDtypeLayerNorm, set_norm_precision

TINY = {"resolution": 8, "block_channels": (16, 32), "text_hidden": 32}


def tiny_unet():
    return build_sd15_like_unet(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, norm_num_groups=8)


def tiny_sd3():
    return build_sd3_like_transformer(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                      joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                                      pos_embed_max_size=16)


def unet_inputs(gen, batch=3):
    return (torch.randn(batch, 4, 8, 8, generator=gen), torch.randint(0, 1000, (batch,), generator=gen),
            {"encoder_hidden_states": torch.randn(batch, 8, 32, generator=gen)})


def sd3_inputs(gen, batch=3):
    return (torch.randn(batch, 16, 8, 8, generator=gen), torch.rand(batch, generator=gen) * 1000,
            {"encoder_hidden_states": torch.randn(batch, 12, 32, generator=gen),
             "pooled_projections": torch.randn(batch, 32, generator=gen)})


@pytest.mark.parametrize("build,inputs", [(tiny_unet, unet_inputs), (tiny_sd3, sd3_inputs)], ids=["unet", "sd3"])
def test_input_dtype_norms_change_nothing_outside_autocast(build, inputs):
    torch.manual_seed(0)
    net = build()
    fast = copy.deepcopy(net)
    assert set_norm_precision(fast, "input") > 0
    kinds = {type(m) for m in fast.modules()}
    assert nn.GroupNorm not in kinds and nn.LayerNorm not in kinds
    assert fast.state_dict().keys() == net.state_dict().keys()
    gen = torch.Generator().manual_seed(1)
    x, t, cond = inputs(gen)
    with torch.no_grad():
        assert torch.equal(fast(x, timestep=t, **cond, return_dict=False)[0], net(x, timestep=t, **cond, return_dict=False)[0])
    assert set_norm_precision(fast, "float32") > 0 and {type(m) for m in fast.modules()} == {type(m) for m in net.modules()}


def test_input_dtype_norms_keep_bf16_under_autocast_at_bf16_accuracy():
    gen = torch.Generator().manual_seed(2)
    group, layer = InputDtypeGroupNorm(4, 16), InputDtypeLayerNorm(16)
    for norm in (group, layer):
        nn.init.normal_(norm.weight, 1.0, 0.3, generator=gen)
        nn.init.normal_(norm.bias, 0.0, 0.3, generator=gen)
    x = (torch.randn(2, 16, 8, 16, generator=gen) * 3 + 1).bfloat16()
    references = {group: F.group_norm(x.double(), 4, group.weight.double(), group.bias.double(), group.eps),
                  layer: F.layer_norm(x.double(), (16,), layer.weight.double(), layer.bias.double(), layer.eps)}
    for norm, reference in references.items():
        with torch.autocast("cpu", torch.bfloat16):
            out = norm(x)
        assert out.dtype == torch.bfloat16  # no fp32 copy of the activation
        error = (out.double() - reference).norm() / reference.norm()
        assert float(error) < 1e-2  # bf16 rounding of the output (2^-8 relative per element)


def test_runtime_compile_settings():
    assert Runtime().compile == "off" and Runtime().norm_precision == "float32"  # until the GPU run measures them
    assert Runtime(compile=True).compile == "full" and Runtime(compile=False).compile == "off"
    with pytest.raises(ValueError, match="Runtime.compile='fast'"):
        Runtime(compile="fast")
    with pytest.raises(ValueError, match="Runtime.norm_precision"):
        Runtime(norm_precision="bf16")
    module = TeacherRL("embedded", "brightness", TINY, sampling={"num_steps": 2, "rollouts_per_prompt": 2})
    assert module.compile_mode() == "off"  # auto on a CPU run: eager


def test_regional_compilation_compiles_each_repeated_block_and_copies_drop_it():
    net = tiny_unet()
    blocks = repeated_blocks(net)
    assert {type(b).__name__ for b in blocks} == {"ResnetBlock2D", "BasicTransformerBlock"}
    assert len(blocks) == sum(type(m).__name__ in ("ResnetBlock2D", "BasicTransformerBlock") for m in net.modules())
    assert compile_network(net, "regional") == len(blocks)  # lazy: nothing compiles before a call
    assert all(is_compiled(b) for b in blocks) and getattr(net, "_compiled_call_impl", None) is None
    sd3 = tiny_sd3()
    assert [type(b).__name__ for b in repeated_blocks(sd3)] == ["JointTransformerBlock"] * 2
    with pytest.raises(ValueError, match="no block of .* in Sequential.*compile='full'"):
        compile_network(nn.Sequential(nn.Linear(2, 2)), "regional")
    # a deep copy of a compiled module would call the original's compiled forward: copies drop it
    model = build_embedded_model(**TINY)
    compile_network(model.net, "regional")
    frozen = model.copy_frozen()
    assert is_compiled(model.net) and not is_compiled(frozen.net)
    assert not is_compiled(drop_compiled(model.net))


def test_window_start_random_is_uniform_and_seeded_sliding_rolls_back():
    starts = [window_start(2, 1, 7, "random", step, seed=3) for step in range(400)]
    assert starts == [window_start(2, 1, 7, "random", step, seed=3) for step in range(400)]  # a function of (seed, step)
    counts = torch.bincount(torch.tensor(starts), minlength=6)[1:]
    assert int(counts.min()) > 50  # every one of the 5 positions, about 80 each
    assert starts != [window_start(2, 1, 7, "random", step, seed=4) for step in range(400)]
    assert [window_start(3, 0, 8, "sliding", k, 0, shift_every=1, stride=2) for k in range(5)] == [0, 2, 4, 0, 2]
    with pytest.raises(ValueError, match="does not fit"):
        window_start(4, 0, 3, "random", 0, 0)


@pytest.mark.slow
def test_regional_compilation_matches_eager_on_cpu():
    """Forward and gradients of a regionally compiled tiny UNet equal eager ones (fp32 on the CPU: inductor's
    fused kernels reorder sums, so equal up to float32 rounding). Compiling takes a minute or more on 2 cores."""
    torch.manual_seed(0)
    net = tiny_unet()
    compiled = copy.deepcopy(net)
    compile_network(compiled, "regional")
    x, t, cond = unet_inputs(torch.Generator().manual_seed(3))
    outputs = []
    for m in (net, compiled):
        out = m(x, timestep=t, **cond, return_dict=False)[0]
        out.pow(2).mean().backward()
        outputs.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], atol=1e-4, rtol=1e-4)
    for a, b in zip(outputs[1][1], outputs[0][1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("runtime", [{"compile": "regional"}, {"compile": "regional", "rollout_cuda_graphs": True},
                                     {"compile": "full"}], ids=["regional", "regional+graphs", "full"])
def test_compiled_teacher_rl_trains_on_cuda_like_eager(runtime):
    """Each compiled mode runs TeacherRL steps in bf16 on CUDA, and its first rollout (same seed, same weights)
    matches the eager one at bf16 accuracy."""
    def fit(settings):
        torch.manual_seed(0)
        module = TeacherRL("embedded", "brightness", TINY, sampling={"num_steps": 4, "rollouts_per_prompt": 4},
                           updates={"minibatch_size": 8}, runtime=settings)
        samples = []
        original = module.sample_trajectories

        def recording(*args, **kwargs):
            traj = original(*args, **kwargs)
            samples.append(traj.sample.float().cpu())
            return traj

        module.sample_trajectories = recording
        rows = [{"prompt": "a handwritten seven", "task": "brightness"}] * 6
        loader = torch.utils.data.DataLoader(rows, batch_size=2, collate_fn=lambda rs: {
            "prompt": [r["prompt"] for r in rs], "task": [r["task"] for r in rs]})
        L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=3, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(module, loader)
        assert module.compile_mode() == settings["compile"]
        return samples

    eager, compiled = fit({"compile": "off"}), fit(runtime)
    assert len(compiled) == 3
    error = (compiled[0] - eager[0]).norm() / eager[0].norm()
    assert float(error) < 3e-2
