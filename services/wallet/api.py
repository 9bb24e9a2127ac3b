"""Wallet gRPC servicer: validate and convert, then one transaction per write.

Every write validates the whole request before touching the database (bad input
writes nothing), then runs under its idempotency key (``idempotency.write_once``).
PlaceHolds that arrive together share one transaction (group commit, each still its own
posting and hold under its own key: ``idempotency.claim_many``), and so do ReleaseHolds
and CaptureHolds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg
import grpc
from google.protobuf.message import Message

from services.kernel import idempotency, paging
from services.kernel.clock import optional_timestamp_field
from services.kernel.config import Settings
from services.kernel.errors import DomainError, InvalidArgument, NotFound
from services.kernel.groupcommit import GroupCommit
from services.kernel.grpcserver import GATEWAY, OPERATOR, SERVICE
from services.kernel.money import format_amount, parse_amount
from services.wallet import domain, store
from services.wallet.domain import AccountKey, Kind, Order

from earn.v1 import wallet_pb2, wallet_pb2_grpc

SERVICE_NAME = "earn.v1.WalletService"
# PlaceHolds posted in one transaction at most.
HOLD_BATCH = 256

_WRITERS = frozenset({SERVICE, OPERATOR})
_READERS = frozenset({GATEWAY, SERVICE, OPERATOR})
ROLES = {
    f"{SERVICE_NAME}/{method}": roles
    for method, roles in {
        "Transfer": _WRITERS,
        "TransferBatch": _WRITERS,
        "BulkCredit": _WRITERS,
        "PlaceHold": _WRITERS,
        "ReleaseHold": _WRITERS,
        "CaptureHold": _WRITERS,
        "GetHold": _READERS,
        "Deposit": frozenset({OPERATOR}),
        "Withdraw": frozenset({OPERATOR}),
        "GetBalances": _READERS,
        "ListTransfers": _READERS,
        "GetLedgerTotals": frozenset({OPERATOR}),
    }.items()
}


def _kind(value: int, field: str) -> Kind | None:
    if value == wallet_pb2.ACCOUNT_KIND_UNSPECIFIED:
        return None
    try:
        return store.KIND_FROM_PROTO[value]
    except KeyError:
        raise InvalidArgument(field, f"unknown account kind {value}") from None


def _order(spec: wallet_pb2.TransferSpec, field: str) -> Order:
    return domain.order(
        asset=spec.asset,
        source=(spec.source.owner, _kind(spec.source.kind, f"{field}.source.kind")),
        destination=(spec.destination.owner, _kind(spec.destination.kind, f"{field}.destination.kind")),
        amount=spec.amount,
        reference=spec.reference,
        field=field,
    )


def _id(value: str, field: str) -> int:
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise InvalidArgument(field, "must be a decimal id")
    return int(value)


def _user_account(request, kind: Kind) -> tuple[str, AccountKey]:  # type: ignore[no-untyped-def]
    """The (owner, asset) of a user-scoped request, validated."""
    owner = domain.check_name(request.owner, "owner")
    asset = domain.check_asset(request.asset)
    return asset, AccountKey(owner, asset, kind)


@dataclass(frozen=True, slots=True)
class _Hold:
    """A validated PlaceHold waiting for its asset's next batch."""

    request: wallet_pb2.PlaceHoldRequest
    order: Order
    holder: str


@dataclass(frozen=True, slots=True)
class _Settle:
    """A validated ReleaseHold (``destination`` None: back to the owner's funding) or
    CaptureHold waiting for the next batch of its kind."""

    request: wallet_pb2.ReleaseHoldRequest | wallet_pb2.CaptureHoldRequest
    hold_id: int
    destination: tuple[str, Kind] | None

    def target(self, hold: domain.HoldState) -> AccountKey:
        if self.destination is None:
            return AccountKey(hold.owner, hold.asset, Kind.FUNDING)
        return AccountKey(self.destination[0], hold.asset, self.destination[1])


# The posting kind (also the idempotency method) of a settlement and its response.
_SETTLED: dict[str, type[Message]] = {"hold_release": wallet_pb2.ReleaseHoldResponse, "hold_capture": wallet_pb2.CaptureHoldResponse}

B = TypeVar("B")


class _Refused(Exception):
    """Rolls back a round of a batch in which some items were refused (by batch index)."""

    def __init__(self, errors: dict[int, DomainError]) -> None:
        super().__init__(f"{len(errors)} refused")
        self.errors = errors


def _raise_refused(errors: dict[int, DomainError]) -> None:
    if errors:
        raise _Refused(errors)


