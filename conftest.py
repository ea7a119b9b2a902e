"""Test support for test_skyapi.py and bench_skyapi.py: real etcds, real skyapi servers.

One way to start each thing: TestEtcd (one member or a cluster, optionally TLS), running()
for a skyapi in this process, SkyapiProcess for one that gets signals, provide_process for
the client. EtcdView reads etcd as SkyDNS or CoreDNS would, without skyapi's code.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import functools
import inspect
import ipaddress
import itertools
import json
import os
import re
import resource
import shutil
import ssl
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tornado import websocket
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

import skyapi

HERE = os.path.dirname(os.path.abspath(__file__))
# Small timeouts (records live 3 s, pings every second) so lifetimes are seen in seconds.
FAST = {"timeout": 3, "ping_interval": 1.0, "ping_timeout": 1.0, "etcd_timeout": 1.0,
        "drain_grace": 0}
free_port = skyapi.free_port
_names = itertools.count()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds; "
                                       "pytest -m 'not slow' is the inner loop")
    config.addinivalue_line("markers", "chaos: a chaos run, judged to 100 ms: run these on "
                                       "their own (-m chaos), not beside the rest")


def async_test(fn):
    """Run an async test on a fresh event loop, bounded in time."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        async def bounded():
            return await asyncio.wait_for(fn(*args, **kwargs), 120)
        return asyncio.run(bounded())
    return wrapper


async def wait_until(poll: Callable[[], Any], timeout: float, interval: float = 0.02,
                     until: Callable[[Any], Any] = bool, what: str = "") -> Any:
    """Call poll (plain or async) until until(its value) is true, and return that value;
    fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = poll()
        if inspect.isawaitable(value):
            value = await value
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or inspect.getsource(poll).strip()}"
                                 f"; last: {value!r:.500}")  # what it was, for a rare failure
        await asyncio.sleep(interval)


# --- etcd ------------------------------------------------------------------------------


class TestEtcd(skyapi.DevEtcd):
    """The dev launcher, plus what tests and the benchmark do to etcd: a data folder of
    their choosing, clusters, TLS with client certificates, restarts, wipes."""

    __test__ = False  # not a test class, though its name starts with Test

    def __init__(self, data_dir: str | None = None, extra_args: Sequence[str] = (),
                 name: str = "default", tls: tuple[str, str, str] | None = None):
        """tls: (cert, key, ca) files: serve https with cert and want client certificates
        signed by ca. The health probe presents cert as its client certificate, and so does
        etcd's own JSON gateway, so cert must be good for client auth too."""
        super().__init__()
        if data_dir is not None:
            self.remove()  # the temporary folder DevEtcd made
            os.makedirs(data_dir, exist_ok=True)
            self.data_dir, self.logfile = data_dir, os.path.join(data_dir, "etcd.log")
        self.owns_dir = data_dir is None
        self.tls = tls
        self.scheme = "https" if tls else "http"
        self.extra_args = list(extra_args)
        self.name = name
        self.initial_cluster = f"{name}={self.peer_url}"

    @classmethod
    def cluster(cls, size: int) -> list["TestEtcd"]:
        """size members that form one cluster on loopback; started, with a leader."""
        members = [cls(name=f"m{i}") for i in range(size)]
        for m in members:
            m.initial_cluster = ",".join(f"{x.name}={x.peer_url}" for x in members)
            m.launch()  # all first: none is healthy before a quorum runs
        for m in members:
            m.wait_healthy()
        return members

    def command(self) -> list[str]:
        args = super().command()
        args[args.index("--initial-cluster") + 1] = self.initial_cluster
        args += ["--name", self.name]
        if self.tls:
            cert, key, ca = self.tls
            args += ["--cert-file", cert, "--key-file", key, "--client-cert-auth",
                     "--trusted-ca-file", ca]
        return args + self.extra_args

    def health_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        cert, key, ca = self.tls
        context = ssl.create_default_context(cafile=ca)
        context.load_cert_chain(cert, key)
        return context

    async def restart(self) -> "TestEtcd":
        """start() in a thread: it waits a second or two for etcd to answer, and a test's
        event loop, where an in-process skyapi runs, must not stop meanwhile (it would
        miss the pongs due then and drop live sockets)."""
        return await asyncio.to_thread(self.start)

    def wipe(self) -> None:
        shutil.rmtree(self.data_dir + "/data", ignore_errors=True)

    def stop(self) -> None:
        if self.owns_dir:
            super().stop()
        else:
            self.kill(15)


def started_etcd() -> TestEtcd:
    """A started TestEtcd, on other ports if a port free a moment ago was taken meanwhile
    (free_port() can only say what was free: on a busy machine another process may win)."""
    attempts = 3
    while True:
        server = TestEtcd()
        try:
            return server.start()
        except skyapi.ConfigError as e:
            server.stop()
            attempts -= 1
            if "address already in use" not in str(e) or not attempts:
                raise


