"""Which ``tf.distribute`` strategy trains a branch, read from ``--strategy`` and ``TF_CONFIG``.

The strategy is a runtime choice, like the number of decoding threads: it is not a field of
``BranchConfig``, so a branch trained on one device and on eight has the same config (and a
run can be resumed under another strategy). What it must not change is the training stream:
``models.train`` keeps the global batch equal to ``batch_size`` and gives each replica a fixed
slice of it (see ``training_batches``).

``TF_CONFIG`` is checked here, before TensorFlow starts its collective runtime, so a malformed
one is reported by name instead of surfacing as a gRPC error or a hang. So is this machine's own
address, and the wait for the other workers is bounded (``SKINFUSION_WORKER_TIMEOUT_S``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import socket
import threading
from collections.abc import Mapping
from typing import Any, Sequence

from models.precision import cpu_has_native_bf16, gpu_compute_capabilities, mixed_precision_name

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "one-device", "mirrored", "multi-worker")
TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}')

WORKER_TIMEOUT_ENV = "SKINFUSION_WORKER_TIMEOUT_S"
DEFAULT_WORKER_TIMEOUT_S = 300.0

_cache: dict[str, Any] = {}  # one strategy per name and process: MultiWorkerMirroredStrategy may be made once


def read_tf_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The checked ``TF_CONFIG`` of a multi-worker run.

    Accepted: ``cluster`` with a ``worker`` list (and optionally a one-entry ``chief`` list) of
    ``host:port`` addresses, and ``task`` with a ``type`` in the cluster and an ``index`` in range.

    Raises:
        ValueError: naming TF_CONFIG, what is wrong, and an example to copy.
    """
    env = os.environ if environ is None else environ
    text = env.get("TF_CONFIG", "")
    fix = f"set it on each machine, e.g. TF_CONFIG='{TF_CONFIG_EXAMPLE}' (index 1 on the second)"
    if not text.strip():
        raise ValueError(f"--strategy multi-worker needs the TF_CONFIG environment variable, which is not set; {fix}")
    try:
        tf_config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"TF_CONFIG is not valid JSON ({exc}); {fix}") from None
    if not isinstance(tf_config, dict) or not isinstance(tf_config.get("cluster"), dict):
        raise ValueError(f"TF_CONFIG needs a 'cluster' object; {fix}")
    cluster = tf_config["cluster"]
    unknown = sorted(set(cluster) - {"worker", "chief"})
    if unknown:
        raise ValueError(f"TF_CONFIG cluster has {unknown}: only 'worker' (and an optional 'chief') tasks train a "
                         f"branch (no parameter servers or evaluators); {fix}")
    if not cluster.get("worker") and not cluster.get("chief"):
        raise ValueError(f"TF_CONFIG cluster lists no 'worker' addresses; {fix}")
    for kind, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses:
            raise ValueError(f"TF_CONFIG cluster {kind!r} must be a non-empty list of 'host:port' strings; {fix}")
        for address in addresses:
            host, _, port = str(address).rpartition(":") if isinstance(address, str) else ("", "", "")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"TF_CONFIG cluster {kind!r} has {address!r}, not a 'host:port' address; {fix}")
    if len(cluster.get("chief", [])) > 1:
        raise ValueError(f"TF_CONFIG cluster has {len(cluster['chief'])} chiefs; at most one; {fix}")
    everyone = [a for kind in ("chief", "worker") for a in cluster.get(kind, [])]
    if len(set(everyone)) != len(everyone):
        raise ValueError(f"TF_CONFIG cluster lists an address twice ({everyone}); give each task its own port; {fix}")
    task = tf_config.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ValueError(f"TF_CONFIG needs a 'task' object with 'type' and 'index' (which task this machine is); {fix}")
    kind, index = task["type"], task["index"]
    if kind not in cluster:
        raise ValueError(f"TF_CONFIG task type {kind!r} is not in the cluster ({sorted(cluster)}); {fix}")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cluster[kind]):
        raise ValueError(f"TF_CONFIG task index {index!r} is out of range: cluster {kind!r} has "
                         f"{len(cluster[kind])} entries (index 0 to {len(cluster[kind]) - 1}); {fix}")
    return tf_config


def is_chief_task(tf_config: Mapping[str, Any] | None) -> bool:
    """Whether this task writes the run: the ``chief``, else worker 0 (TensorFlow's rule); always without a cluster."""
    if not tf_config:
        return True
    task = tf_config["task"]
    if task["type"] == "chief":
        return True
    return task["type"] == "worker" and task["index"] == 0 and "chief" not in tf_config["cluster"]


