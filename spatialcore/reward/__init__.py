"""SpatialScore reward model (``spatialcore.reward``)."""

from .model import LoraSpec, SpatialScore, last_token_index
from .preprocess import preprocess_images

__all__ = ["LoraSpec", "SpatialScore", "last_token_index", "preprocess_images"]