@pytest.fixture(scope="session")
def etcd():
    """One etcd the whole session shares: each test keeps to a dns_root of its own."""
    server = started_etcd()
    yield server
    server.stop()


@pytest.fixture
def private_etcd():
    """An etcd of this test's own, to kill, freeze and wipe."""
    server = started_etcd()
    yield server
    server.stop()


@pytest.fixture(params=[2, 3], ids=["v2", "v3"])
def version(request):
    return request.param


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def unb64(s: str) -> str:
    return base64.b64decode(s).decode("utf-8", "replace")  # (others' values may be any bytes)


class EtcdView:
    """Reads etcd the way SkyDNS (v2) or CoreDNS (v3) would, independent of skyapi's code."""

    def __init__(self, url: str, version: int, timeout: float = 5):
        self.url, self.version, self.timeout = url, version, timeout
        self.http = AsyncHTTPClient()

    async def _fetch(self, path, method="GET", body=None):
        try:
            r = await self.http.fetch(self.url + path, method=method, body=body,
                                      request_timeout=self.timeout)
            return r.code, json.loads(r.body)
        except HTTPClientError as e:
            return e.code, json.loads(e.response.body) if e.response is not None else {}

    async def records(self, prefix: str) -> dict[str, str]:
        """key -> value of every record below prefix."""
        if self.version == 2:
            code, doc = await self._fetch("/v2/keys" + prefix + "?recursive=true")
            out = {}

            def walk(node):
                for child in node.get("nodes", []):
                    if child.get("dir"):
                        walk(child)
                    else:
                        out[child["key"]] = child["value"]
            if code == 200:
                walk(doc["node"])
            return out
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        code, doc = await self._fetch("/v3/kv/range", "POST", json.dumps(
            {"key": b64(prefix), "range_end": b64(end)}))
        return {unb64(kv["key"]): unb64(kv.get("value", "")) for kv in doc.get("kvs", [])}

    async def listing(self, prefix: str) -> tuple[dict[str, str], set[str]]:
        """(key -> value of every record, every directory (v2)) below prefix, in one
        linearizable read: a member that fell behind (thawed, restarted) cannot answer from
        its old state. OSError when this member does not answer (it hangs, or has no quorum):
        unlike records(), an answer never stands for 'nothing there'."""
        if self.version == 2:
            code, doc = await self._fetch("/v2/keys" + prefix.rstrip("/")
                                          + "?recursive=true&quorum=true")
            if code == 404 and doc.get("errorCode") == 100:  # key not found: nothing there
                return {}, set()
            if code != 200:
                raise OSError(f"etcd {self.url}: {code} {doc}")
            records, dirs = {}, set()

            def walk(node):
                if node.get("dir"):
                    dirs.add(node.get("key", "/"))
                    for child in node.get("nodes", []):
                        walk(child)
                else:
                    records[node["key"]] = node["value"]
            walk(doc["node"])
            return records, dirs
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        code, doc = await self._fetch("/v3/kv/range", "POST", json.dumps(
            {"key": b64(prefix), "range_end": b64(end)}))
        if code != 200:
            raise OSError(f"etcd {self.url}: {code} {doc}")
        return {unb64(kv["key"]): unb64(kv.get("value", "")) for kv in doc.get("kvs", [])}, set()

    async def dirs(self, prefix: str) -> set[str]:
        code, doc = await self._fetch("/v2/keys" + prefix + "?recursive=true")
        out = set()

        def walk(node):
            if node.get("dir"):
                out.add(node.get("key", "/"))
                for child in node.get("nodes", []):
                    walk(child)
        if code == 200:
            walk(doc["node"])
        return out

    async def delete(self, key: str) -> None:
        if self.version == 2:
            await self._fetch("/v2/keys" + key, "DELETE")
        else:
            await self._fetch("/v3/kv/deleterange", "POST", json.dumps({"key": b64(key)}))

    async def put(self, key: str, value: str) -> None:
        if self.version == 2:
            await self._fetch("/v2/keys" + key, "PUT", urllib.parse.urlencode({"value": value}))
        else:
            await self._fetch("/v3/kv/put", "POST", json.dumps({"key": b64(key), "value": b64(value)}))

    # Predicates on a test's records (those below its root), for wait_until.

    async def empty(self, cfg) -> bool:
        return not await self.records(prefix_of(cfg))

    async def has(self, cfg, key: str) -> bool:
        return key in await self.records(prefix_of(cfg))

    async def lacks(self, key: str) -> bool:
        return key not in await self.records(key.rsplit("/", 1)[0] + "/")

    async def keys_are(self, cfg, keys) -> bool:
        return set(await self.records(prefix_of(cfg))) == set(keys)

    async def count_is(self, cfg, n: int) -> bool:
        return len(await self.records(prefix_of(cfg))) == n

    async def lacks_dir(self, root: str, directory: str) -> bool:
        return directory not in await self.dirs(root)

    async def owned_by(self, cfg, key: str, owner: str) -> bool:
        value = (await self.records(prefix_of(cfg))).get(key)
        return value is not None and json.loads(value)["owner"] == owner


