"""Feature columns with DeepCTR's names, fields and defaults.

``SparseFeat``, ``DenseFeat`` and ``VarLenSparseFeat`` are namedtuples as in
DeepCTR (``deepctr.feature_column``) and DeepCTR-Torch (``deepctr_torch.inputs``),
so code written for either runs with ``from din.feature_column import ...``.
DeepCTR's own objects are accepted by :class:`din.DIN` as well, as are the
three-namedtuple variant of the DIN tutorial (``VarLenSparseFeat(name,
vocabulary_size, embedding_dim, maxlen)``).

din's extras are keyword-only: ``oov`` on ``SparseFeat``, and ``order`` and
``truncation`` on ``VarLenSparseFeat`` (which end of a history is the most
recent, and which end to keep when it is longer than ``maxlen``).
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any, Iterable, List, Optional, Union

__all__ = ["SparseFeat", "DenseFeat", "VarLenSparseFeat", "get_feature_names", "DEFAULT_GROUP_NAME"]

DEFAULT_GROUP_NAME = "default_group"

_ORDERS = ("oldest_first", "recent_first")
_TRUNCATIONS = ("keep_recent", "keep_oldest")


class SparseFeat(
    namedtuple(
        "SparseFeat",
        [
            "name",
            "vocabulary_size",
            "embedding_dim",
            "use_hash",
            "vocabulary_path",
            "dtype",
            "embeddings_initializer",
            "embedding_name",
            "group_name",
            "trainable",
            "oov",
        ],
    )
):
    """A categorical feature with one id per sample, in ``[0, vocabulary_size)``.

    ``embedding_dim="auto"`` is ``6 * int(vocabulary_size ** 0.25)``, as in
    DeepCTR. Features with the same ``embedding_name`` share one embedding
    table. ``oov="reserved"`` (din's) maps ids at or above ``vocabulary_size``
    to one extra row instead of refusing them.
    """

    __slots__ = ()

    def __new__(
        cls,
        name: str,
        vocabulary_size: int,
        embedding_dim: Union[int, str] = 4,
        use_hash: bool = False,
        vocabulary_path: Optional[str] = None,
        dtype: str = "int32",
        embeddings_initializer: Any = None,
        embedding_name: Optional[str] = None,
        group_name: str = DEFAULT_GROUP_NAME,
        trainable: bool = True,
        *,
        oov: str = "error",
    ) -> "SparseFeat":
        if embedding_dim == "auto":
            embedding_dim = 6 * int(pow(vocabulary_size, 0.25))
        if embedding_name is None:
            embedding_name = name
        if oov not in ("error", "reserved"):
            raise ValueError(f"SparseFeat('{name}'): oov must be 'error' or 'reserved', got {oov!r}")
        return super().__new__(
            cls,
            name,
            vocabulary_size,
            embedding_dim,
            use_hash,
            vocabulary_path,
            dtype,
            embeddings_initializer,
            embedding_name,
            group_name,
            trainable,
            oov,
        )

    def __hash__(self) -> int:
        return self.name.__hash__()


class DenseFeat(namedtuple("DenseFeat", ["name", "dimension", "dtype", "transform_fn"])):
    """A numeric feature of ``dimension`` values per sample."""

    __slots__ = ()

    def __new__(
        cls, name: str, dimension: int = 1, dtype: str = "float32", transform_fn: Any = None
    ) -> "DenseFeat":
        return super().__new__(cls, name, dimension, dtype, transform_fn)

    def __hash__(self) -> int:
        return self.name.__hash__()


class VarLenSparseFeat(
    namedtuple(
        "VarLenSparseFeat",
        ["sparsefeat", "maxlen", "combiner", "length_name", "weight_name", "weight_norm", "order", "truncation"],
    )
):
    """A sequence of ids per sample (a behaviour history), 0 being padding.

    DeepCTR's form wraps a :class:`SparseFeat`:
    ``VarLenSparseFeat(SparseFeat("hist_item_id", 100, 8, embedding_name="item_id"), maxlen=50)``;
    the DIN tutorial's form names the fields directly:
    ``VarLenSparseFeat("hist_movie_id", vocabulary_size=209, embedding_dim=8, maxlen=50)``.

    ``order`` says which end of a history is the most recent
    (``"oldest_first"``, din's default, or ``"recent_first"``) and
    ``truncation`` which behaviours a history longer than ``maxlen`` keeps
    (``"keep_recent"`` or ``"keep_oldest"``). ``combiner`` pools a history
    that is not attended (not paired with a target): din pools those by
    ``"mean"`` only.
    """

    __slots__ = ()

    def __new__(
        cls,
        sparsefeat: Union[SparseFeat, str, Any],
        maxlen: Optional[int] = None,
        combiner: str = "mean",
        length_name: Optional[str] = None,
        weight_name: Optional[str] = None,
        weight_norm: bool = True,
        *,
        order: str = "oldest_first",
        truncation: str = "keep_recent",
        vocabulary_size: Optional[int] = None,
        embedding_dim: Union[int, str] = 4,
        embedding_name: Optional[str] = None,
        dtype: str = "int32",
    ) -> "VarLenSparseFeat":
        if isinstance(sparsefeat, str):
            if vocabulary_size is None:
                raise TypeError(f"VarLenSparseFeat('{sparsefeat}'): give vocabulary_size (or a SparseFeat)")
            sparsefeat = SparseFeat(
                sparsefeat, vocabulary_size, embedding_dim, embedding_name=embedding_name, dtype=dtype
            )
        if maxlen is None:
            raise TypeError(f"VarLenSparseFeat('{sparsefeat.name}'): give maxlen")
        if order not in _ORDERS:
            raise ValueError(f"VarLenSparseFeat('{sparsefeat.name}'): order must be one of {_ORDERS}, got {order!r}")
        if truncation not in _TRUNCATIONS:
            raise ValueError(
                f"VarLenSparseFeat('{sparsefeat.name}'): truncation must be one of {_TRUNCATIONS}, got {truncation!r}"
            )
        return super().__new__(cls, sparsefeat, maxlen, combiner, length_name, weight_name, weight_norm, order, truncation)

    @property
    def name(self) -> str:
        return self.sparsefeat.name

    @property
    def vocabulary_size(self) -> int:
        return self.sparsefeat.vocabulary_size

    @property
    def embedding_dim(self) -> int:
        return self.sparsefeat.embedding_dim

    @property
    def use_hash(self) -> bool:
        return self.sparsefeat.use_hash

    @property
    def dtype(self) -> str:
        return self.sparsefeat.dtype

    @property
    def embedding_name(self) -> str:
        return self.sparsefeat.embedding_name

    @property
    def group_name(self) -> str:
        return self.sparsefeat.group_name

    @property
    def trainable(self) -> bool:
        return getattr(self.sparsefeat, "trainable", True)

    def __hash__(self) -> int:
        return self.name.__hash__()


def get_feature_names(feature_columns: Iterable[Any]) -> List[str]:
    """The input names the columns read (with each sequence's ``length_name``), as DeepCTR's."""
    names: List[str] = []
    for fc in feature_columns:
        names.append(fc.name)
        length = getattr(fc, "length_name", None)
        if length is not None and length not in names:
            names.append(length)
    return names
