"""The base of the project's refusals: an error a user can act on, printed as one line."""


class TeraError(RuntimeError):
    """A refusal or failure explained in one line (the CLI prints it and exits 2)."""
