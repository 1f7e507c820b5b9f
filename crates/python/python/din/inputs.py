"""DeepCTR-Torch's module name for the feature columns (``deepctr_torch.inputs``)."""

from .feature_column import DenseFeat, SparseFeat, VarLenSparseFeat, get_feature_names

__all__ = ["SparseFeat", "DenseFeat", "VarLenSparseFeat", "get_feature_names"]
