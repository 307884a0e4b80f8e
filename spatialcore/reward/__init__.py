"""SpatialScore reward model (``spatialcore.reward``)."""

from .model import LoraSpec, SpatialScore, last_token_index, read_meta
from .preprocess import preprocess_images

__all__ = ["LoraSpec", "SpatialScore", "last_token_index", "preprocess_images", "read_meta"]
