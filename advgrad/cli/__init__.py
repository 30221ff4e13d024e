"""The ``advgrad`` command line: thin Typer commands over the library, a module per command.

:mod:`~advgrad.cli.options` declares the options that several commands share and
:mod:`~advgrad.cli.reports` what they print. Heavy imports (numba, h5py, rich, the kernels)
happen inside the commands, so ``--help`` is fast.
"""

import typer

from advgrad.cli import attack, certify, convert, evaluate, gradcheck, info, show, train

app = typer.Typer(
    name="advgrad",
    help="Exact, fast adversarial examples for two-layer sigmoid networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
for command in (
    attack.attack,
    evaluate.evaluate,
    certify.certify,
    info.info,
    gradcheck.gradcheck,
    train.train,
    show.show,
):
    app.command()(command)
app.command("convert-model")(convert.convert_model)
app.command("convert-data")(convert.convert_data)

__all__ = ["app"]
