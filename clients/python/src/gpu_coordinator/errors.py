"""The errors of the client: each carries the coordinator's reason where it gave one."""

from __future__ import annotations

from enum import Enum
from typing import Optional


class RejectCode(str, Enum):
    """Why the coordinator rejected an input: the stable `code` of a `rejected` reply (its `error` is
    the sentence for a person, and may change). A code a newer coordinator adds is kept as its text."""

    INVALID_INPUT = "invalid_input"
    UNKNOWN_SERVICE = "unknown_service"
    REQUEST_ID_TAKEN = "request_id_taken"
    PRIORITY_NOT_ALLOWED = "priority_not_allowed"
    UNKNOWN_GPU = "unknown_gpu"
    TOO_MANY_REQUESTS = "too_many_requests"
    TOO_LARGE = "too_large"
    OVER_SERVICE_LIMIT = "over_service_limit"
    UNPLACEABLE = "unplaceable"
    UNKNOWN_REQUEST = "unknown_request"
    ALREADY_ENDED = "already_ended"
    STALE_FENCE = "stale_fence"
    NOT_HOLDING = "not_holding"
    PAUSE_DEADLINE_PASSED = "pause_deadline_passed"
    UNEXPECTED_ACK = "unexpected_ack"
    HOLDS_GPU = "holds_gpu"


#: The codes of a renewal's rejection that mean the lease is gone: the request ended, holds nothing,
#: or missed its pause deadline.
LEASE_GONE = frozenset(
    {
        RejectCode.ALREADY_ENDED,
        RejectCode.NOT_HOLDING,
        RejectCode.PAUSE_DEADLINE_PASSED,
        RejectCode.UNKNOWN_REQUEST,
    }
)


def reject_code(value: object) -> "Optional[RejectCode | str]":
    """The `code` field of a reply: a known `RejectCode`, the text of one this version does not know,
    or `None` when there is none (an older coordinator, an HTTP refusal of the token)."""
    if not isinstance(value, str):
        return None
    try:
        return RejectCode(value)
    except ValueError:
        return value


class CoordinatorError(Exception):
    """Something the coordinator answered, or failed to answer."""

    #: Whether this is the coordinator's own answer (the request ended there), not a local failure.
    answered: bool = False


class GrantTimeout(CoordinatorError):
    """No GPU was granted within `timeout_ms` (or no answer came at all)."""


class Rejected(CoordinatorError):
    """The coordinator refused the input; the message is its sentence saying what to fix, and `code`
    the reason to decide on (`None` for a refusal of the HTTP API itself: a 401 or 403 for the token)."""

    def __init__(self, message: str, code: "Optional[RejectCode | str]" = None) -> None:
        super().__init__(message)
        self.code = code


class LeaseLost(CoordinatorError):
    """The lease ended while in use: revoked by the coordinator (expired, a pause not acknowledged in
    time), or given up by the client when no renewal was confirmed in time (cut off from the
    coordinator). Stop using the GPU."""


class Unavailable(CoordinatorError):
    """The coordinator could not be reached (NATS or HTTP down) within the time allowed."""
