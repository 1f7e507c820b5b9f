#!/usr/bin/env python3
"""Runs examples/tutorial.py (the DIN tutorial's code with din's imports) once
per seed and prints each run's best validation logloss and their mean: the
acceptance figure of the Python package (the CLI's: at most 0.52).

    python bench/tutorial_seeds.py 2024 1 2        (from the repository's root)

The tutorial's code does not set a seed; this wrapper gives din.DIN one
(`seed=`) and records what `fit` returns, and changes nothing else.
"""
import io
import json
import runpy
import statistics
import sys
from contextlib import redirect_stdout

import din

seeds = [int(s) for s in sys.argv[1:]] or [2024, 1, 2]
Original = din.DIN
results = []
for seed in seeds:
    histories = []

    class Seeded(Original):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("seed", seed)
            super().__init__(*args, **kwargs)

        def fit(self, *args, **kwargs):
            h = super().fit(*args, **kwargs)
            histories.append(h)
            return h

    din.DIN = Seeded
    with redirect_stdout(io.StringIO()):
        runpy.run_path("examples/tutorial.py", run_name="__main__")
    val = histories[-1].history["val_loss"]
    results.append({"seed": seed, "val_loss": val, "best": min(val), "best_epoch": val.index(min(val)) + 1})
    print(json.dumps(results[-1]))
din.DIN = Original
print(json.dumps({"seeds": seeds, "mean_best_val_loss": statistics.mean(r["best"] for r in results)}))
