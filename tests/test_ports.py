"""The loopback ports that tests and ``bench-serve`` choose for the servers they start."""

from __future__ import annotations

import socket

from skinfusion.bench.loadgen import _ephemeral_range, address_in_use, free_port, free_ports


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range():
    lo, hi = _ephemeral_range()
    ports = free_ports(20)
    assert len(set(ports)) == 20
    for p in ports:
        assert not lo <= p <= hi, (p, lo, hi)  # where bind(0) and outgoing connections draw theirs
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_two_draws_differ_even_with_the_global_generator_seeded():
    import random

    random.seed(0)
    a = free_ports(5)
    random.seed(0)
    b = free_ports(5)
    assert a != b  # parallel test workers seed alike; their ports must not


def test_a_port_in_use_is_never_returned():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", free_port()))
        busy.listen()
        taken = busy.getsockname()[1]
        assert taken not in free_ports(200)


def test_the_address_in_use_message_is_recognised():
    assert address_in_use("ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 1): "
                          "address already in use")
    assert address_in_use("[Errno 48] Address already in use")
    assert address_in_use("skinfusion: error: --host 127.0.0.1 --port 5: cannot listen there (already in use)")
    assert not address_in_use("Application startup complete.")
