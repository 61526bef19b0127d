#!/usr/bin/env python3
"""The test bed's way out for its nodes: an HTTPS CONNECT proxy that reaches PyPI and nothing else.

A bed node is a network namespace with no route off its link (a VM in a private subnet). SkyPilot's
runtime on it installs its Python packages from PyPI with uv, as it does on a cloud VM (where a NAT
gateway would carry them); the node user's profile points uv here (HTTPS_PROXY). Any other destination
is refused with 403: nothing on a node reaches past this machine but PyPI.

    pypi-proxy.py ADDRESS PORT
"""

import asyncio
import sys

ALLOWED = {("pypi.org", 443), ("files.pythonhosted.org", 443)}


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        host, _, port = target.rpartition(":")
        if method != "CONNECT" or (host, int(port or 0)) not in ALLOWED:
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 30)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError, OSError):
        writer.close()
        return
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await writer.drain()
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def main(address: str, port: int) -> None:
    server = await asyncio.start_server(handle, address, port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
