"""Whole runs with a fine-tuning stage, and of the notebook model, on tiny IDX files.

A fine-tuning run is one run: `--epochs` frozen, then `--fine-tune-epochs` in which the backbone's
layers from `--fine-tune-from` on train too. Its second stage caches the activation entering those
layers where that is exact, and must give the history of the same stage run on images; it resumes
exactly in either stage. The random backbone is He-initialised (`helpers.he_initialise`) so that
the fine-tuned layers carry signal and a wrong cache or order would change the numbers.
"""

import numpy as np
import pytest
from flax import nnx
from helpers import (
    NOTEBOOK_IMAGE_SIZE,
    assert_same_history,
    tiny_config,
    tiny_model,
    use_he_backbone,
)

from mnist_flax import checkpoints, evaluate, train
from mnist_flax.freezing import trainable_filter

FINE_TUNE = dict(epochs=1, fine_tune_epochs=2, fine_tune_from="13", lr_schedule="constant")


@pytest.fixture(autouse=True)
def he_backbone_everywhere(he_backbone):
    """Every run here has the He-initialised backbone."""


@pytest.fixture(scope="module")
def on_images(idx_dir, tmp_path_factory) -> dict:
    """The fine-tuning run with every epoch on images: the reference for the cached and resumed."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_he_backbone(monkeypatch)
        workdir = tmp_path_factory.mktemp("on_images")
        return train.train_and_evaluate(
            tiny_config(idx_dir, workdir, cache_features="never", **FINE_TUNE)
        )


def trained_block_13(workdir, epoch: int) -> np.ndarray:
    """Block 13's expand kernel as the epoch's checkpoint saved it."""
    model = tiny_model(10, fine_tune_from="13")
    store = checkpoints.RunCheckpoints(workdir, read_only=True)
    try:
        restored = store.restore(epoch, trainable=nnx.state(model, trainable_filter(model)))
    finally:
        store.close()
    return np.asarray(restored.trainable["backbone"]["blocks"][13]["expand"]["kernel"][...])


def test_cached_activations_give_the_fine_tuning_stage_of_images(
    on_images, idx_dir, tmp_path, capsys
):
    workdir = tmp_path / "cached"
    cached = train.train_and_evaluate(
        tiny_config(idx_dir, workdir, quiet=False, cache_features="always", **FINE_TUNE)
    )
    out = capsys.readouterr().out
    assert "cached the backbone features" in out
    assert "cached the fine-tuned layers' input" in out and "img/s on cached activations" in out
    assert [r["stage"] for r in cached["epochs"]] == ["frozen", "fine-tune", "fine-tune"]
    assert cached["config"]["fine_tune"]["layer"] == "block_13_expand"
    assert_same_history(cached, on_images)
    # Block 13 trains in the fine-tuning stage only.
    initial = np.asarray(tiny_model(10, fine_tune_from="13").backbone.blocks[13].expand.kernel[...])
    epochs = [trained_block_13(workdir, epoch) for epoch in (1, 2, 3)]
    assert np.array_equal(epochs[0], initial)
    assert not np.array_equal(epochs[1], epochs[0]) and not np.array_equal(epochs[2], epochs[1])


def test_a_run_stopped_in_the_fine_tuning_stage_resumes_exactly(on_images, idx_dir, tmp_path):
    """1 + 1 epochs, then the same command with 1 + 2 (a constant rate may be extended)."""
    workdir = tmp_path / "resumed"
    train.train_and_evaluate(tiny_config(idx_dir, workdir, **{**FINE_TUNE, "fine_tune_epochs": 1}))
    resumed = train.train_and_evaluate(tiny_config(idx_dir, workdir, **FINE_TUNE))
    assert_same_history(resumed, on_images)


def test_evaluate_restores_the_fine_tuned_layers(on_images, idx_dir, tmp_path):
    workdir = tmp_path / "evaluated"
    history = train.train_and_evaluate(tiny_config(idx_dir, workdir, **FINE_TUNE))
    result = evaluate.evaluate(workdir)
    assert result["epoch"] == 3
    assert result["test_accuracy"] == pytest.approx(history["epochs"][-1]["test_accuracy"])
    assert result["test_loss"] == pytest.approx(history["epochs"][-1]["test_loss"], rel=1e-5)


def test_a_workdir_fine_tuned_from_another_layer_is_refused(on_images, idx_dir, tmp_path):
    workdir = tmp_path / "refused"
    train.train_and_evaluate(tiny_config(idx_dir, workdir, **{**FINE_TUNE, "fine_tune_epochs": 1}))
    with pytest.raises(checkpoints.CheckpointMismatchError, match="block_8_expand"):
        train.train_and_evaluate(
            tiny_config(idx_dir, workdir, **{**FINE_TUNE, "fine_tune_from": "8"})
        )


def test_the_notebook_model_trains_on_digits_without_a_feature_cache(idx_dir, tmp_path, capsys):
    workdir = tmp_path / "notebook"
    config = tiny_config(
        idx_dir, workdir, model="notebook", image_size=NOTEBOOK_IMAGE_SIZE, epochs=2, quiet=False
    )
    history = train.train_and_evaluate(config)
    out = capsys.readouterr().out
    assert "not caching the backbone features: the notebook model's adapter trains" in out
    assert "img/s on images" in out
    assert history["epochs"][1]["train_loss"] < history["epochs"][0]["train_loss"]
    result = evaluate.evaluate(workdir)
    assert result["test_accuracy"] == pytest.approx(history["epochs"][-1]["test_accuracy"])
