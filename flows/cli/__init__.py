"""The ``tera`` command: each module registers its commands on the one ``app``."""

from flows.cli import generate  # noqa: F401, I001  (registers the commands, in this order)
from flows.cli import analyze, inputs, outputs, train, view  # noqa: F401
from flows.cli.common import app

__all__ = ["app"]
