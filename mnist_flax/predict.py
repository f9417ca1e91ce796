"""Your own digit: an image file made into an MNIST digit, and a trained classifier's top classes.

`mnist_like` turns any picture of one digit (PNG or JPEG, any size, dark ink on a light background
or light on dark, anywhere in the frame) into what MNIST's digits are, by the recipe MNIST was made
with: grayscale, ink light on black, cropped to the ink, scaled (keeping its aspect ratio) so that
its longer side is 20 pixels, and placed in a 28x28 frame so that its centre of mass is at the
frame's centre, pixel (14, 14). A model trained on MNIST has only ever seen digits like that; an
uncentred or dark-on-light digit is a different input, and gets other answers.

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
    3. Cropped to the ink's bounding box, scaled so that its longer side is `INK_BOX` pixels
       (Lanczos, antialiased when shrinking: bilinear's blur cost a scaled digit several points
       of accuracy, docs/results.md), its brightest pixel made 255.
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
    height, width = ink.shape
    scale = INK_BOX / max(height, width)
    if scale != 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        ink = np.asarray(Image.fromarray(ink).resize(size, Image.Resampling.LANCZOS), np.float32)
    ink = np.clip(ink, 0.0, None)  # Lanczos undershoots below black beside a stroke
    ink *= 255.0 / ink.max()
    return _centred(ink)


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
