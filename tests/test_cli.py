import json
import subprocess
import sys

import pytest

from spatialcore.cli import build_parser

COMMANDS = [["tiny"], ["demo"], ["info"], ["config"], ["config", "show"]]


@pytest.mark.parametrize("cmd", [[], *COMMANDS])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*cmd, "--help"])
    assert exit_.value.code == 0
    assert "usage: spatialcore" in capsys.readouterr().out


def test_info_json_runs_without_gpu(capsys):
    from spatialcore.cli import main

    assert main(["info", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["attention"]["sdpa"] is True
    assert isinstance(report["gpus"], list)


def test_config_show_fills_defaults(capsys):
    from spatialcore.cli import main

    assert main(["config", "show", "tiny", "seed=5"]) == 0
    out = capsys.readouterr().out
    assert "seed: 5" in out and "text_rope_theta: 100.0" in out


def test_config_show_comments_each_key_and_loads_back(capsys, tmp_path):
    import yaml

    from spatialcore.cli import main
    from spatialcore.config import load_config, to_dict
    from spatialcore.trainers.grpo import GRPOTrainConfig

    assert main(["config", "show", "grpo", "top_k=2", "policy.lora_rank=8"]) == 0
    out = capsys.readouterr().out
    # every key's help as a comment (with choices and range), and the text is a config file again
    assert "lora_rank: 8  # 0: full fine-tuning; >= 0" in out
    assert "sde_type: sde  # one of sde, cps" in out
    cfg = load_config(GRPOTrainConfig, None, ["top_k=2", "policy.lora_rank=8"])
    assert yaml.safe_load(out) == to_dict(cfg)
    (tmp_path / "shown.yaml").write_text(out)
    assert load_config(GRPOTrainConfig, tmp_path / "shown.yaml") == cfg
    assert main(["config", "show", "grpo", "top_k=2", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["top_k"] == 2


def test_one_grammar_json_out_and_overrides_after_options(tmp_path, capsys):
    """--json FILE writes the result and keeps the text; --json - prints only JSON; a trainer's --out is its out=
    key; key=value may follow options."""
    from spatialcore.cli import build_parser, main

    assert main(["config", "show", "tiny", "--json", str(tmp_path / "t.json"), "seed=4"]) == 0
    assert "seed: 4" in capsys.readouterr().out
    assert json.loads((tmp_path / "t.json").read_text())["seed"] == 4
    assert main(["info", "--json", "-"]) == 0
    json.loads(capsys.readouterr().out)  # nothing but JSON on stdout
    from spatialcore.cli.common import train_overrides

    args, extra = build_parser().parse_known_args(["grpo", "train", "seed=1", "--out", "runs/x", "top_k=2", "--fresh"])
    assert extra == ["top_k=2"]
    assert main(["grpo", "train", "--out", str(tmp_path / "r"), "model=" + str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err  # the override after --out was taken (and its path checked)
    args.overrides += extra
    assert train_overrides(args) == ["seed=1", "top_k=2", "out=runs/x", "run=fresh"]
    with pytest.raises(SystemExit) as exit_:
        main(["info", "stray"])
    assert exit_.value.code == 2


def test_packaging_has_one_import_root(tmp_path):
    """Installed, only `spatialcore.*` exists: no generic top-level `kernels`/`trainers`/`profiling`."""
    code = (
        "import importlib, importlib.util\n"
        "for name in ('kernels', 'trainers', 'profiling'):\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
        "    importlib.import_module('spatialcore.' + name)\n"
        "print('ok')\n"
    )
    # A neutral working directory: the repo root itself is not on sys.path.
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_pinned_liger_patch_imports_with_pinned_transformers():
    # liger-kernel 0.8.5's Qwen2.5-VL patch breaks on transformers >= 5.23 (removed output class):
    # the pins in pyproject keep the pair importable.
    import transformers
    from liger_kernel.transformers import apply_liger_kernel_to_qwen2_5_vl

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    assert (major, minor) < (5, 23)
    assert callable(apply_liger_kernel_to_qwen2_5_vl)


def test_no_deprecation_warnings_from_our_calls(tiny_dir, tmp_path):
    """Loading and sampling a pipeline, a trained policy and a SpatialScore through the CLI warns about
    nothing deprecated (e.g. diffusers' `torch_dtype`, replaced by `dtype`)."""
    import warnings

    import torch

    from spatialcore.cli import main
    from spatialcore.reward.model import SpatialScore
    from spatialcore.rl.sampler import load_pipeline

    pipe = load_pipeline(tiny_dir / "flux")
    pipe.transformer.save_pretrained(tmp_path / "policy" / "transformer")  # a "fully fine-tuned" policy
    SpatialScore.from_backbone(tiny_dir / "reward", variance_head=True).save_pretrained(tmp_path / "m")
    image = torch.rand(1, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["sample", "--model", str(tiny_dir / "flux"), "--lora", str(tmp_path / "policy"), "--prompt",
                     "a red circle", "--out", str(tmp_path / "s"), "-n", "1", "--steps", "2", "--size", "32",
                     "--dtype", "float32"]) == 0
        SpatialScore.from_pretrained(tmp_path / "m").score("a red circle", image)
    bad = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
           if issubclass(w.category, (DeprecationWarning, FutureWarning, PendingDeprecationWarning))]
    assert not bad, bad


def test_grpo_compare_plots_and_names_what_is_missing(tmp_path, capsys):
    from spatialcore.cli import main

    for name, values in (("a", [0.1, 0.15, 0.25]), ("a2", [0.2, 0.35]), ("b", [0.2, 0.2])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": 10 * i, "elapsed_s": 5.0 * i, "eval_relation_acc": v}) + "\n"
            for i, v in enumerate(values)))
        (tmp_path / name / "config.yaml").write_text("group_size: 4\nprompts_per_iter: 2\n")
    out = tmp_path / "cmp.png"
    assert main(["grpo", "compare", f"top-k={tmp_path / 'a'}", f"top-k={tmp_path / 'a2'}", str(tmp_path / "b"),
                 "--key", "eval_relation_acc", "--gain", "0.1", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    table = capsys.readouterr().out
    assert table.split("\n", 1)[1] == out.with_suffix(".md").read_text()
    # 8 samples an iteration; a gains 0.1 at step 20 (160 samples, 10 s), a2 at step 10 (80, 5 s), b never
    assert "| top-k | a | 0.100 | 0.250 | 160 | 10 |" in table, table
    assert "| top-k | a2 | 0.200 | 0.350 | 80 | 5 |" in table, table
    assert "| b | b | 0.200 | 0.200 | not reached | not reached |" in table, table
    assert "| **top-k** | mean of the 2 of 2 that reached it | 0.150 | 0.300 | 120 | 8 |" in table, table
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "metrics.jsonl").write_text(json.dumps({"step": 5, "elapsed_s": 1.0, "eval_reward": 0.1}))
    (tmp_path / "late" / "config.yaml").write_text("group_size: 4\nprompts_per_iter: 2\n")
    assert main(["grpo", "compare", str(tmp_path / "late"), "--gain", "0.1", "--out", str(out)]) == 2
    assert "not 0" in capsys.readouterr().err
    assert main(["grpo", "compare", str(tmp_path / "a"), "--out", str(out)]) == 2  # no eval_reward records
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--key" in err and "eval_reward" in err, err
    assert main(["grpo", "compare", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def test_sample_reads_a_jsonl_prompts_file_like_grpo_does(tmp_path, capsys):
    from pathlib import Path

    from spatialcore.cli import main

    asset = Path(__file__).resolve().parents[1] / "assets" / "tiny_generator"
    prompts = ["the red circle is left of the blue square", "the blue square is above the red circle"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    assert main(["sample", "--model", str(asset), "--prompts-file", str(tmp_path / "p.jsonl"), "-n", "1", "--size",
                 "32", "--steps", "2", "--dtype", "float32", "--out", str(tmp_path / "s")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    (tmp_path / "bad.jsonl").write_text('{"text": ""}\n')
    assert main(["sample", "--model", str(asset), "--prompts-file", str(tmp_path / "bad.jsonl"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "--prompts-file" in capsys.readouterr().err
