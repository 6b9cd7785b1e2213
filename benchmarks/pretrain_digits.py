"""The embedded base model: time to train it, the digit classifier's held-out accuracy, how often
class-prompted samples show the prompted digit, and how well it learned the style words of its captions:

- ``attribute_control``: for each attribute (thickness, width, slant), the gap between samples prompted with
  its high and low word ("a bold handwritten three" vs "a thin handwritten three"), as a fraction of the same
  gap between real training images captioned with those words (1 = the real difference, 0 = the words do
  nothing);
- ``velocity_ratio``: how far a style word moves the model's velocity on noised held-out digits, relative to
  how far changing the digit word moves it (``||v(style prompt) - v(plain)|| / ||v(other digit) - v(plain)||``).

Writes a grid of samples (a row per digit) and a grid of style words (a row per word, a column per digit).

    python benchmarks/pretrain_digits.py          # CPU is fine (the default resolution 16)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

import report  # noqa: E402

from lit_distill.data import caption_for  # noqa: E402
from lit_distill.data.attributes import ATTRIBUTES, DIGIT_WORDS, measure_strokes, with_articles  # noqa: E402
from lit_distill.data.embedded import embedded_style_words, load_embedded_digits  # noqa: E402
from lit_distill.diffusion import sample  # noqa: E402
from lit_distill.models import DiffusionModel, default_base_recipe  # noqa: E402
from lit_distill.models.classifier import get_digit_classifier  # noqa: E402
from lit_distill.pipeline import ensure_embedded_base  # noqa: E402
from lit_distill.utils.images import make_grid_png  # noqa: E402

STYLE_WORDS = [word for pair in ATTRIBUTES.values() for word in pair]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the base recipe's)")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--samples-per-digit", type=int, default=50)
    p.add_argument("--sampling-steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--cache-dir", default=None, help="keep the trained base there (default: a temporary directory)")
    p.add_argument("--grid", default="docs/pretrain_digits.png")
    p.add_argument("--style-grid", default="docs/pretrain_styles.png")
    p.add_argument("--out", default="benchmarks/results/pretrain_digits.json")
    return p.parse_args(argv)


@torch.no_grad()
def draw(model: DiffusionModel, prompts: list[str], steps: int, guidance: float, seed: int = 0) -> torch.Tensor:
    z = torch.randn((len(prompts),) + model.sample_shape, generator=torch.Generator().manual_seed(seed))
    uncond = model.null_cond(len(prompts)) if guidance != 1.0 else None
    return model.decode(sample(model, z.to(model.device), model.encode_prompts(prompts), model.schedule, steps,
                               guidance_scale=guidance, uncond=uncond))


def styled(word: str, digit: int) -> str:
    return with_articles(f"a {word + ' ' if word else ''}handwritten {DIGIT_WORDS[digit]}")


@torch.no_grad()
def sample_accuracy(model, classifier, per_digit: int, steps: int, guidance: float, grid: str) -> float:
    digits = torch.arange(10).repeat_interleave(per_digit)
    images = draw(model, [caption_for(int(d), i) for i, d in enumerate(digits)], steps, guidance)
    make_grid_png(images.view(10, per_digit, *images.shape[1:])[:, :10].flatten(0, 1), grid, nrow=10,
                  row_labels=DIGIT_WORDS, scale=3)
    return (classifier(images).argmax(1).cpu() == digits).float().mean().item()


@torch.no_grad()
def attribute_control(model, per_digit: int, steps: int, guidance: float, grid: str, resolution: int) -> dict:
    """Per attribute: the measure's mean over samples prompted with its high and low word, over real training
    images captioned with each word, and the generated gap as a fraction of the real one."""
    digits = torch.arange(10).repeat_interleave(per_digit)
    measures, rows = {}, []
    for word in STYLE_WORDS:
        images = draw(model, [styled(word, int(d)) for d in digits], steps, guidance, seed=1)
        measures[word] = {k: v.mean().item() for k, v in measure_strokes(images.cpu()).items()}
        rows.append(images.view(10, per_digit, *images.shape[1:])[:, 0])
    make_grid_png(torch.cat(rows), grid, nrow=10, row_labels=STYLE_WORDS, scale=3)
    real_measures = measure_strokes(load_embedded_digits(resolution=resolution, split="train")[0])
    words = embedded_style_words(split="train")  # the words of the training captions
    out = {}
    for name, (high, low) in ATTRIBUTES.items():
        real_mean = {w: real_measures[name][torch.tensor([w in ws for ws in words])].mean().item() for w in (high, low)}
        gap = measures[high][name] - measures[low][name]
        out[name] = {"high_word": high, "low_word": low, "generated_high": round(measures[high][name], 4),
                     "generated_low": round(measures[low][name], 4), "real_high": round(real_mean[high], 4),
                     "real_low": round(real_mean[low], 4),
                     "gap_fraction": round(gap / (real_mean[high] - real_mean[low]), 3)}
    return out


@torch.no_grad()
def velocity_ratio(model: DiffusionModel, resolution: int, n: int = 200, times=(0.25, 0.5, 0.75)) -> dict:
    """``||v(style) - v(plain)|| / ||v(next digit) - v(plain)||`` per style word, averaged over noised held-out
    digits at model times ``times`` (fractions of the way to noise)."""
    images, labels = load_embedded_digits(resolution=resolution, split="reference")
    images, labels = images[:n].to(model.device), labels[:n]
    generator = torch.Generator().manual_seed(1)
    plain = model.encode_prompts([styled("", int(d)) for d in labels])
    other = model.encode_prompts([styled("", (int(d) + 1) % 10) for d in labels])
    out = {}
    for word in STYLE_WORDS:
        style = model.encode_prompts([styled(word, int(d)) for d in labels])
        moved = digit = 0.0
        for t in times:
            timesteps = torch.full((n,), t * model.schedule.num_train_timesteps, device=model.device)
            alpha, sigma = model.schedule.coefficients(timesteps)
            noise = torch.randn(images.shape, generator=generator).to(model.device)
            x = alpha.view(-1, 1, 1, 1) * images + sigma.view(-1, 1, 1, 1) * noise
            v0 = model(x, timesteps, plain)
            moved += (model(x, timesteps, style) - v0).flatten(1).norm(dim=1).mean().item()
            digit += (model(x, timesteps, other) - v0).flatten(1).norm(dim=1).mean().item()
        out[word] = round(moved / digit, 3)
    return out


def main(argv=None):
    args = parse(argv)
    with tempfile.TemporaryDirectory() as tmp:  # from scratch unless --cache-dir: this measures the training
        cache = args.cache_dir or tmp
        start = time.time()
        kwargs = {"max_steps": args.steps} if args.steps else {}
        path = ensure_embedded_base(cache_dir=cache, progress=False, resolution=args.resolution, **kwargs)
        seconds = time.time() - start
        classifier = get_digit_classifier(args.resolution, cache_dir=cache)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = DiffusionModel.from_pretrained(path).eval().to(device)
        classifier = classifier.to(device)
        accuracy = sample_accuracy(model, classifier, args.samples_per_digit, args.sampling_steps,
                                   args.guidance_scale, args.grid)
        control = attribute_control(model, args.samples_per_digit, args.sampling_steps, args.guidance_scale,
                                    args.style_grid, args.resolution)
        ratios = velocity_ratio(model, args.resolution)
        steps = args.steps or default_base_recipe().max_steps
    figures = {"train_seconds": round(seconds, 1), "steps": steps, "resolution": args.resolution,
               "source": "mnist", "classifier_heldout_accuracy": round(classifier.heldout_accuracy, 4),
               "sample_accuracy": round(accuracy, 4), "samples": 10 * args.samples_per_digit,
               "sampling_steps": args.sampling_steps, "guidance_scale": args.guidance_scale, "grid": args.grid,
               "style_grid": args.style_grid, "attribute_control": control, "velocity_ratio": ratios,
               "velocity_ratio_mean": round(sum(ratios.values()) / len(ratios), 3)}
    write_results("pretrain_digits", figures, args.out)
    report.write_all()


if __name__ == "__main__":
    main()
