"""The upstream of the idle workload: `python -m splicerelay.bench.echo PORT`.

A single-threaded epoll echo server on loopback that holds many thousands of idle
connections cheaply. It runs as its own process so that its sockets count against its
own fd limit, not the bench's; it raises its soft RLIMIT_NOFILE to the hard limit for
that. SIGTERM ends it.
"""

from __future__ import annotations

import errno
import resource
import selectors
import socket
import sys

LOOPBACK = "127.0.0.1"
BACKLOG = 4096
CHUNK = 65536
# Out of fds or kernel memory: stop accepting for this round; the pending connections
# stay in the backlog until some close.
ACCEPT_PAUSE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def raise_nofile_limit() -> int:
    """Raise the soft fd limit as far as the hard limit allows; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def serve(port: int) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK, port))
    listener.listen(BACKLOG)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    while True:
        for key, _events in selector.select():
            if key.fileobj is listener:
                accept_all(listener, selector)
            else:
                assert isinstance(key.fileobj, socket.socket)
                echo(key.fileobj, selector)


def accept_all(listener: socket.socket, selector: selectors.BaseSelector) -> None:
    while True:
        try:
            connection, _ = listener.accept()
        except BlockingIOError:
            return
        except OSError as error:
            if error.errno in ACCEPT_PAUSE_ERRORS:
                return
            raise
        connection.setblocking(False)
        selector.register(connection, selectors.EVENT_READ)


def echo(connection: socket.socket, selector: selectors.BaseSelector) -> None:
    """Send back what arrived; close on EOF or error. Messages here are a few bytes, so a
    send that would block (a client not reading) ends that connection instead of queueing."""
    try:
        data = connection.recv(CHUNK)
        if data:
            connection.sendall(data)
            return
    except OSError:
        pass
    selector.unregister(connection)
    connection.close()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m splicerelay.bench.echo PORT", file=sys.stderr)
        return 2
    raise_nofile_limit()
    serve(int(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
