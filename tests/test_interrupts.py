"""Ctrl-C held during a forward pass and delivered after it (colorspaces.interrupts.deferred_sigint).

The CI flake this guards against: a SIGINT that landed inside TensorFlow's C++ ``nest.flatten``
made TensorFlow print a ``SystemError`` traceback before ``run_guarded`` reported the interrupt.
"""

from __future__ import annotations

import signal
import threading

import numpy as np
import pytest

from colorspaces.interrupts import HELD_MESSAGE, deferred_sigint
from colorspaces.pipeline import BranchRecipe, Preprocess
from ensemble.scoring import ScoringEngine


@pytest.fixture
def noting_handler():
    """A Python SIGINT handler that raises KeyboardInterrupt and records each call, as run_guarded's does."""
    calls: list[int] = []

    def handler(signum, frame):
        calls.append(signum)
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGINT, handler)
    yield handler, calls
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_inside_the_block_is_delivered_when_it_ends(noting_handler):
    handler, calls = noting_handler
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_sigint():
            signal.raise_signal(signal.SIGINT)
            finished.append("the rest of the block ran")
    assert finished and calls == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is handler, "the previous handler is put back"


def test_the_interrupt_replaces_an_error_the_held_signal_caused(noting_handler):
    with pytest.raises(KeyboardInterrupt) as info:
        with deferred_sigint():
            signal.raise_signal(signal.SIGINT)
            raise SystemError("returned a result with an exception set")
    assert isinstance(info.value.__context__, SystemError)


def test_a_second_ctrl_c_is_not_held(noting_handler):
    _, calls = noting_handler
    after_second = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_sigint():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            after_second.append(True)
    assert not after_second and calls == [signal.SIGINT]


def test_a_handler_that_only_counts_sees_every_press():
    """serve's handler notes presses without raising: two presses inside the block reach it as two."""
    presses: list[int] = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: presses.append(signum))
    try:
        with deferred_sigint():
            signal.raise_signal(signal.SIGINT)
            assert presses == []  # held
            signal.raise_signal(signal.SIGINT)
            assert presses == [signal.SIGINT, signal.SIGINT]  # the second press delivers both at once
            signal.raise_signal(signal.SIGINT)
        assert presses == [signal.SIGINT] * 3
    finally:
        signal.signal(signal.SIGINT, before)


def test_nested_blocks_hold_one_press_and_pass_a_second_out(noting_handler):
    _, calls = noting_handler
    with pytest.raises(KeyboardInterrupt):
        with deferred_sigint():
            with deferred_sigint():
                signal.raise_signal(signal.SIGINT)
            assert calls == [], "the inner block handed the press to the outer one, which holds it"
    assert calls == [signal.SIGINT]
    calls.clear()
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_sigint():
            with deferred_sigint():
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)
                reached.append(True)
    assert not reached and calls == [signal.SIGINT]


def test_the_first_held_press_is_answered_once_even_in_nested_blocks(noting_handler, capsys):
    # A user pressing Ctrl-C during a long batch sees at once that it was heard, once, not once
    # per block the press passes through on its way out.
    with pytest.raises(KeyboardInterrupt):
        with deferred_sigint():
            with deferred_sigint():
                signal.raise_signal(signal.SIGINT)
                assert capsys.readouterr().err.count(HELD_MESSAGE) == 1, "answered at once, inside the block"
    assert HELD_MESSAGE not in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        with deferred_sigint():
            signal.raise_signal(signal.SIGINT)
    assert capsys.readouterr().err.count(HELD_MESSAGE) == 1, "a later block answers its own first press"
    with deferred_sigint():
        pass
    assert capsys.readouterr().err == ""


def test_the_handler_is_put_back_after_an_error(noting_handler):
    handler, calls = noting_handler
    with pytest.raises(RuntimeError):
        with deferred_sigint():
            raise RuntimeError("a bug in the block")
    assert signal.getsignal(signal.SIGINT) is handler and calls == []


def test_no_ctrl_c_no_change(noting_handler):
    handler, calls = noting_handler
    with deferred_sigint():
        value = 1 + 1
    assert value == 2 and calls == [] and signal.getsignal(signal.SIGINT) is handler


def test_ignored_ctrl_c_stays_ignored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deferred_sigint():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_outside_the_main_thread_the_block_runs_unchanged():
    errors = []

    def body():
        try:
            with deferred_sigint():
                pass
        except Exception as exc:  # signal.signal outside the main thread raises ValueError
            errors.append(exc)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert errors == []


class _SlowBackend(ScoringEngine):
    """A backend whose forward pass receives Ctrl-C halfway through, as a TensorFlow call would."""

    def __init__(self):
        self.views = ["rgb"]
        self.preprocess = Preprocess(image_size=8, load_size=8, branches=(BranchRecipe("rgb"),))
        self.embedding_dims = [2]
        self.completed = 0

    def forward(self, xs):
        signal.raise_signal(signal.SIGINT)
        # Held: a KeyboardInterrupt here is what TensorFlow's C++ turned into a SystemError.
        n = len(xs[0])
        self.completed += 1
        return [np.full((n, 1), 0.5), np.zeros((n, 2))]


