"""Transactions: many postings that all apply or none does, across partitions.

Pure rules, like ``streams.domain``: no Kafka, no clock (the partition clock ``now``
is passed in). Two-phase commit over ``ledger.transfers``, driven by the account the
transaction is submitted to (its coordinator, which may or may not be a party):

1. The coordinator accepts a ``Transaction`` (``TransactionStarted``: its postings
   and a deadline) and sends a PREPARE to every account the postings name.
2. Each participant checks its postings (it exists, is open, in each posting's
   currency, at the version a posting expects of its source) and what the postings
   do to it net: paying out net, the funds must be there (``funds_rule``); taking in
   net, the balance must stay in range. If they hold, it reserves what it pays out
   (``TransactionReserved``, a hold: the available balance shows it, the balance does
   not change) and votes yes; else it votes no, with the reason and the posting.
3. The first no, or the deadline passing without every answer (``ExpireTransaction``,
   issued by the worker's timer), rejects the transaction (``TransactionRejected``)
   and every participant is sent an ABORT, which releases what it reserved
   (``TransactionReleased``). Every yes commits it (``TransactionCommitted``) and every
   participant is sent a COMMIT, which posts its postings (``TransactionPosted``: the
   balance changes by what they move, the reservation ends).

A participant's balance changes only at commit, and only once every participant had
reserved: a committed transaction's postings all apply, a rejected one's none. The
messages are signed like a transfer's legs, idempotent at the receiver (a PREPARE is
remembered for the idempotency window; a COMMIT or ABORT acts only on a reservation
that is there), and an ABORT that arrives before its PREPARE is remembered so that the
PREPARE then reserves nothing. A yes vote for a transaction the coordinator has
rejected (or no longer knows) is answered with an ABORT.

``Reverse`` starts a transaction of the opposite postings of a committed one of the
same coordinator, or of a transfer of which it is the source, linked both ways
(``reverses`` on the new one, ``reversed_by`` on the record of the original), once: a
second reversal is refused while the first is pending or once it committed; a rejected
reversal frees the original again. A transfer's source keeps a record of it for this
(``transfer_record``: committed once debited, rejected once refunded; kept either way, so
its id stays used); its destination,
asked to reverse it, refuses if it refused the credit (``prepare``'s ``refunded``): the
credit leg reaches it before the reversal's PREPARE, both on its partition of
``ledger.transfers`` in the order the source sent them.
"""

from __future__ import annotations

from schemas.models import (
    AccountState,
    CommandBase,
    ExpireTransaction,
    Posting,
    Reverse,
    Transaction,
    TransactionCommitted,
    TransactionMessage,
    TransactionPosted,
    TransactionRecord,
    TransactionRejected,
    TransactionReleased,
    TransactionReserved,
    TransactionStarted,
    TransferLeg,
)
from streams import core
from streams.domain import (
    Decision,
    Reason,
    Refused,
    _event,
    _open,
    check_command,
    reject,
    reservation_id,
)


def participants(postings: list[Posting]) -> list[str]:
    """The accounts the postings name, each once, in the order they first appear."""
    return core.participants(plain(postings))


def _message(kind: str, record: TransactionRecord, account_id: str, issued_at: int,
             **fields: object) -> TransactionMessage:
    return TransactionMessage.trusted(**{
        "kind": kind, "transaction_id": record.transaction_id,
        "coordinator_account_id": record.coordinator_account_id, "account_id": account_id,
        "postings": record.postings, "accepted": False, "reason": None, "detail": None,
        "posting_index": -1, "issued_at": issued_at, "actor": record.actor,
        "correlation_id": record.correlation_id, "expires_at": 0, "reverses": record.reverses,
        "metadata": record.metadata, "signature": b"", **fields})


def transfer_record(leg: TransferLeg, state: str) -> TransactionRecord:
    """A transfer's record at its source, from its credit leg (``state`` committed) or its
    refund (rejected): what ``Reverse`` needs of it."""
    source, destination = leg.from_account_id, leg.to_account_id
    posting = Posting.trusted(from_account_id=source, to_account_id=destination,
                              amount_minor=leg.amount_minor, currency=leg.currency,
                              expected_version=None)
    return TransactionRecord.trusted(
        transaction_id=leg.transfer_id, coordinator_account_id=source, postings=[posting],
        participants=[source, destination], voted=[], state=state, deadline=0,
        issued_at=leg.issued_at, actor=leg.actor, correlation_id=leg.correlation_id,
        reverses=None, reversed_by=None, metadata=leg.metadata, transfer=True)


# ---------------------------------------------------------------- at the coordinator


