"""The one exception type for bad input (jobs print its message on one line and exit 2), and the
storage failures that are not bad input's fault."""


class InputError(ValueError):
    """Input the user can fix: a missing column, a wrong vector length, a corrupt model version.

    The message names the file, column or row and says what to do; it is shown without a
    stack trace.
    """


class StorageRefused(InputError):
    """Storage that answered no: a missing bucket, access denied, no credentials. The user fixes the
    configuration; the input itself may be fine, so a run's staged work is kept."""


class DataRefused(InputError):
    """A batch whose data checks (vae.monitoring.datachecks) refuse it: nothing was embedded. Jobs exit
    with DATA_REFUSED_EXIT, which the pipeline's data_refused decision shares."""

    def __init__(self, message: str, checks: list[dict]):
        super().__init__(message)
        self.checks = checks


DATA_REFUSED_EXIT = 8


class StorageUnavailable(RuntimeError):
    """Storage that did not answer after the retries: not bad input. Run the same command again."""


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """The first line of an error's message (or the exception's type when it has none), shortened."""
    text = str(error).strip()
    if not text:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    return text.splitlines()[0][:limit]
