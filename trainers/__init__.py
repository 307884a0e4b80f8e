"""Training loops (installed as ``spatialcore.trainers``)."""
