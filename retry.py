"""Retrying what failed for now: ``Retry-After`` parsing, back-off delays and the retry loop.

Pure: time comes in as arguments (``now``) and waiting goes through the
caller's ``sleep`` (the clock's), so tests never wait on the wall clock. The
caps are the caller's: a market-data client waits seconds where an LLM
provider's cool-down may last an hour, so each adapter names its own.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Callable
from datetime import UTC
from typing import TypeVar

from errors import RetryLater

T = TypeVar("T")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP-date.

    A date needs ``now`` (Unix seconds) to become a delay; without it, or for
    anything unreadable (or not finite), the answer is None. A negative delay
    or a date in the past is 0.
    """
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = _seconds_until_date(value, now)
    if seconds is None or not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _seconds_until_date(value: str, now: float | None) -> float | None:
    if now is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, with the sender's own zone unknown
        when = when.replace(tzinfo=UTC)
    return when.timestamp() - now


def backoff_delay(
    attempt: int,
    *,
    base: float = 1.0,
    cap: float,
    retry_after: float | None = None,
    retry_after_cap: float = math.inf,
) -> float:
    """Seconds to wait before retry ``attempt + 1`` (``attempt`` retries done so far).

    ``base`` doubled per attempt up to ``cap``; a server's ``retry_after`` is
    waited for when longer, up to ``retry_after_cap``.
    """
    delay = min(cap, base * 2.0**attempt)
    if retry_after is not None:
        delay = min(retry_after_cap, max(delay, retry_after))
    return delay


def call_with_retries(
    call: Callable[[], T],
    *,
    max_retries: int,
    sleep: Callable[[float], None],
    on_retry: Callable[[Exception, int, float], None] | None = None,
    retryable: tuple[type[Exception], ...] = (RetryLater,),
    base: float = 1.0,
    cap: float,
    retry_after_cap: float = math.inf,
) -> T:
    """``call()``, retried up to ``max_retries`` times while it raises one of ``retryable``.

    Before each retry, ``on_retry(exc, retry_number, delay)`` is told (1-based
    number) and ``sleep(delay)`` waits :func:`backoff_delay`, honouring the
    exception's ``retry_after_sec``. The last failure is raised as it is.
    """
    attempt = 0
    while True:
        try:
            return call()
        except retryable as exc:
            if attempt >= max_retries:
                raise
            retry_after = getattr(exc, "retry_after_sec", None)
            delay = backoff_delay(attempt, base=base, cap=cap, retry_after=retry_after, retry_after_cap=retry_after_cap)
            attempt += 1
            if on_retry is not None:
                on_retry(exc, attempt, delay)
            sleep(delay)
