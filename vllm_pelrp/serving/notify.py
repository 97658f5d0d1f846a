""""Ticket done", from the worker to the API process that submitted it, so that no explanation
polls the engine while its backward runs.

Each API process (``--api-server-count`` of them: each its own) binds a zmq PULL socket at an
``ipc://`` path in a private temporary folder (mode 0700, a random name: nobody else can reach
it or guess it) and passes that address with every ``pelrp_submit``. When a ticket's backward
is done, the worker (its tensor-parallel rank 0, the one whose result is read) pushes the
ticket's id there; a thread of the API process resolves the asyncio future that the explanation
awaits, and the explanation then fetches its result once through ``collective_rpc``
(``pelrp_poll``). A notification carries nothing but the ticket id, and a false one only costs a
poll that answers "not done".

zmq (pyzmq) ships with vLLM, whose own engine messages travel over it. No torch, no HTTP.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import os
import secrets
import shutil
import tempfile
import threading

logger = logging.getLogger("vllm_pelrp.serving")
ADDRESS_SCHEME = "ipc://"
MAX_PEERS = 16  # API processes a worker keeps a socket to (more than --api-server-count needs)


class TicketListener:
    """The API process's end: ``expect(ticket)`` before submitting, await the future."""

    def __init__(self) -> None:
        import zmq

        self._folder = tempfile.mkdtemp(prefix="pelrp-notify-")  # 0700
        self.address = f"{ADDRESS_SCHEME}{os.path.join(self._folder, secrets.token_hex(16))}"
        self._context = zmq.Context(1)
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(self.address)
        self._waiting: dict[str, asyncio.Future] = {}
        self._lock = threading.Lock()
        self.received = 0
        self._thread = threading.Thread(target=self._read, name="pelrp-notify", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def expect(self, ticket: str) -> asyncio.Future:
        """A future of the running loop, resolved when ``ticket``'s notification arrives."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            self._waiting[ticket] = future
        return future

    def forget(self, ticket: str) -> None:
        with self._lock:
            self._waiting.pop(ticket, None)

    def _read(self) -> None:
        import zmq

        while True:
            try:
                message = self._socket.recv()
            except zmq.ZMQError:  # the context is terminated (``close``): this thread closes
                self._socket.close(linger=0)  # the socket it reads, so that ``term`` returns
                return
            self.received += 1
            with self._lock:
                future = self._waiting.pop(message.decode(errors="replace"), None)
            if future is not None:
                try:
                    future.get_loop().call_soon_threadsafe(_resolve, future)
                except RuntimeError:  # its loop is closed: nobody waits any more
                    pass

    def close(self) -> None:
        """Stop reading (the reader thread closes its socket when ``term`` interrupts it)."""
        if self._thread.is_alive():
            try:
                self._context.term()
            except Exception:  # noqa: BLE001 - at exit: nothing left to tell
                pass
        shutil.rmtree(self._folder, ignore_errors=True)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class TicketNotifier:
    """The worker's end: one PUSH socket per API process's address, used from the backward
    threads (under a lock: zmq sockets are not thread-safe). Never blocks: a notification that
    cannot be queued is dropped (the API process's safety poll finds the ticket)."""

    def __init__(self) -> None:
        self._sockets: collections.OrderedDict[str, object] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.sent = 0

    def notify(self, address: str | None, ticket: str) -> None:
        if not address or not address.startswith(ADDRESS_SCHEME):  # never elsewhere than ipc
            return
        import zmq

        with self._lock:
            try:
                socket = self._sockets.get(address)
                if socket is None:
                    while len(self._sockets) >= MAX_PEERS:  # the oldest API process's
                        self._sockets.popitem(last=False)[1].close(linger=0)
                    # the process's shared context: never terminated by a collected notifier
                    # (a context's __del__ waits for its sockets, a hang in a collection)
                    socket = zmq.Context.instance().socket(zmq.PUSH)
                    socket.setsockopt(zmq.LINGER, 0)
                    socket.setsockopt(zmq.SNDHWM, 10_000)
                    socket.connect(address)
                    self._sockets[address] = socket
                else:
                    self._sockets.move_to_end(address)
                socket.send(ticket.encode(), zmq.NOBLOCK)
                self.sent += 1
            except zmq.ZMQError as error:  # gone, or its queue full: the safety poll remains
                logger.debug("vllm-pelrp: notifying %s failed: %s", address, error)
