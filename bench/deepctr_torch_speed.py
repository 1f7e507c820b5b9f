#!/usr/bin/env python3
"""Speed of DeepCTR-Torch's DIN on a `din bench gen` data set, measured the way
`din bench run` measures din. Prints one JSON object with din's key names.

    python bench/deepctr_torch_speed.py --data runs/bench-data --threads 2 \
        --batch-size 256 --att-hidden 256,128,64 --embedding-dim 8 --json

Model: deepctr_torch.models.DIN with din's bench config: embedding dim E for
user_id, item_id, cate_id; hist_item_id / hist_cate_id are VarLenSparseFeat
sharing the item / category embedding (embedding_name), padded to 50 with a
hist_len length column; attention units --att-hidden with att_activation
'prelu' (DeepCTR-Torch lower-cases the name; 'prelu' -> nn.PReLU), no softmax
(att_weight_normalization=False, din's default); DNN (200, 80) 'prelu', no
dropout, no L2; Adam lr 0.001; binary cross-entropy. CPU, torch.set_num_threads.

Reading and padding the data and building the model are not timed. Measured:

- train_samples_per_second: one epoch over all samples at --batch-size, timed
  around the training loop only. --train-method loop (default) is the body of
  BaseModel.fit step for step (shuffled order, forward on the float feature
  matrix fit builds, BCE with reduction='sum' as fit uses, fit's
  regularisation and aux loss terms, backward, Adam step), minus fit's
  per-sample DataLoader/TensorDataset collation and prints; that overhead is
  not part of the model's cost, so the loop is the stronger baseline.
  --train-method fit times model.fit(epochs=1, verbose=0) instead. Before
  timing, one untimed training step on the first batch (warm-up, as for Keras).
- inference_samples_per_second_batch_4096: model.predict(x, batch_size=4096)
  over all samples (as DeepCTR-Torch users call it; includes its DataLoader).
  inference_samples_per_second_batch_4096_direct: the same scores from
  model.forward on slices of the prepared float tensor under
  torch.inference_mode(), the reference's fastest path; both are reported and
  bench/speed_table.py uses the better of the two.
- latency_ms_1x200_median / _p99: row 0's user and history x 200 random
  candidates (each with its category from the data), one model.forward call on
  a prepared [200, F] tensor under torch.inference_mode() ("latency_method"),
  --warmup untimed calls, then --repetitions timed calls.
- peak_rss_mib: ru_maxrss of the process at the end (also reported: the
  peak after importing torch/deepctr_torch and after reading the data).
- train_loss: mean BCE over the timed epoch (should be < 0.69: the labels
  depend on whether the candidate's category is in the history).
"""
import contextlib
import io
import json
import platform
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing speed_common
from speed_common import latency_batch, load, parse_args, peak_rss_mib, quantile


def import_deepctr_torch():
    """deepctr_torch's __init__ starts a thread that asks PyPI for the latest
    version and prints to stdout when it cannot; keep stdout clean for the JSON
    and let the thread finish before anything is timed."""
    before = set(threading.enumerate())
    with contextlib.redirect_stdout(io.StringIO()):
        import deepctr_torch
        from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
        from deepctr_torch.models import DIN
        for t in set(threading.enumerate()) - before:
            t.join(timeout=30)
    return deepctr_torch, SparseFeat, VarLenSparseFeat, DIN


