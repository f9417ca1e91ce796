"""`mnist-flax predict` and the MNIST-like preprocessing (`predict.py`).

The preprocessing is checked on digits drawn here (strokes on a large canvas) and, with the shared
folder, on real MNIST digits, which it must leave as they are. The command runs on a tiny trained
run and on converted classifiers of both kinds; its probabilities are checked against the restored
model's own forward pass, and its bad inputs are one line each.
"""

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import NOTEBOOK_IMAGE_SIZE, tiny_config, tiny_model, use_he_backbone
from PIL import Image, ImageDraw

from mnist_flax import checkpoints, cli, convert, input_pipeline, predict, train
from mnist_flax.build import create_model
from mnist_flax.config import TrainConfig
from mnist_flax.freezing import trainable_filter


def drawn_seven(width: int = 240, height: int = 200, *, at=(40, 30), size: int = 120) -> np.ndarray:
    """A light "7" with a crossbar, strokes a tenth of its size wide, on black: uint8 [H, W]."""
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    x, y = at
    stroke = max(2, size // 10)
    draw.line([(x, y), (x + size * 0.6, y), (x + size * 0.25, y + size)], fill=255, width=stroke)
    draw.line([(x + size * 0.2, y + size * 0.5), (x + size * 0.55, y + size * 0.5)], 255, stroke)
    return np.asarray(image)


def ink_box(digit: np.ndarray) -> tuple[int, int]:
    rows, columns = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
    return rows[-1] - rows[0] + 1, columns[-1] - columns[0] + 1


def centre_of_mass(digit: np.ndarray) -> tuple[float, float]:
    digit = digit.astype(np.float64)
    return (
        float(digit.sum(axis=1) @ np.arange(28) / digit.sum()),
        float(digit.sum(axis=0) @ np.arange(28) / digit.sum()),
    )


def test_mnist_like_makes_a_digit_as_mnist_was_made():
    digit = predict.mnist_like(drawn_seven())
    assert digit.shape == (28, 28) and digit.dtype == np.uint8
    # The 7 is taller than wide: its height is scaled to 20 px, its width keeps the aspect ratio
    # (about 132 x 84 px drawn).
    height, width = ink_box(digit)
    assert height == predict.INK_BOX and 11 <= width <= 15, (height, width)
    assert digit.max() == 255
    # Centred by its centre of mass, to within the half pixel an integer shift leaves.
    cy, cx = centre_of_mass(digit)
    assert abs(cy - predict.CENTRE) <= 0.5 and abs(cx - predict.CENTRE) <= 0.5, (cy, cx)
    # An MNIST digit is what it makes: it comes back unchanged (up to a gray level).
    again = predict.mnist_like(digit)
    assert np.abs(again.astype(int) - digit).max() <= 1


def photo_of(digit: np.ndarray, seed: int = 0) -> np.ndarray:
    """Dark gray ink on gray paper with a lighting gradient and noise, as in a phone photo."""
    rng = np.random.default_rng(seed)
    ink = digit.astype(np.float32) / 255
    columns = np.arange(digit.shape[1]) / digit.shape[1]
    image = 180 + 15 * (columns - 0.5) - 130 * ink + rng.normal(0, 10, digit.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "variant",
    [
        "dark ink on white",
        "smaller, elsewhere in a wider canvas",
        "photo-like",
        "RGB, dark on light",
    ],
)
def test_mnist_like_undoes_polarity_position_scale_and_noise(variant):
    reference = predict.mnist_like(drawn_seven())
    image = {
        "dark ink on white": lambda: 255 - drawn_seven(),
        "smaller, elsewhere in a wider canvas": lambda: drawn_seven(
            400, 150, at=(300, 70), size=60
        ),
        "photo-like": lambda: photo_of(drawn_seven()),
        "RGB, dark on light": lambda: np.repeat(255 - drawn_seven()[..., None], 3, axis=-1),
    }[variant]()
    digit = predict.mnist_like(image)
    assert max(ink_box(digit)) in (predict.INK_BOX, predict.INK_BOX + 1)
    cy, cx = centre_of_mass(digit)
    assert abs(cy - predict.CENTRE) <= 0.5 and abs(cx - predict.CENTRE) <= 0.5, (cy, cx)
    difference = np.abs(digit.astype(int) - reference).mean()
    correlation = np.corrcoef(digit.ravel(), reference.ravel())[0, 1]
    assert difference < 15 and correlation > 0.9, (difference, correlation)


def test_real_mnist_digits_come_back_unchanged(mnist_idx_dir):
    split = input_pipeline.load_split("mnist", "test[8000:8200]", data_dir=mnist_idx_dir)
    digits = np.stack([e["image"][..., 0] for e in split.examples.as_numpy_iterator()])
    for digit in digits:
        assert np.abs(predict.mnist_like(digit).astype(int) - digit).max() <= 1
        # Dark on light is inverted back exactly.
        np.testing.assert_array_equal(predict.mnist_like(255 - digit), predict.mnist_like(digit))


def save(image: np.ndarray, path: pathlib.Path, **options) -> pathlib.Path:
    Image.fromarray(image).save(path, **options)
    return path


def test_read_image_reads_png_jpeg_transparency_and_exif_rotation(tmp_path):
    reference = predict.mnist_like(drawn_seven())
    seven = 255 - drawn_seven()  # dark on light, as people write
    # Dark strokes on a transparent canvas, as drawing apps save them.
    transparent = np.zeros((*seven.shape, 4), np.uint8)
    transparent[..., 3] = 255 - seven
    files = {
        "gray.png": save(seven, tmp_path / "gray.png"),
        "rgb.jpg": save(np.repeat(seven[..., None], 3, -1), tmp_path / "rgb.jpg", quality=90),
        "transparent.png": save(transparent, tmp_path / "transparent.png"),
    }
    for name, path in files.items():
        digit = predict.load_digit(path)
        assert np.corrcoef(digit.ravel(), reference.ravel())[0, 1] > 0.9, name
    # A photo stored sideways with EXIF orientation 6 ("rotate 90 clockwise to view") is turned
    # upright before anything else.
    sideways = Image.fromarray(np.rot90(seven).copy())
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(tmp_path / "sideways.jpg", exif=exif, quality=90)
    upright = predict.read_image(tmp_path / "sideways.jpg")
    assert upright.shape == seven.shape
    assert np.abs(upright - seven).mean() < 3


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, idx_dir) -> pathlib.Path:
    """A tiny run (He-initialised random backbone) trained for 2 epochs."""
    workdir = tmp_path_factory.mktemp("predict") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_he_backbone(monkeypatch)
        monkeypatch.setenv("XDG_CACHE_HOME", str(workdir.parent / "xdg"))
        train.train_and_evaluate(tiny_config(idx_dir, workdir, epochs=2))
    return workdir


