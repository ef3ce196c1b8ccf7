"""Peer configuration: a TOML file and command-line flags merged into one checked ``PeerConfig``.

Every setting of ``p2psip start`` can live in the config file; a flag given on the command line wins over
the file, and the file wins over the built-in defaults. Everything is validated here, once, so the peer never
meets a half-parsed value: any bad value raises ``ConfigError`` with one line that names the setting, what was
wrong and what to write instead (the CLI prints it and exits 2).

The file format (all keys optional)::

    listen = ["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"]   # no prefix: UDP and TCP
    overlay = "127.0.0.1:7060"
    join = "127.0.0.1:7061"
    overlay_name = "p2psip"
    data_dir = "~/.local/share/p2psip"
    dns = false
    verbose = false
    replicas = 3
    cache_ttl = 5.0            # seconds a location lookup is reused (never beyond a binding's expiry)
    min_expires = 60           # shorter REGISTER intervals get 423 Interval Too Brief
    max_expires = 7200         # longer ones are cut down to this
    default_expires = 3600
    realm = "p2psip"           # digest realm for users with a password
    require_auth = false       # true: only accounts may register; every REGISTER is challenged (401)
    home_routing = true        # false: calls go straight to the contact, not through its home peer (bench)
    client_peers = true        # unreachable by other peers (probe): join as a client peer; false: refuse
    client = false             # true: join as a client peer through --join whatever the probe says
    offline_messages = true    # false: no inbox (a MESSAGE for nobody registered gets 404, never stored)
    flow_timer = 120           # seconds an RFC 5626 phone may stay silent (Flow-Timer) before its flow fails
    nat_ping = 20.0            # seconds between NAT pings (OPTIONS) to phones without RFC 5626 outbound
    turn = "127.0.0.1:3478"    # run a TURN server (RFC 8656) there for call audio relays (off by default)
    turn_per_user = 4          # TURN allocations one user (credential) may hold at once (beyond: 486)
    turn_per_source = 4        # ... and one client IP address (an office behind one NAT may want more)
    turn_max_allocations = 200 # TURN allocations in all (beyond: 508)
    server_header = "p2psip/0.1.0"   # Server header of the peer's own responses; "" sends none
    new_aors_per_source = "30/min:30"  # AORs one source may register for the first time (rate:burst)
    new_aors_total = "600/min:600"     # ... and all sources together; "off" for no limit
    scan_rate = "5/s:50"       # INVITE/MESSAGE... answered 404 per source before it gets 503s
    max_connections = 2048     # incoming TCP/TLS/WS connections in all
    max_connections_per_source = 32
    max_pending = 64           # new requests in progress (overlay work) at once; beyond: 503 Retry-After
    message_timeout = 20.0     # seconds a message (or WebSocket handshake) may take to arrive

    [overlay_limits]           # requests per source on the overlay port (a ring member by NodeId,
    store = "100/s:500"        # anyone else by address:port); the defaults shown; "off" for no limit
    lookup = "300/s:1000"
    join = "20/s:40"
    other = "200/s:400"

    [routes]
    "pstn.example" = "192.0.2.10:5060"

    [presence_allow]           # who may see a user's presence (identified watchers; "*": any of them)
    "sip:alice@example.net" = ["sip:bob@example.net"]

    [voicemail]                # where a user's message-summary SUBSCRIBEs go (its voicemail, RFC 3842)
    "sip:alice@example.net" = "sip:alice@voicemail.example.net"

    [users."sip:alice@example.net"]
    password = "secret"
    username = "alice"         # digest user name; default: the AOR's user part
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2psip.address import HostPort, ListenSpec, parse_hostport, parse_listen
from p2psip.errors import ConfigError
from p2psip.ratelimit import Rate

# HostPort, ListenSpec and their parsers live in p2psip.address; re-exported as part of the config's API.
__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_OVERLAY_NAME",
    "DEFAULT_OVERLAY_PORT",
    "DEFAULT_SIP_PORT",
    "HostPort",
    "ListenSpec",
    "PeerConfig",
    "UserAccount",
    "default_data_dir",
    "load_config",
    "parse_hostport",
    "parse_listen",
    "parse_route",
    "read_config_file",
]

DEFAULT_SIP_PORT = 5060
DEFAULT_OVERLAY_PORT = 7060
DEFAULT_HOST = "127.0.0.1"
DEFAULT_OVERLAY_NAME = "p2psip"


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/p2psip`` or ``~/.local/share/p2psip`` (DESIGN.md's default)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "p2psip"


@dataclass(frozen=True)
class UserAccount:
    """A local user with digest credentials: the registrar challenges REGISTERs for this AOR."""

    aor: str
    password: str
    username: str
    realm: str | None = None


@dataclass
class PeerConfig:
    """Everything a peer needs to start; built by ``load_config`` (or directly, in tests and the demo)."""

    listen: list[ListenSpec] = field(
        default_factory=lambda: [ListenSpec(None, DEFAULT_HOST, DEFAULT_SIP_PORT)]
    )
    overlay: HostPort = field(default_factory=lambda: HostPort(DEFAULT_HOST, DEFAULT_OVERLAY_PORT))
    join: HostPort | None = None
    overlay_name: str = DEFAULT_OVERLAY_NAME
    data_dir: Path = field(default_factory=default_data_dir)
    script: Path | None = None
    scripts: Path | None = None
    routes: dict[str, HostPort] = field(default_factory=dict)
    presence_allow: dict[str, list[str]] = field(default_factory=dict)
    """Per presentity (canonical AOR): the watchers (canonical AORs, or ``"*"``) allowed to see its
    presence; a presentity not named here lets every identified watcher see it (docs/presence.md)."""
    voicemail: dict[str, str] = field(default_factory=dict)
    """Per user (canonical AOR): the SIP URI of its voicemail, where the peer retargets the user's own
    ``message-summary`` SUBSCRIBEs (p2psip/mailbox.py, docs/presence.md)."""
    dns: bool = False
    verbose: bool = False
    replicas: int = 3
    cache_ttl: float = 5.0
    min_expires: int = 60
    max_expires: int = 7200
    default_expires: int = 3600
    realm: str = "p2psip"
    require_auth: bool = False
    home_routing: bool = True
    offline_messages: bool = True
    """Publish each registered AOR's inbox key and keep MESSAGEs for it while nobody is registered
    (docs/presence.md, Offline messages)."""
    advertise: HostPort | None = None
    """The overlay address other peers reach this one at (a port forwarded by a NAT router to it); its
    host is also the SIP address the peer puts in Path, Record-Route and Via."""
    flow_timer: int = 120
    nat_ping: float = 20.0
    turn: HostPort | None = None
    """UDP address of this peer's TURN server (p2psip.turn: relayed candidates for call audio); None: off."""
    turn_per_user: int = 4
    turn_per_source: int = 4
    """TURN allocations one client IP address may hold at once (beyond: 486): phones behind one NAT share
    it, so an office wants more than a home."""
    turn_max_allocations: int = 200
    users: dict[str, UserAccount] = field(default_factory=dict)
    tls_cert: Path | None = None
    """Certificate (PEM) of the tls:/wss: listeners and of --http with TLS; self-signed when None."""
    tls_key: Path | None = None
    tls_ca: Path | None = None
    """Certificates trusted when connecting out over TLS/WSS (the system's store when None)."""
    ws_origins: list[str] = field(default_factory=list)
    http: HostPort | None = None
    """Where the ring page and the softphone are served (``--http HOST:PORT``); off when None."""
    http_tls: bool = False
    """Serve ``--http`` over HTTPS (with ``tls_cert``, or a self-signed certificate)."""
    http_token: str | None = None
    """Token the pages need off loopback (a random one is made and printed when None)."""
    """Web origins whose pages may open the ws:/wss: listeners, besides loopback pages and --http's own."""
    server_header: str | None = None
    """The Server header of the peer's own responses: None = ``p2psip/VERSION``, "" = none."""
    new_aors_per_source: Rate = field(default_factory=lambda: Rate.parse("30/min:30"))
    """How fast one source may register AORs this peer holds no key for (each creates a user key)."""
    new_aors_total: Rate = field(default_factory=lambda: Rate.parse("600/min:600"))
    scan_rate: Rate = field(default_factory=lambda: Rate.parse("5/s:50"))
    """404s (nobody registered) per source; past it the source's requests get 503 without a lookup."""
    max_connections: int = 2048
    max_connections_per_source: int = 32
    max_pending: int = 64
    """New (out-of-dialog) requests whose overlay work (lookups, stores) is in progress at once; past it
    new ones get 503 with Retry-After at once, so a SIP flood cannot starve overlay maintenance (the
    neighbours' pings) on the same event loop and break the ring: overload is shed, not queued."""
    message_timeout: float = 20.0
    dht: str = "chord"
    """The directory engine: ``chord`` (our overlay) or ``opendht`` (an OpenDHT network, ``--join`` an
    OpenDHT bootstrap; needs ``policy = "enrolled"``; docs/overlay.md#engines)."""
    policy: str = "first-claim"
    """Who may write an AOR: ``first-claim`` (the first user key) or ``enrolled`` (a user certificate of the
    enrollment authority named by ``ca``; ``p2psip enroll``, docs/security.md)."""
    ca: Path | None = None
    """The enrollment authority's public key file (``ca.pub`` of ``p2psip enroll init``: 64 hex digits)."""
    client_peers: bool = True
    """A peer others cannot reach (the probe at join, docs/nat.md) joins as a client peer through its
    bootstrap; False: it refuses to start instead."""
    client: bool = False
    """Join as a client peer whatever the probe says (``--client``)."""
    enrolled_nodes: bool = False
    """Admit only nodes holding a node certificate of ``ca`` (this peer's in ``DATA_DIR/node.cert``)."""
    overlay_limits: dict[str, Rate] = field(default_factory=dict)
    """Per-source request limits on the overlay port by kind (OVERLAY_LIMIT_KINDS); unset kinds keep the
    overlay's defaults (overlay.node.DEFAULT_LIMITS)."""

    def route_for(self, host: str) -> HostPort | None:
        """The static next hop for a request-URI host, if one is configured (case-insensitive)."""
        return self.routes.get(host.lower().strip("[]"))

    def account_for(self, aor: str) -> UserAccount | None:
        return self.users.get(aor)


