"""Tests of the Python package `din` (crates/python): DeepCTR's API over the
Rust core, the same model as the CLI, inputs, errors, callbacks, interrupts."""

import json
import math
import os
import signal
import subprocess
import threading
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

import din
from conftest import ROOT, VOCAB, feature_columns, read_sample, small_model


def weights_bytes(model, tmp_path, name="m"):
    model.save(tmp_path / name)
    return (tmp_path / name / "model.safetensors").read_bytes()


def write_tsv(path, x, y=None, header=True):
    """The sample as a TSV with a header row (what a Python model's config reads)."""
    names = list(VOCAB) + ["hist_len", "hist_movie_id"] + (["label"] if y is not None else [])
    with open(path, "w") as f:
        if header:
            f.write("\t".join(names) + "\n")
        for i in range(len(x["user_id"])):
            row = [str(x[c][i]) for c in VOCAB] + [repr(float(x["hist_len"][i]))]
            row.append(",".join(str(v) for v in x["hist_movie_id"][i]))
            if y is not None:
                row.append(str(y[i]))
            f.write("\t".join(row) + "\n")


# -- the same model as the CLI --------------------------------------------


def test_python_builds_the_cli_config_and_trains_bitwise_the_same_weights(sample, din_bin, tmp_path):
    x, y = sample
    model = din.DIN(feature_columns(din), ["movie_id"], user_column="user_id", threads=2)
    model.compile("adam", "binary_crossentropy", metrics=["binary_crossentropy", "auc"])
    model.fit(x, y, batch_size=64, epochs=2, validation_split=0.3, verbose=0)
    model.save(tmp_path / "py")
    subprocess.run(
        [din_bin, "train", "--config", str(ROOT / "configs/movie_sample.toml"), "--epochs", "2",
         "--threads", "2", "--keep", "last", "--out", str(tmp_path / "cli")],
        check=True, capture_output=True,
    )
    py = json.loads((tmp_path / "py/config.json").read_text())["config"]
    cli = json.loads((tmp_path / "cli/config.json").read_text())["config"]
    for section in ("schema", "model", "train"):
        assert py[section] == cli[section], section
    assert (tmp_path / "py/model.safetensors").read_bytes() == (tmp_path / "cli/model.safetensors").read_bytes()


def test_a_python_model_is_read_by_the_cli_and_a_cli_model_by_python(sample, din_bin, tmp_path):
    x, y = sample
    model = small_model(din)
    model.compile("adam", "binary_crossentropy")
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    model.save(tmp_path / "py")
    write_tsv(tmp_path / "rows.tsv", x, y)
    subprocess.run(
        [din_bin, "predict", "--model", str(tmp_path / "py"), "--data", str(tmp_path / "rows.tsv"),
         "--out", str(tmp_path / "p.txt")],
        check=True, capture_output=True,
    )
    cli = np.loadtxt(tmp_path / "p.txt", dtype=np.float64)
    assert np.allclose(model.predict(x).ravel(), cli, atol=1e-6, rtol=0)

    subprocess.run(
        [din_bin, "train", "--config", str(ROOT / "configs/movie_sample.toml"), "--epochs", "1",
         "--set", "model.attention.hidden_units=[16, 8]", "--out", str(tmp_path / "cli")],
        check=True, capture_output=True,
    )
    subprocess.run(
        [din_bin, "predict", "--model", str(tmp_path / "cli"), "--data", str(ROOT / "data/movie_sample.txt"),
         "--out", str(tmp_path / "q.txt")],
        check=True, capture_output=True,
    )
    loaded = din.load_model(tmp_path / "cli")
    assert np.allclose(loaded.predict(x).ravel(), np.loadtxt(tmp_path / "q.txt"), atol=1e-6, rtol=0)
    assert loaded.history_feature_list == ["movie_id"]


