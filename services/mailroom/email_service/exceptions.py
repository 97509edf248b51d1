class InvalidEmailRequest(ValueError):
    """A request to send email that can never succeed; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
