"""The kernel server answers UNAVAILABLE (retry with the same key), not INTERNAL, when a
request fails because PostgreSQL went away (restart, crash): the mixed chaos scenario
SIGKILLs the postmaster while commands are in flight."""

from __future__ import annotations

import asyncpg
import pytest

from services.kernel.grpcserver import database_unavailable


@pytest.mark.parametrize("err", [
    ConnectionRefusedError(111, "Connection refused"),
    ConnectionResetError(104, "Connection reset by peer"),
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.exceptions.CrashShutdownError("terminating connection because of crash of another server process"),
    asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
    asyncpg.exceptions.ConnectionFailureError("connection failure"),
    # seen when the postmaster was SIGKILLed during a Deposit's transaction
    asyncpg.exceptions.InterfaceError("cannot call Transaction.__aexit__(): the underlying connection is closed"),
    # a pooled connection left broken by the SIGKILLed postmaster (mixed chaos, seed 494376015)
    asyncpg.exceptions.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
])
def test_a_lost_database_is_unavailable(err: BaseException) -> None:
    assert database_unavailable(err)


@pytest.mark.parametrize("err", [
    ValueError("bug"),
    FileNotFoundError(2, "No such file or directory"),
    asyncpg.exceptions.UniqueViolationError("duplicate key"),
    asyncpg.exceptions.InterfaceError("cannot perform operation: another operation is in progress"),
])
def test_other_errors_stay_internal(err: BaseException) -> None:
    assert not database_unavailable(err)
