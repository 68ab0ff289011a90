"""HTTP on the worker's web server: account state and health."""

from __future__ import annotations

from typing import Any

import faust
from faust.web import Request, Response, View

from schemas.codec import CODEC
from schemas.models import AccountState
from schemas.money import format_amount
from streams import metrics
from streams.processor import account_key, partition_for
from streams.settings import Settings
from streams.state import PartitionView


def account_json(state: AccountState) -> dict[str, Any]:
    return {
        "account_id": state.account_id,
        "currency": state.currency,
        "status": state.status,
        "version": state.version,
        "balance_minor": state.balance_minor,
        "available_minor": state.available_minor,
        "balance": format_amount(state.balance_minor, state.currency),
        "available": format_amount(state.available_minor, state.currency),
        "overdraft_limit_minor": state.overdraft_limit_minor,
        "holds": {k: {"amount_minor": h.amount_minor, "expires_at": h.expires_at}
                  for k, h in sorted(state.holds.items())},
        "updated_at": state.updated_at,
    }


def register(app: faust.App, s: Settings) -> None:
    def owned(partition: int) -> bool:
        return any(tp.topic == s.commands_topic and tp.partition == partition
                   for tp in app.assignor.assigned_actives())

    @app.page("/accounts/{account_id}")
    class AccountView(View):
        async def get(self, request: Request, account_id: str) -> Response:
            p = partition_for(account_id, s.partitions)
            if not owned(p):
                return self.json({"error": "not_owner", "partition": p}, status=503)
            db = app.accounts_table.data._db_for_partition(p)  # type: ignore[attr-defined]
            raw = PartitionView(db).get(account_key(account_id))
            if raw is None:
                return self.json({"error": "account_not_found", "account_id": account_id},
                                 status=404)
            state = AccountState.from_avro(CODEC.decode(raw, expect=AccountState.avro_name)[1])
            return self.json(account_json(state))

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(metrics.exposition(),
                              content_type="text/plain; version=0.0.4")

    @app.page("/health/live")
    class Live(View):
        async def get(self, request: Request) -> Response:
            return self.json({"live": True})


def register_health(app: faust.App, s: Settings) -> None:
    @app.page("/health/ready")
    class Ready(View):
        """Ready once table recovery is done and this worker consumes its partitions."""

        async def get(self, request: Request) -> Response:
            recovery = app.tables.recovery  # type: ignore[attr-defined]
            assigned = [tp for tp in app.assignor.assigned_actives()
                        if tp.topic == s.commands_topic]
            health = app.ledger_health  # type: ignore[attr-defined]
            stalled = health["stalled_s"] > s.stall_timeout_s
            ready = (recovery.completed.is_set() and not recovery.in_recovery
                     and not app.rebalancing and bool(assigned) and not stalled)
            doc = {"ready": ready, "partitions": sorted(tp.partition for tp in assigned),
                   "in_recovery": recovery.in_recovery, "rebalancing": app.rebalancing,
                   "stalled_s": round(health["stalled_s"], 1), "lag": health["lag"]}
            return self.json(doc, status=200 if ready else 503)