def test_the_engine_holds_ctrl_c_until_its_forward_pass_returns(noting_handler):
    _, calls = noting_handler
    engine = _SlowBackend()
    with pytest.raises(KeyboardInterrupt):
        engine.member_outputs_batch(np.zeros((3, 8, 8, 3), np.uint8))
    assert engine.completed == 1, "the forward pass ran to its end before the interrupt"
    assert calls == [signal.SIGINT]


def test_training_holds_ctrl_c_inside_a_step_and_stops_between_steps(noting_handler):
    """fit_branch: Ctrl-C pressed inside a training step is raised after that step, from a callback,
    and the previous handler is back once fit_branch has stopped."""
    import keras

    from models import BranchConfig
    from models.train import fit_branch

    handler, calls = noting_handler
    steps = []

    class PressDuringStep(keras.callbacks.Callback):
        # Runs after the holding callback's on_train_batch_begin: the press lands inside the step.
        def on_train_batch_begin(self, batch, logs=None):
            steps.append(batch)
            if batch == 1:
                signal.raise_signal(signal.SIGINT)
                steps.append("step 1 ran on")

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    y = np.array([0, 1] * 32)
    config = BranchConfig(view="rgb", image_size=16, base_filters=4, epochs=2, batch_size=16)
    with pytest.raises(KeyboardInterrupt):
        fit_branch(config, images, y, images[:16], y[:16], callbacks=[PressDuringStep()])
    assert steps == [0, 1, "step 1 ran on"], "the step in which Ctrl-C came was finished, the next never began"
    assert calls == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is handler


def test_pre_training_holds_ctrl_c_inside_a_step(noting_handler, monkeypatch):
    """pretrain_encoder: Ctrl-C while a step fetches its batch lets that step finish, then stops."""
    import models.pretrain as pretrain
    from models import BranchConfig

    _, calls = noting_handler
    fetched = []

    def fake_batches(fn, n_steps, out_shapes, first=0):
        def batches():
            for k in range(first, n_steps):
                x1, x2 = fn(k)
                if k == 1:
                    signal.raise_signal(signal.SIGINT)  # inside step 1, as a press during TensorFlow's work
                fetched.append(k)
                yield x1, x2
        return batches()

    monkeypatch.setattr(pretrain, "_numpy_batches", fake_batches)
    images = np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    config = BranchConfig(view="rgb", image_size=16, base_filters=4)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain_encoder(config, images, epochs=2, batch_size=8)
    assert fetched == [0, 1], "step 1 got its batch and ran; step 2 never began"
    assert calls == [signal.SIGINT]


def _tiny_branch():
    from models import BranchConfig
    from models.branch import build_branch

    config = BranchConfig(view="rgb", image_size=16, base_filters=4)
    return config, build_branch(config)


def test_grad_cam_holds_ctrl_c_until_its_gradient_pass_returns(noting_handler, monkeypatch):
    """explain: a press while Grad-CAM's model runs lets the pass finish (maps made), then stops."""
    import tensorflow as tf

    import models.gradcam as gradcam_module

    _, calls = noting_handler
    _, model = _tiny_branch()
    real = gradcam_module._grad_model

    def pressed_grad_model(m):
        grad_model, head = real(m)

        def run(x, training=False):
            signal.raise_signal(signal.SIGINT)  # a press during TensorFlow's forward pass
            return grad_model(x, training=training)
        return run, head

    resized = []
    real_resize = tf.image.resize
    monkeypatch.setattr(gradcam_module, "_grad_model", pressed_grad_model)
    monkeypatch.setattr(tf.image, "resize", lambda *a, **k: resized.append(1) or real_resize(*a, **k))
    with pytest.raises(KeyboardInterrupt):
        gradcam_module.gradcam(model, np.zeros((2, 16, 16, 3), np.float32))
    assert resized == [1], "the gradient pass ran to its end (the maps were upsampled) before the interrupt"
    assert calls == [signal.SIGINT]


def test_tent_holds_ctrl_c_inside_a_step_and_stops_between_steps(noting_handler, monkeypatch):
    """adapt: a press inside TENT step 1 lets that step's update happen; step 2 never begins."""
    import keras

    import models.adapt as adapt

    _, calls = noting_handler
    config, model = _tiny_branch()
    updates, inputs = [], []
    real_inputs = adapt.branch_inputs

    class CountingAdam(keras.optimizers.Adam):
        def apply(self, grads, variables=None):
            updates.append(len(updates))
            return super().apply(grads, variables)

    def pressed_inputs(cfg, images):
        inputs.append(len(images))
        if len(inputs) == 3:  # 1: the probabilities before; 2: step 0; 3: step 1
            signal.raise_signal(signal.SIGINT)
        return real_inputs(cfg, images)

    monkeypatch.setattr(adapt.keras.optimizers, "Adam", CountingAdam)
    monkeypatch.setattr(adapt, "branch_inputs", pressed_inputs)
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(KeyboardInterrupt):
        adapt.tent(model, config, images, steps=5, batch_size=8)
    assert updates == [0, 1], "step 1's update was applied; step 2 never began"
    assert len(inputs) == 3 and calls == [signal.SIGINT]
