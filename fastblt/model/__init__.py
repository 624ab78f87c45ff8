"""BLT in Flax Linen: ``BLT(model_config)``, its entropy model and building blocks."""

from fastblt.model.blt import BLT, GlobalTransformer, LocalDecoder, LocalEncoder, abstract_params
from fastblt.model.entropy_model import EntropyModel

__all__ = ["BLT", "abstract_params", "EntropyModel", "GlobalTransformer", "LocalDecoder", "LocalEncoder"]
