"""The torture corpus: malformed and tricky SIP messages, one file each, with the outcome each must have.

Written for this project in the spirit of RFC 4475 (not copied from it). A case file looks like::

    expect: valid                 # or: invalid
    about: why this message is tricky
    check: method = INVITE        # valid only: a path into the parsed message, and its expected str()
    check: via.0.branch = z9hG4bK-1
    status: 505                   # invalid only: the status(es) the parser may hint (default 400)
    stream: invalid               # optional: the outcome differs on a stream (TCP), e.g. no Content-Length
    live: 200                     # optional: the status a live stack must answer with
    ---
    INVITE sip:bob@example.com SIP/2.0
    ...

The message after ``---`` is written line by line; each line ends with CRLF unless it ends with a lone
``\\`` (then nothing is added). Escapes make any byte possible: ``\\r \\n \\t \\0 \\xHH \\\\``, and
``{repeat:N:TEXT}`` repeats TEXT N times. ``{len}`` is replaced with the byte length of the body (what
follows the first empty line), so Content-Length stays right when a case is edited.

Check paths are dotted: an attribute (``uri.host``), a list index (``via.1``), a dict key
(``uri.params.transport``), ``get:NAME`` / ``all:NAME`` for ``msg.get(NAME)`` / ``msg.get_all(NAME)``,
``len`` for the length of what came before. The expected value is compared with ``str()`` of the result
(``None`` for None, ``True``/``False`` for booleans).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

CASES_DIR = Path(__file__).resolve().parent / "cases"

_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|[rnt0\\])")
_CHECK = re.compile(r"\s*(\S+) =(?: (.*))?$")
_REPEAT = re.compile(r"\{repeat:(\d+):(.*?)\}")


@dataclass(frozen=True)
class Case:
    name: str
    valid: bool
    data: bytes
    about: str = ""
    checks: tuple[tuple[str, str], ...] = ()
    status: tuple[int, ...] = (400,)
    """Statuses the parser may hint for an invalid case (any of them is right)."""
    stream_valid: bool | None = None
    """Whether the bytes are valid on a stream (TCP) too; None means the same as ``valid``."""
    live: str | None = None
    """Expected answer of a live stack: a status code, ``drop``, or None for the default rule."""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def is_request(self) -> bool:
        return not self.data.lstrip(b"\r\n").startswith(b"SIP/")


def _unescape(line: str) -> bytes:
    line = _REPEAT.sub(lambda m: m.group(2) * int(m.group(1)), line)
    raw = line.encode("utf-8")

    def one(m: re.Match[bytes]) -> bytes:
        code = m.group(1)
        if code.startswith(b"x"):
            return bytes([int(code[1:], 16)])
        return {b"r": b"\r", b"n": b"\n", b"t": b"\t", b"0": b"\0", b"\\": b"\\"}[code]

    return _ESCAPE.sub(one, raw)


def _message(lines: list[str]) -> bytes:
    out = bytearray()
    for line in lines:
        if line.endswith("\\") and not line.endswith("\\\\"):
            out += _unescape(line[:-1])
        else:
            out += _unescape(line) + b"\r\n"
    data = bytes(out)
    if b"{len}" in data:
        head, sep, body = data.partition(b"\r\n\r\n")
        data = head.replace(b"{len}", str(len(body)).encode()) + sep + body
    return data


def load(path: Path) -> Case:
    text = path.read_text(encoding="utf-8")
    meta, sep, message = text.partition("\n---\n")
    if not sep:
        raise ValueError(f"{path.name}: no '---' line between expectations and message")
    valid: bool | None = None
    checks: list[tuple[str, str]] = []
    fields: dict[str, str] = {}
    for raw in meta.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        key, _, rest = raw.partition(":")
        key, value = key.strip(), rest.strip()
        if key == "expect":
            if value not in ("valid", "invalid"):
                raise ValueError(f"{path.name}: expect must be valid or invalid")
            valid = value == "valid"
        elif key == "check":
            match = _CHECK.match(rest)
            if match is None:
                raise ValueError(f"{path.name}: check needs 'PATH = VALUE': {value!r}")
            checks.append((match.group(1), match.group(2) or ""))
        else:
            fields[key] = value
    if valid is None:
        raise ValueError(f"{path.name}: missing 'expect:'")
    lines = message.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline is not part of the message
    return Case(
        name=path.stem,
        valid=valid,
        data=_message(lines),
        about=fields.pop("about", ""),
        checks=tuple(checks),
        status=tuple(int(code) for code in fields.pop("status", "400").split()),
        stream_valid={"valid": True, "invalid": False}.get(fields.pop("stream", ""), valid),
        live=fields.pop("live", None),
        extra=fields,
    )


def load_all() -> list[Case]:
    return [load(path) for path in sorted(CASES_DIR.glob("*.sip"))]


def resolve(obj: object, path: str) -> object:
    """Follow a dotted check path (see the module docstring) from a parsed message."""
    for part in path.split("."):
        if part.startswith("get:"):
            obj = obj.get(part[4:])  # type: ignore[attr-defined]
        elif part.startswith("all:"):
            obj = obj.get_all(part[4:])  # type: ignore[attr-defined]
        elif part == "len":
            obj = len(obj)  # type: ignore[arg-type]
        elif part.lstrip("-").isdigit() and isinstance(obj, (list, tuple)):
            obj = obj[int(part)]
        elif isinstance(obj, dict):
            obj = obj[part]
        else:
            obj = getattr(obj, part)
    return obj
