"""`spatialcore demo`: the paper in miniature, end to end on tiny CPU models, with a Markdown report.

Stages, each timed and summarised in ``REPORT.md``:

1. build the tiny Qwen2.5-VL backbone (reused when the run folder has it for the same config);
2. synthesise a SpatialReward pair set in the tiny generator's world (preset ``easy_grid``: what the
   generator draws), validate it and draw its statistics;
3. train the tiny SpatialScore on freshly streamed pairs of that world: ``configs/reward/tiny_cpu_grid.yaml``
   (its curriculum) with ``REWARD_CHANGES``;
4. evaluate it on the pair set's test split (the published table's columns) with the shuffled-prompt
   control beside it;
5. judge the base generator (the committed tiny Flux, ``assets/tiny_generator``) with
   ``spatialcore eval``: held-out prompts, fixed seeds, the pixel oracle and GenEval's position rule;
6. Spatial-RL with Top-k filtering on that generator, rewarded by the SpatialScore of stage 3
   (``configs/grpo/tiny_cpu_grid.yaml`` with ``GRPO_CHANGES``; its ``objective`` names GRPO or DiffusionNFT), a
   fixed number of iterations;
7. judge the RL policy exactly as the base (same prompts, same noise).

The report sets base against RL (objects found, relation accuracy, SpatialScore) with the reward-hacking
gauge: how far the learned reward moved against how far the independent judge moved. Every stage writes
into ``out`` and is reused on a second run when its result is there.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, from_dict, load_config, param, to_dict
from .dist import available_cores
from .errors import RunError
from .logs import info
from .tiny import TinyConfig
from .trainers.grpo import GRPOTrainConfig
from .trainers.reward import RewardTrainConfig

# The stage configs are the files in configs/ with the demo's own choices on top, validated as any
# run's are (the demo runs from a checkout: `make demo`).
CHECKOUT = Path(__file__).resolve().parents[1]
CONFIGS = CHECKOUT / "configs"
GENERATOR = CHECKOUT / "assets" / "tiny_generator"
PRESET = "easy_grid"
REWARD_FILE, REWARD_CHANGES = "reward/tiny_cpu_grid.yaml", [
    # 2026-12-04, seed 0: the two-direction stage sat at ~0.78 from step 200 to 1,100 (the saddle of the reward
    # table issue), the four-direction stage began at 1,300 and was at 0.83 at 1,500; 2,500 gives it time.
    # 2026-12-06: 1,500 steps (the cosine schedule over them) sat in that stage from step 400 to 1,200 and ended at
    # 0.852 on the test pairs with the shuffled-prompt control at 0.811 (a reward that barely reads the prompt);
    # 2,500 reached 1.000 by step 1,000 (control 0.745)
    "max_steps=2500"]
# The objective is DiffusionNFT: from generators that half-read the order it lifted relation accuracy +36.6 points
# against GRPO's +8.6 in 300 iterations (3 seeds each), and from this base, whose last captions name a wrong
# direction 60 % of the time, +55.8, +52.9 and +52.2 in 3 seeds at one thread (docs/EXPERIMENTS.md, 2026-12-07)
GRPO_FILE, GRPO_CHANGES = "grpo/tiny_cpu_grid_nft.yaml", [
    # model and reward.spatialscore.model become the demo's; threads=0: the demo's own setting (every core;
    # the file's 2 would leave a bigger machine idle); no time limit: the result must not depend on the
    # machine's speed
    "threads=0", "max_minutes=0"]


def _from_configs(cls, name: str, changes: list[str]):
    path = CONFIGS / name
    if not path.is_file():
        raise RunError(f"the demo composes its runs from {path} (configs/ of a checkout): not found; run it from "
                       "a clone with `make demo`")
    return load_config(cls, path, changes)


def _reward_defaults() -> RewardTrainConfig:
    return _from_configs(RewardTrainConfig, REWARD_FILE, REWARD_CHANGES)


def _grpo_defaults() -> GRPOTrainConfig:
    return _from_configs(GRPOTrainConfig, GRPO_FILE, GRPO_CHANGES)


@dataclass
class DemoEvalConfig:
    """`spatialcore eval` of the base generator and of the RL policy (the same prompts and noise)."""

    n_prompts: int = param(64, min=1, help="held-out prompts (easy_grid's test split has ~23 distinct ones)")
    per_prompt: int = param(12, min=1, help="fixed noise seeds per prompt")
    seed: int = param(0, min=0)
    steps: int = param(0, min=0, help="ODE steps (0: as the generator was trained)")
    batch: int = param(16, min=1)


@dataclass
class DemoConfig:
    seed: int = param(0, min=0)
    threads: int = param(0, min=0, help="torch CPU threads of every stage whose own config sets none "
                                        "(0: every core this process may use)")
    tiny: TinyConfig = field(default_factory=TinyConfig)
    generator: str = param(str(GENERATOR), help="the base generator (a Flux pipeline folder)")
    pairs: int = param(400, min=20, help="synthetic evaluation pairs (easy_grid preset)")
    reward: RewardTrainConfig = field(default_factory=_reward_defaults)
    grpo: GRPOTrainConfig = field(default_factory=_grpo_defaults)
    eval: DemoEvalConfig = field(default_factory=DemoEvalConfig)

    def check(self) -> None:
        if self.grpo.reward.name != "spatialscore":
            raise ConfigError("grpo.reward.name", "the demo rewards Spatial-RL with the SpatialScore it trains")
        if not (Path(self.generator) / "model_index.json").is_file():
            raise ConfigError("generator", f"{self.generator} is not a Flux pipeline folder (no model_index.json)")


class _Stages:
    """Runs the stages in order, each starting at ``threads`` CPU threads (a trainer sets its own from
    its config and would otherwise leave it for the next stage), and records time and summary."""

    def __init__(self, threads: int) -> None:
        self.rows: list[tuple[str, float, str]] = []
        self.threads = threads

    def run(self, name: str, fn, *args, **kwargs):
        import torch

        torch.set_num_threads(self.threads)
        info(f"{name} ...", who="demo")
        t0 = time.perf_counter()
        result, summary = fn(*args, **kwargs)
        dt = time.perf_counter() - t0
        self.rows.append((name, dt, summary))
        info(f"{name}: {summary} ({dt:.1f} s)", who="demo")
        return result


def _same_config(folder: Path, cfg) -> bool:
    import yaml

    saved = folder / "config.yaml"
    return saved.is_file() and yaml.safe_load(saved.read_text()) == to_dict(cfg)


def _why(e: BaseException, width: int) -> str:
    """An exception in one line: its type and the first line of its message."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:width]}"


