"""Overlay simulation benchmark: the shipping Chord core (and storage core) in the discrete-event simulator.

One command, one table:

    python bench/overlay_sim.py                 # N = 100, 1,000, 10,000 stable; churn at N = 1,000
    python bench/overlay_sim.py --max-n 1000    # quicker

For every N it runs the stable ring twice in the same run: p2psip's routing (base-16 fingers, successor-list
shortcuts, proximity fingers) and classic Chord (base-2 fingers, no proximity: the same code with
``finger_base=2, proximity=False``), and prints the hop ratio; then proximity on/off after a warm-up.
Targets (issue 4): stable ring mean hops <= 0.5 * log2(N), all lookups correct; churn with a one-hour median
session: >= 99.5 % of lookups succeed, no entry with a live replica lost; the 10,000-node run under 10 min.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from overlay.chord import ChordConfig
from overlay.sim import SimConfig, SimReport, simulate


def row(label: str, n: int, rep: SimReport, target: float | None) -> str:
    ok = ""
    if target is not None:
        ok = "yes" if rep.hops_mean <= target and rep.correct == rep.lookups else "NO"
    return (
        f"| {label} | {n:,} | {rep.lookups:,} | {100 * rep.success_rate:.2f} % | {100 * rep.correct_rate:.2f} % "
        f"| {rep.hops_mean:.2f} | {rep.hops_p99} | {'' if target is None else f'{target:.2f}'} {ok} "
        f"| {_p50_ms(rep):.0f} | {rep.maintenance_per_node_s:.2f} | {rep.entries_lost}/{rep.entries} "
        f"| {rep.wall_s:.1f} |"
    )


HEADER = (
    "| run | N | lookups | success | correct | hops mean | hops p99 | target (0.5 log2 N) "
    "| latency p50 ms | maint. msgs/node/s | entries lost | wall s |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--max-n",
        type=int,
        default=10_000,
        help="largest N of the stable runs (default 10000; 0: churn run only)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stable-s", type=float, default=40.0, help="simulated seconds of each stable run")
    parser.add_argument("--lookups", type=int, default=3000, help="about this many lookups per stable run")
    parser.add_argument("--churn-n", type=int, default=1000, help="N of the churn run (0 to skip)")
    parser.add_argument("--churn-s", type=float, default=1800.0, help="simulated seconds of the churn run")
    parser.add_argument("--median-session", type=float, default=3600.0)
    parser.add_argument("--entries", type=int, default=1000, help="signed entries stored in the churn run")
    parser.add_argument("--loss", type=float, default=0.0, help="message loss in the churn run")
    parser.add_argument("--no-classic", action="store_true", help="skip the classic-Chord comparison runs")
    parser.add_argument(
        "--pns-n",
        type=int,
        default=1000,
        help="N of the proximity on/off comparison after warm-up (0 to skip)",
    )
    parser.add_argument(
        "--adversarial-n",
        type=int,
        default=1000,
        help="N of the adversarial runs (f = 0, 10 %%, 20 %% of nodes drop, hide, replay or misroute; 0 to skip)",
    )
    parser.add_argument("--adversarial-only", action="store_true", help="print only the adversarial table")
    args = parser.parse_args()
    if args.adversarial_only:
        adversarial_table(args.adversarial_n, args.seed)
        return

    print(
        f"# overlay simulation — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}"
    )
    print("# latency: 5 ms + up to 100 ms one-way by 2-D distance; r = 3; stabilize 5 s, fix_fingers 10 s")
    print()
    print(HEADER)
    sizes = [n for n in (100, 1_000, 10_000) if n <= args.max_n] or ([args.max_n] if args.max_n > 0 else [])
    results: list[tuple[int, SimReport, SimReport | None]] = []
    for n in sizes:
        target = 0.5 * math.log2(n)
        rate = args.lookups / max(1.0, args.stable_s - 10.0)
        base = SimConfig(n=n, seed=args.seed, duration=args.stable_s, lookup_rate=rate, lookup_stop=10.0)
        ours = simulate(base)
        print(row("stable, p2psip (base 16)", n, ours, target), flush=True)
        classic = None
        if not args.no_classic:
            classic = simulate(
                SimConfig(**{**_fields(base), "chord": ChordConfig(finger_base=2, proximity=False)}),
            )
            print(row("stable, classic Chord (base 2)", n, classic, target), flush=True)
        results.append((n, ours, classic))
    pns: tuple[SimReport, SimReport] | None = None
    if args.pns_n:
        # Proximity acts as fix_fingers refreshes fingers (one every 10 s), so measure after a warm-up.
        runs = []
        for prox in (False, True):
            cfg = SimConfig(
                n=args.pns_n,
                seed=args.seed,
                duration=450.0,
                warmup=400.0,
                lookup_rate=args.lookups / 40.0,
                lookup_stop=10.0,
                chord=ChordConfig(proximity=prox),
            )
            rep = simulate(cfg)
            label = f"stable after 400 s, proximity {'on' if prox else 'off'}"
            print(row(label, args.pns_n, rep, 0.5 * math.log2(args.pns_n)), flush=True)
            runs.append(rep)
        pns = (runs[0], runs[1])
    churn = None
    if args.churn_n:
        churn = simulate(
            SimConfig(
                n=args.churn_n,
                seed=args.seed,
                duration=args.churn_s,
                lookup_rate=5.0,
                median_session=args.median_session,
                entries=args.entries,
                loss=args.loss,
            )
        )
        median = args.median_session
        median_text = f"{median / 3600:g} h" if median >= 3600 else f"{median / 60:g} min"
        label = f"churn {median_text} median, {args.churn_s / 60:g} min"
        if args.loss:
            label += f", {100 * args.loss:g} % loss"
        print(row(label, args.churn_n, churn, None), flush=True)
    print()
    for n, ours, classic in results:
        if classic is not None and classic.hops_mean:
            print(
                f"N = {n:,}: p2psip needs {ours.hops_mean / classic.hops_mean:.2f}x the hops of classic Chord "
                f"({ours.hops_mean:.2f} vs {classic.hops_mean:.2f}), "
                f"{ours.maintenance_per_node_s / max(classic.maintenance_per_node_s, 1e-9):.2f}x its maintenance"
            )
    if pns is not None:
        off, on = pns
        print(
            f"proximity (N = {args.pns_n:,}, after warm-up): lookup latency p50 {_p50_ms(on):.0f} ms vs "
            f"{_p50_ms(off):.0f} ms without ({_p50_ms(on) / max(_p50_ms(off), 1e-9):.2f}x), hops "
            f"{on.hops_mean:.2f} vs {off.hops_mean:.2f}"
        )
    if churn is not None:
        print(
            f"churn: {churn.joins} joins, {churn.leaves} leaves, {churn.crashes} crashes; lookups "
            f"{churn.succeeded}/{churn.lookups} succeeded ({100 * churn.success_rate:.2f} %), "
            f"{churn.correct} correct; {churn.abandoned} abandoned by a departing origin; "
            f"fetches found {churn.fetch_found}/{churn.fetch_checks}; entries lost {churn.entries_lost}"
            f"/{churn.entries}; failures {churn.failures or 'none'}"
        )
    if args.adversarial_n:
        adversarial_table(args.adversarial_n, args.seed)


def adversarial_table(n: int, seed: int) -> None:
    """Lookup success and stale reads vs the fraction f of adversarial nodes (issue 15)."""
    print()
    print(
        f"# adversaries, N = {n:,}: a fraction f of the nodes, in equal parts: drop (answer maintenance, drop"
        " lookups and fetches), hide (fetches answered empty), replay (an older signed version), misroute"
        " (claim every key, hide). 1,000 entries; a read = one fetch from the node the lookup found, and a"
        " quorum read of its replica set (r = 3) as Node.get does."
    )
    print(
        "| f | adversaries | lookups | finished | on the true owner | stale reads, one node "
        "| stale reads, replica set | wall s |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for f in (0.0, 0.1, 0.2):
        rep = simulate(
            SimConfig(n=n, seed=seed, duration=90.0, lookup_rate=40.0, lookup_stop=10.0, entries=1000,
                      adversaries=f, quorum_reads=True)
        )  # fmt: skip
        single = rep.single_stale / max(1, rep.single_reads)
        quorum = rep.quorum_stale / max(1, rep.quorum_reads)
        print(
            f"| {100 * f:.0f} % | {rep.adversaries} | {rep.lookups:,} | {100 * rep.success_rate:.2f} % "
            f"| {100 * rep.correct_rate:.2f} % | {100 * single:.2f} % ({rep.single_stale}/{rep.single_reads}) "
            f"| {100 * quorum:.2f} % ({rep.quorum_stale}/{rep.quorum_reads}) | {rep.wall_s:.1f} |",
            flush=True,
        )


def _p50_ms(rep: SimReport) -> float:
    values = sorted(rep.lookup_latency)
    return 1000 * values[len(values) // 2] if values else 0.0


def _fields(config: SimConfig) -> dict[str, object]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


if __name__ == "__main__":
    main()
