"""The ``spatialcore`` command.

Each subcommand parses its own arguments and imports heavy libraries only when it runs, so
``spatialcore --help`` answers at once. One grammar for all of them:

- ``--config FILE`` plus ``key=value`` overrides (dotted keys for nested fields) wherever there is a
  config (trainers, demo, tiny, data synth, config show; bench/profile take their suite parameters the same way);
- ``--out DIR`` is where a command writes (for a trainer, the same as ``out=DIR``);
- ``--json FILE`` writes the command's result as JSON to FILE; ``--json -`` prints it on stdout instead of the
  text output;
- each command's ``--help`` ends with examples that run as printed from a checkout (a test runs them all).

Config errors are printed as one line naming the key and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError, load_config, to_dict

EXIT_CONFIG = 2


def _command(sub, name: str, *, help: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
    """A subcommand whose help ends with ``examples`` (each one line, run from a checkout)."""
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    return sub.add_parser(name, help=help, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_config_args(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (defaults apply to missing keys; `extends: "
                                                    "OTHER.yaml` lays it over another file)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"override config keys (dotted for nested ones), e.g. {example}; "
                        "`spatialcore config show` lists them")


def _add_json(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", metavar="FILE", help=f"write {what} as JSON to FILE ('-': print it instead of the text)")


def _emit_json(dest: str | None, obj) -> bool:
    """Write ``obj`` to ``--json`` FILE (or stdout for ``-``); True when stdout got it (skip the text)."""
    if not dest:
        return False
    text = json.dumps(obj, indent=2)
    if dest == "-":
        print(text)
        return True
    path = Path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return False


def _add_out(p: argparse.ArgumentParser, what: str = "run folder (the config's out key)", **kw) -> None:
    p.add_argument("--out", metavar="DIR", help=what, **kw)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """--resume / --fresh of a trainer: the `run` key (a folder holding another config's run is refused)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="run_mode", action="store_const", const="resume",
                   help="continue the run in out (same config; an error if there is none)")
    g.add_argument("--fresh", dest="run_mode", action="store_const", const="fresh",
                   help="start over: an existing run in out is moved aside to out.replaced-<time>")


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """The trainer's overrides with --out (out=) and --resume/--fresh (run=) folded in."""
    return (list(args.overrides) + ([f"out={args.out}"] if args.out else [])
            + ([f"run={args.run_mode}"] if args.run_mode else []))