def test_save_and_load_round_trip_bitwise(sample, tmp_path):
    x, y = sample
    model = small_model(din, att_activation="dice")  # Dice's statistics must survive too
    model.compile("adagrad", "binary_crossentropy", metrics=["auc"])
    model.fit(x, y, batch_size=128, epochs=1, verbose=0)
    model.save(tmp_path / "m")
    loaded = din.load_model(tmp_path / "m")
    assert np.array_equal(loaded.predict(x), model.predict(x))
    assert loaded.config["schema"] == model.config["schema"]
    assert loaded.config["train"]["optimizer"] == "adagrad"
    assert json.loads((tmp_path / "m/history.json").read_text())  # the epochs trained
    # Saving again replaces the directory whole.
    loaded.save(tmp_path / "m")
    assert np.array_equal(din.load_model(tmp_path / "m").predict(x), model.predict(x))


# -- training semantics ------------------------------------------------------


def test_two_fits_of_one_epoch_are_one_fit_of_two(sample, tmp_path):
    x, y = sample
    a = small_model(din, dnn_dropout=0.2)
    a.compile("adam", "binary_crossentropy")
    a.fit(x, y, batch_size=64, epochs=2, verbose=0)
    b = small_model(din, dnn_dropout=0.2)
    b.compile("adam", "binary_crossentropy")
    b.fit(x, y, batch_size=64, epochs=1, verbose=0)
    h = b.fit(x, y, batch_size=64, epochs=2, initial_epoch=1, verbose=0)
    assert h.epoch == [1]
    assert weights_bytes(a, tmp_path, "a") == weights_bytes(b, tmp_path, "b")
    # A new compile starts the optimizer afresh: training goes elsewhere.
    c = small_model(din, dnn_dropout=0.2)
    c.compile("adam", "binary_crossentropy")
    c.fit(x, y, batch_size=64, epochs=1, verbose=0)
    c.compile("adam", "binary_crossentropy")
    c.fit(x, y, batch_size=64, epochs=1, verbose=0)
    assert weights_bytes(c, tmp_path, "c") != weights_bytes(a, tmp_path, "a")


def test_same_seed_and_threads_give_the_same_weights_and_other_seeds_do_not(sample, tmp_path):
    x, y = sample

    def train(seed, threads):
        m = small_model(din, seed=seed, threads=threads)
        m.compile("adam", "binary_crossentropy")
        m.fit(x, y, batch_size=64, epochs=1, verbose=0)
        return m

    base = weights_bytes(train(7, 2), tmp_path, "a")
    assert weights_bytes(train(7, 2), tmp_path, "b") == base
    assert weights_bytes(train(8, 2), tmp_path, "c") != base
    din.set_num_threads(1)
    try:
        m = small_model(din, seed=7, threads=None)
        assert m._threads_now() == 1
    finally:
        din.set_num_threads(0)
    with pytest.raises(ValueError, match="threads"):
        din.set_num_threads(-1)


def test_history_has_keras_keys_and_values(sample):
    x, y = sample
    model = small_model(din)
    model.compile("adam", "binary_crossentropy", metrics=["binary_crossentropy", "auc", "gauc"])
    h = model.fit(x, y, batch_size=64, epochs=2, validation_split=0.3, verbose=0)
    assert set(h.history) == {
        "loss", "binary_crossentropy", "auc", "gauc",
        "val_loss", "val_binary_crossentropy", "val_auc", "val_gauc",
    }
    assert h.epoch == [0, 1] and all(len(v) == 2 for v in h.history.values())
    assert h.history["loss"] == h.history["binary_crossentropy"]
    assert all(0 < v < 1 for v in h.history["auc"] + h.history["val_auc"])
    # The validation numbers are evaluate's on the same rows (in batches
    # of the same size: train.eval_batch_size, 1024).
    cut = int(len(y) * 0.7)
    val = {k: v[cut:] for k, v in x.items()}
    loss, bce, auc, gauc = model.evaluate(val, y[cut:], batch_size=1024)
    assert loss == pytest.approx(h.history["val_loss"][-1], abs=1e-12)
    assert auc == pytest.approx(h.history["val_auc"][-1], abs=1e-12)
    assert model.history is h


