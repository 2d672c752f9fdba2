"""A raw-socket HTTP/1.1 client for one large upload or download, run on the load core.

Streams zeros up (``Content-Length`` set, 256 KiB writes with back-pressure) or reads a body
down and throws it away, then prints one JSON line: status, bytes, seconds.

    python -m benchmarks.transfer upload   http://127.0.0.1:8000/sink/upload 1073741824 -H ...
    python -m benchmarks.transfer download http://127.0.0.1:8000/api/1g.bin -H ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit

_CHUNK = bytes(256 * 1024)


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def _drain_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> int:
    received = 0
    if "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining:
            chunk = await reader.read(min(remaining, 1 << 20))
            if not chunk:
                raise ConnectionError("body cut short")
            remaining -= len(chunk)
            received += len(chunk)
        return received
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return received
            await reader.readexactly(size + 2)
            received += size
    while chunk := await reader.read(1 << 20):
        received += len(chunk)
    return received


async def transfer(mode: str, url: str, size: int, headers: list[str]) -> dict[str, object]:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=1 << 20)
    method = "POST" if mode == "upload" else "GET"
    lines = [f"{method} {parts.path}{'?' + parts.query if parts.query else ''} HTTP/1.1"]
    lines += [f"Host: {parts.netloc}", "Connection: close", *headers]
    if mode == "upload":
        lines += ["Content-Type: application/octet-stream", f"Content-Length: {size}"]
    started = time.perf_counter()
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if mode == "upload":
        sent = 0
        while sent < size:
            chunk = _CHUNK[: min(len(_CHUNK), size - sent)]
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()
    status, response_headers = await _read_head(reader)
    received = await _drain_body(reader, response_headers)
    seconds = time.perf_counter() - started
    writer.close()
    moved = size if mode == "upload" else received
    return {
        "status": status,
        "bytes": moved,
        "seconds": seconds,
        "mib_per_s": moved / (1 << 20) / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["upload", "download"])
    parser.add_argument("url")
    parser.add_argument("size", type=int, nargs="?", default=0)
    parser.add_argument("-H", dest="headers", action="append", default=[])
    args = parser.parse_args()
    result = asyncio.run(transfer(args.mode, args.url, args.size, args.headers))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
