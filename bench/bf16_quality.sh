#!/usr/bin/env bash
# bf16 inference against FP32 on MovieLens-100K (issue 12's accuracy
# guard): both protocols, 3 seeds, the base model of docs/results.md
# (embedding 8, attention (80,40) PReLU, DNN (200,80) PReLU, 3 epochs),
# each model scored on the test file in fp32 and in bf16 (`--precision`):
# AUC, GAUC, logloss and the largest difference of a probability.
# On a CPU without AVX512-BF16, bf16 is the emulation (the same
# arithmetic as the hardware but for the order of the f32 sums).
# Not part of CI (about 5 minutes on 2 cores). Needs ../shared/data/ml-100k.
#
#   bash bench/bf16_quality.sh      # writes runs/bf16/quality.jsonl and prints a table
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
ML=${ML:-../shared/data/ml-100k}
OUT=${OUT:-runs/bf16}
SEEDS=${SEEDS:-"1 2 3"}
EPOCHS=${EPOCHS:-3}
cargo build --release --quiet
DIN=./target/release/din
mkdir -p "$OUT"
: > "$OUT/quality.jsonl"
for data in next-item rating; do
  test_file=$(movielens_split "$DIN" "$ML" "$OUT" "$data")
  for seed in $SEEDS; do
    model="$OUT/models/$data-$seed"
    $DIN train --config "$OUT/$data/config.toml" --epochs "$EPOCHS" --batch-size 256 --threads 2 \
      --set "model.attention.hidden_units=[80,40]" --seed "$seed" --out "$model" >/dev/null
    for p in fp32 bf16; do
      $DIN evaluate --model "$model" --data "$test_file" --precision "$p" --threads 2 --json >"$OUT/eval-$p.json"
      $DIN predict --model "$model" --data "$test_file" --precision "$p" --threads 2 --out "$OUT/scores-$p.txt"
    done
    python3 - "$data" "$seed" "$OUT" <<'PY' >>"$OUT/quality.jsonl"
import json, sys
data, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
m = {p: json.load(open(f"{out}/eval-{p}.json")) for p in ("fp32", "bf16")}
s = {p: [float(x) for x in open(f"{out}/scores-{p}.txt")] for p in ("fp32", "bf16")}
diff = max(abs(a - b) for a, b in zip(s["fp32"], s["bf16"]))
print(json.dumps({"data": data, "seed": seed, "rows": len(s["fp32"]), "fp32": m["fp32"], "bf16": m["bf16"], "max_prob_diff": diff}))
PY
  done
done
python3 - "$OUT/quality.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| protocol | seed | AUC fp32 | AUC bf16 | GAUC fp32 | GAUC bf16 | logloss fp32 | logloss bf16 | largest prob. diff |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    f, b = r["fp32"], r["bf16"]
    print(f"| {r['data']} | {r['seed']} | {f['auc']:.5f} | {b['auc']:.5f} | {f['gauc']:.5f} | {b['gauc']:.5f} | {f['logloss']:.5f} | {b['logloss']:.5f} | {r['max_prob_diff']:.1e} |")
for key in ("auc", "gauc"):
    worst = max(abs(r["fp32"][key] - r["bf16"][key]) for r in rows)
    print(f"largest |{key} bf16 - {key} fp32|: {worst:.1e}")
PY
