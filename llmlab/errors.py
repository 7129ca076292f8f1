"""One exception type for mistakes a user can fix; the CLI prints its message without a traceback."""


class LLMLabError(Exception):
    """A user-facing error: the message names the file, line or field at fault and what to do."""
