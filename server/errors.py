"""Domain errors. Each carries what the HTTP layer needs to build an OpenAI-shaped body;
the one table that maps them to status codes is ``server.api.errors``.
No web framework is imported here: the engine and the pipeline raise these."""

from __future__ import annotations

from typing import Optional


class KnowmuxError(Exception):
    type = "server_error"
    code: Optional[str] = None

    def __init__(self, message: str, *, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(KnowmuxError):
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class UnknownStrategy(InvalidRequest):
    code = "unknown_strategy"


class UnknownExperiment(InvalidRequest):
    code = "unknown_experiment"


class PayloadTooLarge(InvalidRequest):
    code = "payload_too_large"


class NotFound(KnowmuxError):
    type = "not_found_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class StrategyUnavailable(KnowmuxError):
    """The strategy exists but cannot run now (for example: no documents ingested)."""

    type = "invalid_request_error"
    code = "strategy_unavailable"


class Conflict(KnowmuxError):
    """The request is valid but the resource's state does not allow it (e.g. cancelling a
    finished job)."""

    type = "invalid_request_error"
    code = "conflict"


class QueueFull(KnowmuxError):
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class EngineUnavailable(KnowmuxError):
    type = "server_error"
    code = "engine_unavailable"

    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(message)
        self.retry_after = retry_after


class EngineError(KnowmuxError):
    """The engine failed while generating this request."""

    type = "server_error"
    code = "engine_error"
