"""The one root of nextstate's errors (schemas.errors), with a subclass per layer.

Messages name the values they saw. Only the HTTP edge turns these into status codes.
"""

from schemas.errors import DecodeError, NextstateError, SchemaError  # noqa: F401  (the root lives at the bottom)


class ConfigError(NextstateError):
    """Settings that cannot be used as given."""


class StackError(NextstateError):
    """The local stack (Kafka, registry, MinIO) could not be installed, started or reached."""


class DeliveryError(NextstateError):
    """Kafka did not acknowledge a produced record."""


class StorageError(NextstateError):
    """The object store refused or lost an object."""


class GatewayError(NextstateError):
    """The recording gateway, SDK or spool refused a request or could not record an event."""


class ChatError(NextstateError):
    """Messages or tools that cannot be rendered into a prompt (serving.chat)."""


class ServingError(NextstateError):
    """A serving engine could not load, sample or score as asked."""


class ContextLengthError(ServingError):
    """A prompt (plus the tokens asked for) longer than the model's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, max_context: int) -> None:
        super().__init__(
            f"prompt of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} exceeds the "
            f"model's context of {max_context} tokens"
        )
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.max_context = max_context


class ProcessorError(NextstateError):
    """A stream processor met a record it cannot use, or a judge/engine it cannot reach."""


class LearnerError(NextstateError):
    """The learner met a sample, checkpoint or model it cannot train with; names what it saw."""
