"""A full peer runs the TURN server (``turn = "HOST:PORT"`` / ``--turn``): two calls' media relayed through
it with credentials from its kept key, the quota refusal, and both counted in its status."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_media_ice import talk

from overlay.localring import quick_node_config
from p2psip.config import HostPort, ListenSpec, PeerConfig, load_config
from p2psip.errors import ConfigError
from p2psip.media import CallMedia, MemorySink, ToneSource
from p2psip.media.ice import IceSettings
from p2psip.peer import TURN_SECRET, Peer, flow_secret
from p2psip.turn import issue_credentials


def settings(peer: Peer, user: str) -> IceSettings:
    secret = flow_secret(Path(peer.config.data_dir), TURN_SECRET)  # the key the peer keeps in its data dir
    assert secret is not None and peer.turn is not None
    username, password = issue_credentials(secret, user, time.time())
    return IceSettings(
        turn=peer.turn.address, turn_username=username, turn_password=password, relay_only=True
    )


async def test_a_peer_relays_call_audio_and_counts_refusals_in_status(tmp_path: Path) -> None:
    config = PeerConfig(
        listen=[ListenSpec("udp", "127.0.0.1", 0)],
        overlay=HostPort("127.0.0.1", 0),
        data_dir=tmp_path / "p1",
        turn=HostPort("127.0.0.1", 0),
        turn_per_user=1,
    )
    peer = await Peer.start(config, node_config=quick_node_config())
    try:
        heard_a, heard_b = MemorySink(), MemorySink()
        a = await CallMedia.open("127.0.0.1", play=ToneSource(440), record=heard_a, ice=settings(peer, "ua"))
        b = await CallMedia.open(
            "127.0.0.1", play=ToneSource(1000), record=heard_b, ice=settings(peer, "alice")
        )
        try:
            await talk(a, b, heard_a, heard_b)
            assert a.ice is not None and a.ice.relayed
            with pytest.raises(ConnectionError, match="TURN server refused"):
                await CallMedia.open("127.0.0.1", ice=settings(peer, "alice"))  # alice's second: over quota
        finally:
            await a.close()
            await b.close()
        status = peer.status()
        assert peer.turn is not None and status["turn"] == f"127.0.0.1:{peer.turn.address[1]}"
        counters = status["counters"]
        assert counters["turn_relayed_packets"] > 100
        assert counters["turn_refused_quota"] == 1
        assert counters["turn_allocations_granted"] == 2
    finally:
        await peer.close(leave=False)


def test_turn_settings_in_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "peer.toml"
    path.write_text('turn = "127.0.0.1:3478"\nturn_per_user = 2\nturn_max_allocations = 50\n')
    config = load_config(path, {})
    assert config.turn == HostPort("127.0.0.1", 3478)
    assert (config.turn_per_user, config.turn_max_allocations) == (2, 50)
    path.write_text("turn_per_user = 0\n")
    with pytest.raises(ConfigError, match="turn_per_user = 0 is out of range"):
        load_config(path, {})
    assert load_config(None, {"turn": "127.0.0.1:3479"}).turn == HostPort("127.0.0.1", 3479)
