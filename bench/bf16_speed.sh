#!/usr/bin/env bash
# bf16 speed (issue 12): din in FP32 and in bf16 (on each bf16 kernel the
# CPU has: AMX, AVX512-BF16; bf16 inference and mixed-precision training,
# `train.precision = "bf16"`) against the tight PyTorch DIN
# (bench/torch_din_speed.py: eager, torch.compile, bf16 autocast +
# torch.compile), alternating (din-fp32 din-bf16 ... pt-bf16, then again)
# for ROUNDS rounds with THREADS threads, on the tutorial model (dim 8,
# attention (256,128,64), DNN (200,80), batch 256) over `din bench gen`
# data. The 1 x 200 request is the first row with a full 50-behaviour
# history (as bench/serve_load.sh picks it) for every implementation.
# Not part of CI; meant for a CPU with AVX512-BF16 or AMX (elsewhere din's
# bf16 is the emulation and PyTorch's bf16 is slow too).
#
#   bash bench/bf16_speed.sh
#   ROUNDS=1 USERS=2000 bash bench/bf16_speed.sh        # quick look
#
# Environment: DIN (./target/release/din, built unless SKIP_BUILD=1), PY
# (python3 with torch and numpy), DATA ($OUT/data, generated with USERS
# users, default 10000), OUT (runs/bf16-speed), ROUNDS (3), THREADS (2),
# IMPLS (subset of "din-fp32 din-bf16 din-avx512bf16 pt-eager pt-compile
# pt-bf16"; din-avx512bf16 is din's bf16 kept off AMX with
# DIN_BF16_KERNEL=avx512bf16, and is skipped unless the CPU has AMX),
# STEP_TIMEOUT (seconds per run, 300). Writes $OUT/results.jsonl (one JSON
# object per run, tagged) and prints the medians and the ratios of the
# issue's targets.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
OUT=${OUT:-runs/bf16-speed}
DATA=${DATA:-$OUT/data}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
PY=${PY:-python3}
DIN=${DIN:-./target/release/din}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
IMPLS=${IMPLS:-"din-fp32 din-bf16 din-avx512bf16 pt-eager pt-compile pt-bf16"}

[[ -n "${SKIP_BUILD:-}" || $DIN != ./target/release/din ]] || cargo build --release --quiet
mkdir -p "$OUT/logs"
RESULTS=$OUT/results.jsonl
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)
CPU=$(cpu_name)
FLAGS=$(cpu_flags)
[[ -f $DATA/samples.tsv ]] || $DIN bench gen --out "$DATA" --users "${USERS:-10000}" >/dev/null
ROW=$(full_history_row "$DATA/samples.tsv")
[[ -n $ROW ]] || { echo "no row with a 50-behaviour history in $DATA" >&2; exit 1; }
echo "run $RUN_ID on $CPU ($FLAGS), $THREADS threads; latency row $ROW (50 behaviours)" >&2

# tag IMPL ROUND < output: its JSON object, tagged, appended to RESULTS.
tag() {
  python3 -c '
import json, sys
impl, rnd, run_id, cpu, flags = sys.argv[1:]
text = sys.stdin.read()
obj = json.loads(text[text.index("{"): text.rindex("}") + 1])
obj.update(impl=impl, round=int(rnd), run_id=run_id, cpu=cpu, cpu_flags=flags.split())
print(json.dumps(obj))' "$1" "$2" "$RUN_ID" "$CPU" "$FLAGS" >>"$RESULTS"
}

