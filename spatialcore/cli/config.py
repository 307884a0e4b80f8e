"""``spatialcore config show KIND``: a validated config with every key's help."""

from __future__ import annotations

import argparse

from ..config import load_config, to_dict
from ..config_reference import CONFIG_KINDS, config_class
from .common import add_config_args, add_json, command, emit_json, group


def add(sub) -> None:
    csub = group(sub, "config", help="inspect run configs", description="Inspect run configs.")
    c = command(csub, "show", help="print a validated config with defaults filled in and each key's help",
                description="Load, validate and print a config: every key with its value (defaults filled in) and "
                            "its help as a YAML comment. The output is a valid config file.",
                examples=["spatialcore config show grpo --config configs/grpo/tiny_cpu_grid_lcb.yaml",
                          "spatialcore config show reward optim.lr=3e-4 --json -"])
    c.add_argument("kind", choices=sorted(CONFIG_KINDS), help="which config")
    add_json(c, "the resolved config (no comments)")
    add_config_args(c, "seed=1")
    c.set_defaults(func=show)


def show(args: argparse.Namespace) -> int:
    from ..config import to_commented_yaml

    cfg = load_config(config_class(args.kind), args.config, args.overrides)
    if not emit_json(args.json, to_dict(cfg)):
        print(to_commented_yaml(cfg), end="")
    return 0
