"""The peer's TOML config and flag merging: defaults, file, flags on top, one clear error for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2psip.config import (
    HostPort,
    ListenSpec,
    PeerConfig,
    load_config,
    parse_hostport,
    parse_listen,
    parse_route,
)
from p2psip.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "peer.toml"
    path.write_text(text)
    return path


def test_defaults_follow_design() -> None:
    config = load_config()
    assert config.listen == [ListenSpec(None, "127.0.0.1", 5060)]
    assert config.listen[0].transports() == ("udp", "tcp")
    assert config.overlay == HostPort("127.0.0.1", 7060)
    assert config.join is None
    assert config.dns is False
    assert str(config.data_dir).endswith("p2psip")


def test_parse_listen_forms() -> None:
    assert parse_listen("udp:127.0.0.1:5070") == ListenSpec("udp", "127.0.0.1", 5070)
    assert parse_listen("TCP:[::1]:5071") == ListenSpec("tcp", "::1", 5071)
    assert parse_listen("127.0.0.1:5072") == ListenSpec(None, "127.0.0.1", 5072)
    assert parse_listen("tls:127.0.0.1") == ListenSpec("tls", "127.0.0.1", 5061)
    assert str(parse_listen("tcp:[::1]:5071")) == "tcp:[::1]:5071"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("sctp:127.0.0.1:5060", "unknown transport"),
        ("127.0.0.1:99999", "out of range"),
        ("127.0.0.1:abc", "not a number"),
        ("::1:5060", "brackets"),
        ("[::1:5060", "without ']'"),
        ("bad host!:5060", "not a valid host"),
    ],
)
def test_parse_listen_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_listen(text)


def test_parse_hostport_and_route() -> None:
    assert parse_hostport("[::1]:7060", "x") == HostPort("::1", 7060)
    assert str(HostPort("::1", 7060)) == "[::1]:7060"
    with pytest.raises(ConfigError, match="needs a port"):
        parse_hostport("127.0.0.1", "--join")
    assert parse_route("PSTN.Example=127.0.0.1:5099") == ("pstn.example", HostPort("127.0.0.1", 5099))
    assert parse_route("gw.example=127.0.0.1") == ("gw.example", HostPort("127.0.0.1", 5060))
    with pytest.raises(ConfigError, match="DOMAIN=HOST:PORT"):
        parse_route("gw.example")


def test_file_then_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
listen = ["udp:127.0.0.1:5080"]
overlay = "127.0.0.1:7080"
join = "127.0.0.1:7081"
overlay_name = "lab"
data_dir = "state"
dns = true
cache_ttl = 2
min_expires = 30
[routes]
"pstn.example" = "127.0.0.1:5099"
[users."sip:Alice@Example.NET"]
password = "secret"
""",
    )
    config = load_config(
        path,
        {
            "listen": ["tcp:127.0.0.1:5090"],
            "verbose": True,
            "join": None,
            "routes": ["kam.example=127.0.0.1:5098"],
        },
    )
    assert config.listen == [ListenSpec("tcp", "127.0.0.1", 5090)]  # flag replaces file
    assert config.overlay == HostPort("127.0.0.1", 7080)
    assert config.join == HostPort("127.0.0.1", 7081)  # None flag leaves the file's value
    assert config.overlay_name == "lab"
    assert config.data_dir == tmp_path / "state"  # relative to the config file
    assert config.dns is True and config.verbose is True
    assert config.cache_ttl == 2.0 and config.min_expires == 30
    assert config.route_for("PSTN.example") == HostPort("127.0.0.1", 5099)
    assert config.route_for("kam.example") == HostPort("127.0.0.1", 5098)
    account = config.account_for("sip:Alice@example.net")
    assert account is not None and account.password == "secret" and account.username == "Alice"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("listen = 5060", "listen must be a list"),
        ('listne = ["127.0.0.1:5060"]', "unknown setting 'listne'"),
        ("dns = 1", "dns must be true or false"),
        ("replicas = 0", "replicas = 0 is out of range"),
        ("replicas = true", "not a boolean"),
        ('overlay = "nowhere"', "needs a port"),
        ("min_expires = 100\nmax_expires = 10", "larger than max_expires"),
        ('[users."alice"]\npassword = "x"', "not a SIP address of record"),
        ('[users."sip:a@b"]\npasword = "x"', "unknown setting 'pasword'"),
        ('[users."sip:a@b"]\nusername = "x"', "password must be a string"),
        ("listen = [", "not valid TOML"),
        ('[routes]\n"x.example" = 5', "routes.x.example must be a HOST:PORT string"),
    ],
)
def test_bad_file_values_are_one_line_errors(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        load_config(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_join_self_is_refused() -> None:
    with pytest.raises(ConfigError, match="own overlay address"):
        load_config(None, {"overlay": "127.0.0.1:7070", "join": "127.0.0.1:7070"})


def test_peerconfig_is_constructible_directly() -> None:
    config = PeerConfig(listen=[ListenSpec("udp", "127.0.0.1", 0)], overlay=HostPort("127.0.0.1", 0))
    assert config.listen[0].port == 0 and config.routes == {}
