#!/usr/bin/env python3
"""What one etcd request costs skyapi: CPU microseconds of this process per request, and
requests per second, through skyapi's EtcdClient against a real etcd it starts itself.

    .venv/bin/python bench_etcdclient.py                      # this tree's skyapi.py
    .venv/bin/python bench_etcdclient.py --skyapi old.py      # another version, to compare

Scenarios (each on the same etcd, keys written beforehand):
    v2 single   refreshes (PUT ?refresh=true&prevValue=...) from --workers coroutines,
                each sending one request() and awaiting it before the next
    v2 many     the same refreshes in batches of --batch from --workers coroutines: one
                request_many() per batch (a client without it: gather of request())
    v2 deletes  compare-and-delete of --n keys in batches of --batch, all batches at once:
                how fast a mass close reaches etcd
    v3 txn      kv/txn requests of --batch puts each, from --workers coroutines

Not a test: a measuring tool for the client (see EtcdClient in skyapi.py).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import json
import os
import sys
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))


def load_skyapi(path: str):
    spec = importlib.util.spec_from_file_location("skyapi_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


FORM = "application/x-www-form-urlencoded"


def put2(key: str, value: str) -> tuple[str, str, bytes, str]:
    return "PUT", "/v2/keys" + key, urllib.parse.urlencode({"value": value, "ttl": 300}).encode(), FORM


def refresh(key: str, value: str) -> tuple[str, str, bytes, str]:
    body = urllib.parse.urlencode({"ttl": 300, "refresh": "true", "prevValue": value}).encode()
    return "PUT", "/v2/keys" + urllib.parse.quote(key), body, FORM


def delete(key: str, value: str) -> tuple[str, str, bytes, str]:
    return "DELETE", "/v2/keys" + urllib.parse.quote(key) + "?prevValue=" + urllib.parse.quote(value), b"", FORM


def put3(keys: list[str]) -> tuple[str, str, bytes, str]:
    def b64(s: str) -> str:
        return base64.b64encode(s.encode()).decode()
    ops = [{"request_put": {"key": b64(k), "value": b64('{"host":"10.0.0.1","port":1}')}}
           for k in keys]
    return "POST", "/v3/kv/txn", json.dumps({"success": ops}).encode(), "application/json"


async def send_many(client, op, requests):
    if hasattr(client, "request_many"):
        return await client.request_many(op, requests)
    return await asyncio.gather(*(client.request(op, *r) for r in requests))


def batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


async def from_workers(workers: int, items: list, send) -> None:
    """workers coroutines, each sending its share of items one after another."""
    async def worker(w):
        for item in items[w::workers]:
            await send(item)
    await asyncio.gather(*(worker(w) for w in range(workers)))


def cpu_seconds(pid: int | None) -> float:
    """CPU time of another process (etcd), from /proc; 0 if unknown."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(name, run, count, etcd_pid):
    """run() sends count requests; CPU of this process and of etcd, and wall time, around it."""
    cpu, etcd_cpu, wall = time.process_time(), cpu_seconds(etcd_pid), time.perf_counter()
    await run()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    etcd_cpu = cpu_seconds(etcd_pid) - etcd_cpu
    print(f"{name:<34} {count:>7} requests  {cpu / count * 1e6:7.1f} us CPU/request  "
          f"{count / wall:8.0f} requests/s  (etcd: {etcd_cpu / count * 1e6:5.0f} us CPU/request)",
          flush=True)


async def bench(sky, url: str, etcd_pid: int | None, args) -> None:
    client = sky.EtcdClient([url], 5.0, args.concurrency)

    async def one(op, request, code):
        answer = await client.request(op, *request)
        assert answer[0] == code, answer

    async def many(op, requests, code):
        answers = await send_many(client, op, requests)
        assert all(c == code for c, _ in answers), answers[:1]

    keys = [f"/bench/k{i // 100}/r{i}" for i in range(args.n)]
    value = '{"host":"10.0.0.1","port":1,"owner":"bench"}'
    for batch in batches([put2(k, value) for k in keys], args.batch):
        await many("put", batch, 201)
    refreshes = [refresh(k, value) for k in keys]
    scenarios = args.only or ["single", "many", "deletes", "txn"]
    if "single" in scenarios:
        await measure(f"v2 single, {args.workers} workers", lambda: from_workers(
            args.workers, refreshes, lambda r: one("refresh", r, 200)), len(refreshes), etcd_pid)
    if "many" in scenarios:
        await measure(f"v2 many, batch {args.batch}, {args.workers} workers", lambda: from_workers(
            args.workers, batches(refreshes, args.batch), lambda b: many("refresh", b, 200)),
            len(refreshes), etcd_pid)
    if "deletes" in scenarios:
        deletes = batches([delete(k, value) for k in keys], args.batch)
        await measure(f"v2 deletes, batch {args.batch}, all at once", lambda: asyncio.gather(
            *(many("delete", b, 200) for b in deletes)), len(keys), etcd_pid)
    if "txn" in scenarios:
        txns = [put3(b) for b in batches(keys, args.batch)]
        await measure(f"v3 txn of {args.batch} puts, {args.workers} workers", lambda: from_workers(
            args.workers, txns, lambda t: one("txn", t, 200)), len(txns), etcd_pid)
    client.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skyapi", default=os.path.join(HERE, "skyapi.py"), help="skyapi.py to measure")
    p.add_argument("--etcd", help="an etcd URL to use instead of starting one")
    p.add_argument("--n", type=int, default=20000, help="keys (and refreshes, deletes)")
    p.add_argument("--batch", type=int, default=64, help="requests per request_many, puts per txn")
    p.add_argument("--workers", type=int, default=16, help="coroutines sending at once")
    p.add_argument("--concurrency", type=int, default=16, help="the client's etcd_concurrency")
    p.add_argument("--only", action="append", choices=["single", "many", "deletes", "txn"])
    args = p.parse_args()
    sky = load_skyapi(args.skyapi)
    etcd = None if args.etcd else sky.DevEtcd().start()
    try:
        asyncio.run(bench(sky, args.etcd or etcd.url, etcd and etcd.proc.pid, args))
    finally:
        if etcd:
            etcd.stop()


if __name__ == "__main__":
    main()
