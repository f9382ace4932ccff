"""Graph passes over the IR. Each is ``apply(model) -> (model, changed)`` plus a record of what it did."""

from .bn_fold import fold_batchnorm_into_steps
from .pack_weights import PackedWeight, pack_binary_weights

__all__ = ["fold_batchnorm_into_steps", "pack_binary_weights", "PackedWeight"]
