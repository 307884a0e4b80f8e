"""The benchmark baselines compute the same advantages as the kernels (else the ratios lie)."""

import json

import torch

from spatialcore.kernels import ADVANTAGE_PRESETS, group_advantages
from spatialcore.profiling.baselines import trl_style, verl_style
from spatialcore.profiling.kernel_report import evaluate
from spatialcore.profiling.timing import time_op


def test_trl_and_verl_style_match_spatial_rl_preset():
    P, G, K = 9, 24, 6
    r = torch.randn(P, G)
    ref = group_advantages(r, top_k=K, **ADVANTAGE_PRESETS["spatial_rl"], backend="torch")
    a, keep = trl_style(r, G, top_k=K)
    torch.testing.assert_close(a, ref.advantages.reshape(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(keep, ref.keep.reshape(-1))
    a, keep, n = verl_style(r, torch.arange(P).repeat_interleave(G), top_k=K)
    torch.testing.assert_close(a, ref.advantages.reshape(-1), rtol=1e-5, atol=1e-5)
    assert n == P * 2 * K


def test_time_op_cpu_and_report_verdicts(tmp_path):
    t = time_op(lambda: torch.ones(8).sum(), reps=3, inner=2)
    assert t.median_us > 0 and t.p10_us <= t.p90_us and not t.graphed
    data = {"device": "x", "torch": "y", "results": [
        {"group": "advantages G=24 P=48", "name": "trl_style", "median_us": 100.0},
        {"group": "advantages G=24 P=48", "name": "compiled_reference", "median_us": 30.0},
        {"group": "advantages G=24 P=48", "name": "triton", "median_us": 5.0, "graphed": True},
        {"group": "sde_step (24, 4096, 64) bfloat16", "name": "triton", "median_us": 50.0, "bytes": 1e8},
        {"group": "sde_step (24, 4096, 64) bfloat16", "name": "copy_floor", "median_us": 45.0},
        {"group": "sde_step (24, 4096, 64) bfloat16", "name": "eager_reference", "median_us": 100.0},
    ]}
    rows = {r[0]: r for r in evaluate(data)}
    assert rows["advantages G=24 P=48: >=10x TRL-style"][2] == "met"
    assert rows["advantages G=24 P=48: >=2x compiled ref"][2] == "met"
    assert rows["advantages G=24 P=48: <=10 us/call"][2] == "met"
    assert rows["sde_step (24, 4096, 64) bfloat16: >=80% copy bandwidth"][2] == "met"
    assert rows["sde_step (24, 4096, 64) bfloat16: >=3x eager"][2] == "missed"
    (tmp_path / "b.json").write_text(json.dumps(data))
