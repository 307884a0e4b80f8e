"""Measurement: benchmarks and profiles (installed as ``spatialcore.profiling``)."""
