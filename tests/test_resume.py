"""Resume that a test can catch: both trainers killed with SIGKILL at a random step end with
bit-identical weights and metrics, each step logged once, and the restarted process really resumed
(its log says from which step, and the records up to that step predate the kill). Torn checkpoints
fall back to the previous complete one or fail with one line naming the file; a process killed
while writing a checkpoint leaves the previous one intact."""

import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from runs import cli_args, kill_at_random_step, latest_step, records, steady, step_records
from spatialcore.checkpoint import CheckpointError, load_checkpoint, resume_checkpoint, save_checkpoint
from spatialcore.cli import main
from spatialcore.config import load_config
from spatialcore.trainers.grpo import GRPOTrainConfig
from spatialcore.trainers.grpo import train as grpo_train
from spatialcore.trainers.reward import RewardTrainConfig
from spatialcore.trainers.reward import train as reward_train

LEFT = "the red circle is to the left of the blue square"
RIGHT = "the red circle is to the right of the blue square"


def _check_resumed(run, err: str, resumed_at: int, killed_at: float, key: str, total: int) -> None:
    """The restarted process resumed from ``resumed_at`` (not from scratch) and ``run``'s metrics hold
    every step once."""
    recs = records(run)
    assert step_records(recs, key) == list(range(1, total + 1)), "every step exactly once, in order"
    if resumed_at:
        assert f"resumed from step {resumed_at} " in err, err[-2000:]
        assert all(r["time"] < killed_at for r in recs if r["step"] <= resumed_at), "steps up to the checkpoint " \
            "were trained by the killed process, not again"
    else:  # killed before its first checkpoint: a fresh start is the right thing
        assert "resumed from step" not in err
    assert all(r["time"] > killed_at for r in recs if r["step"] > resumed_at)


def _same_runs(a, b, weights: str) -> None:
    wa, wb = load_file(a / weights), load_file(b / weights)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert steady(records(a)) == steady(records(b))


