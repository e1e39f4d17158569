"""An interrupted ``skinfusion pretrain`` continues from its last completed epoch (``--resume``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.config import BranchConfig

CONFIG = BranchConfig(view="rgb", image_size=16, base_filters=4, seed=3)


def _images(n: int = 48) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def _weights(model) -> list[np.ndarray]:
    from models.pretrain import encoder_arrays

    return [a for _, a in sorted(encoder_arrays(model).items())]


def _stop_after_first(entry):
    if entry["epoch"] == 1:
        raise KeyboardInterrupt  # as Ctrl-C would, after the epoch was checkpointed


def test_a_resumed_pretraining_ends_where_an_uninterrupted_one_does(tmp_path):
    from models.pretrain import pretrain_encoder

    images = _images()
    whole, hist_whole = pretrain_encoder(CONFIG, images, epochs=3, batch_size=16, checkpoint=tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        pretrain_encoder(CONFIG, images, epochs=3, batch_size=16, checkpoint=tmp_path / "b",
                         on_epoch=_stop_after_first)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["epoch"] == 1
    seen = []
    resumed, hist = pretrain_encoder(CONFIG, images, epochs=3, batch_size=16, checkpoint=tmp_path / "b",
                                     resume=True, on_epoch=seen.append)
    assert [e["epoch"] for e in seen] == [2, 3]  # only the missing epochs were trained
    assert [e["epoch"] for e in hist] == [0, 1, 2, 3]
    np.testing.assert_allclose([e["loss"] for e in hist[1:]], [e["loss"] for e in hist_whole[1:]], rtol=1e-4)
    for a, b in zip(_weights(resumed), _weights(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # Without the optimizer state and the epoch's batches, a fresh start from those weights differs.
    fresh, _ = pretrain_encoder(CONFIG, images, epochs=2, batch_size=16)
    assert not all(np.allclose(a, b, atol=1e-5) for a, b in zip(_weights(fresh), _weights(whole)))


def test_a_checkpoint_of_other_settings_or_modified_weights_is_refused_by_name(tmp_path):
    from models.pretrain import pretrain_encoder

    images = _images()
    with pytest.raises(KeyboardInterrupt):
        pretrain_encoder(CONFIG, images, epochs=3, batch_size=16, checkpoint=tmp_path, on_epoch=_stop_after_first)
    with pytest.raises(ValueError, match=r"other settings \(batch_size, "):
        pretrain_encoder(CONFIG, images, epochs=3, batch_size=8, checkpoint=tmp_path, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-0001.npz", "state.json"]  # epoch 0's is gone
    with open(tmp_path / "state-0001.npz", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(ValueError, match=r"state-0001\.npz: missing or modified"):
        pretrain_encoder(CONFIG, images, epochs=3, batch_size=16, checkpoint=tmp_path, resume=True)
    state = json.loads((tmp_path / "state.json").read_text())
    (tmp_path / "state.json").write_text(json.dumps({**state, "npz": "../state-0001.npz"}))
    with pytest.raises(ValueError, match=r"state\.json: damaged, 'npz' must name a file beside it"):
        pretrain_encoder(CONFIG, images, epochs=3, batch_size=16, checkpoint=tmp_path, resume=True)
