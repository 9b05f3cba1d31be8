"""Keeping secrets out of what we print: URLs with their passwords and tokens masked."""

from __future__ import annotations

import re

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

__all__ = ["mask_url"]


#: Query parameters whose values are secrets (libpq's ``?password=``, tokens, signatures).
_SECRET_QUERY = {
    "password",
    "sslpassword",
    "passwd",
    "secret",
    "token",
    "access_token",
    "api_key",
    "apikey",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "sig",
    "signature",
}


def mask_url(url: str) -> str:
    """``url`` with its password (``user:***@``) and secret query parameters masked.

    Parsed the way SQLAlchemy parses a database URL, so a password holding ``/``,
    ``#`` or ``?`` unencoded (which SQLAlchemy and libpq accept) is masked whole.
    """
    if not url:
        return url
    try:
        parsed = make_url(url)
    except ArgumentError:
        # Not a URL SQLAlchemy reads: mask whatever sits between "//user:" and the last "@".
        return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)
    secrets = {k: "***" for k in parsed.query if k.lower() in _SECRET_QUERY}
    if secrets:
        parsed = parsed.update_query_dict(secrets)
    return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")