def start(state: AccountState | None, c: Transaction | Reverse, postings: list[Posting],
          now: int, timeout_ms: int, reverses: str | None = None,
          ) -> tuple[Decision, TransactionRecord | None]:
    """A transaction (or a reversal: ``reverses``) accepted at its coordinator, or refused."""
    try:
        check_command(c)
        s = _open(state, c)
    except Refused as r:
        return Decision(rejection=reject(c, r.reason, r.detail)), None
    payload = TransactionStarted.trusted(transaction_id=c.command_id, postings=postings,
                                         deadline=now + timeout_ms, reverses=reverses)
    event, after = _event(s, c.account_id, c.command_id, c.command_id, c.issued_at, c.actor,
                          c.correlation_id, payload, None, c.metadata)
    record = TransactionRecord.trusted(
        transaction_id=c.command_id, coordinator_account_id=c.account_id, postings=postings,
        participants=participants(postings), voted=[], state="pending",
        deadline=now + timeout_ms, issued_at=event.occurred_at, actor=c.actor,
        correlation_id=c.correlation_id, reverses=reverses, reversed_by=None,
        metadata=c.metadata, transfer=False)
    messages = tuple(_message("PREPARE", record, a, event.occurred_at)
                     for a in record.participants)
    return Decision(events=(event,), state_after=after, messages=messages), record


def reverse(state: AccountState | None, c: Reverse, original: TransactionRecord | None,
            now: int, timeout_ms: int) -> tuple[Decision, TransactionRecord | None]:
    """Start the opposite of ``original`` (this coordinator's record of that id: a
    transaction, or a transfer from this account)."""
    refused: tuple[Reason, str] | None = None
    what = f"{'transfer' if original and original.transfer else 'transaction'} " \
        f"{c.transaction_id!r}"
    if original is None:
        refused = Reason.TRANSACTION_NOT_FOUND, \
            f"no transaction or transfer {c.transaction_id!r} here"
    elif original.transfer and original.state == "rejected":
        refused = Reason.TRANSFER_REFUNDED, \
            f"{what} was refunded: account {original.participants[-1]!r} refused it"
    elif original.state != "committed":
        refused = Reason.TRANSACTION_NOT_COMMITTED, f"{what} is {original.state}"
    elif original.reversed_by is not None:
        refused = Reason.ALREADY_REVERSED, f"{what} is reversed by {original.reversed_by!r}"
    if refused is not None:
        return Decision(rejection=reject(c, *refused)), None
    assert original is not None
    opposite = [Posting.trusted(from_account_id=p.to_account_id, to_account_id=p.from_account_id,
                                amount_minor=p.amount_minor, currency=p.currency,
                                expected_version=None) for p in original.postings]
    return start(state, c, opposite, now, timeout_ms, reverses=c.transaction_id)


def vote(state: AccountState | None, record: TransactionRecord | None, m: TransactionMessage,
         ) -> tuple[Decision, TransactionRecord | None]:
    """A participant's answer: the coordinator commits on the last yes, rejects on a no."""
    if record is not None and m.account_id not in record.participants:
        return Decision(), record
    if record is None or record.state == "rejected":
        if not m.accepted:
            return Decision(), record
        # it reserved for a transaction that is over (or unknown here): release it
        abort = m.replace(kind="ABORT", accepted=False, reason=Reason.TRANSACTION_NOT_PENDING.value,
                          detail=None, posting_index=-1, expires_at=0, signature=b"")
        return Decision(messages=(abort,)), record
    if record.state == "committed":
        return Decision(), record
    if not m.accepted:
        return _end(state, record, m.issued_at, f"{record.transaction_id}:vote:{m.account_id}",
                    m.reason or Reason.INVALID_COMMAND.value, m.detail or "",
                    m.posting_index)
    if m.account_id not in record.voted:
        record = record.replace(voted=[*record.voted, m.account_id])
    if len(record.voted) < len(record.participants):  # (all in, still pending: a rebuild's)
        return Decision(), record
    return _end(state, record, m.issued_at, f"{record.transaction_id}:vote:{m.account_id}")


def expire(state: AccountState | None, record: TransactionRecord | None,
           c: ExpireTransaction, now: int) -> tuple[Decision, TransactionRecord | None]:
    """Reject a transaction still pending at its deadline (``now``: the partition clock)."""
    refused: tuple[Reason, str] | None = None
    if record is None:
        refused = Reason.TRANSACTION_NOT_FOUND, f"no transaction {c.transaction_id!r} here"
    elif record.state != "pending":
        refused = Reason.TRANSACTION_NOT_PENDING, \
            f"transaction {c.transaction_id!r} is {record.state}"
    elif now < record.deadline:
        refused = Reason.TRANSACTION_NOT_EXPIRED, \
            f"transaction {c.transaction_id!r} waits until {record.deadline}"
    if refused is not None or state is None:
        return Decision(rejection=reject(c, *(refused or (
            Reason.ACCOUNT_NOT_FOUND, f"account {c.account_id!r} does not exist")))), record
    assert record is not None
    silent = [a for a in record.participants if a not in record.voted]
    index = next((i for i, p in enumerate(record.postings)
                  if p.from_account_id in silent or p.to_account_id in silent), -1)
    return _end(state, record, c.issued_at, c.command_id, Reason.TRANSACTION_TIMED_OUT.value,
                f"no answer from {', '.join(silent) or 'a participant'} by {record.deadline}",
                index, command_id=c.command_id)