# --- value parsers (shared with the CLI's flag parsing) ---------------------------------------------------


def parse_route(text: str, what: str = "--route") -> tuple[str, HostPort]:
    """``DOMAIN=HOST:PORT``: requests for DOMAIN go to that next hop instead of the overlay."""
    domain, sep, target = text.partition("=")
    domain = domain.strip().lower()
    if not sep or not domain or not target.strip():
        raise ConfigError(f"{what}: {text!r} is not DOMAIN=HOST:PORT (e.g. pstn.example=192.0.2.10:5060)")
    return domain, parse_hostport(target, f"{what} {domain}", default_port=DEFAULT_SIP_PORT)


def _normalize_aor(text: str, what: str) -> str:
    """Canonical AOR without importing the URI parser: ``sip:user@host``, host lower-cased, sips -> sip."""
    raw = text.strip()
    scheme, sep, rest = raw.partition(":")
    if not sep or scheme.lower() not in ("sip", "sips") or "@" not in rest:
        raise ConfigError(f"{what}: {text!r} is not a SIP address of record (write sip:user@domain)")
    user, _, host = rest.partition("@")
    host = host.split(";", 1)[0].split("?", 1)[0]
    if host.startswith("["):
        host = host[: host.find("]") + 1]
    elif ":" in host:
        host = host.split(":", 1)[0]
    if not user or not host:
        raise ConfigError(f"{what}: {text!r} is not a SIP address of record (write sip:user@domain)")
    return f"sip:{user}@{host.lower()}"


