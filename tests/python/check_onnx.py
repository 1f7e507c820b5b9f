"""Checks an ONNX file exported by `din export --onnx` in ONNX Runtime.

Usage: python check_onnx.py DIR

DIR holds `model.onnx` and `case.json`: {"name", "inputs": {name: {"dtype",
"shape", "data"}}, "outputs": {name: values (flattened)}, "tolerance"},
written by din's tests with din's own outputs (any subset of the model's,
none too). The model must pass the ONNX checker with shape inference, load
in ONNX Runtime and give those outputs to within the tolerance. Exits
non-zero, naming the output and position, otherwise. Writes every output
ONNX Runtime gave to DIN/got.json, {name: {"shape", "data" (flattened)}},
for the tests' own, stricter checks.
"""

import json
import pathlib
import sys

import numpy as np
import onnx
import onnxruntime as ort


def main(folder: str) -> int:
    d = pathlib.Path(folder)
    case = json.loads((d / "case.json").read_text())
    name, tol = case["name"], case["tolerance"]
    model = onnx.load(str(d / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)  # also infers every shape
    session = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {
        k: np.asarray(v["data"], dtype=v["dtype"]).reshape(v["shape"])
        for k, v in case["inputs"].items()
    }
    declared = sorted(i.name for i in session.get_inputs())
    if declared != sorted(feeds):
        print(f"{name}: the model's inputs are {declared}, the case feeds {sorted(feeds)}")
        return 1
    all_names = [o.name for o in session.get_outputs()]
    got = dict(zip(all_names, session.run(all_names, feeds)))
    (d / "got.json").write_text(
        json.dumps(
            {k: {"shape": list(v.shape), "data": v.reshape(-1).astype(np.float64).tolist()} for k, v in got.items()}
        )
    )
    names = list(case["outputs"])
    missing = [k for k in names if k not in got]
    if missing:
        print(f"{name}: the model has no output {missing}; it has {all_names}")
        return 1
    failed = 0
    worst_all = 0.0
    for k in names:
        want = np.asarray(case["outputs"][k], dtype=np.float32)
        have = got[k].reshape(-1)
        if have.shape != want.shape:
            print(f"{name}: output {k} has {have.shape[0]} values, din gave {want.shape[0]}")
            failed += 1
            continue
        err = np.abs(have - want) / np.maximum(1.0, np.abs(want))
        worst = int(np.argmax(err)) if err.size else 0
        worst_all = max(worst_all, float(err[worst]) if err.size else 0.0)
        if err.size and err[worst] > tol:
            print(f"{name}: output {k}[{worst}]: onnxruntime {have[worst]}, din {want[worst]}")
            failed += 1
    if failed:
        return 1
    if names:
        print(f"{name}: onnxruntime {ort.__version__} matches din to {tol} ({', '.join(names)}; largest difference {worst_all:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
