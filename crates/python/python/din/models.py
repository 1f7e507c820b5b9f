"""``DIN``: the Deep Interest Network with DeepCTR's constructor and Keras' methods.

The model is din's Rust core: this module turns the feature columns and the
arguments into the config ``din train`` reads (``model.config`` shows it),
hands arrays to the core, and prints progress. The same config, seed and
thread count give bitwise the weights ``din train`` gives.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _din, _inputs
from . import optimizers as _optimizers
from .callbacks import MONITORS, Callback, EarlyStopping, History
from .feature_column import DenseFeat, SparseFeat, VarLenSparseFeat

__all__ = ["DIN", "load_model", "set_num_threads", "get_num_threads"]

_ACTIVATIONS = ("prelu", "dice", "relu", "sigmoid")
# Metric names and what they read off din's metrics.
_METRICS = {
    "binary_crossentropy": "logloss",
    "bce": "logloss",
    "logloss": "logloss",
    "auc": "auc",
    "gauc": "gauc",
}
_LOSSES = ("binary_crossentropy", "bce", "binarycrossentropy")

_threads = 0


def set_num_threads(threads: int) -> None:
    """Worker threads for training and inference (0: one per core). A model's
    own ``threads`` argument takes precedence. The same seed and thread count
    give the same weights."""
    global _threads
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ValueError(f"threads must be a non-negative integer, got {threads!r}")
    _threads = threads


def get_num_threads() -> int:
    """The thread count :func:`set_num_threads` set (0: one per core)."""
    return _threads


def _feature(fc: Any) -> Dict[str, Any]:
    """A feature column of din's, DeepCTR's or the DIN tutorial's, as one dict."""
    cls = type(fc).__name__
    name = getattr(fc, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"feature column {fc!r}: has no name")
    if cls in ("SparseFeat", "SparseFeature", "VarLenSparseFeat", "VarLenSparseFeature"):
        dim = getattr(fc, "embedding_dim", None)
        if dim is None:
            dim = getattr(fc, "embedding_size", None)
        out = {
            "kind": "varlen" if cls.startswith("VarLen") else "sparse",
            "name": name,
            "vocabulary_size": getattr(fc, "vocabulary_size", None),
            "embedding_dim": dim,
            "embedding_name": getattr(fc, "embedding_name", None) or name,
            "oov": getattr(fc, "oov", "error"),
        }
        if getattr(fc, "use_hash", False):
            raise ValueError(f"{cls}('{name}'): use_hash is not supported; map raw values to ids first (din prepare does)")
        if getattr(fc, "trainable", True) is False:
            raise ValueError(f"{cls}('{name}'): trainable=False is not supported; din trains every embedding")
        if getattr(fc, "dtype", "int32") == "string":
            raise ValueError(f"{cls}('{name}'): dtype='string' is not supported; give integer ids")
        for key in ("vocabulary_size", "embedding_dim"):
            v = out[key]
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{cls}('{name}'): {key} must be a positive integer, got {v!r}")
            out[key] = int(v)
        if out["kind"] == "varlen":
            maxlen = getattr(fc, "maxlen", None)
            if not isinstance(maxlen, (int, np.integer)) or isinstance(maxlen, bool) or maxlen < 1:
                raise ValueError(f"{cls}('{name}'): maxlen must be a positive integer, got {maxlen!r}")
            if getattr(fc, "weight_name", None) is not None:
                raise ValueError(f"{cls}('{name}'): weighted sequences (weight_name) are not supported")
            out.update(
                maxlen=int(maxlen),
                combiner=getattr(fc, "combiner", "mean"),
                order=getattr(fc, "order", "oldest_first"),
                truncation=getattr(fc, "truncation", "keep_recent"),
            )
        return out
    if cls in ("DenseFeat", "DenseFeature"):
        dim = getattr(fc, "dimension", 1)
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"{cls}('{name}'): dimension must be a positive integer, got {dim!r}")
        if getattr(fc, "transform_fn", None) is not None:
            raise ValueError(f"{cls}('{name}'): transform_fn is not supported; transform the column before passing it")
        return {"kind": "dense", "name": name, "dimension": int(dim)}
    raise TypeError(
        f"feature column {fc!r}: expected SparseFeat, DenseFeat or VarLenSparseFeat (din's or DeepCTR's)"
    )


