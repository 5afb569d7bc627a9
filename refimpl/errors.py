"""The one exception type refimpl raises for bad input.

Every message is a single readable line meant for the user; the CLI prints it to stderr and
exits non-zero without a traceback.
"""


class RefimplError(Exception):
    """An error with a one-line message meant for the user."""


class ConfigError(RefimplError):
    """A configuration field is missing, of the wrong type, or inconsistent."""


class CheckpointError(RefimplError):
    """A checkpoint file or tensor is missing, corrupt, misshaped or disagrees with the config."""


class InputError(RefimplError):
    """A runtime input (token ids, option value) is out of range."""
