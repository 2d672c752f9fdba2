"""Redis topologies on loopback for the failover tests: Debian's redis-server, and Sentinel
(``redis-sentinel`` when installed, else the same binary with ``--sentinel``: Debian's
redis-sentinel package is that binary under another name). Every process runs in a temporary
directory, on ephemeral ports, without persistence, and is killed on exit."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .servers import free_port

MASTER = "gwtest"
# An ACL user for the gateway beside the default one (which the helpers and the replication
# keep using): its password, and only the keys under the test prefixes.
ACL_USER = ("gw", "gw-acl-secret")


def _acl_args(acl: bool) -> tuple[str, ...]:
    if not acl:
        return ()
    name, password = ACL_USER
    return ("--user", name, "on", f">{password}", "~gwtest-*", "&*", "+@all")


_START_WAIT = 20.0


def make_tls_files(directory: Path) -> Path:
    """A private CA and a certificate for 127.0.0.1 signed by it (``ca.crt``, ``server.crt``,
    ``server.key`` in ``directory``)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, capture_output=True, check=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.crt", "-days", "2", "-subj", "/CN=gateway test CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=127.0.0.1")  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "2",
            "-extfile", "san.ext")  # fmt: skip
    return directory


def _tls_args(tls: Path | None, port: int, cluster: bool = False) -> list[str]:
    if tls is None:
        return ["--port", str(port)]
    return [
        "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", str(tls / "server.crt"), "--tls-key-file", str(tls / "server.key"),
        "--tls-ca-cert-file", str(tls / "ca.crt"), "--tls-auth-clients", "no",
        "--tls-replication", "yes", *(["--tls-cluster", "yes"] if cluster else []),
    ]  # fmt: skip


def _cli_tls(tls: Path | None) -> list[str]:
    return [] if tls is None else ["--tls", "--cacert", str(tls / "ca.crt")]