def _kill_and_resume(verb, cfg_cls, train, overrides, tmp_path, capfd, metric, final, steps, kill=(3, 6)):
    """A straight run, and a run of the CLI killed with SIGKILL at a random step in ``kill`` and resumed
    in-process; checks the resume, returns both run folders. From step 3 on a checkpoint (every 2) exists, so
    the resumed run always restores state rather than starting over."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(load_config(cfg_cls, None, cli_args({**overrides, "out": str(straight)})))
    args = cli_args({**overrides, "out": str(killed)})
    _, t_kill = kill_at_random_step([sys.executable, "-m", "spatialcore.cli", *verb, *args], killed, metric, *kill)
    assert not (killed / final).exists(), "the run finished before it was killed"
    k = latest_step(killed)
    capfd.readouterr()
    train(load_config(cfg_cls, None, args))
    _check_resumed(killed, capfd.readouterr().err, k, t_kill, metric, steps)
    return straight, killed


def test_grpo_sigkill_at_a_random_iteration_resumes_exactly(tiny_dir, tmp_path, capfd):
    overrides = {"model": str(tiny_dir / "flux"), "prompts": [LEFT, RIGHT], "group_size": 4, "prompts_per_iter": 2,
                 "top_k": 1, "iterations": 8, "eval_every": 2, "eval_seeds": 2, "save_every": 2,
                 "policy.ema_decay": 0.9, "sampler.steps": 4, "sampler.image_size": 32, "optim.lr": 1e-2,
                 "policy.lora_rank": 4, "policy.lora_alpha": 8, "threads": 1}
    straight, killed = _kill_and_resume(["grpo", "train"], GRPOTrainConfig, grpo_train, overrides, tmp_path, capfd,
                                        "reward_mean", "policy", 8)
    _same_runs(straight, killed, "policy/pytorch_lora_weights.safetensors")
    for png in ("reward.png", "reward_vs_time.png", "samples_before.png", "samples_after.png"):
        assert (killed / png).is_file(), png


def test_reward_sigkill_at_a_random_step_resumes_exactly(tiny_dir, easy_pairs, tmp_path, capfd):
    overrides = {"model": str(tiny_dir / "reward"), "data.source": str(easy_pairs), "batch_size": 4, "max_steps": 8,
                 "optim.warmup_steps": 2, "eval_every": 3, "data.eval_pairs": 8, "save_every": 2, "log_every": 1,
                 "optim.lr": 1e-3,
                 "threads": 1}
    straight, killed = _kill_and_resume(["reward", "train"], RewardTrainConfig, reward_train, overrides, tmp_path,
                                        capfd, "loss", "model", 8)
    assert step_records(records(killed), "eval_accuracy") == [3, 6, 8]
    _same_runs(straight, killed, "model/backbone/model.safetensors")
    _same_runs(straight, killed, "model/head.safetensors")
    assert (killed / "accuracy.png").is_file() and (killed / "eval.md").is_file()


def _two_checkpoints(run):
    save_checkpoint(run, 2, {"w": torch.ones(300)}, {"step": 2, "rng": []})
    save_checkpoint(run, 4, {"w": torch.full((300,), 4.0)}, {"step": 4, "rng": []})
    return run / "checkpoints"


def test_torn_checkpoints_fall_back_or_fail_naming_the_file(tmp_path):
    logs = []
    root = _two_checkpoints(tmp_path / "a")
    assert resume_checkpoint(tmp_path / "a", log=logs.append) == root / "step_00000004" and not logs
    (root / "latest").unlink()  # no pointer: the newest complete checkpoint, said so
    assert resume_checkpoint(tmp_path / "a", log=logs.append) == root / "step_00000004"
    assert "latest is missing" in logs[-1]
    (root / "step_00000004" / "meta.json").unlink()  # never finished: the previous one, said so
    logs.clear()
    assert resume_checkpoint(tmp_path / "a", log=logs.append) == root / "step_00000002"
    assert any("step_00000004/meta.json is missing: falling back to step_00000002" in m for m in logs), logs

    root = _two_checkpoints(tmp_path / "b")
    weights = root / "step_00000004" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated after the fact (disk full, copy cut short)
    assert resume_checkpoint(tmp_path / "b", log=logs.append) == root / "step_00000002"
    assert "weights.safetensors is truncated" in logs[-1]
    tensors, _ = load_checkpoint(resume_checkpoint(tmp_path / "b"))
    assert torch.equal(tensors["w"], torch.ones(300))
    state = root / "step_00000002" / "state.pt"
    state.write_bytes(state.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="no complete checkpoint.*step_00000004/weights.safetensors"):
        resume_checkpoint(tmp_path / "b")

    root = _two_checkpoints(tmp_path / "c")  # same size, garbage inside: cannot be read, named
    state = root / "step_00000004" / "state.pt"
    state.write_bytes(b"\0" * state.stat().st_size)
    with pytest.raises(CheckpointError, match="step_00000004/state.pt cannot be read"):
        load_checkpoint(resume_checkpoint(tmp_path / "c"))
    for p in (root / "step_00000002", root / "step_00000004"):
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    with pytest.raises(CheckpointError, match="latest names step_00000004, which does not exist"):
        resume_checkpoint(tmp_path / "c")
    assert resume_checkpoint(tmp_path / "fresh") is None


def test_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    """SIGKILL in the middle of writing step 4 (its state file half written), then again between the
    finished folder and the `latest` pointer: step 2, then step 4, resume; nothing half-written is read."""
    script = (
        "import os, signal, sys, torch\n"
        "from spatialcore import checkpoint as ck\n"
        "run, where = sys.argv[1], sys.argv[2]\n"
        "ck.save_checkpoint(run, 2, {'w': torch.ones(1000)}, {'step': 2})\n"
        "def die(*a, **k):\n"
        "    if where == 'state':\n"
        "        open(a[1], 'wb').write(b'half a state')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "if where == 'state':\n"
        "    ck.torch.save = die\n"
        "else:\n"
        "    ck.os.replace = die\n"
        "ck.save_checkpoint(run, 4, {'w': torch.zeros(1000)}, {'step': 4})\n"
    )
    for where, expected in (("state", 2), ("pointer", 4)):
        run = tmp_path / where
        proc = subprocess.run([sys.executable, "-c", script, str(run), where], capture_output=True, text=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        root = run / "checkpoints"
        if where == "state":
            assert [p.name for p in root.glob(".step_00000004-*")], "the write was interrupted mid-way"
            assert not (root / "step_00000004").exists()
        assert (root / "latest").read_text() == "step_00000002"
        path = resume_checkpoint(run)
        assert path == root / f"step_{expected:08d}"
        tensors, state = load_checkpoint(path)
        assert state["step"] == expected and float(tensors["w"][0]) == (1.0 if expected == 2 else 0.0)
        save_checkpoint(run, 6, {"w": torch.ones(3)}, {"step": 6})  # the next write clears the debris
        assert not list(root.glob(".step_*"))


def test_a_run_folder_with_only_torn_checkpoints_is_one_line(tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    root = _two_checkpoints(run)
    for step in (2, 4):
        w = root / f"step_{step:08d}" / "weights.safetensors"
        w.write_bytes(w.read_bytes()[:50])
    assert main(["reward", "train", f"model={tiny_dir / 'reward'}", "data.source=stream:easy", f"out={run}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step_00000004/weights.safetensors is truncated" in err[0], err
    assert json.loads((root / "step_00000004" / "meta.json").read_text())["step"] == 4  # left as it was


def test_sft_sigkill_at_a_random_step_resumes_exactly(tiny_dir, tmp_path, capfd):
    """Both stages (VAE, then transformer with LoRA and EMA): the killed and resumed run ends with the
    same pipeline as the straight one."""
    from spatialcore.trainers.sft import SFTTrainConfig
    from spatialcore.trainers.sft import train as sft_train

    overrides = {"model": str(tiny_dir / "flux"), "image_size": 32, "vae.steps": 2, "vae.batch_size": 2,
                 "vae.calibration_images": 8, "steps": 6, "batch_size": 4, "micro_batch": 2, "save_every": 2,
                 "eval_every": 3, "eval_prompts": 1, "eval_seeds": 2, "sample_steps": 2, "policy.lora_rank": 4,
                 "policy.ema_decay": 0.9, "optim.lr": 1e-2, "log_every": 1, "threads": 1}
    # killed at step 5-7: the resume starts from a checkpoint inside the transformer stage (step 4 or 6), where
    # the optimizer's moments, the EMA and the VAE's measured factors all have to come back (a kill before step 4
    # would resume at the stage boundary, where a fresh optimizer is right anyway)
    straight, killed = _kill_and_resume(["sft", "train"], SFTTrainConfig, sft_train, overrides, tmp_path, capfd,
                                        "loss", "pipeline", 8, kill=(5, 7))
    assert step_records(records(killed), "eval_found") == [5, 8]
    for weights in ("pipeline/transformer/diffusion_pytorch_model.safetensors",
                    "pipeline/vae/diffusion_pytorch_model.safetensors", "lora/pytorch_lora_weights.safetensors"):
        _same_runs(straight, killed, weights)
    a, b = (json.loads((r / "pipeline" / "vae" / "config.json").read_text()) for r in (straight, killed))
    assert (a["shift_factor"], a["scaling_factor"]) == (b["shift_factor"], b["scaling_factor"])
    assert a["scaling_factor"] != 1.5035, "the VAE stage measured its latent scale"