def _aor(text: str, where: str) -> str:
    """The canonical AOR of a config value, or a ConfigError naming where it was."""
    from p2psip.errors import ParseError
    from p2psip.uri import URI

    try:
        uri = URI(text)
        if uri.scheme not in ("sip", "sips") or not uri.user:
            raise ParseError("not sip:user@domain")
        return uri.aor()
    except ParseError as exc:
        raise ConfigError(f"config: {where}: {text!r} is not an address of record ({exc})") from None


# --- the TOML file ---------------------------------------------------------------------------------------

_FILE_KEYS = frozenset(
    [
        "listen",
        "overlay",
        "join",
        "overlay_name",
        "data_dir",
        "script",
        "scripts",
        "routes",
        "presence_allow",
        "voicemail",
        "dns",
        "verbose",
        "replicas",
        "cache_ttl",
        "min_expires",
        "max_expires",
        "default_expires",
        "realm",
        "require_auth",
        "home_routing",
        "offline_messages",
        "advertise",
        "flow_timer",
        "nat_ping",
        "turn",
        "turn_per_user",
        "turn_per_source",
        "turn_max_allocations",
        "users",
        "tls_cert",
        "tls_key",
        "tls_ca",
        "ws_origins",
        "http",
        "http_tls",
        "http_token",
        "server_header",
        "new_aors_per_source",
        "new_aors_total",
        "scan_rate",
        "max_connections",
        "max_connections_per_source",
        "max_pending",
        "message_timeout",
        "overlay_limits",
        "policy",
        "ca",
        "enrolled_nodes",
        "client_peers",
        "client",
        "dht",
    ]
)
# The kinds of overlay request limits (overlay.node.LIMIT_KINDS; the layering rule keeps this module
# from importing overlay, a test checks the two agree).
OVERLAY_LIMIT_KINDS = ("store", "lookup", "join", "other")