def test_evaluate_matches_an_independent_computation(sample):
    x, y = sample
    model = small_model(din)
    model.compile("adam", "binary_crossentropy", metrics=["auc"])
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    p = model.predict(x).ravel().astype(np.float64)
    assert p.dtype == np.float64 and model.predict(x).shape == (len(y), 1)
    eps = 1e-7
    q = np.clip(p, eps, 1 - eps)
    want_loss = -np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))
    # AUC by counting pairs (ties count half).
    pos, neg = p[y == 1], p[y == 0]
    want_auc = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    loss, auc = model.evaluate(x, y)
    assert loss == pytest.approx(want_loss, abs=1e-6)
    assert auc == pytest.approx(want_auc, abs=1e-9)
    d = model.evaluate(x, y, return_dict=True)
    assert d == {"loss": loss, "auc": auc}
    model.compile("adam", "binary_crossentropy")
    assert model.evaluate(x, y) == pytest.approx(loss)


def test_early_stopping_stops_and_restores_the_best_weights(sample):
    x, y = sample
    model = small_model(din)
    model.compile(din.optimizers.Adam(learning_rate=0.05), "binary_crossentropy")
    es = din.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True)
    h = model.fit(x, y, batch_size=64, epochs=30, validation_split=0.3, callbacks=[es], verbose=0)
    assert len(h.epoch) < 30, "stopped early at this learning rate"
    best = int(np.argmin(h.history["val_loss"]))
    cut = int(len(y) * 0.7)
    val = {k: v[cut:] for k, v in x.items()}
    assert model.evaluate(val, y[cut:], batch_size=1024) == pytest.approx(h.history["val_loss"][best], abs=1e-12)
    with pytest.raises(ValueError, match="validation"):
        model.fit(x, y, epochs=2, callbacks=[din.EarlyStopping()], verbose=0)
    with pytest.raises(ValueError, match="monitor"):
        din.EarlyStopping(monitor="val_accuracy")
    with pytest.raises(ValueError, match="min_delta"):
        din.EarlyStopping(min_delta=0.01)


def test_callbacks_see_keras_logs_and_can_stop_training(sample):
    x, y = sample
    seen = []

    class Recorder(din.Callback):
        def on_train_begin(self, logs=None):
            seen.append(("train_begin", None))

        def on_epoch_begin(self, epoch, logs=None):
            seen.append(("begin", epoch))

        def on_epoch_end(self, epoch, logs=None):
            seen.append(("end", epoch, sorted(logs)))
            if epoch == 1:
                self.model.stop_training = True

        def on_train_end(self, logs=None):
            seen.append(("train_end", None))

    model = small_model(din)
    model.compile("adam", "binary_crossentropy", metrics=["auc"])
    h = model.fit(x, y, batch_size=64, epochs=5, validation_split=0.2, callbacks=[Recorder()], verbose=0)
    assert h.epoch == [0, 1]
    keys = ["auc", "loss", "val_auc", "val_loss"]
    assert seen == [("train_begin", None), ("begin", 0), ("end", 0, keys), ("begin", 1), ("end", 1, keys), ("train_end", None)]


