"""How often `mnist-flax predict` is right on MNIST digits that do not look like MNIST's.

Writes held-out MNIST test digits as PNG files in eight variants, classifies every file with a
trained run exactly as `mnist-flax predict` does (`predict.predict_files`: read, made MNIST-like,
the run's input pipeline and forward pass), and prints per variant the fraction right, beside the
fraction right without the MNIST-like step (the file's gray pixels resized to 28x28 as they are),
and how far the MNIST-like digit is from the MNIST digit it was made from: its ink mass (the
sum of its gray levels, as a ratio of the original's), its mean gray difference a pixel, and its
stroke width (`predict.digit_stroke_width`, in MNIST pixels) beside the original's.

- original: the 28x28 digit as MNIST stores it, light ink on black;
- dark-on-light: inverted, dark ink on a white background;
- drawn-larger: inverted, upscaled 5x (bilinear) to 140x140;
- larger-canvas: scaled by 0.6-5x, dark on white, anywhere in a white canvas 1.5-2.5x its size;
- noisy-paper: scaled up 3-6x, dark gray ink on a gray "paper" background with a lighting
  gradient and Gaussian noise;
- thick-pen, thin-pen: the digit's strokes at 140x140 (bilinear upscale, thresholded at half
  level) thinned to their centre lines and redrawn dark on white with a round pen
  `THICK_PEN` or `THIN_PEN` pixels wide there (MNIST's strokes would be 10-15 wide there);
- even-pen: the same centre lines redrawn with a pen `EVEN_PEN` wide, MNIST's median stroke:
  the control for the two pens, since redrawing a digit with any even pen changes it.

For the thick pen it also counts the digits whose pen closed a loop (fewer enclosed background
regions than the even pen's drawing of the same centre lines: information gone before any
conversion), and the fraction right on the others, the even pen's beside it.

`--mnist-like FILE` takes `mnist_like` from another predict.py (an older commit's, say) to
compare conversions on the same files with the same measures.

Accuracy, not timing. Train the run on digits the variants do not use, e.g. (docs/results.md):

    mnist-flax train --weights ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5 \\
      --data-dir ../shared/data/mnist --train-split "test[:8000]" --test-split "test[8000:]" \\
      --image-size 96 --epochs 3 --workdir /tmp/run96
    python scripts/predict_variants.py --workdir /tmp/run96 --data-dir ../shared/data/mnist \\
      --split "test[9000:]" --count 1000 --out /tmp/variants
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys

import numpy as np
from PIL import Image
from scipy import ndimage

from mnist_flax import input_pipeline, predict
from mnist_flax.config import DIGIT_SIZE

VARIANTS = (
    "original",
    "dark-on-light",
    "drawn-larger",
    "larger-canvas",
    "noisy-paper",
    "thick-pen",
    "thin-pen",
    "even-pen",
)
# The pens' widths in pixels of the 140x140 drawing, where the digit is about 100 pixels tall: a
# marker (5-6 MNIST pixels, beyond all but MNIST's boldest digits) and a fine pen (a 1-pixel line
# of a 280x280 canvas drawn at half size).
THICK_PEN, THIN_PEN = 28, 3
# MNIST's median stroke width (2.5 pixels of its training digits, `predict.digit_stroke_width`).
EVEN_PEN = 13
DRAWN = 5 * DIGIT_SIZE


def variant(digit: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """One 28x28 uint8 MNIST digit as the variant `name`, a uint8 gray image of any size."""
    if name == "original":
        return digit
    if name == "dark-on-light":
        return 255 - digit
    if name == "drawn-larger":
        return 255 - _resized(digit, DRAWN)
    if name == "larger-canvas":
        side = round(DIGIT_SIZE * rng.uniform(0.6, 5.0))
        scaled = _resized(digit, side)
        height, width = round(side * rng.uniform(1.5, 2.5)), round(side * rng.uniform(1.5, 2.5))
        canvas = np.zeros((height, width), np.uint8)
        # Anywhere that keeps the whole digit in the canvas: mostly off-centre.
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        canvas[top : top + side, left : left + side] = scaled
        return 255 - canvas
    if name == "noisy-paper":
        side = round(DIGIT_SIZE * rng.uniform(3.0, 6.0))
        ink = _resized(digit, side).astype(np.float32) / 255.0
        paper, dark = rng.uniform(150, 210), rng.uniform(20, 70)
        rows, columns = np.mgrid[0:side, 0:side] / side
        angle = rng.uniform(0, 2 * np.pi)
        lighting = rng.uniform(5, 20) * (np.cos(angle) * rows + np.sin(angle) * columns - 0.5)
        image = paper + lighting - (paper - dark) * ink
        image += rng.normal(0, rng.uniform(5, 15), image.shape)
        return np.clip(np.round(image), 0, 255).astype(np.uint8)
    if name in ("thick-pen", "thin-pen", "even-pen"):
        centre_lines = _thinned(_resized(digit, DRAWN) >= 128)
        pen = {"thick-pen": THICK_PEN, "thin-pen": THIN_PEN, "even-pen": EVEN_PEN}[name]
        # Every pixel within half the pen's width of a centre line.
        drawn = ndimage.distance_transform_edt(~centre_lines) <= (pen - 1) / 2
        return np.where(drawn, 0, 255).astype(np.uint8)
    raise ValueError(f"unknown variant {name!r}")


def loops(image: np.ndarray) -> int:
    """How many loops (background regions enclosed by ink) a dark-on-white drawing has."""
    _, regions = ndimage.label(np.pad(image >= 128, 1))
    return regions - 1


def _resized(image: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR))


def _thinned(mask: np.ndarray) -> np.ndarray:
    """Zhang and Suen's thinning (1984): the strokes of a binary image as 1-pixel centre lines."""
    image = np.pad(mask, 1).astype(np.uint8)
    while True:
        removed = 0
        for step in (0, 1):
            centre = image[1:-1, 1:-1]
            # The 8 neighbours P2..P9, clockwise from north.
            p = [
                image[:-2, 1:-1], image[:-2, 2:], image[1:-1, 2:], image[2:, 2:],
                image[2:, 1:-1], image[2:, :-2], image[1:-1, :-2], image[:-2, :-2],
            ]  # fmt: skip
            neighbours = sum(p)
            transitions = sum((p[i] == 0) & (p[(i + 1) % 8] == 1) for i in range(8))
            if step == 0:
                corner = (p[0] * p[2] * p[4] == 0) & (p[2] * p[4] * p[6] == 0)
            else:
                corner = (p[0] * p[2] * p[6] == 0) & (p[0] * p[4] * p[6] == 0)
            delete = (
                (centre == 1) & (neighbours >= 2) & (neighbours <= 6) & (transitions == 1) & corner
            )
            centre[delete] = 0
            removed += int(delete.sum())
        if removed == 0:
            return image[1:-1, 1:-1].astype(bool)


