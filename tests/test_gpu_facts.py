"""What GPU runs depend on and can be checked without a GPU: the process-wide attention choice for training
on CUDA (PyTorch SDPA without its cuDNN backend, whose backward failed on an H200, docs/PERF.md; a global flag,
settable without a GPU) and the commit a run records."""

import torch

from spatialcore.gpu import sdpa_for_training


def test_training_on_cuda_takes_cudnn_out_of_sdpa():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        assert "cudnn" in sdpa_for_training("cpu")  # the CPU changes nothing
        assert torch.backends.cuda.cudnn_sdp_enabled()
        assert sdpa_for_training(torch.device("cuda", 0)) == "flash, mem_efficient, math"
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_the_recorded_commit_can_be_named(monkeypatch):
    """A copy of the tree whose .git is another (the GPU machine's) names its commit through the environment."""
    from spatialcore.paths import git_commit

    monkeypatch.setenv("SPATIALCORE_COMMIT", "abc1234")
    assert git_commit() == "abc1234"
    monkeypatch.delenv("SPATIALCORE_COMMIT")
    assert git_commit() != "abc1234"
