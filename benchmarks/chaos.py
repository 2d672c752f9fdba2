"""Chaos soak: two gateway instances on Redis Sentinel while Redis, the IdP and an instance fail.

``python -m benchmarks.chaos [--duration 600] [--sessions 8] [--settle 4]`` (issue 22, item 5;
tests/e2e/test_chaos_smoke.py runs one round of it in CI). The test IdP rotates refresh tokens
(a replayed one is ``invalid_grant`` and revokes the grant: no reuse interval, the worst case)
and its access tokens live 4 s, so every session refreshes all the time. Steady load on
``--sessions`` logged-in sessions, spread over both instances, while a schedule repeats:

- ``redis-pause``: the master frozen (SIGSTOP) for 0.6 s, under the sentinels' down-after;
- ``idp-pause``: the IdP frozen for 3 s (tokens expire meanwhile);
- ``instance-kill``: instance B killed (SIGKILL, requests in flight cut) and started again;
- ``sentinel-failover``: ``SENTINEL FAILOVER`` (the master hands over and becomes a replica);
- ``redis-kill``: the master killed, the sentinels promote the replica, the old master is
  started again empty and rejoins as a replica.

Counted: answers by status, sessions lost (a 401: the test IdP's refresh tokens outlive the
soak, so a 401 is never legitimate here), refresh-token reuse at the IdP (``invalid_grant`` on
the refresh grant), 500s, 503s without Retry-After. Target: all zero. Requests to an instance
that is down are not answers (a load balancer sends them to the other one) and are counted
apart. Prints one JSON report; exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

import httpx

from tests.e2e.gateway_harness import CSRF, gateway_config, start_upstreams
from tests.e2e.login import browser_login
from tests.e2e.processes import GatewayProcess
from tests.e2e.redis_topologies import MASTER, SentinelTopology, sentinel_topology, wait_for
from tests.e2e.servers import IdpProcess, Upstream, free_port, start_idp

SECRET_KEY = "chaos-soak-secret-key-chaos-soak-secret-key"
ENV = {"GATEWAY_OIDC__CLIENT_SECRET": "bff-secret", "GATEWAY_SESSION__SECRET_KEY": SECRET_KEY}
EVENTS = ("redis-pause", "idp-pause", "instance-kill", "sentinel-failover", "redis-kill")
REQUEST_TIMEOUT = 30.0


@dataclass
class Report:
    """What the soak counted (see the module docstring)."""

    statuses: Counter[int] = field(default_factory=Counter)
    lost_sessions: int = 0
    server_errors: int = 0
    without_retry_after: int = 0
    refused: int = 0  # the instance was down: not an answer
    refresh_reuse: int = 0
    refreshes: int = 0
    events: Counter[str] = field(default_factory=Counter)
    final_ok: int = 0
    sessions: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.lost_sessions == 0
            and self.server_errors == 0
            and self.without_retry_after == 0
            and self.refresh_reuse == 0
            and self.final_ok == self.sessions
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 1),
            "sessions": self.sessions,
            "answers": dict(sorted(self.statuses.items())),
            "sessions_lost": self.lost_sessions,
            "500s": self.server_errors,
            "503s_without_retry_after": self.without_retry_after,
            "refresh_token_reuse_at_idp": self.refresh_reuse,
            "refresh_exchanges": self.refreshes,
            "refused_while_an_instance_was_down": self.refused,
            "events": dict(self.events),
            "sessions_ok_at_the_end": self.final_ok,
        }


class Soak:
    """Two instances, the topology and the IdP; the load and the chaos schedule."""

    def __init__(
        self,
        idp: IdpProcess,
        topology: SentinelTopology,
        upstreams: dict[str, Upstream],
        *,
        settle: float,
    ) -> None:
        self.idp = idp
        self.topology = topology
        self.settle = settle
        self.report = Report()
        ports = [free_port(), free_port()]
        session = {
            "store": "redis",
            "redis_mode": "sentinel",
            "redis_url": "redis://127.0.0.1:6379/0",  # scheme and db; the sentinels name the host
            "redis_sentinels": topology.addresses,
            "redis_sentinel_master": MASTER,
            "redis_key_prefix": f"chaos-{uuid4().hex[:8]}:",
            "redis_timeout": "1s",
        }
        self.config = gateway_config(
            idp, ports[0], upstreams, session=session, tokens={"skew": 1}, log={"level": "error"}
        )
        self.ports = ports
        self.instances: list[GatewayProcess | None] = [None, None]
        self.up = [False, False]

    @contextlib.contextmanager
    def running(self) -> Iterator[Soak]:
        try:
            for i in (0, 1):
                self._start(i)
            yield self
        finally:
            for instance in self.instances:
                if instance is not None:
                    instance.stop()

    def _start(self, i: int) -> None:
        self.instances[i] = GatewayProcess(self.config, port=self.ports[i], env=ENV)
        self.up[i] = True

    def _base(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    async def login(self, count: int) -> list[httpx.AsyncClient]:
        clients = []
        for n in range(count):
            client = httpx.AsyncClient(timeout=REQUEST_TIMEOUT)
            response = await browser_login(
                client,
                f"{self._base(0)}/auth/login?return_to=/",
                username=f"user{n}",
                idp_issuer=self.idp.issuer,
            )
            if response.status_code != 302:
                raise RuntimeError(f"login {n} failed: {response.status_code} {response.text}")
            clients.append(client)
        self.report.sessions = count
        return clients

    async def load(self, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        """One session's steady requests, alternating instances and audiences."""
        report = self.report
        for n in itertools.count():
            if stop.is_set():
                return
            i = n % 2 if all(self.up) else self.up.index(True)
            path = "/api/x" if n % 4 < 2 else "/billing/y"
            try:
                response = await client.get(self._base(i) + path, headers=CSRF)
            except httpx.TransportError:
                if self.up[i]:  # down without being killed by the schedule: count it
                    report.statuses[0] += 1
                report.refused += 1
                await asyncio.sleep(0.05)
                continue
            report.statuses[response.status_code] += 1
            if response.status_code >= 500 and response.status_code != 503:
                report.server_errors += 1
            if response.status_code == 503 and "retry-after" not in response.headers:
                report.without_retry_after += 1
            if response.status_code == 401:
                report.lost_sessions += 1
                _log(f"session lost on instance {i}: {response.text}")
                return
            await asyncio.sleep(0.05)

    # The schedule

    async def event(self, name: str) -> None:
        actions: dict[str, Callable[[], None]] = {
            "redis-pause": self._redis_pause,
            "idp-pause": self._idp_pause,
            "instance-kill": self._instance_kill,
            "sentinel-failover": self._sentinel_failover,
            "redis-kill": self._redis_kill,
        }
        _log(f"{name} ...")
        await asyncio.to_thread(actions[name])
        _log(f"{name} done")
        self.report.events[name] += 1
        await asyncio.sleep(self.settle)

    def _redis_pause(self) -> None:
        master = self.topology.current_master()
        master.pause()
        try:
            time.sleep(0.6)
        finally:
            master.resume()

    def _idp_pause(self) -> None:
        self.idp.pause()
        try:
            time.sleep(3.0)
        finally:
            self.idp.resume()

    def _instance_kill(self) -> None:
        instance = self.instances[1]
        self.up[1] = False
        if instance is not None:
            instance.kill()
            instance.stop()
        time.sleep(0.5)
        self._start(1)

    def _sentinel_failover(self) -> None:
        old = self.topology.current_master()
        self.topology.sentinels[0].cli("SENTINEL", "FAILOVER", MASTER)
        wait_for(lambda: self.topology.current_master() is not old, "the failover", within=60)
        wait_for(self.topology.is_replicated, "the old master to follow", within=60)

    def _redis_kill(self) -> None:
        old = self.topology.current_master()
        old.kill()
        wait_for(lambda: self.topology.current_master() is not old, "the failover", within=60)
        old.restart()  # empty, and possibly still configured as a master
        # Made a replica of the new master here, as an operator's tooling would: the sentinels
        # do the same, but only once they have seen it up for a while and are not in TILT mode
        # (which a loaded CI machine's timer jumps trigger for 30 s), and a fresh-clone run
        # timed out waiting for them.
        new = self.topology.current_master()
        old.cli("REPLICAOF", "127.0.0.1", str(new.port))
        # Rejoined when its link to the new master is up. (Not equal replication offsets: under
        # the soak's steady writes the master's offset moves between the two INFO calls, and
        # that wait could time out with the replica in sync all along.)
        wait_for(
            lambda: "master_link_status:up" in old.cli("INFO", "replication"),
            "the old master to rejoin as a replica",
            within=60,
        )

    async def final_check(self, clients: list[httpx.AsyncClient]) -> None:
        for client in clients:
            for _ in range(50):  # a 503 right after the last event is allowed, not a 401
                response = await client.get(self._base(0) + "/api/x", headers=CSRF)
                if response.status_code != 503:
                    break
                await asyncio.sleep(0.2)
            if response.status_code == 200:
                self.report.final_ok += 1


