"""The one exception type users see: a message that names what is wrong and what is expected."""


class KvcError(Exception):
    """A user-facing error. The CLI prints `kvc: error: <message>` and exits 2, with no traceback."""
