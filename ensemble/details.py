"""What scoring returns, as plain dataclasses: no TensorFlow here, so the Keras engine
(``ensemble.engine``) and the exported runtime (``ensemble.runtime``) return the same types."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from colorspaces.labels import LABEL_NAMES
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
            # A flagged image gets no decision: the refusal is the answer (the probability stays, raw).
            decision=None if flag == 1.0 else LABEL_NAMES[int(self.fused[j] >= threshold)],
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
        decision: "melanoma" or "nevus" at the bundle's validation threshold; None for an image
            flagged out of distribution (its ``melanoma_probability`` is then the raw output, not to trust).
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
    decision: str | None
    in_distribution_score: float | None
    out_of_distribution: bool | None
    ood_reasons: list[str]
    ood_distance: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)
