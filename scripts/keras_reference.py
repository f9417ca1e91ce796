"""The Keras tutorial's head training, on Keras' and on our backbone features, for comparison.

Trains the tutorial's head (Dense(10, softmax), Adam 1e-3, categorical cross-entropy, batch 32,
`fit(shuffle=True)`) with Keras on the frozen MobileNetV2's pooled features, for several seeds, and
prints the test accuracy after every epoch. It does so twice: on the features Keras' own
MobileNetV2 computes and on those of this project's NNX MobileNetV2 (converted from the same file),
and prints how far the two feature sets are apart. It also shows which order `fit` feeds the
examples in, epoch after epoch (`--show-order`).

The backbone is frozen, so training the head on precomputed features is the same computation as the
tutorial's end-to-end `fit`, only cheaper. Example (the README's 96x96 comparison):

    python scripts/keras_reference.py --weights ../shared/weights/FILE.h5 \\
        --data-dir ../shared/data/mnist --image-size 96 --seeds 0 1 2 3 4 --show-order
"""

from __future__ import annotations

import argparse

import jax
import keras
import numpy as np
from flax import nnx

from mnist_flax import convert, input_pipeline


def images_and_labels(args: argparse.Namespace, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's images as the training pipeline prepares them (RGB, resized, in [-1, 1])."""
    source = input_pipeline.load_split(args.dataset, split, data_dir=args.data_dir)
    batches = input_pipeline.make_batches(
        source, batch_size=250, image_size=args.image_size, shuffle_seed=None
    )
    images, labels = [], []
    for batch in batches.as_numpy_iterator():
        images.append(batch["image"][batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
    return np.concatenate(images), np.concatenate(labels)


def our_features(args: argparse.Namespace, images: np.ndarray) -> np.ndarray:
    model = convert.mobilenet_v2_from_keras(args.weights, pooling="avg")
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return np.concatenate(
        [np.asarray(forward(state, images[i : i + 50])) for i in range(0, len(images), 50)]
    )


def keras_head_accuracies(features, labels, test_features, test_labels, seed, epochs):
    keras.utils.set_random_seed(seed)
    head = keras.Sequential(
        [keras.Input(features.shape[1:]), keras.layers.Dense(10, activation="softmax")]
    )
    head.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"]
    )
    history = head.fit(
        features,
        keras.utils.to_categorical(labels, 10),
        batch_size=32,
        epochs=epochs,
        shuffle=True,
        validation_data=(test_features, keras.utils.to_categorical(test_labels, 10)),
        verbose=0,
    )
    return history.history["val_accuracy"]


def first_batch_of_each_epoch(seed: int, epochs: int = 3) -> list[list[int]]:
    """The examples `fit(shuffle=True)` puts first in each epoch, recorded by an eager layer."""
    keras.utils.set_random_seed(seed)
    seen: list[list[int]] = []

    class Record(keras.layers.Layer):
        def call(self, x, training=None):
            if training:
                seen.append(np.asarray(x)[:, 0].astype(int).tolist())
            return x

    model = keras.Sequential([keras.Input((1,)), Record(), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse", run_eagerly=True)
    x = np.arange(64, dtype=np.float32)[:, None]
    model.fit(x, x, batch_size=8, epochs=epochs, shuffle=True, verbose=0)
    return [seen[epoch * 8] for epoch in range(epochs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="Keras MobileNetV2 H5 weights (no top)")
    parser.add_argument("--data-dir", default=None, help="IDX files (default: tfds)")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--train-split", default="test[:8000]")
    parser.add_argument("--test-split", default="test[8000:]")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--show-order", action="store_true")
    args = parser.parse_args()

    train_images, train_labels = images_and_labels(args, args.train_split)
    test_images, test_labels = images_and_labels(args, args.test_split)
    size = args.image_size
    backbone = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), include_top=False, weights=args.weights, pooling="avg"
    )
    backbone.trainable = False
    keras_features = [
        backbone.predict(x, batch_size=64, verbose=0) for x in (train_images, test_images)
    ]
    ours = [our_features(args, x) for x in (train_images, test_images)]
    gap = max(np.abs(a - b).max() for a, b in zip(ours, keras_features, strict=True))
    print(
        f"pooled features at {size}x{size}: max |ours - keras| = {gap:.2e}, "
        f"max |keras| = {np.abs(keras_features[1]).max():.2f}"
    )
    for name, (features, test_features) in (("keras", keras_features), ("ours", ours)):
        for seed in args.seeds:
            accuracies = keras_head_accuracies(
                features, train_labels, test_features, test_labels, seed, args.epochs
            )
            print(
                f"Keras head on {name:5} features, seed {seed}: test accuracy per epoch "
                + " ".join(f"{a:.4f}" for a in accuracies)
            )
    if args.show_order:
        for seed in args.seeds[:1]:
            print(
                f"fit(shuffle=True) first batch of epochs 1-3 (seed {seed}):",
                first_batch_of_each_epoch(seed),
            )


if __name__ == "__main__":
    main()