def compile_problem() -> str | None:
    """None when ``torch.compile`` builds CPU kernels here, else why not (its CPU backend needs a C++ compiler)."""
    import torch

    try:
        torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(3))
    except Exception as e:  # noqa: BLE001 - any failure means: run eagerly
        return _why(e, 200)
    return None


def _sampler_compile(gcfg: GRPOTrainConfig) -> str:
    """The Spatial-RL stage's ``sampler.compile``, eager (with a one-line note) where nothing compiles."""
    if gcfg.sampler.compile != "none":
        problem = compile_problem()
        if problem:
            info(f"torch.compile cannot build kernels here ({problem}): Spatial-RL runs eagerly, about 1.6x "
                 "slower", who="demo")
            gcfg.sampler.compile = "none"
    return gcfg.sampler.compile


def _tiny_stage(cfg: DemoConfig, out: Path):
    import yaml

    from .tiny import build_tiny

    tiny_dir = out / "tiny"
    saved = tiny_dir / "tiny.yaml"
    if saved.is_file() and yaml.safe_load(saved.read_text()) == to_dict(cfg.tiny):
        return tiny_dir, f"reused {tiny_dir}"
    summary = build_tiny(cfg.tiny, tiny_dir, overwrite=True)
    n_flux = sum(summary["flux"]["parameters"].values())
    return tiny_dir, (f"Qwen2.5-VL {summary['reward']['parameters']:,} params, "
                      f"Flux {n_flux:,} params -> {tiny_dir}")


def _data_stage(cfg: DemoConfig, out: Path):
    from .data.pairs import scan_pair_set
    from .data.stats import pair_set_stats, plot_stats
    from .data.synth import DIFFICULTIES, SynthConfig, synth_pair_set

    folder = out / "pairs"
    synth = from_dict(SynthConfig, {**DIFFICULTIES[PRESET], "test_fraction": 0.5}, "pairs")
    if not (folder / "pairs.jsonl").is_file() or len((folder / "pairs.jsonl").read_text().splitlines()) != cfg.pairs:
        synth_pair_set(folder, cfg.pairs, cfg.seed + 101, synth, overwrite=True, workers=1)
    records, problems = scan_pair_set(folder)
    stats = pair_set_stats(folder)
    plot_stats(stats, out / "pair_stats.png")
    splits = ", ".join(f"{k} {v}" for k, v in sorted(stats["splits"].items()))
    return folder, (f"{len(records)} valid pairs ({splits}), {len(problems)} problems -> pairs/, "
                    "pair_stats.png")


