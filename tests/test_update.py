"""The shared manual update (``DistillModule.apply_update``): clipping by global norm works with a fused AdamW
under bf16 autocast, the configuration every GPU run uses (Lightning's own ``clip_gradients`` refuses it)."""
import lightning as L
import torch
from torch import nn

from lit_distill.methods.base import DistillModule
from lit_distill.methods.settings import Optim, Runtime


class ClipProbe(DistillModule):
    """Steps a linear layer once per batch on a loss with a huge gradient, clipped to norm 1."""

    def __init__(self, fused: bool):
        super().__init__(optim=Optim(lr=1e-3, max_grad_norm=1.0), runtime=Runtime())
        self.automatic_optimization = False
        self.fused = fused
        self.layer = nn.Linear(8, 8)
        self.norms = []

    def configure_optimizers(self):
        return torch.optim.AdamW(self.layer.parameters(), lr=self.optim.lr, fused=self.fused)

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers().optimizer
        original = optimizer.step

        def record_then_step(*args, **kwargs):  # the norm the optimiser sees, after clipping
            self.norms.append(float(torch.cat([p.grad.flatten() for p in self.layer.parameters()]).norm()))
            return original(*args, **kwargs)

        optimizer.step = record_then_step
        loss = 1e4 * self.layer(batch[0]).float().pow(2).mean()
        assert self.apply_update(self.optimizers(), loss, "probe")  # clipped to optim.max_grad_norm = 1
        optimizer.step = original


def test_clipping_with_a_fused_optimizer_under_bf16_autocast():
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(6, 8)), batch_size=2)
    module = ClipProbe(fused=True)  # fused AdamW runs on the CPU too (torch >= 2.4)
    L.Trainer(accelerator="cpu", precision="bf16-mixed", max_epochs=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, data)
    assert len(module.norms) == 3
    assert all(abs(n - 1.0) < 1e-3 for n in module.norms), module.norms  # clipped from ~1e4 to 1


class TwoUpdates(DistillModule):
    """Two updates in one training step, as TeacherRL/OPD's minibatches and the one-step methods' alternation."""

    def __init__(self):
        super().__init__(optim=Optim(lr=0.1, max_grad_norm=None), runtime=Runtime())
        self.automatic_optimization = False
        self.layer = nn.Linear(8, 8)
        self.outputs = []

    def configure_optimizers(self):
        return torch.optim.SGD(self.layer.parameters(), lr=self.optim.lr)

    def training_step(self, batch, batch_idx):
        for _ in range(2):
            out = self.layer(batch[0])
            self.outputs.append(out.detach().float())
            self.apply_update(self.optimizers(), out.float().pow(2).mean(), "probe")
        self.outputs.append(self.layer(batch[0]).detach().float())


def test_forwards_after_an_update_in_the_same_bf16_step_see_the_new_weights():
    """A cache-enabled autocast region would keep the first bf16 cast of each weight for the whole step (Lightning's
    plugin disables the cache today): the later forwards must see the updated weights."""
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(2, 8)), batch_size=2)
    module = TwoUpdates()
    L.Trainer(accelerator="cpu", precision="bf16-mixed", max_epochs=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, data)
    first, second, third = module.outputs
    assert (second - first).abs().max() > 1e-2  # an SGD step of lr 0.1 moves the outputs visibly
    assert (third - second).abs().max() > 1e-2


def test_weights_changed_drops_stale_casts_of_a_cache_enabled_autocast_region():
    layer = nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # cache_enabled=True, the default
        before = layer(x)
        with torch.no_grad():
            layer.weight.add_(1.0)
        assert torch.equal(layer(x), before)  # the stale cast: why weights_changed exists
        DistillModule.weights_changed()
        assert not torch.equal(layer(x), before)
