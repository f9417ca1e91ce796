"""Building the classifier a run's config names, from the weights `--weights` names.

This module owns `create_model`: the architecture options (`--model`, `--alpha`, `--dtype`,
`--conv-impl`, `--fine-tune-from`) and where the parameters come from (`--weights`: random, Keras'
ImageNet download, a Keras H5 file, or a directory `mnist-flax convert` wrote, which may hold a
whole trained classifier). The classifiers themselves are `model.py`'s, the converter `convert.py`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mnist_flax.config import DIGIT_SIZE, TrainConfig, fine_tune_layer
from mnist_flax.mobilenet_v2 import MobileNetV2
from mnist_flax.model import NotebookAdapter, TransferClassifier

# `config.dtype` names -> compute dtypes.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_backbone(config: TrainConfig, rngs: nnx.Rngs) -> MobileNetV2:
    """The backbone `config.weights` names: random ("none"), Keras ImageNet, an H5 file or a converted dir."""
    options = dict(
        alpha=config.alpha,
        include_top=False,
        pooling="avg",
        conv_impl=config.conv_impl,
        dtype=COMPUTE_DTYPES[config.dtype],
    )
    if config.weights == "none":
        return MobileNetV2(**options, rngs=rngs)
    # Imported here: the converter pulls in h5py and, for "imagenet", the Keras download cache.
    from mnist_flax import convert

    return convert.mobilenet_v2_from_keras(
        config.weights, input_shape=(config.image_size, config.image_size, 3), **options
    )


def create_model(config: TrainConfig, num_classes: int) -> TransferClassifier:
    """The classifier `config.model` names, initialised from `config.seed`.

    The backbone, the head and the notebook's adapter draw from separate keys (the pipeline
    model's head draws what it drew before the adapter existed). A `config.weights` directory
    holding a whole converted classifier (`mnist-flax convert --keras-model`) fills every
    parameter, trained head and adapter included.
    """
    # Imported here: the converter pulls in h5py (and Orbax for converted directories).
    from mnist_flax import convert

    classifier_dir = convert.is_converted_classifier(config.weights)

    def build() -> TransferClassifier:
        key = jax.random.key(config.seed)
        backbone_key, head_key = jax.random.split(key)
        backbone_config = dataclasses.replace(config, weights="none") if classifier_dir else config
        backbone = build_backbone(backbone_config, nnx.Rngs(params=backbone_key))
        adapter = None
        if config.model == "notebook":
            adapter = NotebookAdapter(
                config.image_size // DIGIT_SIZE,
                conv_impl=config.conv_impl,
                rngs=nnx.Rngs(params=jax.random.fold_in(key, 2)),
            )
        fine_tune_from = fine_tune_layer(config.fine_tune_from) if config.fine_tune_epochs else None
        return TransferClassifier(
            backbone,
            num_classes,
            image_size=config.image_size,
            adapter=adapter,
            fine_tune_from=fine_tune_from,
            rngs=nnx.Rngs(params=head_key),
        )

    if classifier_dir:
        # Shapes only: every array comes from the directory, nothing is drawn to be overwritten.
        model = nnx.eval_shape(build)
        convert.restore_classifier(config.weights, model)
        return model
    return build()
