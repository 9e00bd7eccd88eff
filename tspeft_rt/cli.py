"""The `tspeft-rt` command line.

    tspeft-rt train configs/ts_lora_arc_easy.yaml [--set key=value ...] [--resume]
    tspeft-rt config            # every training option with its help and default
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import click

from tspeft_rt import __version__
from tspeft_rt.errors import TspeftError


class _Group(click.Group):
    """Reports tspeft-rt's own errors as one line and exit status 2, never as a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TspeftError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tspeft-rt")
def main() -> None:
    """tspeft-rt: train, export and serve token-selective (TS-PEFT) LoRA/DoRA adapters."""


@main.command()
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (YAML value), e.g. --set steps=50 --set tasks=[piqa].")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in output_dir.")
def train(config_file: str | None, overrides: tuple[str, ...], resume: bool) -> None:
    """Train a token-gated adapter (or a dense baseline) from CONFIG_FILE (YAML)."""
    from tspeft_rt.config import load_config
    from tspeft_rt.trainer import train as run

    cfg = load_config(config_file, overrides)
    result = run(cfg, resume=resume)
    if os.environ.get("RANK", "0") == "0":
        click.echo(json.dumps(result, indent=1))


@main.command("config")
def show_config() -> None:
    """List every training option with its default and help."""
    from tspeft_rt.config import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        click.echo(f"{f.name} = {default!r}\n    {f.metadata['help']}")


if __name__ == "__main__":
    main()
