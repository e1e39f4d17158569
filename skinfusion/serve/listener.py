"""The listening side of ``skinfusion serve``: its port, taken before the model loads, and uvicorn on it.

Apart from the command module so that the command stays a thin parser (and so that nothing here
imports TensorFlow: the socket and the signals are all it deals with).
"""

from __future__ import annotations

import errno
import inspect
import signal
import socket

GRACEFUL_S = 30  # the longest SIGTERM waits for in-flight requests
WORKER_HEALTHCHECK_S = 120  # how long a --workers process may be too busy to answer uvicorn's ping
BACKLOG = 2048  # uvicorn's own default; the connections that may wait while the model loads


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` now and keep it: the socket uvicorn then listens on.

    A port another process holds is refused before minutes of loading, not after; and because the
    socket listens from here on, no other process can take the port during the loading (CI once lost
    a port that way when it was only checked at start-up and bound by uvicorn after the warm-up). It must
    listen, not only be bound: Linux lets a second SO_REUSEADDR socket bind a port nobody listens on.
    A client that connects during the loading waits in the backlog until the server answers (as with
    gunicorn, which also listens before its workers load the app); ``/readyz`` says when it is ready.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        reason = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({reason})") from None
    sock.set_inheritable(True)  # --workers: uvicorn hands it to each worker process
    return sock


def run_uvicorn(app, workers: int, options: dict, sock: socket.socket) -> int | None:
    """Serve until SIGTERM or SIGINT has drained the requests in flight; returns that signal (None if none).

    ``uvicorn.run`` would swallow Ctrl-C's KeyboardInterrupt and return as after SIGTERM; this is
    uvicorn.run's own sequence (Server, or a Multiprocess supervisor over one bound socket) with
    the stopping signal kept, so that Ctrl-C can exit 130 while SIGTERM (a service manager's stop) exits 0.
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    stopped: list[int] = []
    handled = (signal.SIGINT, signal.SIGTERM)
    if workers > 1 and "timeout_worker_healthcheck" in inspect.signature(uvicorn.Config).parameters:
        # uvicorn kills a worker that misses a 5-s health ping; importing TensorFlow and loading the
        # model can hold the interpreter longer than that on a busy machine, and the killed worker's
        # replacement meets the same fate, for ever.
        options = {**options, "timeout_worker_healthcheck": WORKER_HEALTHCHECK_S}
    config = uvicorn.Config(app, factory=workers > 1, workers=workers, **options)
    server = uvicorn.Server(config)
    # One worker: uvicorn re-raises the signal that stopped it once it has drained, to these handlers.
    previous = {sig: signal.signal(sig, lambda sig, _frame: stopped.append(sig)) for sig in handled}
    try:
        if workers == 1:
            server.run(sockets=[sock])
        else:
            given = {"sockets": [sock]}
            if "target" in inspect.signature(Multiprocess).parameters:  # uvicorn < 0.36 took the worker's target
                given["target"] = server.run
            supervisor = Multiprocess(config, **given)
            for sig, name in ((signal.SIGINT, "handle_int"), (signal.SIGTERM, "handle_term")):
                original = getattr(supervisor, name)
                setattr(supervisor, name, lambda sig=sig, original=original: (stopped.append(sig), original()))
            supervisor.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if workers == 1 and not server.started:
        raise ValueError(f"--host {options['host']} --port {options['port']}: the server did not start (see above)")
    return stopped[0] if stopped else None
