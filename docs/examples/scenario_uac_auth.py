"""A sipp "UAC with authentication" scenario as a sipapi scenario: every call is challenged (401) and
retried with Digest credentials, then answered, ACKed and hung up.

Run: python -m sipapi.scenario scenario_uac_auth.py --rate 10 --calls 100 --target 127.0.0.1:5070
"""

from sipapi import UserAgent


def make_ua(stack, local):
    """The phone that places the calls: its credentials answer any 401/407."""
    return UserAgent(stack, f"sip:alice@{local[0]}", username="alice", password="secret")


async def call(ua, uri):
    c = await ua.call(uri, timeout=10)  # INVITE, 401, ACK, INVITE with Authorization, 200, ACK
    await c.bye()
