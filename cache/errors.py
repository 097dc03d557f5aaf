"""The one exception type that reaches users as a one-line message (the CLI prints it, no traceback). Every ktnas
package may import this module (the kernels too: their KernelError is one); it imports nothing."""


class KtnasError(Exception):
    """A problem with the user's input or environment, with the fix in the message.

    The message is a single line: what is wrong, then what to do about it.
    """


def first_line(e: BaseException, limit: int = 120) -> str:
    """The first line of ``e``'s message (its type's name when it has none), cut to ``limit`` characters: the
    part of a foreign exception a one-line KtnasError quotes."""
    return (str(e).splitlines() or [type(e).__name__])[0][:limit]
