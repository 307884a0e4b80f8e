"""Fused math with plain PyTorch references (installed as ``spatialcore.kernels``)."""
