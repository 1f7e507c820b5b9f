#!/usr/bin/env bash
# Training speed of din through Python (`import din`, bench/python_speed.py)
# against the CLI (`din bench run`) and DeepCTR-Torch through its own Python
# API (bench/deepctr_torch_speed.py --train-method fit), on the same `din bench
# gen` data, alternating cli python torch cli python torch ... for ROUNDS
# rounds with THREADS threads; prints the medians and the ratios. Not part of CI.
#
#   bash bench/python_speed.sh
#
# Environment: DATA (runs/bench-data; generated if missing), ROUNDS (3),
# THREADS (2), PYTHON_DIN (a python with `din` installed, default
# .ci/venv/bin/python), VENV_TORCH (/work/venv-ref, with deepctr-torch),
# SKIP_BUILD=1 (use the existing target/release/din), OUT (runs/python-speed).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-runs/bench-data}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
PYTHON_DIN=${PYTHON_DIN:-.ci/venv/bin/python}
# Absolute, for the runs from bench/ (not resolved: a venv's python is a link).
[[ $PYTHON_DIN == /* ]] || PYTHON_DIN=$PWD/$PYTHON_DIN
VENV_TORCH=${VENV_TORCH:-/work/venv-ref}
OUT=${OUT:-runs/python-speed}
DIN=./target/release/din
if [[ -z "${SKIP_BUILD:-}" ]]; then
  cargo build --release --quiet -p din-cli
fi
[[ -f $DATA/samples.tsv ]] || $DIN bench gen --out "$DATA"
"$PYTHON_DIN" -c "import din" || { echo "no din in $PYTHON_DIN: pip install ./crates/python" >&2; exit 1; }
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: > "$RESULTS"
lscpu | sed -n 's/^Model name:\s*//p' | head -1 > "$OUT/cpu.txt"
for round in $(seq 1 "$ROUNDS"); do
  $DIN bench run --data "$DATA" --threads "$THREADS" --json | python3 -c 'import json,sys; t=sys.stdin.read(); o=json.loads(t[t.index("{"):t.rindex("}")+1]); o["impl"]="din-cli"; print(json.dumps(o))' >> "$RESULTS"
  (cd bench && "$PYTHON_DIN" python_speed.py --data "../$DATA" --threads "$THREADS" --batch-size 256) >> "$RESULTS"
  (cd bench && "$VENV_TORCH/bin/python" deepctr_torch_speed.py --data "../$DATA" --threads "$THREADS" --batch-size 256 \
     --att-hidden 256,128,64 --embedding-dim 8 --train-method fit --repetitions 20) >> "$RESULTS"
  echo "round $round done" >&2
done
python3 - "$RESULTS" "$(cat "$OUT/cpu.txt")" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault(r["impl"], []).append(r)
med = lambda impl, key: statistics.median(r[key] for r in by[impl])
cli, py, torch = med("din-cli", "train_samples_per_second"), med("din-python", "train_samples_per_second"), med("deepctr-torch", "train_samples_per_second")
wall = med("din-python", "train_samples_per_second_wall")
print(f"CPU: {sys.argv[2]}; {len(by['din-cli'])} rounds, medians, training samples/s")
print(f"| | samples/s | vs CLI | vs DeepCTR-Torch |")
print(f"|---|---:|---:|---:|")
print(f"| din CLI (`din bench run`) | {cli:,.0f} | 1.00 | {cli / torch:.2f}x |")
print(f"| din Python, epoch figure | {py:,.0f} | {py / cli:.3f} | {py / torch:.2f}x |")
print(f"| din Python, whole `fit` call | {wall:,.0f} | {wall / cli:.3f} | {wall / torch:.2f}x |")
print(f"| DeepCTR-Torch `model.fit` | {torch:,.0f} | {torch / cli:.3f} | 1.00 |")
PY
