"""The 1 user x 200 candidates latency of a model exported by `din export --onnx`,
in ONNX Runtime, on the `din bench gen` data set it was trained on.

The request is the one din bench run and the reference scripts time
(speed_common.latency_batch: row --latency-row's user and history x 200
candidates). It is fed twice: with histories padded to max_len (50, DeepCTR's
form) and trimmed to the row's own length (what a caller that pads to the
longest history in the request sends). One session.run on prepared numpy
arrays is timed --repetitions times after --warmup calls; the session has
intra_op_num_threads = --threads and every graph optimisation on. Prints one
JSON object; the scores of both feeds must agree to 1e-5.

    python bench/onnx_latency.py --data DIR --model model.onnx [--threads 2]
"""
import json
import time

import numpy as np
import onnxruntime as ort

from speed_common import latency_batch, load, parse_args, peak_rss_mib, quantile


def main():
    args = parse_args(__doc__, extra=lambda ap: ap.add_argument("--model", required=True, help="the .onnx file"))
    x, _, _, max_len = load(args.data)
    one = latency_batch(x, row=args.latency_row)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    padded = {k: one[k] for k in names}
    length = max(int(x["hist_len"][args.latency_row]), 1)
    trimmed = {k: (v[:, :length] if v.ndim == 2 else v) for k, v in padded.items()}
    out = {}
    scores = {}
    for label, feed in (("padded", padded), ("trimmed", trimmed)):
        for _ in range(args.warmup):
            session.run(["probability"], feed)
        lat = []
        for _ in range(args.repetitions):
            t = time.perf_counter()
            p = session.run(["probability"], feed)[0]
            lat.append((time.perf_counter() - t) * 1e3)
        lat.sort()
        scores[label] = p
        out[f"latency_ms_1x200_{label}_median"] = quantile(lat, 0.5)
        out[f"latency_ms_1x200_{label}_p99"] = quantile(lat, 0.99)
    assert np.allclose(scores["padded"], scores["trimmed"], atol=1e-5), "padding changed the scores"
    print(json.dumps({
        "impl": "onnxruntime",
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "history_len_padded": max_len,
        "history_len_trimmed": length,
        **out,
        "latency_method": "InferenceSession.run on prepared int64 arrays [200] and [200, T]",
        "peak_rss_mib": peak_rss_mib(),
    }))


if __name__ == "__main__":
    main()
