"""Shared fixtures of the Python package's tests: the tutorial sample as
arrays, its feature columns, and the `din` binary (for comparisons with the
CLI)."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "movie_sample.txt"
COLUMNS = ["user_id", "gender", "age", "hist_movie_id", "hist_len", "movie_id", "movie_type_id", "label"]
# Vocabulary sizes as configs/movie_sample.toml has them.
VOCAB = {"user_id": 4, "gender": 3, "age": 4, "movie_id": 209, "movie_type_id": 10}


def read_sample():
    """The tutorial's sample: a dict of numpy arrays (DeepCTR's form) and the labels."""
    rows = [line.rstrip("\n").split("\t") for line in SAMPLE.read_text().splitlines() if line.strip()]
    cols = {c: [r[i] for r in rows] for i, c in enumerate(COLUMNS)}
    x = {c: np.array([int(v) for v in cols[c]], dtype=np.int64) for c in VOCAB}
    x["hist_len"] = np.array([float(v) for v in cols["hist_len"]], dtype=np.float32)
    x["hist_movie_id"] = np.array([[int(i) for i in h.split(",")] for h in cols["hist_movie_id"]], dtype=np.int64)
    y = np.array([int(v) for v in cols["label"]], dtype=np.int64)
    return x, y


@pytest.fixture(scope="session")
def sample():
    return read_sample()


def feature_columns(din, order="recent_first"):
    """The feature columns of configs/movie_sample.toml."""
    fc = [din.SparseFeat(name, size, embedding_dim=8) for name, size in VOCAB.items()]
    fc.append(din.DenseFeat("hist_len", 1))
    fc.append(
        din.VarLenSparseFeat(
            din.SparseFeat("hist_movie_id", 209, 8, embedding_name="movie_id"), maxlen=50, order=order
        )
    )
    return fc


def small_model(din, **kwargs):
    """A small DIN on the sample's columns (fast to train)."""
    kwargs.setdefault("att_hidden_size", (16, 8))
    kwargs.setdefault("dnn_hidden_units", (16,))
    kwargs.setdefault("user_column", "user_id")
    kwargs.setdefault("threads", 2)
    return din.DIN(feature_columns(din), ["movie_id"], **kwargs)


def din_binary():
    """The `din` command: $DIN_BIN, else the workspace's build, else PATH."""
    env = os.environ.get("DIN_BIN")
    if env:
        return env
    built = [p for p in (ROOT / "target" / d / "din" for d in ("release", "debug")) if p.exists()]
    if built:
        return str(max(built, key=lambda p: p.stat().st_mtime))  # the newest build
    return shutil.which("din")


@pytest.fixture(scope="session")
def din_bin():
    path = din_binary()
    if path is None:
        pytest.skip("skipped: no `din` binary (cargo build, or set DIN_BIN)")
    return path
