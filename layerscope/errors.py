"""The one error type users can cause, and nothing else."""


class LayerscopeError(Exception):
    """Bad input or an impossible request; the message names the file, tensor or field.

    The CLI prints it on a single line and exits with status 2.
    """
