"""How the Redis store reaches Redis in each ``session.redis_mode``.

- ``standalone``: ``redis_url`` names the server.
- ``sentinel``: the sentinels name the current master of ``redis_sentinel_master``; the pool
  asks them again whenever it connects, so after a failover new connections reach the new
  master by themselves. ``redis_url`` gives the scheme (``rediss`` for TLS), the ACL user,
  password and db.
- ``cluster``: ``redis_url`` (plus ``redis_cluster_nodes``) are seed nodes; the client follows
  ``MOVED`` and refreshes the slot map after a failover.

Every mode yields the data client and a way to open the invalidation connections (one per
master: ``_tracking``), built with the same TLS and ACL settings as the data connections.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from redis.asyncio import BlockingConnectionPool, Connection, Redis, SSLConnection
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = [
    "REDIS_ERRORS",
    "RedisEndpoints",
    "RedisMode",
    "RedisTopology",
    "connect",
    "endpoints_of",
]

RedisMode = Literal["standalone", "sentinel", "cluster"]

# What redis-py raises when Redis cannot answer. The cluster client's own errors (no reachable
# node, a slot no master covers during a failover, refused credentials) are not RedisErrors.
REDIS_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)


@dataclass(frozen=True)
class RedisEndpoints:
    """Where Redis is, in one of the three modes (see the module docstring)."""

    url: str
    mode: RedisMode = "standalone"
    sentinels: Sequence[str] = ()
    sentinel_master: str = "mymaster"
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    cluster_nodes: Sequence[str] = ()


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool that waits for a free connection (up to the timeout) instead of
    failing at once when all are busy, like the standalone store's pool."""


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def _url_kwargs(url: str) -> dict[str, Any]:
    """Credentials, db and TLS of ``url``, without its address."""
    kwargs: dict[str, Any] = dict(parse_url(url))
    for name in ("host", "port", "path"):
        kwargs.pop(name, None)
    return kwargs


