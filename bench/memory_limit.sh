#!/usr/bin/env bash
# Runs a command in a memory cgroup of its own, limited to MIB MiB of
# memory (no swap), and prints its peak memory when it ends. Under mpirun
# every rank that runs it gets its own cgroup, so the limit is per rank:
# bench/distributed.sh's table-size test runs
#   mpirun -np N bench/memory_limit.sh MIB din train --distributed ...
# A process that needs more is killed by the kernel (exit status 137).
#
# Usage: bench/memory_limit.sh MIB command [args...]
# Needs root and a cgroup v1 memory controller (/sys/fs/cgroup/memory) or
# cgroup v2 with the memory controller enabled.
set -euo pipefail
mib=$1
shift
bytes=$((mib * 1024 * 1024))
name=din-limit-$$
if [ -w /sys/fs/cgroup/memory ]; then
  cg=/sys/fs/cgroup/memory/$name
  mkdir "$cg"
  echo "$bytes" >"$cg/memory.limit_in_bytes"
  [ -f "$cg/memory.memsw.limit_in_bytes" ] && echo "$bytes" >"$cg/memory.memsw.limit_in_bytes"
  peak_file=memory.max_usage_in_bytes
elif [ -w /sys/fs/cgroup/cgroup.procs ] && grep -qw memory /sys/fs/cgroup/cgroup.controllers; then
  cg=/sys/fs/cgroup/$name
  mkdir "$cg"
  echo "$bytes" >"$cg/memory.max"
  [ -f "$cg/memory.swap.max" ] && echo 0 >"$cg/memory.swap.max"
  peak_file=memory.peak
else
  echo "memory_limit.sh: no writable memory cgroup here (needs root and cgroup v1 or v2 with the memory controller)" >&2
  exit 2
fi
rank=${OMPI_COMM_WORLD_RANK:-0}
# The command runs in the cgroup; this shell comes back out to clean up.
set +e
(echo "$BASHPID" >"$cg/cgroup.procs" && exec "$@")
status=$?
set -e
peak=$(cat "$cg/$peak_file" 2>/dev/null || echo 0)
if [ "$status" -eq 137 ]; then
  echo "rank $rank: killed by the memory limit of $mib MiB (peak $((peak / 1024 / 1024)) MiB)" >&2
else
  echo "rank $rank: exit $status, peak $((peak / 1024 / 1024)) MiB of $mib MiB" >&2
fi
rmdir "$cg" 2>/dev/null || true
exit "$status"
