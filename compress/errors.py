"""The one exception type users see. Its message is a complete, one-paragraph explanation."""


class DitCompressError(Exception):
    """A user-facing error: what went wrong, where (file, pass, field, layer) and what was expected."""