def _reward_train_stage(cfg: DemoConfig, rcfg: RewardTrainConfig):
    from .trainers.reward import train

    folder = Path(rcfg.out)
    if (folder / "model").is_dir() and _same_config(folder, rcfg):
        return (folder / "model", True), f"reused {folder / 'model'}"
    last = train(rcfg)
    return (folder / "model", False), (f"{rcfg.max_steps} steps, held-out accuracy {last['accuracy']:.3f} on "
                                       f"fresh pairs -> reward/model, reward/accuracy.png")


def _reward_eval_stage(model_dir: Path, pairs: Path):
    from .data.pairs import PairSet
    from .reward.evaluate import pair_metrics, pair_scores, perturbation_types
    from .reward.model import SpatialScore

    model = SpatialScore.from_pretrained(model_dir)
    test = PairSet(pairs, split="test")
    real = pair_metrics(*pair_scores(model, test), types=perturbation_types(test))
    control = pair_metrics(*pair_scores(model, test, shuffle_prompts=True))
    return (real, control, len(test)), (f"{len(test)} test pairs: accuracy {real['accuracy']:.3f} "
                                        f"(shuffled-prompt control {control['accuracy']:.3f})")


def _grpo_stage(gcfg: GRPOTrainConfig):
    from .logs import read_metrics
    from .trainers.grpo import train

    folder = Path(gcfg.out)
    reused = (folder / "policy").is_dir() and _same_config(folder, gcfg)
    if not reused:
        train(gcfg)
    recs = read_metrics(folder / "metrics.jsonl")
    its = max(r["step"] for r in recs)
    train_recs = [r for r in recs if "reward_mean" in r]
    minutes = train_recs[-1]["elapsed_s"] / 60 if train_recs else 0.0
    prefix = "reused: " if reused else ""
    return (recs, its, reused), f"{prefix}{its} of {gcfg.iterations} iterations in {minutes:.1f} min -> grpo/policy"


def _eval_settings(cfg: DemoConfig):
    from .eval.report import EvalSettings, trained_settings

    e = cfg.eval
    return EvalSettings(**{**trained_settings(cfg.generator), "prompts": f"synthetic:{PRESET}", "n_prompts": e.n_prompts,
                           "per_prompt": e.per_prompt, "seed": e.seed, "batch": e.batch,
                           **({"steps": e.steps} if e.steps else {})})


def _generator_eval_stage(cfg: DemoConfig, model_dir: Path, out: Path, lora: Path | None, rerun: bool,
                          sampled: bool = False):
    """`spatialcore eval` of the generator (+ policy) with the demo's settings and SpatialScore's mu; ``sampled``:
    the side lane has sampled and judged into ``out`` with these settings, only mu is added."""
    from .eval.report import add_spatialscore, run_eval

    settings = _eval_settings(cfg)
    inputs = {"settings": settings.__dict__, "model": cfg.generator, "lora": str(lora) if lora else None,
              "reward_model": str(model_dir)}
    stamp = out / "inputs.json"
    if not rerun and stamp.is_file() and json.loads(stamp.read_text()) == inputs and (out / "eval.json").is_file():
        s = json.loads((out / "eval.json").read_text())
        prefix = "reused: "
    else:
        if sampled:
            s = add_spatialscore(out, str(model_dir))
            prefix = "sampled and judged beside SpatialScore's training, then scored: "
        else:
            s = run_eval(cfg.generator, out, settings, lora=str(lora) if lora else None, reward_model=str(model_dir))
            prefix = ""
        stamp.write_text(json.dumps(inputs, indent=2) + "\n")
    return s, (f"{prefix}{s['samples']} samples: objects found {s['objects_found']:.3f}, relation accuracy "
               f"{s['relation_accuracy']:.3f}, SpatialScore {s['spatialscore']['mu_mean']:.2f} -> {out.name}/")


