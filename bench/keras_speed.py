#!/usr/bin/env python3
"""Speed of a TF2/Keras DIN (the classic tutorial model, Datawhale fun-rec /
DeepCTR style) on a `din bench gen` data set, measured the way `din bench run`
measures din. Prints one JSON object with din's key names.

    python bench/keras_speed.py --data runs/bench-data --threads 2 \
        --batch-size 256 --att-hidden 256,128,64 --embedding-dim 8 --json

Model (Keras functional API, TensorFlow backend, float32):
- Embedding(dim E) tables for user_id, item_id, cate_id; the history columns
  (padded with 0 to 50) look up the item / category tables (shared weights).
- query = [item_emb, cate_emb] (2E); keys = [hist_item_emb, hist_cate_emb]
  (50 x 2E). Local activation unit per behaviour: MLP over
  [q, k, q - k, q * k] (8E) with --att-hidden units and PReLU (one alpha per
  unit), then Dense(1); scores of padding positions (index >= hist_len) set
  to 0, no softmax; weighted sum of the keys (2E).
- DNN over [user_emb, item_emb, cate_emb, pooled] (5E): Dense 200 PReLU,
  Dense 80 PReLU, Dense(1, sigmoid). Adam lr 0.001, binary cross-entropy.
Threads: tf.config.threading intra-op = --threads, inter-op = --inter-op
(default 1: with 2 cores, intra-op parallelism already uses both; a second
inter-op pool oversubscribes them). Keras 3 does not use XLA on a CPU-only
machine (jit_compile="auto"), so neither do we.

Reading and padding the data and building the model are not timed. Measured:
- train_samples_per_second: model.fit(epochs=1, verbose=0, shuffle=True) over
  all samples at --batch-size, timed around fit. Before it, an untimed fit on
  the first batch traces the train step (a one-time graph build din does not
  have; its optimizer step makes the timed epoch start from a 1-step model).
- inference_samples_per_second_batch_4096: model.predict(batch_size=4096)
  over all samples, after an untimed predict that traces the predict step.
  inference_samples_per_second_batch_4096_direct: a tf.function of
  model(inputs, training=False) on prepared 4096-row tensors; both are
  reported and bench/speed_table.py uses the better of the two.
- latency_ms_1x200_median / _p99: row 0's user and history x 200 random
  candidates (each with its category from the data): one call on prepared
  int32 tensors. The faster of a tf.function (fixed input signature) and an
  eager model(inputs, training=False) call, picked on 30 trial calls, is then
  timed --repetitions times after --warmup calls ("latency_method").
- peak_rss_mib: ru_maxrss of the process at the end (also reported: the
  peak after importing TensorFlow/Keras and after reading the data).
- train_loss: fit's mean BCE over the timed epoch (< 0.69 when it learns).
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import json
import platform
import statistics
import sys
import time

import numpy as np
import tensorflow as tf
import keras
from keras import layers

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing speed_common
from speed_common import latency_batch, load, parse_args, peak_rss_mib, quantile

FEATURES = ("user_id", "item_id", "cate_id", "hist_item_id", "hist_cate_id", "hist_len")


class AttentionPooling(layers.Layer):
    """DIN's local activation unit and masked weighted-sum pooling (no softmax)."""

    def __init__(self, hidden_units, **kwargs):
        super().__init__(**kwargs)
        self.mlp = []
        for units in hidden_units:
            self.mlp += [layers.Dense(units), layers.PReLU(shared_axes=[1])]
        self.score = layers.Dense(1)

    def call(self, query, keys, lengths):
        t = tf.shape(keys)[1]
        q = tf.broadcast_to(tf.expand_dims(query, 1), tf.shape(keys))  # [B, T, 2E]
        h = tf.concat([q, keys, q - keys, q * keys], axis=-1)  # [B, T, 8E]
        for layer in self.mlp:
            h = layer(h)
        scores = tf.squeeze(self.score(h), -1)  # [B, T]
        mask = tf.sequence_mask(lengths, t)
        scores = tf.where(mask, scores, tf.zeros_like(scores))
        return tf.einsum("bt,btd->bd", scores, keys)  # [B, 2E]


