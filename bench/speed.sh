#!/usr/bin/env bash
# Speed of din against the Python references (DeepCTR-Torch's DIN, a
# TF2/Keras DIN, and a tight PyTorch DIN run eager, compiled, and compiled
# under bf16 autocast) on `din bench gen` data. Not part of CI. Three
# configurations; in each, the implementations run alternately
# (din torch keras pt-eager pt-compile pt-bf16 din torch ...) for ROUNDS
# rounds with THREADS threads. din runs twice a round: the second run's
# 1 x 200 latency is the request with a full history of 50 behaviours (the
# first such row, as bench/serve_load.sh picks it), recorded as din's
# full_history_* figures; the PyTorch DIN measures both requests in one run.
# Each result is one JSON line in $OUT/results.jsonl tagged with config,
# round and run_id; bench/speed_table.py then prints the ratio tables. On 2
# cores with the full data (120,000 samples), expect roughly an hour or more.
#
#   bash bench/speed.sh
#   ROUNDS=1 DATA=/tmp/bench-small SKIP_BUILD=1 bash bench/speed.sh   # quick check
#
# Environment: DATA (default runs/bench-data; generated if missing, USERS
# passed to `din bench gen --users`), OUT (runs/speed), ROUNDS (2), THREADS
# (2), VENV_TORCH (/work/venv-ref), VENV_TF (/work/venv-tf), SKIP_BUILD=1
# (use the existing target/release/din), IMPLS (subset of "din torch keras
# pt-eager pt-compile pt-bf16"), CONFIGS (subset of the configuration names
# below). The PyTorch DIN (bench/torch_din_speed.py) runs in VENV_TORCH.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
DATA=${DATA:-runs/bench-data}
OUT=${OUT:-runs/speed}
ROUNDS=${ROUNDS:-2}
THREADS=${THREADS:-2}
VENV_TORCH=${VENV_TORCH:-/work/venv-ref}
VENV_TF=${VENV_TF:-/work/venv-tf}
IMPLS=${IMPLS:-"din torch keras pt-eager pt-compile pt-bf16"}
# name:embedding_dim:attention_units:batch_size
ALL_CONFIGS="d8-att256,128,64-b256:8:256,128,64:256 d8-att80,40-b1024:8:80,40:1024 d32-att80,40-b1024:32:80,40:1024"
DIN=./target/release/din

if [[ -z "${SKIP_BUILD:-}" ]]; then
  cargo build --release --quiet
fi
[[ -x $DIN ]] || { echo "no $DIN (build it, or unset SKIP_BUILD)" >&2; exit 1; }

if [[ ! -f $DATA/samples.tsv ]]; then
  $DIN bench gen --out "$DATA" ${USERS:+--users "$USERS"}
fi

# The reference environments (CPU), for the implementations asked for.
# deepctr_torch prints a version check on import; its torch serves the PyTorch DIN too.
has() { [[ " $IMPLS " == *" $1 "* ]]; }
if { has torch || has pt-eager || has pt-compile || has pt-bf16; } &&
  ! "$VENV_TORCH/bin/python" -c "import deepctr_torch, pandas" >/dev/null 2>&1; then
  python3 -m venv "$VENV_TORCH"
  "$VENV_TORCH/bin/pip" install deepctr-torch requests scikit-learn pandas
fi
if has keras && ! "$VENV_TF/bin/python" -c "import tensorflow, pandas" >/dev/null 2>&1; then
  python3 -m venv "$VENV_TF"
  "$VENV_TF/bin/pip" install tensorflow-cpu numpy pandas || "$VENV_TF/bin/pip" install tensorflow numpy pandas
fi

mkdir -p "$OUT/logs"
RESULTS=$OUT/results.jsonl
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)
CPU=$(cpu_name)
CPU_FLAGS=$(cpu_flags)
# The first data row (0-based) with a full history of 50 behaviours.
ROW50=$(full_history_row "$DATA/samples.tsv")
echo "run $RUN_ID on $CPU ($CPU_FLAGS); full-history latency row ${ROW50:-none}" >&2

# tag IMPL CONFIG DIM ATT ROUND [FULL] < stdout: the JSON object in the output,
# tagged with the run and the CPU (and, from the JSON in file FULL, that run's
# 1 x 200 latency as the full_history_* figures), appended to RESULTS.
tag() {
  python3 -c '
import json, sys
impl, config, dim, att, rnd, full, run_id, cpu, flags = sys.argv[1:]
def obj_of(text):
    return json.loads(text[text.index("{"): text.rindex("}") + 1])
obj = obj_of(sys.stdin.read())
obj.setdefault("impl", impl)
obj.setdefault("embedding_dim", int(dim))
obj.setdefault("att_hidden", [int(u) for u in att.split(",")])
if full:
    f = obj_of(open(full).read())
    obj.update(full_history_latency_ms_1x200_median=f["latency_ms_1x200_median"],
               full_history_latency_ms_1x200_p99=f["latency_ms_1x200_p99"],
               full_history_latency_row=f["latency_row"], full_history_length=f["latency_history_length"])
obj.update(config=config, round=int(rnd), run_id=run_id, cpu=cpu, cpu_flags=flags.split())
print(json.dumps(obj))
' "$1" "$2" "$3" "$4" "$5" "${6:-}" "$RUN_ID" "$CPU" "$CPU_FLAGS" >>"$RESULTS"
}

for spec in $ALL_CONFIGS; do
  IFS=: read -r name dim att batch <<<"$spec"
  if [[ -n ${CONFIGS:-} && " $CONFIGS " != *" $name "* ]]; then continue; fi
  for round in $(seq 1 "$ROUNDS"); do
    for impl in $IMPLS; do
      log=$OUT/logs/$RUN_ID-$name-$impl-$round
      echo "== $name round $round: $impl" >&2
      full=
      case $impl in
        din) cmd=($DIN bench run --data "$DATA" --threads "$THREADS" --batch-size "$batch"
                  --set "model.attention.hidden_units=[$att]" --set "schema.embedding_dim=$dim" --json)
             if [[ -n $ROW50 ]]; then
               full=$log.full.out
               "${cmd[@]}" --latency-row "$ROW50" >"$full" 2>"$log.full.err" || { echo "   full-history run failed, see $log.full.err" >&2; full=; }
             fi ;;
        torch) cmd=("$VENV_TORCH/bin/python" bench/deepctr_torch_speed.py --data "$DATA" --threads "$THREADS"
                    --batch-size "$batch" --att-hidden "$att" --embedding-dim "$dim" --json) ;;
        keras) cmd=("$VENV_TF/bin/python" bench/keras_speed.py --data "$DATA" --threads "$THREADS"
                    --batch-size "$batch" --att-hidden "$att" --embedding-dim "$dim" --json) ;;
        pt-eager|pt-compile|pt-bf16)
          mode=${impl#pt-}; [[ $mode == bf16 ]] && mode=bf16-compile
          cmd=("$VENV_TORCH/bin/python" bench/torch_din_speed.py --data "$DATA" --threads "$THREADS"
               --batch-size "$batch" --att-hidden "$att" --embedding-dim "$dim" --mode "$mode" --json) ;;
        *) echo "unknown impl $impl" >&2; exit 1 ;;
      esac
      if "${cmd[@]}" >"$log.out" 2>"$log.err"; then
        tag "$impl" "$name" "$dim" "$att" "$round" "$full" <"$log.out"
      else
        echo "   failed (exit $?), see $log.err" >&2
      fi
    done
  done
done

python3 bench/speed_table.py "$RESULTS"
