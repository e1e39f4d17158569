"""Dataset layouts (labels.csv, isic-cli, HAM10000, class folders, and a toy one registered by a test), split
verification and near-duplicate hashing."""

import csv
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from colorspaces import ImageError
from skinfusion.data import layouts
from skinfusion.data.index import Record, RecordBuilder, find_image_files
from skinfusion.data.layouts import Layout, detect_format, index_dataset, isic_label
from skinfusion.data.dedup import (
    MAX_DISTANCE,
    close_hash_pairs,
    dhash,
    find_near_duplicates,
    hamming_distance,
    phash,
    read_near_duplicate_pairs,
)
from skinfusion.data.splits import make_split, merge_near_duplicate_groups, verify_split

from helpers import write_rgb


def _lesion_image(seed: int, h: int = 120, w: int = 160) -> np.ndarray:
    """A SYNTHETIC dermoscopy-like RGB image: shading, skin texture and a dark blob."""
    rng = np.random.default_rng(seed)
    shading = cv2.resize(rng.random((6, 8)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    # Mid-frequency texture, as real skin and pigment network have: without it the DCT
    # coefficients that phash reads are near zero and their signs are noise.
    texture = cv2.resize(rng.random((h // 6, w // 6)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    blob = np.exp(-(((yy - cy) / rng.uniform(10, 30)) ** 2 + ((xx - cx) / rng.uniform(10, 40)) ** 2))
    grey = 170 + 50 * (shading - 0.5) + 40 * (texture - 0.5) - 120 * blob
    tint = np.array([1.0, 0.8, 0.75])
    return np.clip(grey[..., None] * tint, 0, 255).astype(np.uint8)


def _write_image(path: Path, seed: int = 0) -> None:
    write_rgb(path, _lesion_image(seed, 24, 32))


def _write_csv(path: Path, header, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _by_id(index):
    return {r.image_id: r for r in index.records}


# --- labels.csv + images/ -------------------------------------------------------------------

def test_labels_csv_format_is_detected_with_groups_sources_skips_and_gaps(tmp_path):
    _write_csv(tmp_path / "labels.csv", ["image_id", "label", "source"],
               [("a", "melanoma", "S1"), ("b", "Nevus", "S2"), ("c", "seborrheic_keratosis", "S1"), ("d", "nevus", "S1")])
    _write_csv(tmp_path / "metadata.csv", ["image_id", "group_id"], [("a", "G1"), ("b", "G1")])
    for i in "abc":
        _write_image(tmp_path / "images" / f"{i}.jpg")
    index = index_dataset(tmp_path)
    assert detect_format(tmp_path) == index.format == "labels.csv"
    recs = _by_id(index)
    assert sorted(recs) == ["a", "b"]
    assert (recs["a"].label, recs["b"].label) == (1, 0)
    assert recs["a"].group_id == recs["b"].group_id == "G1" and index.grouped
    assert (recs["a"].source, recs["b"].source) == ("S1", "S2")
    assert index.skipped_labels == {"seborrheic_keratosis": 1}
    assert [Path(p).name for p in index.missing_files] == ["d.jpg"]
    assert "format 'labels.csv'" in index.summary()


# --- isic-cli -------------------------------------------------------------------------------

MEL2 = "Malignant melanocytic proliferations (Melanoma)"
NEV2 = "Benign melanocytic proliferations"
CLINIC = "Department of Dermatology, Hospital Clínic de Barcelona"
NEW_HEADER = ["isic_id", "attribution", "copyright_license", "diagnosis_1", "diagnosis_2", "diagnosis_3",
              "diagnosis_4", "image_type", "lesion_id", "patient_id"]
NEW_ROWS = [
    ("ISIC_0000001", CLINIC, "CC-BY-NC", "Malignant", MEL2, "Melanoma Invasive", "", "dermoscopic", "IL_1", "IP_1"),
    ("ISIC_0000002", CLINIC, "CC-BY-NC", "Malignant", MEL2, "Melanoma in situ", "", "dermoscopic", "IL_1", "IP_1"),
    ("ISIC_0000003", "ViDIR Group", "CC-BY-NC", "Benign", NEV2, "Nevus", "Blue nevus", "dermoscopic", "", "IP_2"),
    ("ISIC_0000004", "", "CC-0", "Benign", NEV2, "Nevus", "Nevus, Spitz", "dermoscopic", "", ""),
    ("ISIC_0000005", CLINIC, "CC-BY-NC", "Malignant", MEL2, "Melanoma, NOS", "", "dermoscopic", "IL_5", "IP_3"),
    ("ISIC_0000006", CLINIC, "CC-BY", "Benign", "Benign epidermal proliferations", "Seborrheic keratosis", "", "dermoscopic", "IL_6", ""),
    ("ISIC_0000007", CLINIC, "CC-BY", "Benign", NEV2, "Dermal melanocytosis", "Nevus of Ota", "dermoscopic", "IL_7", ""),
    ("ISIC_0000008", CLINIC, "CC-BY", "Benign", "Benign epidermal proliferations", "Epidermal nevus", "", "dermoscopic", "IL_8", ""),
    ("ISIC_0000009", CLINIC, "CC-BY", "Indeterminate", "Indeterminate melanocytic proliferations", "Atypical Spitz tumor", "", "dermoscopic", "IL_9", ""),
    ("ISIC_0000010", CLINIC, "CC-BY", "", "", "", "", "dermoscopic", "IL_10", ""),
]


def _isic_cli_new(root: Path) -> None:
    # As `isic image download` writes it: images next to metadata.csv (older releases used
    # upper-case .JPG), plus attribution.txt and licenses/.
    _write_csv(root / "metadata.csv", NEW_HEADER, NEW_ROWS)
    for k, row in enumerate(NEW_ROWS):
        if row[0] != "ISIC_0000005":
            _write_image(root / f"{row[0]}.JPG", k)
    (root / "attribution.txt").write_text(CLINIC + "\n")
    (root / "licenses").mkdir()
    (root / "licenses" / "CC-BY.txt").write_text("licence\n")


def test_isic_cli_hierarchical_diagnosis_labels_groups_and_sources(tmp_path):
    _isic_cli_new(tmp_path)
    index = index_dataset(tmp_path)
    assert index.format == "isic-cli" and index.grouped
    recs = _by_id(index)
    assert {k: r.label for k, r in recs.items()} == {
        "ISIC_0000001": 1, "ISIC_0000002": 1, "ISIC_0000003": 0, "ISIC_0000004": 0}
    # patient_id first (coarser, leak-free when only some images carry a lesion_id), then
    # lesion_id, then the image itself.
    assert recs["ISIC_0000001"].group_id == recs["ISIC_0000002"].group_id == "IP_1"
    assert recs["ISIC_0000003"].group_id == "IP_2"
    assert recs["ISIC_0000004"].group_id == "ISIC_0000004"
    assert recs["ISIC_0000001"].source == CLINIC and recs["ISIC_0000004"].source == "isic-cli"
    assert recs["ISIC_0000001"].path.endswith("ISIC_0000001.JPG")
    assert index.skipped_labels == {"Seborrheic keratosis": 1, "Dermal melanocytosis": 1, "Epidermal nevus": 1,
                                    "Atypical Spitz tumor": 1, "<empty>": 1}
    assert [Path(p).name for p in index.missing_files] == ["ISIC_0000005.jpg"]
    assert "format 'isic-cli'" in index.summary()


def test_isic_cli_old_diagnosis_column_images_subfolder_and_patient_groups(tmp_path):
    rows = [("ISIC_1", "melanoma", "malignant", "IP_1"), ("ISIC_2", "nevus", "benign", "IP_1"),
            ("ISIC_3", "melanoma metastasis", "malignant", "IP_2"), ("ISIC_4", "seborrheic keratosis", "benign", ""),
            ("ISIC_5", "AIMP", "indeterminate", ""), ("ISIC_6", "nevus", "benign", "")]
    _write_csv(tmp_path / "metadata.csv", ["isic_id", "attribution", "benign_malignant", "diagnosis", "patient_id"],
               [(i, "Anonymous", bm, d, p) for i, d, bm, p in rows])
    for k, (i, *_rest) in enumerate(rows):
        _write_image(tmp_path / "images" / f"{i}.jpg", k)
    index = index_dataset(tmp_path)
    recs = _by_id(index)
    assert index.format == "isic-cli"
    assert {k: r.label for k, r in recs.items()} == {"ISIC_1": 1, "ISIC_2": 0, "ISIC_3": 1, "ISIC_6": 0}
    assert recs["ISIC_1"].group_id == recs["ISIC_2"].group_id == "IP_1" and index.grouped
    assert recs["ISIC_1"].source == "Anonymous"
    assert index.skipped_labels == {"seborrheic keratosis": 1, "AIMP": 1}
    assert index.missing_files == []


@pytest.mark.parametrize("levels, expected", [
    (("Malignant", MEL2, "Melanoma Invasive"), "melanoma"),
    (("Malignant", MEL2, "melanoma in situ"), "melanoma"),
    (("Malignant", MEL2, ""), "melanoma"),
    (("Benign", NEV2, "Nevus"), "nevus"),
    (("Benign", NEV2, ""), None),
    (("Benign", NEV2, "Pigmented epithelioid melanocytoma"), None),
    (("Benign", NEV2, "Lentigo simplex"), None),
    (("Benign", "Benign adnexal epithelial proliferations - Sebaceous", "Nevus sebaceus"), None),
    (("Indeterminate", "Indeterminate melanocytic proliferations",
      "Atypical proliferative nodules in congenital melanocytic nevus"), None),
    (("Malignant", "Malignant adnexal epithelial proliferations - Follicular", "Basal cell carcinoma"), None),
])
def test_isic_label_decision_table(levels, expected):
    row = {f"diagnosis_{k}": v for k, v in enumerate(levels, start=1)}
    # A stale flat column must not override the hierarchical one.
    row["diagnosis"] = "nevus"
    assert isic_label(row)[0] == expected


# --- HAM10000 -------------------------------------------------------------------------------

def test_ham10000_metadata_with_images_in_part_folders(tmp_path):
    rows = [("HAM_1", "ISIC_0024306", "mel"), ("HAM_1", "ISIC_0024307", "mel"), ("HAM_2", "ISIC_0024308", "nv"),
            ("HAM_3", "ISIC_0024309", "bkl"), ("HAM_4", "ISIC_0024310", "df"), ("HAM_5", "ISIC_0024311", "nv")]
    _write_csv(tmp_path / "HAM10000_metadata.csv", ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"],
               [(les, i, dx, "histo", "50.0", "male", "back") for les, i, dx in rows])
    for k, (_, i, _) in enumerate(rows[:5]):
        _write_image(tmp_path / f"HAM10000_images_part_{1 + k % 2}" / f"{i}.jpg", k)
    index = index_dataset(tmp_path)
    recs = _by_id(index)
    assert index.format == "ham10000" and index.grouped
    assert {k: r.label for k, r in recs.items()} == {"ISIC_0024306": 1, "ISIC_0024307": 1, "ISIC_0024308": 0}
    assert recs["ISIC_0024306"].group_id == recs["ISIC_0024307"].group_id == "HAM_1"
    assert "HAM10000_images_part_2" in recs["ISIC_0024307"].path
    assert {r.source for r in index.records} == {"HAM10000"}
    assert index.skipped_labels == {"bkl": 1, "df": 1}
    assert [Path(p).name for p in index.missing_files] == ["ISIC_0024311.jpg"]


# --- class folders --------------------------------------------------------------------------

def test_class_folders_count_other_folders_and_warn_about_leakage(tmp_path, caplog):
    for k, rel in enumerate(["melanoma/m1.jpg", "melanoma/m2.png", "nevus/n1.jpg", "nevus/batch2/n2.jpg", "nevus/n3.jpg",
                             "seborrheic_keratosis/s1.jpg", "seborrheic_keratosis/s2.jpg"]):
        _write_image(tmp_path / rel, k)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an image\n")
    with caplog.at_level(logging.WARNING, logger="skinfusion.data.layouts"):
        index = index_dataset(tmp_path)
    recs = _by_id(index)
    assert index.format == "class-folders" and not index.grouped
    assert {k: r.label for k, r in recs.items()} == {"m1": 1, "m2": 1, "n1": 0, "n2": 0, "n3": 0}
    assert all(r.group_id == r.image_id for r in index.records)
    assert index.skipped_labels == {"seborrheic_keratosis": 2}
    assert "may straddle the split" in index.summary()
    assert any("may straddle the split" in m for m in caplog.messages)


def test_class_folders_reject_an_image_in_both_classes(tmp_path):
    _write_image(tmp_path / "melanoma" / "x.jpg")
    _write_image(tmp_path / "nevus" / "x.jpg")
    with pytest.raises(ValueError, match="x is in both melanoma/ and nevus/"):
        index_dataset(tmp_path)


# --- detection errors -----------------------------------------------------------------------

def test_unrecognised_folder_lists_the_four_layouts(tmp_path):
    _write_image(tmp_path / "loose.jpg")
    with pytest.raises(FileNotFoundError, match=r"(?s)not a recognised dataset folder.*labels\.csv.*isic_id"
                                                r".*HAM10000_metadata\.csv.*melanoma/ and nevus/"):
        index_dataset(tmp_path)


def _index_toy(root: Path):
    """A toy layout: ``toy.txt`` lists ``<stem> <m|n>`` lines for images anywhere below the folder."""
    files = find_image_files([root], recursive=True)
    b = RecordBuilder(root, root / "toy.txt")
    for line in (root / "toy.txt").read_text().split("\n"):
        if line.strip():
            stem, code = line.split()
            label = {"m": "melanoma", "n": "nevus"}.get(code)
            b.add(stem, label, code, files.get(stem), root / f"{stem}.png", stem, "toy")
    return b.index


TOY = Layout("toy", "toy.txt listing '<image> <m|n>' lines", lambda root: (root / "toy.txt").is_file(), _index_toy,
             lambda root: "found toy.TXT; the name is case-sensitive" if (root / "toy.TXT").is_file() else None)


def test_a_layout_registered_in_one_entry_is_detected_indexed_and_listed(tmp_path, monkeypatch):
    for k, stem in enumerate(["m1", "n1", "n2"]):
        _write_image(tmp_path / "sub" / f"{stem}.png", k)
    (tmp_path / "toy.txt").write_text("m1 m\nn1 n\nn2 n\nx9 q\ngone m\n")
    with pytest.raises(FileNotFoundError, match="not a recognised dataset folder"):
        index_dataset(tmp_path)
    monkeypatch.setattr(layouts, "LAYOUTS", (*layouts.LAYOUTS, TOY))
    index = index_dataset(tmp_path)
    assert detect_format(tmp_path) == index.format == "toy" and not index.grouped
    assert {k: r.label for k, r in _by_id(index).items()} == {"m1": 1, "n1": 0, "n2": 0}
    assert index.skipped_labels == {"q": 1} and [Path(p).name for p in index.missing_files] == ["gone.png"]
    assert "format 'toy'" in index.summary()
    # The error for an unknown folder lists the registry, the new entry and its near-miss hint included.
    other = tmp_path / "other"
    _write_image(other / "loose.jpg")
    (other / "toy.TXT").write_text("")
    with pytest.raises(FileNotFoundError, match=r"(?s)\(found toy\.TXT; the name is case-sensitive\)"
                                                r".*labels\.csv.*class-folders.*- toy: toy\.txt listing"):
        index_dataset(other)


def test_registry_order_decides_between_layouts_a_folder_matches_twice(tmp_path, monkeypatch):
    # A folder with both labels.csv + images/ and class folders is indexed by the first entry.
    _write_csv(tmp_path / "labels.csv", ["image_id", "label"], [("a", "melanoma")])
    _write_image(tmp_path / "images" / "a.jpg")
    for rel in ("melanoma/m.jpg", "nevus/n.jpg"):
        _write_image(tmp_path / rel)
    assert detect_format(tmp_path) == "labels.csv"
    monkeypatch.setattr(layouts, "LAYOUTS", tuple(reversed(layouts.LAYOUTS)))
    assert detect_format(tmp_path) == "class-folders"


@pytest.mark.parametrize("name, header, hint", [
    ("labels.csv", ["image_id", "label"], "found labels.csv but no images/ folder"),
    ("metadata.csv", ["image_id", "lesion_id"], "found metadata.csv but it has no isic_id column"),
])
def test_near_miss_layouts_get_a_hint(tmp_path, name, header, hint):
    _write_csv(tmp_path / name, header, [])
    with pytest.raises(FileNotFoundError, match=hint):
        detect_format(tmp_path)


def test_isic_cli_without_usable_images_names_the_format(tmp_path):
    _write_csv(tmp_path / "metadata.csv", ["isic_id", "diagnosis"], [("ISIC_1", "basal cell carcinoma")])
    with pytest.raises(ValueError, match=r"no usable melanoma/nevus images found \(format 'isic-cli'"):
        index_dataset(tmp_path)


def test_isic_cli_without_a_diagnosis_column_is_rejected(tmp_path):
    _write_csv(tmp_path / "metadata.csv", ["isic_id", "attribution"], [("ISIC_1", "x")])
    with pytest.raises(ValueError, match="needs a diagnosis column"):
        index_dataset(tmp_path)


# --- split verification ---------------------------------------------------------------------

def _records(n_groups=80):
    rng = np.random.default_rng(0)
    return [Record(f"img{g}_{k}", "", int(g % 5 == 0), f"lesion{g}", "A")
            for g in range(n_groups) for k in range(int(rng.integers(1, 3)))]


def test_verify_split_passes_a_clean_split_and_lists_every_leak():
    recs = _records()
    assign = make_split(recs, seed=0)
    assert verify_split(recs, assign) == []
    multi = next(r for r in recs if r.image_id.endswith("_1"))
    other = f"{multi.image_id[:-2]}_0"
    assign[multi.image_id] = "test" if assign[other] != "test" else "train"
    a = next(r.image_id for r in recs if assign[r.image_id] == "train")
    b = next(r.image_id for r in recs if assign[r.image_id] == "val")
    problems = verify_split(recs, assign, [(a, b, 3), ("img_not_in_split", a)])
    assert len(problems) == 2
    assert problems[0].startswith(f"group {multi.group_id} crosses splits")
    assert problems[1] == f"near-duplicate pair {a} (train) / {b} (val) crosses splits"
    del assign[a]
    assert f"image {a} has no split" in verify_split(recs, assign)


def test_merged_near_duplicate_groups_stay_on_one_side():
    recs = _records()
    pairs = [("img1_0", "img2_0"), ("img2_0", "img3_0"), ("img60_0", "img61_0")]
    merged = merge_near_duplicate_groups(recs, pairs)
    assert [r.image_id for r in merged] == [r.image_id for r in recs]
    groups = {r.image_id: r.group_id for r in merged}
    assert groups["img1_0"] == groups["img2_0"] == groups["img3_0"] == "lesion1"
    assert groups["img60_0"] == groups["img61_0"] == "lesion60"
    assert groups["img4_0"] == "lesion4"
    for seed in range(3):
        assert verify_split(merged, make_split(merged, seed=seed), pairs) == []


# --- perceptual hashes ----------------------------------------------------------------------

def _recompressed_brighter(image: np.ndarray) -> np.ndarray:
    brighter = np.clip(image.astype(int) + 20, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", brighter, [cv2.IMWRITE_JPEG_QUALITY, 60])
    assert ok
    return cv2.resize(cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), (200, 150), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("hash_fn, bits, near, far", [(dhash, 64, 4, 12), (phash, 143, 8, MAX_DISTANCE)])
def test_hash_finds_an_edited_copy_but_not_an_unrelated_image(hash_fn, bits, near, far):
    image = _lesion_image(1)
    copy = _recompressed_brighter(image)
    h = hash_fn(image)
    assert 0 <= h < 2 ** bits
    assert hamming_distance(h, hash_fn(copy)) <= near
    for seed in range(2, 8):
        assert hamming_distance(h, hash_fn(_lesion_image(seed))) > far


def test_hashes_validate_their_input():
    with pytest.raises(ImageError, match="uint8"):
        dhash(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="between 2 and 32"):
        phash(np.zeros((8, 8, 3), np.uint8), size=40)


def test_close_hash_pairs_counts_bits_across_64_bit_words():
    big = 0b111111 << 64  # six bits in the second word: 6 from 0, and 1 from big | 1
    hashes = [0b0, 0b1, 0b11, 0b1111_0000, big, big | 1]
    assert close_hash_pairs(hashes, 1, chunk=2) == [(0, 1, 1), (1, 2, 1), (4, 5, 1)]
    assert (0, 3, 4) in close_hash_pairs(hashes, 4)
    with pytest.raises(ValueError, match="max_distance must be >= 0"):
        close_hash_pairs(hashes, -1)


def test_find_near_duplicates_on_files_skips_corrupt_ones(tmp_path):
    image = _lesion_image(1)
    paths = [tmp_path / "a.jpg", tmp_path / "bad.jpg", tmp_path / "copy.jpg", tmp_path / "other.jpg"]
    write_rgb(paths[0], image)
    paths[1].write_bytes(b"not a jpeg")
    write_rgb(paths[2], _recompressed_brighter(image))
    write_rgb(paths[3], _lesion_image(5))
    pairs = find_near_duplicates([str(p) for p in paths])
    assert [(i, j) for i, j, _ in pairs] == [(0, 2)]


def test_read_near_duplicate_pairs(tmp_path):
    path = tmp_path / "near_duplicates.csv"
    _write_csv(path, ["image_id_a", "source_a", "image_id_b", "gray_thumb_corr"], [("A", "s", "B", "0.99")])
    assert read_near_duplicate_pairs(path) == [("A", "B")]
    with pytest.raises(FileNotFoundError, match="no such near-duplicate list"):
        read_near_duplicate_pairs(tmp_path / "none.csv")
    _write_csv(path, ["a", "b"], [])
    with pytest.raises(ValueError, match="image_id_a,image_id_b"):
        read_near_duplicate_pairs(path)