def _end(state: AccountState | None, record: TransactionRecord, issued_at: int, causation_id: str,
         reason: str | None = None, detail: str = "", posting_index: int = -1,
         command_id: str | None = None) -> tuple[Decision, TransactionRecord]:
    """Commit (``reason`` None) or reject the transaction: the coordinator's event, and
    a COMMIT or an ABORT to every participant."""
    assert state is not None  # it started the transaction: it exists
    tid = record.transaction_id
    if reason is None:
        payload: TransactionCommitted | TransactionRejected = \
            TransactionCommitted.trusted(transaction_id=tid)
        record = record.replace(state="committed")
    else:
        payload = TransactionRejected.trusted(transaction_id=tid, reason=reason, detail=detail,
                                              posting_index=posting_index)
        record = record.replace(state="rejected")
    event, after = _event(state, state.account_id, command_id or tid, causation_id, issued_at,
                          record.actor, record.correlation_id, payload, None, record.metadata)
    kind = "COMMIT" if reason is None else "ABORT"
    messages = tuple(_message(kind, record, a, event.occurred_at, reason=reason)
                     for a in record.participants)
    return Decision(events=(event,), state_after=after, messages=messages), record


# ---------------------------------------------------------------- at a participant


def _refusal(state: AccountState | None, m: TransactionMessage) -> tuple[str, str, int] | None:
    """The first rule the participant's postings break: (reason, detail, posting index)."""
    postings = plain(m.postings)
    if state is None:
        found = core.transaction_refusal(False, m.account_id, "", 0, "", 0, 0, 0, 0, postings)
    else:
        found = core.transaction_refusal(
            True, m.account_id, state.status, state.version, state.currency,
            state.available_minor, state.overdraft_limit_minor, state.held_minor,
            state.balance_minor, postings)
    return found if found[0] else None


def plain(postings: list[Posting]) -> list[core.Posting]:
    """The postings as ``streams.core`` has them."""
    return [(p.from_account_id, p.to_account_id, p.amount_minor, p.currency,
             p.expected_version) for p in postings]


def net_of(account_id: str, postings: list[Posting]) -> int:
    """What the postings change the account's balance by (negative: it pays out)."""
    return core.net_of(account_id, plain(postings))


def prepare(state: AccountState | None, m: TransactionMessage, refunded: bool = False,
            ) -> Decision:
    """Reserve what the participant pays out and vote yes, or vote no with the reason
    (``refunded``: the transaction reverses a transfer whose credit this account refused)."""
    refused = (Reason.TRANSFER_REFUNDED.value, f"{m.account_id} refused transfer "
               f"{m.reverses!r} and refunded it", 0) if refunded else _refusal(state, m)
    if refused is not None:
        reason, detail, index = refused
        no = m.replace(kind="VOTE", accepted=False, reason=reason, detail=detail,
                       posting_index=index, expires_at=0, signature=b"")
        return Decision(messages=(no,))
    assert state is not None
    payload = TransactionReserved.trusted(
        transaction_id=m.transaction_id, coordinator_account_id=m.coordinator_account_id,
        amount_minor=max(0, -net_of(m.account_id, m.postings)))
    event, after = _event(state, m.account_id, m.transaction_id, f"{m.transaction_id}:prepare",
                          m.issued_at, m.actor, m.correlation_id, payload, None, m.metadata)
    yes = m.replace(kind="VOTE", accepted=True, issued_at=event.occurred_at, expires_at=0,
                    signature=b"")
    return Decision(events=(event,), state_after=after, messages=(yes,))


def finish(state: AccountState | None, m: TransactionMessage) -> Decision | None:
    """A COMMIT posts the participant's postings, an ABORT releases its reservation; None:
    it has no reservation of this transaction (it was finished, or never reserved)."""
    rid = reservation_id(m.coordinator_account_id, m.transaction_id)
    if state is None or rid not in state.holds:
        return None
    payload: TransactionPosted | TransactionReleased
    if m.kind == "COMMIT":
        mine = [p for p in m.postings if m.account_id in (p.from_account_id, p.to_account_id)]
        payload = TransactionPosted.trusted(
            transaction_id=m.transaction_id, coordinator_account_id=m.coordinator_account_id,
            amount_minor=net_of(m.account_id, mine), postings=mine)
    else:
        payload = TransactionReleased.trusted(
            transaction_id=m.transaction_id, coordinator_account_id=m.coordinator_account_id,
            amount_minor=state.holds[rid].amount_minor, reason=m.reason or "rejected")
    event, after = _event(state, m.account_id, m.transaction_id,
                          f"{m.transaction_id}:{m.kind.lower()}", m.issued_at, m.actor,
                          m.correlation_id, payload, None, m.metadata)
    return Decision(events=(event,), state_after=after)


def is_transaction_command(c: CommandBase) -> bool:
    return isinstance(c, Transaction | Reverse | ExpireTransaction)
