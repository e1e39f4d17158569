"""The one inference engine: batching, test-time augmentation, fusion and the OOD gate over any backend.

``ScoringEngine`` owns everything between images and answers; a backend (the Keras ``Ensemble`` in
``ensemble.engine``, the ONNX/TFLite ``ExportedEnsemble`` in ``ensemble.runtime``) supplies only
its forward pass, view arrays in and member probabilities plus embeddings out, as scikit-learn's
``_BaseVoting`` does for its two voting classes. No TensorFlow here.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np

from colorspaces import ImageError
from colorspaces.crops import DIHEDRAL, dihedral
from colorspaces.interrupts import deferred_sigint
from colorspaces.pipeline import Preprocess, mean_over_windows, prepare_image, prepare_images
from ensemble.details import BatchScores, FileBatch, PredictionDetails
from ensemble.ood import OODGate, judge

logger = logging.getLogger(__name__)
_POOL_LOCK = threading.Lock()


class ScoringEngine:
    """A loaded bundle that scores images; subclasses provide the forward pass and the attributes below.

    Attributes (set by the backend):
        views: the branches' views, in member order.
        threshold: the decision threshold chosen on validation data.
        preprocess: the bundle's ``colorspaces.pipeline.Preprocess``.
        metadata_fields: metadata the fusion needs next to the images (empty: images only).
        fusion: the fusion; ``predict_proba(P, meta)`` gives (n, 2) and ``known_sites`` the sites it knows.
        gate: the feature-level ``OODGate``, or None.
        embedding_dims: width of each branch's embedding.
        no_gate_note: the one-line warning for a bundle without a gate.
        pipeline_rows: images per forward call when a large batch is split so that the views of
            the next chunk are computed while the graph runs (0: never split).

    Inference decodes each image once (``colorspaces.pipeline.prepare_image``), computes each view
    once and runs all branches in one forward pass. Branches trained with sliding-window crops see
    each image resized to ``load_size``, as a grid of windows whose probabilities and embeddings are
    averaged per branch before the fusion. The gate scores the un-augmented images only: it was
    fitted on un-augmented images, and the mean embedding over 8 symmetries is a less spread statistic.
    """

    views: list[str]
    threshold: float
    preprocess: Preprocess
    metadata_fields: Sequence[str]
    gate: OODGate | None
    embedding_dims: list[int]
    no_gate_note = "this bundle has no out-of-distribution gate: only the image-level checks run"
    pipeline_rows = 0
    _noted = False
    _pool: ThreadPoolExecutor | None = None

    def forward(self, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The backend's forward pass: one view array per branch → ``[P, embedding_1, ..., embedding_m]``."""
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        """The branches' input side."""
        return self.preprocess.image_size

    @property
    def load_size(self) -> int:
        """The side images are resized to before windows and views."""
        return self.preprocess.load_size

    @property
    def ood_note(self) -> str | None:
        """Why this bundle has no feature-level gate (one line), or None when it has one."""
        return None if self.gate is not None else self.no_gate_note

    @property
    def known_sites(self) -> list[str] | None:
        """The body sites a metadata fusion was fitted on (others count as unknown); None without site metadata."""
        return self.fusion.known_sites

    # ---------------------------------------------------------------- forward pass, batched
    def member_outputs_batch(self, batch: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(P, embeddings)`` for RGB uint8 images at ``load_size``: P is n × branches, one n × d_j
        embedding per branch, both averaged over the sliding windows of branches trained with crops.

        Ctrl-C during the forward pass is delivered when it returns (``deferred_sigint``): raised
        inside TensorFlow's C++ callbacks it can come out as another error with a printed traceback.
        """
        if len(batch) == 0:
            return np.zeros((0, len(self.views)), np.float64), [np.zeros((0, d)) for d in self.embedding_dims]
        with deferred_sigint():
            return self._member_outputs(batch)

    def _member_outputs(self, batch: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """``member_outputs_batch`` of a non-empty batch, split into pipelined chunks when it is large."""
        rows = self.pipeline_rows
        if not rows or len(batch) < 2 * rows:
            xs, k = self._view_inputs(batch)
            return self._window_mean(self.forward(xs), k)
        if self._pool is None:
            with _POOL_LOCK:
                self._pool = self._pool or ThreadPoolExecutor(max_workers=1, thread_name_prefix="skinfusion-graph")
        jobs = []
        for i in range(0, len(batch), rows):  # the views of the next chunk are computed while the graph runs
            xs, k = self._view_inputs(batch[i : i + rows])
            jobs.append((k, self._pool.submit(self.forward, xs)))
        parts = [self._window_mean(job.result(), k) for k, job in jobs]
        return np.concatenate([P for P, _ in parts]), [np.concatenate(e) for e in zip(*(E for _, E in parts))]

    def _view_inputs(self, batch: np.ndarray) -> tuple[list[np.ndarray], int]:
        inputs = self.preprocess.branch_inputs(batch)
        # Every branch cuts the same k windows: bundles with different crop settings are refused on save.
        return [x for x, _ in inputs], inputs[0][1]

    @staticmethod
    def _window_mean(outputs: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, list[np.ndarray]]:
        P, *E = (np.asarray(o, np.float64) for o in outputs)
        if k == 1:  # one window per image: nothing to average
            return P, E
        return mean_over_windows(P, k), [mean_over_windows(e, k) for e in E]

    def member_proba_batch(self, batch: np.ndarray) -> np.ndarray:
        """``P`` (n × branches) for RGB uint8 images already at ``load_size``, in one forward pass."""
        return self.member_outputs_batch(batch)[0]

    def embed(self, images, batch_size: int = 64) -> list[np.ndarray]:
        """Per-branch embeddings (each n × d_j) of RGB uint8 images at ``load_size`` (an array or an
        array-like such as an on-disk image cache), as the gate sees them."""
        parts = [self.member_outputs_batch(np.asarray(images[np.arange(i, min(len(images), i + batch_size))]))[1]
                 for i in range(0, len(images), batch_size)]
        if not parts:
            return [np.zeros((0, d)) for d in self.embedding_dims]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(self.views))]

    # ---------------------------------------------------------------- TTA, fusion, gate
    def _variant_outputs(self, batch: np.ndarray, tta: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        """``P`` per variant (v × n × branches) and the un-augmented images' embeddings, in one pass."""
        if not tta or len(batch) == 0:
            P, E = self.member_outputs_batch(batch)
            return P[None], E
        P, E = self.member_outputs_batch(np.concatenate([dihedral(batch, k) for k in range(len(DIHEDRAL))]))
        # Variant 0 is the identity: the first len(batch) rows are the images as given.
        return P.reshape(len(DIHEDRAL), len(batch), -1), [e[: len(batch)] for e in E]

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
        return self.fusion.predict_proba(P, meta if self.metadata_fields else None)[:, 1]

    def _fused(self, Ps: np.ndarray, meta) -> np.ndarray:
        """The fused probability of each image, averaged over the TTA variants in ``Ps``."""
        return self.fuse(Ps[0], meta) if len(Ps) == 1 else np.mean([self.fuse(P, meta) for P in Ps], axis=0)

    def score_batch(self, batch: np.ndarray, tta: bool = False, meta=None) -> tuple[np.ndarray, np.ndarray]:
        """``(P, fused)`` for RGB uint8 images at ``load_size`` (``meta``: see ``fuse``).

        With ``tta``, each image is scored under the 8 rotations and flips of the square (the
        transformations training augments with) in one forward pass; ``fused`` is the mean of
        the 8 fused probabilities and ``P`` the mean member matrix. The OOD gate does not run.
        """
        Ps, _ = self._variant_outputs(batch, tta)
        return Ps.mean(axis=0), self._fused(Ps, meta)

    def score_details(self, batch: np.ndarray, tta: bool = False, meta=None,
                      reasons: Sequence[tuple[str, ...]] | None = None) -> BatchScores:
        """``score_batch`` plus the out-of-distribution verdict, from the same forward pass.

        Args:
            batch: RGB uint8 images at ``load_size``.
            tta, meta: as for ``score_batch`` (the gate scores the un-augmented images).
            reasons: the image-level checks of the original images (as ``prepare_checked``
                returns them); None: not checked.
        """
        Ps, E = self._variant_outputs(batch, tta)
        ood = judge(self.gate, E, list(reasons) if reasons is not None else [()] * len(batch))
        return BatchScores(Ps.mean(axis=0), self._fused(Ps, meta), ood)

    # ---------------------------------------------------------------- images in, answers out
    def prepare(self, images: Sequence[Any]) -> np.ndarray:
        """Read and resize images into one RGB uint8 batch (N, L, L, 3), L = ``load_size``.

        Raises:
            ImageError: naming the first image that cannot be read.
        """
        return prepare_images(images, self.preprocess)[0]

    def prepare_checked(self, images: Sequence[Any]) -> tuple[np.ndarray, list[tuple[str, ...]]]:
        """``prepare`` plus the image-level OOD reasons of each image, checked before resizing.

        Raises:
            ImageError: naming the first image that cannot be read.
        """
        return prepare_images(images, self.preprocess)

    @staticmethod
    def _batches(images: Sequence[Any], batch_size: int, metadata) -> list[tuple[Sequence[Any], Any]]:
        """``(images, metadata)`` chunks of ``batch_size``, after checking that the lengths agree."""
        if metadata is not None and len(metadata) != len(images):
            raise ValueError(f"got {len(metadata)} metadata entries for {len(images)} images")
        return [(images[i : i + batch_size], None if metadata is None else metadata[i : i + batch_size])
                for i in range(0, len(images), batch_size)]

    def member_proba(self, images: Sequence[Any], batch_size: int = 64, tta: bool = False) -> np.ndarray:
        """Per-branch melanoma probabilities ``P`` (n × branches), decoding ``batch_size`` images at a time.

        No fusion runs, so a bundle fused with metadata needs none here.
        """
        parts = [self._variant_outputs(self.prepare(chunk), tta)[0].mean(axis=0)
                 for chunk, _ in self._batches(images, batch_size, None)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.views)), np.float64)

    def predict_proba(self, images: Sequence[Any], batch_size: int = 64, tta: bool = False,
                      metadata: Sequence[dict | None] | None = None) -> np.ndarray:
        """Fused melanoma probabilities, one per image, in input order (``tta``: see ``score_batch``,
        ``metadata``: one dict per image, see ``fuse``)."""
        parts = [self.score_batch(self.prepare(chunk), tta, meta)[1]
                 for chunk, meta in self._batches(images, batch_size, metadata)]
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
        batches = self._batches(images, batch_size, metadata)
        if self.gate is None and not self._noted:
            logger.warning("%s", self.ood_note)
            self._noted = True
        out = []
        for chunk, meta in batches:
            batch, reasons = self.prepare_checked(chunk)
            s = self.score_details(batch, tta, meta, reasons)
            out += [s.row(j, self.views, self.threshold) for j in range(len(batch))]
        return out

    def _load_file(self, path: str):
        try:
            return *prepare_image(path, self.preprocess), None
        except ImageError as exc:
            return None, (), str(exc)

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
                ok, imgs, reasons, failures = [], [], [], []
                for path, fut in zip(chunk, current):
                    img, why, err = fut.result()
                    if err is None:
                        ok.append(path)
                        imgs.append(img)
                        reasons.append(why)
                    else:
                        failures.append((path, err))
                meta = [(metadata or {}).get(p) for p in ok] if self.metadata_fields else None
                batch = np.stack(imgs) if imgs else self.preprocess.empty_batch()
                s = self.score_details(batch, tta, meta, reasons)
                yield FileBatch(ok, s.P, s.fused, failures, s.ood)
