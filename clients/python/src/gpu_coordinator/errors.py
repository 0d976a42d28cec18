"""The errors of the client: each carries the coordinator's reason where it gave one."""

from __future__ import annotations


class CoordinatorError(Exception):
    """Something the coordinator answered, or failed to answer."""

    #: Whether this is the coordinator's own answer (the request ended there), not a local failure.
    answered: bool = False


class GrantTimeout(CoordinatorError):
    """No GPU was granted within `timeout_ms` (or no answer came at all)."""


class Rejected(CoordinatorError):
    """The coordinator refused the input; the message is its sentence saying what to fix."""


class LeaseLost(CoordinatorError):
    """The lease ended while in use: revoked by the coordinator (expired, a pause not acknowledged in
    time), or given up by the client when no renewal was confirmed in time (cut off from the
    coordinator). Stop using the GPU."""


class Unavailable(CoordinatorError):
    """The coordinator could not be reached (NATS or HTTP down) within the time allowed."""
