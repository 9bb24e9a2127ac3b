"""Domain errors: what went wrong, in words a caller can act on.

Domain and store code raise these; the gRPC layer (``services.kernel.grpcserver``) maps
each to its status code. They know nothing of gRPC themselves.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base class; ``code`` names the gRPC status the API layer returns."""

    code = "UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DomainError):
    """A field breaks its rule. The message names the field and the rule."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field


class NotFound(DomainError):
    code = "NOT_FOUND"


class FailedPrecondition(DomainError):
    """The request is well formed but the state forbids it (balance, quota, paused...)."""

    code = "FAILED_PRECONDITION"


class AlreadyExists(DomainError):
    """An idempotency key reused with a different request, or a duplicate natural key."""

    code = "ALREADY_EXISTS"


class PermissionDenied(DomainError):
    code = "PERMISSION_DENIED"


class Unauthenticated(DomainError):
    code = "UNAUTHENTICATED"


class InsufficientFunds(FailedPrecondition):
    """An account that may not go negative would."""

    def __init__(self, account: str, asset: str, shortfall: str) -> None:
        super().__init__(f"insufficient funds in {account}: short by {shortfall} {asset}")
        self.account = account
        self.shortfall = shortfall
