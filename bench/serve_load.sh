#!/usr/bin/env bash
# Load test of `din serve` (not part of CI). Everything talks to 127.0.0.1
# only; every phase is bounded in time (wrk -d) and stops by itself.
#
#   bash bench/serve_load.sh                   # all phases, 3 rounds
#   ROUNDS=1 DURATION=10 bash bench/serve_load.sh
#
# The request is 1 user x 200 candidates with a 50-behaviour history on the
# tutorial model (dim 8, attention (256,128,64), DNN (200,80)), trained one
# epoch on `din bench gen` data; `din bench run --request-out` writes it, so
# the server gets exactly the request `din bench` times in process.
#
# Phases (one JSON line each in $OUT/results.jsonl, summary at the end):
#  1. latency, ROUNDS rounds alternating A B C D: `din bench run` in process
#     (1 x 200 median, and candidates/s back to back on all threads), the
#     server with one connection (wrk -c1), DeepCTR-Torch and TF/Keras
#     scoring the same 200 rows in one call (bench/*_speed.py --latency-row);
#  2. throughput: 32 connections for DURATION s;
#  3. overload: 256 connections against --queue 64 for DURATION s, the
#     server's RSS sampled every second, p99 of the accepted (200) requests
#     from the server's own histogram;
#  4. reload under load: 8 connections while the model is swapped 10 times
#     (new version folders + POST /v1/reload) and a broken version is offered
#     once (refused with 422, serving goes on);
#  5. schemathesis against GET /openapi.json (--max-examples 1000).
#
# Environment: OUT (runs/serve-load), DATA ($OUT/data; generated with USERS
# users, default 2000), ROUNDS (3), DURATION (30), LAT_DURATION (10), THREADS
# (2), PORT (18181), VENV_TORCH (/work/venv-ref), VENV_TF (/work/venv-tf),
# VENV_ST (/work/venv-st), IMPLS (subset of "din serve torch keras"),
# PHASES (subset of "1 2 3 4 5"), SKIP_BUILD=1, PRECISION (fp32; bf16 or
# auto: the server's --precision, and din bench run's in the same run).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
OUT=${OUT:-runs/serve-load}
DATA=${DATA:-$OUT/data}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-30}
LAT_DURATION=${LAT_DURATION:-10}
THREADS=${THREADS:-2}
PORT=${PORT:-18181}
VENV_TORCH=${VENV_TORCH:-/work/venv-ref}
VENV_TF=${VENV_TF:-/work/venv-tf}
VENV_ST=${VENV_ST:-/work/venv-st}
IMPLS=${IMPLS:-"din serve torch keras"}
PHASES=${PHASES:-"1 2 3 4 5"}
PRECISION=${PRECISION:-fp32}
DIN=${DIN:-./target/release/din}
URL=http://127.0.0.1:$PORT
has() { [[ " $2 " == *" $1 "* ]]; }

[[ -n "${SKIP_BUILD:-}" || $DIN != ./target/release/din ]] || cargo build --release --quiet
if ! command -v wrk >/dev/null; then
  if [[ $(id -u) == 0 ]]; then apt-get update -qq && apt-get install -y -qq wrk >/dev/null; else
    echo "wrk is needed: apt-get install wrk" >&2; exit 1; fi
fi
if has 5 "$PHASES" && [[ ! -x $VENV_ST/bin/schemathesis ]]; then
  python3 -m venv "$VENV_ST" && "$VENV_ST/bin/pip" install -q schemathesis
fi
if has torch "$IMPLS" && ! "$VENV_TORCH/bin/python" -c "import deepctr_torch" >/dev/null 2>&1; then
  python3 -m venv "$VENV_TORCH" && "$VENV_TORCH/bin/pip" install -q deepctr-torch requests scikit-learn pandas
fi
if has keras "$IMPLS" && ! "$VENV_TF/bin/python" -c "import tensorflow" >/dev/null 2>&1; then
  python3 -m venv "$VENV_TF" && "$VENV_TF/bin/pip" install -q tensorflow-cpu numpy pandas
fi

mkdir -p "$OUT/logs"
RESULTS=$OUT/results.jsonl
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)
CPU=$(cpu_name)
[[ -f $DATA/samples.tsv ]] || $DIN bench gen --out "$DATA" --users "${USERS:-2000}" >/dev/null
# The first row with a 50-behaviour history (0-based data row).
ROW=$(full_history_row "$DATA/samples.tsv")
[[ -n $ROW ]] || { echo "no row with a 50-behaviour history in $DATA" >&2; exit 1; }
echo "run $RUN_ID on $CPU, $THREADS threads; latency row $ROW (50 behaviours)"