# --- certificates ---


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A CA; a certificate for 127.0.0.1 and localhost, good for client auth too (etcd's
    JSON gateway presents its server certificate to etcd itself); and a client certificate
    without a CommonName (with auth on, etcd's gateway refuses one that has a CommonName)."""
    folder = tmp_path_factory.mktemp("certs")
    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(subject, key, issuer, issuer_key, *extensions):
        # Key identifiers both ways: Python 3.13 verifies with VERIFY_X509_STRICT, which
        # wants them (and a CA's basic constraints and key usage critical).
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                  False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       issuer_key.public_key()), False))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(name, cert, key):
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}-key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return str(folder / f"{name}.pem"), str(folder / f"{name}-key.pem")

    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "skyapi test CA")])

    def key_usage(**allowed):
        return x509.KeyUsage(**{**dict.fromkeys(
            ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"],
            False), **allowed}), True

    ca = issue(ca_name, ca_key, ca_name, ca_key,
               (x509.BasicConstraints(ca=True, path_length=None), True),
               key_usage(key_cert_sign=True, crl_sign=True))
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    leaf = (usage, False), key_usage(digital_signature=True)
    server = issue(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), server_key,
                   ca_name, ca_key, *leaf, (x509.SubjectAlternativeName(
                       [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       False))
    client = issue(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "skyapi")]), client_key,
                   ca_name, ca_key, *leaf)
    ca_file, _ = write("ca", ca, ca_key)
    server_cert, server_key_file = write("server", server, server_key)
    client_cert, client_key_file = write("client", client, client_key)

    def server_named(name: str) -> tuple[str, str]:
        """A server certificate (and its key) for the DNS name, from the same CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        return write(name, issue(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key,
                                 ca_name, ca_key, (usage, False),
                                 (x509.SubjectAlternativeName([x509.DNSName(name)]), False)), key)

    return types.SimpleNamespace(ca=ca_file, server_cert=server_cert, server_key=server_key_file,
                                 client_cert=client_cert, client_key=client_key_file,
                                 server_named=server_named,
                                 etcd=(server_cert, server_key_file, ca_file),
                                 client={"ca_certs": ca_file, "client_cert": client_cert,
                                         "client_key": client_key_file})


class EtcdPoller(threading.Thread):
    """Counts the records below prefix every interval, from a thread of its own, so that
    neither the test's event loop nor skyapi's can hide a gap: (time, count) samples."""

    def __init__(self, url: str, version: int, prefix: str, interval: float = 0.01):
        super().__init__(daemon=True)
        self.url, self.version, self.prefix, self.interval = url, version, prefix, interval
        self.samples: list[tuple[float, int]] = []
        self._done = threading.Event()

    def count(self) -> int:
        if self.version == 2:
            try:
                with urllib.request.urlopen(f"{self.url}/v2/keys{self.prefix}?recursive=true",
                                            timeout=5) as r:
                    stack = [json.load(r)["node"]]
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return 0
                raise
            n = 0
            while stack:
                node = stack.pop()
                stack += node.get("nodes", [])
                n += not node.get("dir")
            return n
        body = json.dumps({"key": b64(self.prefix), "range_end": b64(
            self.prefix[:-1] + chr(ord(self.prefix[-1]) + 1)), "count_only": True}).encode()
        with urllib.request.urlopen(self.url + "/v3/kv/range", body, timeout=5) as r:
            return int(json.load(r).get("count", 0))

    def run(self) -> None:
        while not self._done.is_set():
            self.samples.append((time.monotonic(), self.count()))
            self._done.wait(self.interval)

    def __enter__(self) -> "EtcdPoller":
        self.start()
        while not self.samples:
            time.sleep(0.001)
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self.join(10)

    @property
    def lowest(self) -> int:
        return min(n for _, n in self.samples)


# --- skyapi ----------------------------------------------------------------------------


def unique_root() -> str:
    """A dns_root of its own per test, so tests sharing one etcd never see each other."""
    return f"t{next(_names)}x{os.getpid()}.test."


def config(etcd_urls, version=2, **overrides):
    values = {"listen_addr": "127.0.0.1:0", "etcd_api": list(etcd_urls), "etcd_version": version,
              "dns_root": unique_root(), "log_level": "debug", **FAST}
    values.update(overrides)
    return skyapi.make_config(values)


def prefix_of(cfg) -> str:
    return skyapi.root_dir(cfg) + "/"


@contextlib.asynccontextmanager
async def running(cfg):
    """skyapi in this process, stopped at the end."""
    server = skyapi.Skyapi(cfg)
    await server.start()
    # Its watch on (unless etcd is away or refuses skyapi, as some tests have it).
    watching = asyncio.ensure_future(server.registry.watching.wait())
    await asyncio.wait([watching], timeout=3)
    watching.cancel()
    try:
        yield server
    finally:
        await server.stop()


def process_args(cfg) -> list[str]:
    """The flags that give a child skyapi cfg's etcd and lifetimes."""
    args = []
    for name in ("dns_root", "etcd_version", "timeout", "ping_interval", "ping_timeout",
                 "etcd_timeout"):
        args += ["--" + name.replace("_", "-"), str(getattr(cfg, name))]
    for url in cfg.etcd_api:
        args += ["--etcd-api", url]
    return args