def _cli(port: int, *args: str, tls: Path | None = None) -> str:
    result = subprocess.run(
        ["redis-cli", *_cli_tls(tls), "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return result.stdout.strip()


def _info(text: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def wait_for(predicate: Callable[[], bool], what: str, within: float = _START_WAIT) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


class RedisNode:
    """One redis-server (or sentinel) process."""

    def __init__(
        self,
        started: list[RedisNode],
        workdir: Path,
        *args: str,
        sentinel: bool = False,
        tls: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.dir = workdir / str(self.port)
        self.dir.mkdir()
        self.sentinel = sentinel
        self.tls = tls
        cluster = "--cluster-enabled" in args
        base = [*_tls_args(tls, self.port, cluster), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        if sentinel:
            conf = self.dir / "sentinel.conf"
            conf.write_text("\n".join(args) + "\n")
            binary = shutil.which("redis-sentinel")
            command = [binary, str(conf)] if binary else ["redis-server", str(conf), "--sentinel"]
            command += base
        else:
            command = ["redis-server", *base, "--save", "", "--appendonly", "no", *args]
        self.log = self.dir / "log"
        self._command = command
        self._start()
        started.append(self)  # stopped on exit even if the topology never comes up
        self._wait_up()

    def _start(self) -> None:
        with self.log.open("ab") as log:  # read it when a node does not come up
            self._proc = subprocess.Popen(
                self._command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def _wait_up(self) -> None:
        try:
            wait_for(lambda: self.cli("PING") == "PONG", f"redis on {self.port}")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{self.log.read_text(errors='replace')[-2000:]}") from None

    def cli(self, *args: str) -> str:
        return _cli(self.port, *args, tls=self.tls)

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): its connections stay open, nothing answers."""
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Kill and start again on the same port, empty (no persistence)."""
        self.kill()
        self._start()
        self._wait_up()

    def kill(self) -> None:
        if self.alive:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=10)

    def stop(self) -> None:
        # SIGKILL: nothing is persisted, and a terminated master with replicas would wait up
        # to shutdown-timeout (10 s) for them to catch up.
        if self.alive:
            self.resume()
        self.kill()


class SentinelTopology:
    """One master, one replica, three sentinels (quorum 2) watching ``MASTER``."""

    def __init__(
        self,
        started: list[RedisNode],
        workdir: Path,
        *,
        min_replicas_to_write: int = 0,
        acl: bool = False,
        tls: Path | None = None,
    ) -> None:
        # min-replicas-to-write 1: a master whose replica left (promoted by the sentinels)
        # refuses writes instead of acknowledging ones the failover will drop (README).
        fenced = ("--min-replicas-to-write", str(min_replicas_to_write), *_acl_args(acl))
        self.master = RedisNode(started, workdir, *fenced, tls=tls)
        self.replica = RedisNode(
            started, workdir, *fenced, "--replicaof", "127.0.0.1", str(self.master.port), tls=tls
        )
        monitor = [
            f"sentinel monitor {MASTER} 127.0.0.1 {self.master.port} 2",
            f"sentinel down-after-milliseconds {MASTER} 1000",
            f"sentinel failover-timeout {MASTER} 5000",
            f"sentinel parallel-syncs {MASTER} 1",
        ]
        self.sentinels = [
            RedisNode(started, workdir, *monitor, sentinel=True, tls=tls) for _ in range(3)
        ]
        wait_for(
            lambda: "master_link_status:up" in self.replica.cli("INFO", "replication"),
            "the replica to sync",
        )
        wait_for(self._sentinels_know_each_other, "the sentinels to find each other")

    def _sentinels_know_each_other(self) -> bool:
        for node in self.sentinels:
            info = node.cli("SENTINEL", "MASTER", MASTER)
            lines = info.splitlines()
            fields = dict(zip(lines[::2], lines[1::2], strict=False))
            if fields.get("num-other-sentinels") != "2" or fields.get("num-slaves") != "1":
                return False
        return True

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def master_port(self) -> int:
        reply = self.sentinels[0].cli("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER).split()
        return int(reply[1])

    def current_master(self) -> RedisNode:
        """The node the sentinels name master now (roles swap on each failover)."""
        port = self.master_port()
        return self.master if self.master.port == port else self.replica

    def current_replica(self) -> RedisNode:
        return self.replica if self.current_master() is self.master else self.master

    def is_replicated(self) -> bool:
        """The replica has everything the master wrote so far."""
        master = _info(self.current_master().cli("INFO", "replication"))
        replica = _info(self.current_replica().cli("INFO", "replication"))
        return master.get("master_repl_offset") == replica.get("slave_repl_offset")

    def wait_failed_over(self, within: float = 60.0) -> None:
        """Wait until the sentinels promoted the replica and it accepts writes."""
        old = self.master.port

        def promoted() -> bool:
            try:
                moved = self.master_port() != old
            except (IndexError, ValueError):
                return False
            return moved and "role:master" in self.replica.cli("INFO", "replication")

        wait_for(promoted, "the sentinels to promote the replica", within=within)


class ClusterTopology:
    """Three masters with one replica each (``redis-cli --cluster create``)."""

    def __init__(
        self, started: list[RedisNode], workdir: Path, *, acl: bool = False, tls: Path | None = None
    ) -> None:
        args = ("--cluster-enabled", "yes", "--cluster-node-timeout", "1000", *_acl_args(acl))
        # The bus port defaults to port + 10000, past 65535 for a high ephemeral port.
        self.servers = [
            RedisNode(started, workdir, *args, "--cluster-port", str(free_port()), tls=tls)
            for _ in range(6)
        ]
        subprocess.run(
            [
                "redis-cli",
                *_cli_tls(tls),
                "--cluster",
                "create",
                *[f"127.0.0.1:{n.port}" for n in self.servers],
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
            check=True,
        )
        wait_for(self._ok, "the cluster to be ok")

    def _ok(self) -> bool:
        return all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in self.servers if n.alive)

    def wait_ok(self, within: float = 30.0) -> None:
        wait_for(self._ok, "the cluster to be ok again", within=within)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.servers[0].port}"

    @property
    def seeds(self) -> list[str]:
        return [f"127.0.0.1:{n.port}" for n in self.servers[1:]]

    def node_holding(self, pattern: str) -> RedisNode:
        """The live master that holds a key matching ``pattern`` (KEYS: a test cluster)."""
        for node in self.servers:
            if node.alive and "role:master" in node.cli("INFO", "replication"):
                if node.cli("KEYS", pattern):
                    return node
        raise RuntimeError(f"no master holds a key matching {pattern}")

    def has_failed_over(self, pattern: str, victim: RedisNode) -> bool:
        """The cluster is ok and a key matching ``pattern`` is on a live master other than
        ``victim`` (its replica was promoted)."""
        if not self._ok():
            return False
        try:
            return self.node_holding(pattern) is not victim
        except RuntimeError:
            return False

    def is_replicated(self) -> bool:
        """Every replica has everything its master wrote so far."""
        offsets: dict[str, str] = {}
        replicas: list[dict[str, str]] = []
        for node in self.servers:
            if not node.alive:
                continue
            info = _info(node.cli("INFO", "replication"))
            if info.get("role") == "master":
                offsets[str(node.port)] = info.get("master_repl_offset", "?")
            else:
                replicas.append(info)
        return all(
            offsets.get(r.get("master_port", "")) == r.get("slave_repl_offset") for r in replicas
        )

    def master_of(self, key: str) -> RedisNode:
        """The node that serves ``key``'s slot now."""
        slot = int(self.servers[0].cli("CLUSTER", "KEYSLOT", key))
        for node in self.servers:
            if not node.alive:
                continue
            for line in node.cli("CLUSTER", "NODES").splitlines():
                parts = line.split()
                if "myself" in parts[2] and "master" in parts[2]:
                    for span in parts[8:]:
                        low, _, high = span.partition("-")
                        if low.isdigit() and int(low) <= slot <= int(high or low):
                            return node
        raise RuntimeError(f"no master serves slot {slot}")


@contextlib.contextmanager
def sentinel_topology(
    *, min_replicas_to_write: int = 0, acl: bool = False, tls: bool = False
) -> Iterator[SentinelTopology]:
    started: list[RedisNode] = []
    with tempfile.TemporaryDirectory(prefix="gw-sentinel-") as workdir:
        try:
            yield SentinelTopology(
                started,
                Path(workdir),
                min_replicas_to_write=min_replicas_to_write,
                acl=acl,
                tls=make_tls_files(Path(workdir)) if tls else None,
            )
        finally:
            for node in started:
                node.stop()


@contextlib.contextmanager
def cluster_topology(*, acl: bool = False, tls: bool = False) -> Iterator[ClusterTopology]:
    started: list[RedisNode] = []
    with tempfile.TemporaryDirectory(prefix="gw-cluster-") as workdir:
        try:
            tls_files = make_tls_files(Path(workdir)) if tls else None
            yield ClusterTopology(started, Path(workdir), acl=acl, tls=tls_files)
        finally:
            for node in started:
                node.stop()
