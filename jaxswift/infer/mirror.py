"""Serving from several processes (hosts): one engine per process, all of them over one global mesh.

JAX runs a mesh that spans processes only when every process makes the same jitted calls with the same inputs (its
multi-controller model). Process 0, the leader, runs the HTTP front end and the orchestrator as on one host; its
engine is wrapped in `MirroredEngine`, which sends each call that touches the devices to the other processes (the
followers) before making it, and every follower replays the calls, in order, on its own engine (`follow`). The
engines' host state (page allocator, prefix cache, sampling seeds) stays identical because it changes only through
those calls, given the same seed (`JaxEngine(seed=)`). What a call returns that lives on the devices (a prefilled
`Prefix`, the `DecodeState`) never travels: it is named by a number that each side maps to its own object, and
forgotten when the leader's orchestrator lets go of it, so the followers free the same device memory.

The calls travel over one TCP connection from each follower to the leader (pickled, length-prefixed), not over JAX
collectives, so a follower can wait between requests however long the server idles. A call that raises on the
leader raises the same way on every follower (same code, same state), which logs it and goes on.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pickle
import socket
import struct
import threading
import weakref

import numpy as np

from jaxswift.errors import ConfigError
from jaxswift.infer.engine import DecodeState, JaxEngine, Prefix

log = logging.getLogger(__name__)

# The engine's methods that run jitted steps (every process must make them); the rest read host state only.
MIRRORED_CALLS = frozenset({"prefill", "prefill_step", "resample", "insert", "cache_prefix", "generate",
                            "free_resource", "init_decode_state", "prompt_logprobs", "warmup"})
CONNECT_TIMEOUT_S = 300.0  # how long the leader waits for every follower to connect, and they for the leader
_HEADER = struct.Struct("!Q")
_ADDRESS_BYTES = 256
_STOP = "stop"


@dataclasses.dataclass(frozen=True)
class Handle:
    """A device object (Prefix or DecodeState) a mirrored call returned, by its number."""

    number: int


@dataclasses.dataclass(frozen=True)
class _Params:
    """The engine's own weights, which every process already holds."""


# --- the connection ---------------------------------------------------------------------------------------------


class Channel:
    """The leader's connections to every follower, or a follower's to the leader."""

    def __init__(self, sockets: list[socket.socket]):
        self._sockets = sockets

    @classmethod
    def open(cls, host: str | None) -> "Channel":
        """Collective (every process calls it): the leader listens on a free port and tells the followers where
        (one JAX broadcast), they connect. `host`: how followers reach process 0 (the coordinator's host); None:
        this machine's name as the leader sees it."""
        import jax
        from jax.experimental import multihost_utils

        leader = jax.process_index() == 0
        server = socket.create_server(("", 0)) if leader else None
        address = f"{host or socket.getfqdn()}:{server.getsockname()[1]}" if leader else ""
        padded = np.zeros(_ADDRESS_BYTES, np.uint8)
        padded[:len(address)] = np.frombuffer(address.encode(), np.uint8)
        shared = bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded), np.uint8)).rstrip(b"\0").decode()
        if leader:
            return cls(_accept(server, jax.process_count() - 1))
        return cls([_connect(shared)])

    def send(self, message) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for s in self._sockets:
            s.sendall(_HEADER.pack(len(data)) + data)

    def receive(self):
        """The next message from the leader; None when it has gone."""
        header = _read(self._sockets[0], _HEADER.size)
        data = None if header is None else _read(self._sockets[0], _HEADER.unpack(header)[0])
        return None if data is None else pickle.loads(data)

    def close(self) -> None:
        for s in self._sockets:
            s.close()


def _accept(server: socket.socket, followers: int) -> list[socket.socket]:
    server.settimeout(CONNECT_TIMEOUT_S)
    try:
        return [server.accept()[0] for _ in range(followers)]
    except socket.timeout:
        raise ConfigError(f"multi-process serving: not every one of the {followers} other processes connected to "
                          f"process 0 at port {server.getsockname()[1]} within {CONNECT_TIMEOUT_S:.0f} s") from None
    finally:
        server.close()


def _connect(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    try:
        return socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S)
    except OSError as e:
        raise ConfigError(f"multi-process serving: cannot reach process 0 at {address} ({e})") from None


def _read(s: socket.socket, size: int) -> bytes | None:
    s.settimeout(None)  # between requests a follower waits as long as the server idles
    chunks, left = [], size
    while left:
        chunk = s.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# --- device objects by number -------------------------------------------------------------------------------------


