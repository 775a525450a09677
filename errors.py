"""One exception hierarchy, shaped by what the main loop does about a failure.

- :class:`RetryLater` -- a transient fault (network, rate limit, service busy).
  The step is skipped this cycle and tried again on its normal cadence.
- :class:`BadData` -- the input of a step cannot be used (malformed payload,
  too few rows). The step is skipped and the previous good state kept.
- :class:`ConfigError` -- the process cannot run as configured. Startup stops
  with the message, which names every offending setting.

Apart from the loop, :class:`ActionRefused` answers an operator action that
changed nothing, with a domain reason (``kind``): ``"malformed"`` (the request
is not one the action takes) or ``"refused"`` (a rail said no). Only the HTTP
layer turns a kind into a status code.
"""

from __future__ import annotations

from typing import Literal

MALFORMED = "malformed"  # wrong types, an unknown field or an unknown action
REFUSED = "refused"  # well formed, but a rail said no
RefusalKind = Literal["malformed", "refused"]


class BotError(Exception):
    """Base class of every error the bot raises on purpose."""


class RetryLater(BotError):
    """A transient failure; the same call may succeed later."""

    def __init__(self, message: str, *, retry_after_sec: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_sec = retry_after_sec


class BadData(BotError):
    """Input that cannot be used; retrying the same input will not help."""


class ConfigError(BotError):
    """The configuration is invalid; the process must not start."""


class ActionRefused(Exception):
    """An operator action that changed nothing; ``kind`` is :data:`MALFORMED` or :data:`REFUSED`."""

    def __init__(self, kind: RefusalKind, message: str) -> None:
        if kind not in (MALFORMED, REFUSED):
            raise ValueError(f"unknown refusal kind {kind!r}")
        super().__init__(message)
        self.kind = kind
