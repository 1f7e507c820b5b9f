#!/usr/bin/env bash
# Parquet input against the TSV it was written from (issue 14): MovieLens-100K
# prepared by `din prepare`, its train.tsv written as Parquet by pyarrow
# (bench/parquet.py: list<int64> histories, snappy), and the same samples as
# `din prepare --output-format parquet` writes them (train.din.parquet); the
# same config trains on each with the same seed (the weights must be
# identical: cmp), and `din bench load` reads each, alternating A B C A B C,
# REPS times.
#
#   bash bench/parquet.sh      # REPS=5 EPOCHS=2 NEGATIVES=5 PYTHON=python3 (needs pyarrow)
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-5}
EPOCHS=${EPOCHS:-2}
NEGATIVES=${NEGATIVES:-5}
PYTHON=${PYTHON:-python3}
ML=${ML:-../shared/data/ml-100k}
OUT=runs/parquet
cargo build --release --quiet
DIN=./target/release/din
grep -m1 'model name' /proc/cpuinfo || true
mkdir -p "$OUT"
$DIN prepare --input "$ML" --format movielens --negatives "$NEGATIVES" --out "$OUT/ml" > /dev/null
"$PYTHON" bench/parquet.py "$OUT/ml/train.tsv" "$OUT/ml/train.parquet"
$DIN prepare --input "$ML" --format movielens --negatives "$NEGATIVES" --output-format parquet --out "$OUT/mlpq" > /dev/null
cp "$OUT/mlpq/train.parquet" "$OUT/ml/train.din.parquet"
ls -l "$OUT/ml/train.tsv" "$OUT/ml/train.parquet" "$OUT/ml/train.din.parquet"
FILES="tsv parquet din.parquet"
for f in $FILES; do
  $DIN train --config "$OUT/ml/config.toml" --data "$OUT/ml/train.$f" --out "$OUT/model-$f" --seed 1 \
    --epochs "$EPOCHS" --threads 2 --checkpoint-every 0 --json > "$OUT/train-$f.json"
done
for f in parquet din.parquet; do
  cmp "$OUT/model-tsv/model.safetensors" "$OUT/model-$f/model.safetensors" \
    && echo "model.safetensors: identical after $EPOCHS epochs (train.tsv and train.$f, seed 1)"
done
: > "$OUT/load.jsonl"
for r in $(seq "$REPS"); do
  for f in $FILES; do
    $DIN bench load --config "$OUT/ml/config.toml" --set "data.train=\"train.$f\"" --json \
      | "$PYTHON" -c 'import json, sys; d = json.load(sys.stdin); d["file"] = sys.argv[1]; print(json.dumps(d))' "$f" \
      >> "$OUT/load.jsonl"
  done
done
"$PYTHON" - "$OUT/load.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for f in ("tsv", "parquet", "din.parquet"):
    r = [x for x in rows if x["file"] == f]
    keys = [k for k in r[0] if "per_second" in k or "rss" in k or k == "seconds"]
    print(f, {k: round(statistics.median(x[k] for x in r), 3) for k in keys}, f"({len(r)} runs)")
PY