def _warmup_config(gcfg: GRPOTrainConfig, out: Path) -> dict:
    """Spatial-RL's config for one iteration rewarded by the pixel oracle (no SpatialScore yet): the same sampler,
    batch shapes, compile mode and threads (torch.compile builds its CPU kernels for a thread count: warmed at one
    thread, a 2-thread run compiled its first training step again, 48 s), so it builds every kernel the real run
    needs (that step then took 4.7 s)."""
    g = to_dict(gcfg)
    g["reward"]["name"] = "oracle"
    g["optim"]["warmup_steps"] = 0
    return {**g, "out": str(out / "grpo_warmup"), "iterations": 1, "eval_every": 1, "save_every": 1, "log_every": 1,
            "max_minutes": 0, "save_grids": False}


def side_lane(job: str) -> int:
    """The side lane's child process (``job``: JSON from :class:`_SideLane`): the base generator's evaluation
    without SpatialScore, then the compile warm-up; what it did goes to ``job["result"]``."""
    import torch

    from .eval.report import EvalSettings, run_eval
    from .trainers.grpo import train

    torch.set_num_threads(1)
    job = json.loads(job)
    result = {}
    for what, fn in (("eval", lambda: run_eval(job["generator"], job["eval_out"], EvalSettings(**job["settings"]))),
                     ("warmup", lambda: train(from_dict(GRPOTrainConfig, job["warmup"], "grpo")))):
        if what == "warmup" and not job["warmup"]:
            continue
        try:
            fn()
            result[what] = "done"
        except Exception as e:  # noqa: BLE001 - the main process does the work itself instead
            result[what] = _why(e, 300)
    Path(job["result"]).write_text(json.dumps(result) + "\n")
    return 0


class _SideLane:
    """SpatialScore trains on one thread; a child process on the core it leaves idle does what needs no SpatialScore:
    it samples and judges the base generator (``eval_base/``; mu is added afterwards, from the same pixels) and,
    when Spatial-RL compiles, builds its kernels into torch.compile's cache with a one-iteration run rewarded by the
    pixel oracle (``grpo_warmup/``, removed afterwards). Its output: ``side_lane.log``."""

    def __init__(self, cfg: DemoConfig, gcfg: GRPOTrainConfig, out: Path, warmup: bool) -> None:
        import subprocess
        import sys

        self.out, self.result = out, out / "side_lane.json"
        self.result.unlink(missing_ok=True)
        job = {"generator": cfg.generator, "eval_out": str(out / "eval_base"), "settings": _eval_settings(cfg).__dict__,
               "warmup": _warmup_config(gcfg, out) if warmup else None, "result": str(self.result)}
        with (out / "side_lane.log").open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from spatialcore.demo import side_lane; sys.exit(side_lane(sys.argv[1]))",
                 json.dumps(job)], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        info("while SpatialScore trains, a child process judges the base generator"
             + (" and compiles Spatial-RL's kernels" if warmup else "") + f" ({out / 'side_lane.log'})", who="demo")

    def wait(self) -> dict:
        """What the child did ({"eval": "done" or why not, "warmup": ...}); {} when it died."""
        import shutil

        t0 = time.perf_counter()
        self.proc.wait()
        if time.perf_counter() - t0 > 1:
            info(f"waited {time.perf_counter() - t0:.1f} s for the side lane", who="demo")
        shutil.rmtree(self.out / "grpo_warmup", ignore_errors=True)
        done = json.loads(self.result.read_text()) if self.result.is_file() else {}
        for what, res in done.items():
            if res != "done":
                info(f"side lane: {what} failed ({res}); done here instead", who="demo")
        return done


def _table(real: dict, control: dict) -> str:
    """The evaluation table with the shuffled-prompt control as a second row, then the per-type one."""
    from .reward.evaluate import format_by_type, format_table

    rows = format_table(real, "SpatialScore (tiny)").splitlines()
    control_row = next(r for r in format_table(control, "shuffled-prompt control").splitlines()
                       if r.startswith("| shuffled"))
    table = [r for r in rows if r.startswith("|")]
    notes = [r for r in rows if r and not r.startswith("|")]
    return "\n".join(table + [control_row, "", *notes, "", format_by_type(real)])


def _judge_moves(base: dict, rl: dict) -> tuple[float, float]:
    """Points of relation accuracy and of objects found the independent judge saw the policy gain."""
    return (100 * (rl["relation_accuracy"] - base["relation_accuracy"]),
            100 * (rl["objects_found"] - base["objects_found"]))


