#!/usr/bin/env python3
"""Speed of din's Python package (`import din`) on a `din bench gen` data set,
with the model `din bench run` trains, reading the same padded arrays the
references get (bench/speed_common.py). Prints one JSON object with din's key
names, for bench/python_speed.sh to set beside `din bench run` and
DeepCTR-Torch.

    python bench/python_speed.py --data runs/bench-data --threads 2 --batch-size 256

Measured (reading the data and building the model not timed):
- train_samples_per_second: the epoch's figure as din reports it (the rows
  over the training loop's seconds), what `din bench run` prints;
- train_samples_per_second_wall: the rows over the wall time of the whole
  `model.fit(...)` call, the arrays' conversion included;
- inference_samples_per_second_batch_4096: `model.predict(x, batch_size=4096)`
  over all rows, conversion included;
- train_loss: the epoch's mean BCE (the same seed as `din bench run`'s
  default, 2024, trains the same model).
"""
import json
import platform
import sys
import time

import numpy as np

sys.dont_write_bytecode = True
from speed_common import load, parse_args, peak_rss_mib  # noqa: E402

import din  # noqa: E402


def main():
    args = parse_args(__doc__)
    x, y, vocab, max_len = load(args.data)
    del x["hist_len"]  # din counts a history's behaviours itself
    e = args.embedding_dim
    columns = [din.SparseFeat(name, vocab[name], e) for name in ("user_id", "item_id", "cate_id")]
    for hist, owner in (("hist_item_id", "item_id"), ("hist_cate_id", "cate_id")):
        columns.append(din.VarLenSparseFeat(din.SparseFeat(hist, vocab[owner], e, embedding_name=owner), maxlen=max_len))
    model = din.DIN(columns, ["item_id", "cate_id"], att_hidden_size=args.att_hidden, dnn_hidden_units=(200, 80),
                    user_column="user_id", threads=args.threads)
    model.compile("adam", "binary_crossentropy")
    n = len(y)
    start = time.perf_counter()
    h = model.fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0, shuffle=True)
    wall = time.perf_counter() - start
    start = time.perf_counter()
    model.predict(x, batch_size=4096)
    infer = n / (time.perf_counter() - start)
    print(json.dumps({
        "impl": "din-python",
        "threads": args.threads,
        "batch_size": args.batch_size,
        "samples": n,
        "embedding_dim": e,
        "att_hidden": list(args.att_hidden),
        "train_samples_per_second": h.timings[0]["samples_per_second"],
        "train_samples_per_second_wall": n / wall,
        "train_loss": h.history["loss"][0],
        "inference_samples_per_second_batch_4096": infer,
        "peak_rss_mib": peak_rss_mib(),
        "versions": {"python": platform.python_version(), "din": din.__version__, "numpy": np.__version__},
    }), flush=True)


if __name__ == "__main__":
    main()
