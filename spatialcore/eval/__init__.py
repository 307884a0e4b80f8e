"""Judging generators (``spatialcore.eval``): detectors and GenEval's position rule (:mod:`.judge`, also the
judge's verdict as a reward), the held-out samples every generator trainer evaluates (:mod:`.heldout`), and the
``spatialcore eval`` report (:mod:`.report`)."""
