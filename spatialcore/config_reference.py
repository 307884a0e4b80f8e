"""docs/CONFIG.md, generated: how configs work, what each file in configs/ runs, and every key of every
config kind with its default, help, choices and range (what ``spatialcore config show KIND`` prints).

    python -m spatialcore.config_reference > docs/CONFIG.md

A test compares the committed file with this output, so the reference cannot drift from the code."""

from __future__ import annotations

import importlib

from .config import load_config, to_commented_yaml

# Every kind of config a command loads: name (`spatialcore config show NAME`) -> "module:class", imported only
# when asked for (the CLI lists the names without importing the trainers).
CONFIG_KINDS = {"grpo": "trainers.grpo:GRPOTrainConfig", "reward": "trainers.reward:RewardTrainConfig",
                "sft": "trainers.sft:SFTTrainConfig", "demo": "demo:DemoConfig", "tiny": "tiny:TinyConfig",
                "synth": "data.synth:SynthConfig", "text-sides": "trainers.text_sides:TextSidesConfig"}


def config_class(kind: str) -> type:
    """The config dataclass of ``kind`` (a key of ``CONFIG_KINDS``)."""
    module, _, name = CONFIG_KINDS[kind].partition(":")
    return getattr(importlib.import_module(f"spatialcore.{module}"), name)

# configs/ file -> what it runs (a test checks that every file there is listed and every listed file exists)
CONFIG_FILES = {
    "tiny/generator.yaml": "`spatialcore tiny` architecture of the committed tiny generator (4 heads x 32, 2 + 3 "
                           "blocks, no guidance embedder, 32 px VAE)",
    "tiny/reward_wide.yaml": "`spatialcore tiny` with the wider Qwen2.5-VL (width 128, 4 language layers: 1.47 M "
                             "parameters) for SpatialScore's full task at 112 px (`reward/tiny_cpu_hard112.yaml`)",
    "sft/tiny_cpu.yaml": "pretrains the tiny generator on the `easy_grid` renderer: VAE stage, then the full "
                         "transformer (CPU, ~1 h on one core; the first step of `make generator`)",
    "sft/tiny_cpu_web.yaml": "the pretrained generator, its T5 taught the sides (`sft text-sides`), trained on "
                             "web-like captions (the relation phrase missing from half; a step of `make generator`)",
    "sft/tiny_cpu_correct.yaml": "`tiny_cpu_web.yaml`'s recipe on correct captions only: the generator learns to draw "
                                 "every relation (0.84; a step of `make generator`, 14,000 steps there)",
    "sft/tiny_cpu_web_wrong.yaml": "the demo's base `assets/tiny_generator`: the correct-caption generator on "
                                   "captions whose relation word is wrong 60 % of the time, 3,000 steps (the last "
                                   "step of `make generator`)",
    "sft/tiny_cpu_correct_highnoise.yaml": "the capacity check: the correct-caption generator 3,000 more steps on "
                                           "correct captions, timesteps drawn towards high noise (0.83–0.88 held "
                                           "out over two seeds; after `make generator`)",
    "sft/tiny_cpu_grid_perfect.yaml": "ablation: SFT of `assets/tiny_generator` on perfect images for the steps of Spatial-RL's time",
    "sft/flux_dev_lora.yaml": "reference: the supervised baseline, LoRA r32 on FLUX.1-dev, a pair set's chosen "
                              "images, 8 GPUs",
    "reward/tiny_cpu.yaml": "tiny SpatialScore, `easy` stream, curriculum (CPU, ~8 min)",
    "reward/tiny_cpu_grid.yaml": "tiny SpatialScore in the tiny generator's world (`easy_grid`: flips, drops, "
                                 "duplicates; the demo's, with max_steps=2500)",
    "reward/tiny_cpu_unseen.yaml": "tiny SpatialScore judged on object pairs never seen in training (CPU, ~16 min)",
    "reward/tiny_cpu_hard.yaml": "tiny SpatialScore on the published task's shape (3-6 objects, 2-9 relations, 1 or "
                                 "2-3 violations, held-out object sets) at 56 px (CPU, ~25 min)",
    "reward/tiny_cpu_hard112.yaml": "the same task at 112 px, each stage held to its threshold, with three- and "
                                    "four-object stages before the full task, rate 3e-4 (CPU, ~75 min at one thread; 0.69-0.72 held out)",
    "reward/tiny_cpu_hard112_wide.yaml": "`tiny_cpu_hard112.yaml` on the wider model "
                                         "(`tiny/reward_wide.yaml`), 16,500 steps (CPU, ~2 h at one thread)",
    "reward/qwen2_5_vl_7b.yaml": "reference: LoRA on Qwen2.5-VL-7B, bf16, 8 GPUs",
    "grpo/tiny_cpu_grid.yaml": "Spatial-RL on `assets/tiny_generator` rewarded by the grid SpatialScore, Top-k, "
                               "GRPO (~9 min at 2 threads)",
    "grpo/tiny_cpu_grid_nft.yaml": "the same run with DiffusionNFT's forward-process objective (objective: nft) "
                                   "instead of GRPO's policy gradient, compiled (the demo's RL run; ~11 min at 2 "
                                   "threads)",
    "grpo/tiny_cpu_grid_nft_oracle.yaml": "ablation of the demo's RL: rewarded by the evaluation's judge (the upper "
                                          "bound)",
    "grpo/tiny_cpu_grid_nft_all.yaml": "ablation of the demo's RL: without Top-k (every sample in the loss)",
    "grpo/tiny_cpu_grid_oracle.yaml": "ablation of the GRPO run: rewarded by the evaluation's judge",
    "grpo/tiny_cpu_grid_all.yaml": "ablation of the GRPO run: without Top-k",
    "grpo/tiny_cpu_grid_lcb.yaml": "ablation: the uncertainty-aware reward mu - sigma, Top-k ranked by it (a "
                                   "Gaussian-head SpatialScore)",
    "grpo/tiny_cpu.yaml": "Top-k GRPO on the random tiny Flux with the dense pixel-oracle reward (CPU, 10 min)",
    "grpo/tiny_cpu_no_topk.yaml": "the same without Top-k",
    "grpo/tiny_cpu_prompt.yaml": "prompt-dependent oracle reward (left/right decides the sign), common noise",
    "grpo/tiny_cpu_spatialscore.yaml": "GRPO on the random tiny Flux rewarded by the `easy` SpatialScore",
    "grpo/flux_dev_spatial.yaml": "reference: FLUX.1-dev, SpatialScore-7B reward, G = 24, LoRA r32, Top-k, 512², "
                                  "8 GPUs",
    "grpo/flux_dev_full.yaml": "the reference with full fine-tuning of FLUX.1-dev, the policy sharded with FSDP2 "
                               "(8 GPUs)",
    "demo/smoke.yaml": "every stage of the demo in about a minute (numbers meaningless)",
    "prompts/easy_grid_examples.txt": "a prompts file (one per line) for `sample --prompts-file` / `prompts_file:`",
}

