"""The root of every error nextstate raises on purpose, and the errors of the event layer.

It lives here, at the bottom, because schemas/ imports nothing of the other packages;
infra.errors re-exports these names and adds a subclass per layer above.
"""


class NextstateError(Exception):
    """Root of every error nextstate raises on purpose."""


class SchemaError(NextstateError):
    """An event that does not match its schema, or a schema the registry refused."""


class DecodeError(SchemaError):
    """A record read from Kafka that could not be decoded; names topic, partition and offset."""

    def __init__(self, topic: str, partition: int, offset: int, cause: str) -> None:
        super().__init__(
            f"cannot decode record at {topic}[{partition}]@{offset}: {cause}"
        )
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.cause = cause
