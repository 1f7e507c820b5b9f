#!/usr/bin/env bash
# Grouped vs flat (issue 13): file size, peak memory of reading, and
# end-to-end epoch time (`din train` wall time: reading, one epoch with
# its validation, saving) and training samples/s
# on the same samples, with the tutorial's attention (256,128,64) and
# DeepCTR's default (80,40), alternating flat and grouped runs (A B A B),
# REPS times each; medians. Data: `din bench gen` (USERS users, 6
# candidates per history) written flat and grouped, and MovieLens-100K
# prepared with 5 negatives per positive, flat and `--grouped`. `din bench
# load` counts the products an epoch computes each way.
#
#   bash bench/grouped_speed.sh        # USERS=20000 REPS=3 (gen), REPS_ML=2
set -euo pipefail
cd "$(dirname "$0")/.."
USERS=${USERS:-20000}
REPS=${REPS:-3}
REPS_ML=${REPS_ML:-2}
ML=${ML:-../shared/data/ml-100k}
OUT=runs/grouped-speed
cargo build --release --quiet
DIN=./target/release/din
grep -m1 'model name' /proc/cpuinfo || true
mkdir -p "$OUT"
$DIN bench gen --out "$OUT/gen-flat" --users "$USERS" > /dev/null
$DIN bench gen --out "$OUT/gen-grouped" --users "$USERS" --grouped > /dev/null
sets=()
if [ -d "$ML" ]; then
  $DIN prepare --input "$ML" --format movielens --negatives 5 --out "$OUT/ml-flat" > /dev/null
  $DIN prepare --input "$ML" --format movielens --negatives 5 --grouped --out "$OUT/ml-grouped" > /dev/null
  sets+=(ml)
fi
sets+=(gen)
: > "$OUT/load.jsonl"
: > "$OUT/epochs.jsonl"
for set in "${sets[@]}"; do
  for layout in flat grouped; do
    dir="$OUT/$set-$layout"
    for units in "[256,128,64]" "[80,40]"; do
      $DIN bench load --config "$dir/config.toml" --set "model.attention.hidden_units=$units" --json \
        | python3 -c 'import json,sys; r=json.load(sys.stdin); r.update(set=sys.argv[1], layout=sys.argv[2], units=sys.argv[3]); print(json.dumps(r))' "$set" "$layout" "$units" >> "$OUT/load.jsonl"
    done
  done
done
for set in "${sets[@]}"; do
  for units in "[256,128,64]" "[80,40]"; do
    reps=$REPS
    [ "$set" = ml ] && reps=$REPS_ML
    for rep in $(seq "$reps"); do
      for layout in flat grouped; do
        dir="$OUT/$set-$layout"
        start=$(date +%s.%N)
        $DIN train --config "$dir/config.toml" --out "$OUT/model" --epochs 1 --threads 2 \
          --checkpoint-every 0 --set "model.attention.hidden_units=$units" --json > "$OUT/train.json"
        end=$(date +%s.%N)
        python3 -c 'import json,sys; h=json.load(open(sys.argv[1]))["history"][0]; print(json.dumps({"set":sys.argv[2],"units":sys.argv[3],"layout":sys.argv[4],"rep":int(sys.argv[5]),"wall":float(sys.argv[7])-float(sys.argv[6]),"epoch_seconds":h["seconds"],"samples_per_second":h["samples_per_second"]}))' \
          "$OUT/train.json" "$set" "$units" "$layout" "$rep" "$start" "$end" | tee -a "$OUT/epochs.jsonl"
      done
    done
  done
done
python3 - "$OUT/load.jsonl" "$OUT/epochs.jsonl" <<'PY'
import json, statistics, sys
load = [json.loads(l) for l in open(sys.argv[1])]
runs = [json.loads(l) for l in open(sys.argv[2])]
def one(set_, layout, units="[256,128,64]"):
    return next(r for r in load if r["set"] == set_ and r["layout"] == layout and r["units"] == units)
for set_ in sorted({r["set"] for r in load}):
    f, g = one(set_, "flat"), one(set_, "grouped")
    print(f"{set_}: {f['rows']} samples, {g['groups']} groups; file {f['file_bytes']/2**20:.1f} MiB flat, {g['file_bytes']/2**20:.1f} MiB grouped ({f['file_bytes']/g['file_bytes']:.2f}x); "
          f"reading peak RSS {f['peak_rss_mib']:.1f} vs {g['peak_rss_mib']:.1f} MiB ({f['peak_rss_mib']/g['peak_rss_mib']:.2f}x), "
          f"{f['rows_per_second']:.0f} vs {g['rows_per_second']:.0f} rows/s")
    for units in ("[256,128,64]", "[80,40]"):
        lf, lg = one(set_, "flat", units), one(set_, "grouped", units)
        med = {}
        for layout in ("flat", "grouped"):
            r = [x for x in runs if x["set"] == set_ and x["units"] == units and x["layout"] == layout]
            med[layout] = (statistics.median(x["wall"] for x in r), statistics.median(x["samples_per_second"] for x in r))
        saved = 1 - lg["train_gflop_per_epoch_grouped"] / lf["train_gflop_per_epoch_flat"]
        print(f"  attention {units}: end-to-end {med['flat'][0]:.2f} s flat, {med['grouped'][0]:.2f} s grouped ({med['flat'][0]/med['grouped'][0]:.2f}x); "
              f"training {med['flat'][1]:.0f} vs {med['grouped'][1]:.0f} samples/s ({med['grouped'][1]/med['flat'][1]:.2f}x); "
              f"products {lf['train_gflop_per_epoch_flat']:.1f} vs {lg['train_gflop_per_epoch_grouped']:.1f} GFLOP ({100*saved:.1f}% fewer)")
PY
