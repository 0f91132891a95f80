"""The one exception type a user can cause; the CLI prints its message without a traceback."""


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, paths): the message says what to do."""