HEAD = """# Configuration reference

Generated by `python -m spatialcore.config_reference > docs/CONFIG.md` (a test keeps it equal to the code).

Every run is a typed config (a dataclass tree) loaded in three layers: the defaults below, then a YAML file
(`--config FILE`), then `key=value` overrides on the command line (dotted keys for nested sections, values parsed
as YAML: `optim.lr=3e-4`, `prompts='[a, b]'`). A file may start with `extends: OTHER.yaml` (relative to it): OTHER
is loaded first and this file's keys are laid over it, section by section, so an ablation names only what it
changes (`configs/grpo/tiny_cpu_grid_all.yaml` is three lines). An unknown key, a wrong type or a value out of
range stops the command before any model is built, with one line naming the key and exit status 2:

```
$ spatialcore grpo train optim.lrr=1e-4
spatialcore grpo: config key 'optim.lrr': unknown key (did you mean 'optim.lr'?)
```

`spatialcore config show KIND [--config FILE] [key=value ...]` prints the resolved config with each key's help as
a comment (the output is itself a valid config file); `--json -` prints it as JSON.

## The files in configs/

| file | what it runs |
|---|---|
"""


TITLES = {"grpo": "Spatial-RL: `spatialcore grpo train`", "reward": "SpatialScore: `spatialcore reward train`",
          "sft": "flow-matching fine-tuning: `spatialcore sft train`",
          "demo": "the demo: `spatialcore demo` (its `reward` and `grpo` sections are the two trainers' configs, "
                  "defaults from configs/reward/tiny_cpu_grid.yaml and configs/grpo/tiny_cpu_grid.yaml)",
          "tiny": "tiny checkpoints: `spatialcore tiny`",
          "synth": "synthetic pairs: `spatialcore data synth` (the `--difficulty` preset replaces some defaults)",
          "text-sides": "a miniature generator's T5 pretrained on the objects' sides: `spatialcore sft text-sides`"}


def render() -> str:
    from pathlib import Path

    checkout = str(Path(__file__).resolve().parents[1]) + "/"  # the demo's defaults are paths in the checkout
    parts = [HEAD]
    parts += [f"| `configs/{name}` | {what} |\n" for name, what in CONFIG_FILES.items()]
    for kind in CONFIG_KINDS:
        text = to_commented_yaml(load_config(config_class(kind))).replace(checkout, "")
        parts.append(f"\n## {TITLES[kind]}\n\n```yaml\n{text}```\n")
    return "".join(parts)


if __name__ == "__main__":
    print(render(), end="")
