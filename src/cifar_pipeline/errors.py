"""The base of every error a user can fix (bad params, a bad archive, divergence)."""


class PipelineError(Exception):
    """A stage stops with this error's one-line message instead of a traceback."""
