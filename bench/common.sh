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

# movielens_split DIN ML OUT PROTOCOL: MovieLens-100K (the folder ML)
# prepared once by DIN into OUT/PROTOCOL (`next-item` or `rating`, the
# test file as validation, user features); prints that test file's path.
movielens_split() {
  local din=$1 ml=$2 out=$3 protocol=$4
  [ -f "$out/$protocol/config.toml" ] ||
    $din prepare --input "$ml" --format movielens --out "$out/$protocol" --protocol "$protocol" \
      --valid-per-user 0 --user-feature >/dev/null
  python3 -c 'import sys,tomllib,os; c=tomllib.load(open(sys.argv[1],"rb")); print(os.path.join(os.path.dirname(sys.argv[1]), c["data"]["validation"]))' \
    "$out/$protocol/config.toml"
}
