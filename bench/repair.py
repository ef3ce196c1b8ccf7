"""CPU of one anti-entropy round of the overlay's storage (issue 19, target 3): the whole-range push the
repair did before against the repair by digest that replaced it, for a primary range of N records whose
every copy the replica already holds (the steady state of a healthy ring).

    python3 bench/repair.py                     # 1,000 and 10,000 records, best of 3 each
    python3 bench/repair.py --records 50000 --rounds 5

Whole-range push: the transfer messages encoded (1,000 entries per chunk, as TCP frames), decoded at the
replica and offered to its store, which skips every copy it holds. Digest: the primary's digest of the range
(``overlay.storage.range_digest``) sent as a ``digest`` message, the replica's digest of what it holds
(three ranges, as a replica of r = 3 holds), the bitmap of the buckets that differ, the records to push.
Both in this one process, CPU time (``time.process_time``): a figure the machine's load barely moves. A
registration burst competes with this work on the peer's one event loop every ``repair_interval``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from conditions import Conditions
from harness import ROOT  # noqa: F401  (first: it puts this checkout on sys.path)

from overlay.identity import KeyPair
from overlay.ids import RING
from overlay.storage import Entry, Store, differing_buckets, in_buckets, range_digest
from overlay.wire import TCP_MAX, Codec, Message

CHUNK = 1000


def one_round(records: int, rounds: int) -> tuple[float, float, int]:
    rng = random.Random(records)
    users = [KeyPair.generate() for _ in range(50)]
    third = RING // 3
    lo, hi = 0, third  # the primary's range; the replica also holds the two ranges before it
    prim, rep = Store(max_per_owner=10**9), Store(max_per_owner=10**9)
    for i in range(records):
        own = Entry.create(users[i % 50], rng.randrange(1, third), b"phone", b"x" * 300, 1, 3600)
        prim.put(own, 0.0)
        rep.put(own, 0.0)
        for _ in range(2):  # the replica's copies of its other primaries' ranges
            rep.put(Entry.create(users[i % 50], rng.randrange(third + 1, RING), b"p", b"x" * 300, 1, 3600), 0.0)
    codec = Codec("bench")
    items = prim.in_range(lo, hi, 1.0)
    push, digest, pushed = [], [], 0
    for _ in range(rounds):
        t = time.process_time()
        for i in range(0, len(items), CHUNK):
            msg = Message("transfer", 1, 5, ("h", 1), {"entries": items[i : i + CHUNK]})
            rep.accept(codec.decode(codec.encode(msg, max_size=TCP_MAX), max_size=TCP_MAX).body["entries"], 1.0)
        push.append(time.process_time() - t)
        t = time.process_time()
        msg = Message("digest", 1, 5, ("h", 1), {"lo": lo, "hi": hi, "sums": range_digest(items, lo, hi)})
        got = codec.decode(codec.encode(msg)).body
        differ = differing_buckets(range_digest(rep.in_range(lo, hi, 1.0), lo, hi), got["sums"])
        pushed = len(in_buckets(items, lo, hi, differ))
        digest.append(time.process_time() - t)
    return min(push), min(digest), pushed


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--records", type=int, action="append", help="records in the primary range (repeatable)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per size, best taken (default 3)")
    args = parser.parse_args()
    sizes = args.records or [1000, 10000]
    if args.rounds < 1 or min(sizes) < 1:
        print("bench/repair.py: --records and --rounds are at least 1", file=sys.stderr)
        return 2
    conditions = Conditions()
    print("| records in the primary range | whole-range push, CPU ms | repair by digest, CPU ms | ratio | records pushed by digest |")
    print("|---:|---:|---:|---:|---:|")
    for n in sizes:
        push, digest, pushed = one_round(n, args.rounds)
        print(f"| {n:,} | {1000 * push:.1f} | {1000 * digest:.1f} | {digest / push:.2f}x | {pushed} |", flush=True)
    print(f"\n({conditions}; best of {args.rounds} rounds; one replica holding every copy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
