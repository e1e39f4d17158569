"""The runtimes that load and run an exported graph (onnxruntime, LiteRT), without TensorFlow.

Each backend class takes the imported runtime package, the model file and a thread count;
``bind`` names the graph's inputs and outputs and calling it runs one batch. ``ensemble.formats``
says which format uses which.
"""

from __future__ import annotations

import importlib
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

EXTRA_HINT = "pip install 'skinfusion[export]'"


def require(module: str, what: str) -> Any:
    """Import an optional package of the ``export`` extra, or a ValueError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{what} needs the {module} package, which is not installed: {EXTRA_HINT}") from None


def input_is_view(name: str, view: str) -> bool:
    """Whether a graph input's name is that of ``view`` (``rgb``; TFLite may write ``serving_default_rgb:0``)."""
    return name == view or name.endswith(f"_{view}:0") or name.split(":")[0] == view


class OnnxBackend:
    """The branches' graph in onnxruntime."""

    # A large batch is scored in chunks of this many images, the views of the next chunk computed while
    # the graph runs the previous one in a thread (onnxruntime releases the GIL): 833 against 666 images/s
    # for batches of 64 at 96 px on 2 cores, with bit-identical outputs.
    pipeline_rows = 16

    def __init__(self, ort, path: Path, threads: int):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # Idle threads sleep instead of spinning: on a machine shared with other processes (or with
        # the decoding threads of `predict`), spinning threads took the cores from the work and cut
        # batch throughput by half in our measurements.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        # name -> shape, None for a dynamic dimension
        def shapes(args):
            return {a.name: [d if isinstance(d, int) else None for d in a.shape] for a in args}

        self.graph_inputs, self.graph_outputs = shapes(self.session.get_inputs()), shapes(self.session.get_outputs())

    def bind(self, names: dict[str, Any]) -> None:
        self.inputs, self.outputs = names["inputs"], [names["proba"], *names["embeddings"]]

    def __call__(self, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.outputs, dict(zip(self.inputs, xs)))


class TfliteBackend:
    """The branches' graph in the LiteRT interpreter (one per thread of use: interpreters are not thread-safe)."""

    pipeline_rows = 0  # one interpreter behind a lock: nothing to overlap

    def __init__(self, litert, path: Path, threads: int):
        self.interpreter = litert.Interpreter(model_path=str(path), num_threads=threads)

        def shapes(details):
            return {d["name"]: [int(x) if x >= 0 else None for x in d["shape_signature"]] for d in details}

        self.graph_inputs = shapes(self.interpreter.get_input_details())
        self.graph_outputs = shapes(self.interpreter.get_output_details())
        self.rows = -1
        self.lock = threading.Lock()

    def bind(self, names: dict[str, Any]) -> None:
        by_name = {d["name"]: d["index"] for d in self.interpreter.get_input_details()}
        out = {d["name"]: d["index"] for d in self.interpreter.get_output_details()}
        self.inputs = [by_name[n] for n in names["inputs"]]
        self.outputs = [out[n] for n in (names["proba"], *names["embeddings"])]

    def __call__(self, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        with self.lock:
            if len(xs[0]) != self.rows:  # resizing re-plans the graph: only when the batch size changes
                for idx, x in zip(self.inputs, xs):
                    self.interpreter.resize_tensor_input(idx, list(x.shape))
                self.interpreter.allocate_tensors()
                self.rows = len(xs[0])
            for idx, x in zip(self.inputs, xs):
                self.interpreter.set_tensor(idx, np.ascontiguousarray(x, np.float32))
            self.interpreter.invoke()
            return [self.interpreter.get_tensor(i).copy() for i in self.outputs]

