"""How long ``lit-distill quickstart`` takes at its default sizes, from an empty cache (the base model trained
too), and what it prints; the README quotes its time from here.

    python benchmarks/quickstart.py            # CPU is what the README describes (about 10 minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

import report  # noqa: E402

from lit_distill.pipeline import QuickstartConfig, quickstart  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/quickstart.json")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:  # an empty cache: the base model and classifier are trained
        summary = quickstart(QuickstartConfig(out_dir=f"{work}/out", cache_dir=f"{work}/cache"))
    figures = {"seconds": summary["seconds"], "rewards": summary["rewards"], "one_step": summary["one_step"]["fid_classifier"],
               "config": {k: v for k, v in summary["config"].items() if k not in ("out_dir", "cache_dir")},
               "base_recipe": summary["base_recipe"],
               "load_average": {"before": [round(x, 2) for x in load_before],
                                "after": [round(x, 2) for x in os.getloadavg()]}}
    write_results("quickstart", figures, args.out)
    report.write_all()


if __name__ == "__main__":
    main()