def _cmd_tiny(args: argparse.Namespace) -> int:
    from .tiny import TinyConfig

    cfg = load_config(TinyConfig, args.config, args.overrides)
    from .logs import info
    from .tiny import build_tiny

    out = Path(args.out)
    info(f"building tiny checkpoints (seed {cfg.seed}) into {out}", who="tiny")
    try:
        summary = build_tiny(cfg, out, overwrite=args.force)
    except FileExistsError as err:
        info(str(err), who="tiny")
        return 1
    r, f = summary["reward"], summary["flux"]
    info(f"reward: Qwen2.5-VL, {r['parameters']:,} parameters, vocab {r['vocab']} -> {r['path']}", who="tiny")
    info("flux: " + ", ".join(f"{k} {v:,}" for k, v in f["parameters"].items()) + f" parameters -> {f['path']}",
         who="tiny")
    _emit_json(args.json, summary)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .gpu import environment_report

    report = environment_report()
    if _emit_json(args.json, report):
        return 0
    width = max(len(k) for k in report)
    for key, value in report.items():
        if key == "attention":
            value = ", ".join(f"{k}{'' if ok else ' (unavailable)'}" for k, ok in value.items())
        elif key == "gpus":
            value = "; ".join(f"{g['name']} {g['memory_total_gib']:.0f} GiB" for g in value) or "none"
        print(f"{key:<{width}}  {value}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    cfg = load_config(DemoConfig, args.config, args.overrides)
    return run_demo(cfg, Path(args.out))


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from .data.synth import DIFFICULTIES, SynthConfig

    overrides = [*args.overrides, *([f"size={args.size}"] if args.size is not None else [])]
    cfg = load_config(SynthConfig, args.config, overrides, base=DIFFICULTIES[args.difficulty])
    from .data.synth import synth_pair_set
    from .logs import info

    if args.pairs < 1:
        raise ConfigError("--pairs", f"must be >= 1, got {args.pairs}")
    import time

    t0 = time.perf_counter()
    try:
        counts = synth_pair_set(args.out, args.pairs, args.seed, cfg, workers=args.workers, overwrite=args.force)
    except FileExistsError as err:
        info(str(err), who="data synth")
        return 1
    dt = time.perf_counter() - t0
    info(f"{args.pairs} pairs ({', '.join(f'{k} {v}' for k, v in counts.items())}) at {cfg.size}px in {dt:.1f} s "
         f"({args.pairs / dt:.0f} pairs/s) -> {args.out}", who="data synth")
    return 0


def _cmd_data_validate(args: argparse.Namespace) -> int:
    from .data.pairs import scan_pair_set

    records, problems = scan_pair_set(args.dir, check_images=not args.no_images)
    for p in problems:
        print(p)
    errors = [p for p in problems if p.severity == "error"]
    n_warn = len(problems) - len(errors)
    bad_lines = len({p.line for p in errors})
    print(f"{len(records)} good record(s), {bad_lines} bad record(s), {len(errors)} error(s), {n_warn} warning(s)")
    return 1 if errors else 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from .data.stats import format_stats, pair_set_stats, plot_stats

    stats = pair_set_stats(args.dir)
    if stats["pairs"] == 0:
        print(f"no valid pairs in {args.dir} (see `spatialcore data validate {args.dir}`)", file=sys.stderr)
        return 1
    png = Path(args.png) if args.png else Path(args.dir) / "stats.png"
    plot_stats(stats, png)
    if not _emit_json(args.json, {k: v for k, v in stats.items() if not k.startswith("_")}):
        print(format_stats(stats))
        print(f"figure: {png}")
    return 0


def _cmd_reward_train(args: argparse.Namespace) -> int:
    from .paths import require
    from .trainers.reward import RewardTrainConfig, train

    cfg = load_config(RewardTrainConfig, args.config, _train_overrides(args))
    if not cfg.data.startswith("stream:"):
        require(cfg.data, "data", "pairs")
    if cfg.init_from:
        require(cfg.init_from, "init_from", "spatialscore")
    else:
        require(cfg.model, "model", "qwen", hub=True)
    metrics = train(cfg)
    if metrics:
        _emit_json(args.json, {k: v for k, v in metrics.items() if k != "calibration"})
    return 0


def _cmd_grpo_train(args: argparse.Namespace) -> int:
    from .paths import require
    from .trainers.grpo import GRPOTrainConfig, train

    cfg = load_config(GRPOTrainConfig, args.config, _train_overrides(args))
    require(cfg.model, "model", "flux", hub=True)
    if "spatialscore" in cfg.reward.parts():
        require(cfg.reward.spatialscore.model, "reward.spatialscore.model", "spatialscore")
    final = train(cfg)
    if final:
        _emit_json(args.json, {k: v for k, v in final.items() if not isinstance(v, list)})
    return 0


def _cmd_sft_train(args: argparse.Namespace) -> int:
    from .paths import require
    from .trainers.sft import SFTTrainConfig, train

    cfg = load_config(SFTTrainConfig, args.config, _train_overrides(args))
    require(cfg.model, "model", "flux", hub=True)
    final = train(cfg)
    if final:
        _emit_json(args.json, final)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .eval.report import EvalSettings, run_eval
    from .paths import require, require_policy

    require(args.model, "--model", "flux", hub=True)
    require_policy(args.lora, "--lora")
    require(args.reward_model, "--reward-model", "spatialscore")
    for key, value, low in (("-n", args.n, 1), ("--n-prompts", args.n_prompts, 1), ("--steps", args.steps or 1, 1)):
        if value < low:
            raise ConfigError(key, f"must be >= {low}, got {value}")
    from .eval.report import trained_settings
    from .logs import info

    # Unset sampling options come from the generator's own training run when it has one, else the defaults.
    given = {k: getattr(args, k) for k in ("prompts", "steps", "size", "guidance", "max_sequence_length")}
    trained = {k: v for k, v in trained_settings(args.model).items() if given[k] is None}
    if trained:
        info("from the generator's spatialcore_run.json: " + ", ".join(f"{k}={v}" for k, v in trained.items()),
             who="eval")
    chosen = {k: v for k, v in given.items() if v is not None}
    settings = EvalSettings(**{**trained, **chosen}, n_prompts=args.n_prompts, per_prompt=args.n, seed=args.seed,
                            detector=args.detector, threshold=args.threshold, batch=args.batch)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    summary = run_eval(args.model, args.out, settings, lora=args.lora, reward_model=args.reward_model, device=device,
                       dtype=args.dtype)
    _emit_json(args.json, summary)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export
    from .logs import info

    info(export(args.checkpoint, args.out, merged=args.merged, ema=not args.no_ema), who="export")
    return 0


def _cmd_grpo_compare(args: argparse.Namespace) -> int:
    from .trainers.grpo import compare_runs

    runs = {}
    for item in args.runs:
        label, _, folder = item.rpartition("=")
        folder = Path(folder)
        if not (folder / "metrics.jsonl").is_file():
            raise ConfigError(item, f"{folder} has no metrics.jsonl (expected a grpo run folder)")
        runs[label or folder.name] = folder
    try:
        print(compare_runs(runs, Path(args.out), key=args.key))
    except ValueError as err:  # a run without that metric
        raise ConfigError("--key", str(err)) from None
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from .config import from_dict
    from .logs import info
    from .rl.sampler import FluxSampler, SamplerConfig, load_pipeline, to_pil

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    scfg = from_dict(SamplerConfig, {"steps": args.steps, "image_size": args.size, "guidance": args.guidance,
                                     "compile": args.compile}, "sample")
    scfg.check()
    prompts = list(args.prompt)
    if args.prompts_file:
        from .data.prompts import read_prompts

        prompts += read_prompts(args.prompts_file, "--prompts-file")
    if not prompts:
        raise ConfigError("prompt", "give --prompt and/or --prompts-file")
    from .paths import require, require_policy

    require(args.model, "--model", "flux", hub=True)
    require_policy(args.lora, "--lora")
    pipe = load_pipeline(args.model, dtype=dtype, device=device)
    if args.lora:
        from .rl.policy import load_policy_weights

        info(f"policy weights: {load_policy_weights(pipe, args.lora)} from {args.lora}", who="sample")
    sampler = FluxSampler(pipe, scfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, prompt in enumerate(prompts):
        seeds = [args.seed + i * args.n + j for j in range(args.n)]
        traj = sampler.sample([prompt] * args.n, seeds, sde=args.sde)
        for j, im in enumerate(to_pil(traj.images)):
            path = out / f"{i:04d}_{j:02d}.png"
            im.save(path)
            rows.append({"prompt": prompt, "seed": seeds[j], "image": str(path)})
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info(f"{len(rows)} images -> {out}", who="sample")
    return 0


def _suite_run(args: argparse.Namespace, emit=None):
    """(callable running the suite -> (rows, info), device) for bench and profile."""
    import torch

    from .profiling.suites import suite_runner

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return suite_runner(args.suite, args.shape, device, tiny=args.tiny, overrides=args.overrides, reps=args.reps,
                        warmup=args.warmup, out=Path(args.out), emit=emit), device


def _cmd_bench(args: argparse.Namespace) -> int:
    from .logs import info
    from .profiling import bench

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env: dict = {}

    def write(rows, setup) -> str:
        data = bench.to_json(args.suite, rows, setup, env)
        (out / f"{args.suite}.json").write_text(json.dumps(data, indent=2) + "\n")
        md = bench.to_markdown(data)
        (out / f"{args.suite}.md").write_text(md)
        return md

    run, device = _suite_run(args, emit=write)
    env.update(bench.environment(device))
    print(write(*run()))
    info(f"-> {out / (args.suite + '.json')}, {out / (args.suite + '.md')}", who="bench")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from .logs import info
    from .profiling.profile import run_profile

    run, _ = _suite_run(args)
    out = Path(args.out)
    summary = run_profile(run, out, title=f"{args.suite} ({args.shape})")
    info(f"{summary['wall_s']:.2f} s profiled -> {out / 'trace.json'}, {out / 'profile.md'}", who="profile")
    return 0


def _load_spatialscore(path: str):
    import torch

    from .paths import require
    from .reward.model import SpatialScore

    require(path, "--model", "spatialscore")
    model = SpatialScore.from_pretrained(path)
    return model.cuda() if torch.cuda.is_available() else model


def _cmd_reward_eval(args: argparse.Namespace) -> int:

    from .data.pairs import PairSet, PairSetError
    from .paths import require
    from .reward.evaluate import oracle_pair_scores, pair_metrics, pair_scores, perturbation_types

    if args.oracle:
        used = [flag for flag, on in (("--shuffle-prompts", args.shuffle_prompts), ("--quantize", args.quantize),
                                      ("--liger", args.liger), ("--compile", args.compile)) if on]
        if used:
            raise ConfigError(used[0], "applies to a model, not to --oracle")
    else:
        require(args.model, "--model", "spatialscore")
    require(args.data, "--data", "pairs")
    try:
        data = PairSet(args.data, split=args.split, strict=args.strict)
    except PairSetError as err:
        print(f"spatialcore reward eval: {err}", file=sys.stderr)
        return 1
    if len(data) == 0:
        print(f"spatialcore reward eval: no '{args.split}' pairs in {args.data}", file=sys.stderr)
        return 1
    if args.oracle:
        try:
            scores = oracle_pair_scores(data, limit=args.limit, progress=True)
        except ValueError as err:  # a prompt outside the synthetic grammar
            raise ConfigError("--oracle", str(err)) from None
        return _print_eval(args, pair_metrics(*scores, types=perturbation_types(data, args.limit)), "pixel oracle")
    model = _load_spatialscore(args.model)
    try:
        if args.quantize:
            model.quantize(args.quantize)
        model.accelerate(liger=args.liger, compile=args.compile)
    except RuntimeError as err:  # float8 / liger on a machine that cannot run them
        print(f"spatialcore reward eval: {err}", file=sys.stderr)
        return 1
    metrics = pair_metrics(*pair_scores(model, data, batch_size=args.batch_size, limit=args.limit, progress=True,
                                        shuffle_prompts=args.shuffle_prompts),
                           types=perturbation_types(data, args.limit))
    return _print_eval(args, metrics, Path(args.model).name)


def _print_eval(args: argparse.Namespace, metrics: dict, name: str) -> int:
    from .reward.evaluate import format_by_type, format_table

    if not _emit_json(args.json, metrics):
        print(format_table(metrics, name=name))
        if metrics.get("by_type"):
            print("\n" + format_by_type(metrics))
    return 0


def _samples_to_score(source: str) -> tuple[list[str], list[str]]:
    """(images, prompts) from a JSON Lines file with an image path and its prompt per line (``image`` or
    ``file_name``; ``prompt`` or ``text``): the ``samples.jsonl`` that ``sample`` and ``eval`` write, or a
    Hugging Face image folder's ``metadata.jsonl``; a folder means the one of those it holds. Image paths are
    taken as written, else relative to the file's folder."""
    path = Path(source)
    if path.is_dir():
        found = [path / n for n in ("samples.jsonl", "metadata.jsonl") if (path / n).is_file()]
        if not found:
            raise ConfigError("--samples", f"{source} holds neither samples.jsonl nor metadata.jsonl")
        path = found[0]
    if not path.is_file():
        raise ConfigError("--samples", f"{source}: not found")
    images, prompts = [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            image, prompt = rec.get("image", rec.get("file_name")), rec.get("prompt", rec.get("text"))
        except (json.JSONDecodeError, AttributeError):
            raise ConfigError("--samples", f"{path} line {n}: not a JSON object") from None
        if not isinstance(image, str) or not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("--samples", f"{path} line {n}: needs 'image' (or 'file_name') and 'prompt' (or 'text')")
        file = Path(image) if Path(image).is_file() else path.parent / image
        if not file.is_file():
            raise ConfigError("--samples", f"{path} line {n}: image {image} not found")
        images.append(str(file))
        prompts.append(prompt)
    if not images:
        raise ConfigError("--samples", f"{path} lists no images")
    return images, prompts


def _cmd_reward_score(args: argparse.Namespace) -> int:
    if args.samples and (args.images or args.prompt):
        raise ConfigError("--samples", "give either --samples or --prompt with images, not both")
    if args.samples:
        images, prompts = _samples_to_score(args.samples)
    else:
        if not args.images or args.prompt is None:
            raise ConfigError("--prompt", "give --prompt and images, or --samples FILE|FOLDER (one prompt per image)")
        missing = [p for p in args.images if not Path(p).is_file()]
        if missing:
            raise ConfigError("IMAGE", f"not found: {', '.join(missing)}")
        images, prompts = list(args.images), [args.prompt] * len(args.images)
    model = _load_spatialscore(args.model)
    mu, sigma = model.score(prompts, images)
    rows = [{"image": p, "prompt": t, "mu": float(m), "sigma": float(s)}
            for p, t, m, s in zip(images, prompts, mu, sigma, strict=True)]
    if not _emit_json(args.json, rows):
        for r in rows:
            print(f"{r['mu']:+.4f} ± {r['sigma']:.4f}  {r['image']}" + ("" if not args.samples else f"  {r['prompt']}"))
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:

    from .config import to_commented_yaml

    kinds = _config_kinds()
    cfg = load_config(kinds[args.kind](), args.config, args.overrides)
    if not _emit_json(args.json, to_dict(cfg)):
        print(to_commented_yaml(cfg), end="")
    return 0


def _config_kinds() -> dict[str, Callable[[], type]]:
    def tiny() -> type:
        from .tiny import TinyConfig

        return TinyConfig

    def demo() -> type:
        from .demo import DemoConfig

        return DemoConfig

    def synth() -> type:
        from .data.synth import SynthConfig

        return SynthConfig

    def reward() -> type:
        from .trainers.reward import RewardTrainConfig

        return RewardTrainConfig

    def grpo() -> type:
        from .trainers.grpo import GRPOTrainConfig

        return GRPOTrainConfig

    def sft() -> type:
        from .trainers.sft import SFTTrainConfig

        return SFTTrainConfig

    return {"tiny": tiny, "demo": demo, "synth": synth, "reward": reward, "grpo": grpo, "sft": sft}


def _add_tiny(sub) -> None:
    """``spatialcore tiny``."""
    p = _command(sub, "tiny", help="build tiny random Qwen2.5-VL and Flux checkpoints offline",
                 description="Build tiny, randomly initialised Qwen2.5-VL (reward/) and Flux (flux/) checkpoints with "
                             "locally trained tokenizers, deterministically from a seed.",
                 examples=["spatialcore tiny --out runs/tiny",
                           "spatialcore tiny --out runs/tiny-deep --json runs/tiny-deep.json flux.single_layers=2 seed=1"])
    _add_out(p, "output folder (gets reward/ and flux/)", required=True)
    p.add_argument("--force", action="store_true", help="replace an existing non-empty folder")
    _add_json(p, "a summary (parameters, paths)")
    _add_config_args(p, "flux.single_layers=2 seed=1")
    p.set_defaults(func=_cmd_tiny)


def _add_demo(sub) -> None:
    """``spatialcore demo``."""
    p = _command(sub, "demo", help="the paper in miniature, end to end on tiny CPU models",
                 description="Pretrained tiny generator -> synthetic pairs -> SpatialScore -> Spatial-RL (GRPO + "
                             "Top-k) rewarded by it -> `spatialcore eval` of base and policy on held-out prompts; "
                             "writes REPORT.md. With the defaults (`make demo`) it takes about 15 min on 2 cores; "
                             "configs/demo/smoke.yaml runs every stage in about a minute (its numbers mean nothing).",
                 examples=["spatialcore demo --config configs/demo/smoke.yaml --out runs/demo-smoke",
                           "spatialcore config show demo"])
    _add_out(p, "run folder (default runs/demo)", default="runs/demo")
    _add_config_args(p, "grpo.iterations=100 seed=1")
    p.set_defaults(func=_cmd_demo)


def _add_data(sub) -> None:
    """``spatialcore data synth|validate|stats``."""
    p = sub.add_parser("data", help="synthetic spatial pairs: make, validate, summarise",
                       description="Synthetic SpatialReward pairs and pair-set tools.")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    d = _command(dsub, "synth", help="render a synthetic pair set",
                 description="Render N (perfect, perturbed) image pairs with prompts into DIR (pairs.jsonl + "
                             "images/), deterministically from --seed.",
                 examples=["spatialcore data synth --difficulty easy_grid --pairs 40 --out runs/pairs-grid",
                           "spatialcore data synth --difficulty hard --pairs 20 --size 96 --out runs/pairs-hard "
                           "max_violations=2 p_single=0.5"])
    _add_out(d, "pair-set folder", required=True)
    d.add_argument("--pairs", type=int, required=True, metavar="N")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--size", type=int, default=None, metavar="PX", help="image side (overrides the preset)")
    d.add_argument("--difficulty", choices=["easy", "medium", "hard", "easy_grid"], default="hard",
                   help="preset: easy (fixed object pair, one relation), medium (two objects, one relation, "
                        "split by object pair), hard (3-6 objects, 2-9 relations; default), easy_grid (the tiny "
                        "generator's world: easy at 32 px on white, centres on a 4 x 4 grid)")
    d.add_argument("--workers", type=int, default=None, help="render processes (default: CPU count)")
    d.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    _add_config_args(d, "max_violations=2 p_sizes=0")
    d.set_defaults(func=_cmd_data_synth)
    d = _command(dsub, "validate", help="check every record of a pair set",
                 description="Check pairs.jsonl and its images; print 'line N: reason' per problem and a summary. "
                             "Exit 0 when clean (warnings allowed), 1 otherwise.",
                 examples=["spatialcore data validate runs/pairs-grid"])
    d.add_argument("dir", metavar="DIR")
    d.add_argument("--no-images", action="store_true", help="skip decoding the images")
    d.set_defaults(func=_cmd_data_validate)
    d = _command(dsub, "stats", help="summarise a pair set (printed and as a PNG)",
                 description="Counts per split, relations per prompt, perturbation types and counts, prompt length; "
                             "printed and drawn as a PNG.",
                 examples=["spatialcore data stats runs/pairs-grid",
                           "spatialcore data stats runs/pairs-grid --png runs/grid-stats.png --json runs/grid-stats.json"])
    d.add_argument("dir", metavar="DIR")
    d.add_argument("--png", metavar="FILE", help="figure path (default DIR/stats.png)")
    _add_json(d, "the statistics")
    d.set_defaults(func=_cmd_data_stats)


def _add_reward(sub) -> None:
    """``spatialcore reward train|eval|score``."""
    p = sub.add_parser("reward", help="SpatialScore reward model: train, evaluate, score",
                       description="SpatialScore: a Qwen2.5-VL reward model with a Gaussian head.")
    rsub = p.add_subparsers(dest="reward_command", metavar="ACTION")
    rsub.required = True
    r = _command(rsub, "train", help="train on a pair set (torchrun for several processes)",
                 description="Train SpatialScore on a pair folder or a synthetic stream; resumes from the run "
                             "folder's latest checkpoint. Launch with torchrun for DDP / FSDP2.",
                 examples=["spatialcore reward train --config configs/reward/tiny_cpu_grid.yaml max_steps=20 warmup_steps=5 "
                           "eval_every=10 eval_pairs=16 --out runs/reward-quick",
                           "spatialcore reward train --config configs/reward/tiny_cpu.yaml data=runs/pairs-grid "
                           "max_steps=10 warmup_steps=2 eval_every=5 eval_pairs=8 curriculum=[] --out runs/reward-pairs --json "
                           "runs/reward-pairs/final.json"])
    _add_out(r)
    _add_json(r, "the final evaluation")
    _add_config_args(r, "lr=1e-4 max_steps=500")
    _add_run_args(r)
    r.set_defaults(func=_cmd_reward_train)
    r = _command(rsub, "eval", help="pairwise accuracy table (overall / 1 / 2-3 perturbations)",
                 description="Evaluate a SpatialScore model on a pair set: accuracy overall, with 1 and with 2-3 "
                             "perturbations, per perturbation type, mean margin and calibration.",
                 examples=["spatialcore reward eval --model runs/reward-quick/model --data runs/pairs-grid",
                           "spatialcore reward eval --model runs/reward-quick/model --data runs/pairs-grid "
                           "--shuffle-prompts --json runs/reward-quick/control.json",
                           "spatialcore reward eval --oracle --data runs/pairs-grid"])
    who = r.add_mutually_exclusive_group(required=True)
    who.add_argument("--model", metavar="DIR")
    who.add_argument("--oracle", action="store_true",
                     help="score with the pixel oracle instead of a model (fraction of the prompt's relations it "
                          "finds true): the upper bound on synthetic pairs")
    r.add_argument("--data", required=True, metavar="DIR")
    r.add_argument("--split", default="test", choices=["train", "val", "test"])
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--limit", type=int, default=None, help="evaluate at most this many pairs")
    r.add_argument("--strict", action="store_true", help="refuse a pair set with bad records")
    r.add_argument("--quantize", choices=["int8", "float8"], help="torchao inference quantisation")
    r.add_argument("--liger", action="store_true", help="liger-kernel RMSNorm/SwiGLU/RoPE kernels (CUDA)")
    r.add_argument("--compile", action="store_true", help="torch.compile the decoder layers")
    r.add_argument("--shuffle-prompts", action="store_true",
                   help="control: judge each pair against another pair's prompt (a model that reads the "
                        "prompt drops to about 0.5)")
    _add_json(r, "the metrics (with calibration bins and the per-type table)")
    r.set_defaults(func=_cmd_reward_eval)
    r = _command(rsub, "score", help="score images against a prompt, or each against its own",
                 description="Print mu and sigma of SpatialScore for each image: against --prompt, or against its "
                             "own prompt from --samples (the samples.jsonl that `sample` and `eval` write, an image "
                             "folder's metadata.jsonl, or a folder holding one).",
                 examples=["spatialcore reward score --model runs/reward-quick/model --samples runs/sample-quick",
                           "spatialcore reward score --model runs/reward-quick/model --prompt \"the red circle is "
                           "left of the blue square\" runs/sample-quick/0000_00.png runs/sample-quick/0000_01.png "
                           "--json runs/scores.json"])
    r.add_argument("--model", required=True, metavar="DIR")
    r.add_argument("--prompt", help="one prompt for every IMAGE")
    r.add_argument("--samples", metavar="FILE|FOLDER", help="JSON Lines of {image, prompt} (or file_name, text)")
    r.add_argument("images", nargs="*", metavar="IMAGE")
    _add_json(r, "a list of {image, prompt, mu, sigma}")
    r.set_defaults(func=_cmd_reward_score)


def _add_grpo(sub) -> None:
    """``spatialcore grpo train|compare``."""
    p = sub.add_parser("grpo", help="Spatial-RL: GRPO with Top-k filtering on Flux",
                       description="Spatial-RL: online GRPO with Top-k filtering on a Flux generator.")
    gsub = p.add_subparsers(dest="grpo_command", metavar="ACTION")
    gsub.required = True
    g = _command(gsub, "train", help="train a LoRA (or full) policy (torchrun for several processes)",
                 description="GRPO on Flux with SDE sampling, group advantages with Top-k filtering and the "
                             "Flow-GRPO clipped loss; resumes from the run folder's latest checkpoint.",
                 examples=["spatialcore grpo train --config configs/grpo/tiny_cpu_grid_oracle.yaml iterations=2 "
                           "group_size=4 top_k=1 eval_seeds=2 eval_every=2 --out runs/grpo-quick",
                           "spatialcore grpo train --config configs/grpo/tiny_cpu_grid_oracle.yaml iterations=2 "
                           "group_size=4 top_k=0 eval_seeds=2 eval_every=2 --out runs/grpo-quick-all "
                           "--json runs/grpo-quick-all/final.json",
                           "spatialcore grpo train --config configs/grpo/tiny_cpu_grid.yaml "
                           "reward.spatialscore.model=runs/reward-quick/model iterations=1 group_size=4 top_k=1 eval_seeds=1 "
                           "eval_every=1 "
                           "--out runs/grpo-quick-ss"])
    _add_out(g)
    _add_json(g, "the final metrics")
    _add_config_args(g, "optim.lr=1e-4 top_k=0")
    _add_run_args(g)
    g.set_defaults(func=_cmd_grpo_train)
    g = _command(gsub, "compare", help="plot held-out reward of several runs per iteration and per second",
                 description="One PNG comparing runs (e.g. Top-k vs its ablation) against iterations and training "
                             "wall-clock seconds.",
                 examples=["spatialcore grpo compare top-k=runs/grpo-quick all=runs/grpo-quick-all "
                           "--out runs/compare.png",
                           "spatialcore grpo compare runs/grpo-quick runs/grpo-quick-all --key eval_relation_acc "
                           "--out runs/compare-relation.png"])
    g.add_argument("runs", nargs="+", metavar="[LABEL=]RUN_DIR")
    _add_out(g, "the PNG to write", required=True)
    g.add_argument("--key", default="eval_reward", help="metric to plot (default eval_reward)")
    g.set_defaults(func=_cmd_grpo_compare)


def _add_sft(sub) -> None:
    """``spatialcore sft train``."""
    p = sub.add_parser("sft", help="supervised flow-matching fine-tuning of Flux (the supervised baseline)",
                       description="Fine-tune a Flux generator on (prompt, image) pairs with the rectified-flow loss.")
    ssub = p.add_subparsers(dest="sft_command", metavar="ACTION")
    ssub.required = True
    s = _command(ssub, "train", help="train the transformer (LoRA or full; optionally the VAE first)",
                 description="Flow-matching fine-tuning on the synthetic renderer, a pair set's chosen images or an "
                             "image folder with metadata.jsonl; resumes from the run folder's latest checkpoint; "
                             "writes out/pipeline (FluxPipeline.from_pretrained loads it).",
                 examples=["spatialcore sft train --config configs/sft/tiny_cpu_grid_perfect.yaml steps=4 "
                           "max_minutes=0 batch_size=8 eval_every=4 eval_prompts=2 --out runs/sft-quick",
                           "spatialcore sft train --config configs/sft/tiny_cpu_grid_perfect.yaml steps=2 "
                           "max_minutes=0 batch_size=8 eval_every=2 data.source=pairs data.path=runs/pairs-grid "
                           "'grid_prompts=[the red circle is left of the blue square]' policy.lora_rank=4 "
                           "--out runs/sft-quick-lora"])
    _add_out(s)
    _add_json(s, "the final metrics")
    _add_config_args(s, "steps=500 policy.lora_rank=8")
    _add_run_args(s)
    s.set_defaults(func=_cmd_sft_train)


def _add_eval(sub) -> None:
    """``spatialcore eval``."""
    p = _command(sub, "eval", help="spatial evaluation of a generator (detector + GenEval's position rule)",
                 description="Sample N images per prompt with fixed seeds from a Flux checkpoint (+ policy), judge "
                             "each with a detector and GenEval's position rule, and report objects found, relation "
                             "accuracy, a per-relation table and (with --reward-model) SpatialScore: eval.json, "
                             "eval.md, grid.png, samples.jsonl in --out.",
                 examples=["spatialcore eval --model assets/tiny_generator --prompts synthetic:easy_grid --n-prompts 4 "
                           "-n 2 --out runs/eval-base",
                           "spatialcore eval --model assets/tiny_generator --lora runs/grpo-quick/policy --prompts "
                           "synthetic:easy_grid --n-prompts 4 -n 2 --reward-model runs/reward-quick/model "
                           "--out runs/eval-policy --json runs/eval-policy.json"])
    p.add_argument("--model", required=True, metavar="DIR|HUB_ID", help="Flux pipeline (e.g. runs/sft_tiny/pipeline)")
    p.add_argument("--lora", metavar="DIR", help="policy folder written by grpo train (out/policy)")
    p.add_argument("--prompts", default=None, metavar="SOURCE",
                   help="synthetic:easy|medium|hard|easy_grid (held-out test prompts), GenEval metadata .jsonl, or a "
                        "text file of synthetic-grammar prompts (default: the generator's training preset, else "
                        "synthetic:easy)")
    p.add_argument("--n-prompts", type=int, default=64, help="prompts taken from the source (default 64)")
    p.add_argument("-n", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="noise seeds derive from it (and the synthetic prompts)")
    # Unset, these four come from the generator's spatialcore_run.json (sft train writes one), else the defaults.
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: as trained, else 12)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: as trained, else 32)")
    p.add_argument("--guidance", type=float, default=None, help="default: as trained, else 3.5")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 tokens, longer prompts are refused (default: as trained, else 64)")
    p.add_argument("--detector", default="oracle", metavar="oracle|DIR|HUB_ID",
                   help="the pixel oracle (synthetic scenes) or a zero-shot detector (OWLv2, Grounding DINO)")
    p.add_argument("--threshold", type=float, default=0.1, help="zero-shot detector score threshold")
    p.add_argument("--reward-model", metavar="DIR", help="SpatialScore folder: also report mean mu and sigma")
    p.add_argument("--batch", type=int, default=16, help="images per sampler call")
    _add_out(p, "where eval.json, eval.md, grid.png, images/ and samples.jsonl go", required=True)
    _add_json(p, "the summary")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.set_defaults(func=_cmd_eval)


def _add_export(sub) -> None:
    """``spatialcore export``."""
    p = _command(sub, "export", help="a diffusers-loadable generator from any checkpoint of a grpo or sft run",
                 description="Write the policy of a grpo run (LoRA file, or transformer/) or the pipeline of an sft "
                             "run from CHECKPOINT: a run folder (its newest complete checkpoint) or one of its "
                             "checkpoints/step_N folders.",
                 examples=["spatialcore export runs/grpo-quick --out runs/grpo-quick-export",
                           "spatialcore export runs/sft-quick-lora/checkpoints/step_00000002 --merged "
                           "--out runs/sft-quick-lora-2"])
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    _add_out(p, "the exported policy or pipeline folder", required=True)
    p.add_argument("--merged", action="store_true", help="LoRA: also write transformer/ with the adapter folded in")
    p.add_argument("--no-ema", action="store_true", help="the raw weights even when the run kept an EMA")
    p.set_defaults(func=_cmd_export)


def _add_sample(sub) -> None:
    """``spatialcore sample``."""
    p = _command(sub, "sample", help="generate images with a Flux checkpoint (+ a trained policy)",
                 description="Sample images from prompts with any Flux checkpoint, optionally with a trained policy "
                             "(LoRA or full transformer from `grpo train`); writes PNGs and samples.jsonl.",
                 examples=["spatialcore sample --model assets/tiny_generator --prompt \"the red circle is left of the "
                           "blue square\" -n 2 --size 32 --steps 12 --out runs/sample-quick",
                           "spatialcore sample --model assets/tiny_generator --seed 7 "
                           "--prompts-file configs/prompts/easy_grid_examples.txt -n 1 --size 32 --steps 12 --sde "
                           "--dtype float32 --out runs/sample-policy"])
    p.add_argument("--model", required=True, metavar="DIR|HUB_ID", help="Flux pipeline")
    p.add_argument("--lora", metavar="DIR", help="policy folder written by grpo train (out/policy)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", metavar="FILE", help="one prompt per line, or JSON Lines (.jsonl) with a "
                                                          "'prompt' field")
    _add_out(p, "where the PNGs and samples.jsonl go", required=True)
    p.add_argument("-n", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sde", action="store_true", help="stochastic (SDE) sampling instead of the ODE")
    p.add_argument("--compile", choices=["none", "regional", "full"], default="none")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.set_defaults(func=_cmd_sample)


_SUITES = {
    "score": "SpatialScore vs the stock path",
    "sample": "Flux eager vs compiled / float8",
    "grpo": "one Spatial-RL step",
    "kernels": "the Triton kernels against their references and baselines",
    "logprob": "stored vs recomputed SDE log-probs",
}


def _add_bench_profile(sub) -> None:
    """``spatialcore bench|profile SUITE``."""
    for name, helptext in (("bench", "benchmarks with same-run baselines -> JSON + Markdown"),
                           ("profile", "torch.profiler trace, top ops, NVTX phases, NVML timeline")):
        suites = list(_SUITES) if name == "bench" else ["score", "sample", "grpo"]
        p = _command(sub, name, help=helptext,
                     description=("Benchmark" if name == "bench" else "Profile") + " a suite: "
                     + ", ".join(f"{s} ({_SUITES[s]})" for s in suites) + ". --shape full builds FLUX.1-dev / "
                     "Qwen2.5-VL-7B shapes with random weights on the GPU; --shape tiny runs the tiny models anywhere. "
                     "key=value sets a suite parameter (an unknown key is refused with the list of known ones).",
                     examples=[f"spatialcore {name} score --tiny runs/tiny --reps 1 --warmup 0 --out runs/{name}-score",
                               f"spatialcore {name} grpo --tiny runs/tiny --reps 1 --warmup 0 group_size=4 top_k=1 "
                               f"--out runs/{name}-grpo"])
        p.add_argument("suite", choices=suites)
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="suite parameter, e.g. batch=8 or sizes=[512] (the suite's defaults: profiling/suites.py)")
        p.add_argument("--shape", choices=["tiny", "full"], default="tiny")
        _add_out(p, f"where the results go (default runs/{name})", default=f"runs/{name}")
        p.add_argument("--tiny", metavar="DIR", help="tiny checkpoints (default: build them in a temp folder)")
        p.add_argument("--device", default=None, help="default: cuda when available")
        p.add_argument("--reps", type=int, default=5 if name == "bench" else 1)
        p.add_argument("--warmup", type=int, default=2 if name == "bench" else 1)
        p.set_defaults(func=_cmd_bench if name == "bench" else _cmd_profile)


def _add_info(sub) -> None:
    """``spatialcore info``."""
    p = _command(sub, "info", help="versions, device, attention kernels available",
                 description="Print the environment: versions, device, GPUs (NVML), attention backends.",
                 examples=["spatialcore info", "spatialcore info --json -"])
    _add_json(p, "the report")
    p.set_defaults(func=_cmd_info)


def _add_config_cmd(sub) -> None:
    """``spatialcore config show``."""
    p = sub.add_parser("config", help="inspect run configs", description="Inspect run configs.")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    c = _command(csub, "show", help="print a validated config with defaults filled in and each key's help",
                 description="Load, validate and print a config: every key with its value (defaults filled in) and "
                             "its help as a YAML comment. The output is a valid config file.",
                 examples=["spatialcore config show grpo --config configs/grpo/tiny_cpu_grid_lcb.yaml",
                           "spatialcore config show reward lr=3e-4 --json -"])
    c.add_argument("kind", choices=sorted(_config_kinds()), help="which config")
    _add_json(c, "the resolved config (no comments)")
    _add_config_args(c, "seed=1")
    c.set_defaults(func=_cmd_config_show)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spatialcore",
        description="Spatially-aware text-to-image alignment: SpatialScore reward model and Spatial-RL on Flux.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_tiny, _add_demo, _add_data, _add_reward, _add_grpo, _add_sft, _add_eval, _add_sample, _add_export,
                _add_bench_profile, _add_info, _add_config_cmd):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value after an option (`--out D seed=1`) is an override too: argparse only takes the first run of them
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .logs import quiet_third_party

    quiet_third_party()
    from .errors import RunError

    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"spatialcore {args.command}: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except RunError as err:  # a run that cannot start or go on (torn checkpoints, non-finite losses)
        print(f"spatialcore {args.command}: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print(f"spatialcore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
