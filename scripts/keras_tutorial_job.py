"""The tutorial's job in Keras, for whole-process comparisons with `mnist-flax train`.

Builds the tutorial's model (ImageNet MobileNetV2 frozen, GlobalAveragePooling2D, Dense(10,
softmax), Adam, categorical cross-entropy: `benchmark.subjects.keras_classifier`, the benchmark's
Keras baseline) in Keras 3 on `--backend` (tensorflow, or jax: the notebook as a JAX user would run
it, `KERAS_BACKEND=jax`), feeds it the same tf.data images as this project (`input_pipeline`: RGB,
resized, in [-1, 1]; with `--model notebook` the notebook's own model on 28x28 digits in [0, 1])
and runs `model.fit` with the test split as validation data. Time the whole process, imports
included, e.g. the one-epoch job of docs/benchmarks.md (`scripts/whole_process_rounds.sh` runs
it round after round beside ours):

    /usr/bin/time -f "%e s" python scripts/keras_tutorial_job.py --backend jax \\
        --weights ../shared/weights/FILE.h5 --data-dir ../shared/data/mnist \\
        --train-split "test[:1024]" --test-split "test[9744:]" --epochs 1
"""

from __future__ import annotations

import argparse
import time

from mnist_flax import input_pipeline
from mnist_flax.benchmark.flags import KERAS_BACKENDS
from mnist_flax.benchmark.subjects import (
    NUM_CLASSES,
    import_keras,
    keras_classifier,
    keras_environment,
)
from mnist_flax.config import MODELS


def images_and_one_hot(args: argparse.Namespace, split: str):
    """The split's batches as `fit` takes them: (images, one-hot labels), padding dropped."""
    import tensorflow as tf  # loaded already by input_pipeline, without Keras (runtime.py)

    source = input_pipeline.load_split(args.dataset, split, data_dir=args.data_dir)
    batches = input_pipeline.make_batches(
        source,
        batch_size=args.batch_size,
        image_size=args.image_size,
        shuffle_seed=None,
        resize="none" if args.model == "notebook" else "host",
    )
    return batches.map(
        lambda batch: (
            tf.boolean_mask(batch["image"], batch["mask"]),
            tf.one_hot(tf.boolean_mask(batch["label"], batch["mask"]), NUM_CLASSES),
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=KERAS_BACKENDS, default=KERAS_BACKENDS[0])
    parser.add_argument("--weights", required=True, help="Keras MobileNetV2 H5 weights (no top)")
    parser.add_argument("--data-dir", default=None, help="IDX files (default: tfds)")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--model", choices=MODELS, default=MODELS[0])
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # Before anything imports Keras: its backend is fixed at its import.
    keras = import_keras(args.backend)
    environment = keras_environment(keras)
    print(
        f"Keras {environment['keras']} on {args.backend} {environment['backend_version']}, "
        f"{environment['platform']}",
        flush=True,
    )
    model = keras_classifier(1.0, args.image_size, args.weights, args.seed, model=args.model)
    train, test = (images_and_one_hot(args, split) for split in (args.train_split, args.test_split))
    began = time.perf_counter()
    history = model.fit(train, epochs=args.epochs, validation_data=test, verbose=0)
    for epoch, accuracy in enumerate(history.history["val_accuracy"], 1):
        print(f"epoch {epoch}/{args.epochs}  test accuracy {accuracy:.2%}")
    print(f"fit: {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
