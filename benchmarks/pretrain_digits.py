"""The embedded base model: time to train it, the digit classifier's held-out accuracy, and how often
class-prompted samples are recognised as the prompted digit; writes a PNG grid (a row per digit).

    python benchmarks/pretrain_digits.py          # CPU is fine (the default resolution 16)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import update_docs_table, write_results  # noqa: E402

from lit_distill.data import caption_for  # noqa: E402
from lit_distill.diffusion import sample  # noqa: E402
from lit_distill.models import DiffusionModel  # noqa: E402
from lit_distill.models.classifier import get_digit_classifier  # noqa: E402
from lit_distill.pipeline import ensure_embedded_base  # noqa: E402
from lit_distill.utils.images import make_grid_png  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--samples-per-digit", type=int, default=50)
    p.add_argument("--sampling-steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--grid", default="docs/pretrain_digits.png")
    p.add_argument("--out", default="benchmarks/results/pretrain_digits.json")
    p.add_argument("--docs-only", action="store_true")
    return p.parse_args(argv)


@torch.no_grad()
def sample_accuracy(model: DiffusionModel, classifier, per_digit: int, steps: int, guidance: float, grid: str) -> float:
    digits = torch.arange(10).repeat_interleave(per_digit)
    captions = [caption_for(int(d), i) for i, d in enumerate(digits)]
    z = torch.randn((len(captions),) + model.sample_shape, generator=torch.Generator().manual_seed(0))
    uncond = model.null_cond(len(captions)) if guidance != 1.0 else None
    images = model.decode(sample(model, z, model.encode_prompts(captions), model.schedule, steps,
                                 guidance_scale=guidance, uncond=uncond))
    correct = (classifier(images).argmax(1) == digits).float().mean().item()
    make_grid_png(images.view(10, per_digit, *images.shape[1:])[:, :10].flatten(0, 1), grid, nrow=10)
    return correct


def main(argv=None):
    args = parse(argv)
    if not args.docs_only:
        with tempfile.TemporaryDirectory() as cache:  # always train from scratch: this measures the training
            start = time.time()
            path = ensure_embedded_base(args.resolution, cache_dir=cache, max_steps=args.steps, progress=False)
            seconds = time.time() - start
            classifier = get_digit_classifier(args.resolution)
            model = DiffusionModel.from_pretrained(path).eval()
            accuracy = sample_accuracy(model, classifier, args.samples_per_digit, args.sampling_steps,
                                       args.guidance_scale, args.grid)
        figures = {"train_seconds": round(seconds, 1), "steps": args.steps, "resolution": args.resolution,
                   "classifier_heldout_accuracy": round(classifier.heldout_accuracy, 4),
                   "sample_accuracy": round(accuracy, 4), "samples": 10 * args.samples_per_digit,
                   "sampling_steps": args.sampling_steps, "guidance_scale": args.guidance_scale, "grid": args.grid}
        write_results("pretrain_digits", figures, args.out)
    f = json.loads(Path(args.out).read_text())["figures"]
    update_docs_table("pretrain_digits", ["steps", "train seconds", "classifier held-out accuracy",
                                          "sample accuracy", "samples"],
                      [[f["steps"], f["train_seconds"], f"{f['classifier_heldout_accuracy']:.3f}",
                        f"{f['sample_accuracy']:.3f}", f["samples"]]], args.out,
                      note=f"Grid: `{f['grid']}` (a row per digit, {f['sampling_steps']} ODE steps).")


if __name__ == "__main__":
    main()