def test_an_exception_in_a_callback_stops_training_and_is_raised(sample):
    x, y = sample

    class Boom(din.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("boom")

    model = small_model(din)
    model.compile("adam", "binary_crossentropy")
    with pytest.raises(RuntimeError, match="boom"):
        model.fit(x, y, batch_size=64, epochs=3, callbacks=[Boom()], verbose=0)
    assert model.predict(x).shape == (len(y), 1)  # still usable


def test_verbose_prints_keras_style_progress(sample, capsys):
    x, y = sample
    model = small_model(din)
    model.compile("adam", "binary_crossentropy", metrics=["binary_crossentropy"])
    model.fit(x, y, batch_size=256, epochs=2, validation_split=0.3, verbose=1)
    out = capsys.readouterr().out
    assert "Epoch 1/2" in out and "Epoch 2/2" in out
    assert "4/4 [==============================]" in out
    assert "- loss: " in out and "- val_binary_crossentropy: " in out
    model.fit(x, y, batch_size=256, epochs=1, verbose=2)
    out = capsys.readouterr().out
    assert out.startswith("Epoch 1/1\n6/6 - ") and "[" not in out
    model.fit(x, y, batch_size=256, epochs=1, verbose=0)
    assert capsys.readouterr().out == ""


# -- the GIL and ctrl-c -------------------------------------------------------


def _big(n=30000):
    """Synthetic arrays big enough for a fit that lasts a while."""
    rng = np.random.default_rng(0)
    x = {
        "user_id": rng.integers(0, 4, n), "gender": rng.integers(0, 3, n), "age": rng.integers(0, 4, n),
        "movie_id": rng.integers(1, 209, n), "movie_type_id": rng.integers(1, 10, n),
        "hist_len": rng.random(n, dtype=np.float32),
        "hist_movie_id": rng.integers(0, 209, (n, 50)),
    }
    return x, rng.integers(0, 2, n)


def test_ctrl_c_stops_fit_between_batches_and_leaves_the_model_usable(tmp_path):
    x, y = _big()
    model = small_model(din)
    model.compile("adam", "binary_crossentropy")
    before = weights_bytes(model, tmp_path, "before")
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=32, epochs=1000, verbose=0)
    assert time.monotonic() - started < 30, "stopped soon after the signal"
    timer.join()
    after = weights_bytes(model, tmp_path, "after")
    assert after != before, "the weights trained before ctrl-c are kept"
    assert np.isfinite(model.predict({k: v[:10] for k, v in x.items()})).all()
    model.fit({k: v[:200] for k, v in x.items()}, y[:200], epochs=1, verbose=0)  # and it trains on


def test_the_gil_is_released_while_din_computes():
    x, y = _big(20000)
    model = small_model(din)
    model.compile("adam", "binary_crossentropy")
    ticks = []
    done = threading.Event()

    def tick():
        while not done.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.01)

    t = threading.Thread(target=tick)
    t.start()
    start = time.monotonic()
    model.fit(x, y, batch_size=256, epochs=1, verbose=0)
    model.predict(x, batch_size=4096)
    end = time.monotonic()
    done.set()
    t.join()
    during = [s for s in ticks if start < s < end]
    # With the GIL held, the thread would not tick at all during the call.
    assert len(during) > 0.5 * (end - start) / 0.01 * 0.5, (len(during), end - start)


# -- inputs -------------------------------------------------------------------


def test_dict_dataframe_arrow_ragged_and_text_inputs_give_the_same_predictions(sample):
    pd = pytest.importorskip("pandas")
    pa = pytest.importorskip("pyarrow")
    x, y = sample
    model = small_model(din)
    model.compile("adam", "binary_crossentropy")
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    want = model.predict(x)
    df = pd.DataFrame({k: (list(v) if v.ndim == 2 else v) for k, v in x.items()})
    assert np.array_equal(model.predict(df), want)
    table = pa.table({k: (pa.array(list(v)) if v.ndim == 2 else pa.array(v)) for k, v in x.items()})
    assert np.array_equal(model.predict(table), want)
    assert np.array_equal(model.predict(table.to_batches(max_chunksize=100)[0]), want[:100])
    chunked = pa.concat_tables([table.slice(0, 500), table.slice(500)])
    assert np.array_equal(model.predict(chunked), want)
    # Histories without their padding, as lists of different lengths, or as text.
    ragged = dict(x, hist_movie_id=np.array([list(h[h != 0]) for h in x["hist_movie_id"]], dtype=object))
    assert np.array_equal(model.predict(ragged), want)
    text = dict(x, hist_movie_id=[",".join(str(i) for i in h) for h in x["hist_movie_id"]])
    assert np.array_equal(model.predict(text), want)
    # Other integer dtypes, (N, 1) columns and Fortran order.
    other = dict(x, user_id=x["user_id"].astype(np.int32).reshape(-1, 1), movie_id=x["movie_id"].astype(np.uint16),
                 hist_movie_id=np.asfortranarray(x["hist_movie_id"]), hist_len=x["hist_len"].astype(np.float64))
    assert np.array_equal(model.predict(other), want)
    # Pre-padding (Keras' pad_sequences default) gives the same histories.
    pre = np.array([np.concatenate([np.zeros(50 - (h != 0).sum(), np.int64), h[h != 0]]) for h in x["hist_movie_id"]])
    assert np.array_equal(model.predict(dict(x, hist_movie_id=pre)), want)
    # Training from a DataFrame trains what the dict does.
    a, b = small_model(din), small_model(din)
    for m, data in ((a, x), (b, df)):
        m.compile("adam", "binary_crossentropy")
        m.fit(data, pd.Series(y), batch_size=64, epochs=1, verbose=0)
    assert np.array_equal(a.predict(x), b.predict(x))