class WalletApi(wallet_pb2_grpc.WalletServiceServicer):
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        # Concurrent PlaceHolds of one asset share a transaction (group commit).
        self._holds: GroupCommit[str, _Hold, wallet_pb2.PlaceHoldResponse] = GroupCommit(self._place_holds, max_items=HOLD_BATCH)
        # And releases and captures, by kind.
        self._settles: GroupCommit[str, _Settle, Message] = GroupCommit(self._settle_holds, max_items=HOLD_BATCH)

    # ---- transfers ------------------------------------------------------------------

    async def _single(self, method: str, request, response_type, item: Order):  # type: ignore[no-untyped-def]
        async def work(conn: asyncpg.Connection):  # type: ignore[no-untyped-def]
            posted = await store.post(conn, self.settings, method.lower(), [item])
            return response_type(
                transfer=store.transfer_message(posted.transfer_ids[0], posted.posting_id, item, posted.created_at)
            )

        return await idempotency.write_once(self.pool, method=method, request=request, response_type=response_type, work=work)

    async def Transfer(self, request: wallet_pb2.TransferRequest, context: grpc.aio.ServicerContext) -> wallet_pb2.TransferResponse:
        idempotency.check_key(request.idempotency_key)
        if not request.HasField("transfer"):
            raise InvalidArgument("transfer", "is required")
        return await self._single("Transfer", request, wallet_pb2.TransferResponse, _order(request.transfer, "transfer"))

    async def TransferBatch(self, request: wallet_pb2.TransferBatchRequest, context: grpc.aio.ServicerContext) -> wallet_pb2.TransferBatchResponse:
        idempotency.check_key(request.idempotency_key)
        if not request.transfers:
            raise InvalidArgument("transfers", "must hold at least one transfer")
        if len(request.transfers) > domain.MAX_BATCH:
            raise InvalidArgument("transfers", f"at most {domain.MAX_BATCH} transfers per batch")
        orders = [_order(spec, f"transfers[{i}]") for i, spec in enumerate(request.transfers)]

        async def work(conn: asyncpg.Connection) -> wallet_pb2.TransferBatchResponse:
            posted = await store.post(conn, self.settings, "batch", orders)
            response = wallet_pb2.TransferBatchResponse(posting_id=str(posted.posting_id), transfer_count=len(orders))
            response.created_at.FromDatetime(posted.created_at)
            return response

        return await idempotency.write_once(
            self.pool, method="TransferBatch", request=request, response_type=wallet_pb2.TransferBatchResponse, work=work
        )

    async def BulkCredit(self, request: wallet_pb2.BulkCreditRequest, context: grpc.aio.ServicerContext) -> wallet_pb2.BulkCreditResponse:
        idempotency.check_key(request.idempotency_key)
        bulk = domain.bulk_credit(
            asset=request.asset,
            source=(request.source.owner, _kind(request.source.kind, "source.kind")),
            owners=request.owners,
            amounts=request.amounts,
            references=request.references,
            reference=request.reference,
        )

        async def work(conn: asyncpg.Connection) -> wallet_pb2.BulkCreditResponse:
            posted = await store.post_bulk_credit(conn, self.settings, "bulk_credit", bulk)
            response = wallet_pb2.BulkCreditResponse(
                posting_id=str(posted.posting_id), credit_count=len(bulk.owners), total=format_amount(posted.total)
            )
            response.created_at.FromDatetime(posted.created_at)
            return response

        return await idempotency.write_once(
            self.pool, method="BulkCredit", request=request, response_type=wallet_pb2.BulkCreditResponse, work=work
        )

    async def _external(self, method: str, request, response_type, *, inbound: bool):  # type: ignore[no-untyped-def]
        idempotency.check_key(request.idempotency_key)
        asset, user = _user_account(request, Kind.FUNDING)
        world = AccountKey("exchange", asset, Kind.EXTERNAL)
        amount = parse_amount(request.amount, asset)
        reference = domain.check_reference(request.reference)
        source, destination = (world, user) if inbound else (user, world)
        return await self._single(method, request, response_type, Order(asset, source, destination, amount, reference))

    async def Deposit(self, request: wallet_pb2.DepositRequest, context: grpc.aio.ServicerContext) -> wallet_pb2.DepositResponse:
        return await self._external("Deposit", request, wallet_pb2.DepositResponse, inbound=True)

    async def Withdraw(self, request: wallet_pb2.WithdrawRequest, context: grpc.aio.ServicerContext) -> wallet_pb2.WithdrawResponse:
        return await self._external("Withdraw", request, wallet_pb2.WithdrawResponse, inbound=False)

    # ---- holds ----------------------------------------------------------------------

    async def PlaceHold(self, request: wallet_pb2.PlaceHoldRequest, context: grpc.aio.ServicerContext) -> wallet_pb2.PlaceHoldResponse:
        idempotency.check_key(request.idempotency_key)
        asset, funding = _user_account(request, Kind.FUNDING)
        owner = funding.owner
        holder = domain.check_name(request.holder, "holder")
        amount = parse_amount(request.amount, asset)
        reference = domain.check_reference(request.reference)
        item = Order(asset, funding, AccountKey(owner, asset, Kind.HOLD), amount, reference)
        return await self._holds.submit(asset, _Hold(request, item, holder))

    async def _in_rounds(self, batch: list[B], one_round: Callable[[list[B]], Awaitable[list[object]]]) -> list[Any]:
        """Group commit with refusals that write nothing: ``one_round`` runs the pending
        items in one transaction and returns every outcome when it commits; when some are
        refused (``_Refused``) it rolls back, only those are decided, and the others run
        again in the next round without them."""
        outcomes: list[object] = [None] * len(batch)
        pending = list(range(len(batch)))
        while pending:
            try:
                decided = await one_round([batch[k] for k in pending])
            except _Refused as refused:
                decided = [refused.errors.get(k) for k in range(len(pending))]
            for k, outcome in zip(pending, decided, strict=True):
                outcomes[k] = idempotency.Duplicate(pending[outcome.index]) if isinstance(outcome, idempotency.Duplicate) else outcome
            pending = [k for k in pending if outcomes[k] is None]
        return idempotency.with_duplicates(outcomes)

    async def _place_holds(self, asset: str, batch: list[_Hold]) -> list[wallet_pb2.PlaceHoldResponse | DomainError]:
        """The PlaceHolds of one asset that arrived together, in one transaction (group
        commit): each is its own posting and hold, as if placed one after another; one
        that would overdraw gets its FAILED_PRECONDITION and writes nothing."""
        return await self._in_rounds(batch, self._hold_round)

    async def _hold_round(self, batch: list[_Hold]) -> list[object]:
        async with self.pool.acquire() as conn, conn.transaction():
            outcomes: list[object] = await idempotency.claim_many(conn, "PlaceHold", [h.request for h in batch], wallet_pb2.PlaceHoldResponse)
            todo = [k for k, claim in enumerate(outcomes) if claim is None]
            if todo:
                posted = await store.post_many(conn, self.settings, "hold_place", [[batch[k].order] for k in todo], [batch[k].holder for k in todo])
                _raise_refused({k: p for k, p in zip(todo, posted, strict=True) if not isinstance(p, store.Posted)})
                rows = await store.insert_holds(conn, [(batch[k].order, batch[k].holder) for k in todo], posted[0].created_at)
                for k, row in zip(todo, rows, strict=True):
                    outcomes[k] = wallet_pb2.PlaceHoldResponse(hold=store.hold_message(row))
                await idempotency.store_responses(conn, [(batch[k].request.idempotency_key, outcomes[k]) for k in todo])
        return outcomes

    async def _settle_holds(self, kind: str, batch: list[_Settle]) -> list[Message | DomainError]:
        """Releases (or captures) that arrived together, in one transaction (group
        commit): their holds locked in id order, each its own posting, as if settled one
        after another (two on one hold see what the first left); a refused one writes
        nothing."""
        return await self._in_rounds(batch, lambda pending: self._settle_round(kind, pending))

    async def _settle_round(self, kind: str, batch: list[_Settle]) -> list[object]:
        response_type = _SETTLED[kind]
        async with self.pool.acquire() as conn, conn.transaction():
            outcomes: list[object] = await idempotency.claim_many(conn, kind, [h.request for h in batch], response_type)
            todo = [k for k, claim in enumerate(outcomes) if claim is None]
            holds = await store.lock_holds(conn, sorted({batch[k].hold_id for k in todo})) if todo else {}
            refused: dict[int, DomainError] = {}
            settled: list[tuple[int, domain.HoldState, Decimal]] = []  # (batch index, hold before, amount)
            for k in todo:
                item = batch[k]
                try:
                    hold = holds.get(item.hold_id)
                    if hold is None:
                        raise NotFound(f"hold_id: no hold {item.hold_id}")
                    amount = domain.settle_amount(hold, item.request.amount)
                except DomainError as err:
                    refused[k] = err
                    continue
                settled.append((k, hold, amount))
                holds[item.hold_id] = replace(hold, remaining=hold.remaining - amount)
            _raise_refused(refused)
            if settled:
                orders = [
                    Order(h.asset, AccountKey(h.owner, h.asset, Kind.HOLD), batch[k].target(h), amount, f"hold:{h.hold_id}")
                    for k, h, amount in settled
                ]
                posted = await store.post_many(conn, self.settings, kind, [[o] for o in orders], [h.holder for _, h, _ in settled])
                _raise_refused({k: p for (k, _, _), p in zip(settled, posted, strict=True) if not isinstance(p, store.Posted)})
                rows = await store.reduce_holds(conn, [(h.hold_id, amount) for _, h, amount in settled], posted[0].created_at)
                for k, h, amount in settled:
                    outcomes[k] = response_type(hold=store.hold_message({**rows[h.hold_id], "remaining": h.remaining - amount}))
                await idempotency.store_responses(conn, [(batch[k].request.idempotency_key, outcomes[k]) for k, _, _ in settled])
        return outcomes

    async def ReleaseHold(self, request: wallet_pb2.ReleaseHoldRequest, context: grpc.aio.ServicerContext) -> wallet_pb2.ReleaseHoldResponse:
        idempotency.check_key(request.idempotency_key)
        return await self._settles.submit("hold_release", _Settle(request, _id(request.hold_id, "hold_id"), None))

    async def CaptureHold(self, request: wallet_pb2.CaptureHoldRequest, context: grpc.aio.ServicerContext) -> wallet_pb2.CaptureHoldResponse:
        idempotency.check_key(request.idempotency_key)
        owner = domain.check_name(request.destination.owner, "destination.owner")
        kind = _kind(request.destination.kind, "destination.kind")
        if kind is None:
            raise InvalidArgument("destination.kind", "is required")
        if kind is Kind.HOLD:
            raise InvalidArgument("destination.kind", "a capture cannot go to a hold account")
        return await self._settles.submit("hold_capture", _Settle(request, _id(request.hold_id, "hold_id"), (owner, kind)))

    async def GetHold(self, request: wallet_pb2.GetHoldRequest, context: grpc.aio.ServicerContext) -> wallet_pb2.GetHoldResponse:
        return wallet_pb2.GetHoldResponse(hold=store.hold_message(await store.get_hold(self.pool, _id(request.hold_id, "hold_id"))))

    # ---- queries --------------------------------------------------------------------

    async def GetBalances(self, request: wallet_pb2.GetBalancesRequest, context: grpc.aio.ServicerContext) -> wallet_pb2.GetBalancesResponse:
        owner = domain.check_name(request.owner, "owner")
        if request.asset:
            domain.check_asset(request.asset)
        rows = await store.balances(self.pool, owner, request.asset)
        return wallet_pb2.GetBalancesResponse(
            balances=[
                wallet_pb2.Balance(owner=r["owner"], asset=r["asset"], kind=store.KIND_TO_PROTO[Kind(r["kind"])], balance=format_amount(r["balance"]))
                for r in rows
            ]
        )

    async def ListTransfers(self, request: wallet_pb2.ListTransfersRequest, context: grpc.aio.ServicerContext) -> wallet_pb2.ListTransfersResponse:
        if request.owner:
            domain.check_name(request.owner, "owner")
        if request.asset:
            domain.check_asset(request.asset)
        posting_id = _id(request.posting_id, "posting_id") if request.posting_id else None
        size = paging.page_size(request.page_size)
        created_from = optional_timestamp_field(request, "created_from")
        created_to = optional_timestamp_field(request, "created_to")
        # Bulk credits enter the history (and get transfer ids) when folded: fold what this
        # listing would miss. An unfiltered listing shows them once the folder has run.
        if request.owner:
            await store.fold_owner(self.pool, request.owner)
        if posting_id is not None:
            await store.fold_posting(self.pool, posting_id)
        rows = await store.list_transfers(
            self.pool,
            owner=request.owner,
            asset=request.asset,
            posting_id=posting_id,
            created_from=created_from,
            created_to=created_to,
            after_id=paging.after(request.page_token, "t"),
            limit=size + 1,
        )
        page = rows[:size]
        response = wallet_pb2.ListTransfersResponse(
            transfers=[
                store.transfer_message(
                    r["id"],
                    r["posting_id"],
                    Order(r["asset"], AccountKey(r["s_owner"], r["asset"], Kind(r["s_kind"])), AccountKey(r["d_owner"], r["asset"], Kind(r["d_kind"])), r["amount"], r["reference"]),
                    r["created_at"],
                )
                for r in page
            ]
        )
        if len(rows) > size:
            response.next_page_token = paging.token("t", page[-1]["id"])
        return response

    async def GetLedgerTotals(self, request: wallet_pb2.GetLedgerTotalsRequest, context: grpc.aio.ServicerContext) -> wallet_pb2.GetLedgerTotalsResponse:
        rows = await store.ledger_totals(self.pool)
        return wallet_pb2.GetLedgerTotalsResponse(
            totals=[
                wallet_pb2.AssetTotal(asset=r["asset"], sum=format_amount(r["total"]), accounts=r["accounts"], negative_user_accounts=r["negative_user_accounts"])
                for r in rows
            ]
        )

