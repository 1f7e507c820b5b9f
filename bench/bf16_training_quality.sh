#!/usr/bin/env bash
# Mixed-precision training against FP32 training on MovieLens-100K (issue
# 12's accuracy guard for `train.precision = "bf16"`): both protocols, 3
# seeds, the base model of docs/results.md (embedding 8, attention (80,40)
# PReLU, DNN (200,80) PReLU, 3 epochs, batch 256). Each seed trains twice,
# fp32 and bf16, from the same initial weights and the same batches; both
# models are scored on the test file in fp32. Prints AUC, GAUC, logloss
# per model, their differences, and the means over the seeds.
# On a CPU without AVX512-BF16, bf16 training is emulated (the hardware's
# arithmetic but for the order of the f32 sums), slower than fp32.
# Not part of CI (about 5 minutes on 2 cores). Needs ../shared/data/ml-100k.
#
# FP32's own noise: with REFERENCE_DIN set to a second build that differs
# only in the order of its f32 sums (for example one whose
# CHUNK_ROWS_TRAIN in crates/din/src/model/attention/chunked.rs is 384
# instead of 512), each seed also trains "fp32-ref" with it, and the
# summary sets bf16's differences from fp32 beside the reference's: how
# far two FP32 runs that differ by rounding alone drift apart. With more
# than 3 seeds it also says how many of the seed triples' mean differences
# exceed 0.001 (issue 12's guard).
#
# Training to convergence: SPLIT=validation holds out each user's samples
# before the test ones as validation (`din prepare`'s default) and trains
# as the generated config does, until the validation logloss has not
# improved for 2 epochs (at most 20), keeping the best epoch; EPOCHS is
# then ignored. The default, SPLIT=test, validates on the test file and
# keeps the last of EPOCHS epochs (docs/results.md's fixed-epoch protocol).
#
#   bash bench/bf16_training_quality.sh   # writes runs/bf16-train/quality.jsonl and prints a table
#   SEEDS="1 2 3 4 5 6 7 8 9" REFERENCE_DIN=/tmp/din-384 bash bench/bf16_training_quality.sh
#   SPLIT=validation OUT=runs/bf16-train-converged bash bench/bf16_training_quality.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
ML=${ML:-../shared/data/ml-100k}
OUT=${OUT:-runs/bf16-train}
SEEDS=${SEEDS:-"1 2 3"}
EPOCHS=${EPOCHS:-3}
SPLIT=${SPLIT:-test}
case $SPLIT in
  test) epochs=(--epochs "$EPOCHS") ;;
  validation) epochs=() ;;
  *) echo "SPLIT must be test or validation, not '$SPLIT'" >&2; exit 2 ;;
esac
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet
DIN=${DIN:-./target/release/din}
REFERENCE_DIN=${REFERENCE_DIN:-}
VARIANTS="fp32 bf16${REFERENCE_DIN:+ fp32-ref}"
mkdir -p "$OUT"
: > "$OUT/quality.jsonl"
for data in next-item rating; do
  test_file=$(movielens_split "$DIN" "$ML" "$OUT" "$data" "$SPLIT")
  config=$(dirname "$test_file")/config.toml
  for seed in $SEEDS; do
    for v in $VARIANTS; do
      bin=$DIN p=$v
      [ "$v" = fp32-ref ] && bin=$REFERENCE_DIN p=fp32
      model="$OUT/models/$data-$seed-$v"
      $bin train --config "$config" "${epochs[@]}" --batch-size 256 --threads 2 \
        --set "model.attention.hidden_units=[80,40]" --set "train.precision=\"$p\"" --seed "$seed" \
        --out "$model" --json >"$OUT/train-$v.json" 2>/dev/null
      $DIN evaluate --model "$model" --data "$test_file" --threads 2 --json >"$OUT/eval-$v.json"
    done
    python3 - "$data" "$seed" "$OUT" $VARIANTS <<'PY' >>"$OUT/quality.jsonl"
import json, sys
data, seed, out, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
m = {p: json.load(open(f"{out}/eval-{p}.json")) for p in variants}
t = {p: json.load(open(f"{out}/train-{p}.json")) for p in variants}
speed = {p: sorted(e["samples_per_second"] for e in t[p]["history"])[len(t[p]["history"]) // 2] for p in t}
epochs = {p: [len(t[p]["history"]), t[p]["best_epoch"]] for p in t}
print(json.dumps({"data": data, "seed": seed, **m, "train_samples_per_s": speed, "epochs_run_best": epochs}))
PY
  done
done
python3 - "$OUT/quality.jsonl" <<'PY'
import itertools, json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| protocol | seed | AUC fp32 | AUC bf16 | GAUC fp32 | GAUC bf16 | logloss fp32 | logloss bf16 | epochs run/best fp32, bf16 | train samples/s fp32 / bf16 |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
for r in rows:
    f, b, s, e = r["fp32"], r["bf16"], r["train_samples_per_s"], r["epochs_run_best"]
    print(f"| {r['data']} | {r['seed']} | {f['auc']:.4f} | {b['auc']:.4f} | {f['gauc']:.4f} | {b['gauc']:.4f} | {f['logloss']:.4f} | {b['logloss']:.4f} | {e['fp32'][0]}/{e['fp32'][1]}, {e['bf16'][0]}/{e['bf16'][1]} | {s['fp32']:.0f} / {s['bf16']:.0f} |")
for data in sorted({r["data"] for r in rows}):
    rs = [r for r in rows if r["data"] == data]
    for key in ("auc", "gauc"):
        mean = {p: sum(r[p][key] for r in rs) / len(rs) for p in ("fp32", "bf16")}
        worst = max(abs(r["fp32"][key] - r["bf16"][key]) for r in rs)
        print(f"{data}: mean {key} fp32 {mean['fp32']:.4f}, bf16 {mean['bf16']:.4f}, difference {mean['bf16'] - mean['fp32']:+.4f}; largest per seed {worst:.4f}")
        for v in [v for v in ("bf16", "fp32-ref") if all(v in r for r in rs)]:
            diffs = [r[v][key] - r["fp32"][key] for r in rs]
            line = f"  {key} {v} - fp32 per seed: " + " ".join(f"{d:+.4f}" for d in diffs)
            if len(diffs) > 3:
                triples = [sum(c) / 3 for c in itertools.combinations(diffs, 3)]
                over = sum(abs(t) > 0.001 for t in triples)
                line += f"; seed triples with |mean| > 0.001: {over} of {len(triples)}"
            print(line)
PY