class SkyapiProcess:
    """skyapi as a child process (for signals), its log in a file. restart() starts it
    again on the same port after it exited, its log going on in the same file."""

    def __init__(self, tmp_path, *args: str, open_files: int | None = None):
        """open_files: the process's hard limit on open files (it takes its hard limit)."""
        self.port = free_port()
        self.args = args
        self.log = tmp_path / f"skyapi-{self.port}.log"
        self.open_files = open_files
        self.lives = 1  # its starts so far: each logs one start line
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen:
        dies, open_files = skyapi.dies_with_parent(), self.open_files

        def in_child() -> None:
            if dies is not None:
                dies()
            if open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
        with open(self.log, "ab") as stderr:
            return subprocess.Popen(
                [sys.executable, os.path.join(HERE, "skyapi.py"), "--listen-addr",
                 f"127.0.0.1:{self.port}", *self.args], stderr=stderr, cwd=HERE,
                preexec_fn=in_child)

    def restart(self) -> None:
        assert self.exited(), "restart() of a skyapi that still runs"
        self.lives += 1
        self.proc = self._spawn()

    def cpu_seconds(self) -> float:
        """The CPU time the process has used so far (user and system)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def started(self) -> None:
        await wait_until(lambda: logged(self.log, "start", self.lives) or self.proc.poll() is not None,
                         15)
        assert self.proc.poll() is None, self.log.read_text()

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def provide_process(port: int, *args: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    """The provide client as a child process, to skyapi at port."""
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "skyapi.py"), "provide",
         "--url", f"ws://127.0.0.1:{port}", *args],
        stdout=subprocess.PIPE, stderr=stderr, cwd=HERE, preexec_fn=skyapi.dies_with_parent())


async def healthcheck(*args: str) -> tuple[int, str]:
    """`skyapi.py healthcheck ARGS` as a child process: its exit code and what it printed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.join(HERE, "skyapi.py"), "healthcheck", *args,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=HERE)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode()


async def probe(port: int, path: str) -> tuple[int | None, str]:
    """GET http://127.0.0.1:port/path: (status, body), or (None, why) when nothing answers."""
    try:
        r = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}{path}", raise_error=False,
                                          request_timeout=5)
    except (OSError, HTTPClientError) as e:  # refused, reset, timed out
        return None, str(e)
    return r.code, r.body.decode()


async def connect(server, query: str, headers=None):
    url = f"ws://127.0.0.1:{server.port}/provide?{query}"
    return await websocket.websocket_connect(HTTPRequest(url, headers=headers or {}))


async def refusal(server, query: str, headers=None) -> tuple[str, int]:
    """The ERROR message and close code a refused request gets."""
    conn = await connect(server, query, headers)
    message = await asyncio.wait_for(conn.read_message(), 5)
    assert await asyncio.wait_for(conn.read_message(), 5) is None
    return message, conn.close_code


# --- logs ------------------------------------------------------------------------------

LOG_LINE = re.compile(r'time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=(debug|info|warn|error)'
                      r'( [a-z_]+=("([^"\\]|\\.)*"|[^\s"]+))+')


def log_events(path) -> list[dict]:
    """Each line of a skyapi log as its key=value pairs (quoted values are JSON strings)."""
    out = []
    for line in path.read_text().splitlines():
        assert LOG_LINE.fullmatch(line), line
        out.append({k: json.loads(v) if v.startswith('"') else v
                    for k, v in re.findall(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|[^\s"]+)', line)})
    return out


def events_named(path, *names) -> list[dict]:
    return [e for e in log_events(path) if e["event"] in names]


def logged(path, name: str, n: int = 1) -> bool:
    """At least n lines of event name in the log (read as text, whatever else it holds)."""
    return len(re.findall(rf" event={name}(?= |$)", path.read_text(), re.M)) >= n