def gpu_count() -> int:
    """Physical GPUs TensorFlow sees (listing them does not initialise TensorFlow's devices)."""
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def resolve(name: str) -> str:
    """The strategy ``name`` stands for: ``auto`` is ``mirrored`` with more than one GPU, else ``one-device``.

    Raises:
        ValueError: for an unknown name, or ``multi-worker`` with a missing or malformed TF_CONFIG.
    """
    if name not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")
    if name == "multi-worker":
        read_tf_config()
    elif os.environ.get("TF_CONFIG", "").strip() and not _cache.get("warned"):
        _cache["warned"] = True  # once per process, not at every look-up
        logger.warning("TF_CONFIG is set but --strategy is %s, which ignores it; pass --strategy multi-worker "
                       "to train across machines", name)
    if name == "auto":
        return "mirrored" if gpu_count() > 1 else "one-device"
    return name


def make_strategy(name: str) -> Any:
    """The ``tf.distribute`` strategy for ``--strategy name``, made once per process.

    - ``one-device``: TensorFlow's default strategy: the first GPU, else the CPU.
    - ``mirrored``: ``MirroredStrategy`` over every GPU; without GPUs, over the logical CPU
      devices (more than one only when the program split the CPU with
      ``tf.config.set_logical_device_configuration``, as the tests do).
    - ``multi-worker``: ``MultiWorkerMirroredStrategy`` from ``TF_CONFIG`` (checked first, with
      this machine's own address). It must be made before TensorFlow runs anything else in the
      process, and waits for every worker, at most ``$SKINFUSION_WORKER_TIMEOUT_S`` (300 s).

    Raises:
        ValueError: as :func:`resolve`; for ``multi-worker``, also an own address that is not this
            machine's or whose port is taken, a bad ``SKINFUSION_WORKER_TIMEOUT_S``, or workers
            that did not all start in time (naming them).
    """
    resolved = resolve(name)
    if resolved in _cache:
        return _cache[resolved]
    import tensorflow as tf

    if resolved == "multi-worker":
        strategy = _start_multi_worker(tf)
    elif resolved == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        if len(devices) == 1:
            logger.warning("--strategy mirrored sees one device (%s); it trains as one-device would", devices[0])
        strategy = tf.distribute.MirroredStrategy(devices)
    else:
        # No tf.distribute wrapper for one device. Under a OneDeviceStrategy Keras feeds the model
        # through a multi-device iterator, whose generator dataset makes TensorFlow pin glibc's
        # mmap threshold at 128 KB (its ApplyPython311MemoryPatch): every step's activations were
        # then mapped and unmapped, page faults and all, a third of a CPU training's time
        # (experiments/RESULTS.md, "Where a CPU training's time went"). TensorFlow's default
        # strategy places ops on the first GPU, else the CPU, as OneDeviceStrategy did.
        strategy = tf.distribute.get_strategy()
    kind = "one device" if resolved == "one-device" else type(strategy).__name__
    logger.info("--strategy %s: %s with %d replica(s)", name, kind, strategy.num_replicas_in_sync)
    _cache[resolved] = strategy
    return strategy


def worker_timeout(environ: Mapping[str, str] | None = None) -> float:
    """Seconds a multi-worker task waits for the others to start: ``$SKINFUSION_WORKER_TIMEOUT_S``, else 300.

    Raises:
        ValueError: naming the variable, when it is not a positive number.
    """
    text = (os.environ if environ is None else environ).get(WORKER_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_WORKER_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{WORKER_TIMEOUT_ENV}={text!r}: give the seconds a worker waits for the others of "
                         f"TF_CONFIG to start, a positive number (default {DEFAULT_WORKER_TIMEOUT_S:.0f})")
    return seconds


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def check_own_address(tf_config: Mapping[str, Any]) -> None:
    """Refuse a TF_CONFIG whose task address is not this machine's, or whose port is taken.

    TensorFlow would otherwise wait for itself at that address forever.

    Raises:
        ValueError: naming TF_CONFIG, the address and what to change.
    """
    task = tf_config["task"]
    address = tf_config["cluster"][task["type"]][task["index"]]
    host, port = _split_address(address)
    which = f"TF_CONFIG's task ({task['type']} {task['index']}) is {address!r}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"{which}, but this machine cannot resolve the host {host!r} ({exc.strerror}); give this "
                         "machine's own name or IP address there") from None
    for family, _, _, _, sockaddr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((sockaddr[0], 0))
                break
            except OSError:
                continue
    else:
        ips = sorted({info[4][0] for info in infos})
        raise ValueError(f"{which}, but {host!r} ({', '.join(ips)}) is not an address of this machine; set each "
                         "machine's task index to its own entry of the cluster")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:  # TensorFlow listens on every interface
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise ValueError(f"{which}, but port {port} is in use on this machine (a worker still running from "
                             "an earlier start?); stop that process, or choose another port in every machine's "
                             "TF_CONFIG") from None