def test_attention_weights_sit_at_their_behaviours_positions(sample):
    x, y = sample
    model = small_model(din)
    model.compile("adam", "binary_crossentropy")
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    p, att = model.predict(x, return_attention=True)
    h = x["hist_movie_id"]
    assert att.shape == h.shape and att.dtype == np.float32
    assert np.array_equal(p, model.predict(x))
    assert np.all(att[h == 0] == 0) and np.count_nonzero(att[h != 0]) > 0.9 * (h != 0).sum()
    pre = np.array([np.concatenate([np.zeros(50 - (r != 0).sum(), np.int64), r[r != 0]]) for r in h])
    _, att_pre = model.predict(dict(x, hist_movie_id=pre), return_attention=True)
    for i in range(0, len(h), 97):
        assert np.array_equal(att[i][h[i] != 0], att_pre[i][pre[i] != 0])
    ragged = dict(x, hist_movie_id=np.array([list(r[r != 0]) for r in h], dtype=object))
    _, att_ragged = model.predict(ragged, return_attention=True)
    assert att_ragged.shape == (len(h), 50)
    n = (h[0] != 0).sum()
    assert np.array_equal(att_ragged[0, :n], att[0][h[0] != 0])


def test_truncation_keeps_the_configured_end_and_attention_shows_it():
    x, y = read_sample()
    rng = np.random.default_rng(1)
    long = rng.integers(1, 209, (len(y), 80))  # longer than maxlen 50
    for order, truncation, kept in (("oldest_first", "keep_recent", slice(30, 80)), ("recent_first", "keep_recent", slice(0, 50))):
        fc = feature_columns(din)[:-1] + [
            din.VarLenSparseFeat(din.SparseFeat("hist_movie_id", 209, 8, embedding_name="movie_id"), maxlen=50,
                                 order=order, truncation=truncation)
        ]
        model = din.DIN(fc, ["movie_id"], att_hidden_size=(8,), dnn_hidden_units=(8,), threads=1)
        model.compile("adam", "binary_crossentropy")
        model.fit(dict(x, hist_movie_id=long), y, batch_size=256, epochs=1, verbose=0)
        p, att = model.predict(dict(x, hist_movie_id=long), return_attention=True)
        assert att.shape == (len(y), 80)
        dropped = np.ones(80, bool)
        dropped[kept] = False
        assert np.all(att[:, dropped] == 0)
        same = dict(x, hist_movie_id=np.ascontiguousarray(long[:, kept]))
        p_same, att_same = model.predict(same, return_attention=True)
        assert np.array_equal(p_same, p)
        assert np.array_equal(att_same, att[:, kept])
        assert np.count_nonzero(att_same) > 0.9 * att_same.size


# -- feature columns ----------------------------------------------------------


