#!/usr/bin/env bash
# Dice against PReLU attention, two din builds alternated (not part of CI).
#
#   A=/tmp/din-before B=target/release/din bash bench/dice_speed.sh
#
# Runs `din bench run` with the attention activation set to prelu and to
# dice, for build A then build B, ROUNDS times (A-prelu A-dice B-prelu
# B-dice, A-prelu ...), all on the same `din bench gen` data, and prints
# per build and activation the medians of training samples/s, batch-4096
# inference samples/s, the 1 x 200 latency and peak RSS, then Dice's ratio
# to PReLU within each build (training and inference: Dice / PReLU; latency
# and RSS: Dice's / PReLU's). The issue's targets: training >= 0.75, inference >= 1/1.3,
# latency <= 1.3.
#
# Environment: A, B (din binaries; B defaults to target/release/din, A to
# nothing: then only B runs), DATA (runs/bench-data, generated if missing),
# OUT (runs/dice-speed), ROUNDS (3), THREADS (2), BATCH (1024), ATT (80,40),
# LATENCY_ROW (0; the first row with 50 behaviours is `bench/serve_load.sh`'s),
# EPOCHS (1: about a second of training on the default data, which a noisy
# host moves by several percent; more epochs time a longer run).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
B=${B:-target/release/din}
A=${A:-}
DATA=${DATA:-runs/bench-data}
OUT=${OUT:-runs/dice-speed}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
BATCH=${BATCH:-1024}
ATT=${ATT:-80,40}
LATENCY_ROW=${LATENCY_ROW:-0}
EPOCHS=${EPOCHS:-1}
[[ -f $DATA/samples.tsv ]] || "$B" bench gen --out "$DATA" >/dev/null
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)
CPU=$(cpu_name)
FLAGS=$(cpu_flags)
echo "run $RUN_ID on $CPU ($FLAGS), $THREADS threads, attention ($ATT), batch $BATCH, $EPOCHS epoch(s), latency row $LATENCY_ROW" >&2

builds=()
[[ -n $A ]] && builds+=("A:$A")
builds+=("B:$B")
for round in $(seq 1 "$ROUNDS"); do
  for build in "${builds[@]}"; do
    name=${build%%:*} bin=${build#*:}
    for act in prelu dice; do
      echo "== round $round: $name $act" >&2
      "$bin" bench run --data "$DATA" --threads "$THREADS" --batch-size "$BATCH" --latency-row "$LATENCY_ROW" \
        --set "model.attention.hidden_units=[$ATT]" --set "model.attention.activation=$act" --set "train.epochs=$EPOCHS" --json 2>/dev/null |
        python3 -c '
import json, sys
build, act, rnd, run_id, cpu = sys.argv[1:]
text = sys.stdin.read()
obj = json.loads(text[text.index("{"): text.rindex("}") + 1])
obj.update(build=build, activation=act, round=int(rnd), run_id=run_id, cpu=cpu)
print(json.dumps(obj))
' "$name" "$act" "$round" "$RUN_ID" "$CPU" >>"$RESULTS"
    done
  done
done

python3 - "$RESULTS" "$RUN_ID" <<'EOF'
import json, statistics, sys
path, run_id = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if l.strip()]
rows = [r for r in rows if r["run_id"] == run_id]
keys = (("train_samples_per_second", "train samples/s"),
        ("inference_samples_per_second_batch_4096", "inference samples/s (batch 4096)"),
        ("latency_ms_1x200_median", "latency 1x200 median (ms)"),
        ("peak_rss_mib", "peak RSS (MiB)"))
med = lambda b, a, k: statistics.median(r[k] for r in rows if r["build"] == b and r["activation"] == a)
builds = sorted({r["build"] for r in rows})
print(f"| measure | " + " | ".join(f"{b} prelu | {b} dice | {b} dice/prelu" for b in builds) + " |")
print("|---|" + "---:|" * (3 * len(builds)))
for k, label in keys:
    cells = []
    for b in builds:
        p, d = med(b, "prelu", k), med(b, "dice", k)
        cells += [f"{p:,.0f}" if p > 100 else f"{p:.2f}", f"{d:,.0f}" if d > 100 else f"{d:.2f}", f"{d / p:.2f}"]
    print(f"| {label} | " + " | ".join(cells) + " |")
n = len({r["round"] for r in rows})
print(f"\nmedians of {n} round(s), run {run_id}, {rows[0]['cpu']}")
# Within a round the two activations ran one after the other: their ratio
# moves less with the host's drift than the ratio of the medians.
by = {(r["build"], r["activation"], r["round"]): r["train_samples_per_second"] for r in rows}
for b in builds:
    ratios = [by[b, "dice", i] / by[b, "prelu", i] for i in sorted({r["round"] for r in rows})
              if (b, "dice", i) in by and (b, "prelu", i) in by]
    if ratios:
        print(f"{b}: training dice/prelu per round " + ", ".join(f"{x:.3f}" for x in ratios)
              + f" (median {statistics.median(ratios):.3f})")
EOF
