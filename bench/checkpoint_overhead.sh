#!/usr/bin/env bash
# What checkpoints cost: `din bench run` trains on `din bench gen` data
# (the tutorial's model, 120,000 samples, batch 256: 469 batches an epoch)
# for EPOCHS epochs without checkpoints (A) and with them at the default
# interval (B: train.checkpoint_every = 1000 batches, and each epoch end),
# alternating A B A B, REPS times each. Prints each run, the median
# whole-run training time of each and the overhead of B over A, and the
# time the checkpoint writes themselves took inside B (the share of the
# run that host noise cannot hide).
#
#   bash bench/checkpoint_overhead.sh        # EPOCHS=3 REPS=5
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-3}
REPS=${REPS:-5}
DATA=runs/bench-ckpt
cargo build --release --quiet
DIN=./target/release/din
grep -m1 'model name' /proc/cpuinfo || true
[ -f "$DATA/config.toml" ] || $DIN bench gen --out "$DATA" > /dev/null
: > "$DATA/overhead.jsonl"
for rep in $(seq "$REPS"); do
  for mode in without with; do
    flag=""
    [ "$mode" = with ] && flag="--checkpoints"
    $DIN bench run --data "$DATA" --repetitions 5 --set "train.epochs=$EPOCHS" $flag --json \
      | python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({"mode":sys.argv[1],"rep":int(sys.argv[2]),"train_seconds":r["train_seconds"],"checkpoints":r["checkpoints_written"],"checkpoint_seconds":r["checkpoint_seconds"]}))' "$mode" "$rep" \
      | tee -a "$DATA/overhead.jsonl"
  done
done
python3 - "$DATA/overhead.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = {m: statistics.median(r["train_seconds"] for r in rows if r["mode"] == m) for m in ("without", "with")}
ck = max(r["checkpoints"] for r in rows)
print(f"median training run: without {med['without']:.2f} s, with {med['with']:.2f} s ({ck} checkpoints): overhead {100 * (med['with'] / med['without'] - 1):+.2f}%")
w = [r for r in rows if r["mode"] == "with"]
per = statistics.median(r["checkpoint_seconds"] / r["checkpoints"] for r in w)
share = statistics.median(r["checkpoint_seconds"] / r["train_seconds"] for r in w)
print(f"checkpoint writes, timed inside the runs with them: median {1000 * per:.1f} ms each, {100 * share:.2f}% of the run")
PY
