"""Your own digit: an image file made into an MNIST digit, and a trained classifier's top classes.

`mnist_like` turns any picture of one digit (PNG or JPEG, any size, dark ink on a light background
or light on dark, anywhere in the frame) into what MNIST's digits are, by the recipe MNIST was made
with: grayscale, ink light on black, cropped to the ink, scaled (keeping its aspect ratio) so that
its longer side is 20 pixels, anti-aliased as MNIST's binary scans were (the fraction of each pixel
the ink covers) with strokes as wide as MNIST's, and placed in a 28x28 frame so that its centre of
mass is at the frame's centre, pixel (14, 14). A model trained on MNIST has only ever seen digits
like that; an uncentred, dark-on-light, blurred or thick-penned digit is a different input, and
gets other answers.

`load_classifier` restores a run's checkpoint exactly as `mnist-flax evaluate` does
(`evaluate.choose_checkpoint`, `evaluate.restore_model`), or builds a converted classifier
(`--weights DIR`); `Classifier.probabilities` runs digits through the run's own input pipeline
(`input_pipeline.make_batches`) and the `StepRunner`'s softmax forward pass. `mnist-flax predict`
(`cli.py`) and the notebook's "your own digit" cell call these.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from mnist_flax import evaluate, input_pipeline, runtime
from mnist_flax.build import create_model
from mnist_flax.config import DIGIT_SIZE, ConfigError, TrainConfig
from mnist_flax.model import TransferClassifier, resolve_resize
from mnist_flax.steps import StepRunner, make_metrics

# MNIST's digits: the ink's bounding box is 20 pixels on its longer side (every test digit's is),
# and its centre of mass sits at pixel (14, 14) of the 28x28 frame (the test digits' mean is
# (13.99, 14.01), an integer shift away from it).
INK_BOX = 20
CENTRE = DIGIT_SIZE // 2
# A pixel is ink when it differs from the background by more than this many standard deviations of
# the background's noise (estimated from the image's border, robustly: 1.4826 x its MAD).
INK_THRESHOLD_SIGMAS = 4.0
# How finely a digit is rebuilt and its strokes measured: grid pixels a side per MNIST pixel (fine
# enough that a pen a fifth of an MNIST pixel wide is 2 grid pixels: a 1-pixel line measures 2).
SUPERSAMPLE = 10
# The stroke widths (in MNIST pixels, `digit_stroke_width`) a rebuilt digit is brought within: the
# 25th and 95th percentiles of the MNIST digits the models here train on (test[:8000]). Chosen on
# held-out digits 8000-8999 (docs/results.md): from the 5th, thin pens gained 0.4 and 1.0 points
# (96 and 224 px models); down to the 75th, thick pens gained 1.0 and 0.0, but bold digits drawn
# larger came back thinner than they are (2-5% less ink).
STROKE_WIDTHS = (2.12, 4.05)
# How many classes `mnist-flax predict` shows per image.
TOP_SHOWN = 3


class ImageError(ValueError):
    """An image that cannot be read, or that holds no digit; the message names the file."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The image file at `path` as grayscale float32 [H, W] in 0..255 (any format Pillow reads).

    A photo is turned upright by its EXIF orientation. Transparent pixels are laid on white when
    the opaque ones are dark (ink drawn on a transparent canvas), else on black.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    advice = "give a PNG or JPEG file of one digit"
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file; {advice}") from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{path}: cannot be read as an image (not in a format Pillow reads); {advice}"
        ) from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        # Truncated or corrupt files, directories, images too large to decode safely.
        raise ImageError(f"{path}: cannot be read as an image ({error}); {advice}") from None
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"))
        gray = np.asarray(rgba.convert("L"), np.float32)
        opaque = alpha > 0
        light_ink = opaque.any() and gray[opaque].mean() > 127.5
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255) if light_ink else "white")
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("L"), np.float32)


