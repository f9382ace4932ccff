"""Graph passes over the IR, one contract for all (see ``base``): ``SomePass()(model) -> PassReport``."""

from .base import PassReport, apply_rules
from .bn_fold import FoldBatchNormIntoSteps
from .pack_weights import PackBinaryWeights, PackedWeight, PackIntegerWeights
from .plain_steps import RecognisePlainSteps

__all__ = ["PassReport", "apply_rules", "FoldBatchNormIntoSteps", "PackBinaryWeights", "PackedWeight", "PackIntegerWeights",
           "RecognisePlainSteps"]
