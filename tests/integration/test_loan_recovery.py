"""Crypto Loan after crashes, through gRPC and Kafka only (the wallet, the market and the
loan service as processes; no engine: these tests need none).

- A repayment's answer carries the amounts paid (interest first, then principal) on
  every path: the first call, a replay by its idempotency key, a call repeated after the
  service was SIGKILLed between the wallet calls and applying the repayment (it completes
  the pending operation), and a replay after the service's sweep completed it. The
  service kills itself at that point through its test hook ``EARN_CRASH_AFTER_WALLET``.
- Unreadable records of ``loan.actions`` (not an envelope; an action whose LTV is not a
  number) are parked in the loan schema's ``dead_letters``, counted
  (``earn_loan_dead_letters_total``) and passed; the engine's action after them is
  applied. Read again after a restart (the group's offset moved back), each is parked
  once and the action recorded once.
"""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction

import asyncpg
import grpc
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from earn.v1 import loan_pb2 as ln, wallet_pb2 as wp
from services.kernel import events
from services.kernel.clock import set_time
from tests.conftest import GATEWAY, OPERATOR, eventually, unique
from tests.integration.test_loan_e2e import FEE, RATE, TREASURY, World, at, floor_to, world

pytestmark = pytest.mark.integration


class Reference:
    """The loan's money by PRODUCT_RULES, with fractions: hour h charged at its start on
    the principal then; the exact total interest floored to 6 digits (USDT) enters the
    debt; a repayment pays interest first, then principal."""

    def __init__(self, principal: Decimal) -> None:
        self.principal = Fraction(principal)
        self.interest = Fraction(0)
        self.exact = Fraction(0)
        self.charged = Fraction(0)

    def charge_hour(self) -> None:
        self.exact += self.principal * Fraction(RATE)
        now = Fraction(floor_to(self.exact, 6))
        self.interest += now - self.charged
        self.charged = now

    def repay(self, amount: str) -> tuple[Decimal, Decimal]:
        a = Fraction(Decimal(amount))
        interest = min(a, self.interest)
        self.interest -= interest
        self.principal -= a - interest
        return Decimal(interest.numerator) / interest.denominator, Decimal((a - interest).numerator) / (a - interest).denominator


def paid(reply: ln.RepayLoanResponse) -> tuple[Decimal, Decimal]:
    assert reply.interest_paid and reply.principal_paid, reply
    return Decimal(reply.interest_paid), Decimal(reply.principal_paid)


async def restart_loan(w: World, **env: str) -> None:
    """Reap the killed loan service and start it again on the same address."""
    proc = w.processes["loan"]
    proc.kill()
    proc.env.update(env)
    proc.start()
    await asyncio.to_thread(proc.wait_ready, 60)


async def test_repayment_answer_carries_the_amounts_after_a_crash(stack) -> None:  # type: ignore[no-untyped-def]
    """Operations executed by the first process: the borrow (1), a repayment (2), a
    repayment killed after its wallet calls (3). The second process completes that one
    when the call is repeated (its 1st operation) and dies in the next repayment (2nd);
    the third leaves it to the sweep, then the call is replayed."""
    async with world(stack, "loanresume", engine=False, loan_env={"EARN_CRASH_AFTER_WALLET": "3"}) as w:
        await w.open_desk("1000000")
        await w.wallet.Deposit(wp.DepositRequest(idempotency_key=unique(), owner="rita", asset="BTC", amount="1"), metadata=OPERATOR)
        await w.tick("BTC/USDT", "60000", at(9))
        loan = (await w.loan.Borrow(ln.BorrowRequest(idempotency_key=unique(), user_id="rita", loan_asset="USDT", amount="30000",
                                                     collateral=[ln.LoanCollateralAmount(asset="BTC", amount="1")],
                                                     term=ln.LOAN_TERM_FLEXIBLE), metadata=GATEWAY)).loan
        ref = Reference(Decimal(30000))

        def repay(key: str, amount: str) -> ln.RepayLoanRequest:
            return ln.RepayLoanRequest(idempotency_key=key, user_id="rita", loan_id=loan.loan_id, amount=amount)

        async def principal() -> Decimal:
            return Decimal((await w.loan.GetLoan(ln.GetLoanRequest(user_id="rita", loan_id=loan.loan_id), metadata=GATEWAY)).loan.principal)

        # 1. first call and a replay by key: the same amounts
        set_time(w.clock, at(70))  # hour H0+1h has started: one hour of interest
        ref.charge_hour()
        first = await w.loan.RepayLoan(repay("r0", "100"), metadata=GATEWAY)
        assert paid(first) == ref.repay("100") == (Decimal("0.15"), Decimal("99.85"))
        assert await w.loan.RepayLoan(repay("r0", "100"), metadata=GATEWAY) == first

        # 2. killed after the wallet moved the money, before the repayment was applied;
        #    the same call to the restarted service completes it and answers with the amounts
        set_time(w.clock, at(130))
        ref.charge_hour()
        with pytest.raises(grpc.aio.AioRpcError):
            await w.loan.RepayLoan(repay("r1", "200"), metadata=GATEWAY)
        assert w.processes["loan"].popen is not None and w.processes["loan"].popen.wait(30) == -9
        await restart_loan(w, EARN_CRASH_AFTER_WALLET="2")
        resumed = await w.loan.RepayLoan(repay("r1", "200"), metadata=GATEWAY)
        assert paid(resumed) == ref.repay("200") == (Decimal("0.1495"), Decimal("199.8505"))
        assert Decimal(resumed.loan.principal) == ref.principal == Decimal("29700.2995")
        assert await w.loan.RepayLoan(repay("r1", "200"), metadata=GATEWAY) == resumed

        # 3. killed again; this time the sweep completes the repayment (the operation older
        #    than EARN_PENDING_GRACE_SECONDS on the service's clock), then a replay by key
        set_time(w.clock, at(190))
        ref.charge_hour()
        with pytest.raises(grpc.aio.AioRpcError):
            await w.loan.RepayLoan(repay("r2", "300"), metadata=GATEWAY)
        expected = ref.repay("300")
        set_time(w.clock, at(191))
        await restart_loan(w, EARN_CRASH_AFTER_WALLET="0", EARN_SWEEP_SECONDS="0.2")

        async def swept() -> None:
            assert await principal() == ref.principal

        await eventually(swept, timeout=30)
        replay = await w.loan.RepayLoan(repay("r2", "300"), metadata=GATEWAY)
        assert paid(replay) == expected == (Decimal("0.148502"), Decimal("299.851498"))
        assert Decimal(replay.loan.principal) == ref.principal

        # each repayment moved the money once
        interest = Decimal("0.15") + Decimal("0.1495") + Decimal("0.148502")
        assert await w.balance("rita", "USDT") == 30000 - 600
        assert await w.balance("loan", "USDT", FEE) == interest
        assert await w.balance("loan", "USDT", TREASURY) == 1000000 - 30000 + 600 - interest
        totals = await w.wallet.GetLedgerTotals(wp.GetLedgerTotalsRequest(), metadata=OPERATOR)
        assert all(Decimal(t.sum) == 0 for t in totals.totals), totals


