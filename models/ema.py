"""Weight averaging (``BranchConfig.weight_ema``) with BatchNorm statistics that match the average.

Keras' optimizer EMA averages the trainable weights only. BatchNorm's moving mean and variance
are not trainable: they follow the *training* weights (momentum 0.9, about the last 10 steps), so
a model evaluated on averaged weights normalises with statistics of other weights. SWA (Izmailov
et al. 2018) recomputes them with one pass over training data; this module does the same before
every validation, so validation, early stopping and the saved branch all see consistent statistics.
"""

from __future__ import annotations

from typing import Any, Iterable

import keras
import numpy as np

from models.checkpoint import seed_states, set_seed_states
from models.sampling import epoch_order

#: Training images whose statistics the averaged weights' BatchNorm layers are re-estimated on
#: (drawn once per training, fixed): 1,024 keeps the cost near 5% of an epoch of 6,828 images.
BN_IMAGES = 1024


def batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """The model's BatchNormalization layers that training updates (frozen ones keep their statistics)."""
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]


def reestimate_batchnorm(model: keras.Model, batches: Iterable[Any],
                         twin: keras.Model | None = None) -> int:
    """Set every trainable BatchNorm layer's moving mean and variance to their averages over ``batches``.

    Each batch runs forward in training mode (each layer normalises by its batch's statistics, as
    in training); layer momenta are set so the moving statistics end as the plain average of the
    batches' statistics (PyTorch's ``momentum=None``), then put back, as are the dropout
    generators. Returns the number of batches.

    ``twin`` is a one-device model of the same architecture, for a model under a distribution
    strategy: a forward pass in the cross-replica context would not update each replica's own
    statistics, so they are estimated on the twin (given the model's weights) and all the
    weights copied back, which assigns every replica.
    """
    if twin is not None:
        twin.set_weights(model.get_weights())
        seen = reestimate_batchnorm(twin, batches)
        model.set_weights(twin.get_weights())
        return seen
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    # Training-mode calls draw dropout masks; put the generators back so the training that
    # follows draws exactly what it would have without the re-estimation.
    seeds = seed_states(model)
    seen = 0
    try:
        for x in batches:
            if isinstance(x, (tuple, list)):
                x = x[0]
            for layer in layers:
                layer.momentum = seen / (seen + 1.0)  # moving ← k/(k+1)·moving + 1/(k+1)·batch
            model(x, training=True)  # eager: each call reads the momenta just set
            seen += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        set_seed_states(model, seeds)
    return seen


#: Below this many optimizer steps, validation runs on BatchNorm statistics re-estimated on the
#: training sample (``BatchNormWarmup``). The moving statistics start at mean 0 and variance 1 and
#: follow the weights at momentum 0.9: after 50 steps the start weighs 0.9**50 ≈ 0.5%. Earlier,
#: a model that pools before BatchNorm (whose inputs, maxima, have means far from 0) can score an
#: inverted validation AUC; a real training's first validation comes after hundreds of steps.
BN_WARMUP_STEPS = 50


class BatchNormWarmup(keras.callbacks.Callback):
    """Re-estimates BatchNorm statistics before each validation while training is under
    ``BN_WARMUP_STEPS`` steps (a few epochs of a tiny folder), so early validations, early stopping
    and a short run's saved branch use statistics of the current weights, not lagging ones.

    The statistics stay in the model, as with ``SwapEMAWithBatchNorm``; training-mode steps
    normalise by batch statistics, so training itself is unchanged (the dropout draws too).
    """

    def __init__(self, make_batches, twin: keras.Model | None = None):
        super().__init__()
        self.make_batches, self.twin = make_batches, twin

    def on_test_begin(self, logs=None):
        # optimizer.iterations counts the steps of this run and of the run a --resume continues.
        if int(self.model.optimizer.iterations.numpy()) < BN_WARMUP_STEPS:
            reestimate_batchnorm(self.model, self.make_batches(), self.twin)


class SwapEMAWithBatchNorm(keras.callbacks.SwapEMAWeights):
    """Keras' ``SwapEMAWeights`` plus BatchNorm statistics re-estimated for the averaged weights.

    Before each validation the averaged weights go in (Keras) and the BatchNorm statistics are
    recomputed on ``make_batches()`` (the same fixed training images each time). They stay in the
    model after validation: the epoch's checkpoint and best weights (``averaged_weights``) take
    them with the averages, and training-mode steps normalise by batch statistics, so the training
    weights never read them.
    """

    def __init__(self, make_batches, twin: keras.Model | None = None):
        super().__init__()
        self.make_batches, self.twin = make_batches, twin

    def on_test_begin(self, logs=None):
        super().on_test_begin(logs)
        reestimate_batchnorm(self.model, self.make_batches(), self.twin)


def batchnorm_sample(y: np.ndarray, sampling: str, seed: int, sources: np.ndarray | None = None,
                     source_balance: float = 0.0) -> np.ndarray:
    """Indices of the training images the statistics are estimated on: the first ``BN_IMAGES`` of one
    epoch's order under the training's own sampling (shuffled, fixed by ``seed``).

    The training's class mix matters: BatchNorm learnt with oversampled (half melanoma) batches, and
    statistics of the natural 16% mix shift every feature and the probabilities with them.
    """
    order = epoch_order(np.asarray(y), sampling, np.random.default_rng([seed, BN_IMAGES]), sources, source_balance)
    return order[:BN_IMAGES]