def main():
    args = parse_args(__doc__, lambda ap: ap.add_argument(
        "--train-method", choices=("loop", "fit"), default="loop",
        help="loop: fit's training step without its DataLoader (default); fit: model.fit"))
    train_method = args.train_method
    deepctr_torch, SparseFeat, VarLenSparseFeat, DIN = import_deepctr_torch()
    rss_import = peak_rss_mib()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    x, y, vocab, max_len = load(args.data)
    rss_load = peak_rss_mib()
    n, e = len(y), args.embedding_dim
    columns = [SparseFeat(name, vocab[name], embedding_dim=e) for name in ("user_id", "item_id", "cate_id")]
    for hist, owner in (("hist_item_id", "item_id"), ("hist_cate_id", "cate_id")):
        columns.append(VarLenSparseFeat(SparseFeat(hist, vocab[owner], embedding_dim=e, embedding_name=owner),
                                        maxlen=max_len, length_name="hist_len"))
    model = DIN(columns, ["item_id", "cate_id"], dnn_hidden_units=(200, 80), dnn_activation="prelu",
                att_hidden_size=args.att_hidden, att_activation="prelu", att_weight_normalization=False,
                l2_reg_embedding=0.0, l2_reg_dnn=0.0, dnn_dropout=0.0, seed=args.seed, device="cpu")
    model.compile(torch.optim.Adam(model.parameters(), lr=0.001), "binary_crossentropy")

    # The float feature matrix fit/predict build: columns in model.feature_index order.
    def matrix(d):
        cols = [d[name].reshape(len(d[name]), -1) for name in model.feature_index]
        return torch.from_numpy(np.concatenate(cols, axis=1)).float()

    xm, ym = matrix(x), torch.from_numpy(y)
    b = args.batch_size

    def step(xb, yb):
        y_pred = model(xb).squeeze(-1)
        model.optim.zero_grad()
        loss = F.binary_cross_entropy(y_pred, yb, reduction="sum")
        total = loss + model.get_regularization_loss() + model.aux_loss
        value = loss.item()
        total.backward()
        model.optim.step()
        return value

    model.train()
    step(xm[:b], ym[:b])  # warm-up, untimed

    if train_method == "fit":
        xs = {k: v.copy() for k, v in x.items()}
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # fit prints the device and sample counts
            hist = model.fit(xs, y, batch_size=b, epochs=1, verbose=0, shuffle=True)
        train_seconds = time.perf_counter() - start
        train_loss = hist.history["loss"][0]
    else:
        start = time.perf_counter()
        perm = torch.randperm(n)
        loss_sum = 0.0
        for s in range(0, n, b):
            idx = perm[s:s + b]
            loss_sum += step(xm[idx], ym[idx])
        train_seconds = time.perf_counter() - start
        train_loss = loss_sum / n

    # Inference: model.predict as shipped, then forward on prepared slices.
    xs = {k: v.copy() for k, v in x.items()}
    start = time.perf_counter()
    p_predict = model.predict(xs, batch_size=4096)
    infer_predict = n / (time.perf_counter() - start)
    model.eval()
    with torch.inference_mode():
        start = time.perf_counter()
        p_direct = torch.cat([model(xm[s:s + 4096]) for s in range(0, n, 4096)]).numpy()
        infer_direct = n / (time.perf_counter() - start)
    assert np.allclose(p_predict.ravel(), p_direct.ravel(), atol=1e-5)

    # Latency: 1 user x 200 candidates, one forward call on a prepared tensor.
    one = matrix(latency_batch(x, row=args.latency_row))
    with torch.inference_mode():
        for _ in range(args.warmup):
            model(one)
        lat = []
        for _ in range(args.repetitions):
            t = time.perf_counter()
            model(one)
            lat.append((time.perf_counter() - t) * 1e3)
    lat.sort()

    print(json.dumps({
        "impl": "deepctr-torch",
        "threads": args.threads,
        "batch_size": b,
        "samples": n,
        "mean_history": float(x["hist_len"].mean()),
        "embedding_dim": e,
        "att_hidden": list(args.att_hidden),
        "train_samples_per_second": n / train_seconds,
        "train_method": "model.fit" if train_method == "fit" else "manual loop = fit's step without DataLoader",
        "train_loss": train_loss,
        "inference_samples_per_second_batch_4096": infer_predict,
        "inference_samples_per_second_batch_4096_direct": infer_direct,
        "latency_ms_1x200_median": quantile(lat, 0.5),
        "latency_ms_1x200_p99": quantile(lat, 0.99),
        "latency_method": "model.forward on a prepared [200, F] float tensor under torch.inference_mode()",
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_mib_after_import": rss_import,
        "peak_rss_mib_after_load": rss_load,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "deepctr_torch": deepctr_torch.__version__, "numpy": np.__version__},
    }), flush=True)


if __name__ == "__main__":
    main()
