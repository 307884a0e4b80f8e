"""One SpatialScore training step on CPU (the tiny model, the hard task at 112 px, 16 pairs): the stock
``Conv3d`` patch embedding against the one-matmul form every SpatialScore uses (same values and gradients,
tests/test_reward.py), and the pairs the step consumes."""

import os

import pytest
import torch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from spatialcore.data.synth import StreamingPairs
    from spatialcore.reward.model import SpatialScore
    from spatialcore.reward.preprocess import PairCollator
    from spatialcore.tiny import TinyConfig, build_tiny
    from spatialcore.trainers.reward import synth_config

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    build_tiny(TinyConfig(), out)
    model = SpatialScore.from_backbone(out / "reward", variance_head=False)
    stream = StreamingPairs(synth_config("stream:hard", {"size": 112, "split_by": "objects"}), 0)
    batch = PairCollator(model.processor)([stream.item(k) for k in range(16)])["inputs"]
    return model, batch, stream


@pytest.mark.parametrize("patch_embed", ["stock_conv3d", "matmul"])
def test_train_step_16_pairs_112px(benchmark, setup, patch_embed):
    from spatialcore.trainers.reward import reward_pair_loss

    model, batch, _ = setup
    (pe,) = [m for m in model.backbone.modules() if type(m).__name__.endswith("VisionPatchEmbed")]
    saved = vars(pe).pop("forward")  # the instance's matmul forward; without it the class's Conv3d runs
    if patch_embed == "matmul":
        pe.forward = saved
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        mu, log_var = model(**batch)
        reward_pair_loss(mu, log_var, "joint").backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    benchmark.group = "SpatialScore training step, tiny model, 16 hard pairs at 112 px"
    benchmark.name = patch_embed
    try:
        benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    finally:
        pe.forward = saved


def test_stream_16_pairs_112px(benchmark, setup):
    """The pairs of one step, rendered on the fly (the synthetic stream a curriculum trains on)."""
    stream = setup[2]
    counter = iter(range(10**9))
    benchmark.group = "synthetic stream, 16 hard pairs at 112 px"
    benchmark.pedantic(lambda: [stream.item(next(counter)) for _ in range(16)], rounds=10, warmup_rounds=1)
