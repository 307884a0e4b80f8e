"""What every verb's parser shares: the subcommand with examples, ``--config`` with ``key=value`` overrides,
``--out``, ``--json``, and a trainer's ``--resume`` / ``--fresh``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXIT_CONFIG = 2


def command(sub, name: str, *, help: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
    """A subcommand whose help ends with ``examples`` (each one line, run from a checkout)."""
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    return sub.add_parser(name, help=help, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def group(sub, name: str, *, help: str, description: str):
    """A verb with actions (``spatialcore reward train|eval|score``): its subparsers."""
    p = sub.add_parser(name, help=help, description=description)
    actions = p.add_subparsers(dest=f"{name}_command", metavar="ACTION")
    actions.required = True
    return actions


def add_config_args(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (defaults apply to missing keys; `extends: "
                                                    "OTHER.yaml` lays it over another file)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"override config keys (dotted for nested ones), e.g. {example}; "
                        "`spatialcore config show` lists them")


def add_json(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", metavar="FILE", help=f"write {what} as JSON to FILE ('-': print it instead of the text)")


def emit_json(dest: str | None, obj) -> bool:
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


def add_out(p: argparse.ArgumentParser, what: str = "run folder (the config's out key)", **kw) -> None:
    p.add_argument("--out", metavar="DIR", help=what, **kw)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """--resume / --fresh of a trainer: the `run` key (a folder holding another config's run is refused)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="run_mode", action="store_const", const="resume",
                   help="continue the run in out (same config; an error if there is none)")
    g.add_argument("--fresh", dest="run_mode", action="store_const", const="fresh",
                   help="start over: an existing run in out is moved aside to out.replaced-<time>")


def add_trainer_args(p: argparse.ArgumentParser, *, result: str, example: str) -> None:
    """--out, --json, --config with overrides, --resume/--fresh: a trainer's options."""
    add_out(p)
    add_json(p, result)
    add_config_args(p, example)
    add_run_args(p)


def train_overrides(args: argparse.Namespace) -> list[str]:
    """The trainer's overrides with --out (out=) and --resume/--fresh (run=) folded in."""
    return (list(args.overrides) + ([f"out={args.out}"] if args.out else [])
            + ([f"run={args.run_mode}"] if args.run_mode else []))


def device_of(arg: str | None) -> str:
    """``--device``, or cuda when a GPU is there."""
    import torch

    return arg or ("cuda" if torch.cuda.is_available() else "cpu")
