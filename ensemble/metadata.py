"""Per-image metadata (age, sex, anatomical site) as extra stacking features.

Each field is encoded with an explicit "unknown" state, so an image without that field
(a source that never records site, a patient of unknown sex) is scored, not rejected; the
stacker learns what unknown means on its fitting data. A value must be known to the
encoder to count: an unseen site is treated as unknown.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

METADATA_FIELDS = ("age", "sex", "site")
# Sites seen fewer times than this in the fitting data are folded into "unknown": a one-hot
# column fitted on a handful of images is noise the stacker would overfit.
MIN_SITE_COUNT = 10
_UNKNOWN = {"", "unknown", "nan", "none", "na", "n/a"}
SEXES = ("male", "female")
#: What a value of each field must look like to be read; named when one is not.
FIELD_FORMATS = {"age": "a number of years from 0 to 120", "sex": "male or female (any case)",
                 "site": "an anatomical site"}
_EXAMPLES = 3


def parse_fields(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """Turn ``"age,sex"`` (or a sequence) into a validated tuple of field names; ``None``/``""`` → ``()``.

    Raises:
        ValueError: naming an unknown or repeated field.
    """
    if not spec:
        return ()
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [n for n in names if n not in METADATA_FIELDS]
    if bad:
        raise ValueError(f"unknown metadata field(s) {bad}; choose from {list(METADATA_FIELDS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"metadata fields repeat: {names}")
    return tuple(names)


def clean_age(value: Any) -> float | None:
    """Age in years as a float, or ``None`` when missing, unparseable or outside 0–120."""
    if value is None:
        return None
    try:
        age = float(str(value).strip())
    except ValueError:
        return None
    return age if math.isfinite(age) and 0.0 <= age <= 120.0 else None


def clean_text(value: Any) -> str:
    """A lower-case category, ``""`` for any spelling of unknown."""
    text = "" if value is None else str(value).strip().lower()
    return "" if text in _UNKNOWN else text


def unreadable_values(meta: Sequence[Mapping[str, Any] | None], fields: Sequence[str],
                      sites: Sequence[str] | None = None) -> dict[str, list[str]]:
    """The filled-in values that are nevertheless encoded as unknown, per field.

    A blank cell or a spelling of unknown ("unknown", "NA", ...) is unknown on purpose and is not
    listed. Listed are: an age that is not a number of years in 0–120 ("sixty", "-1"), a sex
    other than male/female ("F"), and, when ``sites`` is given, a site outside it (a site the
    fusion never saw, or saw too rarely). This only reports; ``MetadataEncoder`` encodes the
    same values exactly as before.

    Args:
        meta: one metadata dict per image (``None`` = every field unknown).
        fields: the fields to check.
        sites: the sites the fusion knows (``MetadataEncoder.sites_``); ``None`` skips that check.

    Returns:
        ``{field: [raw value, ...]}`` in input order, for the fields with at least one.
    """
    out: dict[str, list[str]] = {}
    for m in _checked(meta):
        for f in fields:
            raw = m.get(f)
            text = clean_text(raw)
            if not text:
                continue
            bad = (clean_age(raw) is None if f == "age" else text not in SEXES if f == "sex"
                   else sites is not None and text not in sites)
            if bad:
                out.setdefault(f, []).append(str(raw).strip())
    return out


def describe_unreadable(unreadable: Mapping[str, Sequence[str]], sites: Sequence[str] | None = None) -> list[str]:
    """One message per field of ``unreadable_values``: the count, a few examples and what is expected."""
    messages = []
    for f, values in unreadable.items():
        distinct = list(dict.fromkeys(values))
        shown = ", ".join(repr(v) for v in distinct[:_EXAMPLES]) + (", ..." if len(distinct) > _EXAMPLES else "")
        expected = (f"one of the sites the fusion was fitted on ({', '.join(sites) or 'none'})"
                    if f == "site" and sites is not None else FIELD_FORMATS[f])
        messages.append(f"{f}: {len(values)} value{'s' if len(values) != 1 else ''} not understood ({shown}), "
                        f"scored as unknown; write {expected}, or leave the cell empty for unknown")
    return messages


def _checked(meta: Sequence[Mapping[str, Any] | None]) -> list[Mapping[str, Any]]:
    """The entries as mappings (``None`` → ``{}``); anything else is refused with its position."""
    out = []
    for i, m in enumerate(meta):
        if m is not None and not isinstance(m, Mapping):
            raise ValueError(f"metadata entry {i} is a {type(m).__name__}, not a dict like "
                             "{'age': 60, 'sex': 'female', 'site': 'back'}")
        out.append(m or {})
    return out


class MetadataEncoder:
    """Encodes metadata dicts (``{"age": 52, "sex": "male", "site": "back"}``) as a feature matrix.

    Columns: age → (age − 50) / 20 and an age-unknown flag; sex → male and female flags
    (both 0 when unknown); site → one flag per site seen at least ``MIN_SITE_COUNT`` times
    when fitted, and a site-unknown flag.

    Args:
        fields: which of ``METADATA_FIELDS`` to encode.
    """

    def __init__(self, fields: Sequence[str]):
        self.fields = parse_fields(list(fields))
        if not self.fields:
            raise ValueError("MetadataEncoder needs at least one field")

    def fit(self, meta: Sequence[Mapping[str, Any]]) -> "MetadataEncoder":
        """Learn the site vocabulary from the fitting images' metadata. Returns self."""
        counts: dict[str, int] = {}
        for m in _checked(meta):
            site = clean_text(m.get("site"))
            if site:
                counts[site] = counts.get(site, 0) + 1
        self.sites_ = sorted(s for s, c in counts.items() if c >= MIN_SITE_COUNT)
        return self

    @property
    def feature_names(self) -> list[str]:
        """Column names of ``transform``'s output."""
        names: list[str] = []
        if "age" in self.fields:
            names += ["age", "age_unknown"]
        if "sex" in self.fields:
            names += ["sex_male", "sex_female"]
        if "site" in self.fields:
            names += [f"site_{s}" for s in self.sites_] + ["site_unknown"]
        return names

    def transform(self, meta: Sequence[Mapping[str, Any] | None]) -> np.ndarray:
        """The (n, len(feature_names)) float64 matrix; a ``None`` entry means every field unknown."""
        rows = []
        for m in _checked(meta):
            row: list[float] = []
            if "age" in self.fields:
                age = clean_age(m.get("age"))
                row += [0.0, 1.0] if age is None else [(age - 50.0) / 20.0, 0.0]
            if "sex" in self.fields:
                sex = clean_text(m.get("sex"))
                row += [float(sex == "male"), float(sex == "female")]
            if "site" in self.fields:
                site = clean_text(m.get("site"))
                row += [float(site == s) for s in self.sites_] + [float(site not in self.sites_)]
            rows.append(row)
        return np.array(rows, dtype=np.float64).reshape(len(rows), len(self.feature_names))
