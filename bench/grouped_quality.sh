#!/usr/bin/env bash
# Grouped vs flat training quality on MovieLens-100K (issue 13): the same
# samples prepared flat (one per line) and grouped (`din prepare
# --grouped`: one line per run of samples sharing a user side), trained
# with the generated config (early stopping on valid.tsv, best epoch kept)
# for each seed, and evaluated on test.tsv. Flat training shuffles rows;
# grouped training shuffles groups and keeps them whole in a batch, so the
# sample order differs and the metrics may differ within the seed spread.
#
#   bash bench/grouped_quality.sh        # SEEDS="1 2 3" NEGATIVES=1 LAYOUTS="flat grouped"
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-1 2 3}
NEGATIVES=${NEGATIVES:-1}
LAYOUTS=${LAYOUTS:-flat grouped}
ML=${ML:-../shared/data/ml-100k}
OUT=runs/grouped-quality
cargo build --release --quiet
DIN=./target/release/din
grep -m1 'model name' /proc/cpuinfo || true
mkdir -p "$OUT"
$DIN prepare --input "$ML" --format movielens --negatives "$NEGATIVES" --out "$OUT/flat" > /dev/null
$DIN prepare --input "$ML" --format movielens --negatives "$NEGATIVES" --grouped --out "$OUT/grouped" > /dev/null
touch "$OUT/metrics.jsonl"
for seed in $SEEDS; do
  for layout in $LAYOUTS; do
    $DIN train --config "$OUT/$layout/config.toml" --out "$OUT/$layout/model-$seed" --seed "$seed" \
      --checkpoint-every 0 --json > "$OUT/$layout/history-$seed.json"
    $DIN evaluate --model "$OUT/$layout/model-$seed" --data "$OUT/$layout/test.tsv" --json \
      | python3 -c 'import json,sys; m=json.load(sys.stdin); h=json.load(open(sys.argv[3])); print(json.dumps({"layout":sys.argv[1],"seed":int(sys.argv[2]),"epochs":len(h["history"]),"kept":h["model_epoch"],**{k:m[k] for k in ("logloss","auc","gauc")}}))' \
        "$layout" "$seed" "$OUT/$layout/history-$seed.json" | tee -a "$OUT/metrics.jsonl"
  done
done
python3 - "$OUT/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = {}
for l in open(sys.argv[1]):  # the last run of each (layout, seed)
    x = json.loads(l)
    rows[(x["layout"], x["seed"])] = x
for layout in ("flat", "grouped"):
    r = [x for (lay, _), x in sorted(rows.items()) if lay == layout]
    if not r:
        continue
    cells = []
    for k in ("gauc", "auc", "logloss"):
        v = [x[k] for x in r]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        cells.append(f"{k} {statistics.mean(v):.4f} ± {sd:.4f}")
    print(f"{layout:8s} test " + ", ".join(cells) + f" ({len(r)} seeds)")
PY
