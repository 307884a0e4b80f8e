"""spatialcore: a fast training stack for spatially-aware text-to-image alignment.

Subpackages: ``spatialcore.kernels`` (fused math with plain references),
``spatialcore.trainers`` (training loops), ``spatialcore.profiling`` (measurement).
"""

__version__ = "0.1.0"
