"""The inference engine: a loaded ensemble that scores images in batches, with TTA and streaming from files."""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow as tf

from colorspaces import ImageError, read_image, resize_image
from colorspaces.crops import DIHEDRAL, dihedral
from models.branch import branch_inputs, mean_over_windows

logger = logging.getLogger(__name__)


class Ensemble:
    """A loaded bundle: branch models in member order, the fusion estimator and the threshold.

    Inference decodes each image once, computes each view once, and runs all branches in
    one compiled forward pass (a ``tf.function`` with a fixed input signature, traced once
    at load time), so neither single images nor batches pay for graph retracing. Branches
    trained with sliding-window crops see each image resized to ``load_size``, as a grid of
    windows whose probabilities are averaged per branch before the fusion.
    """

    def __init__(self, manifest: dict[str, Any], models: list, configs: list, fusion):
        self.manifest = manifest
        self.models = models
        self.configs = configs
        self.fusion = fusion
        self.views = [c.view for c in configs]
        self.image_size = int(manifest["image_size"])
        # Bundles written before crops existed have no load size: no crops. The windows
        # themselves are cut per branch config (models.branch.branch_inputs).
        self.load_size = int(manifest.get("load_size", self.image_size))
        self.threshold = float(manifest["threshold"])
        # Metadata fields the fusion needs next to the images (empty: images only).
        self.metadata_fields = tuple(manifest.get("metadata", ()))
        self._forward = self._compile_forward()

    def _compile_forward(self):
        models, s = self.models, self.image_size
        signature = [tf.TensorSpec([None, s, s, c.channels], tf.float32, name=c.view) for c in self.configs]

        # training=False: BatchNorm uses its moving statistics, so an image's probability
        # does not depend on the rest of the batch.
        @tf.function(input_signature=signature)
        def forward(*xs):
            return tf.concat([tf.reshape(m(x, training=False), [-1, 1]) for m, x in zip(models, xs)], axis=1)

        forward.get_concrete_function()  # trace now, not on the first prediction
        return forward

    def prepare(self, images: Sequence[Any]) -> np.ndarray:
        """Read and resize images into one RGB uint8 batch (N, L, L, 3), L = ``load_size``.

        Raises:
            ImageError: naming the first image that cannot be read.
        """
        if len(images) == 0:
            return np.zeros((0, self.load_size, self.load_size, 3), np.uint8)
        return np.stack([resize_image(read_image(img), self.load_size) for img in images])

    def member_proba_batch(self, batch: np.ndarray) -> np.ndarray:
        """``P`` (n × branches) for RGB uint8 images already at ``load_size``, in one forward pass.

        Each branch's inputs come from ``models.branch.branch_inputs``, the same preprocessing
        ``predict_images_proba`` scores a lone branch with; only the forward pass is shared.
        """
        if len(batch) == 0:
            return np.zeros((0, len(self.models)), np.float64)
        inputs = [branch_inputs(c, batch) for c in self.configs]
        # Every branch cuts the same k windows: save_ensemble refuses branches with different crop settings.
        k = inputs[0][1]
        P = self._forward(*(x for x, _ in inputs)).numpy().astype(np.float64)
        return mean_over_windows(P, k)

    def _variant_proba(self, batch: np.ndarray, tta: bool) -> np.ndarray:
        """``P`` per variant (v × n × branches): the images alone, or under the 8 symmetries in one pass."""
        if not tta or len(batch) == 0:
            return self.member_proba_batch(batch)[None]
        variants = np.concatenate([dihedral(batch, k) for k in range(len(DIHEDRAL))])
        return self.member_proba_batch(variants).reshape(len(DIHEDRAL), len(batch), -1)

    def score_batch(self, batch: np.ndarray, tta: bool = False, meta=None) -> tuple[np.ndarray, np.ndarray]:
        """``(P, fused)`` for RGB uint8 images at the bundle's size (``meta``: see ``fuse``).

        With ``tta``, each image is scored under the 8 rotations and flips of the square (the
        transformations training augments with) in one forward pass; ``fused`` is the mean of
        the 8 fused probabilities and ``P`` the mean member matrix.
        """
        Ps = self._variant_proba(batch, tta)
        return Ps.mean(axis=0), np.mean([self.fuse(P, meta) for P in Ps], axis=0)

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

    def _load_file(self, path: str):
        try:
            return resize_image(read_image(path), self.load_size), None
        except ImageError as exc:
            return None, str(exc)

    def iter_files(self, paths: Sequence[str], batch_size: int = 64, workers: int = 2,
                   tta: bool = False, metadata: dict[str, dict] | None = None) -> Iterator[FileBatch]:
        """Score image files in streamed batches; unreadable files are reported, not raised.

        While one batch runs through the branches, ``workers`` threads decode the next one,
        so memory holds two batches whatever the number of files.

        Args:
            paths: image files, scored in this order.
            batch_size: images per batch.
            workers: decoding threads (OpenCV releases the GIL while decoding).
            tta: average over the 8 rotations and flips (see ``score_batch``).
            metadata: path → metadata dict, for a bundle fused with metadata (a path it
                lacks is scored with every field unknown).

        Yields:
            One ``FileBatch`` per batch of ``paths``: the readable paths, their ``P`` and
            fused probabilities, and ``(path, reason)`` for the files that were skipped.
        """
        chunks = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            pending = [pool.submit(self._load_file, p) for p in chunks[0]] if chunks else []
            for ci, chunk in enumerate(chunks):
                current = pending
                pending = [pool.submit(self._load_file, p) for p in chunks[ci + 1]] if ci + 1 < len(chunks) else []
                ok, imgs, failures = [], [], []
                for path, fut in zip(chunk, current):
                    img, err = fut.result()
                    if err is None:
                        ok.append(path)
                        imgs.append(img)
                    else:
                        failures.append((path, err))
                meta = [(metadata or {}).get(p) for p in ok] if self.metadata_fields else None
                P, fused = self.score_batch(np.stack(imgs) if imgs else np.zeros((0, 1, 1, 3), np.uint8), tta, meta)
                yield FileBatch(ok, P, fused, failures)


@dataclasses.dataclass
class FileBatch:
    """One streamed batch of ``Ensemble.iter_files``."""

    paths: list[str]
    P: np.ndarray
    fused: np.ndarray
    failures: list[tuple[str, str]]


