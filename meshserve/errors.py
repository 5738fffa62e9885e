"""One error type for bad user input, so every door (CLI, HTTP, Python) reports it the same way."""


class InputError(ValueError):
    """Bad input: names the offending field and what is allowed.

    The CLI prints it as one line and exits with code 2; the HTTP server answers 400.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def require(condition: bool, field: str, message: str) -> None:
    """Raise InputError(field, message) unless condition holds."""
    if not condition:
        raise InputError(field, message)
