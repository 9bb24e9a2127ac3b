"""The kernel's authorization with mTLS: the role comes from the certificate's identity
(grpcserver.IDENTITY_ROLES); only `tool` names its role by token; without TLS, tokens."""

from __future__ import annotations

import pytest

from services.kernel.errors import PermissionDenied, Unauthenticated
from services.kernel.grpcserver import GATEWAY, OPERATOR, SERVICE, _Interceptor

TOKENS = {"dev-gateway": GATEWAY, "dev-operator": OPERATOR, "dev-service": SERVICE}
METHOD = "earn.v1.WalletService/Deposit"
ROLES = {METHOD: frozenset({OPERATOR})}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_certificate_identity_decides_the_role_and_tokens_are_ignored() -> None:
    auth = _Interceptor(ROLES, TOKENS, mtls=True)._authorize
    caller = auth(METHOD, {}, "operator")
    assert (caller.role, caller.identity, caller.token_hint) == (OPERATOR, "operator", "")
    with pytest.raises(PermissionDenied):
        auth(METHOD, bearer("dev-operator"), "gateway")  # a token does not upgrade a certificate
    with pytest.raises(PermissionDenied, match="'service'"):
        auth(METHOD, bearer("dev-operator"), "simple_earn")


def test_tool_identity_names_its_role_by_token() -> None:
    auth = _Interceptor(ROLES, TOKENS, mtls=True)._authorize
    assert auth(METHOD, bearer("dev-operator"), "tool").role == OPERATOR
    with pytest.raises(PermissionDenied):
        auth(METHOD, bearer("dev-gateway"), "tool")
    with pytest.raises(Unauthenticated):
        auth(METHOD, {}, "tool")


@pytest.mark.parametrize("identity", ["mallory", "", "Operator"])
def test_unknown_identities_are_unauthenticated(identity: str) -> None:
    with pytest.raises(Unauthenticated):
        _Interceptor(ROLES, TOKENS, mtls=True)._authorize(METHOD, bearer("dev-operator"), identity)


def test_without_tls_tokens_as_before() -> None:
    auth = _Interceptor(ROLES, TOKENS)._authorize
    assert auth(METHOD, bearer("dev-operator")).role == OPERATOR
    with pytest.raises(Unauthenticated):
        auth(METHOD, {})
