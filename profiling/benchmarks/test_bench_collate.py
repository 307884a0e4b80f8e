"""Reward-model batch preparation: stock Qwen2.5-VL processor vs the tensor path (same output, tested)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from spatialcore.reward.preprocess import chat_text, encode_judgements


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from transformers import AutoProcessor

    from spatialcore.tiny import TinyConfig, build_tiny

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    build_tiny(TinyConfig(), out)
    return AutoProcessor.from_pretrained(out / "reward")


@pytest.mark.parametrize("impl", ["stock_processor", "tensor_path"])
def test_collate_32_judgements(benchmark, processor, impl):
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 255, (56, 56, 3)).astype(np.uint8)) for _ in range(32)]
    texts = [chat_text(processor, "the red circle is to the left of the blue square.")] * 32
    tensor = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).float() / 255
    benchmark.group = "collate 32 judgements, 56 px"
    fns = {"stock_processor": lambda: processor(text=texts, images=images, return_tensors="pt", padding=True),
           "tensor_path": lambda: encode_judgements(processor, texts, tensor)}
    benchmark(fns[impl])
