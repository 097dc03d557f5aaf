"""The one exception type that reaches users as a one-line message (the CLI prints it, no traceback)."""


class KtnasError(Exception):
    """A problem with the user's input or environment, with the fix in the message.

    The message is a single line: what is wrong, then what to do about it.
    """