def _loaded(path: pathlib.Path):
    """`mnist_like` of the Python file at `path`."""
    spec = importlib.util.spec_from_file_location(f"_mnist_like_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.mnist_like


def naive(image: np.ndarray) -> np.ndarray:
    """The file's gray pixels resized to 28x28 as they are: what a model sees without the
    MNIST-like step."""
    return _resized(np.clip(np.round(image), 0, 255).astype(np.uint8), DIGIT_SIZE)


def profile(converted: np.ndarray, originals: np.ndarray) -> dict:
    """How far MNIST-like digits are from the MNIST digits they were made from (means)."""
    converted, originals = converted.astype(np.float64), originals.astype(np.float64)
    return {
        "ink_ratio": float(np.mean(converted.sum((1, 2)) / originals.sum((1, 2)))),
        "mean_gray_difference": float(np.mean(np.abs(converted - originals))),
        "stroke_width": float(np.mean([predict.digit_stroke_width(d) for d in converted])),
        "original_stroke_width": float(np.mean([predict.digit_stroke_width(d) for d in originals])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained run (mnist-flax train)")
    parser.add_argument("--data-dir", required=True, help="MNIST IDX files")
    parser.add_argument("--split", default="test[9000:]", help="digits the run did not train on")
    parser.add_argument("--count", type=int, default=1000, help="digits, the split's first")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="where the PNGs go")
    parser.add_argument("--seed", type=int, default=0, help="the variants' random draws")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", type=pathlib.Path, help="also write the results here")
    parser.add_argument(
        "--mnist-like",
        type=pathlib.Path,
        metavar="FILE",
        help="a predict.py whose mnist_like makes the digits (default: this checkout's)",
    )
    args = parser.parse_args()
    mnist_like = predict.mnist_like if args.mnist_like is None else _loaded(args.mnist_like)

    split = input_pipeline.load_split("mnist", args.split, data_dir=args.data_dir)
    examples = list(split.examples.take(args.count).as_numpy_iterator())
    digits = np.stack([example["image"][..., 0] for example in examples])
    labels = np.array([int(example["label"]) for example in examples])
    rng = np.random.default_rng(args.seed)
    files = {name: [] for name in VARIANTS}
    pen_loops = {name: [] for name in ("thick-pen", "even-pen")}
    for index, digit in enumerate(digits):
        for name in VARIANTS:  # all drawn, so each variant's draws do not depend on --variants
            image = variant(digit, name, rng)
            if name in pen_loops:
                pen_loops[name].append(loops(image))
            if name in args.variants:
                path = args.out / name / f"{index:04d}_{labels[index]}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(path)
                files[name].append(path)

    classifier = predict.load_classifier(workdir=args.workdir)
    source = "" if args.mnist_like is None else f"; mnist_like of {args.mnist_like}"
    print(f"{len(digits)} digits of {split.name}; {classifier.description}{source}")
    results, right = {}, {}
    for name in args.variants:
        converted = np.stack(
            [mnist_like(predict.read_image(path), name=str(path)) for path in files[name]]
        )
        predicted = predict.predict_files(files[name], classifier, converted)
        predicted = np.array([r["top"][0]["class"] for r in predicted])
        raw = np.stack([naive(predict.read_image(path)) for path in files[name]])
        without = classifier.probabilities(raw).argmax(axis=1)
        results[name] = {
            "right": int(np.sum(predicted == labels)),
            "right_without_mnist_like": int(np.sum(without == labels)),
            "count": len(labels),
            **profile(converted, digits),
        }
        right[name] = predicted == labels
    if "thick-pen" in results:
        closed = np.less(pen_loops["thick-pen"], pen_loops["even-pen"])
        results["thick-pen"]["loops_closed"] = int(closed.sum())
        results["thick-pen"]["right_where_no_loop_closed"] = int(right["thick-pen"][~closed].sum())
        if "even-pen" in right:
            results["thick-pen"]["even_pen_right_there"] = int(right["even-pen"][~closed].sum())
    print(
        "| variant | right | fraction right | without the MNIST-like step "
        "| ink mass / original's | mean gray difference | stroke width (original's) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, result in results.items():
        count = result["count"]
        print(
            f"| {name} | {result['right']}/{count} | {result['right'] / count:.1%} | "
            f"{result['right_without_mnist_like'] / count:.1%} | {result['ink_ratio']:.3f} | "
            f"{result['mean_gray_difference']:.2f} | {result['stroke_width']:.2f} "
            f"({result['original_stroke_width']:.2f}) |"
        )
    if "thick-pen" in results:
        result = results["thick-pen"]
        kept = result["count"] - result["loops_closed"]
        even = result.get("even_pen_right_there")
        print(
            f"thick-pen: the pen closed a loop in {result['loops_closed']} digits; right on "
            f"{result['right_where_no_loop_closed'] / kept:.1%} of the other {kept}"
            + ("" if even is None else f" (the even pen on them: {even / kept:.1%})")
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
