"""AUC per subgroup of patients (age band, sex, anatomical site) on the fused probability.

A headline AUC can hide a subgroup the model serves badly (young patients, acral sites); this
breaks it down on the records' metadata. Values are read as metadata fusion reads them
(``ensemble.metadata``): a blank cell, a spelling of unknown ("NA", "unknown") and an age or sex
that cannot be read all make the group "unknown". Every named site is its own group here, even one
the fusion folds into unknown for being rare: a subgroup too small to score says so itself.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from colorspaces.files import atomic_open
from ensemble.metadata import (
    SEXES,
    clean_age,
    clean_text,
    describe_unreadable,
    unreadable_values,
)
from ensemble.metrics import roc_auc_ci
from skinfusion.data.index import Record

logger = logging.getLogger(__name__)

FIELDS = ("age", "sex", "site")
UNKNOWN = "unknown"
# Below 10 melanomas or 10 nevi an AUC is not reported: with 10 of each, an AUC of 0.80 has a
# standard error of about 0.10 (Hanley & McNeil), a 95% CI of about 0.60-1.00, already 0.4 wide;
# with 5 of each it is about 0.51-1.00, which reaches chance, and bootstrap resamples start to
# miss a class altogether. A number that cannot be read is shown as "too few", never printed.
MIN_PER_CLASS = 10
# 15-year bands from 30 to 75. HAM10000 and the ISIC archive give age in steps of 5 years, so
# every edge is one of those steps and a recorded 45 falls unambiguously in 45-59; under 30 and
# 75 and over are pooled because melanoma is rare in the young and few patients are very old.
# The labels are ASCII so they survive any console or spreadsheet encoding.
AGE_EDGES = (30, 45, 60, 75)
AGE_BANDS = ("<30", "30-44", "45-59", "60-74", "75+")
SUBGROUP_COLUMNS = ("field", "group", "n", "n_melanoma", "n_nevus", "auc", "auc_ci95_low", "auc_ci95_high", "note")


def age_band(value: Any) -> str:
    """The band of an age as written (``"45"``, ``45.0``), or ``"unknown"`` when unreadable."""
    age = clean_age(value)
    if age is None:
        return UNKNOWN
    return AGE_BANDS[int(np.searchsorted(AGE_EDGES, age, side="right"))]


def sex_group(value: Any) -> str:
    """``"female"``, ``"male"`` or ``"unknown"`` (any other spelling, as metadata fusion reads it)."""
    sex = clean_text(value)
    return sex if sex in SEXES else UNKNOWN


def site_group(value: Any) -> str:
    """The anatomical site in lower case, or ``"unknown"``."""
    return clean_text(value) or UNKNOWN


_GROUPERS = {"age": age_band, "sex": sex_group, "site": site_group}


def _order(field: str, groups: set[str]) -> list[str]:
    """Age bands in age order, sexes and sites alphabetically; ``unknown`` last."""
    known = groups - {UNKNOWN}
    ordered = [b for b in AGE_BANDS if b in known] if field == "age" else sorted(known)
    return ordered + ([UNKNOWN] if UNKNOWN in groups else [])


def too_few(n_melanoma: int, n_nevus: int, minimum: int = MIN_PER_CLASS) -> str:
    """Why a group's AUC is not reported (``"too few melanomas (n=3)"``), or ``""`` when it is."""
    short = [f"too few {name} (n={k})" for name, k in (("melanomas", n_melanoma), ("nevi", n_nevus)) if k < minimum]
    return "; ".join(short)


def one_class_note(n_melanoma: int, n_nevus: int) -> str:
    """Why a group has no melanoma-vs-nevus AUC because it lacks a class (``"nevi only: AUC undefined;
    specificity shown"``), or ``""`` when it has both."""
    if n_melanoma and n_nevus:
        return ""
    if not n_melanoma and not n_nevus:
        return "no images"
    return ("nevi only: AUC undefined; specificity shown" if n_nevus
            else "melanomas only: AUC undefined; sensitivity shown")