def _schema(
    columns: Sequence[Dict[str, Any]],
    targets: Sequence[str],
    histories: Optional[Sequence[str]],
    user_column: Optional[str],
) -> Dict[str, Any]:
    """din's ``schema`` for the feature columns: tables shared by
    ``embedding_name``, each target attended against its history (by name, or
    DeepCTR's ``hist_`` prefix)."""
    names = [c["name"] for c in columns]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"feature names must be unique; repeated: {dup}")
    embedded = [c for c in columns if c["kind"] != "dense"]
    # The table of each embedding_name is owned by the feature of that name,
    # else by the first feature using it.
    owners: Dict[str, Dict[str, Any]] = {}
    for c in embedded:
        en = c["embedding_name"]
        if en not in owners:
            owners[en] = next((o for o in embedded if o["name"] == en and o["embedding_name"] == en), c)
    sparse, sequence, dense = [], [], []
    for c in columns:
        if c["kind"] == "dense":
            dense.append({"name": c["name"], "dim": c["dimension"]})
            continue
        owner = owners[c["embedding_name"]]
        entry: Dict[str, Any] = {"name": c["name"]}
        if owner is c:
            entry.update(vocab_size=c["vocabulary_size"], embedding_dim=c["embedding_dim"], oov=c["oov"])
        else:
            if c["embedding_dim"] != owner["embedding_dim"]:
                raise ValueError(
                    f"'{c['name']}' has embedding_dim {c['embedding_dim']} but shares the embedding table "
                    f"'{c['embedding_name']}' of '{owner['name']}', whose embedding_dim is {owner['embedding_dim']}"
                )
            entry["shares_embedding_with"] = owner["name"]
        if c["kind"] == "sparse":
            sparse.append(entry)
        else:
            if c["combiner"] != "mean" and not (histories and c["name"] in histories):
                attended = histories is None and any(f"hist_{t}" == c["name"] for t in targets)
                if not attended:
                    raise ValueError(
                        f"VarLenSparseFeat('{c['name']}'): combiner {c['combiner']!r}; din pools a history that is "
                        "not attended by its mean"
                    )
            entry.update(max_len=c["maxlen"], order=c["order"], truncation=c["truncation"])
            sequence.append(entry)
    by_name = {c["name"]: c for c in columns}
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ValueError("history_feature_list is empty: DIN attends at least one target to its history")
    if histories is not None and len(histories) != len(targets):
        raise ValueError(
            f"behavior_seq_feature_list has {len(histories)} entries, history_feature_list {len(targets)}: "
            "one history per target"
        )
    pairs = []
    for i, t in enumerate(targets):
        h = histories[i] if histories is not None else f"hist_{t}"
        if by_name.get(t, {}).get("kind") != "sparse":
            raise ValueError(f"history_feature_list: '{t}' is not a SparseFeat of the feature columns")
        if by_name.get(h, {}).get("kind") != "varlen":
            raise ValueError(
                f"history_feature_list: '{t}' needs its history, a VarLenSparseFeat named '{h}'"
                + ("" if histories is not None else " (DeepCTR's hist_ prefix)")
            )
        if by_name[t]["embedding_dim"] != by_name[h]["embedding_dim"]:
            raise ValueError(
                f"'{t}' (embedding_dim {by_name[t]['embedding_dim']}) and its history '{h}' "
                f"(embedding_dim {by_name[h]['embedding_dim']}) must have the same embedding_dim"
            )
        pairs.append({"target": t, "history": h})
    label = "label"
    while label in by_name:
        label = "_" + label
    schema: Dict[str, Any] = {
        "label": label,
        "sparse": sparse,
        "dense": dense,
        "sequence": sequence,
        "din_pairs": pairs,
    }
    if user_column is not None:
        schema["user"] = user_column
    return schema


def _activation(value: str, what: str) -> str:
    a = str(value).lower()
    if a not in _ACTIVATIONS:
        raise ValueError(f"{what}: {value!r} is not one of din's activations {_ACTIVATIONS}")
    return a


def _units(value: Any, what: str, allow_empty: bool) -> List[int]:
    try:
        units = [int(u) for u in value]
    except TypeError:
        raise ValueError(f"{what} must be a sequence of layer widths, got {value!r}") from None
    if any(u < 1 for u in units) or (not units and not allow_empty):
        raise ValueError(f"{what} must be {'' if allow_empty else 'a non-empty sequence of '}positive widths, got {value!r}")
    return units


