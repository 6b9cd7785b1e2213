"""Fréchet distance against scipy, the mergeable statistics (also over 2 gloo ranks), FIDCallback."""
import os

import lightning as L
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lit_distill.callbacks import FIDCallback
from lit_distill.data import ImageDataModule, load_embedded_digits
from lit_distill.metrics import FeatureStats, frechet_distance


def brute_force_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The usual numpy/scipy formula on two feature sets [N, F]."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def features(n=500, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) @ mix + 1.0


def test_frechet_distance_zero_monotone_and_matches_scipy():
    x = features()
    stats = FeatureStats().update(x)
    assert abs(stats.distance(stats)) < 1e-8
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    values = [FeatureStats().update(x + s * noise).distance(stats) for s in (0.1, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    y = features(seed=2) * 0.8
    reference = brute_force_fd(x.numpy(), y.numpy())
    assert FeatureStats().update(x).distance(FeatureStats().update(y)) == pytest.approx(reference, rel=1e-8)
    assert frechet_distance(x.mean(0), torch.cov(x.T), y.mean(0), torch.cov(y.T)) == pytest.approx(reference, rel=1e-8)


def test_feature_stats_merge_and_disk(tmp_path):
    x = features(300)
    parts = FeatureStats().update(x[:100]).merge(FeatureStats().update(x[100:]))
    assert parts.count == 300
    assert torch.allclose(parts.mean(), x.mean(0)) and torch.allclose(parts.covariance(), torch.cov(x.T))
    parts.save(tmp_path / "s.pt")
    again = FeatureStats.load(tmp_path / "s.pt")
    assert again.count == 300 and torch.equal(again.outer, parts.outer)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats().update(x[:1]).covariance()


def _reduce_worker(rank: int, world: int, port: int, queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = features(200)
    stats = FeatureStats().update(x[rank::world]).all_reduce()
    queue.put((rank, stats.count, float((stats.mean() - x.mean(0)).abs().max()),
               float((stats.covariance() - torch.cov(x.T)).abs().max())))
    dist.destroy_process_group()


def test_feature_stats_all_reduce_over_two_ranks():
    ctx = mp.get_context("fork")  # the children inherit the imports (spawn would re-import lightning: slow)
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_reduce_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    for _, count, mean_err, cov_err in results:
        assert count == 200 and mean_err < 1e-12 and cov_err < 1e-10


def test_fid_callback_inception_needs_weights_on_disk(tmp_path):
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        FIDCallback(features="inception")
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        FIDCallback(features="inception", inception_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="features"):
        FIDCallback(features="clip")


class Pooled(nn.Module):
    """A cheap fixed feature map for tests: 4x4 average pooling of 8x8 images -> 4 features."""

    def forward(self, images):
        return nn.functional.avg_pool2d(images, 4).flatten(1)


class RealPlusNoise(L.LightningModule):
    """generate_eval_samples returns real digits plus noise of a level that shrinks as training goes on."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.images = load_embedded_digits("digits", 8)[0]
        self.level = 1.0

    def training_step(self, batch, batch_idx):
        self.level *= 0.2
        return (self.w - 1) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def generate_eval_samples(self, n, generator, prompts=None):
        index = torch.randint(0, len(self.images), (n,), generator=generator)
        return (self.images[index] + self.level * torch.randn(n, 1, 8, 8, generator=generator)).clamp(-1, 1)


def test_fid_callback_logs_caches_and_decreases(tmp_path):
    callback = FIDCallback(every_n_steps=2, num_samples=400, features=Pooled(), cache_dir=str(tmp_path), batch_size=200)
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[callback])
    trainer.fit(RealPlusNoise(), ImageDataModule("embedded:digits", resolution=8, batch_size=8))
    assert [h["step"] for h in callback.history] == [0, 2, 4]
    values = [h["fid_Pooled"] for h in callback.history]
    assert values[0] > values[1] > values[2] >= 0, values
    assert "fid_Pooled" in trainer.callback_metrics
    # the floor: held-out real images (the data module's floor part) against the reference statistics
    assert 0 < callback.floor < values[0]
    cached = list((tmp_path / "fid_stats").glob("digits_reference_r8_c1_module-Pooled_n359.pt"))
    assert len(cached) == 1
    again = FIDCallback(features=Pooled(), cache_dir=str(tmp_path))
    stats = again.reference_stats(trainer, torch.device("cpu"))
    assert torch.equal(stats.sum, FeatureStats.load(cached[0]).sum)


def test_inception_features_load_from_the_given_file_only(tmp_path, monkeypatch):
    """With a weights file, torchmetrics/torch-fidelity read that file: the URL loader is never called."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    from lit_distill.callbacks import InceptionFeatures

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download the Inception weights")

    # random weights of the right layout: build one extractor with load_state_dict disabled, save its state
    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, *a, **k: None)
        weights = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    torch.save(weights, tmp_path / "inception.pth")
    monkeypatch.setattr(fe, "load_state_dict_from_url", no_network)
    FIDCallback(features="inception", inception_weights=str(tmp_path / "inception.pth"))  # path accepted
    extractor = InceptionFeatures(tmp_path / "inception.pth")
    assert extractor(torch.rand(2, 1, 8, 8) * 2 - 1).shape == (2, 2048)
