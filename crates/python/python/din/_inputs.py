"""Inputs as Python users have them, handed to the compiled core column by column.

``x`` is a dict of arrays (DeepCTR's form: one entry per feature, histories
as padded ``[N, maxlen]`` integer arrays, 0 = padding), a pandas DataFrame, or
a pyarrow Table or RecordBatch. Each column the model reads goes to the core
as a numpy array (without a copy when it is already C-contiguous and of a
numeric dtype), a pyarrow array (moved through the Arrow C data interface), a
list of strings, or ``("ragged", values, offsets)`` for lists of different
lengths. The core checks values (ids, NaN, labels) and names the feature and
row of any bad one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, List, Sequence, Tuple

import numpy as np

Column = Tuple[str, Any]

# What each kind of feature holds per sample.
SCALAR, VECTOR, SEQUENCE = "scalar", "vector", "sequence"


def _type_name(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__


def _is_pandas_frame(x: Any) -> bool:
    return type(x).__name__ == "DataFrame" and hasattr(x, "columns") and hasattr(x, "iloc")


def _is_arrow_table(x: Any) -> bool:
    return type(x).__name__ in ("Table", "RecordBatch") and hasattr(x, "column_names") and hasattr(x, "schema")


def columns_of(x: Any, source: str) -> Tuple[Any, List[str]]:
    """A getter for ``x``'s columns by name, and the names it has."""
    if _is_arrow_table(x):
        return (lambda name: x.column(name)), list(x.column_names)
    if _is_pandas_frame(x):
        return (lambda name: x[name]), [str(c) for c in x.columns]
    if isinstance(x, Mapping):
        return (lambda name: x[name]), [str(k) for k in x.keys()]
    raise TypeError(
        f"{source} must be a dict of arrays (feature name -> array), a pandas DataFrame or a pyarrow Table; "
        f"got {_type_name(x)}"
    )


def gather(x: Any, wanted: Sequence[Tuple[str, str, int]], source: str) -> List[Column]:
    """The columns ``wanted`` (name, kind, width) of ``x``, converted."""
    get, names = columns_of(x, source)
    missing = [name for name, _, _ in wanted if name not in names]
    if missing:
        have = ", ".join(repr(n) for n in names[:20]) + (" ..." if len(names) > 20 else "")
        raise ValueError(
            f"{source} has no {'column' if len(missing) == 1 else 'columns'} "
            f"{', '.join(repr(m) for m in missing)} (needed by the model's feature columns); it has {have}"
        )
    return [(name, convert(get(name), f"{source}['{name}']", kind, width)) for name, kind, width in wanted]


def labels(y: Any, source: str) -> Any:
    """``y`` (one 0/1 label per sample) as a column."""
    if y is None:
        raise ValueError(f"{source}: labels are needed (y), one 0 or 1 per sample")
    return convert(y, source, SCALAR, 1)


def _pyarrow_column(value: Any, what: str) -> Any:
    """A pyarrow ChunkedArray or Array as one Array."""
    if hasattr(value, "combine_chunks"):
        value = value.combine_chunks()
    if not hasattr(value, "__arrow_c_array__"):
        raise TypeError(f"{what}: this pyarrow version cannot export arrays (pyarrow 14 or later is needed)")
    return value


def _from_objects(arr: np.ndarray, what: str, kind: str) -> Any:
    """A 1-D object array: strings, lists (ragged), or Python numbers."""
    items = arr.tolist()
    if all(isinstance(v, str) for v in items):
        return items
    if kind != SCALAR and all(isinstance(v, (list, tuple, np.ndarray)) for v in items):
        lengths = np.fromiter((len(v) for v in items), dtype=np.int64, count=len(items))
        offsets = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if offsets[-1] == 0:
            values = np.zeros(0, dtype=np.int64)
        else:
            parts = [np.asarray(v).ravel() for v in items if len(v)]
            values = np.ascontiguousarray(np.concatenate(parts))
            if values.dtype == object:
                raise TypeError(f"{what}: its lists hold values that are not numbers")
        return ("ragged", _numeric(values, what), offsets)
    try:
        return _numeric(np.asarray(items), what)
    except (TypeError, ValueError):
        raise TypeError(f"{what}: holds values of type {_type_name(items[0]) if items else '?'}; expected numbers") from None


def _numeric(arr: np.ndarray, what: str) -> np.ndarray:
    """``arr`` as a C-contiguous array of a dtype the core reads."""
    kind = arr.dtype.kind
    if kind in "iub":
        return np.ascontiguousarray(arr)
    if kind == "f":
        return np.ascontiguousarray(arr if arr.dtype.itemsize >= 4 else arr.astype(np.float32))
    raise TypeError(f"{what} has dtype {arr.dtype}; expected integers (ids), floats (dense values) or booleans")


def convert(value: Any, what: str, kind: str, width: int) -> Any:
    """One column's values in a form the core reads, with its shape checked.

    ``kind``: ``SCALAR`` (one value a sample: a sparse id, a label, a dense
    value of dimension 1), ``VECTOR`` (``width`` values a sample) or
    ``SEQUENCE`` (a history).
    """
    if type(value).__module__.startswith("pyarrow"):
        return _pyarrow_column(value, what)
    if hasattr(value, "to_numpy") and type(value).__name__ == "Series":
        value = value.to_numpy()
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    arr = np.asarray(value)
    if arr.dtype.kind in "OUS":
        if arr.ndim != 1:
            raise ValueError(f"{what} has shape {arr.shape} and dtype {arr.dtype}: text or lists go one per sample, 1-D")
        return _from_objects(arr.astype(object) if arr.dtype.kind in "US" else arr, what, kind)
    if arr.ndim == 0:
        raise ValueError(f"{what} is a single value; give one per sample (a 1-D array)")
    n = arr.shape[0]
    if kind == SEQUENCE:
        if arr.ndim != 2:
            raise ValueError(
                f"{what} has shape {arr.shape}; a VarLenSparseFeat takes a padded 2-D array of ids, one row per "
                f"sample ({n}, maxlen), 0 being padding"
            )
    elif kind == VECTOR:
        if arr.shape[1:] != (width,):
            raise ValueError(f"{what} has shape {arr.shape}; a DenseFeat of dimension {width} takes shape ({n}, {width})")
    else:
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr.reshape(n)
        if arr.ndim != 1:
            raise ValueError(f"{what} has shape {arr.shape}; it takes one value per sample: shape ({n},) or ({n}, 1)")
    return _numeric(arr, what)
