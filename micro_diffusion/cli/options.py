"""Command-line options that may also come from a YAML file, shared by `convert`, `precompute`, `latent-stats`.

`--config job.yaml` sets defaults for the other options (keys are the option names with underscores, e.g.
`min_size: 256`); options given on the command line win. An unknown key in the YAML file is an error.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml


def parse_with_config(
    parser: argparse.ArgumentParser, argv: list[str] | None, required: tuple[str, ...] = ()
) -> argparse.Namespace:
    """Parse `argv` with the defaults of `parser` replaced by the YAML file named by `--config`, if any.

    `required` names options (by their dest) that must be set by one of the two.
    """
    parser.add_argument("--config", type=Path, help="YAML file whose keys set defaults for the options above")
    known, _ = parser.parse_known_args(argv)
    if known.config is not None:
        options = set(vars(known)) - {"config"}
        parser.set_defaults(**_load_yaml_options(parser, known.config, options))
    args = parser.parse_args(argv)
    missing = [name for name in required if getattr(args, name) is None]
    if missing:
        parser.error(
            f"missing option(s) {', '.join('--' + m.replace('_', '-') for m in missing)} (CLI or --config)"
        )
    return args


def parse_key_values(pairs: list[str] | dict[str, Any] | None, option: str) -> dict[str, Any]:
    """["root=/data", "min=3"] -> {"root": "/data", "min": 3}; values are parsed as YAML scalars or lists.

    A mapping (as written in a YAML config) is returned as it is.
    """
    if isinstance(pairs, dict):
        return dict(pairs)
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise SystemExit(f"{option} expects KEY=VALUE, got {pair!r}")
        options[key.replace("-", "_")] = yaml.safe_load(value) if value else ""
    return options


def _load_yaml_options(parser: argparse.ArgumentParser, path: Path, options: set[str]) -> dict[str, Any]:
    if not path.is_file():
        parser.error(f"config file {path} does not exist")
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        parser.error(f"config file {path} must hold a mapping of option names to values")
    unknown = sorted(set(values) - options)
    if unknown:
        parser.error(f"config file {path}: unknown option(s) {unknown}; known: {sorted(options)}")
    return values
