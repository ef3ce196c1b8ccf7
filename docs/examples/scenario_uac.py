"""sipp's built-in UAC (`sipp -sn uac`) as a sipapi scenario: INVITE, ringing, answer, ACK, hang up.

Run: python -m sipapi.scenario scenario_uac.py --rate 50 --calls 1000 --target 127.0.0.1:5070
"""

from sipapi.scenario import SDP, expect, pause, send

steps = [
    send("INVITE", body=SDP),
    expect(100, optional=True),
    expect(180, optional=True),
    expect(200),
    send("ACK"),
    pause(0.05),
    send("BYE"),
    expect(200),
]
