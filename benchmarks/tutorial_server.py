"""The tutorial timestamp echo server: socketserver as it comes.

ThreadingTCPServer + BaseRequestHandler with socketserver's defaults (non-daemon
threads, request_queue_size 5, block_on_close), and the readline loop every
tutorial shows. Same protocol as tsechod: for each line ``payload\\n`` the reply
is ``[<ctime>] payload\\n``. A benchmark baseline, not part of the package.

Binds 127.0.0.1 port 0 (or --port), prints ``listening on 127.0.0.1:PORT`` and
serves until SIGTERM.
"""

import argparse
import socketserver
import time


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with self.request.makefile("rb") as lines:
            for line in lines:
                if not line.endswith(b"\n"):
                    line += b"\n"
                self.request.sendall(b"[" + time.ctime().encode() + b"] " + line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with socketserver.ThreadingTCPServer(("127.0.0.1", args.port), EchoHandler) as server:
        host, port = server.server_address[:2]
        print(f"listening on {host}:{port}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
