"""The inference engine: a loaded ensemble that scores images in batches, with TTA, streaming from files
and the out-of-distribution gate."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

import keras

from colorspaces.crops import DIHEDRAL, dihedral
from colorspaces.pipeline import BranchRecipe, Preprocess, prepare_images
from ensemble.details import BatchScores, FileBatch, FileScoring, PredictionDetails  # noqa: F401  (re-exported)
from ensemble.ood import OODGate, embedding_layer, judge
from models.branch import branch_inputs, mean_over_windows

logger = logging.getLogger(__name__)


class Ensemble(FileScoring):
    """A loaded bundle: branch models in member order, the fusion estimator and the threshold.

    Inference decodes each image once, computes each view once, and runs all branches in
    one compiled forward pass (a ``tf.function`` with a fixed input signature, traced once
    at load time), so neither single images nor batches pay for graph retracing. Branches
    trained with sliding-window crops see each image resized to ``load_size``, as a grid of
    windows whose probabilities are averaged per branch before the fusion.

    The same pass returns each branch's penultimate embedding (``embedding_layer``), which the
    out-of-distribution ``gate`` scores (None for a bundle fused without one). With TTA the
    gate scores the un-augmented image only: it was fitted on un-augmented images, and the
    mean embedding over 8 symmetries is a different, less spread statistic. With sliding-window
    crops the embeddings are averaged over the windows, as the probabilities are.
    """

    def __init__(self, manifest: dict[str, Any], models: list, configs: list, fusion, gate: OODGate | None = None):
        self.manifest = manifest
        self.models = models
        self.configs = configs
        self.fusion = fusion
        self.gate = gate
        self._noted = False
        self.views = [c.view for c in configs]
        self.image_size = int(manifest["image_size"])
        # Bundles written before crops existed have no load size: no crops. The windows
        # themselves are cut per branch config (models.branch.branch_inputs).
        self.load_size = int(manifest.get("load_size", self.image_size))
        self.preprocess = Preprocess(self.image_size, self.load_size,
                                     tuple(BranchRecipe(c.view, c.color_constancy, c.crop_stride) for c in configs))
        self.threshold = float(manifest["threshold"])
        # Metadata fields the fusion needs next to the images (empty: images only).
        self.metadata_fields = tuple(manifest.get("metadata", ()))
        self._forward = self._compile_forward()

    @property
    def embedding_dims(self) -> list[int]:
        """Width of each branch's embedding, in member order."""
        return [int(m.get_layer(embedding_layer(m)).output.shape[-1]) for m in self.models]

    @property
    def ood_note(self) -> str | None:
        """Why this bundle has no feature-level gate (one line), or None when it has one."""
        if self.gate is not None:
            return None
        return ("this ensemble has no out-of-distribution gate (fused before skinfusion had one, or without its "
                "training images): in_distribution_score is empty and only the image-level checks run; "
                "re-run `skinfusion fuse` to fit one")

    def _compile_forward(self):
        s = self.image_size
        # One functional model per branch sharing its weights, with the probability and the
        # embedding as outputs: the gate costs no second pass.
        heads = [keras.Model(m.input, [m.output, m.get_layer(embedding_layer(m)).output]) for m in self.models]
        signature = [tf.TensorSpec([None, s, s, c.channels], tf.float32, name=c.view) for c in self.configs]

        # training=False: BatchNorm uses its moving statistics, so an image's probability and
        # embedding do not depend on the rest of the batch.
        @tf.function(input_signature=signature)
        def forward(*xs):
            outs = [h(x, training=False) for h, x in zip(heads, xs)]
            return tf.concat([tf.reshape(p, [-1, 1]) for p, _ in outs], axis=1), tuple(e for _, e in outs)

        forward.get_concrete_function()  # trace now, not on the first prediction
        return forward

    def prepare_checked(self, images: Sequence[Any]) -> tuple[np.ndarray, list[tuple[str, ...]]]:
        """``prepare`` plus the image-level OOD reasons of each image, checked before resizing.

        Raises:
            ImageError: naming the first image that cannot be read.
        """
        return prepare_images(images, self.preprocess)

    def member_outputs_batch(self, batch: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(P, embeddings)`` for RGB uint8 images at ``load_size``, in one forward pass.

        ``P`` is n × branches; ``embeddings`` holds one n × d_j array per branch. Both are
        averaged over the sliding windows of a branch trained with crops.
        """
        if len(batch) == 0:
            return np.zeros((0, len(self.models)), np.float64), [np.zeros((0, d)) for d in self.embedding_dims]
        inputs = [branch_inputs(c, batch) for c in self.configs]
        # Every branch cuts the same k windows: save_ensemble refuses branches with different crop settings.
        k = inputs[0][1]
        P, E = self._forward(*(x for x, _ in inputs))
        return (mean_over_windows(P.numpy().astype(np.float64), k),
                [mean_over_windows(e.numpy().astype(np.float64), k) for e in E])

    def member_proba_batch(self, batch: np.ndarray) -> np.ndarray:
        """``P`` (n × branches) for RGB uint8 images already at ``load_size``, in one forward pass.

        Each branch's inputs come from ``models.branch.branch_inputs``, the same preprocessing
        ``predict_images_proba`` scores a lone branch with; only the forward pass is shared.
        """
        return self.member_outputs_batch(batch)[0]

    def embed(self, images, batch_size: int = 64) -> list[np.ndarray]:
        """Per-branch embeddings (each n × d_j) of RGB uint8 images at ``load_size`` (an array or an
        array-like such as an on-disk image cache), as the gate sees them."""
        parts = [self.member_outputs_batch(np.asarray(images[np.arange(i, min(len(images), i + batch_size))]))[1]
                 for i in range(0, len(images), batch_size)]
        if not parts:
            return [np.zeros((0, d)) for d in self.embedding_dims]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(self.models))]

    def _variant_outputs(self, batch: np.ndarray, tta: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        """``P`` per variant (v × n × branches) and the un-augmented images' embeddings, in one pass."""
        if not tta or len(batch) == 0:
            P, E = self.member_outputs_batch(batch)
            return P[None], E
        variants = np.concatenate([dihedral(batch, k) for k in range(len(DIHEDRAL))])
        P, E = self.member_outputs_batch(variants)
        # Variant 0 is the identity: the first len(batch) rows are the images as given.
        return P.reshape(len(DIHEDRAL), len(batch), -1), [e[: len(batch)] for e in E]

    def _variant_proba(self, batch: np.ndarray, tta: bool) -> np.ndarray:
        """``P`` per variant (v × n × branches): the images alone, or under the 8 symmetries in one pass."""
        return self._variant_outputs(batch, tta)[0]

    def score_batch(self, batch: np.ndarray, tta: bool = False, meta=None) -> tuple[np.ndarray, np.ndarray]:
        """``(P, fused)`` for RGB uint8 images at the bundle's size (``meta``: see ``fuse``).

        With ``tta``, each image is scored under the 8 rotations and flips of the square (the
        transformations training augments with) in one forward pass; ``fused`` is the mean of
        the 8 fused probabilities and ``P`` the mean member matrix.
        """
        # Not through score_details: the OOD gate's verdict would be computed and thrown away.
        Ps, _ = self._variant_outputs(batch, tta)
        return Ps.mean(axis=0), self._fused(Ps, meta, len(batch))

    def _fused(self, Ps: np.ndarray, meta, n: int) -> np.ndarray:
        """The fused probability of each image, averaged over the TTA variants in ``Ps``."""
        return np.mean([self.fuse(P, meta) for P in Ps], axis=0) if n else np.zeros(0, np.float64)

    def score_details(self, batch: np.ndarray, tta: bool = False, meta=None,
                      reasons: Sequence[tuple[str, ...]] | None = None) -> BatchScores:
        """``score_batch`` plus the out-of-distribution verdict, from the same forward pass.

        Args:
            batch: RGB uint8 images at ``load_size``.
            tta, meta: as for ``score_batch`` (the gate scores the un-augmented images).
            reasons: the image-level check results of the original images
                (``colorspaces.quality.image_checks``, as ``prepare_checked`` returns them);
                None: not checked.
        """
        Ps, E = self._variant_outputs(batch, tta)
        fused = self._fused(Ps, meta, len(batch))
        ood = judge(self.gate, E, list(reasons) if reasons is not None else [()] * len(batch))
        return BatchScores(Ps.mean(axis=0), fused, ood)

    def member_proba(self, images: Sequence[Any], batch_size: int = 64, tta: bool = False) -> np.ndarray:
        """Per-branch melanoma probabilities ``P`` (n × branches), decoding ``batch_size`` images at a time.

        No fusion runs, so a bundle fused with metadata needs none here.
        """
        parts = [self._variant_proba(self.prepare(images[i : i + batch_size]), tta).mean(axis=0)
                 for i in range(0, len(images), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.models)), np.float64)

    @property
    def known_sites(self) -> list[str] | None:
        """The body sites a metadata fusion was fitted on (others count as unknown); None without site metadata."""
        return getattr(getattr(self.fusion, "encoder_", None), "sites_", None)

    def fuse(self, P: np.ndarray, meta=None) -> np.ndarray:
        """Fused melanoma probabilities for a member-probability matrix.

        Args:
            P: member probabilities (n × branches).
            meta: for a bundle fused with metadata (``metadata_fields``), one dict per row
                with those fields (missing keys or ``None`` mean unknown); ignored otherwise.

        Raises:
            ValueError: if the bundle needs metadata and ``meta`` is None or the wrong length.
        """
        if len(P) == 0:
            return np.zeros(0, np.float64)
        if self.metadata_fields:
            return self.fusion.predict_proba(P, meta)[:, 1]
        return self.fusion.predict_proba(P)[:, 1]

    def predict_proba(self, images: Sequence[Any], batch_size: int = 64, tta: bool = False,
                      metadata: Sequence[dict | None] | None = None) -> np.ndarray:
        """Fused melanoma probabilities, one per image, in input order (``tta``: see ``score_batch``,
        ``metadata``: one dict per image, see ``fuse``)."""
        if metadata is not None and len(metadata) != len(images):
            raise ValueError(f"got {len(metadata)} metadata entries for {len(images)} images")
        parts = [self.score_batch(self.prepare(images[i : i + batch_size]), tta,
                                  None if metadata is None else metadata[i : i + batch_size])[1]
                 for i in range(0, len(images), batch_size)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float64)

    def details(self, images: Sequence[Any], batch_size: int = 64, tta: bool = False,
                metadata: Sequence[dict | None] | None = None) -> list[PredictionDetails]:
        """Everything known about each image: probabilities, decision and OOD verdict, in input order.

        Args:
            images: paths, RGB uint8 arrays or PIL images.
            batch_size, tta, metadata: as for ``predict_proba``.

        Raises:
            colorspaces.ImageError: naming the first image that cannot be read.
            ValueError: if the bundle needs metadata and it is missing or the wrong length.
        """
        if metadata is not None and len(metadata) != len(images):
            raise ValueError(f"got {len(metadata)} metadata entries for {len(images)} images")
        if self.gate is None and not self._noted:
            logger.warning("%s", self.ood_note)
            self._noted = True
        out = []
        for i in range(0, len(images), batch_size):
            batch, reasons = self.prepare_checked(images[i : i + batch_size])
            s = self.score_details(batch, tta, None if metadata is None else metadata[i : i + batch_size], reasons)
            out += [s.row(j, self.views, self.threshold) for j in range(len(batch))]
        return out