def _typed(value: Any, kind: type | tuple[type, ...], key: str, hint: str) -> Any:
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ConfigError(f"config: {key} must be {hint}, not a boolean")
    if not isinstance(value, kind):
        raise ConfigError(f"config: {key} must be {hint}, got {type(value).__name__} {value!r}")
    return value


def read_config_file(path: Path) -> dict[str, Any]:
    """The raw settings of a TOML file; unreadable files and syntax errors are ConfigErrors."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config: {path} does not exist (check --config)") from None
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror or exc}") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raise ConfigError(f"config: {path} starts with a byte order mark (BOM); save it as UTF-8 without BOM")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"config: {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); "
            "TOML files are UTF-8: re-save it in that encoding"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        known = ", ".join(sorted(_FILE_KEYS))
        raise ConfigError(f"config: unknown setting {unknown[0]!r} in {path} (known: {known})")
    return data


def _apply(config: PeerConfig, settings: Mapping[str, Any], base_dir: Path | None) -> None:
    """Apply checked settings (from the file or from flags) onto ``config``."""

    def path_of(key: str) -> Path:
        value = _typed(settings[key], str, key, "a path string")
        p = Path(value).expanduser()
        return p if p.is_absolute() or base_dir is None else base_dir / p

    for key in settings:
        value = settings[key]
        if value is None:
            continue
        if key == "listen":
            items = [value] if isinstance(value, str) else _typed(value, list, key, "a list of strings")
            if not items:
                raise ConfigError("config: listen must name at least one address")
            config.listen = [parse_listen(item, key) for item in items]
        elif key == "http":
            config.http = parse_hostport(_typed(value, str, key, "a HOST:PORT string"), key)
        elif key == "http_tls":
            config.http_tls = _typed(value, bool, key, "true or false")
        elif key == "http_token":
            token = _typed(value, str, key, "a string")
            plain = token.replace("-", "").replace("_", "")
            if len(token) < 16 or not token.isascii() or not plain.isalnum():
                raise ConfigError("config: http_token must be at least 16 letters, digits, '-' or '_'")
            config.http_token = token
        elif key == "turn":
            config.turn = parse_hostport(_typed(value, str, key, "a HOST:PORT string"), key)
        elif key in ("turn_per_user", "turn_per_source", "turn_max_allocations"):
            number = _typed(value, int, key, "a whole number")
            if not 1 <= number <= 100_000:
                raise ConfigError(f"config: {key} = {number} is out of range (1-100000)")
            setattr(config, key, number)
        elif key in ("overlay", "join", "advertise"):
            hp = parse_hostport(_typed(value, str, key, "a HOST:PORT string"), key)
            if key == "overlay":
                config.overlay = hp
            elif key == "advertise":
                config.advertise = hp
            else:
                config.join = hp
        elif key == "overlay_name":
            name = _typed(value, str, key, "a string")
            if not name or len(name) > 64 or not name.isprintable():
                raise ConfigError("config: overlay_name must be 1-64 printable characters")
            config.overlay_name = name
        elif key == "data_dir":
            config.data_dir = path_of(key)
        elif key == "script":
            config.script = path_of(key)
        elif key == "scripts":
            config.scripts = path_of(key)
        elif key in ("tls_cert", "tls_key", "tls_ca"):
            setattr(config, key, path_of(key))
        elif key == "ws_origins":
            items = [value] if isinstance(value, str) else _typed(value, list, key, "a list of strings")
            for item in items:
                origin = _typed(item, str, key, "a list of origins like https://phone.example")
                if origin != "*" and "://" not in origin:
                    raise ConfigError(
                        f"config: ws_origins: {origin!r} is not an origin (scheme://host[:port])"
                    )
            config.ws_origins = list(items)
        elif key == "routes":
            table = _typed(value, dict, key, 'a table DOMAIN = "HOST:PORT"')
            for domain, target in table.items():
                target = _typed(target, str, f"routes.{domain}", "a HOST:PORT string")
                d, hp = parse_route(f"{domain}={target}", "routes")
                config.routes[d] = hp
        elif key == "presence_allow":
            table = _typed(value, dict, key, 'a table AOR = ["WATCHER-AOR", ...]')
            for presentity, watchers in table.items():
                where = f"presence_allow.{presentity}"
                names = _typed(watchers, list, where, 'a list of AORs (or "*")')
                allowed = [
                    _aor(_typed(w, str, where, "AOR strings"), where) if w != "*" else "*" for w in names
                ]
                config.presence_allow[_aor(presentity, "presence_allow")] = allowed
        elif key == "voicemail":
            table = _typed(value, dict, key, 'a table AOR = "VOICEMAIL-URI"')
            for owner, target in table.items():
                where = f"voicemail.{owner}"
                _aor(_typed(target, str, where, "a SIP URI string"), where)
                config.voicemail[_aor(owner, "voicemail")] = target
        elif key == "policy":
            policy = _typed(value, str, key, '"first-claim" or "enrolled"')
            if policy not in ("first-claim", "enrolled"):
                raise ConfigError(f"config: policy {policy!r}: use first-claim or enrolled")
            config.policy = policy
        elif key == "ca":
            config.ca = path_of(key)
        elif key == "dht":
            dht = _typed(value, str, key, '"chord" or "opendht"')
            if dht not in ("chord", "opendht"):
                raise ConfigError(f"config: dht {dht!r}: use chord or opendht")
            config.dht = dht
        elif key in ("dns", "verbose", "require_auth", "home_routing", "enrolled_nodes", "offline_messages",
                     "client_peers", "client"):
            setattr(config, key, _typed(value, bool, key, "true or false"))
        elif key in ("replicas", "min_expires", "max_expires", "default_expires"):
            number = _typed(value, int, key, "a whole number")
            low = 1 if key == "replicas" else 0
            if number < low or number > (16 if key == "replicas" else 10 * 365 * 86400):
                raise ConfigError(f"config: {key} = {number} is out of range")
            setattr(config, key, number)
        elif key == "flow_timer":
            seconds = _typed(value, int, key, "a whole number of seconds")
            if not 1 <= seconds <= 3600:
                raise ConfigError(f"config: flow_timer = {seconds} is out of range (1-3600 seconds)")
            config.flow_timer = seconds
        elif key == "nat_ping":
            interval = float(_typed(value, (int, float), key, "a number of seconds"))
            if not 0.1 <= interval <= 3600:
                raise ConfigError(f"config: nat_ping = {interval} is out of range (0.1-3600 seconds)")
            config.nat_ping = interval
        elif key == "cache_ttl":
            ttl = float(_typed(value, (int, float), key, "a number of seconds"))
            if not 0 <= ttl <= 3600:
                raise ConfigError(f"config: cache_ttl = {ttl} is out of range (0-3600 seconds)")
            config.cache_ttl = ttl
        elif key == "server_header":
            header = _typed(value, str, key, 'a string ("" for no Server header)')
            if not header.isprintable() or len(header) > 200:
                raise ConfigError("config: server_header must be printable text of at most 200 characters")
            config.server_header = header
        elif key == "overlay_limits":
            pairs: list[tuple[str, object]] = []
            if isinstance(value, list):  # from --overlay-limit KIND=RATE flags
                for text in value:
                    kind, _, rate = str(text).partition("=")
                    pairs.append((kind.strip(), rate.strip()))
            else:
                pairs = list(_typed(value, dict, key, 'a table like store = "100/s:500"').items())
            for kind, text in pairs:
                if kind not in OVERLAY_LIMIT_KINDS:
                    kinds = ", ".join(OVERLAY_LIMIT_KINDS)
                    raise ConfigError(f"config: overlay_limits: unknown kind {kind!r} (use {kinds})")
                rate_text = _typed(text, str, f"overlay_limits.{kind}", 'a rate like "100/s:500" or "off"')
                try:
                    config.overlay_limits[kind] = Rate.parse(rate_text)
                except ValueError as exc:
                    raise ConfigError(f"config: overlay_limits.{kind}: {exc}") from None
        elif key in ("new_aors_per_source", "new_aors_total", "scan_rate"):
            try:
                setattr(config, key, Rate.parse(_typed(value, str, key, 'a rate like "30/min:30" or "off"')))
            except ValueError as exc:
                raise ConfigError(f"config: {key}: {exc}") from None
        elif key in ("max_connections", "max_connections_per_source", "max_pending"):
            number = _typed(value, int, key, "a whole number")
            if not 1 <= number <= 1_000_000:
                raise ConfigError(f"config: {key} = {number} is out of range (1-1000000)")
            setattr(config, key, number)
        elif key == "message_timeout":
            seconds = float(_typed(value, (int, float), key, "a number of seconds"))
            if not 0.1 <= seconds <= 3600:
                raise ConfigError(f"config: message_timeout = {seconds} is out of range (0.1-3600 seconds)")
            config.message_timeout = seconds
        elif key == "realm":
            realm = _typed(value, str, key, "a string")
            if not realm or '"' in realm or not realm.isprintable():
                raise ConfigError("config: realm must be a non-empty printable string without quotes")
            config.realm = realm
        elif key == "users":
            table = _typed(value, dict, key, 'a table of [users."sip:user@domain"] sections')
            for aor_text, account in table.items():
                aor = _normalize_aor(aor_text, "users")
                account = _typed(account, dict, f"users.{aor_text}", 'a table with password = "..."')
                extra = sorted(set(account) - {"password", "username", "realm"})
                if extra:
                    raise ConfigError(f"config: users.{aor_text}: unknown setting {extra[0]!r}")
                password = _typed(account.get("password"), str, f"users.{aor_text}.password", "a string")
                username = account.get("username", aor.partition(":")[2].partition("@")[0])
                username = _typed(username, str, f"users.{aor_text}.username", "a string")
                realm = account.get("realm")
                if realm is not None:
                    realm = _typed(realm, str, f"users.{aor_text}.realm", "a string")
                config.users[aor] = UserAccount(aor, password, username, realm)
        else:  # pragma: no cover - guarded by _FILE_KEYS and the CLI
            raise ConfigError(f"config: unknown setting {key!r}")
    if config.min_expires > config.max_expires:
        raise ConfigError(
            f"config: min_expires ({config.min_expires}) is larger than max_expires ({config.max_expires})"
        )


def load_config(path: Path | None = None, flags: Mapping[str, Any] | None = None) -> PeerConfig:
    """Defaults, then the TOML file (if any), then the flags that were actually given (non-None values).

    ``flags`` uses the file's key names; ``listen`` is a list of strings and ``routes`` a list of
    ``DOMAIN=HOST:PORT`` strings there (as argparse collects them). Raises ConfigError on any bad value.
    """
    config = PeerConfig()
    if path is not None:
        path = Path(path).expanduser()
        _apply(config, read_config_file(path), path.parent)
    if flags:
        given = {k: v for k, v in flags.items() if v is not None and v != []}
        routes = given.pop("routes", None)
        if routes is not None:
            for text in routes:
                domain, hp = parse_route(text)
                config.routes[domain] = hp
        unknown = sorted(set(given) - _FILE_KEYS)
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}")
        _apply(config, given, None)
    if config.dht == "opendht" and config.policy != "enrolled":
        raise ConfigError(
            "--dht opendht needs --policy enrolled --ca FILE: no OpenDHT node remembers an AOR's first"
            " owner, so first-claim cannot be enforced there"
        )
    if config.policy == "enrolled" and config.ca is None:
        raise ConfigError("--policy enrolled needs --ca FILE (the enrollment authority's ca.pub)")
    if config.enrolled_nodes and config.ca is None:
        raise ConfigError("--enrolled-nodes needs --ca FILE (the enrollment authority's ca.pub)")
    if config.client and config.join is None:
        raise ConfigError("--client needs --join HOST:PORT: a client peer attaches to a full peer")
    if config.client and config.dht == "opendht":
        raise ConfigError("--client works with the chord overlay only (not --dht opendht)")
    if config.join is not None and config.join == config.overlay and config.overlay.port != 0:
        raise ConfigError(f"--join {config.join} is this peer's own overlay address; name another peer")
    return config