# record PHASE WHAT [ROUND] < JSON: tags one JSON object and appends it to RESULTS.
record() {
  python3 -c '
import json, sys
phase, what, rnd, run_id, cpu = sys.argv[1:]
text = sys.stdin.read()
obj = json.loads(text[text.index("{"): text.rindex("}") + 1])
obj.update(phase=int(phase), what=what, round=int(rnd), run_id=run_id, cpu=cpu)
print(json.dumps(obj))' "$1" "$2" "${3:-0}" "$RUN_ID" "$CPU" | tee -a "$RESULTS"
}

# Two trained models to swap between; version 1 is served first.
for m in a b; do
  [[ -f $OUT/models/$m/config.json ]] || $DIN train --config "$DATA/config.toml" --epochs 1 --threads "$THREADS" \
    --seed "$([[ $m == a ]] && echo 1 || echo 2)" --out "$OUT/models/$m" --json >/dev/null
done
rm -rf "$OUT/versions" && mkdir -p "$OUT/versions" && cp -r "$OUT/models/a" "$OUT/versions/1"

SERVER=
start_server() {  # start_server EXTRA_ARGS...
  $DIN serve --model "$OUT/versions" --addr "127.0.0.1:$PORT" --threads "$THREADS" --precision "$PRECISION" "$@" \
    >"$OUT/logs/serve.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 100); do curl -sf "$URL/readyz" >/dev/null && return 0; sleep 0.1; done
  echo "the server did not start; see $OUT/logs/serve.log" >&2; exit 1
}
stop_server() {
  [[ -n $SERVER ]] || return 0
  kill -TERM "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
  SERVER=
}
trap stop_server EXIT
load() {  # load CONNECTIONS SECONDS: wrk against /v1/score with the request body
  BODY_FILE=$OUT/request.json wrk -t "$([[ $1 == 1 ]] && echo 1 || echo 2)" -c "$1" -d "${2}s" --timeout 10s \
    -s bench/serve_load.lua "$URL/v1/score" | grep '^{'
}
# p99 (ms) of /v1/score with status 200 from the server's histogram, between two scrapes.
accepted_p99() {
  python3 - "$1" "$2" <<'PY'
import re, sys
def buckets(path):
    out = {}
    for line in open(path):
        m = re.match(r'din_request_duration_seconds_bucket\{le="([^"]+)",route="/v1/score",status="200"\} (\S+)', line)
        if m:
            out[float(m.group(1)) if m.group(1) != "+Inf" else float("inf")] = float(m.group(2))
    return out
a, b = buckets(sys.argv[1]), buckets(sys.argv[2])
les = sorted(b)
counts = [b[le] - a.get(le, 0.0) for le in les]
total = counts[-1]
target, prev_le, prev_c = 0.99 * total, 0.0, 0.0
for le, c in zip(les, counts):
    if c >= target:
        frac = 0.0 if c == prev_c else (target - prev_c) / (c - prev_c)
        hi = le if le != float("inf") else prev_le
        print('{"accepted": %d, "accepted_p99_ms": %.3f}' % (total, 1e3 * (prev_le + frac * (hi - prev_le))))
        break
    prev_le, prev_c = le, c
PY
}

if has 1 "$PHASES"; then
  start_server
  for r in $(seq "$ROUNDS"); do
    if has din "$IMPLS"; then
      $DIN bench run --data "$DATA" --threads "$THREADS" --latency-row "$ROW" --request-out "$OUT/request.json" \
        --set "model.precision=$PRECISION" --json | record 1 in-process "$r"
    fi
    if has serve "$IMPLS"; then
      [[ -f $OUT/request.json ]] || $DIN bench run --data "$DATA" --threads "$THREADS" --latency-row "$ROW" \
        --request-out "$OUT/request.json" --json >/dev/null
      BODY_FILE=$OUT/request.json wrk -t1 -c1 -d2s -s bench/serve_load.lua "$URL/v1/score" >/dev/null  # warm-up
      load 1 "$LAT_DURATION" | record 1 serve-c1 "$r"
    fi
    if has torch "$IMPLS"; then
      "$VENV_TORCH/bin/python" bench/deepctr_torch_speed.py --data "$DATA" --threads "$THREADS" \
        --latency-row "$ROW" --json 2>"$OUT/logs/torch.err" | record 1 deepctr-torch "$r"
    fi
    if has keras "$IMPLS"; then
      TF_CPP_MIN_LOG_LEVEL=2 "$VENV_TF/bin/python" bench/keras_speed.py --data "$DATA" --threads "$THREADS" \
        --latency-row "$ROW" --json 2>"$OUT/logs/keras.err" | record 1 tf-keras "$r"
    fi
  done
  stop_server