class _Progress:
    """Keras-style progress lines on ``sys.stdout``."""

    def __init__(self, verbose: int, epochs: int, first: int) -> None:
        self.verbose, self.epochs, self.first = verbose, epochs, first
        self.epoch = 0
        self.start = time.monotonic()
        self.shown = 0.0
        self.done = self.total = 0

    def batch(self, epoch: int, done: int, total: int, loss: float) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, time.monotonic()
            if self.verbose:
                print(f"Epoch {self.first + epoch}/{self.epochs}", flush=True)
        self.done, self.total = done, total
        now = time.monotonic()
        if self.verbose == 1 and (now - self.shown >= 0.1 or done == total):
            self.shown = now
            width = len(str(total))
            filled = int(30 * done / max(total, 1))
            bar = "=" * max(filled - 1, 0) + (">" if done < total else "=") + "." * (30 - filled)
            eta = (now - self.start) / max(done, 1) * (total - done)
            sys.stdout.write(f"\r{done:{width}d}/{total} [{bar[:30]}] - ETA: {eta:.0f}s - loss: {loss:.4f}")
            sys.stdout.flush()

    def end(self, logs: Dict[str, float], seconds: float) -> None:
        if not self.verbose:
            return
        values = " - ".join(f"{k}: {v:.4f}" for k, v in logs.items())
        per_step = seconds / max(self.total, 1)
        if self.verbose == 1:
            bar = "=" * 30
            sys.stdout.write(
                f"\r{self.total}/{self.total} [{bar}] - {seconds:.0f}s {per_step * 1000:.0f}ms/step - {values}\n"
            )
        else:
            sys.stdout.write(f"{self.total}/{self.total} - {seconds:.0f}s - {values}\n")
        sys.stdout.flush()