def auc_row(y: np.ndarray, proba: np.ndarray, n_boot: int, minimum: int = MIN_PER_CLASS) -> dict[str, Any]:
    """``{n, n_melanoma, n_nevus, auc, auc_ci95, note}`` of one group; AUC and CI are NaN, and
    ``note`` says why, when the group has fewer than ``minimum`` of either class."""
    y = np.asarray(y).astype(int)
    n_mel = int(y.sum())
    n_nev = int(len(y) - n_mel)
    note = too_few(n_mel, n_nev, minimum)
    auc, lo, hi = (math.nan,) * 3 if note else roc_auc_ci(y, proba, n_boot=n_boot)
    return {"n": len(y), "n_melanoma": n_mel, "n_nevus": n_nev, "auc": auc, "auc_ci95": [lo, hi], "note": note}


def subgroup_report(y: Sequence[int], proba: Sequence[float], meta: Sequence[Mapping[str, Any]],
                    n_boot: int = 1000, minimum: int = MIN_PER_CLASS) -> dict[str, Any]:
    """AUC (95% bootstrap CI) of ``proba`` per age band, sex and site.

    Args:
        y: labels, 1 = melanoma.
        proba: melanoma probabilities (the fused ones).
        meta: one ``{"age", "sex", "site"}`` dict per image, values as the dataset wrote them.
        n_boot: bootstrap resamples per AUC.
        minimum: fewest melanomas and fewest nevi a group needs for its AUC to be reported.

    Returns:
        ``{"min_per_class": minimum, "groups": {field: {group: auc_row}}}``; a field none of the
        images records is ``{}``; unknown values make the group ``"unknown"``.
    """
    y, proba = np.asarray(y).astype(int), np.asarray(proba, dtype=np.float64)
    if not len(y) == len(proba) == len(meta):
        raise ValueError(f"subgroup_report: {len(y)} labels, {len(proba)} probabilities, {len(meta)} metadata rows")
    # A filled-in value that cannot be read ("F", "sixty") lands in "unknown": say so, or a
    # dataset that spells sex "F"/"M" would show one big unknown group for no visible reason.
    for message in describe_unreadable(unreadable_values(list(meta), ("age", "sex"))):
        logger.warning("subgroups: %s", message)
    groups: dict[str, dict[str, Any]] = {}
    for field in FIELDS:
        labels = np.array([_GROUPERS[field](m.get(field)) for m in meta], dtype=object)
        if not (labels != UNKNOWN).any():
            groups[field] = {}  # the dataset does not record it: one "unknown" row would repeat the total
            continue
        groups[field] = {g: auc_row(y[labels == g], proba[labels == g], n_boot, minimum)
                         for g in _order(field, set(labels))}
    return {"min_per_class": minimum, "groups": groups}


def records_subgroups(records: Sequence[Record], fused: np.ndarray, n_boot: int) -> dict[str, Any]:
    """``subgroup_report`` of scored records and their fused probabilities, its time logged."""
    t0 = time.perf_counter()
    report = subgroup_report([r.label for r in records], fused, [r.metadata() for r in records], n_boot)
    rows = [r for groups in report["groups"].values() for r in groups.values()]
    logger.info("AUC per subgroup: %d groups, %d with too few melanomas or nevi to score (%.0fs)",
                len(rows), sum(bool(r["note"]) for r in rows), time.perf_counter() - t0)
    return report


def _num(v: float) -> str:
    return "" if v is None or math.isnan(v) else f"{v:.4f}"


def write_subgroups_csv(path: str | os.PathLike, report: Mapping[str, Any]) -> None:
    """Write ``subgroup_report`` as CSV (``SUBGROUP_COLUMNS``); an unreported AUC is an empty cell."""
    with atomic_open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")  # quotes a site such as "head, neck"
        w.writerow(SUBGROUP_COLUMNS)
        for field, rows in report["groups"].items():
            for group, r in rows.items():
                w.writerow([field, group, r["n"], r["n_melanoma"], r["n_nevus"], _num(r["auc"]),
                            _num(r["auc_ci95"][0]), _num(r["auc_ci95"][1]), r["note"]])
