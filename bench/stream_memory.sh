#!/usr/bin/env bash
# Streaming training's memory (issue 14). `din bench gen` data sets of growing
# size (the same USERS users, and so the same model, with more candidates
# each: the rows grow, the vocabulary does not), each written as Parquet by bench/parquet.py (list<int64> histories, no
# compression or dictionary, so that the file is about as large as the rows it
# holds; row groups of 65,536 rows), train one epoch with the training
# file held whole and streamed (data.window_rows = WINDOW); /usr/bin/time
# gives each run's peak RSS. Then the largest file trains streamed inside a
# memory cgroup (v1) capped at LIMIT_MIB, a quarter or less of the file's
# size, and held inside the same cap (expected to be killed).
#
# The delimited reader streams the same way: the TSV of TSV_CANDIDATES too.
#
#   bash bench/stream_memory.sh    # USERS=25000 CANDIDATES="6 24 120" TSV_CANDIDATES=24 WINDOW=32768 LIMIT_MIB=256 PYTHON=python3 (needs pyarrow)
set -euo pipefail
cd "$(dirname "$0")/.."
USERS=${USERS:-25000}
CANDIDATES=${CANDIDATES:-"6 24 120"}
TSV_CANDIDATES=${TSV_CANDIDATES:-24}
WINDOW=${WINDOW:-32768}
LIMIT_MIB=${LIMIT_MIB:-256}
PYTHON=${PYTHON:-python3}
OUT=runs/stream
cargo build --release --quiet
DIN=$PWD/target/release/din
grep -m1 'model name' /proc/cpuinfo || true
mkdir -p "$OUT"
RESULTS="$OUT/results.tsv"
printf 'file\tmode\trows\tfile_mib\tpeak_rss_mib\tseconds\trc\n' > "$RESULTS"

# One epoch on file $1 of folder $2, mode $3 (held|streamed); extra
# command prefix in $PREFIX (the cgroup).
train() {
  local file=$1 dir=$2 mode=$3 set=()
  [ "$mode" = streamed ] && set=(--set "data.window_rows=$WINDOW")
  local rc=0
  /usr/bin/time -f '%M %e' -o "$OUT/time.txt" ${PREFIX:-} "$DIN" train --config "$dir/config.toml" --data "$file" \
    --out "$OUT/model" --epochs 1 --threads 2 --checkpoint-every 0 --json "${set[@]}" > "$OUT/train.json" 2> "$OUT/train.err" || rc=$?
  local rss secs
  read -r rss secs < <(tail -n 1 "$OUT/time.txt")
  local rows mib
  rows=$(( $(wc -l < "$dir/samples.tsv") - 1 ))
  mib=$(( $(stat -c %s "$file") >> 20 ))
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(basename "$dir")/$(basename "$file")" "$mode" "$rows" "$mib" $((rss >> 10)) "$secs" "$rc" | tee -a "$RESULTS"
}

for k in $CANDIDATES; do
  d="$OUT/c$k"
  if [ ! -f "$d/samples.parquet" ]; then
    "$DIN" bench gen --users "$USERS" --candidates "$k" --out "$d" > /dev/null
    "$PYTHON" bench/parquet.py "$d/samples.tsv" "$d/samples.parquet" --compression none --no-dictionary > /dev/null
  fi
  for mode in held streamed; do
    train "$d/samples.parquet" "$d" "$mode"
  done
  if [ "$k" = "$TSV_CANDIDATES" ]; then
    for mode in held streamed; do
      train "$d/samples.tsv" "$d" "$mode"
    done
  fi
done

# A cgroup capped at LIMIT_MIB (the page cache counts too, and is reclaimed).
parent=/sys/fs/cgroup/memory$(awk -F: '$2 == "memory" { print $3 }' /proc/self/cgroup)
cg="$parent/din-stream-$$"
if mkdir "$cg" 2> /dev/null; then
  echo $((LIMIT_MIB << 20)) > "$cg/memory.limit_in_bytes"
  echo "cgroup $cg: memory.limit_in_bytes = $LIMIT_MIB MiB; $(basename "$d")/samples.parquet is $(( $(stat -c %s "$d/samples.parquet") >> 20 )) MiB"
  # The command runs inside the cgroup: a shell moves itself in, then execs.
  cat > "$OUT/in_cgroup.sh" <<SH
#!/usr/bin/env bash
echo \$\$ > "$cg/cgroup.procs"
exec "\$@"
SH
  chmod +x "$OUT/in_cgroup.sh"
  for mode in streamed held; do
    PREFIX="$OUT/in_cgroup.sh" train "$d/samples.parquet" "$d" "$mode"
    echo "  cgroup peak $(( $(cat "$cg/memory.max_usage_in_bytes") >> 20 )) MiB, limit hits $(cat "$cg/memory.failcnt")"
    echo 0 > "$cg/memory.max_usage_in_bytes" 2> /dev/null || true
  done
  rmdir "$cg" 2> /dev/null || true
else
  echo "no writable memory cgroup here: the capped runs are left out"
fi
column -t "$RESULTS"