class RedisTopology:
    """The data client of one mode, and the invalidation connections' factory."""

    def __init__(
        self,
        endpoints: RedisEndpoints,
        *,
        pool_size: int,
        timeout: float,
        socket_timeout: float | None,
    ) -> None:
        self.endpoints = endpoints
        self.mode = endpoints.mode
        self.cluster = endpoints.mode == "cluster"
        self._timeout = timeout
        # One immediate retry on a dropped connection (stale pooled socket); never on a
        # timeout, so a paused or dead Redis answers within ~timeout.
        common: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        }
        self._sentinel: Sentinel | None = None
        self._tracked_master: tuple[str, int] | None = None  # sentinel mode, see master_changed
        self.client: Any
        if endpoints.mode == "standalone":
            pool = BlockingConnectionPool.from_url(
                endpoints.url, max_connections=pool_size, timeout=timeout, **common
            )
            self.client = Redis.from_pool(pool)
        elif endpoints.mode == "sentinel":
            url_kwargs = _url_kwargs(endpoints.url)
            ssl = url_kwargs.pop("connection_class", None) is SSLConnection
            sentinel_kwargs: dict[str, Any] = {
                "socket_timeout": timeout,
                "socket_connect_timeout": timeout,
                "username": endpoints.sentinel_username,
                "password": endpoints.sentinel_password,
            }
            if ssl:
                # The sentinels speak TLS like the servers they watch: same CA, client
                # certificate and checks (the URL's ssl_* options), not their credentials.
                sentinel_kwargs["ssl"] = True
                sentinel_kwargs.update(
                    {k: v for k, v in url_kwargs.items() if k.startswith("ssl_")}
                )
            self._sentinel = Sentinel(
                [_address(a) for a in endpoints.sentinels], sentinel_kwargs=sentinel_kwargs
            )
            self.client = self._sentinel.master_for(
                endpoints.sentinel_master,
                connection_pool_class=_BlockingSentinelPool,
                max_connections=pool_size,
                timeout=timeout,
                ssl=ssl,
                **url_kwargs,
                **common,
            )
        else:
            url_kwargs = _url_kwargs(endpoints.url)
            ssl = url_kwargs.pop("connection_class", None) is SSLConnection
            url_kwargs.pop("db", None)  # a cluster has db 0 only
            seeds = [_address(f"{h}:{p}") for h, p in [self._url_address()]]
            seeds += [_address(a) for a in endpoints.cluster_nodes]
            self.client = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in seeds],
                max_connections=pool_size,
                ssl=ssl,
                **url_kwargs,
                socket_timeout=socket_timeout,
                socket_connect_timeout=timeout,
                # One immediate retry (after a refresh of the slot map when a node failed):
                # the operation's own bound (redis_timeout) decides, not a backoff.
                retry=Retry(NoBackoff(), 1),
            )

    def __repr__(self) -> str:
        return f"RedisTopology(mode={self.mode!r})"

    def _url_address(self) -> tuple[str, int]:
        parsed = parse_url(self.endpoints.url)
        return str(parsed.get("host", "127.0.0.1")), int(parsed.get("port", 6379))

    def _plain_connection(
        self, host: str | None = None, port: int | None = None, db: bool = True
    ) -> Connection:
        """A RESP2 connection with the URL's credentials and TLS, to ``host:port`` (default:
        the URL's own address or unix socket)."""
        kwargs: dict[str, Any] = dict(parse_url(self.endpoints.url))
        if host is not None:
            kwargs.update(host=host, port=port)
        connection_class = kwargs.pop("connection_class", Connection)
        if not db:
            kwargs.pop("db", None)
        conn: Connection = connection_class(
            protocol=2,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            **kwargs,
        )
        return conn

    async def open_tracking_connections(self) -> list[Connection]:
        """One connected RESP2 connection per master, for ``_tracking``."""
        if self.mode == "standalone":
            connections = [self._plain_connection()]
        elif self.mode == "sentinel":
            sentinel = self._sentinel
            if sentinel is None:  # pragma: no cover (set in sentinel mode)
                raise RuntimeError("sentinel mode without sentinels")
            host, port = await sentinel.discover_master(self.endpoints.sentinel_master)
            self._tracked_master = (host, int(port))
            connections = [self._plain_connection(host, int(port))]
        else:
            # A fresh slot map: after a failover the old master is gone from it.
            await self.client.nodes_manager.initialize()
            connections = [
                self._plain_connection(node.host, int(node.port), db=False)
                for node in self.client.get_primaries()
            ]
        opened: list[Connection] = []
        try:
            for conn in connections:
                await conn.connect()  # type: ignore[no-untyped-call]
                opened.append(conn)
        except BaseException:
            for conn in opened:
                await conn.disconnect()
            raise
        return connections

    async def master_changed(self) -> bool:
        """Sentinel mode: True when the sentinels name another master than the one the
        invalidation connection follows (compared with that one, not with the pool's last
        answer: a data connection opened since may have learnt of the failover first). The
        pool then drops every connection, busy ones too (their commands fail: 503), so the
        next command reaches the new master."""
        sentinel = self._sentinel
        if sentinel is None or self._tracked_master is None:
            return False
        host, port = await sentinel.discover_master(self.endpoints.sentinel_master)
        if (host, int(port)) == self._tracked_master:
            return False
        await self.client.connection_pool.disconnect(inuse_connections=True)
        return True

    def pubsub(self) -> Any:
        return self.client.pubsub()

    async def close(self) -> None:
        await self.client.aclose()
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                await sentinel.aclose()


def connect(
    endpoints: RedisEndpoints,
    *,
    pool_size: int = 50,
    timeout: float = 2.0,
    socket_timeout: float | None = None,
) -> RedisTopology:
    """The client of ``endpoints.mode`` (``socket_timeout`` None: ``timeout``)."""
    return RedisTopology(
        endpoints,
        pool_size=pool_size,
        timeout=timeout,
        socket_timeout=timeout if socket_timeout is None else socket_timeout,
    )


def endpoints_of(settings: Settings) -> RedisEndpoints:
    """The endpoints named by ``settings.session``."""
    session = settings.session
    password = session.redis_sentinel_password
    return RedisEndpoints(
        url=session.redis_url,
        mode=session.redis_mode,
        sentinels=tuple(session.redis_sentinels),
        sentinel_master=session.redis_sentinel_master,
        sentinel_username=session.redis_sentinel_username,
        sentinel_password=password.get_secret_value() if password is not None else None,
        cluster_nodes=tuple(session.redis_cluster_nodes),
    )
