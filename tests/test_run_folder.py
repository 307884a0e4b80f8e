"""A run folder belongs to one run: a rerun with another config is refused with one line naming the first
differing key; the same config (or one that only extends the run, or names the folder where it was moved) resumes;
--fresh moves the old run aside and starts over; --resume needs a run to resume."""

import json

from runs import cli_args, records
from spatialcore.cli import main
from spatialcore.run_folder import first_difference

LEFT = "the red circle is to the left of the blue square"


def _grpo(tiny_dir, out, *extra):
    base = {"model": str(tiny_dir / "flux"), "out": str(out), "prompts": [LEFT], "group_size": 4, "prompts_per_iter": 1,
            "top_k": 1, "iterations": 2, "eval_every": 2, "eval_seeds": 1, "save_every": 1, "sampler.steps": 2,
            "sampler.image_size": 32, "policy.lora_rank": 4, "threads": 1}
    return ["grpo", "train", *cli_args(base), *extra]


def test_first_difference_names_the_dotted_key():
    saved = {"optim": {"lr": 1e-3, "name": "adamw"}, "seed": 0, "threads": 1, "iterations": 10}
    assert first_difference(saved, {**saved, "threads": 2, "iterations": 20}) is None
    assert first_difference(saved, {**saved, "optim": {"lr": 1e-2, "name": "adamw"}}) == ("optim.lr", 1e-3, 1e-2)
    assert first_difference(saved, {**saved, "new_key": 1}) == ("new_key", "<absent>", 1)


def test_a_key_added_since_the_run_resumes_at_its_default_only():
    """A run saved before a key existed resumes while the key holds the default its config class gives it (a
    section's own default included: SFT's optim.lr is 1e-4, OptimConfig's 1e-2); any other value, a key the code
    no longer has, or a changed list item is a difference."""
    from spatialcore.config import to_dict
    from spatialcore.run_folder import compare_configs
    from spatialcore.trainers.sft import SFTTrainConfig

    now = to_dict(SFTTrainConfig(model="m"))
    saved = json.loads(json.dumps(now))
    del saved["optim"]["lr"], saved["data"]["caption_drop"], saved["data"]["path"], saved["seed"]
    assert compare_configs(saved, now, SFTTrainConfig) == (None, ["seed", "data.path", "data.caption_drop", "optim.lr"])
    assert first_difference(saved, now) == ("seed", "<absent>", 0)  # no class, no defaults: as before
    changed = json.loads(json.dumps(now))
    changed["optim"]["lr"] = 1e-2  # OptimConfig's own default, not the one SFT's section gives
    assert first_difference(saved, changed, SFTTrainConfig) == ("optim.lr", "<absent>", 1e-2)
    removed = {**json.loads(json.dumps(saved)), "old_key": 3}
    assert first_difference(removed, now, SFTTrainConfig) == ("old_key", 3, "<absent>")
    listed = {**json.loads(json.dumps(saved)), "report_to": ["jsonl", "tensorboard"]}
    assert first_difference(listed, now, SFTTrainConfig) == ("report_to", ["jsonl", "tensorboard"], ["jsonl"])


def test_rerun_refused_resumed_or_started_fresh(tiny_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(_grpo(tiny_dir, out)) == 0
    first = records(out)
    capsys.readouterr()
    # the folder says which code ran it: the checkout's commit and the command, one entry per start
    from spatialcore.paths import git_commit

    (start,) = json.loads((out / "run.json").read_text())["starts"]
    assert start["commit"] == git_commit() and start["ranks"] == 1 and "time" in start
    # another learning rate: refused before anything is built, one line naming the key, nothing touched
    assert main(_grpo(tiny_dir, out, "optim.lr=0.5")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optim.lr" in err and "--fresh" in err, err
    assert records(out) == first
    # the same config, extended, by code that has a key the saved run predates (dropped from its config.yaml),
    # at its default: resumes from the last checkpoint, naming the key in one line
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["sampler"]["text_cache"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    monkeypatch.setenv("SPATIALCORE_COMMIT", "abc1234")  # the resume runs other code: both starts are kept
    assert main(_grpo(tiny_dir, out, "iterations=3", "--resume")) == 0
    err = capsys.readouterr().err
    assert "resumed from step 2" in err and "predates sampler.text_cache: resuming with its default" in err, err
    starts = json.loads((out / "run.json").read_text())["starts"]
    assert [s["commit"] for s in starts] == [start["commit"], "abc1234"]
    assert records(out)[: len(first)] == first and records(out)[-1]["step"] == 3
    # --fresh: the old run moves aside intact, the new one starts at step 0
    assert main(_grpo(tiny_dir, out, "optim.lr=0.5", "--fresh")) == 0
    err = capsys.readouterr().err
    assert "resumed from step" not in err and "moved to" in err
    (aside,) = tmp_path.glob("run.replaced-*")
    assert records(aside)[-1]["step"] == 3 and records(out)[-1]["step"] == 2
    # a run folder moved elsewhere resumes where it now is (its config names the old out)
    moved = aside.rename(tmp_path / "moved")
    assert main(_grpo(tiny_dir, moved, "iterations=4", "--resume")) == 0
    assert "resumed from step 3" in capsys.readouterr().err and records(moved)[-1]["step"] == 4
    # --resume with nothing to resume
    assert main(_grpo(tiny_dir, tmp_path / "empty", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no run to resume" in err, err