async def soak(
    *, duration: float, sessions: int, settle: float, rounds: int | None = None
) -> Report:
    """Run the schedule for ``duration`` seconds (or ``rounds`` whole rounds); the report."""
    started = time.monotonic()
    with (
        start_idp(rotate=True, at_ttl=4) as idp,
        sentinel_topology(min_replicas_to_write=1) as topology,
        start_upstreams(idp) as upstreams,
        Soak(idp, topology, upstreams, settle=settle).running() as run,
    ):
        clients = await run.login(sessions)
        idp.reset_stats()
        stop = asyncio.Event()
        workers = [asyncio.create_task(run.load(c, stop)) for c in clients]
        try:
            await asyncio.sleep(settle)
            for n in itertools.count():
                if rounds is not None and n >= rounds * len(EVENTS):
                    break
                if rounds is None and time.monotonic() - started > duration:
                    break
                await run.event(EVENTS[n % len(EVENTS)])
        finally:
            stop.set()
            await asyncio.gather(*workers)
        await run.final_check(clients)
        for client in clients:
            await client.aclose()
        stats = idp.stats()
        run.report.refresh_reuse = int(
            stats.get("grant_errors", {}).get("refresh_token", {}).get("invalid_grant", 0)
        )
        run.report.refreshes = int(stats.get("grants", {}).get("refresh_token", 0))
        run.report.seconds = time.monotonic() - started
        return run.report


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--settle", type=float, default=4.0, help="seconds after each event")
    parser.add_argument("--rounds", type=int, help="whole rounds instead of --duration")
    args = parser.parse_args(argv)
    report = asyncio.run(
        soak(duration=args.duration, sessions=args.sessions, settle=args.settle, rounds=args.rounds)
    )
    print(json.dumps(report.as_dict(), indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
