"""Synthetic pair generation speed (one process): scene + perturbation + two renders per pair."""

import pytest

from spatialcore.config import from_dict
from spatialcore.data.synth import DIFFICULTIES, SynthConfig, make_pair


@pytest.mark.parametrize("difficulty", ["easy", "hard"])
def test_make_pair_224(benchmark, difficulty):
    cfg = from_dict(SynthConfig, {**DIFFICULTIES[difficulty], "size": 224})
    spec = cfg.spec()
    counter = iter(range(10**9))
    benchmark.group = "synth pairs at 224 px (one process)"
    benchmark.name = difficulty
    benchmark.pedantic(lambda: make_pair(cfg, 0, next(counter), spec), rounds=200, warmup_rounds=5)
    benchmark.extra_info["pairs_per_s"] = 1 / benchmark.stats.stats.median
