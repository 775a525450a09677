"""Keep secrets out of error texts, logs and the status payload (pure functions).

An adapter's error often repeats what it was given: an LLM provider echoes a
bad API key, a proxy's page quotes the URL with its credentials, a client
library prints the ``Authorization`` header. Every text that becomes a log
line, a ``last_error`` or a status field passes through :func:`scrub` first,
with the secret values the adapter holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote

MASK = "***"
# A shorter "secret" would mask ordinary words; no real key is this short.
MIN_SECRET_LEN = 4

_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+")
# scheme://user:password@host -> scheme://***@host
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@?#]+@")
# ?key=... &api_key=... &token=... &password=... (any parameter whose name says it is a credential)
_CREDENTIAL_PARAM = re.compile(
    r"(?i)([?&][^=&#\s]*(?:key|token|secret|pass|pwd|auth|sig|credential)[^=&#\s]*=)[^&#\s'\";,)\]>]+"
)


def mask_url(url: str) -> str:
    """``url`` with the credentials in its user part and in credential-like query parameters masked."""
    return _CREDENTIAL_PARAM.sub(rf"\g<1>{MASK}", _URL_USERINFO.sub(rf"\g<1>{MASK}@", url))


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret value, bearer token and URL credential replaced by ``***``.

    ``secrets`` are the configured secret values (empty ones are ignored); each
    is also masked in its percent-encoded form, as a query string carries it.
    The longest is replaced first, so a secret containing another is masked whole.
    """
    values: set[str] = set()
    for secret in secrets:
        if secret and len(secret) >= MIN_SECRET_LEN:
            values.update((secret, quote(secret, safe="")))
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, MASK)
    return mask_url(_BEARER.sub(rf"\g<1>{MASK}", text))
