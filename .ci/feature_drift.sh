#!/usr/bin/env bash
# Lists the crates that `cargo test --workspace` and the Python module's
# own build (`maturin build`, package din-python) would compile with
# different features. Each one makes CI's wheel build compile din and its
# dependencies a second time; crates/python/Cargo.toml asks for the
# workspace's features to avoid that. Prints nothing when they agree;
# exit status 1 when they do not.
set -euo pipefail
cd "$(dirname "$0")/.."
ws=$(mktemp) py=$(mktemp)
trap 'rm -f "$ws" "$py"' EXIT
# Twice: the target's dependencies alone (host builds of the same crate,
# for build scripts and proc macros, can have other features), then all.
status=0
for edges in normal,no-proc-macro normal,build; do
cargo tree --workspace -e "$edges",dev --prefix none --format '{p}|{f}' --locked >"$ws"
cargo tree -p din-python -e "$edges" --prefix none --format '{p}|{f}' --locked >"$py"
python3 - "$ws" "$py" <<'PY' || status=1
import sys

def load(path):
    features = {}
    for line in open(path):
        if "|" not in line:
            continue
        line = line.strip().replace(" (*)", "").replace(" (proc-macro)", "")
        package, f = line.split("|", 1)
        package = package.split(" (")[0]
        features.setdefault(package, set()).update(x for x in f.split(",") if x)
    return features

ws, py = load(sys.argv[1]), load(sys.argv[2])
drift = [(p, sorted(ws.get(p, set()) - py[p]), sorted(py[p] - ws.get(p, set()))) for p in sorted(py) if ws.get(p) != py[p]]
for p, more, fewer in drift:
    print(f"{p}: the workspace adds {more}, din-python alone adds {fewer}")
sys.exit(1 if drift else 0)
PY
done
exit $status
