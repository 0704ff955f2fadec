"""The error a user's own input causes: the command line prints it as one line (exit status 2)."""


class UserError(Exception):
    """A problem with what the user asked for; the CLI prints it as one line, exit status 2."""
