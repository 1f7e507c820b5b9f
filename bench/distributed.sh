#!/usr/bin/env bash
# Distributed training (issue 15, docs/distributed.md): bytes each rank
# sends per step (ids, embedding rows, row gradients, dense gradients) and
# the time of the same steps spent in communication and in computation,
# with 1, 2 and 4 ranks on this machine (oversubscribed: more ranks than
# cores is fine for the byte counts, which are exact; the times are of a
# loaded 2-core machine and say more about the split than the speed).
# Then the memory of each rank with a large item vocabulary, 1, 2 and 4
# ranks (peak RSS per rank), and the table-size test: that vocabulary under
# a per-rank memory limit, which kills one process and which 4 ranks fit.
#
# Usage: bench/distributed.sh [OUT]     (default runs/bench-distributed)
#        PARTS="3" bench/distributed.sh  runs only the parts listed (1 2 3)
# Needs OpenMPI (apt-get install libopenmpi-dev openmpi-bin libclang-dev).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench-distributed}
USERS=${USERS:-5000}          # x 6 candidates = 30,000 rows, 118 steps of 256
BIG_ITEMS=${BIG_ITEMS:-8000000}
mkdir -p "$OUT"
# DIN=path/to/din uses that binary (built with --features mpi) instead.
if [ -z "${DIN:-}" ]; then
  cargo build --release -p din-cli --features mpi
  DIN=$PWD/target/release/din
fi
MPIRUN=(mpirun --allow-run-as-root --oversubscribe --bind-to none)
PARTS=${PARTS:-1 2 3}
part() { [[ " $PARTS " == *" $1 "* ]]; }

# 1. Traffic and time: `din bench gen` data (the tutorial's model: embedding
# dim 8, attention (256,128,64), DNN (200,80), PReLU; batch 256; 100,000
# items, 1,000 categories, histories of 1..50), one epoch, one thread a rank.
if part 1; then
data=$OUT/data
[ -f "$data/samples.tsv" ] || "$DIN" bench gen --out "$data" --users "$USERS" --items 100000 --categories 1000 --max-len 50 --candidates 6
for n in 1 2 4; do
  echo "== $n ranks: ${MPIRUN[*]} -np $n din train --distributed --config $data/config.toml --threads 1 --epochs 1 --json"
  "${MPIRUN[@]}" -np "$n" "$DIN" train --distributed --config "$data/config.toml" --out "$OUT/model-$n" \
    --threads 1 --epochs 1 --json >"$OUT/ranks$n.json"
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print("| ranks | rank | steps | ids B/step | rows B/step | row grads B/step | dense B/step | comm s (rows, grads, dense) | compute s | comm share |")
print("|---|---|---|---|---|---|---|---|---|---|")
for n in (1, 2, 4):
    doc = json.load(open(f"{out}/ranks{n}.json"))
    for r, t in enumerate(doc["traffic"]):
        s = max(t["steps"], 1)
        comm = t["rows_seconds"] + t["row_gradient_seconds"] + t["dense_seconds"]
        total = comm + t["compute_seconds"]
        print(f"| {n} | {r} | {t['steps']} | {t['id_bytes']/s:,.0f} | {t['row_bytes']/s:,.0f} | {t['row_gradient_bytes']/s:,.0f} "
              f"| {t['dense_bytes']/s:,.0f} | {comm:.2f} ({t['rows_seconds']:.2f}, {t['row_gradient_seconds']:.2f}, {t['dense_seconds']:.2f}) "
              f"| {t['compute_seconds']:.2f} | {comm/max(total,1e-9):.0%} |")
    h = doc["history"][0]
    print(f"|  | all | train_loss {h['train_loss']:.5f} | {h['samples_per_second']:,.0f} samples/s | | | | | | |")
PY
fi

# 2. Memory: the same model with an item vocabulary of BIG_ITEMS (a table
# of BIG_ITEMS x 8 floats, and Adam's two moments of it), peak RSS of each
# rank (VmHWM), 1, 2 and 4 ranks, one epoch of a small file.
big=$OUT/big
[ -f "$big/samples.tsv" ] || "$DIN" bench gen --out "$big" --users 500 --items "$BIG_ITEMS" --categories 1000 --max-len 50 --candidates 6
if part 2; then
for n in 1 2 4; do
  echo "== memory, $n ranks, item table $BIG_ITEMS x 8"
  # /usr/bin/time -v reports each rank's maximum resident set size.
  "${MPIRUN[@]}" -np "$n" /usr/bin/time -f "rank peak RSS %M KiB" "$DIN" train --distributed \
    --config "$big/config.toml" --out "$OUT/big-model-$n" --threads 1 --epochs 1 --json 2>&1 >/dev/null |
    grep "peak RSS" | sort
done
fi

# 3. The table-size test: every rank in a memory cgroup of its own limited
# to LIMIT_MIB (bench/memory_limit.sh; needs root and a memory cgroup).
# One process needs the whole BIG_ITEMS table and its Adam state and is
# killed by the limit; 4 ranks each hold a quarter, train, and save one
# model directory (rank 0 writes it as the rows stream in); `din evaluate`,
# not limited, reads it.
LIMIT_MIB=${LIMIT_MIB:-640}
if part 3; then
for n in 1 4; do
  echo "== table-size test: $n rank(s), item table $BIG_ITEMS x 8, each rank limited to $LIMIT_MIB MiB"
  rm -rf "$OUT/limited-$n"
  set +e
  "${MPIRUN[@]}" -np "$n" bench/memory_limit.sh "$LIMIT_MIB" "$DIN" train --distributed \
    --config "$big/config.toml" --out "$OUT/limited-$n" --threads 1 --epochs 1 --json >"$OUT/limited-$n.json" 2>"$OUT/limited-$n.err"
  status=$?
  set -e
  grep -E "^rank [0-9]+:" "$OUT/limited-$n.err" | sort
  if [ "$status" -eq 0 ] && [ -f "$OUT/limited-$n/model.safetensors" ]; then
    echo "$n rank(s): trained and saved $(du -h "$OUT/limited-$n/model.safetensors" | cut -f1) of weights"
    "$DIN" evaluate --model "$OUT/limited-$n" --data "$big/samples.tsv" --threads 2
  else
    echo "$n rank(s): failed (exit $status)"
  fi
done
fi
