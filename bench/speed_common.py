"""Shared, untimed parts of bench/deepctr_torch_speed.py and bench/keras_speed.py:
the command line, reading the `din bench gen` data set (samples.tsv +
config.toml) into padded numpy arrays, the 1 user x 200 candidates latency
batch, quantiles and peak RSS. Only numpy and pandas are needed, so both
reference virtualenvs can import it.
"""
import argparse
import math
import os
import resource
import sys
import tomllib

import numpy as np
import pandas as pd


def parse_args(doc, extra=None):
    """The command line both scripts share; `extra(parser)` adds a script's own options."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder written by `din bench gen` (samples.tsv, config.toml)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256, help="training batch size")
    ap.add_argument("--att-hidden", default="256,128,64", help="attention MLP units, e.g. 80,40")
    ap.add_argument("--embedding-dim", type=int, default=8, help="embedding dim of every sparse feature")
    ap.add_argument("--repetitions", type=int, default=200, help="timed 1 user x 200 latency calls")
    ap.add_argument("--warmup", type=int, default=10, help="untimed latency calls before timing")
    ap.add_argument("--latency-row", type=int, default=0,
                    help="data row (0-based) whose user and history the 1 x 200 latency call uses")
    ap.add_argument("--seed", type=int, default=1024)
    ap.add_argument("--json", action="store_true", help="print one JSON object (the default output anyway)")
    if extra:
        extra(ap)
    args = ap.parse_args()
    args.att_hidden = tuple(int(u) for u in args.att_hidden.split(",") if u.strip())
    return args


def load(data_dir):
    """Reads DIR/samples.tsv with DIR/config.toml's vocabulary sizes.

    Histories are padded with 0 at the end to the config's max_len (50),
    keeping the most recent max_len behaviours, oldest first; `hist_len` is the
    number of real behaviours. Returns (x, y, vocab, max_len) where x maps
    user_id, item_id, cate_id (int64 [N]), hist_item_id, hist_cate_id
    (int64 [N, max_len]) and hist_len (int64 [N]) to arrays and y is float32 [N].
    """
    with open(os.path.join(data_dir, "config.toml"), "rb") as f:
        cfg = tomllib.load(f)
    schema = cfg["schema"]
    vocab = {f["name"]: int(f["vocab_size"]) for f in schema["sparse"]}
    seq = {f["name"]: f for f in schema["sequence"]}
    max_len = int(seq["hist_item_id"].get("max_len", 50))
    df = pd.read_csv(os.path.join(data_dir, cfg["data"]["train"]), sep="\t", dtype=str, keep_default_na=False)
    x = {name: df[name].to_numpy(dtype=np.int64, copy=True) for name in ("user_id", "item_id", "cate_id")}
    lengths = None
    for name in ("hist_item_id", "hist_cate_id"):
        arr = np.zeros((len(df), max_len), dtype=np.int64)
        lens = np.zeros(len(df), dtype=np.int64)
        for i, s in enumerate(df[name].values):
            ids = [int(v) for v in s.split(",") if v and v != "0"][-max_len:]
            arr[i, : len(ids)] = ids
            lens[i] = len(ids)
        x[name] = arr
        if lengths is not None and not np.array_equal(lengths, lens):
            sys.exit("hist_item_id and hist_cate_id lengths differ")
        lengths = lens
    x["hist_len"] = lengths
    y = df["label"].to_numpy(dtype=np.float32, copy=True)
    return x, y, vocab, max_len


def latency_batch(x, n=200, seed=7, row=0):
    """One user x n candidates: row `row`'s user and history repeated n times, with
    n candidate items drawn uniformly (fixed seed) from the items whose category
    the data shows (as candidates or in histories), each with that category."""
    cate_of = {}
    for items, cates in ((x["hist_item_id"].ravel(), x["hist_cate_id"].ravel()), (x["item_id"], x["cate_id"])):
        keep = items != 0
        cate_of.update(zip(items[keep].tolist(), cates[keep].tolist()))
    known = np.array(sorted(cate_of), dtype=np.int64)
    rng = np.random.default_rng(seed)
    items = rng.choice(known, size=n, replace=True)
    one = {k: np.repeat(v[row:row + 1], n, axis=0) for k, v in x.items()}
    one["item_id"] = items
    one["cate_id"] = np.array([cate_of[i] for i in items.tolist()], dtype=np.int64)
    return one


def quantile(sorted_values, q):
    """din's quantile: the sorted sample at round((n - 1) * q)."""
    return sorted_values[int(math.floor((len(sorted_values) - 1) * q + 0.5))]


def peak_rss_mib():
    """Peak resident set of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
