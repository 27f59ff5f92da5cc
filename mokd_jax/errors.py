"""One exception type for bad user input (config, data, checkpoint).

Every message names the field, the offending value and what is allowed, on one line, so
that `main` can print it as is and exit without a traceback.
"""


class InputError(ValueError):
    """Bad user input; the message is one line: field, value, what is allowed."""


def invalid(field: str, value: object, allowed: str) -> InputError:
    """Builds the InputError for `field` holding `value`, saying what is `allowed`."""
    return InputError(f"{field}={value!r} is not allowed: {allowed}")
