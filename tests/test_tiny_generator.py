"""The committed tiny generator (assets/tiny_generator, the demo's base, built by `make generator`: the pretrained
generator of configs/sft/tiny_cpu.yaml, its T5 taught the sides by `sft text-sides`, configs/sft/tiny_cpu_web.yaml on
web-like captions, configs/sft/tiny_cpu_correct.yaml on correct ones, then configs/sft/tiny_cpu_web_wrong.yaml on
captions whose relation word is mostly wrong): small enough to commit, loads in the stock FluxPipeline, carries the
chain that made it, reads the prompt, and, re-measured by the pixel oracle on the noise of its creation-time
evaluation, still draws both named objects and places them as often as then."""

import json
from pathlib import Path

import torch

ASSET = Path(__file__).resolve().parents[1] / "assets" / "tiny_generator"


def _created() -> dict:
    return json.loads((ASSET / "eval.json").read_text())


def test_small_and_carries_how_it_was_made():
    total = sum(p.stat().st_size for p in ASSET.rglob("*") if p.is_file())
    assert total <= 5_000_000, f"{total:,} bytes"
    run = json.loads((ASSET / "spatialcore_run.json").read_text())
    assert run["command"].startswith("spatialcore sft train") and run["commit"] and run["training_seconds"] > 0
    assert run["config"]["data"]["preset"] == "easy_grid"
    # weak for the reason the README gives: its last captions name a wrong direction more often than the right one
    assert run["config"]["data"]["caption_wrong"] >= 0.5
    # the chain, newest first: before that, correct captions (where it learnt to draw every relation), web-like
    # ones, a T5 taught the sides (held out), and a generator pretrained from `spatialcore tiny`'s build
    chain = [run]
    while "spatialcore_run" in chain[-1].get("made_from", {}):
        chain.append(chain[-1]["made_from"]["spatialcore_run"])
    assert all(r["command"].startswith("spatialcore sft train") for r in chain) and len(chain) == 4
    data = [r["config"]["data"] for r in chain[1:3]]
    assert data[0]["caption_drop"] == data[0]["caption_wrong"] == 0 and data[1]["caption_drop"] >= 0.3
    sides = chain[2]["made_from"]["text_sides"]
    assert sides["held_out_side_accuracy"] >= 0.95 and sides["config"]["preset"] == "easy_grid"
    assert chain[-1]["base_model_tiny_config"]["flux"]
    created = _created()
    assert created["samples"] >= 256 and created["detector"] == "oracle"
    # the base: weak on relations, not on objects
    assert created["objects_found"] >= 0.9 and 0.3 <= created["relation_accuracy"] <= 0.5


def test_stock_pipeline_and_the_prompt_moves_the_objects():
    """Same noise, only the relation word changed: the images change (the generator reads the prompt)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(ASSET, torch_dtype=torch.float32)
    images = [pipe(f"The red circle is {rel} the blue square.", height=32, width=32, num_inference_steps=12,
                   guidance_scale=3.5, max_sequence_length=32, output_type="pt", num_images_per_prompt=4,
                   generator=torch.Generator().manual_seed(3)).images
              for rel in ("to the left of", "to the right of", "above", "below")]
    assert images[0].shape == (4, 3, 32, 32)
    moved = [float((images[0] - other).abs().mean()) for other in images[1:]]
    assert min(moved) > 0.0 and sum(moved) / len(moved) > 0.01, moved


def test_remeasured_objects_found_as_at_creation(tmp_path):
    """The first 4 noise seeds of every prompt of the creation-time evaluation, sampled again on the prompts
    stored with its verdicts (held-out ones): objects found >= 0.8, and per sample the same verdict as then
    (float rounding may flip a borderline pixel or two)."""
    from spatialcore.config import from_dict
    from spatialcore.data.synth import DIFFICULTIES, SynthConfig, split_of
    from spatialcore.eval.report import EvalSettings, run_eval

    then = _created()["settings"]
    old = [json.loads(x) for x in (ASSET / "verdicts.jsonl").read_text().splitlines()]
    prompts = dict(sorted((r["prompt_index"], r["prompt"]) for r in old))
    assert list(prompts) == list(range(len(prompts))) and len(prompts) == _created()["prompts"]
    held_out = from_dict(SynthConfig, DIFFICULTIES[then["prompts"].split(":")[1]], "stream")
    assert all(split_of(p, held_out) == "test" for p in prompts.values())
    (tmp_path / "prompts.txt").write_text("".join(p + "\n" for p in prompts.values()))
    settings = EvalSettings(**{**then, "prompts": str(tmp_path / "prompts.txt"), "per_prompt": 4})
    summary = run_eval(str(ASSET), tmp_path / "eval", settings)
    rows = [json.loads(x) for x in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    old = {(r["prompt_index"], r["seed_index"]): r for r in old}
    same = [old[(r["prompt_index"], r["seed_index"])]["all_found"] == r["all_found"] for r in rows]
    assert summary["samples"] == len(rows) >= 64
    assert summary["objects_found"] >= 0.8
    assert sum(same) / len(same) >= 0.95, f"{sum(same)} of {len(same)} verdicts as at creation"
    right = [old[(r["prompt_index"], r["seed_index"])]["correct"] == r["correct"] for r in rows]
    assert sum(right) / len(right) >= 0.9, f"{sum(right)} of {len(right)} relation verdicts as at creation"


def _generator_target() -> list[str]:
    """The recipe lines of the Makefile's ``generator`` target, in order (stripped)."""
    lines, inside = [], False
    for line in (ASSET.parents[1] / "Makefile").read_text().splitlines():
        if line.startswith("generator:"):
            inside = True
        elif inside and not line.startswith("\t"):
            break
        elif inside:
            lines.append(line.strip())
    return lines


