"""spatialcore: a fast training stack for spatially-aware text-to-image alignment.

Packages, lowest layer first (a module imports only from its own layer or below; tests/test_layout.py checks it):
the base modules (config, logs, dist, checkpoint, run folders, ...), ``spatialcore.kernels`` (fused math with
plain references), ``spatialcore.data`` (synthetic scenes, pairs, the pixel oracle), ``spatialcore.reward``
(SpatialScore), ``spatialcore.rl`` (sampler, policy, reward functions), ``spatialcore.eval`` (the judge, held-out
samples, the eval report), ``spatialcore.trainers`` (the loop and its trainers), the commands' modules (demo,
export, sample, tiny, config_reference), ``spatialcore.profiling`` (measurement), ``spatialcore.cli``.
"""

__version__ = "0.1.0"
