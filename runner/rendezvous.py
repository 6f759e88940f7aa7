"""A standalone rendezvous store for multi-node torchrun jobs on spot instances.

`python -m runner.rendezvous --port 29400` hosts the key-value store that
torchrun's c10d rendezvous backend (`--rdzv-backend c10d --rdzv-endpoint
HOST:PORT`) keeps its state in, and serves it until SIGTERM or SIGINT.

Why it exists: left to itself, torchrun hosts that store inside the launcher of
whichever node's address is the endpoint, so the store lives and dies with
that node.  On spot capacity any node can be reclaimed, the endpoint's node
included, and with it goes the state every other node needs to form the group
again.  The endpoint has to outlive every training node, so it runs here, on a
small on-demand instance (deploy/aws/runner-spot-multinode.yaml).  The state
is a few KB per rendezvous round; the process is mostly torch's import (about
0.5 GiB resident), so the smallest instance with 2 GiB will do.  When the
endpoint's address is not the node's own, torchrun's c10d backend connects to
it as a client and never hosts it (`--rdzv-conf is_host=false` makes that
explicit, and keeps a node from hosting a store of its own when the endpoint
resolves to itself).

The store's socket is bound here, on `--host` (default: every interface), and
handed to `torch.distributed.TCPStore` as its listening socket: TCPStore alone
listens on every interface whatever host it is given.

One id per job incarnation: torchrun closes its rendezvous for good when it
exits other than by a signal (the job finished, or its workers exited or
failed), and a store that outlives the job keeps that "closed" mark, so a
torchrun started again with the same `--rdzv-id` fails at once with
RendezvousClosedError.  `rendezvous_id(endpoint, run_id)` gives the id a
node's next torchrun should use, `<run id>.<incarnation>`: the current
incarnation while it is open, the next one (bumped atomically, once, by
whichever node sees it first) after it was closed.  An old job that closes
late closes only its own incarnation.

Exit codes: 0 stopped by SIGTERM/SIGINT; 1 the store could not listen (the
port is taken, or the address is not this machine's); 2 bad usage.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime
import io
import ipaddress
import pickle
import signal
import socket
import sys
import threading
from collections.abc import Sequence

DEFAULT_PORT = 29400  # torchrun's default c10d endpoint port

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise _UsageError(message)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="runner rendezvous",
                     description="Host the c10d rendezvous store of a multi-node torchrun job until SIGTERM.")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT,
                        help=f"TCP port to listen on (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--host", default="0.0.0.0",
                        help="address to listen on (default 0.0.0.0: every IPv4 interface)")
    return parser


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; OSError when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # A restarted store can take its port back while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def _loopback_for(host: str) -> str:
    """The address through which this process reaches its own store (TCPStore connects a client to it too)."""
    try:
        if ipaddress.ip_address(host).is_unspecified:
            return "::1" if ":" in host else "127.0.0.1"
    except ValueError:
        pass
    return host


def serve(host: str, port: int, ready=None, stop: threading.Event | None = None) -> int:
    """Host the store on host:port until `stop` is set (default: SIGTERM/SIGINT); the exit code.

    `ready(port)` is called once the store accepts connections, with the
    port actually bound (useful with port 0).
    """
    from torch.distributed import TCPStore

    try:
        sock = _listen(host, port)
    except OSError as exc:
        print(f"runner rendezvous: cannot listen on {host}:{port}: {exc.strerror or exc}; "
              "choose another --port or a --host of this machine", file=sys.stderr)
        return EXIT_FAILED
    bound = sock.getsockname()[1]
    # TCPStore owns the socket from here on (it closes it when the store goes).
    store = TCPStore(_loopback_for(host), bound, is_master=True, wait_for_workers=False,
                     master_listen_fd=sock.detach(), timeout=datetime.timedelta(seconds=30))
    if stop is None:
        stop = threading.Event()

        def on_signal(signum, frame):
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
    if ready is not None:
        ready(bound)
    while not stop.wait(0.5):  # a polling wait: Event.set() from a signal handler can deadlock a bare wait()
        pass
    del store
    return EXIT_OK


# -- the rendezvous id of a node's next torchrun ------------------------------------

_STATE_KEY = "torch.rendezvous.{}"  # where torchrun's c10d backend keeps a rendezvous' state
_NO_STATE = b"Y2FuaW1hZGFt"  # the backend's placeholder for "no state yet"
_STATE_MODULE = "torch.distributed.elastic.rendezvous.dynamic_rendezvous"


class RendezvousUnavailable(RuntimeError):
    """The rendezvous store cannot be reached or read; the message is one line."""


def parse_endpoint(endpoint: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """("host", port) of "HOST[:PORT]" or "[IPV6][:PORT]"."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or host.count(":") and not host.startswith("["):  # no port, or a bare IPv6 address
        host, port = endpoint, ""
    host = host.strip("[]")
    try:
        number = int(port) if port else default_port
    except ValueError:
        number = -1
    if not host or not 0 < number <= 65535:
        raise ValueError(f"bad rendezvous endpoint {endpoint!r}: expected HOST:PORT")
    return host, number


class _Fields:
    """Stands in for torchrun's state classes: holds their fields, runs no code."""


class _StateUnpickler(pickle.Unpickler):
    """Reads torchrun's rendezvous state (a pickle) allowing only the classes it is made of."""

    def find_class(self, module: str, name: str):
        if module == _STATE_MODULE and name in ("_RendezvousState", "_NodeDesc"):
            return _Fields
        if module == "datetime" and name in ("datetime", "timezone", "timedelta"):
            return getattr(datetime, name)
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in the rendezvous state")


def _is_closed(store, rdzv_id: str) -> bool:
    key = _STATE_KEY.format(rdzv_id)
    if not store.check([key]):
        return False
    value = store.get(key)
    if value == _NO_STATE:
        return False
    try:
        state = _StateUnpickler(io.BytesIO(base64.b64decode(value, validate=True))).load()
        return bool(state.closed)
    except (binascii.Error, pickle.UnpicklingError, AttributeError, EOFError, TypeError, ValueError) as exc:
        raise RendezvousUnavailable(f"cannot read the state of rendezvous {rdzv_id!r} ({exc}); "
                                    "is this torch version's rendezvous format supported?") from None


def rendezvous_id(endpoint: str, run_id: str, timeout_s: float = 60.0) -> str:
    """The `--rdzv-id` for this node's next torchrun of `run_id`: `<run_id>.<incarnation>`.

    Call it before every torchrun start (first start and every restart) on
    every node.  Raises RendezvousUnavailable when the store at `endpoint`
    cannot be reached within `timeout_s` or its state cannot be read, and
    ValueError when `endpoint` is not HOST:PORT.
    """
    from torch.distributed import TCPStore

    host, port = parse_endpoint(endpoint)
    counter = f"runner.rendezvous.{run_id}.incarnation"
    try:
        store = TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
        for _ in range(100):  # each pass returns or moves the counter on: a guard, not a retry budget
            incarnation = store.add(counter, 0)
            rdzv_id = f"{run_id}.{incarnation}"
            if not _is_closed(store, rdzv_id):
                return rdzv_id
            # Closed: move every node on to the next one; only the first compare-and-set wins.
            store.compare_set(counter, str(incarnation), str(incarnation + 1))
    except (RuntimeError, TimeoutError, ValueError) as exc:
        if isinstance(exc, RendezvousUnavailable):
            raise
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RendezvousUnavailable(f"cannot reach the rendezvous store at {endpoint}: {reason}") from None
    raise RendezvousUnavailable(f"rendezvous store at {endpoint}: no open incarnation of {run_id!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m runner.rendezvous [--port P] [--host H]` (and `runner rendezvous`): see the module's doc."""
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except _UsageError as exc:
        print(f"runner rendezvous: {exc}", file=sys.stderr)
        return EXIT_USAGE

    def ready(port: int) -> None:
        print(f"runner rendezvous: store listening on {args.host}:{port} "
              f"(torchrun --rdzv-backend c10d --rdzv-endpoint <this host's address>:{port})", flush=True)

    return serve(args.host, args.port, ready)


if __name__ == "__main__":
    sys.exit(main())
