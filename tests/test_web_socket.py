"""The web stage's own listening socket (``stages.bind_socket``): connections it accepts have
TCP_NODELAY, so a response is not held back by Nagle's algorithm waiting on a delayed ACK
(about 40 ms per request before the fix)."""
from __future__ import annotations

import asyncio
import socket

from dicom_node.stages import bind_socket


def test_connections_accepted_on_the_web_socket_have_tcp_nodelay():
    sock = bind_socket("127.0.0.1", 0)

    async def accept_one() -> int:
        seen = asyncio.get_running_loop().create_future()

        def on_connect(reader, writer):  # noqa: ANN001
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(accept_one()) != 0
