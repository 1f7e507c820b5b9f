#!/usr/bin/env python3
"""Markdown tables of din against the Python references from the JSON lines
bench/speed.sh writes (one object per run, tagged with config, round, run_id,
cpu and cpu_flags).

    python3 bench/speed_table.py runs/speed/results.jsonl [--all]

Only the latest run_id is read unless --all. Per configuration and measure:
the median over rounds of din, deepctr-torch, tf-keras and the tight PyTorch
DIN (bench/torch_din_speed.py) eager, compiled and bf16-compiled; din's ratio
to the faster of deepctr-torch and tf-keras, with its target (>= 3x for
speeds and latency, >= 4x for RSS); and din's ratio to the best PyTorch DIN
mode (no target here: issue 12 sets those for din's bf16 path). Throughput:
din / max(refs); latency: min(refs) / din; peak RSS: min(refs) / din. A
reference's inference throughput is the better of model.predict and its
direct forward path (the `_direct` key), so the ratio never flatters din.
The full-history latency is the 1 x 200 request of the first row with 50
behaviours. Each table names the CPU (model and the vector/bf16 flags). Then
din's useful GFLOP/s against its FP32 GEMM peak.
"""
import json
import statistics
import sys
from collections import defaultdict

REFS = ("deepctr-torch", "tf-keras")
PYTORCH = ("pytorch-eager", "pytorch-compile", "pytorch-bf16-compile")
IMPLS = ("din",) + REFS + PYTORCH
HEADS = ("din", "deepctr-torch", "tf-keras", "PyTorch eager", "PyTorch compile", "PyTorch bf16 + compile")
# (key, label, higher is better, target ratio against deepctr-torch / tf-keras)
MEASURES = (
    ("train_samples_per_second", "train samples/s", True, 3.0),
    ("inference_samples_per_second_batch_4096", "inference samples/s (batch 4096)", True, 3.0),
    ("latency_ms_1x200_median", "latency 1x200 median (ms)", False, 3.0),
    ("latency_ms_1x200_p99", "latency 1x200 p99 (ms)", False, 3.0),
    ("full_history_latency_ms_1x200_median", "latency 1x200, 50-behaviour history, median (ms)", False, None),
    ("full_history_latency_ms_1x200_p99", "latency 1x200, 50-behaviour history, p99 (ms)", False, None),
    ("peak_rss_mib", "peak RSS (MiB)", False, 4.0),
)


def ratio(din, refs, higher):
    """din against the best of refs (None where either is missing)."""
    refs = [r for r in refs if r is not None]
    if not din or not refs:
        return None
    return din / max(refs) if higher else min(refs) / din


def value(row, key):
    v = row.get(key)
    if key == "inference_samples_per_second_batch_4096" and row.get("impl") != "din":
        direct = row.get(key + "_direct")
        if direct is not None and (v is None or direct > v):
            v = direct
    return v


def med(rows, key):
    vals = [v for v in (value(r, key) for r in rows) if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v):
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    path = args[0] if args else "runs/speed/results.jsonl"
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        sys.exit(f"{path}: no results")
    if "--all" not in sys.argv:
        latest = rows[-1].get("run_id")
        rows = [r for r in rows if r.get("run_id") == latest]
    configs = defaultdict(lambda: defaultdict(list))
    for r in rows:
        configs[r.get("config", "?")][r.get("impl", "?")].append(r)

    for name, by_impl in configs.items():
        any_row = next(iter(next(iter(by_impl.values()))), {})
        rounds = max(len(v) for v in by_impl.values())
        cpus = sorted({f"{r.get('cpu', '?')} ({' '.join(r.get('cpu_flags', [])) or 'flags not recorded'})"
                       for rs in by_impl.values() for r in rs})
        print(f"### {name}\n")
        print(f"embedding dim {any_row.get('embedding_dim', '?')}, attention {any_row.get('att_hidden', '?')}, "
              f"batch {any_row.get('batch_size', '?')}, {any_row.get('threads', '?')} threads, "
              f"{any_row.get('samples', '?')} samples, median of {rounds} round(s); CPU: {'; '.join(cpus)}\n")
        present = [i for i in IMPLS if i == "din" or by_impl.get(i)]
        heads = [h for i, h in zip(IMPLS, HEADS) if i in present]
        print(f"| measure | {' | '.join(heads)} | din vs faster of deepctr-torch, tf-keras | target | holds "
              "| din vs best PyTorch DIN |")
        print("|---|" + "---:|" * len(heads) + "---:|---:|:---:|---:|")
        for key, label, higher, target in MEASURES:
            m = {impl: med(by_impl.get(impl, []), key) for impl in IMPLS}
            r = ratio(m["din"], [m[i] for i in REFS], higher)
            holds = "-" if r is None or target is None else ("yes" if r >= target else "no")
            rp = ratio(m["din"], [m[i] for i in PYTORCH], higher)
            cells = " | ".join(fmt(m[i]) for i in present)
            print(f"| {label} | {cells} | {'-' if r is None else f'{r:.2f}x'} | "
                  f"{'-' if target is None else f'>= {target:g}x'} | {holds} | {'-' if rp is None else f'{rp:.2f}x'} |")
        losses = {impl: med(by_impl.get(impl, []), "train_loss") for impl in REFS + PYTORCH if by_impl.get(impl)}
        print("\nreference train loss (1 epoch): "
              + ", ".join(f"{i} {fmt(v)}" for i, v in losses.items()))
        din_rows = by_impl.get("din", [])
        useful, peak = med(din_rows, "train_useful_gflops"), med(din_rows, "gemm_peak_gflops")
        infer = med(din_rows, "inference_useful_gflops")
        if useful is not None and peak:
            print(f"din: train {fmt(useful)} useful GFLOP/s, inference {fmt(infer)} useful GFLOP/s, "
                  f"FP32 GEMM peak {fmt(peak)} GFLOP/s; train / peak = {useful / peak:.1%}")
        print()


if __name__ == "__main__":
    main()
