"""Every command's ``--help`` ends with examples, and each example runs as printed from a checkout.

The examples build on each other in the order below (``tiny`` writes runs/tiny, ``data synth`` runs/pairs-grid,
``reward train`` runs/reward-quick, ...), as a user following the help from the top would run them. Each is
parsed out of the help text itself, so an example that drifts from the code fails here."""

import argparse
import os
import shlex
from pathlib import Path

import pytest

from spatialcore.cli import build_parser, main

CHECKOUT = Path(__file__).resolve().parents[1]
ORDER = ["tiny", "data synth", "data validate", "data stats", "reward train", "reward eval", "reward calibrate", "sample", "reward score",
         "grpo train", "grpo compare", "sft train", "sft text-sides", "eval", "data judged", "export", "plan", "bench", "profile", "info", "config show", "demo"]


def leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) of every command that runs (not a group of actions)."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield " ".join(path), parser
    for group in groups:
        for name, sub in group.choices.items():
            yield from leaf_commands(sub, (*path, name))


def examples(parser: argparse.ArgumentParser) -> list[str]:
    text = parser.format_help()
    if "\nexamples:\n" not in text:
        return []
    block = text.split("\nexamples:\n", 1)[1]
    return [line.strip() for line in block.splitlines() if line.startswith("  spatialcore ")]


def test_every_command_has_examples_and_a_place_in_the_walk():
    leaves = dict(leaf_commands(build_parser()))
    assert sorted(leaves) == sorted(ORDER)
    for name, parser in leaves.items():
        found = examples(parser)
        assert found, f"`spatialcore {name} --help` shows no example"
        assert all(f"{e} ".startswith(f"spatialcore {name} ") or e.startswith("spatialcore config show")
                   for e in found), found


def test_override_help_names_keys_of_its_own_command():
    """Each `key=value` help line shows keys of that command's config (no `reward.text_layers=3` everywhere)."""
    from spatialcore.config import ConfigError, load_config
    from spatialcore.config_reference import config_class

    kinds = {"tiny": "tiny", "demo": "demo", "data synth": "synth", "reward train": "reward", "grpo train": "grpo",
             "sft train": "sft", "config show": None}
    for name, parser in leaf_commands(build_parser()):
        if name not in kinds or kinds[name] is None:
            continue
        action = next(a for a in parser._actions if a.dest == "overrides")
        shown = action.help.split("e.g. ", 1)[1].split(";", 1)[0].split()
        cls = config_class(kinds[name])
        try:
            load_config(cls, None, shown)
        except ConfigError as err:  # pragma: no cover - the message names the key
            pytest.fail(f"`spatialcore {name} --help` shows {shown}: {err}")


@pytest.fixture
def checkout_cwd(tmp_path, monkeypatch):
    """A working folder that looks like a checkout (configs/, assets/) with nothing built yet."""
    import torch

    for name in ("configs", "assets"):
        os.symlink(CHECKOUT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)


def test_every_example_runs_as_printed(checkout_cwd, capsys):
    leaves = dict(leaf_commands(build_parser()))
    ran = 0
    for name in ORDER:
        for example in examples(leaves[name]):
            rc = main(shlex.split(example)[1:])
            err = capsys.readouterr().err
            assert rc == 0, f"{example}\n-> exit {rc}: {err[-2000:]}"
            ran += 1
    assert ran >= 2 * len(ORDER) - 2
    # what the examples promise to write is there
    for path in ("runs/tiny/flux/model_index.json", "runs/pairs-grid/pairs.jsonl", "runs/grid-stats.json",
                 "runs/reward-quick/model", "runs/reward-quick/control.json", "runs/scores.json",
                 "runs/grpo-quick/policy", "runs/grpo-quick-all/final.json", "runs/compare.png",
                 "runs/sft-quick/pipeline/model_index.json", "runs/eval-policy.json", "runs/pairs-judged/pairs.jsonl",
                 "runs/grpo-quick-export",
                 "runs/demo-smoke/REPORT.md"):
        assert (checkout_cwd / path).exists(), path


def test_bench_and_profile_describe_only_the_suites_they_take():
    from spatialcore.cli.bench import SUITES

    leaves = dict(leaf_commands(build_parser()))
    for name in ("bench", "profile"):
        parser = leaves[name]
        taken = next(a for a in parser._actions if a.dest == "suite").choices
        described = [s for s in SUITES if f"{s} (" in parser.description]
        assert described == list(taken), (name, described, taken)
