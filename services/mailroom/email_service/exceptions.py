class InvalidEmailRequest(ValueError):
    """A request to send email that can never succeed; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class IdempotencyConflict(Exception):
    """An ``Idempotency-Key`` reused with a different request."""

    def __init__(self, key: str, message_id: object) -> None:
        super().__init__(f"Idempotency-Key {key!r} was already used for a different request")
        self.key = key
        self.message_id = message_id


class SenderNotAllowed(InvalidEmailRequest):
    """A sender outside what the caller (its API key, or the process's settings) may use."""


class IllegalState(InvalidEmailRequest):
    """A change the object's current state does not allow (pausing a finished campaign,
    adding recipients to a cancelled one): the HTTP API answers 409 ``invalid_state``."""