fi

if has 2 "$PHASES"; then
  start_server
  load 32 "$DURATION" | record 2 serve-c32
  stop_server
fi

if has 3 "$PHASES"; then
  start_server --queue 64
  curl -s "$URL/metrics" >"$OUT/logs/metrics-before.txt"
  (for _ in $(seq "$DURATION"); do ps -o rss= -p "$SERVER" || true; sleep 1; done) >"$OUT/logs/rss.txt" &
  SAMPLER=$!
  OVER=$(load 256 "$DURATION")
  wait $SAMPLER || true
  curl -s "$URL/metrics" >"$OUT/logs/metrics-after.txt"
  ALIVE=$(curl -sf "$URL/healthz" >/dev/null && echo true || echo false)
  P99=$(accepted_p99 "$OUT/logs/metrics-before.txt" "$OUT/logs/metrics-after.txt")
  python3 -c '
import json, sys
over, p99, alive = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] == "true"
rss = [int(x) / 1024 for x in open(sys.argv[4]).read().split()]
# The first samples are the climb to a full queue; after that it should stay flat.
steady = rss[3:] or rss
over.update(p99, alive_after=alive, rss_mib_idle=rss[0], rss_mib_min=min(steady), rss_mib_max=max(steady),
            rss_mib_first=steady[0], rss_mib_last=steady[-1])
print(json.dumps(over))' "$OVER" "$P99" "$ALIVE" "$OUT/logs/rss.txt" | record 3 serve-c256-queue64
  stop_server
fi

if has 4 "$PHASES"; then
  start_server
  load 8 "$DURATION" >"$OUT/logs/reload-load.json" &
  LOADER=$!
  sleep 1
  OK=0 REFUSED=0
  for i in $(seq 2 11); do
    m=$([[ $((i % 2)) == 0 ]] && echo b || echo a)
    # A version folder appears whole: copied under a non-numeric name, then renamed.
    cp -r "$OUT/models/$m" "$OUT/versions/.v$i" && mv "$OUT/versions/.v$i" "$OUT/versions/$i"
    code=$(curl -s -o /dev/null -w '%{http_code}' -XPOST "$URL/v1/reload")
    [[ $code == 200 ]] && OK=$((OK + 1))
    if [[ $i == 6 ]]; then
      mkdir -p "$OUT/versions/1000" && echo '{' >"$OUT/versions/1000/config.json"
      code=$(curl -s -o /dev/null -w '%{http_code}' -XPOST "$URL/v1/reload")
      [[ $code == 422 ]] && REFUSED=$((REFUSED + 1))
      rm -rf "$OUT/versions/1000"
    fi
    sleep "$(python3 -c "print(max(0.2, ($DURATION - 4) / 10))")"
  done
  wait $LOADER || true
  SERVED=$(curl -s "$URL/readyz")
  python3 -c '
import json, sys
r = json.load(open(sys.argv[1])); r.update(reloads_ok=int(sys.argv[2]), broken_refused=int(sys.argv[3]), served_after=json.loads(sys.argv[4]))
print(json.dumps(r))' "$OUT/logs/reload-load.json" "$OK" "$REFUSED" "$SERVED" | record 4 serve-reload-c8
  stop_server
  rm -rf "$OUT/versions" && mkdir -p "$OUT/versions" && cp -r "$OUT/models/a" "$OUT/versions/1"
fi

if has 5 "$PHASES"; then
  start_server
  # Run inside the log folder: schemathesis leaves a .schemathesis cache where it runs.
  (cd "$OUT/logs" && "$VENV_ST/bin/schemathesis" run "$URL/openapi.json" --checks all \
    --exclude-checks positive_data_acceptance --max-examples 1000 -w 2 >schemathesis.txt 2>&1) && ST=0 || ST=$?
  python3 -c '
import json, re, sys
text = open(sys.argv[1]).read()
gen = re.search(r"(\d+) generated", text)
print(json.dumps({"exit_code": int(sys.argv[2]), "generated": int(gen.group(1)) if gen else None,
                  "failures": "FAILURES" in text}))' "$OUT/logs/schemathesis.txt" "$ST" | record 5 schemathesis
  stop_server
fi

python3 bench/serve_table.py "$RESULTS" "$RUN_ID"
