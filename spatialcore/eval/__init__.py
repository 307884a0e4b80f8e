"""Evaluating generators: detectors, GenEval's position rule, the `spatialcore eval` report."""
