"""README.md and docs/*.md quote measured figures only from benchmarks/results/*.json, as benchmarks/report.py
writes them: a region that differs from the results (a number typed by hand, a result changed without
regenerating) fails, and so does a figure typed outside a region."""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402

#: What looks like a figure: a decimal, a percentage or a factor ("96%", "0.898", "3.7-5.0x").
FIGURE = re.compile(r"(?<![\w./-])\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?(?:%|x\b)|(?<![\w./-])\d+\.\d+(?![\w.])")
#: Figures outside regions that are not measurements: targets and claims, settings, versions, identifiers.
NOT_MEASURED = {
    "README.md": ["Stable Diffusion 1.5"],
    "docs/benchmarks.md": ["upright 30% of each class", "ink target 0.35", "slant target 0.7",
                           "(claim: within 50% of them)", "paper's 10% of the updates", "with 37.5% of the updates",
                           "claim: within 1.5x", "claim: at least 2x", "(target 1.5x)", "(target 95%)",
                           "(target 40%)", "(targets 45% / 50%)"],
    "docs/one_step.md": ["arXiv 2408.15991", "arXiv 2502.08005", "(1%, relative)", "kept 1-10% of the",
                         "sets it so that 10% of the", "at t = 0.5", "beta1 = 0.9", "(1% over 100 updates)",
                         "| 10% of the generator updates | about 10% (10 x 1000 of 100k)", "betas (0, 0.999)"],
    "docs/rewards.md": ["default 0.5", "about 0.3: 0.5 asks", "(typical 0.2-0.3)"],
    "docs/scaling.md": ["857.7 to 856", "(torch 2.14)", "under 10% of the update"],
    "docs/teacher_rl.md": ["with target 0.35", "with target 0.7", "max 1)"],
    "docs/opd.md": ["e.g. 1.0 for its GenEval teacher and 4.5 for the others", "the default 0.99 leaves out",
                    "(7e-4 at t = 0.001 -> 0)"],
    "docs/models_and_data.md": ["Stable Diffusion 1.5", "(0.3% of the ink lies outside)",
                                "probability 0.75", "the 30% thickest", "above 0.35", "below 0.08"],
}


def prose(text: str) -> str:
    """``text`` without code blocks, inline code, link targets and results regions."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = report.REGION.sub("", text)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.sub(r"\]\([^)]*\)", "]", text)


def test_every_results_region_matches_the_results_files():
    assert report.stale_regions() == [], "a page disagrees with benchmarks/results/: run python benchmarks/report.py"


def test_no_figure_is_typed_outside_a_results_region():
    for page in report.pages():
        name = str(page.relative_to(ROOT))
        text = prose(page.read_text())
        for phrase in NOT_MEASURED.get(name, []):
            assert phrase in text, f"{name}: {phrase!r} is no longer there: drop it from NOT_MEASURED"
            text = text.replace(phrase, "")
        found = FIGURE.findall(text)
        assert not found, (f"{name} types the figures {found} by hand: quote them from benchmarks/results/ with "
                           "a <!-- results:KEY --> region (see benchmarks/report.py)")


def test_a_figure_changed_by_hand_is_found():
    steps = json.loads((ROOT / "benchmarks/results/pretrain_digits.json").read_text())["figures"]["steps"]
    region = "<!-- results:pretrain_digits:steps|d -->{}<!-- /results -->"
    assert report.regenerate(region.format(steps + 1)) == region.format(steps)
    assert report.render("one_step:curves/disback/-1/1|.2f") == \
        f"{report.figures('one_step')['curves']['disback'][-1][1]:.2f}"


def test_the_readme_methods_table_names_the_device_of_each_figure():
    table = report.render("methods")
    rows = table.splitlines()[2:]
    assert len(rows) == 5
    for row, results in zip(rows, ["pretrain_digits", "teacher_rl", "opd_vs_rl", "one_step", "one_step"]):
        assert row.rstrip(" |").endswith(report.device_of(results, "curves" if results == "one_step" else None))
