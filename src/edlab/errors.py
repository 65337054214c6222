"""The one exception type the command line turns into a single clear line and a non-zero exit."""


class EdlabError(Exception):
    """A user-facing error: bad input, missing file, invalid config. Its message is the whole report."""
