"""The one label table: class names, their integer codes, and the label map artifacts record."""

from __future__ import annotations

# Index = the integer label every model, file and metric uses; the positive class is melanoma.
CLASSES = ("nevus", "melanoma")
LABELS = {name: code for code, name in enumerate(CLASSES)}  # name -> code, for reading datasets
LABEL_NAMES = dict(enumerate(CLASSES))  # code -> name, for reports
LABEL_MAP = {str(code): name for code, name in enumerate(CLASSES)}  # as recorded in metadata.json and manifest.json
