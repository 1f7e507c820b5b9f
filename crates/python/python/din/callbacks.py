"""Keras-style callbacks: ``EarlyStopping``, ``History`` and a ``Callback`` base.

``EarlyStopping`` is carried out by din's training loop itself (the same one
``din train`` runs with ``train.early_stopping``); other callbacks are called
on the Python side after each epoch, with Keras' ``logs`` dict.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

__all__ = ["Callback", "EarlyStopping", "History"]

# Keras' monitor names and din's.
MONITORS = {
    "val_loss": "val_logloss",
    "val_binary_crossentropy": "val_logloss",
    "val_logloss": "val_logloss",
    "val_auc": "val_auc",
    "val_gauc": "val_gauc",
}


class Callback:
    """Base class of callbacks: override any of the ``on_*`` methods.

    ``self.model`` is the model being trained; setting
    ``self.model.stop_training = True`` ends training after the epoch.
    Batch-level hooks are not called (training runs in Rust, without the GIL).
    """

    def __init__(self) -> None:
        self.model: Any = None
        self.params: Dict[str, Any] = {}

    def set_model(self, model: Any) -> None:
        self.model = model

    def set_params(self, params: Dict[str, Any]) -> None:
        self.params = params

    def on_train_begin(self, logs: Optional[Dict[str, float]] = None) -> None:
        pass

    def on_train_end(self, logs: Optional[Dict[str, float]] = None) -> None:
        pass

    def on_epoch_begin(self, epoch: int, logs: Optional[Dict[str, float]] = None) -> None:
        pass

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, float]] = None) -> None:
        pass


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved for ``patience`` epochs.

    ``monitor``: ``"val_loss"`` (or ``"val_binary_crossentropy"``),
    ``"val_auc"`` or ``"val_gauc"``; validation data is needed. With
    ``restore_best_weights=True`` the model ends with the best epoch's
    weights, else with the last epoch's (as Keras). ``min_delta`` must be 0
    and ``baseline`` None (din counts any improvement); ``mode`` is implied by
    the metric (``"auto"``, or the right one of ``"min"``/``"max"``).
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0.0,
        patience: int = 0,
        verbose: int = 0,
        mode: str = "auto",
        baseline: Optional[float] = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
    ) -> None:
        super().__init__()
        if monitor not in MONITORS:
            raise ValueError(
                f"EarlyStopping: monitor {monitor!r} is not one din tracks; use one of {sorted(MONITORS)}"
            )
        if min_delta != 0:
            raise ValueError("EarlyStopping: din counts any improvement; min_delta must be 0")
        if baseline is not None:
            raise ValueError("EarlyStopping: baseline is not supported (leave it None)")
        if start_from_epoch != 0:
            raise ValueError("EarlyStopping: start_from_epoch is not supported (leave it 0)")
        want = "min" if MONITORS[monitor] == "val_logloss" else "max"
        if mode not in ("auto", want):
            raise ValueError(f"EarlyStopping: {monitor} improves when it goes {'down' if want == 'min' else 'up'}; mode must be 'auto' or {want!r}")
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(f"EarlyStopping: patience must be a non-negative integer, got {patience!r}")
        self.monitor = monitor
        self.min_delta = min_delta
        self.patience = patience
        self.verbose = verbose
        self.mode = mode
        self.baseline = baseline
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        self.stopped_epoch = 0
        self.best_epoch = 0


class History(Callback):
    """What ``fit`` returns: ``history`` maps each logged name (``loss``,
    ``val_loss``, ``auc``, ...) to its value per epoch; ``epoch`` lists the
    epochs (0-based, as Keras); ``timings`` (din's) has each epoch's
    ``seconds`` (training and validation) and training ``samples_per_second``,
    as ``din train`` reports them."""

    def __init__(self) -> None:
        super().__init__()
        self.history: Dict[str, List[float]] = {}
        self.epoch: List[int] = []
        self.timings: List[Dict[str, float]] = []

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, float]] = None) -> None:
        self.epoch.append(epoch)
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(v)
