"""The ``spatialcore`` command: one module per verb, each holding its parser (``add``) beside its handlers.

Each verb imports heavy libraries only when it runs, so ``spatialcore --help`` answers at once. One grammar for
all of them:

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
import sys

from ..config import ConfigError
from . import bench, config, data, demo, eval, export, grpo, info, plan, reward, sample, sft, tiny
from .common import EXIT_CONFIG

VERBS = (tiny, demo, data, reward, grpo, sft, eval, sample, export, plan, bench, info, config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spatialcore",
        description="Spatially-aware text-to-image alignment: SpatialScore reward model and Spatial-RL on Flux.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for verb in VERBS:
        verb.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value after an option (`--out D seed=1`) is an override too: argparse only takes the first run of them
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from ..logs import quiet_third_party

    quiet_third_party()
    from ..errors import RunError

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
