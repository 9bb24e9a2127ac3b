"""Crypto Loan's per-loan advisory lock when the database session is lost mid-operation
(seen in the `mixed` chaos scenario: PostgreSQL SIGKILLed while a repayment waited on
the wallet): the error that interrupted the operation is what the caller gets (a lost
database or an unavailable wallet answers UNAVAILABLE, retry with the same key), not the
failed unlock (INTERNAL, a final refusal); the lock does not outlive the session."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import asyncpg
import pytest

from services.kernel.peers import Unavailable
from services.loan.api import LoanApi, _lock_key

pytestmark = pytest.mark.integration


async def _kill_backend(url: str, pid: int) -> None:
    admin = await asyncpg.connect(url, timeout=10)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()


async def test_lost_session_answers_with_the_interrupting_error_and_frees_the_lock(stack) -> None:  # type: ignore[no-untyped-def]
    url = stack.settings.database_url
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    assert pool is not None
    api = SimpleNamespace(pool=pool)
    try:
        # the wallet call fails after the session died: Unavailable, not the unlock's error
        with pytest.raises(Unavailable):
            async with LoanApi._locked(api, "ln-lost") as conn:  # type: ignore[arg-type]
                await _kill_backend(url, await conn.fetchval("SELECT pg_backend_pid()"))
                raise Unavailable("wallet is unavailable; retry with the same key")
        # the operation itself went through before the session died: no error at all
        async with LoanApi._locked(api, "ln-lost") as conn:  # type: ignore[arg-type]
            await _kill_backend(url, await conn.fetchval("SELECT pg_backend_pid()"))
        # the lock did not outlive its session: the loan can be locked again
        async with asyncio.timeout(60):
            async with LoanApi._locked(api, "ln-lost") as conn:  # type: ignore[arg-type]
                assert await conn.fetchval("SELECT 1") == 1
        # a healthy lock and unlock leave the loan's lock free for any session
        other = await asyncpg.connect(url, timeout=10)
        try:
            assert await other.fetchval("SELECT pg_try_advisory_lock($1)", _lock_key("ln-lost"))
        finally:
            await other.close()
    finally:
        await pool.close()
