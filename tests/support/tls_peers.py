"""Real TLS peers for the SNI-routing tests: self-signed certificates made with `openssl
req`, `openssl s_server` upstreams, and clients (curl, `openssl s_client`, Python's ssl).

Each upstream has a certificate of its own (subject CN = its name) and serves a file
`whoami` naming it, so a client can tell which backend answered both by the certificate
it saw and by the body. Everything runs on loopback, bounded in time, and is stopped by
its pid; a missing program skips the test with the Debian package it comes in.
"""

from __future__ import annotations

import hashlib
import random
import re
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from tests.support.harness import free_port
from tests.support.real_peers import require, running

COMMAND_TIMEOUT = 20.0  # every client command; a hung one fails instead of stalling
REQUEST = b"GET /whoami HTTP/1.0\r\n\r\n"
SINK_TIMEOUT = 120.0  # a bound on every wait of a bulk transfer


def require_openssl() -> str:
    return require("openssl", "openssl")


def require_curl() -> str:
    return require("curl", "curl")


@dataclass(frozen=True)
class Cert:
    """A self-signed certificate and its key, for subject CN `name`."""

    name: str
    cert: Path
    key: Path

    def der(self) -> bytes:
        """The certificate as a client's getpeercert(binary_form=True) returns it."""
        return ssl.PEM_cert_to_DER_cert(self.cert.read_text())


def make_cert(directory: Path, name: str, dns_names: Sequence[str]) -> Cert:
    """A P-256 certificate for CN=`name` whose subjectAltName lists `dns_names`."""
    openssl = require_openssl()
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    san = ",".join(f"DNS:{dns}" for dns in dns_names)
    command = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    command += ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2"]
    command += ["-subj", f"/CN={name}", "-addext", f"subjectAltName={san}"]
    subprocess.run(
        command,
        check=True,
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
    )
    return Cert(name, cert, key)


@dataclass(frozen=True)
class TlsBackend:
    """An upstream that terminates TLS with `cert` and answers GET /whoami with `body`."""

    port: int
    cert: Cert

    @property
    def body(self) -> str:
        return f"{self.cert.name}\n"


@contextmanager
def openssl_backend(directory: Path, name: str, dns_names: Sequence[str]) -> Iterator[TlsBackend]:
    """`openssl s_server -WWW` on a free loopback port, until the block ends.

    Why s_server: it is on every machine with the openssl CLI. With -WWW it serves files
    from its working directory, one connection after another (the tests connect one at a
    time), and closes each connection after its answer. Without -alpn it agrees on no
    ALPN protocol, so a client offering h2 falls back to HTTP/1.x, which it speaks.
    """
    openssl = require_openssl()
    home = directory / name
    cert = make_cert(home, name, dns_names)
    backend = TlsBackend(free_port(), cert)
    (home / "whoami").write_text(backend.body)
    log_path = home / "s_server.log"
    command = [openssl, "s_server", "-quiet", "-accept", f"127.0.0.1:{backend.port}"]
    command += ["-cert", str(cert.cert), "-key", str(cert.key), "-WWW"]
    with running(command, backend.port, log_path, cwd=home):
        yield backend


@dataclass(frozen=True)
class Answer:
    """What a client saw: the server certificate's subject CN and the response body."""

    subject: str | None
    body: str


def curl_get(port: int, name: str, *options: str) -> Answer:
    """`curl --resolve NAME:PORT:127.0.0.1 https://NAME:PORT/whoami` with `options`."""
    curl = require_curl()
    command = [curl, "-sS", "-k", "-v", "--max-time", "10"]
    command += ["--resolve", f"{name}:{port}:127.0.0.1", *options, f"https://{name}:{port}/whoami"]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"curl failed ({result.returncode}): {result.stderr}"
    # curl -v: "*  subject: CN=backend-a"
    subject = re.search(r"^\*\s+subject: CN\s*=\s*(\S+)$", result.stderr, re.MULTILINE)
    return Answer(subject[1] if subject else None, result.stdout)


