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
