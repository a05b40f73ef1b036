"""The exception types every input problem is raised as, so the CLI can print it cleanly and exit 2."""


class PretraceError(Exception):
    """A problem with the user's input or files; the message names the problem and the fix."""


class CorruptFile(PretraceError):
    """A file pretrace wrote no longer matches the checksum written with it (bit rot, truncation, an edit): work
    state that raises it is recomputed, a result that raises it is refused."""
