"""The converters from a loaded Keras ``Ensemble`` to one exported graph file (ONNX, TFLite).

Each takes ``(ens, path, quantize, calibration)``, writes ``path`` and returns the graph's input and
output names (``inputs`` by view, ``proba``, ``embeddings``). TensorFlow and the converters' packages
are imported when a conversion runs, so that ``ensemble.formats`` (which names these functions) is
importable by the TensorFlow-free runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from colorspaces.files import atomic_path
from ensemble.backends import input_is_view, require

OPSET = 17
_PROBE_SEED = 20


def _forward(ens):
    """The ensemble's branches as one ``tf.function``: inputs by view, outputs proba and embeddings."""
    import tensorflow as tf

    heads, signature = ens.heads()

    @tf.function(input_signature=signature)
    def forward(*xs):
        outs = [h(x, training=False) for h, x in zip(heads, xs)]  # BatchNorm in inference mode
        res = {"proba": tf.concat([tf.reshape(p, [-1, 1]) for p, _ in outs], axis=1)}
        for c, (_, e) in zip(ens.configs, outs):
            res[f"embedding_{c.view}"] = e
        return res

    return forward, signature


def _branch_batches(ens, images: np.ndarray, batch_size: int = 32):
    """Each branch's view inputs for RGB uint8 images at ``load_size``, batch by batch."""
    for i in range(0, len(images), batch_size):
        yield [x for x, _ in ens.preprocess.branch_inputs(images[i : i + batch_size])]


def to_onnx(ens, path: Path, quantize: str | None, calibration: np.ndarray | None) -> dict[str, Any]:
    """Write the branches as one ONNX graph (tf2onnx; int8: onnxruntime static QDQ quantisation)."""
    tf2onnx = require("tf2onnx", "--format onnx")

    forward, signature = _forward(ens)
    float_path = path if quantize is None else path.with_name("float-" + path.name)
    tf2onnx.convert.from_function(forward, input_signature=signature, opset=OPSET, output_path=str(float_path))
    names = {"inputs": [c.view for c in ens.configs], "proba": "proba",
             "embeddings": [f"embedding_{c.view}" for c in ens.configs]}
    if quantize == "int8":
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        feeds = iter([dict(zip(names["inputs"], xs)) for xs in _branch_batches(ens, calibration)])

        class Reader(CalibrationDataReader):
            def get_next(self):
                return next(feeds, None)

        # Shape inference and graph folding first (BatchNorm into the convolutions), as onnxruntime
        # advises, so the quantiser sees the graph the CPU kernels will run.
        pre_path = path.with_name("pre-" + path.name)
        quant_pre_process(str(float_path), str(pre_path), skip_symbolic_shape=True)
        # QDQ with per-channel weights: what onnxruntime's CPU kernels fuse into integer convolutions.
        quantize_static(str(pre_path), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        float_path.unlink()
        pre_path.unlink()
    return names


def to_tflite(ens, path: Path, quantize: str | None, calibration: np.ndarray | None) -> dict[str, Any]:
    """Write the branches as one TFLite graph (int8: TFLite's post-training quantisation)."""
    import tensorflow as tf

    forward, _ = _forward(ens)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([forward.get_concrete_function()], forward)
    if quantize == "int8":
        batches = [xs for xs in _branch_batches(ens, calibration, batch_size=1)]
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: iter(batches)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(converter.convert())
    # TFLite renames the outputs (Identity, Identity_1, ...): find which is which by scoring a probe batch.
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    inputs = {d["name"]: d for d in it.get_input_details()}
    names = {"inputs": [], "proba": None, "embeddings": []}
    for c in ens.configs:
        match = [n for n in inputs if input_is_view(n, c.view)]
        if len(match) != 1:
            raise ValueError(f"{path}: cannot tell which TFLite input is the {c.view} view (inputs {list(inputs)})")
        names["inputs"].append(match[0])
    probe = probe_images(ens, 4)
    xs = next(_branch_batches(ens, probe))
    want = forward(*xs)
    for n, x in zip(names["inputs"], xs):
        it.resize_tensor_input(inputs[n]["index"], list(x.shape))
    it.allocate_tensors()
    for n, x in zip(names["inputs"], xs):
        it.set_tensor(inputs[n]["index"], x)
    it.invoke()
    outs = {d["name"]: it.get_tensor(d["index"]) for d in it.get_output_details()}
    for key in ["proba", *[f"embedding_{c.view}" for c in ens.configs]]:
        ref = want[key].numpy()
        best = min((n for n in outs if outs[n].shape == ref.shape), default=None,
                   key=lambda n: float(np.abs(outs[n] - ref).max()))
        if best is None:
            raise ValueError(f"{path}: no TFLite output has the shape of {key} {ref.shape}")
        if key == "proba":
            names["proba"] = best
        else:
            names["embeddings"].append(best)
    if len(set([names["proba"], *names["embeddings"]])) != 1 + len(ens.configs):
        raise ValueError(f"{path}: the TFLite outputs could not be told apart; export with --format onnx instead")
    return names


def probe_images(ens, n: int) -> np.ndarray:
    """Seeded random RGB images with smooth structure, at the bundle's ``load_size``, for the parity check."""
    rng = np.random.default_rng(_PROBE_SEED)
    L = ens.load_size
    yy, xx = np.mgrid[0:L, 0:L] / L
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, 3)
        blob = np.exp(-((xx - rng.random()) ** 2 + (yy - rng.random()) ** 2) / (0.02 + 0.1 * rng.random()))
        img = base[None, None] * (1 - 0.7 * blob[..., None]) + rng.normal(0, 12, (L, L, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)

