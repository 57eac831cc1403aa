"""The `alloy` command: parses flags, calls the library, prints. No merge logic lives here.

User errors (`ModelAlloyError`) become one line on stderr and exit code 2; a traceback means a
bug of ours (or `--debug`).

The commands live by group (`merging`, `compose`, `evaluation`, `studies`; what they share in
`common`); this module puts them together into `app`, in the order `alloy --help` lists them.
"""

from __future__ import annotations

import sys

import typer

from modelalloy.cli import common, compose, evaluation, merging, studies

app = typer.Typer(
    name="alloy",
    help="Merge the weights of trained language models (mergekit-compatible configs).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.callback()(common.app_callback)

app.command()(merging.merge)
app.command()(merging.plan)
app.command()(merging.verify)
app.command()(merging.methods)

app.command()(compose.moe)
app.command("stack")(compose.stack_cmd)
app.command("graft")(compose.graft_cmd)

app.command()(evaluation.stats)
app.command(name="eval")(evaluation.eval_)
app.command()(evaluation.rate)
app.command()(evaluation.analyze)
app.command(name="report")(evaluation.report_)

app.command()(studies.demo)
app.command("demo-search")(studies.demo_search)
app.command()(studies.search)
app.command()(studies.study)
app.command("demo-study")(studies.demo_study)

lora_app = typer.Typer(help="LoRA adapters: fold into a model, combine, extract.", no_args_is_help=True)
lora_app.command("apply")(compose.lora_apply)
lora_app.command("combine")(compose.lora_combine)
lora_app.command("extract")(compose.lora_extract)
app.add_typer(lora_app, name="lora")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        common.err.print("interrupted; nothing was renamed into place (the partial output is in OUT.partial/)")
        sys.exit(130)

