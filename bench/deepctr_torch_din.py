#!/usr/bin/env python3
"""Train DeepCTR-Torch's DIN on the files `din prepare` wrote, with the
hyper-parameters of din's config, and print test logloss, AUC and GAUC per
epoch as JSON lines. The reference for docs/results.md.

    python bench/deepctr_torch_din.py --config PREPARED/config.toml --seed 1 \
        --epochs 3 --batch-size 256

Needs deepctr-torch, torch, numpy, pandas, scikit-learn (see bench/README.md).
The config's [model] and [train] tables give embedding dims, attention and
DNN units and activations, learning rate, batch size and epochs, unless the
command line overrides them.
"""
import argparse
import json
import os
import time
import tomllib

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import log_loss, roc_auc_score

from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat
from deepctr_torch.models import DIN


def gauc(users, labels, scores):
    """The DIN paper's GAUC: per-user AUC weighted by impressions, one-class users skipped."""
    df = pd.DataFrame({"u": users, "y": labels, "p": scores})
    num, den = 0.0, 0
    for _, g in df.groupby("u", sort=True):
        if g["y"].nunique() < 2:
            continue
        num += roc_auc_score(g["y"], g["p"]) * len(g)
        den += len(g)
    return num / den if den else float("nan")


def load(path, cfg):
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    x = {}
    schema = cfg["schema"]
    for f in schema.get("sparse", []):
        x[f["name"]] = df[f["name"]].astype(np.int64).values
    for f in schema.get("dense", []):
        x[f["name"]] = df[f["name"]].astype(np.float32).values
    for f in schema.get("sequence", []):
        n = f.get("max_len", 50)
        arr = np.zeros((len(df), n), dtype=np.int64)
        for i, s in enumerate(df[f["name"]].values):
            ids = [int(v) for v in s.split(",") if v and v != "0"][-n:]  # most recent kept, oldest first
            arr[i, : len(ids)] = ids
        x[f["name"]] = arr
        x["hist_len"] = (arr != 0).sum(axis=1)  # DeepCTR-Torch's DIN wants the length column
    return x, df[schema["label"]].astype(np.float32).values, df[schema["user"]].values


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--seed", type=int, default=1024)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--att-hidden", help="attention units, e.g. 80,40 (default: the config's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    with open(args.config, "rb") as f:
        cfg = tomllib.load(f)
    base = os.path.dirname(os.path.abspath(args.config))
    schema, model_cfg, train_cfg = cfg["schema"], cfg.get("model", {}), cfg.get("train", {})
    epochs = args.epochs or train_cfg.get("epochs", 10)
    batch = args.batch_size or train_cfg.get("batch_size", 64)

    owners = {f["name"]: f for f in schema.get("sparse", [])}
    columns = [SparseFeat(f["name"], f["vocab_size"], embedding_dim=f.get("embedding_dim", 8)) for f in schema["sparse"]]
    columns += [DenseFeat(f["name"], f.get("dim", 1)) for f in schema.get("dense", [])]
    for f in schema.get("sequence", []):
        owner = owners[f["shares_embedding_with"]]
        columns.append(
            VarLenSparseFeat(
                SparseFeat(f["name"], owner["vocab_size"], embedding_dim=owner.get("embedding_dim", 8),
                           embedding_name=owner["name"]),
                maxlen=f.get("max_len", 50),
                length_name="hist_len",
            )
        )
    history = [p["target"] for p in schema["din_pairs"]]
    att = model_cfg.get("attention", {})
    dnn = model_cfg.get("dnn", {})
    model = DIN(
        columns,
        history,
        dnn_hidden_units=tuple(dnn.get("hidden_units", [200, 80])),
        dnn_activation=dnn.get("activation", "prelu"),
        att_hidden_size=tuple(int(u) for u in args.att_hidden.split(",")) if args.att_hidden
        else tuple(att.get("hidden_units", [256, 128, 64])),
        att_activation=att.get("activation", "prelu"),
        att_weight_normalization=att.get("normalization", "none") == "softmax",
        l2_reg_embedding=0.0,
        dnn_dropout=dnn.get("dropout", 0.0),
        seed=args.seed,
        device="cpu",
    )
    model.compile(torch.optim.Adam(model.parameters(), lr=train_cfg.get("learning_rate", 0.001)), "binary_crossentropy")
    x_train, y_train, _ = load(os.path.join(base, cfg["data"]["train"]), cfg)
    x_test, y_test, u_test = load(os.path.join(base, cfg["data"]["validation"]), cfg)
    for epoch in range(1, epochs + 1):
        start = time.time()
        model.fit(x_train, y_train, batch_size=batch, epochs=1, verbose=0, shuffle=True)
        seconds = time.time() - start
        p = model.predict(x_test, batch_size=1024).ravel()
        print(json.dumps({
            "epoch": epoch,
            "logloss": log_loss(y_test, np.clip(p, 1e-7, 1 - 1e-7)),
            "auc": roc_auc_score(y_test, p),
            "gauc": gauc(u_test, y_test, p),
            "train_samples_per_second": len(y_train) / seconds,
        }), flush=True)


if __name__ == "__main__":
    main()
