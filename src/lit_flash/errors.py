"""The one exception type for mistakes the user can fix."""


class LitFlashError(ValueError):
    """Bad input: the message names the flag, key or file to fix.

    The CLI prints it as a single line and exits with status 2 instead of a traceback.
    """


class NonFiniteLossError(LitFlashError):
    """The training loss became NaN or infinite (`model.on_nonfinite=stop`); the message names the step."""
