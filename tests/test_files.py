"""Damaged JSON files are reported with their path and what to do."""

import pytest


@pytest.mark.parametrize("text, match", [
    (None, r"x\.json: missing; re-run it"),
    ("[1, 2]", r"x\.json: damaged, holds a JSON list where an object is expected; re-run it"),
    ("{not json", r"x\.json: damaged, not valid JSON \(.*\); re-run it"),
    ('{"a": 1}', r"x\.json: damaged, lacks 'b'; re-run it"),
])
def test_read_json_object_names_the_file_and_the_damage(tmp_path, text, match):
    from colorspaces.files import read_json_object

    path = tmp_path / "x.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        read_json_object(path, required=("a", "b"), hint="re-run it")
