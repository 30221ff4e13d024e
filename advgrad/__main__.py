"""``python -m advgrad`` runs the command line."""

from advgrad.cli import app

app(prog_name="advgrad")