@pytest.fixture
def digit_files(tmp_path) -> dict[str, pathlib.Path]:
    seven = drawn_seven()
    return {
        "light.png": save(seven, tmp_path / "light.png"),
        "dark.png": save(255 - seven, tmp_path / "dark.png"),
        "photo.png": save(photo_of(seven), tmp_path / "photo.png"),
    }


def expected_probabilities(model, config: TrainConfig, digit: np.ndarray) -> np.ndarray:
    """The model's softmax on one MNIST-like digit preprocessed as tf.data does for training."""
    images = digit[None, :, :, None]
    if config.model == "notebook":
        inputs = images.astype(np.float32) / 255
    else:
        inputs = input_pipeline.preprocess_images(images, config.image_size).numpy()
    return np.asarray(jax.nn.softmax(model(inputs)))[0]


def run_predict(capsys, *argv) -> tuple[int, str, str]:
    status = cli.main(["predict", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.slow
def test_predict_a_run_as_evaluate_restores_it(trained_run, digit_files, capsys, he_backbone):
    files = list(digit_files.values())
    status, out, err = run_predict(capsys, *files, "--workdir", trained_run)
    assert status == 0, err
    assert err.strip().splitlines()[-1] == (
        "predicting with the final checkpoint (the run has no validation split to choose a best "
        f"by), epoch 2 of {trained_run}"
    )
    lines = out.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(path) for path in files]
    for line in lines:
        shown = [float(part.split("(")[1].rstrip("%)")) for part in line.split(": ")[1].split("  ")]
        assert len(shown) == predict.TOP_SHOWN and shown == sorted(shown, reverse=True), line

    status, out, err = run_predict(
        capsys, *files, "--workdir", trained_run, "--checkpoint", "latest", "--json"
    )
    assert status == 0, err
    assert err.strip().splitlines()[-1].startswith("predicting with the latest checkpoint, epoch 2")
    results = json.loads(out)
    # The restored model's own forward pass, from the checkpoint read here.
    store = checkpoints.RunCheckpoints(trained_run, read_only=True)
    config = TrainConfig.from_dict(store.readable([2], say=print).meta["config"])
    model = create_model(config, 10)
    restored = store.restore(2, trainable=nnx.state(model, trainable_filter(model)))
    store.close()
    nnx.update(model, restored.trainable)
    for result, path in zip(results, files, strict=True):
        probabilities = np.array(result["probabilities"])
        assert result["image"] == str(path)
        assert probabilities.sum() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(
            probabilities,
            expected_probabilities(model, config, predict.load_digit(path)),
            rtol=1e-4,
            atol=1e-6,
        )
        assert [t["class"] for t in result["top"]] == list(np.argsort(-probabilities)[:3])
    # Light on dark and dark on light are the same digit to the model.
    light, dark, _ = results
    assert light["probabilities"] == dark["probabilities"]

    status, out, err = run_predict(
        capsys, files[0], "--workdir", trained_run, "--checkpoint", "best"
    )
    assert status == 2 and not out
    assert err.startswith("error: --checkpoint best: the run in") and err.count("\n") == 1


@pytest.mark.parametrize("kind", ["pipeline", pytest.param("notebook", marks=pytest.mark.slow)])
def test_predict_a_converted_classifier(kind, digit_files, tmp_path, capsys):
    model = tiny_model(10, model=kind)
    convert.save_classifier(model, tmp_path / "classifier", model_name=kind, source="test")
    photo = digit_files["photo.png"]
    status, out, err = run_predict(capsys, photo, "--weights", tmp_path / "classifier", "--json")
    assert status == 0, err
    assert f"predicting with the {kind} classifier in {tmp_path / 'classifier'}" in err
    (result,) = json.loads(out)
    size = NOTEBOOK_IMAGE_SIZE if kind == "notebook" else 32
    config = TrainConfig(model=kind, image_size=size, alpha=0.35)
    np.testing.assert_allclose(
        result["probabilities"],
        expected_probabilities(model, config, predict.load_digit(photo)),
        rtol=1e-4,
        atol=1e-6,
    )


def test_bad_images_and_runs_are_one_line_each(tmp_path, digit_files, capsys):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("a shopping list, not a PNG")
    blank = save(np.full((60, 80), 200, np.uint8), tmp_path / "blank.png")
    noise = np.random.default_rng(0).normal(128, 10, (90, 90))
    noise_only = save(np.clip(noise, 0, 255).astype(np.uint8), tmp_path / "noise.png")
    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    cases = [
        ([not_an_image, "--workdir", empty_run], f"error: {not_an_image}: cannot be read as an image"),
        ([tmp_path / "missing.png", "--workdir", empty_run], f"error: {tmp_path / 'missing.png'}: no such file"),
        ([blank, "--workdir", empty_run], f"error: {blank}: no digit found, the image is blank (one gray level)"),
        ([noise_only, "--workdir", empty_run], f"error: {noise_only}: no digit found, the image is blank (nothing stands out"),
        ([digit_files["light.png"], "--workdir", empty_run], f"error: {empty_run} holds no checkpoint; train into it first"),
        ([digit_files["light.png"], "--weights", tmp_path], f"error: {tmp_path} holds no converted classifier"),
        ([digit_files["light.png"], "--weights", tmp_path, "--checkpoint", "latest"], "error: --checkpoint chooses among a run's checkpoints"),
        ([digit_files["light.png"]], "error: one of the arguments --workdir --weights is required"),
    ]  # fmt: skip
    for argv, message in cases:
        status, out, err = run_predict(capsys, *argv)
        assert status == 2 and not out, (argv, out)
        assert err.startswith(message) and err.count("\n") == 1, (message, err)
