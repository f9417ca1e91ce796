"""How often `mnist-flax predict` is right on MNIST digits that do not look like MNIST's.

Writes held-out MNIST test digits as PNG files in four variants, classifies every file with a
trained run exactly as `mnist-flax predict` does (`predict.predict_files`: read, made MNIST-like,
the run's input pipeline and forward pass), and prints the fraction right per variant, beside the
fraction right without the MNIST-like step (the file's gray pixels resized to 28x28 as they are):

- original: the 28x28 digit as MNIST stores it, light ink on black;
- dark-on-light: inverted, dark ink on a white background;
- shifted-scaled: the digit scaled by 0.6-3x, placed off-centre in a larger black canvas;
- photo-like: scaled up 3-6x, dark gray ink on a gray "paper" background with a lighting
  gradient and Gaussian noise.

Accuracy, not timing. Train the run on digits the variants do not use, e.g. (docs/results.md):

    mnist-flax train --weights ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5 \\
      --data-dir ../shared/data/mnist --train-split "test[:8000]" --test-split "test[8000:]" \\
      --workdir /tmp/run21
    python scripts/predict_variants.py --workdir /tmp/run21 --data-dir ../shared/data/mnist \\
      --split "test[8000:]" --count 250 --out /tmp/variants
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
from PIL import Image

from mnist_flax import input_pipeline, predict
from mnist_flax.config import DIGIT_SIZE

VARIANTS = ("original", "dark-on-light", "shifted-scaled", "photo-like")


def variant(digit: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """One 28x28 uint8 MNIST digit as the variant `name`, a uint8 gray image of any size."""
    if name == "original":
        return digit
    if name == "dark-on-light":
        return 255 - digit
    if name == "shifted-scaled":
        side = round(DIGIT_SIZE * rng.uniform(0.6, 3.0))
        scaled = _resized(digit, side)
        height, width = round(side * rng.uniform(1.5, 2.5)), round(side * rng.uniform(1.5, 2.5))
        canvas = np.zeros((height, width), np.uint8)
        # Anywhere that keeps the whole digit in the canvas: mostly off-centre.
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        canvas[top : top + side, left : left + side] = scaled
        return canvas
    if name == "photo-like":
        side = round(DIGIT_SIZE * rng.uniform(3.0, 6.0))
        ink = _resized(digit, side).astype(np.float32) / 255.0
        paper, dark = rng.uniform(150, 210), rng.uniform(20, 70)
        rows, columns = np.mgrid[0:side, 0:side] / side
        angle = rng.uniform(0, 2 * np.pi)
        lighting = rng.uniform(5, 20) * (np.cos(angle) * rows + np.sin(angle) * columns - 0.5)
        image = paper + lighting - (paper - dark) * ink
        image += rng.normal(0, rng.uniform(5, 15), image.shape)
        return np.clip(np.round(image), 0, 255).astype(np.uint8)
    raise ValueError(f"unknown variant {name!r}")


def _resized(image: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR))


def naive(image: np.ndarray) -> np.ndarray:
    """The file's gray pixels resized to 28x28 as they are: what a model sees without the
    MNIST-like step."""
    return _resized(np.clip(np.round(image), 0, 255).astype(np.uint8), DIGIT_SIZE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained run (mnist-flax train)")
    parser.add_argument("--data-dir", required=True, help="MNIST IDX files")
    parser.add_argument("--split", default="test[8000:]", help="digits the run did not train on")
    parser.add_argument("--count", type=int, default=250, help="digits, the split's first")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="where the PNGs go")
    parser.add_argument("--seed", type=int, default=0, help="the variants' random draws")
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = parser.parse_args()

    split = input_pipeline.load_split("mnist", args.split, data_dir=args.data_dir)
    examples = list(split.examples.take(args.count).as_numpy_iterator())
    digits = np.stack([example["image"][..., 0] for example in examples])
    labels = np.array([int(example["label"]) for example in examples])
    rng = np.random.default_rng(args.seed)
    files = {name: [] for name in VARIANTS}
    for index, digit in enumerate(digits):
        for name in VARIANTS:
            path = args.out / name / f"{index:04d}_{labels[index]}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(variant(digit, name, rng)).save(path)
            files[name].append(path)

    classifier = predict.load_classifier(workdir=args.workdir)
    print(f"{len(digits)} digits of {split.name}; {classifier.description}")
    results = {}
    for name in VARIANTS:
        predicted = [r["top"][0]["class"] for r in predict.predict_files(files[name], classifier)]
        raw = np.stack([naive(predict.read_image(path)) for path in files[name]])
        without = classifier.probabilities(raw).argmax(axis=1)
        results[name] = {
            "right": int(np.sum(np.array(predicted) == labels)),
            "right_without_mnist_like": int(np.sum(without == labels)),
            "count": len(labels),
        }
    print("| variant | right | fraction right | without the MNIST-like step |")
    print("| --- | --- | --- | --- |")
    for name, result in results.items():
        count = result["count"]
        print(
            f"| {name} | {result['right']}/{count} | {result['right'] / count:.1%} | "
            f"{result['right_without_mnist_like'] / count:.1%} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
