#!/usr/bin/env bash
# The 1 user x 200 candidates latency of din (in-process, `din bench run`) and of
# the same model exported with `din export --onnx` in ONNX Runtime
# (bench/onnx_latency.py), alternating A B A B on the same machine (issue 14).
# Both score row LATENCY_ROW's user and history against the same 200 candidates.
#
#   bash bench/onnx_latency.sh     # REPS=5 USERS=20000 THREADS=2 LATENCY_ROW=0 PYTHON=python3
# PYTHON must have numpy, pandas and onnxruntime.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-5}
USERS=${USERS:-20000}
THREADS=${THREADS:-2}
ROW=${LATENCY_ROW:-0}
PYTHON=${PYTHON:-python3}
OUT=runs/onnx-latency
cargo build --release --quiet
DIN=./target/release/din
grep -m1 'model name' /proc/cpuinfo || true
mkdir -p "$OUT"
[ -f "$OUT/data/samples.tsv" ] || $DIN bench gen --out "$OUT/data" --users "$USERS" > /dev/null
$DIN train --config "$OUT/data/config.toml" --out "$OUT/model" --checkpoint-every 0 --json > /dev/null
$DIN export --onnx --model "$OUT/model" --out "$OUT/model.onnx" > /dev/null
: > "$OUT/din.jsonl"
: > "$OUT/ort.jsonl"
for r in $(seq "$REPS"); do
  $DIN bench run --data "$OUT/data" --threads "$THREADS" --latency-row "$ROW" --json \
    | "$PYTHON" -c 'import json, sys; print(json.dumps(json.load(sys.stdin)))' >> "$OUT/din.jsonl"
  "$PYTHON" bench/onnx_latency.py --data "$OUT/data" --model "$OUT/model.onnx" --threads "$THREADS" \
    --latency-row "$ROW" >> "$OUT/ort.jsonl"
done
"$PYTHON" - "$OUT" <<'PY'
import json, statistics, sys
d = sys.argv[1]
din = [json.loads(l) for l in open(f"{d}/din.jsonl")]
ort = [json.loads(l) for l in open(f"{d}/ort.jsonl")]
med = lambda rows, k: statistics.median(r[k] for r in rows)
a = med(din, "latency_ms_1x200_median")
for label in ("padded", "trimmed"):
    b = med(ort, f"latency_ms_1x200_{label}_median")
    print(f"1 x 200 median of {len(din)} runs: din {a:.3f} ms, onnxruntime ({label} history) {b:.3f} ms: "
          f"onnxruntime / din = {b / a:.2f}")
PY
