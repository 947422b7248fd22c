"""A cluster's pod for the namespace tests: HTTP on :8080 answers its cluster's name (on
/stream it sends the name and never ends the response), TCP on
:9000 says the name on connect and echoes. Run as `python -m tests.chaos.backend NAME`
(inside `ip netns exec`); stops on SIGTERM, and is SIGKILLed by the fault tests."""

from __future__ import annotations

import asyncio
import signal
import sys

from aiohttp import web

HTTP_PORT = 8080
TCP_PORT = 9000


class Echo(asyncio.Protocol):
    def __init__(self, name: bytes) -> None:
        self.name = name

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(self.name + b"\n")

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def main(name: str) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=name)

    async def stream(request: web.Request) -> web.StreamResponse:
        """The name, then nothing more until the client goes: a response under way."""
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(name.encode() + b"\n")
        await asyncio.sleep(3600)
        return response

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", HTTP_PORT, reuse_address=True).start()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Echo(name.encode()), "0.0.0.0", TCP_PORT,
                                      reuse_address=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