def build(vocab, max_len, dim, att_hidden):
    inp = {
        "user_id": keras.Input((), dtype="int32", name="user_id"),
        "item_id": keras.Input((), dtype="int32", name="item_id"),
        "cate_id": keras.Input((), dtype="int32", name="cate_id"),
        "hist_item_id": keras.Input((max_len,), dtype="int32", name="hist_item_id"),
        "hist_cate_id": keras.Input((max_len,), dtype="int32", name="hist_cate_id"),
        "hist_len": keras.Input((), dtype="int32", name="hist_len"),
    }
    user_emb = layers.Embedding(vocab["user_id"], dim, name="user_emb")
    item_emb = layers.Embedding(vocab["item_id"], dim, name="item_emb")
    cate_emb = layers.Embedding(vocab["cate_id"], dim, name="cate_emb")
    u = user_emb(inp["user_id"])
    i = item_emb(inp["item_id"])
    c = cate_emb(inp["cate_id"])
    query = layers.Concatenate()([i, c])
    keys = layers.Concatenate()([item_emb(inp["hist_item_id"]), cate_emb(inp["hist_cate_id"])])
    pooled = AttentionPooling(att_hidden, name="attention")(query, keys, inp["hist_len"])
    h = layers.Concatenate()([u, i, c, pooled])
    for units in (200, 80):
        h = layers.PReLU()(layers.Dense(units)(h))
    out = layers.Dense(1, activation="sigmoid")(h)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.001), loss="binary_crossentropy")
    return model


def main():
    args = parse_args(__doc__, lambda ap: ap.add_argument(
        "--inter-op", type=int, default=1, help="TF inter-op threads (default 1)"))
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_op)
    keras.utils.set_random_seed(args.seed)
    rss_import = peak_rss_mib()

    x64, y, vocab, max_len = load(args.data)
    x = {k: x64[k].astype(np.int32) for k in FEATURES}
    rss_load = peak_rss_mib()
    n, b = len(y), args.batch_size
    model = build(vocab, max_len, args.embedding_dim, args.att_hidden)

    # Training: trace the train step on one batch (untimed), then one timed epoch.
    model.fit({k: v[:b] for k, v in x.items()}, y[:b], batch_size=b, epochs=1, verbose=0)
    start = time.perf_counter()
    hist = model.fit(x, y, batch_size=b, epochs=1, verbose=0, shuffle=True)
    train_seconds = time.perf_counter() - start
    train_loss = float(hist.history["loss"][0])

    # Inference: model.predict as Keras users call it, then a tf.function on prepared tensors.
    model.predict({k: v[:4096] for k, v in x.items()}, batch_size=4096, verbose=0)
    start = time.perf_counter()
    p_predict = model.predict(x, batch_size=4096, verbose=0)
    infer_predict = n / (time.perf_counter() - start)

    spec = {k: tf.TensorSpec((None,) + v.shape[1:], tf.int32, name=k) for k, v in x.items()}
    serve = tf.function(lambda inputs: model(inputs, training=False), input_signature=[spec])
    chunks = [{k: tf.constant(v[s:s + 4096]) for k, v in x.items()} for s in range(0, n, 4096)]
    serve(chunks[0])
    start = time.perf_counter()
    p_direct = np.concatenate([serve(c).numpy() for c in chunks])
    infer_direct = n / (time.perf_counter() - start)
    assert np.allclose(p_predict.ravel(), p_direct.ravel(), atol=1e-5)

    # Latency: 1 user x 200 candidates on prepared tensors; pick the faster call path.
    one = {k: tf.constant(v.astype(np.int32)) for k, v in latency_batch(x64, row=args.latency_row).items() if k in FEATURES}
    paths = {
        "tf.function(model(inputs, training=False)) on prepared int32 tensors": lambda: serve(one).numpy(),
        "eager model(inputs, training=False) on prepared int32 tensors": lambda: model(one, training=False).numpy(),
    }
    trial = {}
    for name, call in paths.items():
        for _ in range(5):
            call()
        times = []
        for _ in range(30):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        trial[name] = statistics.median(times)
    method = min(trial, key=trial.get)
    call = paths[method]
    for _ in range(args.warmup):
        call()
    lat = []
    for _ in range(args.repetitions):
        t = time.perf_counter()
        call()
        lat.append((time.perf_counter() - t) * 1e3)
    lat.sort()

    print(json.dumps({
        "impl": "tf-keras",
        "threads": args.threads,
        "inter_op_threads": args.inter_op,
        "batch_size": b,
        "samples": n,
        "mean_history": float(x64["hist_len"].mean()),
        "embedding_dim": args.embedding_dim,
        "att_hidden": list(args.att_hidden),
        "train_samples_per_second": n / train_seconds,
        "train_method": "model.fit(epochs=1, verbose=0) after a 1-batch tracing fit",
        "train_loss": train_loss,
        "inference_samples_per_second_batch_4096": infer_predict,
        "inference_samples_per_second_batch_4096_direct": infer_direct,
        "latency_ms_1x200_median": quantile(lat, 0.5),
        "latency_ms_1x200_p99": quantile(lat, 0.99),
        "latency_method": method,
        "latency_trial_ms": {k: v * 1e3 for k, v in trial.items()},
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_mib_after_import": rss_import,
        "peak_rss_mib_after_load": rss_load,
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__,
                     "keras": keras.__version__, "numpy": np.__version__},
    }), flush=True)


if __name__ == "__main__":
    main()