def test_deepctr_and_tutorial_feature_columns_build_the_same_model():
    # DeepCTR's own namedtuples (as deepctr.feature_column defines them).
    SparseFeat = namedtuple("SparseFeat", ["name", "vocabulary_size", "embedding_dim", "use_hash", "vocabulary_path",
                                           "dtype", "embeddings_initializer", "embedding_name", "group_name", "trainable"])
    DenseFeat = namedtuple("DenseFeat", ["name", "dimension", "dtype", "transform_fn"])
    VarLen = namedtuple("VarLenSparseFeat", ["sparsefeat", "maxlen", "combiner", "length_name", "weight_name", "weight_norm"])
    VarLen.name = property(lambda s: s.sparsefeat.name)
    VarLen.vocabulary_size = property(lambda s: s.sparsefeat.vocabulary_size)
    VarLen.embedding_dim = property(lambda s: s.sparsefeat.embedding_dim)
    VarLen.embedding_name = property(lambda s: s.sparsefeat.embedding_name)
    VarLen.__name__ = "VarLenSparseFeat"

    def sf(name, size):
        return SparseFeat(name, size, 8, False, None, "int32", None, name, "default_group", True)

    deepctr = [sf(n, v) for n, v in VOCAB.items()] + [DenseFeat("hist_len", 1, "float32", None)]
    hist = SparseFeat("hist_movie_id", 209, 8, False, None, "int32", None, "movie_id", "default_group", True)
    deepctr.append(VarLen(hist, 50, "mean", None, None, True))
    ours = din.DIN(feature_columns(din, order="oldest_first"), ["movie_id"])
    theirs = din.DIN(deepctr, ["movie_id"])
    assert theirs.config["schema"] == ours.config["schema"]
    # The DIN tutorial's form: VarLenSparseFeat(name, vocabulary_size, embedding_dim, maxlen) and the
    # histories named by a third argument; no embedding_name, so the history has its own table.
    tut = [din.SparseFeat(n, v, embedding_dim=8) for n, v in VOCAB.items()] + [din.DenseFeat("hist_len", 1)]
    tut.append(din.VarLenSparseFeat("hist_movie_id", vocabulary_size=209, embedding_dim=8, maxlen=50))
    model = din.DIN(tut, ["movie_id"], ["hist_movie_id"])
    seq = model.config["schema"]["sequence"][0]
    assert seq["name"] == "hist_movie_id" and seq["vocab_size"] == 209 and seq.get("shares_embedding_with") is None
    assert model.config["schema"]["din_pairs"] == [{"target": "movie_id", "history": "hist_movie_id"}]
    assert din.get_feature_names(tut) == list(VOCAB) + ["hist_len", "hist_movie_id"]
    assert din.SparseFeat("a", 10000, "auto").embedding_dim == 6 * 10


def test_din_options_reach_the_config():
    model = din.DIN(feature_columns(din), ["movie_id"], dnn_hidden_units=[32], dnn_activation="relu",
                    att_hidden_size=(80, 40), att_activation="Dice", att_weight_normalization=True,
                    l2_reg_embedding=1e-6, l2_reg_dnn=1e-5, dnn_dropout=0.1, seed=1024)
    c = model.config
    assert c["model"]["attention"] == {"pooling": "attention", "hidden_units": [80, 40], "activation": "dice",
                                       "normalization": "softmax"}
    assert c["model"]["dnn"] == {"hidden_units": [32], "activation": "relu", "dropout": 0.1}
    assert c["train"]["regularization"] == {"kind": "l2", "lambda": 1e-6, "dnn_lambda": 1e-5}
    assert c["train"]["seed"] == 1024
    mba = din.DIN(feature_columns(din), ["movie_id"], l2_reg_embedding=0.01, mini_batch_aware=True)
    assert mba.config["train"]["regularization"] == {"kind": "mini_batch_aware", "lambda": 0.01, "dnn_lambda": 0.0}
    plain = din.DIN(feature_columns(din), ["movie_id"])
    assert "regularization" not in plain.config["train"] or plain.config["train"]["regularization"]["kind"] == "none"
    assert plain.count_params() == sum(int(np.prod(s)) for _, s in plain._core.parameters())


# -- errors -------------------------------------------------------------------