class DIN:
    """The Deep Interest Network (Zhou et al., KDD 2018).

    ``DIN(dnn_feature_columns, history_feature_list)`` as DeepCTR's: each name
    in ``history_feature_list`` is a ``SparseFeat`` (the candidate) attended
    against the ``VarLenSparseFeat`` named ``"hist_" + name`` (or, as in the DIN
    tutorial, the histories named by a third argument,
    ``behavior_seq_feature_list``). Every other sparse and dense feature, and
    the mean of every history not attended, joins the pooled interest in the
    DNN.

    Defaults are din's (the DIN tutorial's model): attention MLP (256, 128,
    64) with PReLU, DNN (200, 80) with PReLU, no regularisation, seed 2024.
    DeepCTR's DIN defaults to attention (80, 40) with Dice, DNN (256, 128, 64)
    with ReLU, ``l2_reg_embedding=1e-6`` and seed 1024: pass those to get its
    architecture.

    din's extras (keyword-only): ``mini_batch_aware`` (the paper's
    regulariser, eq. 4, with strength ``l2_reg_embedding``), ``user_column``
    (the feature or input column that identifies the user, for GAUC),
    ``threads``, and ``pooling="sum"`` (the paper's base model).
    """

    def __init__(
        self,
        dnn_feature_columns: Sequence[Any],
        history_feature_list: Sequence[str],
        behavior_seq_feature_list: Optional[Union[Sequence[str], bool]] = None,
        dnn_use_bn: bool = False,
        dnn_hidden_units: Sequence[int] = (200, 80),
        dnn_activation: str = "prelu",
        att_hidden_size: Sequence[int] = (256, 128, 64),
        att_activation: str = "prelu",
        att_weight_normalization: bool = False,
        l2_reg_dnn: float = 0.0,
        l2_reg_embedding: float = 0.0,
        dnn_dropout: float = 0.0,
        init_std: Optional[float] = None,
        seed: int = 2024,
        task: str = "binary",
        device: str = "cpu",
        gpus: Any = None,
        *,
        mini_batch_aware: bool = False,
        user_column: Optional[str] = None,
        threads: Optional[int] = None,
        pooling: str = "attention",
    ) -> None:
        if isinstance(behavior_seq_feature_list, bool):  # DeepCTR's third positional argument
            dnn_use_bn, behavior_seq_feature_list = behavior_seq_feature_list, None
        if dnn_use_bn:
            raise ValueError("dnn_use_bn=True: din's DNN has no batch normalisation")
        if task != "binary":
            raise ValueError(f"task={task!r}: din predicts click probabilities (task='binary')")
        if str(device) != "cpu" or gpus:
            warnings.warn("din runs on the CPU; device and gpus are ignored", stacklevel=2)
        if init_std is not None:
            warnings.warn("din initialises its weights its own way; init_std is ignored", stacklevel=2)
        if pooling not in ("attention", "sum"):
            raise ValueError(f"pooling must be 'attention' or 'sum', got {pooling!r}")
        for name, v in (("l2_reg_dnn", l2_reg_dnn), ("l2_reg_embedding", l2_reg_embedding)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        if not (isinstance(dnn_dropout, (int, float)) and 0 <= dnn_dropout < 1):
            raise ValueError(f"dnn_dropout must be in [0, 1), got {dnn_dropout!r}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 0):
            raise ValueError(f"threads must be a non-negative integer, got {threads!r}")
        self.feature_columns = list(dnn_feature_columns)
        self.history_feature_list = [history_feature_list] if isinstance(history_feature_list, str) else list(history_feature_list)
        histories = None if behavior_seq_feature_list is None else list(behavior_seq_feature_list)
        self._features = [_feature(fc) for fc in self.feature_columns]
        schema = _schema(self._features, self.history_feature_list, histories, user_column)
        regularization: Dict[str, Any] = {}
        if mini_batch_aware or l2_reg_embedding or l2_reg_dnn:
            regularization = {
                "kind": "mini_batch_aware" if mini_batch_aware else "l2",
                "lambda": float(l2_reg_embedding),
            }
            if l2_reg_dnn or mini_batch_aware:
                regularization["dnn_lambda"] = float(l2_reg_dnn)
        config = {
            "input": {"header": True},
            "schema": schema,
            "model": {
                "attention": {
                    "pooling": pooling,
                    "hidden_units": _units(att_hidden_size, "att_hidden_size", False),
                    "activation": _activation(att_activation, "att_activation"),
                    "normalization": "softmax" if att_weight_normalization else "none",
                },
                "dnn": {
                    "hidden_units": _units(dnn_hidden_units, "dnn_hidden_units", True),
                    "activation": _activation(dnn_activation, "dnn_activation"),
                    "dropout": float(dnn_dropout),
                },
            },
            "train": {"seed": int(seed), "keep": "last"},
        }
        if regularization:
            config["train"]["regularization"] = regularization
        self._threads = threads
        self._core = _din.Core(json.dumps(config))
        self._after_core()

    # -- construction from a loaded model ----------------------------------

    @classmethod
    def _from_core(cls, core: Any) -> "DIN":
        self = cls.__new__(cls)
        self._core = core
        self._threads = None
        config = json.loads(core.config_json())
        schema = config["schema"]
        tables: Dict[str, Tuple[int, int, str]] = {}
        for entry in schema.get("sparse", []) + schema.get("sequence", []):
            if "shares_embedding_with" not in entry or entry["shares_embedding_with"] is None:
                dim = entry.get("embedding_dim") or schema.get("embedding_dim") or 8
                tables[entry["name"]] = (entry.get("vocab_size"), dim, entry.get("oov", "error"))
        columns: List[Any] = []

        def table_of(entry: Dict[str, Any]) -> Tuple[str, Tuple[int, int, str]]:
            owner = entry.get("shares_embedding_with") or entry["name"]
            return owner, tables[owner]

        for entry in schema.get("sparse", []):
            owner, (vocab, dim, oov) = table_of(entry)
            columns.append(SparseFeat(entry["name"], vocab, dim, embedding_name=owner, oov=oov))
        for entry in schema.get("dense", []):
            columns.append(DenseFeat(entry["name"], entry.get("dim", 1)))
        for entry in schema.get("sequence", []):
            owner, (vocab, dim, _) = table_of(entry)
            columns.append(
                VarLenSparseFeat(
                    SparseFeat(entry["name"], vocab, dim, embedding_name=owner),
                    maxlen=entry.get("max_len", 50),
                    order=entry.get("order", "oldest_first"),
                    truncation=entry.get("truncation", "keep_recent"),
                )
            )
        self.feature_columns = columns
        self.history_feature_list = [p["target"] for p in schema["din_pairs"]]
        self._features = [_feature(fc) for fc in columns]
        self._after_core()
        train = config.get("train", {})
        self.compile(train.get("optimizer", "adam"), "binary_crossentropy")
        self._learning_rate = float(train.get("learning_rate", self._learning_rate))
        return self

    def _after_core(self) -> None:
        config = json.loads(self._core.config_json())
        self._config: Dict[str, Any] = config
        self._label = config["schema"]["label"]
        self._user = config["schema"].get("user")
        self._pairs = [(p["target"], p["history"]) for p in config["schema"]["din_pairs"]]
        self._sequences = {s["name"]: s for s in config["schema"].get("sequence", [])}
        self._compiled = False
        self._optimizer = "adam"
        self._learning_rate = 0.001
        self._metrics: List[str] = []
        self._training_precision = "fp32"
        self.stop_training = False
        self.history: Optional[History] = None

    # -- Keras' methods ---------------------------------------------------

    def compile(
        self,
        optimizer: Any = "adam",
        loss: Any = "binary_crossentropy",
        metrics: Optional[Sequence[Any]] = None,
        *,
        training_precision: str = "fp32",
    ) -> None:
        """Sets the optimizer (``"adam"``, ``"adagrad"``, ``"sgd"`` or an
        object of :mod:`din.optimizers`, or Keras'/PyTorch's by class name),
        the loss (binary cross-entropy) and the metrics to report:
        ``"binary_crossentropy"`` (or ``"logloss"``), ``"auc"`` and ``"gauc"``
        (GAUC needs ``user_column``). A new compile starts the optimizer's
        state afresh.

        ``training_precision`` (``train.precision``): ``"fp32"``, or
        ``"bf16"`` for mixed precision (the hidden layers' products in bf16
        with f32 sums, weights and optimizer state f32; on AMX or
        AVX512-BF16 CPUs through their instructions, emulated and slower
        elsewhere), or ``"auto"`` (bf16 only where its kernel is faster than
        fp32, as :meth:`set_precision`'s ``"auto"``). Scoring has its
        own precision, :meth:`set_precision`."""
        if training_precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"training_precision must be 'fp32', 'bf16' or 'auto', got {training_precision!r}")
        kind, lr = _optimizers.resolve(optimizer)
        loss_name = loss if isinstance(loss, str) else getattr(loss, "name", type(loss).__name__)
        if str(loss_name).lower().replace("_", "") not in [l.replace("_", "") for l in _LOSSES]:
            raise ValueError(f"loss {loss!r}: din trains with binary cross-entropy ('binary_crossentropy')")
        names: List[str] = []
        for m in metrics or []:
            name = m if isinstance(m, str) else getattr(m, "name", None) or getattr(m, "__name__", repr(m))
            key = str(name).lower()
            if key not in _METRICS:
                raise ValueError(f"metric {name!r}: din reports {sorted(set(_METRICS))}")
            if _METRICS[key] == "gauc" and self._user is None:
                raise ValueError("metric 'gauc' needs the user: build the model with DIN(..., user_column='user_id')")
            names.append(key)
        self._optimizer, self._learning_rate, self._metrics = kind, lr, names
        self._training_precision = training_precision
        self._compiled = True
        self._core.reset_optimizer()

    def _threads_now(self) -> int:
        return self._threads if self._threads is not None else _threads

    def _wanted(self) -> List[Tuple[str, str, int]]:
        """(name, kind, width) of every input column the model reads."""
        wanted = []
        for f in self._features:
            if f["kind"] == "sparse":
                wanted.append((f["name"], _inputs.SCALAR, 1))
            elif f["kind"] == "dense":
                d = f["dimension"]
                wanted.append((f["name"], _inputs.SCALAR if d == 1 else _inputs.VECTOR, d))
            else:
                wanted.append((f["name"], _inputs.SEQUENCE, 0))
        return wanted

    def _columns(self, x: Any, y: Any, source: str, with_labels: bool) -> List[Tuple[str, Any]]:
        wanted = self._wanted()
        names = {n for n, _, _ in wanted}
        if self._user is not None and self._user not in names:
            _, have = _inputs.columns_of(x, source)
            if self._user in have:
                wanted.append((self._user, _inputs.SCALAR, 1))
            elif with_labels and "gauc" in [_METRICS[m] for m in self._metrics]:
                raise ValueError(f"{source} has no column '{self._user}' (the user_column GAUC needs)")
        columns = _inputs.gather(x, wanted, source)
        if with_labels:
            columns.append((self._label, _inputs.labels(y, "y" if source == "x" else f"{source} labels")))
        return columns

    def _require_compiled(self, what: str) -> None:
        if not self._compiled:
            raise RuntimeError(f"{what}: compile the model first (model.compile('adam', 'binary_crossentropy'))")

    def fit(
        self,
        x: Any = None,
        y: Any = None,
        batch_size: Optional[int] = None,
        epochs: int = 1,
        verbose: int = 1,
        initial_epoch: int = 0,
        validation_split: float = 0.0,
        validation_data: Optional[Tuple[Any, Any]] = None,
        shuffle: bool = True,
        callbacks: Optional[Sequence[Any]] = None,
    ) -> History:
        """Trains for ``epochs - initial_epoch`` epochs, going on from the
        weights and optimizer state of any earlier ``fit``; returns the
        :class:`~din.callbacks.History`.

        ``validation_split`` holds out the last fraction of the rows (as
        Keras, before shuffling); ``validation_data`` is ``(x_val, y_val)``.
        ``callbacks``: :class:`~din.callbacks.EarlyStopping` (carried out by
        din's loop) and any object with Keras' ``on_epoch_*`` /
        ``on_train_*`` methods. The GIL is released while din trains; ctrl-c
        stops between batches with ``KeyboardInterrupt``, leaving the model
        with the weights trained so far."""
        self._require_compiled("fit")
        if batch_size is None:
            batch_size = 256
        for name, v, low in (("batch_size", batch_size, 1), ("epochs", epochs, 0), ("initial_epoch", initial_epoch, 0)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an integer of at least {low}, got {v!r}")
        if verbose not in (0, 1, 2):
            raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")
        if not (isinstance(validation_split, (int, float)) and 0 <= validation_split < 1):
            raise ValueError(f"validation_split must be in [0, 1), got {validation_split!r}")
        history = History()
        history.set_model(self)
        self.history = history
        run_epochs = int(epochs) - int(initial_epoch)
        callbacks = list(callbacks or [])
        stoppers = [c for c in callbacks if isinstance(c, EarlyStopping) or type(c).__name__ == "EarlyStopping"]
        if len(stoppers) > 1:
            raise ValueError("fit: give at most one EarlyStopping")
        others = [c for c in callbacks if c not in stoppers]
        has_validation = validation_data is not None or validation_split > 0
        train: Dict[str, Any] = {
            "optimizer": self._optimizer,
            "learning_rate": self._learning_rate,
            "batch_size": int(batch_size),
            "epochs": max(run_epochs, 1),
            "seed": self._config["train"]["seed"],
            "shuffle": bool(shuffle),
            "threads": self._threads_now(),
            "keep": "last",
        }
        eval_batch = self._config["train"].get("eval_batch_size")
        if eval_batch:
            train["eval_batch_size"] = eval_batch
        if "regularization" in self._config["train"]:
            train["regularization"] = self._config["train"]["regularization"]
        if self._training_precision != "fp32":
            train["precision"] = self._training_precision
        if stoppers:
            es = stoppers[0]
            monitor = getattr(es, "monitor", "val_loss")
            if monitor not in MONITORS:
                raise ValueError(f"EarlyStopping: monitor {monitor!r} is not one din tracks; use one of {sorted(MONITORS)}")
            if not has_validation:
                raise ValueError(f"EarlyStopping on {monitor} needs validation data: give validation_split or validation_data")
            if getattr(es, "min_delta", 0) or getattr(es, "baseline", None) is not None:
                raise ValueError("EarlyStopping: din counts any improvement; min_delta must be 0 and baseline None")
            train["early_stopping"] = {
                "monitor": MONITORS[monitor],
                "patience": max(int(getattr(es, "patience", 0)), 1),
                "restore_best": bool(getattr(es, "restore_best_weights", False)),
            }
            if train["early_stopping"]["restore_best"]:
                train["keep"] = "best"
        config = dict(self._config)
        config["train"] = train
        data: Dict[str, Any] = {}
        validation = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data must be (x_val, y_val)")
            validation = self._columns(validation_data[0], validation_data[1], "validation_data", True)
            # Early stopping wants to know there is validation data; the rows come as arrays.
            data["validation"] = "validation_data"
        elif validation_split > 0:
            data["validation_split"] = float(validation_split)
        config["data"] = data
        columns = self._columns(x, y, "x", True)
        params = {"epochs": int(epochs), "steps": None, "verbose": verbose}
        for c in others:
            if hasattr(c, "set_model"):
                c.set_model(self)
            if hasattr(c, "set_params"):
                c.set_params(params)
        self.stop_training = False
        for c in others:
            if hasattr(c, "on_train_begin"):
                c.on_train_begin({})
        if run_epochs <= 0:
            return history
        progress = _Progress(verbose, int(epochs), int(initial_epoch))
        want_outputs = any(_METRICS[m] in ("auc", "gauc") for m in self._metrics)
        current = [0]

        def on_event(kind: str, payload: str) -> bool:
            p = json.loads(payload)
            if kind == "batch":
                if p["epoch"] != current[0]:
                    current[0] = p["epoch"]
                    for c in others:
                        if hasattr(c, "on_epoch_begin"):
                            c.on_epoch_begin(initial_epoch + p["epoch"] - 1, {})
                progress.batch(p["epoch"], p["done"], p["total"], p["loss"])
                return self.stop_training
            logs = self._logs(p)
            epoch = initial_epoch + p["epoch"] - 1
            history.on_epoch_end(epoch, logs)
            history.timings.append({"seconds": p["seconds"], "samples_per_second": p["samples_per_second"]})
            progress.end(logs, p["seconds"])
            for c in others:
                if hasattr(c, "on_epoch_end"):
                    c.on_epoch_end(epoch, logs)
            return self.stop_training

        try:
            self._core.fit(json.dumps(config), columns, validation, on_event, want_outputs)
        except KeyboardInterrupt:
            if verbose:
                sys.stdout.write("\n")
                sys.stdout.flush()
            raise
        self._config = json.loads(self._core.config_json())
        for c in others:
            if hasattr(c, "on_train_end"):
                c.on_train_end(history.history and {k: v[-1] for k, v in history.history.items()} or {})
        return history

    def _logs(self, p: Dict[str, Any]) -> Dict[str, float]:
        """Keras' logs of one epoch: loss, the metrics, and their val_ versions."""
        nan = float("nan")
        logs: Dict[str, float] = {"loss": p["loss"]}
        train = {"logloss": p["loss"], "auc": p.get("auc"), "gauc": p.get("gauc")}
        for m in self._metrics:
            v = train[_METRICS[m]]
            logs[m] = nan if v is None else float(v)
        val = p.get("validation")
        if val is not None:
            values = {"logloss": val["logloss"], "auc": val.get("auc"), "gauc": val.get("gauc")}
            logs["val_loss"] = float(val["logloss"])
            for m in self._metrics:
                v = values[_METRICS[m]]
                logs[f"val_{m}"] = nan if v is None else float(v)
        return logs

    def predict(
        self, x: Any, batch_size: int = 256, verbose: int = 0, *, return_attention: bool = False
    ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """Click probabilities, shape ``(N, 1)`` float32.

        With ``return_attention=True``, also the attention weight of every
        behaviour of the first attended history (the paper's Fig. 5): for a
        padded 2-D history array, an array of its shape with each weight at
        its behaviour's position (0 at padding and at behaviours truncated
        away); otherwise ``(N, maxlen)`` with each sample's kept behaviours
        from the left, in input order."""
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        columns = self._columns(x, None, "x", False)
        probs, attention = self._core.predict(columns, int(batch_size), self._threads_now(), bool(return_attention))
        p = np.frombuffer(probs, dtype=np.float32).reshape(-1, 1)
        if not return_attention:
            return p
        weights_b, counts_b = attention
        weights = np.frombuffer(weights_b, dtype=np.float32)
        counts = np.frombuffer(counts_b, dtype=np.uint32).astype(np.int64)
        history = self._pairs[0][1]
        raw = dict(columns)[history]
        return p, self._place_attention(raw, weights, counts, self._sequences[history])

    @staticmethod
    def _place_attention(raw: Any, weights: np.ndarray, counts: np.ndarray, seq: Dict[str, Any]) -> np.ndarray:
        starts = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        if isinstance(raw, np.ndarray) and raw.ndim == 2 and raw.shape[0] == len(counts):
            present = raw != 0
            rank = np.cumsum(present, axis=1) - 1
            total = present.sum(axis=1)
            keep_front = (seq.get("order", "oldest_first"), seq.get("truncation", "keep_recent")) in (
                ("recent_first", "keep_recent"),
                ("oldest_first", "keep_oldest"),
            )
            first = np.zeros_like(total) if keep_front else total - counts
            index = rank - first[:, None]
            chosen = present & (index >= 0) & (index < counts[:, None])
            out = np.zeros(raw.shape, dtype=np.float32)
            out[chosen] = weights[(starts[:-1][:, None] + index)[chosen]]
            return out
        width = int(max(seq.get("max_len", 0), counts.max(initial=0)))
        out = np.zeros((len(counts), width), dtype=np.float32)
        cols = np.arange(width)
        chosen = cols[None, :] < counts[:, None]
        out[chosen] = weights[(starts[:-1][:, None] + cols[None, :])[chosen]]
        return out

    def evaluate(
        self,
        x: Any = None,
        y: Any = None,
        batch_size: int = 256,
        verbose: int = 0,
        return_dict: bool = False,
    ) -> Union[float, List[float], Dict[str, float]]:
        """The loss (binary cross-entropy) and the compiled metrics on
        ``(x, y)``: a float without metrics, else ``[loss, *metrics]`` (or a
        dict with ``return_dict``), as Keras."""
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        columns = self._columns(x, y, "x", True)
        m = json.loads(self._core.evaluate(columns, int(batch_size), self._threads_now()))
        values = {"logloss": m["logloss"], "auc": m.get("auc"), "gauc": m.get("gauc")}
        out: Dict[str, float] = {"loss": float(m["logloss"])}
        for name in self._metrics:
            v = values[_METRICS[name]]
            out[name] = float("nan") if v is None else float(v)
        if return_dict:
            return out
        if not self._metrics:
            return out["loss"]
        return list(out.values())

    def set_precision(self, precision: str) -> str:
        """Scores in ``precision`` from now on: ``"fp32"`` (the default),
        ``"bf16"`` (the hidden layers of the attention unit, after the first,
        and of the DNN with bf16 weights and activations and f32 sums; on AMX
        the first attention layer too, on split operands that keep about 16
        bits; on a CPU without AVX512-BF16 emulated: the same bf16
        arithmetic, no faster) or ``"auto"`` (bf16 where the CPU's kernel
        is faster than fp32: on AMX; on AVX512-BF16 only where ``vdpbf16ps``
        measures at least 1.5x FP32's FLOP/s; the returned line says why).
        Training stays f32 (see ``compile(training_precision=...)``); a save
        keeps the precision (``model.precision``), as ``din predict`` and
        ``din serve`` read it. Returns what runs it on this CPU."""
        if not isinstance(precision, str):
            raise TypeError(f"precision must be a string (fp32, bf16 or auto), got {type(precision).__name__}")
        kernel = self._core.set_precision(precision)
        self._config = json.loads(self._core.config_json())
        return kernel

    def save(self, filepath: Any) -> None:
        """Writes din's model directory (``config.json``, ``model.safetensors``,
        ``history.json``), which ``din evaluate``, ``din predict``, ``din
        serve`` and :func:`load_model` read. A save replaces an earlier one
        atomically."""
        self._core.save(str(filepath))

    @property
    def config(self) -> Dict[str, Any]:
        """The config ``din train`` would read for this model (JSON-like)."""
        return json.loads(self._core.config_json())

    def count_params(self) -> int:
        """Number of weights (Dice's running statistics not counted)."""
        return sum(int(np.prod(shape)) for name, shape in self._core.parameters() if "running" not in name)

    def summary(self, print_fn: Any = None) -> None:
        """Prints every tensor with its shape, and the total."""
        show = print_fn or print
        rows = self._core.parameters()
        width = max([len(n) for n, _ in rows] + [10])
        show(f'Model: "DIN"')
        show("_" * (width + 40))
        show(f"{'Tensor':<{width}}  {'Shape':<24}  Param #")
        show("=" * (width + 40))
        for name, shape in rows:
            show(f"{name:<{width}}  {str(tuple(shape)):<24}  {int(np.prod(shape)):,}")
        show("=" * (width + 40))
        show(f"Total params: {self.count_params():,}")

    def __repr__(self) -> str:
        pairs = ", ".join(f"{t}<-{h}" for t, h in self._pairs)
        return f"<din.DIN {len(self.feature_columns)} features, attends {pairs}>"


def load_model(filepath: Any, compile: bool = True, precision: Optional[str] = None) -> DIN:
    """Loads a model directory written by :meth:`DIN.save` or ``din train``;
    compiled with the optimizer and learning rate it was trained with. It
    scores in its ``model.precision`` unless ``precision`` is given (see
    :meth:`DIN.set_precision`)."""
    model = DIN._from_core(_din.Core.load(str(filepath)))
    if precision is not None:
        model.set_precision(precision)
    if not compile:
        model._compiled = False
    return model
