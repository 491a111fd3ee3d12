"""Run a pipeline file (yamls/*.yaml) stage by stage, skipping finished stages and resuming an interrupted one.

    python scripts/train_pipeline.py yamls/microdit_xl2.yaml data.datadir=/mnt/latents
    python scripts/train_pipeline.py yamls/tiny.yaml --nproc 2 data.datadir=datadir/tiny
    python scripts/train_pipeline.py yamls/demo.yaml --var out=/tmp/demo demo_dit_pretrain:trainer.max_duration=50ba

The file format, markers and resuming: micro_diffusion/pipeline.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from micro_diffusion.pipeline import load_pipeline, parse_variables, run_pipeline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", type=Path, help="pipeline file, e.g. yamls/microdit_xl2.yaml")
    parser.add_argument("--nproc", type=int, default=None, help="processes per node (default: the file's nproc)")
    parser.add_argument("--var", action="append", metavar="NAME=VALUE", help="a value of the file's vars, repeatable")
    parser.add_argument(
        "overrides", nargs="*",
        help="KEY=VALUE: a Hydra override for every training stage; STAGE:ARGUMENT: for the stage of that name",
    )  # fmt: skip
    args = parser.parse_intermixed_args(argv)
    try:
        pipeline = load_pipeline(args.pipeline, args.overrides, args.nproc, parse_variables(args.var))
    except ValueError as error:
        parser.error(str(error))
    run_pipeline(pipeline)


if __name__ == "__main__":
    main()