class _Numbering:
    """Numbers the device objects mirrored calls return, in the order they appear (the same order on every
    process). Only the newest DecodeState stays registered (the orchestrator drives one), and one a call consumes
    (every call taking a state donates it) is dropped."""

    def __init__(self):
        self.next = 0

    def results(self, result) -> list:
        """The device objects of a call's result, in numbering order."""
        items = result if isinstance(result, tuple) and not isinstance(result, DecodeState) else (result,)
        return [r for r in items if isinstance(r, (Prefix, DecodeState))]

    @staticmethod
    def consumed(args, kwargs) -> list:
        return [a for a in (*args, *kwargs.values()) if isinstance(a, DecodeState)]


class MirroredEngine:
    """The leader's engine: every call in MIRRORED_CALLS is sent to the followers, then made here; everything else
    (sizes, counters, the grammar compiler, pad_prompt, can_admit) is this engine's own."""

    def __init__(self, engine: JaxEngine, channel: Channel):
        self._engine, self._channel = engine, channel
        self._numbering = _Numbering()
        self._prefixes: dict[int, tuple[weakref.ref, int]] = {}  # id(prefix) -> (weak ref, number)
        self._state: tuple[DecodeState, int] | None = None  # the newest decode state and its number
        self._dropped = collections.deque()  # numbers whose objects the leader let go of: the followers drop them
        self._lock = threading.Lock()

    def __getattr__(self, name):
        attribute = getattr(self._engine, name)
        if name not in MIRRORED_CALLS:
            return attribute
        return lambda *args, **kwargs: self._call(name, args, kwargs)

    def _call(self, name: str, args: tuple, kwargs: dict):
        with self._lock:
            wire = ([self._encode(a) for a in args], {k: self._encode(v) for k, v in kwargs.items()})
            consumed = [self._number(s) for s in self._numbering.consumed(args, kwargs)]
            dropped = [self._dropped.popleft() for _ in range(len(self._dropped))]
            self._channel.send((name, *wire, dropped))
            try:
                result = getattr(self._engine, name)(*args, **kwargs)
            finally:
                if self._state is not None and self._state[1] in consumed:
                    self._state = None
            for obj in self._numbering.results(result):
                self._register(obj)
            return result

    def _number(self, obj) -> int | None:
        if isinstance(obj, DecodeState):
            return self._state[1] if self._state is not None and self._state[0] is obj else None
        entry = self._prefixes.get(id(obj)) if isinstance(obj, Prefix) else None
        return entry[1] if entry is not None and entry[0]() is obj else None

    def _encode(self, value):
        if value is self._engine.params:
            return _Params()
        if isinstance(value, (Prefix, DecodeState)):
            number = self._number(value)
            if number is None:
                raise RuntimeError(f"multi-process serving: a {type(value).__name__} that no mirrored call returned "
                                   "(or an old decode state) was passed to the engine")
            return Handle(number)
        return value

    def _register(self, obj) -> None:
        number = self._numbering.next
        self._numbering.next += 1
        if isinstance(obj, DecodeState):
            self._state = (obj, number)  # the followers drop the older one the same way
            return

        def forget(_ref, key=id(obj), number=number):
            self._prefixes.pop(key, None)
            self._dropped.append(number)

        self._prefixes[id(obj)] = (weakref.ref(obj, forget), number)

    def close(self) -> None:
        """Tells the followers to stop, and closes the connections."""
        with self._lock:
            self._channel.send(_STOP)
            self._channel.close()


def follow(engine: JaxEngine, channel: Channel) -> None:
    """A follower's life: replay the leader's engine calls until it says stop or goes away."""
    numbering, objects = _Numbering(), {}
    newest_state: int | None = None
    while True:
        message = channel.receive()
        if message is None:
            log.warning("multi-process serving: process 0 went away; this process stops")
            return
        if message == _STOP:
            return
        name, args, kwargs, dropped = message
        for number in dropped:
            objects.pop(number, None)
        decode = lambda v: engine.params if isinstance(v, _Params) else objects[v.number] if isinstance(  # noqa: E731
            v, Handle) else v
        args, kwargs = [decode(a) for a in args], {k: decode(v) for k, v in kwargs.items()}
        consumed = numbering.consumed(args, kwargs)
        try:
            result = getattr(engine, name)(*args, **kwargs)
        except Exception as e:  # the leader's call raised the same way (same code, same state)
            log.info("multi-process serving: %s raised %s: %s (as on process 0)", name, type(e).__name__, e)
            result = None
        if newest_state is not None and any(objects.get(newest_state) is s for s in consumed):
            objects.pop(newest_state)
            newest_state = None
        for obj in numbering.results(result):
            objects[numbering.next] = obj
            if isinstance(obj, DecodeState):
                objects.pop(newest_state, None)
                newest_state = numbering.next
            numbering.next += 1
