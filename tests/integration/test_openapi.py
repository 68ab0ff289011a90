"""Property-based fuzzing of the worker's HTTP API against its OpenAPI document.

Schemathesis generates requests for every operation in ``/openapi.yaml`` (as the
live worker serves it): valid ones, and invalid ones that must be refused with a
4xx. Every answer must be documented (status, content type, body schema, headers)
and none may be a server error.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from schemas.models import Deposit, OpenAccount
from schemas.money import CURRENCY_SCALE

pytestmark = pytest.mark.kafka

OPENAPI = Path(__file__).parents[2] / "streams" / "api" / "openapi.yaml"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]
EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 25}


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_served_document_is_the_file(start_worker):
    w = start_worker()
    with urllib.request.urlopen(w.url + "/openapi.yaml", timeout=10) as resp:
        assert resp.headers.get_content_type() == "application/yaml"
        served = yaml.safe_load(resp.read())
    assert served == yaml.safe_load(OPENAPI.read_text())
    assert served["openapi"].startswith("3.")
    currencies = served["components"]["schemas"]["Currency"]["enum"]
    assert currencies == sorted(CURRENCY_SCALE)


def test_fuzz_every_operation(ledger_settings, start_worker, client):
    w = start_worker()
    # Some accounts with history, so reads that find something are generated too.
    for account in ("a", "b", "alice"):
        client.submit(OpenAccount(command_id="o", account_id=account, actor="t",
                                  issued_at=1, currency="USD")).result(timeout=60)
        client.submit(Deposit(command_id="d", account_id=account, actor="t", issued_at=2,
                              amount_minor=100, currency="USD")).result(timeout=60)
    deadline = time.monotonic() + 30
    while status_of(w.url + "/accounts/alice/events") != 200:  # the history index catches up
        assert time.monotonic() < deadline, "history not caught up in 30s"
        time.sleep(0.1)

    # The event stream stays open for minutes by design, so no single request to it
    # ends; tests/browser/test_page.py reads it instead.
    schema = schemathesis.openapi.from_url(w.url + "/openapi.yaml").exclude(
        path="/accounts/{account_id}/stream")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/accounts/{account_id}", "/commands",
                                              "/accounts/{account_id}/events",
                                              "/transactions/{transaction_id}"}
    tried: list[tuple[str, str, int]] = []
    for op in operations:
        for mode, examples in EXAMPLES.items():
            fuzz(op, mode, examples, w.url, tried)
    statuses = {status for _, _, status in tried}
    assert not {s for s in statuses if s >= 500}
    # the fuzzing reached past validation: successes and refusals both
    assert {200, 202, 404, 422} <= statuses, sorted(statuses)


def fuzz(op, mode, examples, base_url, tried) -> None:
    checks = CHECKS + ([negative_data_rejection] if mode.is_negative else [])

    @settings(max_examples=examples, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        response = case.call_and_validate(base_url=base_url, checks=checks, timeout=30)
        tried.append((case.operation.label, mode.value, response.status_code))

    try:
        run()
    except Unsatisfiable:
        if mode.is_positive:
            raise  # else: the operation has no input that could be invalid
