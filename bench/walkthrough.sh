#!/usr/bin/env bash
# The README's walkthrough on MovieLens-100K, as written (the generated
# config: validation split, early stopping, best epoch kept, no user-id
# embedding), and the same with --user-feature, for seeds 1-3. Not part of
# CI (about 30 minutes on 2 cores). Needs ../shared/data/ml-100k.
#
#   bash bench/walkthrough.sh     # prints one JSON line per run
set -euo pipefail
cd "$(dirname "$0")/.."
ML=${ML:-../shared/data/ml-100k}
OUT=runs/walkthrough
SEEDS=${SEEDS:-"1 2 3"}
cargo build --release --quiet
DIN=./target/release/din
$DIN prepare --input "$ML" --format movielens --out "$OUT/ml" > /dev/null
$DIN prepare --input "$ML" --format movielens --out "$OUT/ml-user" --user-feature > /dev/null
for seed in $SEEDS; do
  for data in ml ml-user; do
    $DIN train --config "$OUT/$data/config.toml" --out "$OUT/$data/model-$seed" --seed "$seed" --json > "$OUT/$data/train-$seed.json"
    $DIN evaluate --model "$OUT/$data/model-$seed" --data "$OUT/$data/test.tsv" --json \
      | python3 -c 'import json,sys; t=json.load(open(sys.argv[3])); m=json.load(sys.stdin); print(json.dumps({"data":sys.argv[1],"seed":int(sys.argv[2]),"epochs_run":len(t["history"]),"saved_epoch":t["model_epoch"],**m}))' \
        "$data" "$seed" "$OUT/$data/train-$seed.json"
  done
done