def dead_letter_count(url: str) -> float:
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(s.value for f in text_string_to_metric_families(body) for s in f.samples if s.name == "earn_loan_dead_letters_total")


async def test_unreadable_loan_actions_are_parked_once_and_the_next_action_applied(stack) -> None:  # type: ignore[no-untyped-def]
    async with world(stack, "loandead", engine=False) as w:
        await w.open_desk("100000")
        await w.wallet.Deposit(wp.DepositRequest(idempotency_key=unique(), owner="sam", asset="BTC", amount="1"), metadata=OPERATOR)
        await w.tick("BTC/USDT", "60000", at(9))
        loan = (await w.loan.Borrow(ln.BorrowRequest(idempotency_key=unique(), user_id="sam", loan_asset="USDT", amount="30000",
                                                     collateral=[ln.LoanCollateralAmount(asset="BTC", amount="1")],
                                                     term=ln.LOAN_TERM_FLEXIBLE), metadata=GATEWAY)).loan

        def envelope(ltv: str) -> bytes:
            batch = ln.LoanActions(actions=[ln.LoanLtvAction(
                loan_id=loan.loan_id, user_id="sam", version=loan.version, kind=ln.LOAN_EVENT_KIND_MARGIN_CALL, ltv=ltv,
                prices={"BTC": "37500"}, debt_units="30000000000", charged_through=0, seq=1)])
            return events.wrap(batch, key="ltv-0", producer="test", occurred_at=datetime.now(UTC), event_id=uuid.uuid4()).SerializeToString()

        topic = w.prefix + "loan.actions"
        garbage, bad_ltv, good = b"\x07 not a protobuf \xff", envelope("eighty percent"), envelope("4/5")
        offsets = [(await w.producer.send_and_wait(topic, value, key=b"ltv-0", partition=0)).offset for value in (garbage, bad_ltv, good)]
        assert offsets == sorted(offsets)

        async def called_once() -> None:
            assert [e.kind for e in await w.events("sam", loan.loan_id)] == [ln.LOAN_EVENT_KIND_MARGIN_CALL]

        await eventually(called_once, timeout=30)
        db = await asyncpg.connect(stack.settings.database_url.rsplit("/", 1)[0] + "/" + w.database)
        try:
            async def parked() -> list[asyncpg.Record]:
                return await db.fetch('SELECT topic, "partition", "offset", error, raw FROM loan.dead_letters ORDER BY "offset"')

            rows = await parked()
            assert [(r["topic"], r["partition"], r["offset"], bytes(r["raw"])) for r in rows] == [
                (topic, 0, offsets[0], garbage), (topic, 0, offsets[1], bad_ltv)]
            assert "not a loan action" in rows[0]["error"] and "ltv 'eighty percent' is not a number" in rows[1]["error"], rows
            loan_proc = w.processes["loan"]
            assert loan_proc.metrics_url
            assert await asyncio.to_thread(dead_letter_count, loan_proc.metrics_url) == 2

            # stopped, its group's offset moved back to the garbage, started again: the three
            # records are read again; nothing is parked or recorded twice
            loan_proc.stop()
            group = AIOKafkaConsumer(bootstrap_servers=stack.settings.kafka_bootstrap, group_id=w.prefix + "loan-actions",
                                     enable_auto_commit=False)
            await group.start()
            try:
                tp = TopicPartition(topic, 0)
                group.assign([tp])
                assert await group.committed(tp) == offsets[2] + 1
                await group.commit({tp: offsets[0]})
            finally:
                await group.stop()
            loan_proc.start()
            await asyncio.to_thread(loan_proc.wait_ready, 60)

            async def read_again() -> None:
                probe = AIOKafkaConsumer(bootstrap_servers=stack.settings.kafka_bootstrap, group_id=w.prefix + "loan-actions",
                                         enable_auto_commit=False)
                await probe.start()
                try:
                    assert await probe.committed(TopicPartition(topic, 0)) == offsets[2] + 1
                finally:
                    await probe.stop()

            await eventually(read_again, timeout=30)
            assert [(r["offset"], bytes(r["raw"])) for r in await parked()] == [(offsets[0], garbage), (offsets[1], bad_ltv)]
            await called_once()
            assert await asyncio.to_thread(dead_letter_count, loan_proc.metrics_url) == 0
        finally:
            await db.close()