def _fitted():
    x, y = read_sample()
    model = small_model(din)
    model.compile("adam", "binary_crossentropy")
    return model, x, y


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda x: x.pop("gender"), ValueError, r"x has no column 'gender'"),
        (lambda x: x.update(gender=x["gender"][:-1]), ValueError, r"x\['gender'\] has 1379 rows"),
        (lambda x: x.update(movie_id=np.stack([x["movie_id"]] * 2, 1)), ValueError, r"x\['movie_id'\] has shape \(1380, 2\)"),
        (lambda x: x.update(hist_movie_id=x["movie_id"]), ValueError, r"x\['hist_movie_id'\] has shape \(1380,\); a VarLenSparseFeat"),
        (lambda x: x.update(movie_id=x["movie_id"].astype("datetime64[s]")), TypeError, r"x\['movie_id'\] has dtype datetime64"),
        (lambda x: x["movie_id"].__setitem__(7, 500), ValueError, r"x\['movie_id'\] row 7: id 500 is out of range: .*vocabulary_size 209"),
        (lambda x: x["movie_id"].__setitem__(9, -3), ValueError, r"x\['movie_id'\] row 9: not a non-negative integer id"),
        (lambda x: x["hist_movie_id"].__setitem__((11, 0), 900), ValueError, r"x\['hist_movie_id'\] row 11: id 900"),
        (lambda x: x["hist_len"].__setitem__(5, np.nan), ValueError, r"x\['hist_len'\] row 5: not a finite number"),
        (lambda x: x.update(user_id=np.array(["a"] * 1380, dtype=object)), ValueError, r"x\['user_id'\] row 0: not a non-negative integer id"),
    ],
)
def test_bad_inputs_are_refused_naming_the_feature_and_row(change, error, message):
    model, x, y = _fitted()
    x = {k: v.copy() for k, v in x.items()}
    change(x)
    with pytest.raises(error, match=message):
        model.fit(x, y, epochs=1, verbose=0)
    with pytest.raises(error, match=message):
        model.predict(x)


def test_bad_labels_and_containers_are_refused():
    model, x, y = _fitted()
    bad = y.copy()
    bad[3] = 2
    with pytest.raises(ValueError, match=r"row 3: label must be 0 or 1"):
        model.fit(x, bad, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"y has 1379 rows|has 1379 rows"):
        model.fit(x, y[:-1], epochs=1, verbose=0)
    with pytest.raises(ValueError, match="labels are needed"):
        model.fit(x, None, epochs=1, verbose=0)
    with pytest.raises(TypeError, match="dict of arrays"):
        model.predict([x["user_id"]])
    with pytest.raises(ValueError, match="no samples"):
        model.predict({k: v[:0] for k, v in x.items()})
    with pytest.raises(ValueError, match="validation_split"):
        model.fit(x, y, validation_split=1.5, verbose=0)
    with pytest.raises(ValueError, match="batch_size"):
        model.fit(x, y, batch_size=0, verbose=0)
    with pytest.raises(ValueError, match="validation_data must be"):
        model.fit(x, y, validation_data=(x,), verbose=0)


def test_bad_models_and_compiles_are_refused():
    fc = feature_columns(din)
    with pytest.raises(RuntimeError, match="compile the model first"):
        din.DIN(fc, ["movie_id"]).fit(*read_sample(), verbose=0)
    with pytest.raises(ValueError, match="needs its history, a VarLenSparseFeat named 'hist_gender'"):
        din.DIN(fc, ["gender"])
    with pytest.raises(ValueError, match="'nothing' is not a SparseFeat"):
        din.DIN(fc, ["nothing"])
    with pytest.raises(ValueError, match="att_activation: 'tanh'"):
        din.DIN(fc, ["movie_id"], att_activation="tanh")
    with pytest.raises(ValueError, match="batch normalisation"):
        din.DIN(fc, ["movie_id"], dnn_use_bn=True)
    with pytest.raises(ValueError, match="use_hash"):
        din.DIN(fc + [din.SparseFeat("city", 10, use_hash=True)], ["movie_id"])
    with pytest.raises(ValueError, match="embedding_dim 4 but shares"):
        din.DIN(fc + [din.SparseFeat("other", 209, 4, embedding_name="movie_id")], ["movie_id"])
    with pytest.raises(ValueError, match="vocabulary_size must be a positive integer"):
        din.DIN([din.SparseFeat("movie_id", 0)] + fc[5:], ["movie_id"])
    with pytest.raises(ValueError, match="task"):
        din.DIN(fc, ["movie_id"], task="regression")
    with pytest.warns(UserWarning, match="CPU"):
        din.DIN(fc, ["movie_id"], device="cuda:0")
    m = din.DIN(fc, ["movie_id"])
    with pytest.raises(ValueError, match="optimizer 'rmsprop'"):
        m.compile("rmsprop")
    with pytest.raises(ValueError, match="binary cross-entropy"):
        m.compile("adam", "mse")
    with pytest.raises(ValueError, match="metric 'accuracy'"):
        m.compile("adam", metrics=["accuracy"])
    with pytest.raises(ValueError, match="user_column"):
        m.compile("adam", metrics=["gauc"])
    with pytest.raises(ValueError, match="learning_rate"):
        din.optimizers.Adam(learning_rate=-1)
    assert din.optimizers.resolve(din.optimizers.SGD()) == ("sgd", 0.01)