def _gauge(base: dict, rl: dict) -> list[str]:
    """The reward-hacking gauge: the learned reward's move (in the base's spread of mu over samples) set
    against the independent judge's move (points of relation accuracy and of objects found)."""
    b, a = base["spatialscore"], rl["spatialscore"]
    reward_gain = (a["mu_mean"] - b["mu_mean"]) / max(b["mu_std"], 1e-9)
    rel, found = _judge_moves(base, rl)
    if reward_gain > 0.1 and rel <= 0:
        verdict = "**reward hacking**: the learned reward rose while the judge's relation accuracy did not"
    elif reward_gain > 0.1 and found < -5:
        verdict = "**partly hacked**: relation accuracy rose, but objects went missing"
    elif rel > 0:
        verdict = "the judge agrees with the reward: layouts moved towards the named relations"
    else:
        verdict = "neither moved much"
    return [f"Reward-hacking gauge: SpatialScore moved {reward_gain:+.2f} base standard deviations "
            f"({b['mu_mean']:.2f} -> {a['mu_mean']:.2f}); the pixel oracle's relation accuracy moved {rel:+.1f} "
            f"points and objects found {found:+.1f} points: {verdict}."]


# the trainer's objective key -> its name in the report and what it does
OBJECTIVES = {
    "grpo": ("GRPO", "the clipped policy gradient on the SDE steps' log-probabilities (Flow-GRPO)"),
    "nft": ("DiffusionNFT", "a flow-matching loss on the policy's own clean samples, pulled towards the better half of "
                            "each group and pushed from the worse; from a generator that half-reads the order it lifted "
                            "relation accuracy about four times as far as GRPO for the same samples "
                            "(docs/EXPERIMENTS.md)")}


def _what_it_shows(base: dict, rl: dict, objective: str = "GRPO") -> str:
    """The run's claim in one paragraph, read off its own numbers (never a fixed sentence)."""
    rel, found = _judge_moves(base, rl)
    if rel >= 15 and found >= -5:
        shown = (f"SpatialScore-driven {objective} with Top-k moved the generator's layouts towards the prompt by the "
                 "target margin (+15 points of relation accuracy, objects found within 5 points)")
    elif rel > 0 and found >= -5:
        shown = ("layouts moved towards the prompt, short of the +15-point target (with one run, a few points are "
                 "within the evaluation's sampling noise)")
    else:
        shown = "Spatial-RL did not make the generator obey the relations better in this run"
    return (f"What this run shows: relation accuracy moved {rel:+.1f} points and objects found {found:+.1f} points "
            f"on held-out prompts, as judged by the pixel oracle, which never saw the reward: {shown}. What it "
            "cannot show: real accuracy and speed need the real models (FLUX.1-dev, Qwen2.5-VL-7B) and GPUs.")


def _generator_table(base: dict, rl: dict) -> list[str]:
    def row(name, b, a, points=True):
        delta = f"{100 * (a - b):+.1f} points" if points else f"{a - b:+.2f}"
        return f"| {name} | {b:.3f} | {a:.3f} | {delta} |"

    lines = ["| held-out metric (pixel oracle + GenEval's rule) | base | after Spatial-RL | change |",
             "|---|---:|---:|---:|",
             row("objects found (both named objects)", base["objects_found"], rl["objects_found"]),
             row("relation accuracy (GenEval: found and relation holds)", base["relation_accuracy"],
                 rl["relation_accuracy"]),
             row("relation accuracy when both objects are found", base["relation_accuracy_when_found"],
                 rl["relation_accuracy_when_found"]),
             row("SpatialScore mu (the reward), mean over samples", base["spatialscore"]["mu_mean"],
                 rl["spatialscore"]["mu_mean"], points=False)]
    for rel in base["per_relation"]:
        if rel in rl["per_relation"]:
            lines.append(row(f"'{rel}' holds", base["per_relation"][rel]["accuracy"],
                             rl["per_relation"][rel]["accuracy"]))
    return lines


def _topk_words(k: int | None) -> str:
    return f"Top-k keeps the best {k} and worst {k} of each group" if k else "every sample of a group is kept"


