#!/usr/bin/env python3
"""Prints the tables of docs/results.md from runs/results/{din,reference}.jsonl."""
import json
import statistics
import sys
from collections import defaultdict

base = sys.argv[1] if len(sys.argv) > 1 else "runs/results"
rows = []
for name in ("din", "reference"):
    try:
        with open(f"{base}/{name}.jsonl") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        pass

groups = defaultdict(list)
for r in rows:
    data = r["data"].split("-")[0]
    groups[(data, r["impl"], r["variant"])].append(r)


def cell(rs, key):
    v = [r[key] for r in rs]
    if len(v) == 1:
        return f"{v[0]:.4f}"
    return f"{statistics.mean(v):.4f} ± {statistics.stdev(v):.4f}"


names = {
    "base": "attention, PReLU, no normalisation, no regularisation",
    "sum": "sum pooling instead of attention",
    "dice": "Dice instead of PReLU (attention and DNN)",
    "softmax": "softmax-normalised attention weights",
    "l2": "L2, λ = 1e-5 (MLP weights and the batch's embedding rows)",
    "mba": "mini-batch-aware regularisation, λ = 0.01",
    "gap": "histories cut at a 1-day gap (--session-gap-days 1)",
    "days": "plus days_since_prev (--days-since-prev)",
}
for data, title in (("next", "paper protocol (next item vs sampled negative)"), ("rating", "rating protocol (rating >= 4 positive)")):
    print(f"\n### MovieLens-100K, {title}\n")
    print("| model | variant | seeds | test AUC | test GAUC | test logloss |")
    print("|---|---|---|---|---|---|")
    for impl in ("deepctr-torch", "din"):
        for variant in names:
            rs = groups.get((data, impl, variant))
            if not rs:
                continue
            print(f"| {impl} | {names[variant]} | {len(rs)} | {cell(rs, 'auc')} | {cell(rs, 'gauc')} | {cell(rs, 'logloss')} |")