def test_load_model_refuses_a_missing_or_damaged_directory(tmp_path):
    with pytest.raises(OSError):
        din.load_model(tmp_path / "nothing")
    model, x, y = _fitted()
    model.save(tmp_path / "m")
    blob = bytearray((tmp_path / "m/model.safetensors").read_bytes())
    blob[-3] ^= 0xFF
    (tmp_path / "m/model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="model.safetensors"):
        din.load_model(tmp_path / "m")


def test_summary_parameters_and_module_names(tmp_path, capsys):
    model, x, y = _fitted()
    lines = []
    model.summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert "embeddings.movie_id.weight" in text and "(209, 8)" in text and "attention.layers.0.weight" in text
    total = sum(int(np.prod(s)) for _, s in model._core.parameters())
    assert f"Total params: {total:,}" in text
    assert model.count_params() == total
    model.summary()
    assert "Total params" in capsys.readouterr().out
    assert repr(model) == "<din.DIN 7 features, attends movie_id<-hist_movie_id>"
    import din.inputs
    assert din.inputs.SparseFeat is din.SparseFeat and din.feature_column.get_feature_names is din.get_feature_names
    assert din.get_num_threads() == 0 and isinstance(din.__version__, str)
    model.save(tmp_path / "m")
    uncompiled = din.load_model(tmp_path / "m", compile=False)
    with pytest.raises(RuntimeError, match="compile the model first"):
        uncompiled.fit(x, y, verbose=0)
    assert np.array_equal(uncompiled.predict(x), model.predict(x))


def test_set_precision_scores_in_bf16_near_fp32_and_a_save_keeps_it(sample, tmp_path):
    x, y = sample
    model = small_model(din)
    model.compile("adam", "binary_crossentropy")
    model.fit(x, y, batch_size=128, epochs=1, verbose=0)
    p32 = model.predict(x)
    assert model.set_precision("bf16").startswith("bf16")
    p16 = model.predict(x)
    assert 0 < np.abs(p16 - p32).max() <= 1e-2
    # Training goes on in f32 with the precision set (the config is the model's).
    model.fit(x, y, batch_size=128, epochs=1, verbose=0)
    model.save(tmp_path / "m")
    assert din.load_model(tmp_path / "m").config["model"]["precision"] == "bf16"
    back = din.load_model(tmp_path / "m", precision="fp32")
    assert "precision" not in back.config["model"]
    assert np.array_equal(back.predict(x), din.load_model(tmp_path / "m", precision="fp32").predict(x))
    assert not np.array_equal(back.predict(x), din.load_model(tmp_path / "m").predict(x))
    with pytest.raises(ValueError, match="fp32, bf16 or auto"):
        model.set_precision("fp16")
    with pytest.raises(TypeError, match="precision must be a string"):
        model.set_precision(16)


def test_compile_takes_a_training_precision(sample, tmp_path):
    """Mixed precision from Python: bf16 products train another model than
    fp32 (same seed and batches), close to it, recorded in the config; a
    bad value is refused at compile."""
    x, y = sample

    def train(precision):
        m = small_model(din)
        m.compile("adam", "binary_crossentropy", training_precision=precision)
        m.fit(x, y, batch_size=64, epochs=2, verbose=0)
        return m

    fp32, bf16 = train("fp32"), train("bf16")
    assert "precision" not in fp32.config["train"]
    assert bf16.config["train"]["precision"] == "bf16"
    assert weights_bytes(fp32, tmp_path, "a") != weights_bytes(bf16, tmp_path, "b")
    assert np.abs(fp32.predict(x) - bf16.predict(x)).max() < 0.05
    with pytest.raises(ValueError, match="training_precision must be 'fp32', 'bf16' or 'auto'"):
        small_model(din).compile("adam", training_precision="fp16")
