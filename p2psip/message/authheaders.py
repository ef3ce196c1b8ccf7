"""Authentication header syntax: parse and format Digest challenges and credentials (RFC 3261 §20.7,
§20.27, §20.28, §20.44; RFC 7616).

Part of :mod:`p2psip.message` (import from there).
"""

from __future__ import annotations

from p2psip.errors import ParseError
from p2psip.uri import (
    TOKEN_CHARS,
    _scan_quoted,
    quote,
    unquote,
)


def parse_auth(value: str) -> tuple[str, dict[str, str]]:
    """``Digest realm="a", nonce="b", qop="auth"`` -> ``("Digest", {"realm": "a", ...})``.

    Parameter names are lower-cased, values unquoted. Commas inside quoted values are kept.
    """
    value = value.strip(" \t")
    scheme, _, rest = value.partition(" ")
    if not scheme or not TOKEN_CHARS.issuperset(scheme):
        raise ParseError(f"bad authentication scheme in {value[:80]!r}")
    params: dict[str, str] = {}
    i = 0
    n = len(rest)
    while i < n:
        while i < n and rest[i] in " \t,":
            i += 1
        if i >= n:
            break
        eq = rest.find("=", i)
        if eq < 0:
            raise ParseError(f"bad authentication parameter in {value[:80]!r}")
        name = rest[i:eq].strip(" \t")
        if not name or not TOKEN_CHARS.issuperset(name):
            raise ParseError(f"bad authentication parameter name in {value[:80]!r}")
        j = eq + 1
        while j < n and rest[j] in " \t":
            j += 1
        if j < n and rest[j] == '"':
            end = _scan_quoted(rest, j)
            params[name.lower()] = unquote(rest[j:end])
            i = end
            while i < n and rest[i] in " \t":
                i += 1
            if i < n and rest[i] != ",":
                raise ParseError(f"junk after quoted value in {value[:80]!r}")
        else:
            comma = rest.find(",", j)
            end = n if comma < 0 else comma
            token = rest[j:end].strip(" \t")
            if not token:
                raise ParseError(f"empty authentication parameter in {value[:80]!r}")
            params[name.lower()] = token
            i = end
    return scheme, params


# Parameters whose value is a token, never quoted (RFC 7616 §3.3, §3.4). ``qop`` is a quoted list in a
# challenge but a bare token in a response (recognised by its ``response`` parameter).
_AUTH_TOKENS = frozenset({"algorithm", "stale", "nc", "userhash", "charset"})


def format_auth(scheme: str, params: dict[str, str]) -> str:
    """The inverse of :func:`parse_auth`: quotes the values RFC 7616 says are quoted-strings."""
    is_response = "response" in params
    parts: list[str] = []
    for name, value in params.items():
        low = name.lower()
        bare = low in _AUTH_TOKENS or (low == "qop" and is_response)
        if bare and value and TOKEN_CHARS.issuperset(value):
            parts.append(f"{name}={value}")
        else:
            parts.append(f"{name}={quote(value)}")
    return f"{scheme} " + ", ".join(parts)
