"""Reading a client's PROXY header off a real loopback socket: what is looked at, what
is taken, and that the stream after the header stays in the socket for splice.

The socket is wrapped to record each recv_into: ("peek" or "recv", bytes asked, bytes
returned). A header that is all there is read with one look (two for a v2 header longer
than the first look) and one recv of exactly its length; one over the bound is refused
from its first 16 bytes, with nothing taken.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from splicerelay.protocol.proxy_protocol import MAX_V1_LENGTH, encode_v1, encode_v2
from splicerelay.relay.proxy_header import ProxyHeaderRejected, receive_proxy_header
from tests.support.scripted import poll_until, tcp_pair, unread_bytes

V4 = (("192.0.2.1", 40000), ("198.51.100.2", 443))
PAYLOAD = b"payload that must stay in the socket" * 10


class Recording:
    """A socket whose recv_into calls are recorded."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls: list[tuple[str, int, int]] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_into(self, buffer: memoryview, nbytes: int = 0, flags: int = 0) -> int:
        count = self.sock.recv_into(buffer, nbytes, flags)
        kind = "peek" if flags & socket.MSG_PEEK else "recv"
        self.calls.append((kind, nbytes or len(buffer), count))
        return count


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    near, far = tcp_pair()
    yield near, far
    near.close()
    far.close()


def padded_v2(total: int) -> bytes:
    """A valid tcp4 v2 header of exactly `total` bytes."""
    bare = encode_v2(*V4)
    return encode_v2(*V4, tlvs=[(0x04, bytes(total - len(bare) - 3))])


def send_and_wait(near: socket.socket, far: socket.socket, data: bytes) -> None:
    """Send `data` and wait until all of it is in `far`'s receive queue."""
    before = unread_bytes(far)
    near.sendall(data)
    poll_until(lambda: unread_bytes(far) >= before + len(data), "the bytes to arrive")


def rest_of_stream(far: socket.socket) -> bytes:
    return far.recv(1 << 20) if unread_bytes(far) else b""


@pytest.mark.parametrize(
    "header",
    [encode_v1(*V4), encode_v2(*V4), encode_v1(None, None), padded_v2(MAX_V1_LENGTH)],
    ids=["v1", "v2", "v1_unknown", "v2_of_the_first_look"],
)
async def test_a_whole_header_takes_one_look_and_one_recv(pair, header: bytes):
    near, far = pair
    send_and_wait(near, far, header + PAYLOAD)
    sock = Recording(far)
    await receive_proxy_header(sock, 3.0, 4096)  # type: ignore[arg-type]
    assert sock.calls == [
        ("peek", MAX_V1_LENGTH, MAX_V1_LENGTH),
        ("recv", len(header), len(header)),
    ]
    assert rest_of_stream(far) == PAYLOAD


@pytest.mark.parametrize("total", [MAX_V1_LENGTH + 1, 4096])
async def test_a_long_v2_header_takes_a_second_look_of_exactly_its_length(pair, total: int):
    near, far = pair
    header = padded_v2(total)
    send_and_wait(near, far, header + PAYLOAD)
    sock = Recording(far)
    decoded = await receive_proxy_header(sock, 3.0, 4096)  # type: ignore[arg-type]
    assert decoded.source == V4[0]
    assert sock.calls == [
        ("peek", MAX_V1_LENGTH, MAX_V1_LENGTH),
        ("peek", total, total),
        ("recv", total, total),
    ]
    assert rest_of_stream(far) == PAYLOAD


@pytest.mark.parametrize(("limit", "total"), [(4096, 4097), (256, 257), (4096, 65551)])
async def test_a_v2_header_over_the_bound_is_refused_with_nothing_taken(
    pair, limit: int, total: int
):
    near, far = pair
    sent = padded_v2(total)[: 4 << 10]  # the rest need not even be sent
    send_and_wait(near, far, sent)
    sock = Recording(far)
    with pytest.raises(ProxyHeaderRejected, match=f"{total} bytes is longer than the {limit}"):
        await receive_proxy_header(sock, 3.0, limit)  # type: ignore[arg-type]
    assert sock.calls == [("peek", MAX_V1_LENGTH, MAX_V1_LENGTH)]
    assert unread_bytes(far) == len(sent)


@pytest.mark.parametrize(
    ("header", "piece"),
    [(encode_v1(*V4), 1), (encode_v2(*V4), 5), (padded_v2(4096), 1000), (padded_v2(300), 7)],
    ids=["v1_by_byte", "v2_by_5", "v2_4k_by_1000", "v2_300_by_7"],
)
async def test_a_header_in_pieces_is_read_without_taking_the_stream(
    pair, header: bytes, piece: int
):
    """Each piece is sent once the reader waits for it. Every byte of an incomplete
    header is taken as it comes, so readiness waits for new bytes (no busy loop): the
    looks are bounded by the pieces, not by time."""
    near, far = pair
    sock = Recording(far)
    pieces = [header[start : start + piece] for start in range(0, len(header), piece)]
    pieces[-1] += PAYLOAD
    async with trio.open_nursery() as nursery:

        async def send_pieces() -> None:
            for data in pieces:
                await trio.testing.wait_all_tasks_blocked()
                send_and_wait(near, far, data)

        nursery.start_soon(send_pieces)
        decoded = await receive_proxy_header(sock, 30.0, 4096)  # type: ignore[arg-type]
    assert decoded.source == V4[0]
    assert rest_of_stream(far) == PAYLOAD
    looks = [call for call in sock.calls if call[0] == "peek"]
    # One look per piece, one more when a v2 length first shows, and the EAGAIN ones.
    assert len([look for look in looks if look[2]]) <= len(pieces) + 1
    assert sum(count for kind, _, count in sock.calls if kind == "recv") == len(header)


async def test_a_close_inside_the_header_is_refused(pair):
    near, far = pair
    send_and_wait(near, far, encode_v2(*V4)[:20])
    near.shutdown(socket.SHUT_WR)
    with pytest.raises(ProxyHeaderRejected, match="closed before a complete PROXY header"):
        await receive_proxy_header(far, 3.0, 4096)  # type: ignore[arg-type]


async def test_no_header_in_time_is_refused(pair, autojump_clock: trio.testing.MockClock):
    near, far = pair
    send_and_wait(near, far, b"PROXY TCP4 ")
    started = trio.current_time()
    with pytest.raises(ProxyHeaderRejected, match="no complete PROXY header within 3s"):
        await receive_proxy_header(far, 3.0, 4096)  # type: ignore[arg-type]
    assert trio.current_time() - started == pytest.approx(3.0)
