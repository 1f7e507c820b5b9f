#!/usr/bin/env bash
# Reproduces docs/results.md: din and DeepCTR-Torch's DIN on MovieLens-100K,
# both protocols, 3 seeds, plus din's ablations. Not part of CI (about 40
# minutes on 2 cores). Needs ../shared/data/ml-100k and a Python environment
# with deepctr-torch (PY=/path/to/python; see bench/README.md).
#
#   bash bench/results.sh            # writes runs/results/*.jsonl
#   python3 bench/summarize.py       # prints the tables
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
ML=${ML:-../shared/data/ml-100k}
OUT=runs/results
SEEDS=${SEEDS:-"1 2 3"}
EPOCHS=${EPOCHS:-3}
cargo build --release --quiet
DIN=./target/release/din
mkdir -p "$OUT"

# Data: both protocols, plus the time-gap and days-since-previous variants.
# These runs predate the validation split and the user-id choice of `din
# prepare`: the tables were made with the test file as validation (the last
# epoch reported) and with a user-id embedding, which these two flags keep.
$DIN prepare --input "$ML" --format movielens --out "$OUT/next" --protocol next-item --valid-per-user 0 --user-feature
$DIN prepare --input "$ML" --format movielens --out "$OUT/rating" --protocol rating --valid-per-user 0 --user-feature
$DIN prepare --input "$ML" --format movielens --out "$OUT/next-gap" --protocol next-item --valid-per-user 0 --user-feature --session-gap-days 1
$DIN prepare --input "$ML" --format movielens --out "$OUT/rating-gap" --protocol rating --valid-per-user 0 --user-feature --session-gap-days 1
$DIN prepare --input "$ML" --format movielens --out "$OUT/next-days" --protocol next-item --valid-per-user 0 --user-feature --days-since-prev
$DIN prepare --input "$ML" --format movielens --out "$OUT/rating-days" --protocol rating --valid-per-user 0 --user-feature --days-since-prev

# Shared hyper-parameters: embedding 8, attention (80,40) PReLU, DNN (200,80)
# PReLU, Adam lr 0.001, batch 256, EPOCHS epochs; the last epoch is reported.
COMMON=(--epochs "$EPOCHS" --batch-size 256 --threads 2 --set "model.attention.hidden_units=[80,40]")

run_din() { # name data seed extra...
  local name=$1 data=$2 seed=$3; shift 3
  $DIN train --config "$OUT/$data/config.toml" "${COMMON[@]}" --seed "$seed" --out "$OUT/models/$name-$seed" --json "$@" \
    | $PY -c 'import json,sys; d=json.load(sys.stdin); h=d["history"][-1]; print(json.dumps({"impl":"din","variant":sys.argv[1],"data":sys.argv[2],"seed":int(sys.argv[3]),"epoch":h["epoch"],**h["validation"],"train_samples_per_second":h["samples_per_second"]}))' "$name" "$data" "$seed" \
    >> "$OUT/din.jsonl"
}

run_ref() { # data seed
  $PY bench/deepctr_torch_din.py --config "$OUT/$1/config.toml" --seed "$2" --epochs "$EPOCHS" --batch-size 256 --att-hidden 80,40 2>/dev/null \
    | tail -n 1 | $PY -c 'import json,sys; d=json.loads(sys.stdin.read()); print(json.dumps({"impl":"deepctr-torch","variant":"base","data":sys.argv[1],"seed":int(sys.argv[2]),**d}))' "$1" "$2" \
    >> "$OUT/reference.jsonl"
}

: > "$OUT/din.jsonl"
: > "$OUT/reference.jsonl"
for seed in $SEEDS; do
  for data in next rating; do
    run_din base "$data" "$seed"
    run_ref "$data" "$seed"
  done
done
for seed in $SEEDS; do
  for data in next rating; do
    run_din sum "$data" "$seed" --set model.attention.pooling=sum
    run_din dice "$data" "$seed" --set model.attention.activation=dice --set model.dnn.activation=dice
    run_din softmax "$data" "$seed" --set model.attention.normalization=softmax
    run_din l2 "$data" "$seed" --set train.regularization.kind=l2 --set train.regularization.lambda=1e-5
    run_din mba "$data" "$seed" --set train.regularization.kind=mini_batch_aware --set train.regularization.lambda=0.01
    run_din gap "$data-gap" "$seed"
    run_din days "$data-days" "$seed"
  done
done
echo "done: $OUT/din.jsonl $OUT/reference.jsonl"
