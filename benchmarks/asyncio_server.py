"""The asyncio timestamp echo server: stdlib streams, one coroutine per connection.

``asyncio.start_server`` with its defaults and a ``readline()`` loop, the way
the asyncio docs write an echo server; ``--uvloop`` runs the same code on
uvloop; ``--tls-cert``/``--tls-key`` serve TLS (``start_server(ssl=...)``, the
stdlib's server context, TLS 1.2 at least, like tsechod's). Same protocol as tsechod: for each line ``payload\\n`` the reply is
``[<ctime>] payload\\n``. A benchmark baseline, not part of the package.

Binds 127.0.0.1 port 0 (or --port), prints ``listening on 127.0.0.1:PORT`` and
serves until SIGTERM.
"""

import argparse
import asyncio
import signal
import ssl
import time


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            if not line.endswith(b"\n"):
                line += b"\n"
            writer.write(b"[" + time.ctime().encode() + b"] " + line)
            await writer.drain()
    except (ConnectionError, ValueError):  # peer vanished / line over the 64 KiB limit
        pass
    finally:
        writer.close()


async def serve(port: int, context: "ssl.SSLContext | None" = None) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=context)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop instead of the stdlib loop")
    parser.add_argument("--tls-cert", help="serve TLS with this PEM certificate")
    parser.add_argument("--tls-key", help="... and this PEM key")
    args = parser.parse_args()
    context = None
    if args.tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(args.tls_cert, args.tls_key)
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args.port, context))
    else:
        asyncio.run(serve(args.port, context))


if __name__ == "__main__":
    main()
