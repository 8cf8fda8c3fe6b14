"""Per-step training cost of CsKO against full fine-tuning, and what DCES saves at each channel ratio.

The script lives in the package (:mod:`lightning_cskl.experiments.step_cost`); this file runs it, so that the
commands in BENCHMARKS.md keep working:

    python benchmarks/step_cost.py --ratios 0.25,0.5,0.75,1
"""

from lightning_cskl.experiments.step_cost import main

if __name__ == "__main__":
    main()
