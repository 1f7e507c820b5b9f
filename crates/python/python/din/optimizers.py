"""Optimizers for :meth:`din.DIN.compile`: ``Adam``, ``Adagrad`` and ``SGD``.

The names mirror Keras' (and ``"adam"``, ``"adagrad"``, ``"sgd"`` strings work
too). din's Adam uses Keras' defaults (beta1 0.9, beta2 0.999, epsilon 1e-7)
and updates embedding rows lazily: only the rows a batch touches.
"""

from __future__ import annotations

from typing import Any, Tuple

__all__ = ["Optimizer", "Adam", "Adagrad", "SGD", "resolve"]


class Optimizer:
    """An optimizer kind and its learning rate."""

    kind = ""
    default_learning_rate = 0.001

    def __init__(self, learning_rate: float | None = None, **kwargs: Any) -> None:
        lr = kwargs.pop("lr", None)
        if kwargs:
            raise TypeError(f"{type(self).__name__}: din does not take {sorted(kwargs)}")
        if learning_rate is None:
            learning_rate = lr if lr is not None else self.default_learning_rate
        learning_rate = float(learning_rate)
        if not learning_rate > 0 or learning_rate != learning_rate or learning_rate == float("inf"):
            raise ValueError(f"{type(self).__name__}: learning_rate must be a positive number, got {learning_rate}")
        self.learning_rate = learning_rate

    def __repr__(self) -> str:
        return f"{type(self).__name__}(learning_rate={self.learning_rate})"


class Adam(Optimizer):
    """Adam (Keras' defaults; lazy on embedding rows)."""

    kind = "adam"


class Adagrad(Optimizer):
    """Adagrad (initial accumulator 0.1, epsilon 1e-7)."""

    kind = "adagrad"


class SGD(Optimizer):
    """Plain stochastic gradient descent (learning rate 0.01 by default, as Keras)."""

    kind = "sgd"
    default_learning_rate = 0.01


_BY_NAME = {"adam": Adam, "adagrad": Adagrad, "sgd": SGD}


def resolve(optimizer: Any) -> Tuple[str, float]:
    """din's optimizer kind and learning rate for a name, one of these
    classes, or a Keras/PyTorch-style object (by class name, with a
    ``learning_rate`` or ``lr``)."""
    if isinstance(optimizer, str):
        cls = _BY_NAME.get(optimizer.lower())
        if cls is None:
            raise ValueError(f"optimizer {optimizer!r}: din has {sorted(_BY_NAME)}")
        o = cls()
        return o.kind, o.learning_rate
    if isinstance(optimizer, Optimizer):
        return optimizer.kind, optimizer.learning_rate
    name = type(optimizer).__name__.lower()
    if name in _BY_NAME:
        lr = getattr(optimizer, "learning_rate", None)
        if lr is None:
            lr = getattr(optimizer, "lr", None)
        if lr is None and hasattr(optimizer, "param_groups"):
            lr = optimizer.param_groups[0].get("lr")
        try:
            lr = float(lr) if lr is not None else None
        except (TypeError, ValueError):
            lr = None
        o = _BY_NAME[name](learning_rate=lr)
        return o.kind, o.learning_rate
    raise ValueError(f"optimizer {type(optimizer).__name__}: din has Adam, Adagrad and SGD (or their names)")