def s_client_get(
    port: int, servername: str | None, alpn: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """`openssl s_client` sending GET /whoami, with -servername NAME (or -noservername)."""
    openssl = require_openssl()
    command = [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-ign_eof"]
    command += ["-servername", servername] if servername else ["-noservername"]
    if alpn:
        command += ["-alpn", ",".join(alpn)]
    return subprocess.run(
        command,
        input=REQUEST.decode(),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def s_client_answer(port: int, servername: str | None, alpn: Sequence[str] = ()) -> Answer:
    """What `s_client_get` saw; it must have completed its handshake."""
    result = s_client_get(port, servername, alpn)
    assert result.returncode == 0, f"s_client failed: {result.stdout}{result.stderr}"
    # s_client prints "subject=CN = backend-a", then the response after the session.
    subject = re.search(r"^subject=CN\s*=\s*(\S+)$", result.stdout, re.MULTILINE)
    # Then the answer (text mode made its CRLFs newlines): the body is one line.
    body = re.search(r"^HTTP/1\.0 200 ok\n(?:.+\n)*\n(.*\n)", result.stdout, re.MULTILINE)
    return Answer(subject[1] if subject else None, body[1] if body else "")


def client_context(
    alpn: Sequence[str] = (), ciphers: str | None = None, tls12: bool = False
) -> ssl.SSLContext:
    """A client context that takes any certificate (the tests compare it themselves)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers is not None:
        context.set_ciphers(ciphers)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


@dataclass(frozen=True)
class PythonAnswer:
    """What a Python ssl client saw: the certificate (DER) and the whole response."""

    der: bytes
    response: bytes

    @property
    def body(self) -> str:
        return self.response.split(b"\r\n\r\n", 1)[-1].decode()


def python_get(
    port: int, server_name: str | None, context: ssl.SSLContext, prefix: bytes = b""
) -> PythonAnswer:
    """GET /whoami over TLS to 127.0.0.1:`port`, with `prefix` (a PROXY header) sent in
    clear before the handshake."""
    with socket.create_connection(("127.0.0.1", port), timeout=COMMAND_TIMEOUT) as raw:
        raw.sendall(prefix)
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            tls.sendall(REQUEST)
            response = b""
            # s_server closes without a close_notify now and then: EOF either way.
            with suppress(ssl.SSLEOFError):
                while chunk := tls.recv(65536):
                    response += chunk
    return PythonAnswer(der, response)


@dataclass
class SinkResult:
    """What the sink got on one connection: byte count and sha256."""

    count: int = 0
    digest: str = ""


LENGTH = struct.Struct("!Q")


@contextmanager
def python_tls_sink(cert: Cert) -> Iterator[tuple[int, list[SinkResult]]]:
    """A Python ssl server on a free port: on each connection it reads an 8-byte length,
    then that many bytes, hashing them, sends the hex sha256 back and closes. Yields the
    port and the results so far.

    Why a length first: TLS has no half-close that both ends handle alike (a
    close_notify, then data back, trips Python's unwrap), so the sender says how much
    comes instead of closing its side.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert, cert.key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    results: list[SinkResult] = []
    stop = threading.Event()

    def serve_one(raw: socket.socket) -> None:
        result = SinkResult()
        digest = hashlib.sha256()
        raw.settimeout(SINK_TIMEOUT)
        with context.wrap_socket(raw, server_side=True) as tls:
            head = b""
            while len(head) < LENGTH.size and (chunk := tls.recv(LENGTH.size - len(head))):
                head += chunk
            (left,) = LENGTH.unpack(head)
            buffer = bytearray(1 << 20)
            view = memoryview(buffer)
            while left and (count := tls.recv_into(buffer, min(left, len(buffer)))):
                digest.update(view[:count])
                result.count += count
                left -= count
            result.digest = digest.hexdigest()
            results.append(result)
            tls.sendall(result.digest.encode())

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve_one, args=(raw,), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1]), results
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def send_to_sink(
    port: int, server_name: str, total: int, seed: int = 15
) -> tuple[bytes, SinkResult, str]:
    """Send `total` pseudo-random bytes over TLS to a `python_tls_sink` (through a relay
    at `port`); return the certificate seen, what was sent, and the digest it answered."""
    rng = random.Random(seed)
    block = rng.randbytes(4 << 20)
    sent = SinkResult()
    digest = hashlib.sha256()
    context = client_context()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=SINK_TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(LENGTH.pack(total))
        view = memoryview(block)
        while sent.count < total:
            # Slices of varied size and offset, so that no boundary lines up by luck.
            size = min(total - sent.count, rng.randint(1, 1 << 20))
            start = rng.randrange(0, len(block) - size + 1)
            piece = view[start : start + size]
            digest.update(piece)
            tls.sendall(piece)
            sent.count += size
        answer = b""
        while len(answer) < 64 and (chunk := tls.recv(64 - len(answer))):
            answer += chunk
    sent.digest = digest.hexdigest()
    return der, sent, answer.decode()
