"""The same call as scenario_uac.py, written with the UA API instead of steps: one coroutine per call.

Run: python -m sipapi.scenario scenario_uac_api.py --rate 20 --calls 100 --target 127.0.0.1:5070
"""


async def call(ua, uri):
    c = await ua.call(uri, timeout=10)  # INVITE ... 200, ACK; raises CallFailed (with .status) otherwise
    await c.bye()
