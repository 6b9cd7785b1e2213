"""The digit classifier: shapes, training accuracy, and the on-disk cache."""
import time

import pytest
import torch

from lit_distill.data import load_embedded_digits
from lit_distill.models import classifier as clf
from lit_distill.models.classifier import DigitClassifier, get_digit_classifier, random_shift


@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_shapes_any_resolution(resolution):
    model = DigitClassifier().eval()
    x = torch.rand(3, 1, resolution, resolution) * 2 - 1
    assert model(x).shape == (3, 10)
    feats = model.features(x)
    assert feats.shape == (3, 128) and feats.min() >= 0
    torch.testing.assert_close(model(x.expand(-1, 3, -1, -1)), model(x))  # RGB is averaged to grey
    with pytest.raises(ValueError, match="images"):
        model(torch.zeros(3, 2, 8, 8))


def test_random_shift_moves_content_and_fills_background():
    x = -torch.ones(64, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1.0
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.all((out == 1).sum((1, 2, 3)) == 4)  # a centred blob moved by <= 2 px stays whole
    centres = (out == 1).float().nonzero()[:, 2:].view(64, 4, 2).float().mean(1)
    assert len({tuple(c.tolist()) for c in centres}) > 5  # shifts differ between images
    assert ((centres - 3.5).abs() <= 2).all()


def test_train_and_cache(tmp_path, monkeypatch):
    calls = []
    real_train = clf.train_digit_classifier
    monkeypatch.setattr(clf, "train_digit_classifier", lambda *a, **k: calls.append(1) or real_train(*a, **k))

    t0 = time.perf_counter()
    model = get_digit_classifier(16, cache_dir=tmp_path, source="digits")  # scikit-learn's: seconds to train
    train_s = time.perf_counter() - t0
    assert calls == [1] and not model.loaded_from_cache
    assert model.heldout_accuracy >= 0.95, model.heldout_accuracy
    assert (tmp_path / "classifier_digits_r16.pt").is_file() and not list(tmp_path.glob("*.tmp"))
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    # the held-out accuracy is real: recompute it on the reference part, which it never trained on
    images, labels = load_embedded_digits("digits", resolution=16, split="reference")
    with torch.no_grad():
        acc = (model(images).argmax(-1) == labels).float().mean().item()
    assert acc == pytest.approx(model.heldout_accuracy)

    t0 = time.perf_counter()
    again = get_digit_classifier(16, cache_dir=tmp_path, source="digits")
    load_s = time.perf_counter() - t0
    assert calls == [1] and again.loaded_from_cache and load_s < train_s
    assert again.heldout_accuracy == pytest.approx(model.heldout_accuracy)
    with torch.no_grad():
        torch.testing.assert_close(again(images[:64]), model(images[:64]))

    # a file of another version is retrained and overwritten
    state = torch.load(tmp_path / "classifier_digits_r16.pt", weights_only=True)
    state["version"] = "old"
    torch.save(state, tmp_path / "classifier_digits_r16.pt")
    monkeypatch.setattr(clf, "train_digit_classifier", lambda *a, **k: calls.append(1) or (DigitClassifier(), 0.5))
    assert get_digit_classifier(16, cache_dir=tmp_path, source="digits").heldout_accuracy == 0.5 and calls == [1, 1]
    assert torch.load(tmp_path / "classifier_digits_r16.pt", weights_only=True)["version"] == clf.CLASSIFIER_VERSION


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_DISTILL_CACHE", str(tmp_path))
    monkeypatch.setattr(clf, "train_digit_classifier", lambda *a, **k: (DigitClassifier(), 0.25))
    model = get_digit_classifier(8)
    assert (tmp_path / "classifier_mnist_r8.pt").is_file() and model.heldout_accuracy == 0.25
