# Sourced by the bench scripts: what each says about the machine it ran
# on, and the request with a full history that the latency figures use.

# The CPU's model name.
cpu_name() { grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'; }

# The CPU features that choose din's kernels: vector width, FMA, bf16.
cpu_flags() {
  grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' |
    grep -E '^(avx2|fma|avx512f|avx512bw|avx512_bf16|amx_tile|amx_bf16)$' | tr '\n' ' ' | sed 's/ $//'
}

# full_history_row SAMPLES: the first data row (0-based) of a `din bench
# gen` samples file whose history holds 50 behaviours (none: no output).
full_history_row() { awk -F'\t' 'NR > 1 { if (split($4, a, ",") == 50) { print NR - 2; exit } }' "$1"; }

# movielens_split DIN ML OUT PROTOCOL [SPLIT]: MovieLens-100K (the folder
# ML) prepared once by DIN into OUT/PROTOCOL (`next-item` or `rating`, user
# features); prints the test file's path. SPLIT `test` (the default): no
# validation file, the test file validates (the fixed-epoch runs of
# docs/results.md). `validation`: `din prepare`'s own validation samples
# (valid.tsv, before each user's test ones), on which the generated config
# stops early (at most 20 epochs, patience 2) and keeps the best epoch,
# into OUT/PROTOCOL-validation.
movielens_split() {
  local din=$1 ml=$2 out=$3 protocol=$4 split=${5:-test}
  local dir=$out/$protocol valid=(--valid-per-user 0)
  if [ "$split" = validation ]; then
    dir=$out/$protocol-validation valid=()
  fi
  [ -f "$dir/config.toml" ] ||
    $din prepare --input "$ml" --format movielens --out "$dir" --protocol "$protocol" \
      "${valid[@]}" --user-feature >/dev/null
  echo "$dir/test.tsv"
}
