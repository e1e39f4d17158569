"""Near-duplicate images by perceptual hash, so that copies of one image stay on one side of a split."""

from __future__ import annotations

import csv
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import cv2
import numpy as np

from colorspaces import ImageError, read_image, validate_image

logger = logging.getLogger(__name__)

#: Default Hamming-distance threshold of ``find_near_duplicates`` on ``phash`` (calibration there).
MAX_DISTANCE = 18
PHASH_SIZE = 12  # 12 × 12 DCT block minus its DC term: 143 bits

_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _grey(image: np.ndarray) -> np.ndarray:
    # float32, so that near-equal neighbours are not forced into ties by uint8 rounding.
    return cv2.cvtColor(validate_image(image), cv2.COLOR_RGB2GRAY).astype(np.float32)


def dhash(image_rgb_uint8: np.ndarray) -> int:
    """64-bit difference hash of an image.

    The image is turned grey and shrunk to 9 × 8 by area averaging (which removes JPEG
    noise and makes the hash blind to size and aspect ratio); each bit says whether a cell
    is brighter than its left neighbour. Brightness shifts, re-compression and resizing
    leave it (almost) unchanged.

    On dermoscopy it is too coarse to find near-duplicates: at 9 × 8 nearly every image is
    "a dark blob in the middle of lighter skin", so unrelated images collide by the
    thousand (figures in ``find_near_duplicates``). Use ``phash`` there; ``dhash`` is kept
    for exact-copy checks and for other kinds of images.

    Args:
        image_rgb_uint8: RGB uint8 (H, W, 3).

    Returns:
        The hash as a non-negative int below 2**64 (row-major bits, first bit most significant).

    Raises:
        ImageError: if the array breaks the RGB uint8 contract.
    """
    small = cv2.resize(_grey(image_rgb_uint8), (9, 8), interpolation=cv2.INTER_AREA)
    return _bits_to_int(small[:, 1:] > small[:, :-1])


def phash(image_rgb_uint8: np.ndarray, size: int = PHASH_SIZE) -> int:
    """DCT perceptual hash: signs of the lowest ``size`` × ``size`` cosine frequencies.

    The image is turned grey and shrunk to 32 × 32 by area averaging; its 2-D DCT is taken
    and the sign of each coefficient in the top-left ``size`` × ``size`` block, except the
    DC term, is one bit. Dropping DC and thresholding at zero make the hash blind to
    brightness and contrast changes; the low frequencies survive re-compression and
    resizing. With ``size`` = 12 (143 bits) it separates dermoscopic images far better than
    a 64-bit hash can, because the first 8 × 8 frequencies mostly encode the layout that all
    lesion photos share.

    Args:
        image_rgb_uint8: RGB uint8 (H, W, 3).
        size: side of the DCT block (2-32); the hash has ``size**2 - 1`` bits.

    Returns:
        The hash as a non-negative int (row-major bits, first bit most significant).

    Raises:
        ImageError: if the array breaks the RGB uint8 contract.
        ValueError: if ``size`` is outside 2-32.
    """
    if not 2 <= int(size) <= 32:
        raise ValueError(f"phash size must be between 2 and 32, got {size!r}")
    small = cv2.resize(_grey(image_rgb_uint8), (32, 32), interpolation=cv2.INTER_AREA)
    coeffs = cv2.dct(small)[:size, :size].ravel()[1:]
    return _bits_to_int(coeffs > 0)


def _bits_to_int(bits: np.ndarray) -> int:
    return int("".join("1" if b else "0" for b in np.ravel(bits)), 2)


