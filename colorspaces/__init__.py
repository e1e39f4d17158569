"""Layer 0: image reading, the deterministic views (RGB, HSV, FFT; LAB and YCrCb as options), crops,
the label table, file helpers and Ctrl-C deferral (``interrupts``); pure NumPy and OpenCV."""

from colorspaces.constancy import CONSTANCY, apply_constancy, shades_of_gray
from colorspaces.crops import centre_crop, random_crops, sliding_windows, window_offsets
from colorspaces.image import (
    ImageError,
    MissingImageError,
    read_image,
    resize_image,
    validate_image,
)
from colorspaces.views import (
    DEFAULT_VIEWS,
    DESIGN_VIEWS,
    VIEWS,
    ViewSpec,
    apply_view,
    to_fft,
    to_hsv,
    to_lab,
    to_rgb,
    to_ycrcb,
)

__all__ = [
    "CONSTANCY",
    "apply_constancy",
    "shades_of_gray",
    "ImageError",
    "MissingImageError",
    "DEFAULT_VIEWS",
    "DESIGN_VIEWS",
    "VIEWS",
    "ViewSpec",
    "apply_view",
    "centre_crop",
    "random_crops",
    "sliding_windows",
    "window_offsets",
    "read_image",
    "resize_image",
    "to_fft",
    "to_hsv",
    "to_lab",
    "to_rgb",
    "to_ycrcb",
    "validate_image",
]
