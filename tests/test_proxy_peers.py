"""nginx's stream module in front of tsechod with ``proxy_protocol on;`` (PROXY v1).

The nginx ``stream`` block is the one in docs/tls-and-load-balancing.md; the test changes only
the ports. nginx runs in the foreground (``daemon off``) with its own prefix, pid file and error
log under tmp_path. nginx cannot listen on port 0 and report it, so the test picks a free port
and tries again if another process takes it first. haproxy in front is in tests/test_haproxy.py.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import CTIME_REPLY, REPO, connect_from, recv_lines, require_tool

GUIDE = REPO / "docs" / "tls-and-load-balancing.md"
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
START_TRIES = 5


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def nginx_block() -> str:
    [block] = re.findall(r"```nginx\n(.*?)```", GUIDE.read_text(), re.S)
    return block


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[object]:
    """Factory: ``nginx(upstream)`` runs the guide's stream block towards *upstream*; returns its port."""
    executable = require_tool("nginx")
    if not STREAM_MODULE.exists():
        require_tool("ngx_stream_module.so (libnginx-mod-stream)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(upstream: str) -> int:
        for _ in range(START_TRIES):
            port = free_port()
            block = nginx_block().replace("server 127.0.0.1:8010;", f"server {upstream};")
            block = block.replace("listen 8009;", f"listen 127.0.0.1:{port};")
            config = tmp_path / "nginx.conf"
            config.write_text(
                f"load_module {STREAM_MODULE};\n"
                f"daemon off;\nmaster_process off;\npid {tmp_path}/nginx.pid;\n"
                f"error_log {tmp_path}/error.log info;\n"
                "events { worker_connections 64; }\n" + block)
            log = tmp_path / "error.log"
            proc = subprocess.Popen([executable, "-p", str(tmp_path), "-c", str(config), "-e", str(log)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return port
                except OSError:
                    time.sleep(0.05)
            text = log.read_text(errors="replace") if log.exists() else ""
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            if "Address already in use" not in text:
                raise AssertionError(f"nginx did not start:\n{text}")
        raise AssertionError(f"nginx found no free port in {START_TRIES} tries")

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_nginx_stream_proxy_protocol_gives_tsechod_the_real_client(tsechod, nginx) -> None:
    d = tsechod('[[listener]]\naddress = "127.0.0.1:0"\nproxy_protocol = "v1"\nproxy_trusted = ["127.0.0.1"]\n',
                listen=())
    port = nginx(d.addresses[0])
    for source in ("127.0.0.2", "127.0.0.3"):
        with connect_from(("127.0.0.1", port), source, timeout=10) as sock:
            sock.sendall(b"through nginx\n")
            [reply] = recv_lines(sock, 1, timeout=10)
            assert CTIME_REPLY.match(reply) and reply.endswith(b"] through nginx")
            client = f"{source}:{sock.getsockname()[1]}"
        d.wait_for_log(rf"{re.escape(client)} closed reason=eof duration_s=\S+ lines=1 bytes_in=14 "
                       rf"bytes_out=\d+ via=127\.0\.0\.1:\d+\n")