def hamming_distance(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return bin(int(a) ^ int(b)).count("1")


def _hash_file(path: str, hash_fn: Callable[[np.ndarray], int]):
    try:
        return hash_fn(read_image(path)), None
    except ImageError as exc:
        return None, str(exc)


def hash_files(paths: Sequence[str], hash_fn: Callable[[np.ndarray], int] = phash,
               workers: int = 2) -> tuple[list[int], np.ndarray, list[tuple[str, str]]]:
    """Hash image files, skipping unreadable ones instead of failing.

    Args:
        paths: image files.
        hash_fn: ``phash`` or ``dhash`` (any function of an RGB uint8 image returning an int).
        workers: decoding threads (OpenCV releases the GIL while decoding).

    Returns:
        ``(hashes, ok, failures)``: the hashes of the files that loaded, their indices into
        ``paths``, and ``(path, reason)`` for the rest.
    """
    hashes, ok, failures = [], [], []
    step = max(1, len(paths) // 10)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, (h, err) in enumerate(pool.map(lambda p: _hash_file(p, hash_fn), paths)):
            if err is None:
                hashes.append(h)
                ok.append(i)
            else:
                failures.append((paths[i], err))
                logger.warning("not hashed: %s", err)
            if len(paths) >= 500 and ((i + 1) % step == 0 or i + 1 == len(paths)):
                logger.info("hashed %d/%d images", i + 1, len(paths))
    return hashes, np.asarray(ok, dtype=int), failures


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return _POPCOUNT8[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


def _to_words(hashes: Sequence[int]) -> np.ndarray:
    n_words = max(1, -(-max((int(h).bit_length() for h in hashes), default=0) // 64))
    mask = (1 << 64) - 1
    return np.array([[(int(h) >> (64 * w)) & mask for w in range(n_words)] for h in hashes],
                    dtype=np.uint64).reshape(len(hashes), n_words)


def close_hash_pairs(hashes: Sequence[int], max_distance: int = MAX_DISTANCE,
                     chunk: int = 512) -> list[tuple[int, int, int]]:
    """All pairs of hashes within a Hamming distance, by blockwise XOR and popcount.

    Exhaustive rather than bucketed, because it is fast enough: 10,000 hashes are 5e7
    pairs, about a second of vectorised NumPy in row blocks of ``chunk``.

    Args:
        hashes: hashes as non-negative ints of any length (all of the same kind).
        max_distance: largest Hamming distance that counts as a near-duplicate.
        chunk: rows per block (memory is about chunk × n × 8 bytes per 64 hash bits).

    Returns:
        ``(i, j, distance)`` with ``i < j`` indexing ``hashes``, sorted.

    Raises:
        ValueError: if ``max_distance`` is negative.
    """
    if int(max_distance) < 0:
        raise ValueError(f"max_distance must be >= 0 bits, got {max_distance!r}")
    words = _to_words(hashes)
    out: list[tuple[int, int, int]] = []
    for s in range(0, len(words), chunk):
        block = words[s:s + chunk]
        # Columns start at s: pairs with an earlier row were found by an earlier block.
        dist = _popcount(block[:, None, :] ^ words[None, s:, :]).sum(axis=-1, dtype=np.int32)
        # Strict upper triangle (j > i): each pair once, no self-pairs.
        dist[np.tril_indices(len(block), m=dist.shape[1])] = np.iinfo(np.int32).max
        ii, jj = np.nonzero(dist <= max_distance)
        out.extend(zip((ii + s).tolist(), (jj + s).tolist(), dist[ii, jj].tolist()))
    return sorted(out)


def find_near_duplicates(paths: Sequence[str], max_distance: int = MAX_DISTANCE,
                         workers: int = 2) -> list[tuple[int, int, int]]:
    """Pairs of near-identical images among ``paths``, by 143-bit DCT hash (``phash``).

    Calibrated on ``isic-mel-nev`` (10,052 images; its ``near_duplicates.csv`` lists 112
    pairs found by 48 × 48 grey-thumbnail correlation >= 0.985). Recall of those pairs,
    and the other pairs reported (how many of them are two images of one HAM10000 lesion,
    and so harmless for a lesion-grouped split):

    ======  ============  ============  ===========  ================  ============
    hash    max_distance  recall        other pairs  same HAM lesion   time (2 CPU)
    ======  ============  ============  ===========  ================  ============
    phash   12            88/112  79%   14           9                 5 s
    phash   14            103/112 92%   20           12
    phash   16            107/112 96%   36           16
    phash   **18**        110/112 98%   72           22
    phash   20            110/112 98%   119          27
    phash   24            110/112 98%   352          40
    phash   28            111/112 99%   1,096        52
    dhash   0             17/112  15%   50           0                 8 s
    dhash   2             51/112  46%   1,659        2
    dhash   4             84/112  75%   13,927       14
    dhash   6             98/112  88%   60,511       34
    dhash   8             108/112 96%   180,959      94
    dhash   10            112/112 100%  441,076      176
    ======  ============  ============  ===========  ================  ============

    The default, 18 of 143 bits, finds 98% of the listed pairs. The two it misses sit at
    the list's own margin (correlation 0.985 and 0.986): ISIC_0028592/ISIC_0028874, one
    HAM10000 lesion (so grouped anyway), and ISIC_0033076/ISIC_0033922. By eye, of its 72
    other pairs 22 are two images of one HAM10000 lesion (harmless in a lesion-grouped
    split), about 5 are ISIC 2017 re-uploads that the correlation missed (e.g.
    ISIC_0000165/ISIC_0014788), and about 45 are different small, plain, centred nevi on
    even skin. A wrong pair only merges two groups and costs a
    little split freedom, whereas a missed pair leaks, so the threshold leans to recall.
    A 64-bit ``dhash`` cannot do this: at 9 × 8 cells nearly all dermoscopic images are
    "a dark blob on lighter skin", so it reports thousands of unrelated pairs long before
    it reaches 90% recall.

    Args:
        paths: image files; unreadable ones are logged and left out.
        max_distance: largest Hamming distance (of 143 bits) that counts as a near-duplicate.
        workers: decoding threads.

    Returns:
        ``(i, j, distance)`` with ``i < j`` indexing ``paths``, sorted.

    Raises:
        ValueError: if ``max_distance`` is negative.
    """
    hashes, ok, _ = hash_files(paths, phash, workers=workers)
    return [(int(ok[i]), int(ok[j]), d) for i, j, d in close_hash_pairs(hashes, max_distance)]


def read_near_duplicate_pairs(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read ``image_id_a,image_id_b`` pairs from a CSV such as ``isic-mel-nev/near_duplicates.csv``.

    Args:
        path: the CSV; other columns are ignored.

    Returns:
        ``(image_id_a, image_id_b)`` tuples, in file order.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it lacks the ``image_id_a`` / ``image_id_b`` columns.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such near-duplicate list")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not {"image_id_a", "image_id_b"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: needs columns image_id_a,image_id_b")
        return [(row["image_id_a"].strip(), row["image_id_b"].strip()) for row in reader]