def mnist_like(image: np.ndarray, *, name: str = "the image") -> np.ndarray:
    """One digit's image ([H, W] gray or [H, W, 3] RGB, 0..255) as an MNIST digit, uint8 [28, 28].

    1. Gray, with the ink light on black: the background is the median of the image's border, and
       an image whose background is light is inverted.
    2. Ink is what stands out of the background by more than `INK_THRESHOLD_SIGMAS` times the
       border's noise (in a noisy image after a 3x3 median filter, which removes isolated specks
       and keeps strokes a few pixels wide); the rest becomes black. No ink: `ImageError`.
    3. Cropped to the ink's bounding box. One whose longer side is not `INK_BOX` pixels already
       is rebuilt at that size as MNIST made its digits from NIST's binary scans (`_rebuilt`:
       binarised on a fine grid, strokes brought within MNIST's widths, area-averaged down):
       its own edge blur, pen and paper are not MNIST's, and scaling them down as they were
       (Lanczos) took a tenth of the ink of a digit drawn 5x larger. Its brightest pixel made 255.
    4. Placed in the 28x28 frame with its centre of mass at pixel (`CENTRE`, `CENTRE`), as MNIST
       centred its digits (ink pushed past the frame's edge is cut off, as in MNIST).

    An MNIST digit itself comes back unchanged but for a rounding of its brightness.
    `name` names the image in the error message.
    """
    from PIL import Image, ImageFilter

    gray = np.asarray(image, np.float32)
    if gray.ndim == 3 and gray.shape[-1] in (1, 3, 4):
        # ITU-R 601-2 luma, what Pillow's convert("L") computes.
        gray = gray[..., 0] if gray.shape[-1] == 1 else gray[..., :3] @ [0.299, 0.587, 0.114]
    if gray.ndim != 2 or gray.size == 0:
        raise ImageError(f"{name}: expected a 2-D gray or RGB image, got shape {gray.shape}")
    border = _border(gray)
    background = float(np.median(border))
    if background > 127.5:  # a light background: dark ink, inverted into MNIST's light ink
        gray, border, background = 255.0 - gray, 255.0 - border, 255.0 - background
    noise = 1.4826 * float(np.median(np.abs(border - background)))
    contrast = gray - background
    if noise > 0:
        contrast = np.asarray(
            Image.fromarray(contrast).filter(ImageFilter.MedianFilter(3)), np.float32
        )
    ink = np.where(contrast > INK_THRESHOLD_SIGMAS * noise, contrast, 0.0).astype(np.float32)
    rows, columns = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if rows.size == 0:
        levels = "one gray level" if np.ptp(gray) == 0 else "nothing stands out of its background"
        raise ImageError(
            f"{name}: no digit found, the image is blank ({levels}); give an image of one "
            "handwritten digit, dark on light or light on dark"
        )
    ink = ink[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
    if max(ink.shape) != INK_BOX:
        ink = _rebuilt(ink)
    ink *= 255.0 / ink.max()
    return _centred(ink)


def _box_size(shape: tuple[int, int], grid: int = 1) -> tuple[int, int]:
    """(width, height) of an image of `shape` scaled into the `INK_BOX` box on a grid `grid`
    times finer, keeping its aspect ratio."""
    height, width = shape
    scale = INK_BOX / max(height, width)
    return grid * max(1, round(width * scale)), grid * max(1, round(height * scale))


def _rebuilt(ink: np.ndarray) -> np.ndarray:
    """A digit's ink [H, W] (light on black) as MNIST made a digit, float [20, <=20]:

    1. Scaled onto a grid `SUPERSAMPLE` times finer than the 20-pixel box (bilinear, averaging
       when shrinking) and binarised there at half its ink's level (its 90th percentile, not
       lifted by a stray speck): the pen's own edge, a blur or the light on the paper no longer
       set how much ink there is, and a small digit's edges are interpolated, not blocky.
    2. Cropped to that ink and fitted to the box again.
    3. Strokes thinner or thicker than MNIST's (`STROKE_WIDTHS`, `stroke_width`) drawn out or
       eaten into evenly, to the range's nearer end, and fitted to the box again: a thin or thick
       pen's digit gets about the ink MNIST's would have. Once, not until the width is exact: a
       thick pen's digit, its box shrunk by the eating, comes back a little bolder than the range,
       and eating on until it did not cost thick pens 3-4 points (docs/results.md).
    4. Area-averaged down to the box: each pixel the fraction of it the ink covers, the
       anti-aliasing MNIST's digits were made with.
    """
    from PIL import Image
    from scipy import ndimage

    fine = Image.fromarray(ink).resize(_box_size(ink.shape, SUPERSAMPLE), Image.Resampling.BILINEAR)
    fine = np.asarray(fine)
    mask = _fitted(fine > np.percentile(fine[fine > 0], 90) / 2)
    width = stroke_width(mask) / SUPERSAMPLE
    wanted = min(max(width, STROKE_WIDTHS[0]), STROKE_WIDTHS[1])
    if wanted != width:
        # Every stroke's edge moved out (or in) by half the difference: the pixels whose signed
        # distance to the edge (positive inside) exceeds it, on a frame with room to grow.
        mask = np.pad(mask, int(np.ceil(STROKE_WIDTHS[0] * SUPERSAMPLE / 2)) + 1)
        inside = ndimage.distance_transform_edt(mask) - 0.5
        signed = np.where(mask, inside, 0.5 - ndimage.distance_transform_edt(~mask))
        mask = _fitted(signed > (width - wanted) / 2 * SUPERSAMPLE)
    covered = Image.fromarray(mask.astype(np.uint8) * 255).reduce(SUPERSAMPLE)
    return np.asarray(covered, np.float32)


def _fitted(mask: np.ndarray) -> np.ndarray:
    """A binary image cropped to its ink and fitted to the box on the fine grid (bilinear,
    thresholded at half)."""
    from PIL import Image

    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    mask = mask[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
    size = _box_size(mask.shape, SUPERSAMPLE)
    resized = Image.fromarray(mask.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(resized) >= 0.5


def _border(gray: np.ndarray) -> np.ndarray:
    """The pixels of the image's outer ring (a 20th of its shorter side wide, at least one)."""
    width = max(1, min(gray.shape) // 20)
    mask = np.ones(gray.shape, bool)
    mask[width:-width, width:-width] = False
    return gray[mask]


def _centred(ink: np.ndarray) -> np.ndarray:
    """`ink` pasted into a black 28x28 frame with its centre of mass at (CENTRE, CENTRE), uint8."""
    height, width = ink.shape
    total = ink.sum()
    centre_y = (ink.sum(axis=1) @ np.arange(height)) / total
    centre_x = (ink.sum(axis=0) @ np.arange(width)) / total
    top, left = round(CENTRE - centre_y), round(CENTRE - centre_x)
    frame = np.zeros((DIGIT_SIZE, DIGIT_SIZE), np.float32)
    # The part of the ink that lands inside the frame.
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(DIGIT_SIZE, top + height), min(DIGIT_SIZE, left + width)
    frame[y0:y1, x0:x1] = ink[y0 - top : y1 - top, x0 - left : x1 - left]
    return np.round(frame).astype(np.uint8)


def stroke_width(mask: np.ndarray) -> float:
    """The mean width of a binary image's strokes, in its pixels: 4 x the mean distance from an ink
    pixel's centre to the stroke's edge (spread evenly over 0..w/2 across a stroke w wide)."""
    from scipy import ndimage

    # Framed in background, so that ink at the image's edge ends there.
    mask = np.pad(np.asarray(mask, bool), 1)
    if not mask.any():
        return 0.0
    # The Euclidean distance transform measures to the nearest background pixel's centre, half a
    # pixel beyond the edge.
    return 4.0 * (float(ndimage.distance_transform_edt(mask)[mask].mean()) - 0.5)


def digit_stroke_width(digit: np.ndarray) -> float:
    """An MNIST-like digit's mean stroke width in its pixels, measured on it upscaled
    `SUPERSAMPLE` times (bilinear) and thresholded at half brightness."""
    from PIL import Image

    digit = np.asarray(digit, np.float32)
    size = (digit.shape[1] * SUPERSAMPLE, digit.shape[0] * SUPERSAMPLE)
    upscaled = np.asarray(Image.fromarray(digit).resize(size, Image.Resampling.BILINEAR))
    return stroke_width(upscaled >= 127.5) / SUPERSAMPLE


def load_digit(path: str | os.PathLike) -> np.ndarray:
    """The image file at `path` as an MNIST digit, uint8 [28, 28] (`read_image`, `mnist_like`)."""
    return mnist_like(read_image(path), name=str(path))


@dataclasses.dataclass
class Classifier:
    """A trained classifier, the config it runs with, and which one it is (for the user)."""

    model: TransferClassifier
    config: TrainConfig
    description: str

    @functools.cached_property
    def runner(self) -> StepRunner:
        return StepRunner(self.model, None, make_metrics())

    @property
    def num_classes(self) -> int:
        return self.model.head.out_features

    def probabilities(self, digits: np.ndarray) -> np.ndarray:
        """Class probabilities [N, classes] of MNIST-like digits uint8 [N, 28, 28].

        The digits go through the run's own input pipeline (`input_pipeline.make_batches`, the
        resize and scaling of its model) and the softmax forward pass, as `evaluate` runs a split.
        """
        digits = np.asarray(digits, np.uint8).reshape(-1, DIGIT_SIZE, DIGIT_SIZE, 1)
        count = len(digits)
        split = input_pipeline.in_memory_split(
            digits, np.zeros(count, np.int32), num_classes=self.num_classes, name="images"
        )
        batches = input_pipeline.make_batches(
            split,
            batch_size=max(1, min(count, self.config.batch_size)),
            image_size=self.config.image_size,
            shuffle_seed=None,
            resize=resolve_resize(self.config.resize, self.config.model),
        )
        rows = []
        for batch in batches.as_numpy_iterator():
            probabilities = np.asarray(self.runner.predict(batch["image"]))
            rows.append(probabilities[batch["mask"]])
        return np.concatenate(rows) if rows else np.zeros((0, self.num_classes), np.float32)


def load_classifier(
    *,
    workdir: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    checkpoint: str = "auto",
) -> Classifier:
    """A run's model at the checkpoint `mnist-flax evaluate` would restore (`--checkpoint` as
    there), or the whole converted classifier in `weights` (`mnist-flax convert --keras-model`)."""
    if (workdir is None) == (weights is None):
        raise ConfigError("give one of --workdir RUN (a trained run) or --weights DIR")
    if weights is not None:
        config, num_classes = evaluate.converted_classifier_config(weights)
        runtime.enable_compilation_cache(config.compilation_cache)
        model = create_model(config, num_classes)
        return Classifier(model, config, f"the {config.model} classifier in {weights}")
    chosen = evaluate.choose_checkpoint(workdir, checkpoint)
    description = f"{chosen.chosen}, epoch {chosen.epoch} of {chosen.workdir}"
    return Classifier(evaluate.restore_model(chosen), chosen.config, description)


def top_classes(probabilities: np.ndarray, k: int = TOP_SHOWN) -> list[tuple[int, float]]:
    """The `k` most probable classes of one row of probabilities, most probable first."""
    order = np.argsort(-np.asarray(probabilities), kind="stable")[:k]
    return [(int(c), float(probabilities[c])) for c in order]


def predict_files(
    paths: Sequence[str | os.PathLike], classifier: Classifier, digits: np.ndarray | None = None
) -> list[dict]:
    """{"image", "top": [{"class", "probability"}, ...], "probabilities"} for each image file.

    `digits`: the files already made MNIST-like (`load_digit`), else they are read here.
    """
    if digits is None:
        digits = np.stack([load_digit(path) for path in paths])
    results = []
    for path, row in zip(paths, classifier.probabilities(digits), strict=True):
        results.append(
            {
                "image": str(pathlib.Path(path)),
                "top": [{"class": c, "probability": p} for c, p in top_classes(row)],
                "probabilities": [float(p) for p in row],
            }
        )
    return results


def format_line(result: dict) -> str:
    """One image's line: its file and top classes with their probabilities."""
    shown = "  ".join(f"{t['class']} ({t['probability']:.1%})" for t in result["top"])
    return f"{result['image']}: {shown}"
