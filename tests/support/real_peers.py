"""Real peer programs for tests: nginx and HAProxy from Debian packages.

Each runs in the foreground on loopback, on a port picked free, from a config in the
test's temp dir, and is stopped by its pid. A missing program skips the test with why.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from splicerelay.bench import listening_ports
from tests.support.harness import free_port, poll_until


def require(program: str, package: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} is not installed (Debian package {package})")
    return path


@contextmanager
def running(
    command: list[str], port: int, log_path: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command` (in `cwd`, with no stdin) until the block ends; ready once `port`
    is listening.

    Readiness comes from /proc/net/tcp rather than a probe connection, which would be a
    stray session for the programs under test.
    """
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    try:

        def listening() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"{command[0]} exited: {log_path.read_text()}")
            return port in listening_ports()

        poll_until(listening, 15, f"{command[0]} to listen on {port}")
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


NGINX_PROXY_ECHO = """\
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        location / {{ return 200 "$proxy_protocol_addr $proxy_protocol_port\\n"; }}
    }}
}}
"""


@contextmanager
def nginx_proxy_echo(tmp_path: Path) -> Iterator[int]:
    """nginx that answers every request with the client address from the PROXY header."""
    nginx = require("nginx", "nginx-light")
    directory = tmp_path / "nginx"
    directory.mkdir()
    port = free_port()
    config = directory / "nginx.conf"
    config.write_text(NGINX_PROXY_ECHO.format(dir=directory, port=port))
    with running([nginx, "-c", str(config), "-p", str(directory)], port, directory / "out.log"):
        yield port


HAPROXY_SEND_PROXY_V2 = """\
global
    maxconn 200
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend front
    bind 127.0.0.1:{listen_port}
    default_backend back
backend back
    server relay 127.0.0.1:{relay_port} send-proxy-v2{server_options}
"""


@contextmanager
def haproxy_sending_proxy_v2(
    tmp_path: Path, relay_port: int, server_options: str = ""
) -> Iterator[int]:
    """HAProxy in tcp mode forwarding to `relay_port` with a PROXY v2 header.

    `server_options` go on its server line, e.g. "proxy-v2-options crc32c".
    """
    haproxy = require("haproxy", "haproxy")
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        HAPROXY_SEND_PROXY_V2.format(
            listen_port=port,
            relay_port=relay_port,
            server_options=f" {server_options}" if server_options else "",
        )
    )
    with running([haproxy, "-db", "-f", str(config)], port, tmp_path / "haproxy.log"):
        yield port
