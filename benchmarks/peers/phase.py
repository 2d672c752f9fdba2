"""The gateway beside the BFFs teams would build instead, in one run (issue 23).

One https test IdP (a local CA, benchmarks/peers/tls.py) speaking Auth0's ``audience``
parameter, one user, the same two audiences and token lifetime for every target, the run's
nginx upstream; every server pinned to the servers' core. Three parts:

- the grid: nginx ``proxy_pass`` (the ceiling), the gateway's token route, the Node.js BFF and
  the Python BFF, small JSON and 1 MiB at each connection count, interleaved, ``--repeat``
  rounds, each round's gateway / peer ratios kept; a peer's errors are recorded, not refused;
- the first requests: a fresh login, then 64 requests at once (half per audience): how many
  refresh-token exchanges each BFF makes;
- the token economy: 20 s access tokens, 64 connections on both routes for
  ``--economy-seconds``, each BFF in turn on a fresh login.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.login import browser_login
from tests.e2e.servers import API, BILLING, IdpProcess, free_port, start_idp

from .. import stack
from ..bench import LARGE, SMALL, Bench, login, session_headers
from ..report import Row, economy_expected, pair_ratios
from ..upstream import ONE_MIB, SMALL_JSON
from ..wrk import LoadResult, run_wrk
from . import servers
from .tls import LocalTls, make_local_tls

SECTION = "peers"
NGINX = "nginx proxy_pass (ceiling)"
GATEWAY = "gateway, token route"
NODE = "Node.js BFF (express-openid-connect)"
PYTHON = "Python BFF (auth0-fastapi)"
PEERS = (NODE, PYTHON)
BFFS = (GATEWAY, *PEERS)
FIRST_REQUESTS = 64
AUDIENCES = {API: "api", BILLING: "billing"}
LOGIN_SCOPES = [route["scope"] for route in servers.ROUTES]
# The Python peer's login asks for them too (its per-audience defaults hold each API's scope).
PYTHON_LOGIN = "/auth/login?scope=" + "+".join(
    ["openid", "profile", "email", "offline_access", *LOGIN_SCOPES]
)
BODY_SIZE = {SMALL: len(SMALL_JSON), LARGE: ONE_MIB}


@dataclass
class Target:
    name: str
    base_url: str
    prefix: str  # the route to /api (the API audience)
    pids: tuple[int, ...]
    login_path: str = "/auth/login?return_to=/"
    cookie: str = "gw_session"
    headers: dict[str, str] = field(default_factory=dict)
    margin: float = 0.0  # how early it refreshes a token (s)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _trusting(tls: LocalTls) -> dict[str, str]:
    """Every client of the IdP trusts the run's CA: httpx (the gateway, the Python peer, this
    process) through SSL_CERT_FILE, Node.js through NODE_EXTRA_CA_CERTS."""
    return {"SSL_CERT_FILE": str(tls.ca), "NODE_EXTRA_CA_CERTS": str(tls.ca)}


@contextlib.contextmanager
def _idp(tls: LocalTls, *, at_ttl: int) -> Iterator[IdpProcess]:
    with _environ(IDP_TLS_CERT=str(tls.cert), IDP_TLS_KEY=str(tls.key), IDP_AUDIENCE_PARAM="1"):
        idp = start_idp(at_ttl=at_ttl)
    with idp:
        yield idp


@contextlib.contextmanager
def bff_stack(
    upstream: str, sink: str, *, at_ttl: int, skew: float
) -> Iterator[tuple[IdpProcess, dict[str, Target]]]:
    """The IdP over TLS and the three BFFs against it (not logged in yet)."""
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as directory:
        tls = make_local_tls(Path(directory))
        trust = _trusting(tls)
        with _environ(**trust), contextlib.ExitStack() as stop:
            idp = stop.enter_context(_idp(tls, at_ttl=at_ttl))
            port = free_port()
            config = stack.gateway_config(idp, port=port, upstream=upstream, sink=sink, skew=skew)
            # The peers' dialect: Auth0's `audience`, the login for the API audience; the
            # test IdP grants at refresh only the scopes asked for at login, so each BFF asks
            # for both routes' scopes there (Auth0 would take them from its MRRT policy).
            config["oidc"].update(
                dialect="auth0",
                login_audience=API,
                scopes=["openid", "profile", "email", "offline_access", *LOGIN_SCOPES],
            )
            gateway = stop.enter_context(stack.gateway_process(config, port))
            node = stop.enter_context(servers.node_peer(idp, upstream, env=trust))
            python = stop.enter_context(servers.python_peer(idp, upstream, env=trust))
            targets = {
                GATEWAY: Target(
                    GATEWAY,
                    gateway.base_url,
                    "/api",
                    (stack.gateway_pid(gateway),),
                    margin=min(skew, at_ttl / 2),
                ),
                NODE: Target(NODE, node.base_url, "/api", (node.pid,), cookie=node.cookie),
                PYTHON: Target(
                    PYTHON,
                    python.base_url,
                    "/api",
                    (python.pid,),
                    login_path=PYTHON_LOGIN,
                    cookie=python.cookie,
                ),
            }
            yield idp, targets


async def _browser_login(target: Target, idp: IdpProcess) -> dict[str, str]:
    """Log a browser in at a BFF; return the headers wrk sends (its cookie, ``X-CSRF``)."""
    if target.name == GATEWAY:
        return session_headers(await login(target.base_url, idp))
    jar = CookieJar()
    client = httpx.AsyncClient(timeout=30, cookies=jar)

    async def loopback_is_secure(_: httpx.Response) -> None:
        # Browsers treat http://127.0.0.1 as a secure context and send it `Secure` cookies
        # (auth0-fastapi's transaction cookie is one); http.cookiejar does not.
        for cookie in client.cookies.jar:
            cookie.secure = False

    client.event_hooks["response"].append(loopback_is_secure)
    async with client:
        response = await browser_login(
            client, target.base_url + target.login_path, idp_issuer=idp.issuer
        )
        if response.status_code not in (302, 303, 307):
            raise RuntimeError(f"{target.name}: login failed: {response.status_code}")
        value = next((c.value for c in client.cookies.jar if c.name == target.cookie), None)
    if not value:
        raise RuntimeError(f"{target.name}: login set no {target.cookie} cookie")
    return {"Cookie": f"{target.cookie}={value}", "X-CSRF": "1"}


def log_in(target: Target, idp: IdpProcess) -> None:
    target.headers = asyncio.run(_browser_login(target, idp))


def check(target: Target) -> None:
    for prefix in ("/api", "/billing"):
        response = httpx.get(
            f"{target.base_url}{prefix}/small.json", headers=target.headers, timeout=30
        )
        if response.status_code != 200 or response.content != SMALL_JSON:
            raise RuntimeError(
                f"{target.name}{prefix}: {response.status_code} {response.text[:200]}"
            )


def error_count(load: LoadResult) -> int:
    return load.errors + load.non_2xx


def error_rate(load: LoadResult) -> float:
    return error_count(load) / max(load.requests + load.errors, 1)


def grid(bench: Bench, targets: dict[str, Target], nginx: tuple[str, int]) -> None:
    """Every target, body and connection count, interleaved, ``--repeat`` rounds."""
    cells: dict[str, tuple[str, tuple[int, ...], dict[str, str]]] = {
        NGINX: (f"{nginx[0]}/api", (nginx[1],), {}),
        **{t.name: (t.base_url + t.prefix, t.pids, t.headers) for t in targets.values()},
    }
    names = list(cells)
    for body in bench.bodies:
        for connections in bench.args.connections:
            runs: dict[str, list[Row]] = {name: [] for name in names}
            for turn in range(bench.args.repeat):
                shift = turn % len(names)
                for name in names[shift:] + names[:shift]:
                    url, pids, headers = cells[name]
                    runs[name].append(
                        bench.measure(
                            SECTION,
                            name,
                            body,
                            url,
                            connections,
                            headers=headers,
                            pids=pids,
                            record=False,
                            strict=False,
                        )
                    )
            for name in names:
                ordered = sorted(runs[name], key=lambda row: row.load.rps)
                bench.results.rows.append(ordered[len(ordered) // 2])
            for peer in PEERS:
                key = _key(peer, body, connections)
                bench.results.paired[key] = [
                    pair_ratios(gw.load, other.load)
                    for gw, other in zip(runs[GATEWAY], runs[peer], strict=True)
                ]


def _key(peer: str, body: str, connections: int) -> str:
    return f"{SECTION}|{GATEWAY}|{peer}|{body}|{connections}"


async def _burst(target: Target, count: int) -> list[int]:
    paths = ["/api/small.json", "/billing/small.json"]
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def one(i: int) -> int:
            try:
                answer = await client.get(target.base_url + paths[i % 2], headers=target.headers)
            except httpx.HTTPError:
                return 0
            return answer.status_code

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def first_requests(idp: IdpProcess, targets: dict[str, Target], count: int) -> list[dict[str, Any]]:
    """Per BFF: a fresh login, then ``count`` requests at once on both routes."""
    found = []
    for name in BFFS:
        target = targets[name]
        log_in(target, idp)
        idp.reset_stats()
        statuses = asyncio.run(_burst(target, count))
        stats = idp.stats()
        found.append(
            {
                "target": name,
                "requests": count,
                "failed": sum(1 for s in statuses if s != 200),
                "exchanges": {AUDIENCES[a]: n for a, n in stats["refresh_by_resource"].items()},
                "refresh_errors": stats["refresh_errors"],
            }
        )
        print(f"  first requests, {name}: {found[-1]}", flush=True)
    return found


def economy(
    bench: Bench, idp: IdpProcess, targets: dict[str, Target], *, at_ttl: int
) -> list[dict[str, Any]]:
    """Per BFF, on a fresh login: both routes for ``--economy-seconds`` with 20 s tokens."""
    seconds = bench.args.economy_seconds
    found = []
    for name in BFFS:
        target = targets[name]
        log_in(target, idp)
        idp.reset_stats()
        load = run_wrk(
            target.base_url,
            ["/api/small.json", "/billing/small.json"],
            connections=bench.args.economy_connections,
            seconds=seconds,
            headers=target.headers,
            prefix=bench.plan.load_prefix(),
        )
        stats = idp.stats()
        found.append(
            {
                "target": name,
                "seconds": round(load.seconds, 1),
                "requests": load.requests,
                "rps": round(load.rps),
                "errors": error_count(load),
                "error_rate": error_rate(load),
                "exchanges": {AUDIENCES[a]: n for a, n in stats["refresh_by_resource"].items()},
                "refresh_errors": stats["refresh_errors"],
                "margin": target.margin,
                "minimum": economy_expected(seconds, at_ttl, target.margin),
            }
        )
        print(f"  token economy, {name}: {found[-1]}", flush=True)
    return found


def run_peers(bench: Bench, upstream: str, sink: str) -> None:
    """The whole comparison; its tables go into the report's facts."""
    economy_ttl = 20
    with servers.nginx_proxy(upstream) as nginx:
        with bff_stack(upstream, sink, at_ttl=3600, skew=10) as (idp, targets):
            for target in targets.values():
                log_in(target, idp)
                check(target)
            idp.reset_stats()
            grid(bench, targets, nginx)
            during_grid = idp.stats()["refresh_by_resource"]
            burst = first_requests(idp, targets, FIRST_REQUESTS)
    with bff_stack(upstream, sink, at_ttl=economy_ttl, skew=bench.args.economy_skew) as (
        idp,
        targets,
    ):
        spent = economy(bench, idp, targets, at_ttl=economy_ttl)
    bench.results.facts["Peers: the gateway beside the BFFs teams would build instead"] = (
        report_lines(bench, during_grid, burst, spent, economy_ttl)
    )


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _ratios(bench: Bench, peer: str, body: str, conns: int) -> tuple[float, float] | None:
    pairs = bench.results.paired.get(_key(peer, body, conns))
    if not pairs:
        return None
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def report_lines(
    bench: Bench,
    during_grid: dict[str, int],
    burst: list[dict[str, Any]],
    spent: list[dict[str, Any]],
    economy_ttl: int,
) -> list[str]:
    rows = [r for r in bench.results.rows if r.section == SECTION]
    lines = [
        f"Peers' versions: {servers.versions()}.",
        "",
        "| target | body | conns | req/s | p50 ms | p99 ms | CPU µs/req | peak RSS MiB | errors "
        "| load1 | foreign CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        load = row.load
        short = load.requests and load.bytes_per_request < BODY_SIZE[row.body]
        errors = f"{error_rate(load):.1%}" if error_count(load) else "0"
        if short:
            errors += " (short bodies)"
        cpu = f"{row.cpu_us:,.0f}" if row.cpu_us is not None else ""
        rss = f"{row.rss_mib:.0f}" if row.rss_mib is not None else ""
        lines.append(
            f"| {row.target} | {row.body} | {row.connections} | {load.rps:,.0f} | "
            f"{_ms(load.p50_ms)} | {_ms(load.p99_ms)} | {cpu} | {rss} | {errors} | "
            f"{row.load1:.2f} | {row.foreign_cpu:.0f}% |"
        )
    lines += [
        "",
        "Gateway over each peer (medians of the per-round ratios; ahead: more req/s and a "
        "lower p99 than the peer, with no error of its own):",
        "",
        "| peer | body | conns | req/s gateway / peer | p99 gateway / peer | peer errors | ahead |",
        "|---|---|---:|---:|---:|---:|:-:|",
    ]
    for peer in PEERS:
        for body in bench.bodies:
            for conns in bench.args.connections:
                found = _ratios(bench, peer, body, conns)
                gw = bench.results.find(SECTION, GATEWAY, body, conns)
                other = bench.results.find(SECTION, peer, body, conns)
                if found is None or gw is None or other is None:
                    continue
                rps, p99 = found
                ahead = rps > 1 and p99 < 1 and error_count(gw.load) == 0
                peer_errors = f"{error_rate(other.load):.1%}" if error_count(other.load) else "0"
                lines.append(
                    f"| {peer} | {body} | {conns} | {rps:.2f} | {p99:.2f}x | {peer_errors} | "
                    f"{'yes' if ahead else '**no**'} |"
                )
    lines += [
        "",
        f"Token-endpoint calls at the IdP (refresh-token grants; the login's own code exchange "
        f"gives each BFF the API audience's token, so the minimum is 0 for api and 1 for "
        f"billing). During the grid above (tokens live 1 h): {during_grid or 'none'}.",
        "",
        f"| target | {FIRST_REQUESTS} first requests at once, fresh session: exchanges | "
        "failed answers | refresh errors |",
        "|---|---|---:|---|",
    ]
    for burst_row in burst:
        lines.append(
            f"| {burst_row['target']} | {_exchanges(burst_row['exchanges'])} (minimum: api 0, "
            f"billing 1) | {burst_row['failed']} of {burst_row['requests']} | "
            f"{burst_row['refresh_errors'] or 'none'} |"
        )
    lines += [
        "",
        f"| target | {spent[0]['seconds'] if spent else 0:g} s, {economy_ttl} s tokens, "
        f"{bench.args.economy_connections} connections: exchanges | minimum per audience "
        "(its refresh margin) | req/s | errors | refresh errors |",
        "|---|---|---|---:|---:|---|",
    ]
    for economy in spent:
        lines.append(
            f"| {economy['target']} | {_exchanges(economy['exchanges'])} | {economy['minimum']} "
            f"({economy['margin']:g} s early) | {economy['rps']:,} | "
            f"{economy['error_rate']:.1%} | {economy['refresh_errors'] or 'none'} |"
        )
    return lines


def _exchanges(by_audience: dict[str, int]) -> str:
    return ", ".join(f"{name} {by_audience.get(name, 0)}" for name in AUDIENCES.values())
