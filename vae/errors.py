"""The one exception type for bad input: jobs print its message on one line and exit non-zero."""


class InputError(ValueError):
    """Input the user can fix: a missing column, a wrong vector length, a corrupt model version.

    The message names the file, column or row and says what to do; it is shown without a
    stack trace.
    """


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """The first line of an error's message (or the exception's type when it has none), shortened."""
    text = str(error).strip()
    if not text:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    return text.splitlines()[0][:limit]
