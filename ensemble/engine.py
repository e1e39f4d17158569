"""The Keras backend of the inference engine: the branch models in one compiled forward pass.

Batching, TTA, fusion, streaming from files and the out-of-distribution gate are the shared
``ensemble.scoring.ScoringEngine``'s; this module supplies only the forward pass.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

import keras

from colorspaces.pipeline import BranchRecipe, Preprocess
from ensemble.details import BatchScores, FileBatch, PredictionDetails  # noqa: F401  (re-exported)
from ensemble.ood import OODGate, embedding_layer
from ensemble.scoring import ScoringEngine

logger = logging.getLogger(__name__)


def shared_decode_margin(configs: Sequence) -> float | None:
    """The lesion-crop margin every branch was trained with (None: whole images).

    Images are decoded once for all branches, so the branches of one ensemble must agree on it.

    Raises:
        ValueError: if branches were trained with different ``lesion_crop`` / ``lesion_margin``.
    """
    margins = {c.decode_margin for c in configs}
    if len(margins) > 1:
        found = ", ".join(f"{c.view}: {c.lesion_crop} {c.lesion_margin}" for c in configs)
        raise ValueError(f"the branches disagree on lesion-centred input ({found}); an ensemble decodes each image "
                         "once for all branches: retrain them with the same --lesion-crop and --lesion-margin")
    return margins.pop() if margins else None


class Ensemble(ScoringEngine):
    """A loaded bundle: branch models in member order, the fusion estimator and the threshold.

    All branches run in one compiled forward pass (a ``tf.function`` with a fixed input
    signature, traced once at load time), so neither single images nor batches pay for graph
    retracing. The same pass returns each branch's penultimate embedding (``embedding_layer``),
    which the out-of-distribution ``gate`` scores (None for a bundle fused without one).
    """

    no_gate_note = ("this ensemble has no out-of-distribution gate (fused before skinfusion had one, or without its "
                    "training images): in_distribution_score is empty and only the image-level checks run; "
                    "re-run `skinfusion fuse` to fit one")

    def __init__(self, manifest: dict[str, Any], models: list, configs: list, fusion, gate: OODGate | None = None):
        self.manifest = manifest
        self.models = models
        self.configs = configs
        self.fusion = fusion
        self.gate = gate
        self.views = [c.view for c in configs]
        image_size = int(manifest["image_size"])
        # Bundles written before crops existed have no load size: no crops.
        self.preprocess = Preprocess(image_size, int(manifest.get("load_size", image_size)),
                                     tuple(BranchRecipe(c.view, c.color_constancy, c.crop_stride) for c in configs),
                                     shared_decode_margin(configs))
        self.threshold = float(manifest["threshold"])
        # Metadata fields the fusion needs next to the images (empty: images only).
        self.metadata_fields = tuple(manifest.get("metadata", ()))
        self._graph = self._compile_forward()

    @property
    def embedding_dims(self) -> list[int]:
        """Width of each branch's embedding, in member order."""
        return [int(m.get_layer(embedding_layer(m)).output.shape[-1]) for m in self.models]

    def heads(self) -> tuple[list, list]:
        """``(heads, signature)``: one functional model per branch sharing its weights, with the probability
        and the embedding as outputs (the gate costs no second pass), and the graph's input signature by view."""
        s = self.image_size
        heads = [keras.Model(m.input, [m.output, m.get_layer(embedding_layer(m)).output]) for m in self.models]
        return heads, [tf.TensorSpec([None, s, s, c.channels], tf.float32, name=c.view) for c in self.configs]

    def _compile_forward(self):
        heads, signature = self.heads()

        # training=False: BatchNorm uses its moving statistics, so an image's probability and
        # embedding do not depend on the rest of the batch.
        @tf.function(input_signature=signature)
        def forward(*xs):
            outs = [h(x, training=False) for h, x in zip(heads, xs)]
            return tf.concat([tf.reshape(p, [-1, 1]) for p, _ in outs], axis=1), tuple(e for _, e in outs)

        forward.get_concrete_function()  # trace now, not on the first prediction
        return forward

    def forward(self, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """``[P, embedding_1, ..., embedding_m]`` of the branches' view arrays, in one compiled pass."""
        P, E = self._graph(*xs)
        return [P.numpy(), *(e.numpy() for e in E)]
