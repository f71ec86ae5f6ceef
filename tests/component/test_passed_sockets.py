"""Sockets passed by socket activation, in-process over real file descriptors: which fds
are refused (the checks of sd_is_socket), and which route takes which passed socket.

The sockets stand for what systemd passes: real listening sockets on loopback, bound on
127.0.0.2 where the rule under test needs an address that differs from the config's.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from splicerelay.config.addresses import SystemdSocketAddress, TcpAddress, UnixAddress
from splicerelay.ops.systemd import PassedSocket, RefusedFd, listening_socket
from splicerelay.relay.listeners import ListenError, ListenerSet, Role
from splicerelay.relay.passed import bound_address, listening_on

OTHER_LOOPBACK = "127.0.0.2"


def close(sock: socket.socket) -> None:
    sock.close()


@pytest.fixture
def sockets() -> Iterator[Callable[..., socket.socket]]:
    """Makes sockets that are closed after the test, unless something closed them."""
    made: list[socket.socket] = []

    def make(
        family: int = socket.AF_INET,
        kind: int = socket.SOCK_STREAM,
        bind: object = None,
        listen: bool = True,
    ) -> socket.socket:
        sock = socket.socket(family, kind)
        made.append(sock)
        if bind is not None:
            sock.bind(bind)
        if listen:
            sock.listen(8)
        return sock

    yield make
    for sock in made:
        sock.close()


def listening(make: Callable[..., socket.socket], host: str = OTHER_LOOPBACK) -> socket.socket:
    return make(bind=(host, 0))


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def what_is(fd: int) -> str:
    checked = listening_socket(fd)
    if isinstance(checked, socket.socket):
        checked.detach()  # the test's own socket object owns the fd
        return "a listening socket"
    return checked


# ----- the checks of sd_is_socket ---------------------------------------------------------


def test_a_listening_tcp_socket_passes(sockets: Callable[..., socket.socket]) -> None:
    sock = listening(sockets)
    checked = listening_socket(sock.fileno())
    assert isinstance(checked, socket.socket)
    assert checked.family == socket.AF_INET and checked.type == socket.SOCK_STREAM
    checked.detach()


def test_listening_ipv6_and_unix_sockets_pass(
    sockets: Callable[..., socket.socket], tmp_path: Path
) -> None:
    v6 = sockets(socket.AF_INET6, bind=("::1", 0))
    unix = sockets(socket.AF_UNIX, bind=str(tmp_path / "web.sock"))
    assert what_is(v6.fileno()) == "a listening socket"
    assert what_is(unix.fileno()) == "a listening socket"


def test_a_udp_socket_is_refused(sockets: Callable[..., socket.socket]) -> None:
    udp = sockets(kind=socket.SOCK_DGRAM, bind=("127.0.0.1", 0), listen=False)
    assert what_is(udp.fileno()) == "a datagram socket (AF_INET)"


def test_a_unix_datagram_socket_is_refused(sockets: Callable[..., socket.socket]) -> None:
    dgram = sockets(socket.AF_UNIX, socket.SOCK_DGRAM, listen=False)
    assert what_is(dgram.fileno()) == "a datagram socket (AF_UNIX)"


def test_a_tcp_socket_that_does_not_listen_is_refused(
    sockets: Callable[..., socket.socket],
) -> None:
    bound = sockets(bind=("127.0.0.1", 0), listen=False)
    assert what_is(bound.fileno()) == "a stream socket (AF_INET) that is not listening"
    # A connected socket (what Accept=yes would pass) does not listen either.
    server = listening(sockets, "127.0.0.1")
    client = sockets(listen=False)
    client.connect(server.getsockname())
    assert what_is(client.fileno()) == "a stream socket (AF_INET) that is not listening"


def test_a_pipe_a_file_and_a_closed_fd_are_refused(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    path = tmp_path / "file"
    path.write_text("not a socket")
    file_fd = os.open(path, os.O_RDONLY)
    try:
        assert what_is(read_end) == "a pipe"
        assert what_is(file_fd) == "a regular file"
    finally:
        os.close(file_fd)
        os.close(read_end)
    assert what_is(read_end) == "not usable (Bad file descriptor)"
    os.close(write_end)


def test_a_refused_fd_says_what_it_is_and_where_to_look() -> None:
    assert str(RefusedFd(4, "web", "a pipe")) == (
        "fd 4 passed by systemd as 'web' is a pipe, not a listening stream socket"
        " (AF_INET, AF_INET6 or AF_UNIX); check the socket unit: ListenStream= and Accept=no"
    )


def test_the_relay_does_not_start_with_a_refused_fd(sockets: Callable[..., socket.socket]) -> None:
    good = PassedSocket(listening(sockets), "web")
    listeners = ListenerSet([good, RefusedFd(4, "dns", "a datagram socket (AF_INET)")])
    with pytest.raises(ListenError, match=r"^fd 4 passed by systemd as 'dns' is a datagram"):
        listeners.take("web", SystemdSocketAddress("web"))
    listeners.close_all(close)


# ----- which route takes which passed socket ------------------------------------------------


def test_a_systemd_name_takes_the_socket_wherever_it_is_bound(
    sockets: Callable[..., socket.socket],
) -> None:
    sock = listening(sockets)
    listeners = ListenerSet([PassedSocket(sock, "web")])
    taken = listeners.take("frontend", SystemdSocketAddress("web"))
    assert taken is sock
    assert listening_on(SystemdSocketAddress("web"), taken) == (
        f"{OTHER_LOOPBACK}:{port_of(sock)} (systemd:web)"
    )
    listeners.close_all(close)


def test_a_socket_named_after_the_route_but_bound_elsewhere_is_refused(
    sockets: Callable[..., socket.socket],
) -> None:
    """The old rule let the name win: the relay served on 127.0.0.2, said 127.0.0.1."""
    sock = listening(sockets)
    port = port_of(sock)
    listeners = ListenerSet([PassedSocket(sock, "web")])
    with pytest.raises(ListenError) as caught:
        listeners.take("web", TcpAddress("127.0.0.1", port))
    assert str(caught.value) == (
        f"systemd passed the socket 'web' (fd {sock.fileno()}) bound to"
        f" {OTHER_LOOPBACK}:{port}, but the route's listen is 127.0.0.1:{port};"
        " make them agree, or write `listen: systemd:web` to take whatever systemd"
        " passes as 'web'"
    )
    assert sock.fileno() >= 0  # not closed: systemd owns it
    listeners.close_all(close)


def test_a_socket_bound_to_the_listen_address_serves_the_route_whatever_its_name(
    sockets: Callable[..., socket.socket],
) -> None:
    sock = listening(sockets)
    listeners = ListenerSet([PassedSocket(sock, "http")])
    taken = listeners.take("web", TcpAddress(OTHER_LOOPBACK, port_of(sock)))
    assert taken is sock and listeners.is_passed(taken)
    listeners.close_all(close)


def test_a_named_socket_that_matches_the_address_serves_its_route(
    sockets: Callable[..., socket.socket], tmp_path: Path
) -> None:
    unix = sockets(socket.AF_UNIX, bind=str(tmp_path / "web.sock"))
    listeners = ListenerSet([PassedSocket(unix, "web")])
    assert listeners.take("web", UnixAddress(str(tmp_path / "web.sock"))) is unix
    assert bound_address(unix) == f"unix:{tmp_path / 'web.sock'}"
    listeners.close_all(close)


def test_a_systemd_name_nobody_passed_is_an_error(sockets: Callable[..., socket.socket]) -> None:
    with pytest.raises(ListenError) as caught:
        ListenerSet().take("web", SystemdSocketAddress("web"))
    assert str(caught.value) == (
        "listen is systemd:web, but systemd passed no socket (LISTEN_FDS is not set for"
        " this process); name the socket with FileDescriptorName=web in its socket unit"
    )
    listeners = ListenerSet([PassedSocket(listening(sockets), "api")])
    with pytest.raises(ListenError) as caught:
        listeners.take("web", SystemdSocketAddress("web"))
    assert "but systemd passed sockets named 'api' only;" in str(caught.value)
    listeners.close_all(close)


def test_two_sockets_under_one_name_are_an_error_for_a_systemd_listen(
    sockets: Callable[..., socket.socket],
) -> None:
    first, second = listening(sockets), listening(sockets)
    listeners = ListenerSet([PassedSocket(first, "web"), PassedSocket(second, "web")])
    with pytest.raises(ListenError) as caught:
        listeners.take("web", SystemdSocketAddress("web"))
    assert "systemd passed 2 sockets under that name" in str(caught.value)
    assert "give each its own FileDescriptorName=" in str(caught.value)
    # By address each of them can still serve a route.
    assert listeners.take("one", TcpAddress(OTHER_LOOPBACK, port_of(first))) is first
    listeners.close_all(close)


def test_one_passed_socket_serves_one_route(sockets: Callable[..., socket.socket]) -> None:
    sock = listening(sockets)
    listeners = ListenerSet([PassedSocket(sock, "web")])
    listeners.take("a", SystemdSocketAddress("web"))
    with pytest.raises(ListenError) as caught:
        listeners.take("b", TcpAddress(OTHER_LOOPBACK, port_of(sock)))
    assert str(caught.value) == (
        f"the socket systemd passed as 'web' (fd {sock.fileno()}) bound to"
        f" {OTHER_LOOPBACK}:{port_of(sock)} serves route 'a' (listen: systemd:web)"
        " already; one passed socket serves one route"
    )
    listeners.close_all(close)


def test_a_reload_cannot_change_the_listen_of_a_passed_socket_route(
    sockets: Callable[..., socket.socket],
) -> None:
    sock = listening(sockets)
    port = port_of(sock)
    listeners = ListenerSet([PassedSocket(sock, "http")])
    listeners.take("web", TcpAddress(OTHER_LOOPBACK, port))
    # The same listen again (a reload that keeps it) keeps the very socket.
    assert listeners.take("web", TcpAddress(OTHER_LOOPBACK, port)) is sock
    for moved in (TcpAddress("127.0.0.1", port), SystemdSocketAddress("http")):
        with pytest.raises(ListenError) as caught:
            listeners.take("web", moved)
        assert str(caught.value) == (
            f"the route listens on the socket systemd passed as 'http' (fd {sock.fileno()})"
            f" bound to {OTHER_LOOPBACK}:{port} (listen: {OTHER_LOOPBACK}:{port}); a reload"
            f" cannot change that to {moved}: change the socket unit if need be, then restart"
        )
    listeners.close_all(close)


def test_a_removed_route_leaves_its_passed_socket_open_for_a_later_one(
    sockets: Callable[..., socket.socket],
) -> None:
    sock = listening(sockets)
    listeners = ListenerSet([PassedSocket(sock, "web")])
    listeners.take("web", SystemdSocketAddress("web"))
    listeners.close_except(set(), close)
    assert sock.fileno() >= 0
    assert listeners.take("other", SystemdSocketAddress("web")) is sock
    listeners.close_all(close)


def test_workers_match_the_handed_sockets_as_their_supervisor_did(
    sockets: Callable[..., socket.socket],
) -> None:
    activated = listening(sockets)
    supervisor = ListenerSet([PassedSocket(activated, "web")], role=Role.SUPERVISOR)
    supervisor.take("frontend", SystemdSocketAddress("web"))
    own = supervisor.take("api", TcpAddress("127.0.0.1", 0))
    handed = supervisor.handover()
    assert [(item.sock, item.name, item.kept) for item in handed] == [
        (activated, "web", True),
        (own, "api", False),
    ]
    worker = ListenerSet(handed, role=Role.WORKER)
    assert worker.take("frontend", SystemdSocketAddress("web")) is activated
    assert worker.take("api", TcpAddress("127.0.0.1", 0)) is own
    supervisor.close_all(close)