def test_make_generator_chain_is_connected():
    """Each step of `make generator` starts from what the step before wrote, the correct-caption stage's second leg
    resumes its first (the same config but for its length), the committed asset is the last stage's pipeline, and
    the capacity check (tiny_cpu_correct_highnoise.yaml) starts from the correct-caption stage."""
    from spatialcore.config import load_config, to_dict
    from spatialcore.run_folder import first_difference
    from spatialcore.trainers.sft import SFTTrainConfig

    def opt(argv, name):
        return argv[argv.index(name) + 1]

    def made(path):  # written by the step before (its folder or a folder inside it): the chain is a line
        return bool(written) and (path == written[-1] or path.startswith(written[-1] + "/"))

    import shlex

    recipe = _generator_target()
    cmds = [shlex.split(ln[len("$(SC) "):]) for ln in recipe if ln.startswith("$(SC) ")]  # argv after $(SC)
    assert [c[:2] for c in cmds[:2]] == [["tiny", "--config"], ["sft", "train"]], cmds
    written, last_sft = [], None
    for argv in cmds:
        if argv[0] == "tiny":
            written.append(opt(argv, "--out"))
        elif argv[:2] == ["sft", "text-sides"]:
            assert made(opt(argv, "--model")), argv
            written.append(opt(argv, "--out"))
        elif argv[:2] == ["sft", "train"]:
            cfg = to_dict(load_config(SFTTrainConfig, ASSET.parents[1] / opt(argv, "--config"),
                                      [a for a in argv[2:] if "=" in a and not a.startswith("-")]))
            if last_sft is not None and last_sft["out"] == cfg["out"]:  # a second leg: it must resume the first
                assert first_difference(last_sft, cfg, SFTTrainConfig) is None and cfg["steps"] > last_sft["steps"]
            else:
                assert made(cfg["model"]) and cfg["out"] not in written, (argv, cfg["model"])
                written.append(cfg["out"])
            last_sft = cfg
        elif argv[0] == "eval":
            assert opt(argv, "--model") == last_sft["out"] + "/pipeline", argv
    assert len(cmds) == 8 and last_sft["data"]["caption_wrong"] >= 0.5
    copy = [ln.split() for ln in recipe if "cp -r runs/" in ln]
    assert copy and copy[0][-2:] == [last_sft["out"] + "/pipeline", "assets/tiny_generator"]
    legs = [a for a in cmds if "configs/sft/tiny_cpu_correct.yaml" in a]
    correct_out = load_config(SFTTrainConfig, ASSET.parents[1] / "configs/sft/tiny_cpu_correct.yaml").out
    check = load_config(SFTTrainConfig, ASSET.parents[1] / "configs/sft/tiny_cpu_correct_highnoise.yaml")
    assert len(legs) == 2 and check.model == correct_out + "/pipeline" and check.out not in written
