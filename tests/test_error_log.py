"""The Errors card's log: newest first, repeats counted, bounded."""

from loop.error_log import ErrorLog


def test_newest_first_and_the_same_problem_again_is_counted_not_repeated():
    log = ErrorLog(maxlen=3)
    log.record("store", "disk full", 10.0)
    log.record("store", "disk full", 20.0)
    log.record("1m candles", "Kraken refused the connection", 30.0)
    log.record("store", "disk full", 40.0)  # not the newest any more: a row of its own
    assert list(log) == [
        {"ts": 40.0, "source": "store", "message": "disk full"},
        {"ts": 30.0, "source": "1m candles", "message": "Kraken refused the connection"},
        {"ts": 20.0, "source": "store", "message": "disk full", "count": 2},
    ]
    log.record("grid paper", "refused", 50.0)
    assert len(log) == 3 and log[0]["source"] == "grid paper" and log[2]["ts"] == 30.0
