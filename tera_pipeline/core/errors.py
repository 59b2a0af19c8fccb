"""The base of the project's refusals: an error a user can act on, printed as one line."""


class TeraError(RuntimeError):
    """A refusal or failure explained in one line (the CLI prints it and exits 2)."""


class GenerationError(TeraError):
    """A job that cannot start or continue (bad checkpoint for the layout, ...)."""


class RunStopped(GenerationError):
    """The run was asked to stop (Ctrl-C, SIGTERM): finished blocks are kept, to resume."""


class InputError(TeraError, ValueError):
    """An input that cannot be used; the message is one line naming the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


class AnalysisError(TeraError, ValueError):
    """An analysis that cannot run on this store (missing arrays, unknown genes, ...)."""
