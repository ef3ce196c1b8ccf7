"""Kernel steering: the workers' shared UDP port delivers each request to the worker that owns its Call-ID.

Why: the workers of ``p2psip proxy --workers N`` share one port (``SO_REUSEPORT``), and the kernel picks
a worker's socket by the datagram's 4-tuple: one caller lands on one worker, which then reads all of its
traffic and hands about half of it over (:mod:`p2psip.handoff`): a second pass through the kernel, an
extra wake-up, and one worker doing more than the other. Linux lets a reuseport group run a classic BPF
program on each datagram (``SO_ATTACH_REUSEPORT_CBPF``, no privilege needed) whose result is the index of
the socket to use, in the order the sockets joined the group. The parent binds the workers' sockets in
index order (:mod:`p2psip.workers`) and attaches :func:`program`, which computes what
:func:`p2psip.handoff.call_owner` computes from the ``Call-ID`` header: so every request of a call (its
retransmissions, CANCEL, ACK, BYE) arrives at its owner and nothing needs handing over.

The program is only a hint. It reads the common spelling (``Call-ID: value`` or ``Call-ID:value``, any
case, within the first :data:`SCAN_BYTES` bytes); for anything else (the compact ``i:``, a longer run of
white space) it leaves the choice to the kernel's hash, except that a datagram shorter than the scan
without that header (a keep-alive) goes to worker 0: a classic program that reads past the end stops
there, with 0. Each worker still checks the owner of what it reads and hands over what is not its own, as
without steering: correctness never depends on this module.

When a worker dies the parent attaches the program again with the dead worker's share routed to a live
one (``route``), and once more with the full map when its successor listens.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence

from p2psip.handoff import CALL_ID_BYTES, CALL_ID_PRIME

#: ``SO_ATTACH_REUSEPORT_CBPF`` (Linux 4.5+; not in Python's socket module)
SO_ATTACH_REUSEPORT_CBPF = 51
#: the program looks for the header's start (``\nCall``) at offsets 0 to this, one unrolled test each
#: (classic BPF has no backward jump); 5 instructions per offset within the 4,096 a program may have
SCAN_BYTES = 700

# classic BPF opcodes (linux/filter.h)
_LD_W_ABS = 0x20
_LD_W_IND = 0x40
_LD_B_IND = 0x50
_LD_IMM = 0x00
_LD_MEM = 0x60
_LDX_IMM = 0x01
_LDX_MEM = 0x61
_ST = 0x02
_ALU_AND_K = 0x54
_ALU_ADD_K = 0x04
_ALU_LSH_K = 0x64
_ALU_OR_X = 0x4C
_ALU_MOD_K = 0x94
_JA = 0x05
_JEQ_K = 0x15
_JGT_K = 0x25
_RET_K = 0x06
_TAX = 0x07
_TXA = 0x87

_NL_CAL = 0x0A43414C  # "\nCAL" (the mask folds the case; "\n" has no case bit)
_L_ID = 0x4C2D4944  # "L-ID"

Insn = tuple[int, int | str, int | str, int | str]
"""(code, jt, jf, k): a jump's jt/jf (or a ``ja``'s k) may be a label, resolved by :func:`_assemble`."""


def _assemble(code: list[Insn | str]) -> list[tuple[int, int, int, int]]:
    """Resolve labels (the strings in ``code``) into relative forward jumps."""
    labels: dict[str, int] = {}
    insns: list[Insn] = []
    for item in code:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    def rel(pc: int, target: int | str, limit: int) -> int:
        if isinstance(target, int):
            return target
        offset = labels[target] - pc - 1
        if not 0 <= offset <= limit:
            raise ValueError(f"jump to {target} out of range ({offset})")
        return offset

    out = []
    for pc, (op, jt, jf, k) in enumerate(insns):
        out.append((op, rel(pc, jt, 255), rel(pc, jf, 255), rel(pc, k, 0xFFFFFFFF)))
    return out


def program(workers: int, route: Sequence[int] | None = None) -> list[tuple[int, int, int, int]]:
    """The classic BPF program for a group of ``workers`` sockets: the index of the socket that
    :func:`p2psip.handoff.call_owner` names, through ``route`` (owner -> socket index; the identity by
    default), or ``workers`` (the kernel's own choice) when it cannot tell."""
    route = list(range(workers)) if route is None else list(route)
    if len(route) != workers or not all(0 <= r < workers for r in route):
        raise ValueError(f"route must map {workers} owners to socket indexes: {route}")
    code: list[Insn | str] = []
    for offset in range(SCAN_BYTES):  # find "\nCall" (any case): X = where "l-ID" would start
        code += [
            (_LD_W_ABS, 0, 0, offset),
            (_ALU_AND_K, 0, 0, 0xDFDFDFDF),
            (_JEQ_K, 0, 2, _NL_CAL),
            (_LDX_IMM, 0, 0, offset + 4),
            (_JA, 0, 0, "found"),
        ]
    code += [(_RET_K, 0, 0, workers), "found"]
    code += [
        (_LD_W_IND, 0, 0, 0),  # "L-ID", then ":" and at most one space
        (_ALU_AND_K, 0, 0, 0xDFFFDFDF),
        (_JEQ_K, 1, 0, _L_ID),
        (_RET_K, 0, 0, workers),
        (_LD_B_IND, 0, 0, 4),
        (_JEQ_K, 1, 0, ord(":")),
        (_RET_K, 0, 0, workers),
        (_LD_B_IND, 0, 0, 5),
        (_JEQ_K, 0, 3, ord(" ")),
        (_TXA, 0, 0, 0),
        (_ALU_ADD_K, 0, 0, 6),
        (_JA, 0, 0, "value"),
        (_TXA, 0, 0, 0),
        (_ALU_ADD_K, 0, 0, 5),
        "value",
        (_ST, 0, 0, 2),  # M[2] = where the value starts, M[0] = the hash so far
        (_TAX, 0, 0, 0),
        (_LD_B_IND, 0, 0, 0),
        (_JGT_K, 1, 0, 0x20),
        (_RET_K, 0, 0, workers),  # more white space
        (_LD_IMM, 0, 0, 0),
        (_ST, 0, 0, 0),
    ]
    for index in range(CALL_ID_BYTES):  # M[0] = (M[0] * 256 + byte) % prime, up to white space
        code += [
            (_LD_B_IND, 0, 0, index),
            (_JGT_K, 0, "hashed", 0x20),
            (_ST, 0, 0, 1),
            (_LD_MEM, 0, 0, 0),
            (_ALU_LSH_K, 0, 0, 8),
            (_LDX_MEM, 0, 0, 1),
            (_ALU_OR_X, 0, 0, 0),
            (_ALU_MOD_K, 0, 0, CALL_ID_PRIME),
            (_ST, 0, 0, 0),
            (_LDX_MEM, 0, 0, 2),
        ]
    code += ["hashed", (_LD_MEM, 0, 0, 0), (_ALU_MOD_K, 0, 0, workers)]
    for owner, index in enumerate(route):
        code += [(_JEQ_K, 0, 1, owner), (_RET_K, 0, 0, index)]
    code.append((_RET_K, 0, 0, workers))
    return _assemble(code)


def attach(sock: socket.socket, workers: int, route: Sequence[int] | None = None) -> bool:
    """Attach :func:`program` to the reuseport group of ``sock``; False when this system cannot (not
    Linux, or too old): the workers then hand over what the kernel gives the wrong one."""
    insns = program(workers, route)
    raw = b"".join(struct.pack("HBBI", *insn) for insn in insns)
    buffer = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("HP", len(insns), ctypes.addressof(buffer))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError:
        return False
    return True
