"""retry: Retry-After parsing, back-off delays and the retry loop, on a fake sleep."""

from __future__ import annotations

import pytest

from errors import BadData, RetryLater
from retry import backoff_delay, call_with_retries, parse_retry_after

NOW = 1445412470.0  # 2015-10-21 07:27:50 UTC


@pytest.mark.parametrize(
    ("value", "now", "expected"),
    [
        ("5", None, 5.0),
        ("2.5", None, 2.5),
        ("-3", None, 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", NOW, 10.0),
        ("Wed, 21 Oct 2015 07:28:00 -0000", NOW, 10.0),
        ("Wed, 21 Oct 2015 07:00:00 GMT", NOW, 0.0),  # already past
        ("Wed, 21 Oct 2015 07:28:00 GMT", None, None),  # a date needs now
        ("soon", NOW, None),
        ("a, b", NOW, None),
        ("nan", None, None),
        ("inf", None, None),
        ("", None, None),
        (None, NOW, None),
    ],
)
def test_parse_retry_after(value, now, expected) -> None:
    assert parse_retry_after(value, now) == expected


def test_backoff_doubles_up_to_the_cap_and_honours_retry_after_up_to_its_own_cap() -> None:
    assert [backoff_delay(a, cap=8.0) for a in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert [backoff_delay(a, base=5.0, cap=300.0) for a in range(3)] == [5.0, 10.0, 20.0]
    assert backoff_delay(0, cap=8.0, retry_after=5.0, retry_after_cap=30.0) == 5.0
    assert backoff_delay(2, cap=8.0, retry_after=1.0, retry_after_cap=30.0) == 4.0  # never shorter than the back-off
    assert backoff_delay(0, cap=8.0, retry_after=120.0, retry_after_cap=30.0) == 30.0
    assert backoff_delay(0, cap=8.0, retry_after=120.0) == 120.0


def test_call_with_retries_sleeps_between_attempts_and_reports_each_retry() -> None:
    failures = [RetryLater("busy"), RetryLater("slow down", retry_after_sec=7.0)]
    sleeps: list[float] = []
    told: list[tuple[str, int, float]] = []

    def call() -> str:
        if failures:
            raise failures.pop(0)
        return "ok"

    def on_retry(exc: Exception, n: int, delay: float) -> None:
        told.append((str(exc), n, delay))

    assert call_with_retries(call, max_retries=3, sleep=sleeps.append, on_retry=on_retry, cap=8.0) == "ok"
    assert sleeps == [1.0, 7.0]
    assert told == [("busy", 1, 1.0), ("slow down", 2, 7.0)]


def test_call_with_retries_raises_the_last_failure_and_never_retries_others() -> None:
    sleeps: list[float] = []

    def busy() -> None:
        raise RetryLater("busy")

    with pytest.raises(RetryLater, match="busy"):
        call_with_retries(busy, max_retries=2, sleep=sleeps.append, cap=8.0)
    assert sleeps == [1.0, 2.0]

    def bad() -> None:
        raise BadData("garbled")

    with pytest.raises(BadData):
        call_with_retries(bad, max_retries=2, sleep=sleeps.append, cap=8.0)
    assert sleeps == [1.0, 2.0]
