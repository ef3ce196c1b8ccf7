"""SIP timer values (RFC 3261 §17 and Table 4, RFC 6026 timers L and M).

One frozen object holds T1/T2/T4 and the proxy's Timer C; every other timer is derived from them, so a test
(or a lossy-network deployment) changes three numbers and the whole stack follows. Timers that exist only to
absorb retransmissions over UDP (D, I, J, K) are zero on reliable transports, and the retransmission timers
(A, E, G) are not started at all there: a reliable transport retransmits for us.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """T1 (RTT estimate), T2 (maximum retransmit interval for non-INVITE requests and INVITE responses),
    T4 (maximum time a message stays in the network), and Timer C (proxy INVITE branch timeout, > 3 min).

    All values are seconds. Derived timers are methods so that they always agree with T1/T2/T4.
    """

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    timer_c: float = 180.0

    def __post_init__(self) -> None:
        if not (self.t1 > 0 and self.t2 >= self.t1 and self.t4 >= 0 and self.timer_c > 0):
            raise ValueError(
                f"bad SIP timer values t1={self.t1} t2={self.t2} t4={self.t4} timer_c={self.timer_c}: "
                "need t1 > 0, t2 >= t1, t4 >= 0, timer_c > 0"
            )

    # --- client INVITE ---------------------------------------------------------------------------
    def a(self) -> float:
        """Timer A initial value (INVITE request retransmit, unreliable only; doubles without cap)."""
        return self.t1

    def b(self) -> float:
        """Timer B: INVITE transaction timeout, 64*T1, on every transport."""
        return 64 * self.t1

    def d(self, reliable: bool) -> float:
        """Timer D: wait for response retransmissions, >= 32 s on unreliable, 0 on reliable."""
        return 0.0 if reliable else max(32.0, 64 * self.t1)

    def m(self) -> float:
        """Timer M (RFC 6026): the client INVITE's Accepted state absorbs 2xx retransmissions, 64*T1."""
        return 64 * self.t1

    # --- client non-INVITE -----------------------------------------------------------------------
    def e(self) -> float:
        """Timer E initial value (non-INVITE retransmit, unreliable only; doubles up to T2)."""
        return self.t1

    def f(self) -> float:
        """Timer F: non-INVITE transaction timeout, 64*T1."""
        return 64 * self.t1

    def k(self, reliable: bool) -> float:
        """Timer K: wait for response retransmissions, T4 on unreliable, 0 on reliable."""
        return 0.0 if reliable else self.t4

    # --- server INVITE ---------------------------------------------------------------------------
    def g(self) -> float:
        """Timer G initial value (final non-2xx response retransmit, unreliable only; doubles up to T2)."""
        return self.t1

    def h(self) -> float:
        """Timer H: wait for the ACK of a non-2xx final response, 64*T1."""
        return 64 * self.t1

    def i(self, reliable: bool) -> float:
        """Timer I: wait for ACK retransmissions, T4 on unreliable, 0 on reliable."""
        return 0.0 if reliable else self.t4

    def l(self) -> float:  # noqa: E743 - the RFC's name
        """Timer L (RFC 6026): the server INVITE's Accepted state waits for 2xx retransmits/ACKs, 64*T1."""
        return 64 * self.t1

    # --- server non-INVITE -----------------------------------------------------------------------
    def j(self, reliable: bool) -> float:
        """Timer J: wait for request retransmissions, 64*T1 on unreliable, 0 on reliable."""
        return 0.0 if reliable else 64 * self.t1


DEFAULT_TIMERS = TimerConfig()
