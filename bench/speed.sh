#!/usr/bin/env bash
# Speed of din against the Python references (DeepCTR-Torch's DIN and a
# TF2/Keras DIN) on `din bench gen` data. Not part of CI. Three
# configurations; in each, din, deepctr-torch and tf-keras run alternately
# (din torch keras din torch keras ...) for ROUNDS rounds with THREADS threads.
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
# (use the existing target/release/din), IMPLS (subset of "din torch keras"),
# CONFIGS (subset of the configuration names below).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-runs/bench-data}
OUT=${OUT:-runs/speed}
ROUNDS=${ROUNDS:-2}
THREADS=${THREADS:-2}
VENV_TORCH=${VENV_TORCH:-/work/venv-ref}
VENV_TF=${VENV_TF:-/work/venv-tf}
IMPLS=${IMPLS:-"din torch keras"}
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

# The reference environments (CPU). deepctr_torch prints a version check on import.
if ! "$VENV_TORCH/bin/python" -c "import deepctr_torch, pandas" >/dev/null 2>&1; then
  python3 -m venv "$VENV_TORCH"
  "$VENV_TORCH/bin/pip" install deepctr-torch requests scikit-learn pandas
fi
if ! "$VENV_TF/bin/python" -c "import tensorflow, pandas" >/dev/null 2>&1; then
  python3 -m venv "$VENV_TF"
  "$VENV_TF/bin/pip" install tensorflow-cpu numpy pandas || "$VENV_TF/bin/pip" install tensorflow numpy pandas
fi

mkdir -p "$OUT/logs"
RESULTS=$OUT/results.jsonl
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)

# tag IMPL CONFIG DIM ATT ROUND < stdout: the JSON object in the output, tagged, appended to RESULTS.
tag() {
  python3 -c '
import json, sys
impl, config, dim, att, rnd, run_id = sys.argv[1:]
text = sys.stdin.read()
obj = json.loads(text[text.index("{"): text.rindex("}") + 1])
obj.setdefault("impl", impl)
obj.setdefault("embedding_dim", int(dim))
obj.setdefault("att_hidden", [int(u) for u in att.split(",")])
obj.update(config=config, round=int(rnd), run_id=run_id)
print(json.dumps(obj))
' "$@" "$RUN_ID" >>"$RESULTS"
}

for spec in $ALL_CONFIGS; do
  IFS=: read -r name dim att batch <<<"$spec"
  if [[ -n ${CONFIGS:-} && " $CONFIGS " != *" $name "* ]]; then continue; fi
  for round in $(seq 1 "$ROUNDS"); do
    for impl in $IMPLS; do
      log=$OUT/logs/$RUN_ID-$name-$impl-$round
      echo "== $name round $round: $impl" >&2
      case $impl in
        din) cmd=($DIN bench run --data "$DATA" --threads "$THREADS" --batch-size "$batch"
                  --set "model.attention.hidden_units=[$att]" --set "schema.embedding_dim=$dim" --json) ;;
        torch) cmd=("$VENV_TORCH/bin/python" bench/deepctr_torch_speed.py --data "$DATA" --threads "$THREADS"
                    --batch-size "$batch" --att-hidden "$att" --embedding-dim "$dim" --json) ;;
        keras) cmd=("$VENV_TF/bin/python" bench/keras_speed.py --data "$DATA" --threads "$THREADS"
                    --batch-size "$batch" --att-hidden "$att" --embedding-dim "$dim" --json) ;;
        *) echo "unknown impl $impl" >&2; exit 1 ;;
      esac
      if "${cmd[@]}" >"$log.out" 2>"$log.err"; then
        tag "$impl" "$name" "$dim" "$att" "$round" <"$log.out"
      else
        echo "   failed (exit $?), see $log.err" >&2
      fi
    done
  done
done

python3 bench/speed_table.py "$RESULTS"
