"""Reads that do not trust one node (sans-IO): a key's replica set answers, the reader decides.

A ``get`` asks the key's holders (the responsible node and its first r-1 successors) for everything
they keep under the key, tombstones included with their ``seq`` (replica fetches). Every entry
is checked by the reader itself (signature, key), so a node can *hide* an entry or serve an *older* one,
but never forge one. :class:`QuorumRead` collects the answers:

* it is decided as soon as the responsible node and one other holder report the same view (the same
  ``seq`` in every entry slot, removals included): on a healthy ring the adapter asks those two first, in
  parallel, and the rest only when they disagree or are slow (or afterwards, for repair), so a read costs
  one round trip;
* otherwise (they disagree, or the responsible node does not answer) the adapter waits for the others
  until its deadline and takes :meth:`QuorumRead.result`: per entry slot the newest valid ``seq`` any
  holder returned. A newer removal beats an older entry, so a stale replica cannot bring a removed
  binding back, and one honest holder is enough to outvote a node that hides or replays;
* :meth:`QuorumRead.behind` says which holders lack what the answer held (read repair: the adapter
  pushes those records to them in the background), :meth:`QuorumRead.disagreeing` who answered
  something else (counted per node: ``status`` shows it).

The asyncio ``Node`` and the simulator both drive this class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from overlay.storage import Entry

Slot = tuple[int, bytes]
View = dict[bytes, Entry]  # entry_id -> newest valid record this holder returned


class QuorumRead:
    """One read of ``key`` from ``holders`` (NodeIds, the responsible node first)."""

    def __init__(self, key: int, holders: list[int], verify: Callable[[Entry], bool]) -> None:
        if not holders:
            raise ValueError("a read needs at least one holder")
        self.key = key
        self.holders = list(dict.fromkeys(holders))
        self._verify = verify
        self.answers: dict[int, View] = {}
        self.failed: set[int] = set()
        self.invalid: dict[int, int] = {}  # holder -> records that failed the reader's checks
        self._answered_at: View | None = None  # the answer given (see answered_now)
        self._early: set[int] = set()
        self.misdirected = False
        """The node asked as responsible says the key is not its own (``err 421``): the holders came
        from a stale view of the ring, so this read is void and the reader looks the key up again."""

    def add(self, holder: int, records: Iterable[Entry]) -> None:
        """``holder`` answered with these records (live entries and tombstones)."""
        view: View = {}
        for entry in records:
            if entry.key != self.key or not self._verify(entry):
                self.invalid[holder] = self.invalid.get(holder, 0) + 1
                continue
            have = view.get(entry.entry_id)
            if have is None or entry.seq > have.seq:
                view[entry.entry_id] = entry
        self.answers[holder] = view

    def fail(self, holder: int) -> None:
        """``holder`` did not answer (timeout, error)."""
        self.failed.add(holder)

    def misdirect(self) -> None:
        """The responsible node (``holders[0]``) answered that the key is not its own; see
        :attr:`misdirected`."""
        self.misdirected = True

    @property
    def complete(self) -> bool:
        return all(h in self.answers or h in self.failed for h in self.holders)

    @property
    def decided(self) -> bool:
        """The responsible node and one more agree, or every holder has answered or failed (or the read
        turned out to be misdirected)."""
        if self.misdirected:
            return True
        primary = self.holders[0]
        mine = self.answers.get(primary)
        if mine is not None and len(self.holders) == 1:
            return True
        if mine is not None:
            seqs = _seqs(mine)
            if any(h != primary and _seqs(v) == seqs for h, v in self.answers.items()):
                return True
        return self.complete

    def merged(self) -> View:
        """Per entry slot, the newest valid record any holder returned."""
        out: View = {}
        for view in self.answers.values():
            for eid, entry in view.items():
                have = out.get(eid)
                if have is None or entry.seq > have.seq:
                    out[eid] = entry
        return out

    def result(self) -> list[Entry]:
        """The live entries (removals left out), ordered by entry_id."""
        return [e for eid, e in sorted(self.merged().items()) if not e.is_removal]

    def behind(self) -> dict[int, list[Entry]]:
        """Holders that answered but lack a record of the result (or hold an older one): what to push.

        Once the reader answered (:meth:`answered_now`), the reference is that answer: a newer record only
        a holder asked later has was written since, and its writer stores it on every holder itself.
        Pushing it too made every read-then-write (a REGISTER of a new AOR) repair the two early holders
        with the write they were receiving anyway: ~3 wasted messages per registration (issue 19)."""
        best = self._answered_at if self._answered_at is not None else self.merged()
        out: dict[int, list[Entry]] = {}
        for holder, view in self.answers.items():
            missing = [e for eid, e in best.items() if (have := view.get(eid)) is None or have.seq < e.seq]
            if missing:
                out[holder] = missing
        return out

    def answered_now(self) -> None:
        """The reader answered with :meth:`result` now; holders asked afterwards (for repair) are judged
        against that answer: one that has something *newer* saw a write made since, and is not a liar."""
        self._answered_at = self.merged()
        self._early = set(self.answers)

    def disagreeing(self) -> list[int]:
        """Holders whose answer lost: they hid a record, served an older one, or sent invalid ones."""
        best = self._answered_at if self._answered_at is not None else self.merged()
        seqs = _seqs(best)
        out = []
        for holder, view in self.answers.items():
            if holder in self.invalid:
                out.append(holder)
            elif self._answered_at is None or holder in self._early:
                if _seqs(view) != seqs:
                    out.append(holder)
            elif any((have := view.get(eid)) is None or have.seq < e.seq for eid, e in best.items()):
                out.append(holder)
        return out

    @property
    def answered(self) -> bool:
        return bool(self.answers)


def _seqs(view: View) -> dict[bytes, int]:
    return {eid: e.seq for eid, e in view.items()}