def run_demo(cfg: DemoConfig, out: Path) -> int:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg.check()
    threads = cfg.threads or available_cores()
    torch.manual_seed(cfg.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stages = _Stages(threads)
    tiny_dir = stages.run("tiny checkpoints", _tiny_stage, cfg, out)
    pairs = stages.run("synthetic pairs", _data_stage, cfg, out)

    # the stage configs: the demo's sections with this run's paths, validated again
    rcfg = from_dict(RewardTrainConfig, {**to_dict(cfg.reward), "model": str(tiny_dir / "reward"),
                                         "out": str(out / "reward"), "init_from": None,
                                         "threads": cfg.reward.threads or threads}, "reward")
    g = to_dict(cfg.grpo)
    g["reward"]["spatialscore"]["model"] = str(Path(rcfg.out) / "model")
    gcfg = from_dict(GRPOTrainConfig, {**g, "model": cfg.generator, "out": str(out / "grpo"),
                                       "threads": cfg.grpo.threads or threads, "seed": cfg.seed}, "grpo")
    compiled = _sampler_compile(gcfg)
    reward_trains = not ((Path(rcfg.out) / "model").is_dir() and _same_config(Path(rcfg.out), rcfg))
    rl_trains = not ((out / "grpo" / "policy").is_dir() and _same_config(out / "grpo", gcfg))
    side = _SideLane(cfg, gcfg, out, warmup=rl_trains and compiled != "none") \
        if reward_trains and rcfg.threads < threads else None
    try:
        model_dir, reward_reused = stages.run("SpatialScore training", _reward_train_stage, cfg, rcfg)
    except BaseException:
        if side:
            side.proc.kill()
        raise
    side_done = side.wait() if side else {}
    real, control, n_test = stages.run("SpatialScore evaluation", _reward_eval_stage, model_dir, pairs)
    base = stages.run("base generator evaluation", _generator_eval_stage, cfg, model_dir, out / "eval_base", None,
                      not reward_reused, side_done.get("eval") == "done")
    objective, what_it_does = OBJECTIVES[gcfg.objective]
    recs, its, grpo_reused = stages.run(f"Spatial-RL ({objective} + Top-k)", _grpo_stage, gcfg)
    rl = stages.run("RL policy evaluation", _generator_eval_stage, cfg, model_dir, out / "eval_rl",
                    out / "grpo" / "policy", not (reward_reused and grpo_reused))
    total = time.perf_counter() - t0

    lines = ["# spatialcore demo report", ""]
    if its < gcfg.iterations:
        lines += [f"**PARTIAL RESULT: Spatial-RL stopped at iteration {its} of {gcfg.iterations} (time limit "
                  f"grpo.max_minutes={gcfg.max_minutes}); the numbers below are not the configured run's.**", ""]
    lines += [f"Total time: {total / 60:.1f} min on CPU ({threads} threads; SpatialScore training "
              f"{rcfg.threads}, Spatial-RL {gcfg.threads}"
              f"{', its transformer blocks compiled' if compiled != 'none' else ', eager'}).", "",
              "| stage | time (s) | result |", "|---|---:|---|"]
    lines += [f"| {name} | {dt:.1f} | {summary} |" for name, dt, summary in stages.rows]
    lines += ["", "## SpatialScore (tiny Qwen2.5-VL) on the synthetic test split", "",
              f"{n_test} held-out pairs of the generator's world (easy_grid: red circle / blue square, one relation, "
              "32 px; the rejected image flips the relation or drops an object). The control judges every pair "
              "against another pair's prompt: a model that reads the prompt drops to about 0.5.", "",
              _table(real, control),
              "", "![reward model accuracy](reward/accuracy.png)", "",
              "## Spatial-RL on the tiny Flux, rewarded by SpatialScore", "",
              f"Base: `{cfg.generator}`. Objective: {objective} (`objective: {gcfg.objective}`; "
              f"{what_it_does}). G = {gcfg.group_size} images per prompt, {gcfg.prompts_per_iter} prompts "
              f"per iteration, {_topk_words(gcfg.resolved_top_k())}; "
              f"{'LoRA r' + str(gcfg.policy.lora_rank) if gcfg.policy.lora_rank else 'full fine-tuning'}"
              f", {its} iterations. Judged by `spatialcore eval`: {base['samples']} samples ({base['prompts']} "
              f"held-out prompts x {cfg.eval.per_prompt} fixed noise seeds, the same for base and policy), "
              "deterministic ODE, the pixel oracle as detector and GenEval's position rule.", ""]
    lines += _generator_table(base, rl) + [""] + _gauge(base, rl) + [""]
    lines += [_what_it_shows(base, rl, objective), "",
              "![reward during Spatial-RL](grpo/reward.png)", "",
              "Base generator (green: correct, orange: relation wrong, red: an object missing):", "",
              "![base](eval_base/grid.png)", "", "After Spatial-RL (same prompts, same noise):", "",
              "![after](eval_rl/grid.png)", "", "![pair statistics](pair_stats.png)", ""]
    report = out / "REPORT.md"
    report.write_text("\n".join(lines))
    info(f"done in {total / 60:.1f} min; report: {report}", who="demo")
    return 0