for round in $(seq 1 "$ROUNDS"); do
  for impl in $IMPLS; do
    env=()
    case $impl in
      din-fp32|din-bf16|din-avx512bf16)
        precision=${impl#din-}
        if [[ $impl == din-avx512bf16 ]]; then
          [[ " $FLAGS " == *" amx_tile "* ]] || continue
          precision=bf16 env=(DIN_BF16_KERNEL=avx512bf16)
        fi
        cmd=($DIN bench run --data "$DATA" --threads "$THREADS" --latency-row "$ROW"
             --set "model.precision=$precision" --set "train.precision=$precision" --json) ;;
      pt-eager|pt-compile|pt-bf16)
        mode=${impl#pt-}; [[ $mode == bf16 ]] && mode=bf16-compile
        cmd=("$PY" bench/torch_din_speed.py --data "$DATA" --threads "$THREADS" --latency-row "$ROW"
             --full-history-row -1 --mode "$mode" --json) ;;
      *) echo "unknown impl $impl" >&2; exit 1 ;;
    esac
    log=$OUT/logs/$RUN_ID-$impl-$round
    echo "== round $round: $impl" >&2
    if env "${env[@]}" timeout "$STEP_TIMEOUT" "${cmd[@]}" >"$log.out" 2>"$log.err"; then
      tag "$impl" "$round" <"$log.out"
    else
      echo "   failed (exit $?), see $log.err" >&2
      tail -5 "$log.err" >&2 || true
    fi
  done
done

python3 - "$RESULTS" "$RUN_ID" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = [r for r in rows if r["run_id"] == sys.argv[2]]
if not rows:
    sys.exit("no results")
print(f"\n{rows[0]['cpu']} ({' '.join(rows[0]['cpu_flags'])}), {rows[0]['threads']} threads, "
      f"{rows[0].get('samples') or rows[0].get('train_samples')} samples; medians of {max(r['round'] for r in rows)} rounds\n")
keys = [("train_samples_per_second", "train samples/s"),
        ("inference_samples_per_second_batch_4096", "inference samples/s (4096)"),
        ("latency_ms_1x200_median", "1 x 200 latency, 50 behaviours (ms)"),
        ("latency_ms_1x200_p99", "1 x 200 p99 (ms)")]
med = {}
for impl in dict.fromkeys(r["impl"] for r in rows):
    got = [r for r in rows if r["impl"] == impl]
    med[impl] = {k: statistics.median(r[k] for r in got) for k, _ in keys if all(r.get(k) is not None for r in got)}
    kernel = got[0].get("precision", got[0].get("mode", ""))
    med[impl]["what"] = kernel
print("| implementation | " + " | ".join(name for _, name in keys) + " |")
print("|---|" + "---:|" * len(keys))
for impl, m in med.items():
    print(f"| {impl} ({m['what']}) | " + " | ".join(
        f"{m[k]:,.0f}" if "samples" in k else f"{m[k]:.3f}" for k, _ in keys if k in m) + " |")
pt = {i: m for i, m in med.items() if i.startswith("pt-")}
if pt and "din-bf16" in med:
    best_lat = min(pt, key=lambda i: pt[i]["latency_ms_1x200_median"])
    best_inf = max(pt, key=lambda i: pt[i]["inference_samples_per_second_batch_4096"])
    best_train = max(pt, key=lambda i: pt[i]["train_samples_per_second"])
    d = med["din-bf16"]
    print(f"\ndin bf16 latency / best PyTorch ({best_lat}): "
          f"{d['latency_ms_1x200_median'] / pt[best_lat]['latency_ms_1x200_median']:.3f} (target <= 0.5)")
    print(f"din bf16 inference / best PyTorch ({best_inf}): "
          f"{d['inference_samples_per_second_batch_4096'] / pt[best_inf]['inference_samples_per_second_batch_4096']:.2f} (target >= 3)")
    print(f"din bf16 (mixed-precision) training / best PyTorch ({best_train}): "
          f"{d['train_samples_per_second'] / pt[best_train]['train_samples_per_second']:.2f} (target >= 3)")
    if "din-fp32" in med:
        f = med["din-fp32"]
        print(f"din fp32 training / best PyTorch ({best_train}): "
              f"{f['train_samples_per_second'] / pt[best_train]['train_samples_per_second']:.2f}")
        print(f"din bf16 over fp32: latency {d['latency_ms_1x200_median'] / f['latency_ms_1x200_median']:.3f}, "
              f"inference {d['inference_samples_per_second_batch_4096'] / f['inference_samples_per_second_batch_4096']:.2f}x")
PY
