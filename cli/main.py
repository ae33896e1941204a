"""The `safeclip` command. Each command lives in its own module and registers here."""

from __future__ import annotations

import typer

from sanitize import __version__

from . import (data_cmds, demo_cmd, download_cmd, embed_cmd, eval_cmd, export_cmd, inspect_cmd, poison_cmd,
               pretrain_cmd, query_cmd, report_cmd, split_cmd, warmup_cmd)

app = typer.Typer(
    name="safeclip",
    help="Find poisoned and backdoored image-caption pairs and train CLIP models that stay clean "
         "(SafeCLIP, Yang et al., ICML 2024).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain help: click rewraps every paragraph to the terminal (80 columns reads well), and
    # flags show no `<bool>`; rich's boxed tables squeezed the help column on long pages.
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"safeclip {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """safeclip: make CLIP pre-training data safe."""


# Order here is the order in `safeclip --help`: the pipeline, then the tools around it.
for module in (demo_cmd, data_cmds, download_cmd, inspect_cmd, poison_cmd, warmup_cmd, embed_cmd, split_cmd,
               query_cmd, report_cmd, pretrain_cmd, eval_cmd, export_cmd):
    module.register(app)

if __name__ == "__main__":
    app()
