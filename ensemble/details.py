"""What scoring returns, as plain dataclasses: no TensorFlow here, so the Keras engine
(``ensemble.engine``) and the exported runtime (``ensemble.runtime``) return the same types."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np

from colorspaces import ImageError
from colorspaces.labels import LABEL_NAMES
from colorspaces.pipeline import Preprocess, prepare_image, prepare_images
from ensemble.ood import OODScores


@dataclasses.dataclass
class FileBatch:
    """One streamed batch of ``Ensemble.iter_files``; ``ood`` is the gate's verdict on ``paths``."""

    paths: list[str]
    P: np.ndarray
    fused: np.ndarray
    failures: list[tuple[str, str]]
    ood: OODScores | None = None


@dataclasses.dataclass(frozen=True)
class BatchScores:
    """What ``Ensemble.score_details`` returns: ``P`` (n × branches), the fused probabilities and the OOD verdict."""

    P: np.ndarray
    fused: np.ndarray
    ood: OODScores

    def row(self, j: int, views: Sequence[str], threshold: float) -> PredictionDetails:
        """Image ``j`` as a ``PredictionDetails``."""
        idx, flag, dist = (float(v[j]) for v in (self.ood.in_distribution_score, self.ood.out_of_distribution,
                                                 self.ood.distance))
        return PredictionDetails(
            melanoma_probability=float(self.fused[j]),
            branch_probabilities={v: float(p) for v, p in zip(views, self.P[j])},
            decision=LABEL_NAMES[int(self.fused[j] >= threshold)],
            in_distribution_score=None if np.isnan(idx) else idx,
            out_of_distribution=None if np.isnan(flag) else bool(flag),
            ood_reasons=list(self.ood.reasons[j]),
            ood_distance=None if np.isnan(dist) else dist)


@dataclasses.dataclass(frozen=True)
class PredictionDetails:
    """One image's prediction with the out-of-distribution verdict (``predict_details``).

    Attributes:
        melanoma_probability: the fused probability, as ``predict`` returns it.
        branch_probabilities: each branch's probability, by view.
        decision: "melanoma" or "nevus" at the bundle's validation threshold (also given for an
            out-of-distribution image, where it should not be trusted).
        in_distribution_score: the fraction of in-distribution validation images at least as
            atypical (1 = most typical, 0 = beyond them all or failing an image-level check);
            None for a bundle without a gate.
        out_of_distribution: True if an image-level check failed or the feature score is above
            the gate's threshold; None when unknown (no gate and no failed check).
        ood_reasons: failed image-level checks (``colorspaces.quality.REASONS``) and
            ``atypical_features`` when the gate flagged the image.
        ood_distance: the gate's combined feature score (higher = less typical), or None.
    """

    melanoma_probability: float
    branch_probabilities: dict[str, float]
    decision: str
    in_distribution_score: float | None
    out_of_distribution: bool | None
    ood_reasons: list[str]
    ood_distance: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


class FileScoring:
    """Reads images (``prepare``) and streams files through ``score_details``: shared by the Keras ``Ensemble`` and ``ExportedEnsemble``.

    The class using it provides ``preprocess``, ``metadata_fields`` and ``score_details``.
    """

    preprocess: Preprocess
    metadata_fields: list[str] | None

    def prepare(self, images: Sequence[Any]) -> np.ndarray:
        """Read and resize images into one RGB uint8 batch (N, L, L, 3), L = ``load_size``.

        Raises:
            ImageError: naming the first image that cannot be read.
        """
        return prepare_images(images, self.preprocess)[0]

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
