"""The one exception type for bad input: jobs print its message on one line and exit non-zero."""


class InputError(ValueError):
    """Input the user can fix: a missing column, a wrong vector length, a corrupt model version.

    The message names the file, column or row and says what to do; it is shown without a
    stack trace.
    """
