"""The one exception type that means "the user asked for something wrong".

The CLI prints its message on one line and exits with status 2; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a path, a value, a file. The message says which and why."""