def _start_multi_worker(tf: Any) -> Any:
    """``MultiWorkerMirroredStrategy()``, waiting at most ``worker_timeout()`` for the other workers.

    TensorFlow's own start-up waits for every worker of the cluster with no deadline, in C++
    (Python's Ctrl-C handler cannot run meanwhile). Its coordination service is configured here
    as the strategy would, plus a registration barrier with a deadline: a task whose peers do not
    all start in time gets a DeadlineExceededError. Ctrl-C kills the process while it waits.
    """
    # No public API configures the coordination service.
    from tensorflow.python.eager import context

    tf_config = read_tf_config()
    check_own_address(tf_config)
    timeout = worker_timeout()
    cluster, task = tf_config["cluster"], tf_config["task"]
    everyone = [(kind, i, a) for kind in ("chief", "worker") for i, a in enumerate(cluster.get(kind, []))]
    logger.info("--strategy multi-worker: waiting up to %g s (%s) for the %d workers of TF_CONFIG (%s); start "
                "the same command, with its own TF_CONFIG task, on each", timeout, WORKER_TIMEOUT_ENV,
                len(everyone), ", ".join(a for _, _, a in everyone))
    ctx = context.context()
    if ctx.coordination_service is None:
        ctx.configure_coordination_service(
            service_type="standalone", service_leader="/job:chief/replica:0/task:0" if "chief" in cluster
            else "/job:worker/replica:0/task:0", cluster_register_timeout_in_ms=int(timeout * 1000))
        for kind in ("chief", "worker"):
            if kind in cluster:
                ctx.coordination_service.coordinated_job_list.add(name=kind, num_tasks=len(cluster[kind]))
        ctx.coordination_service.cluster_register_with_barrier = True  # wait for all, with the deadline above
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL) if main else None
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError, tf.errors.AbortedError) as exc:
        named = {(m[0], int(m[1])) for m in re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", str(exc))}
        mine = (task["type"], task["index"])
        missing = [(k, i, a) for k, i, a in everyone if (k, i) in named and (k, i) != mine]
        missing = missing or [(k, i, a) for k, i, a in everyone if (k, i) != mine and not _answers(a)]
        missing = missing or [(k, i, a) for k, i, a in everyone if (k, i) != mine]
        absent = ", ".join(f"{k} {i} ({a})" for k, i, a in missing)
        raise ValueError(f"--strategy multi-worker: the workers of TF_CONFIG did not all start within {timeout:g} s "
                         f"({WORKER_TIMEOUT_ENV}); no answer from {absent}: "
                         "start the same command, with its own TF_CONFIG task, on each machine, check that they "
                         f"reach each other at those addresses, or raise {WORKER_TIMEOUT_ENV}") from None
    except RuntimeError as exc:  # "Collective ops must be configured at program startup"
        raise RuntimeError(f"--strategy multi-worker: TensorFlow was started before the strategy ({exc}); "
                           "this is a bug in skinfusion, please report it") from exc
    finally:
        if main:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    _keras_compatible_reduce(strategy)
    return strategy


def _answers(address: str) -> bool:
    """Whether something accepts TCP connections at ``host:port`` now."""
    try:
        with socket.create_connection(_split_address(address), timeout=1):
            return True
    except OSError:
        return False


def _keras_compatible_reduce(strategy: Any) -> None:
    """Make this MultiWorkerMirroredStrategy's ``reduce`` accept what Keras 3's ``fit`` passes it.

    Keras 3 (3.15 here) cannot ``fit`` under MultiWorkerMirroredStrategy as released
    (keras-team/keras#20585, open): its TensorFlow trainer calls ``strategy.reduce`` with

    - a nest, the first ``(x, y, sample_weight)`` batch (``Trainer._maybe_symbolic_build``);
      MirroredStrategy maps over nests, this strategy's reduction does not ("Attempt to
      convert a value (PerReplica ...) to a Tensor");
    - ``axis=0`` on each step's scalar logs (``reduce_per_replica``, reduction "mean"), which
      fails on a scalar ("Invalid reduction dimension 0 for input with 0 dimensions").

    This wraps ``reduce`` on this strategy object only: it maps over nests, and reduces a
    scalar across replicas (``axis=None``), the mean of the replicas' values that Keras
    meant. Everything else is TensorFlow's own reduction. The epoch metrics early stopping
    reads do not depend on it: Keras recomputes them from the metric variables, summed over
    every replica of every worker.
    """
    import tensorflow as tf

    reduce = strategy.reduce

    def rank(value: Any) -> int | None:
        first = value.values[0] if isinstance(value, tf.distribute.DistributedValues) else value
        return getattr(getattr(first, "shape", None), "rank", None)

    def compatible_reduce(reduce_op: Any, value: Any, axis: int | None = None) -> Any:
        return tf.nest.map_structure(
            lambda v: reduce(reduce_op, v, axis=None if rank(v) == 0 else axis), value)

    strategy.reduce = compatible_reduce


def check_batch_size(batch_size: int, replicas: int, strategy_name: str) -> None:
    """Refuse a global batch size the replicas cannot share equally.

    Raises:
        ValueError: naming ``--batch-size`` and the nearest sizes that work.
    """
    if batch_size % replicas:
        lower = batch_size // replicas * replicas
        options = " or ".join(str(b) for b in (lower, lower + replicas) if b > 0)
        raise ValueError(f"--batch-size {batch_size} is the global batch, shared equally by the {replicas} replicas "
                         f"of --strategy {strategy_name}, and is not divisible by {replicas}; use {options}")


def worker_values(strategy: Any, values: list[int]) -> list[list[int]]:
    """Every worker's ``values`` (one list per replica, in replica order), gathered with a collective.

    Used before training to check that the workers agree on what they train (data, resume
    epoch): workers that disagree would otherwise run different step counts and hang.
    """
    import tensorflow as tf

    @tf.function  # eagerly, TensorFlow warns that collectives have "significant overhead"
    def gather() -> Any:
        return strategy.gather(strategy.run(lambda: tf.constant([values], dtype=tf.int64)), axis=0)

    return [list(map(int, row)) for row in gather().numpy()]


# The oldest GPU generation with native tensor-core arithmetic for each compute type
# (float16: Volta, 7.0; bfloat16: Ampere, 8.0); older ones emulate it, slower than float32.
_NATIVE_FROM = {"float16": (7, 0), "bfloat16": (8, 0)}


def warn_if_mixed_precision_is_slow(mixed_precision: str | bool = "float16") -> None:
    """Log when ``--mixed-precision`` will be slower than float32: float16 on a CPU, bfloat16 on a
    CPU without native bf16, or either on a GPU older than its native generation (it still runs)."""
    name = mixed_precision_name(mixed_precision)
    if not name:
        return
    if gpu_count() > 0:
        old = [cc for cc in gpu_compute_capabilities() if cc < _NATIVE_FROM[name]]
        if old:
            need = ".".join(map(str, _NATIVE_FROM[name]))
            other = " (float16 is native from 7.0)" if name == "bfloat16" else ""
            logger.warning("--mixed-precision %s on a GPU of compute capability %s: it is native from %s, and "
                           "emulated (slower than float32) before%s", name, ".".join(map(str, old[0])), need, other)
        return
    if name == "float16":
        logger.warning("--mixed-precision float16 without a GPU: float16 is emulated on the CPU and slower than "
                       "float32; it is meant for GPUs (compute capability 7.0 or later); on a CPU with avx512_bf16 "
                       "or AMX, use --mixed-precision bfloat16")
    elif not cpu_has_native_bf16():
        logger.warning("--mixed-precision bfloat16 without a GPU on a CPU without avx512_bf16 or AMX: bfloat16 is "
                       "emulated and about 4x slower than float32 (measured); train without --mixed-precision")


def start_strategy(name: str, mixed_precision: str | bool, jobs: int | None, batch_sizes: Sequence[int]) -> int | None:
    """Check ``--strategy`` (and TF_CONFIG) for ``skinfusion train`` and, for several replicas, make it now.

    Now: MultiWorkerMirroredStrategy must exist before TensorFlow runs anything else in the
    process, and a batch size the replicas cannot share is refused before any data are read.

    Returns:
        the ``--jobs`` to use: 1 under a several-replica strategy, which gives each branch every device.

    Raises:
        ValueError: naming the flag, for a bad TF_CONFIG, parallel ``--jobs`` or a batch size the
            replicas cannot share; naming TF_CONFIG and the workers, for workers that do not all
            start within ``$SKINFUSION_WORKER_TIMEOUT_S`` (see :func:`make_strategy`).
    """
    resolved = resolve(name)  # a bad TF_CONFIG is reported here, by name
    warn_if_mixed_precision_is_slow(mixed_precision)
    if resolved == "one-device":
        return jobs  # made where the branch trains (each --jobs worker process makes its own)
    if jobs is not None and jobs > 1 and len(batch_sizes) > 1:
        raise ValueError(f"--jobs {jobs} trains branches in parallel processes, but --strategy {name} "
                         "gives each branch all the devices; use --jobs 1 or --strategy one-device")
    replicas = make_strategy(name).num_replicas_in_sync
    for batch_size in batch_sizes:
        check_batch_size(batch_size, replicas, name)
    return 1
