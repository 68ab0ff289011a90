"""The worker's steps over what Faust hands it: in order, bounded, nothing left out."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from streams.worker.app import split_by_size


@given(st.lists(st.integers(min_value=0, max_value=300)), st.integers(min_value=1, max_value=500))
def test_runs_keep_order_and_stay_within_the_bound(sizes, bound):
    items = list(enumerate(sizes))
    runs = split_by_size(items, lambda item: item[1], bound)
    assert [item for run in runs for item in run] == items
    for run in runs:
        assert run  # no empty step
        total = sum(n for _, n in run)
        assert total <= bound or len(run) == 1  # a bigger record goes alone
    for a, b in pairwise(runs):  # a run ends only when the next item
        assert sum(n for _, n in a) + b[0][1] > bound  # would not have fitted


def test_nothing_to_split_is_no_step():
    assert split_by_size([], len, 10) == []
