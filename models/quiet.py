"""Importing TensorFlow without its C++ start-up notices, in this process and in worker processes.

Light on purpose: it imports nothing of TensorFlow until asked, so a worker process can load it
before anything that imports TensorFlow at module level.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import tempfile
from typing import Any

# TensorFlow's C++ start-up chatter (including a harmless cuInit error on CPU-only machines)
# drowns the progress lines; Python exceptions still surface. Users can override it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# TensorFlow >= 2.19 writes its start-up notices on a CPU-only machine (absl's "before
# absl::InitializeLog" line, "Could not find cuda drivers", the CPU-feature hint and, since 2.21,
# "oneDNN custom operations are on") from C++ straight to file descriptor 2, once per bundled
# library (so twice), ignoring TF_CPP_MIN_LOG_LEVEL (tensorflow/tensorflow#100442). They are not
# the user's business; anything else it writes is kept.
TF_NOTICES = re.compile(r"absl::InitializeLog|cudart_stub\.cc|cpu_feature_guard\.cc|rebuild TensorFlow with the "
                        r"appropriate compiler flags|Unable to register cu(DNN|FFT|BLAS) factory|"
                        r"oneDNN custom operations are on|cuda_platform\.cc:\d+\] failed call to cuInit")


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its start-up notices filtered out of stderr (see ``TF_NOTICES``).

    Does nothing when TensorFlow is already imported, or when ``TF_CPP_MIN_LOG_LEVEL`` is set to 0
    (the user asked for TensorFlow's information lines).
    """
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3") == "0":
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            # The CUDA probe (a cuInit error on a machine without a GPU) runs at the first device
            # query, not at import: make it here, where its line is filtered.
            tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
            sys.stderr.write("".join(ln for ln in lines if not TF_NOTICES.search(ln)))


def call_quietly(payload: bytes) -> Any:
    """Run ``pickle.dumps((function, args))`` after importing TensorFlow quietly: a process-pool task.

    joblib unpickles a task's function and arguments before running it, and unpickling our
    training code imports TensorFlow, noisily; this function's module does not, so the task is
    passed as bytes and unpickled here, after the quiet import. The bytes come from this same
    program (``joblib`` hands them to its own workers), never from a file.
    """
    import_tensorflow_quietly()
    function, args = pickle.loads(payload)
    return function(*args)
