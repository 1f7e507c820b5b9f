"""din: the Deep Interest Network (Zhou et al., KDD 2018) on a Rust core,
with DeepCTR's feature columns and Keras' model methods.

>>> import din
>>> columns = [din.SparseFeat("user_id", 4, 8), din.SparseFeat("movie_id", 209, 8),
...            din.VarLenSparseFeat(din.SparseFeat("hist_movie_id", 209, 8, embedding_name="movie_id"), maxlen=50)]
>>> model = din.DIN(columns, ["movie_id"])
>>> model.compile("adam", "binary_crossentropy", metrics=["binary_crossentropy", "auc"])
>>> history = model.fit(x, y, batch_size=64, epochs=10, validation_split=0.3)  # doctest: +SKIP

A model saved with ``model.save(dir)`` is din's model directory: ``din
serve``, ``din evaluate`` and ``din predict`` read it, and
``din.load_model(dir)`` reads what ``din train`` wrote.
"""

from . import callbacks, feature_column, optimizers
from ._din import version as _version
from .callbacks import Callback, EarlyStopping, History
from .feature_column import DenseFeat, SparseFeat, VarLenSparseFeat, get_feature_names
from .models import DIN, get_num_threads, load_model, set_num_threads

__version__ = _version()

__all__ = [
    "DIN",
    "SparseFeat",
    "DenseFeat",
    "VarLenSparseFeat",
    "get_feature_names",
    "EarlyStopping",
    "History",
    "Callback",
    "load_model",
    "set_num_threads",
    "get_num_threads",
    "callbacks",
    "feature_column",
    "optimizers",
]
