"""One exception type for every input problem, so the CLI can print it cleanly and exit non-zero."""


class PretraceError(Exception):
    """A problem with the user's input or files; the message names the problem and the fix."""
