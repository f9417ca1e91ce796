"""Whole runs of `train_and_evaluate` on tiny IDX files: checkpoints, resume, Ctrl-C, refusals, evaluate.

Every run uses 32x32 inputs, MobileNetV2 alpha 0.35 with random weights and a few dozen examples
(`idx_dir`); the session's persistent compilation cache lets the runs after the first skip XLA.
"""

import dataclasses
import hashlib
import json
import pathlib
import shutil

import numpy as np
import pytest
from helpers import tiny_config, without_seconds

from mnist_flax import checkpoints, config, evaluate, input_pipeline, train


def snapshot(directory: pathlib.Path) -> dict[str, str]:
    """Every file under `directory` with a hash of its bytes (and its modification time)."""
    if not directory.exists():
        return {}
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        + f"@{path.stat().st_mtime_ns}"
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def straight_run(idx_dir, tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """Four epochs in one go: the reference the interrupted and resumed runs must reproduce."""
    workdir = tmp_path_factory.mktemp("straight")
    history = train.train_and_evaluate(tiny_config(idx_dir, workdir))
    return workdir, history


def test_straight_run_writes_history_checkpoints_and_curves(straight_run):
    workdir, history = straight_run
    assert [record["epoch"] for record in history["epochs"]] == [1, 2, 3, 4]
    on_disk = json.loads((workdir / "history.json").read_text())
    assert on_disk == history
    assert on_disk["config"]["num_classes"] == 10 and on_disk["config"]["epochs"] == 4
    for record in on_disk["epochs"]:
        assert set(record) == {
            "epoch",
            "train_loss",
            "train_accuracy",
            "test_loss",
            "test_accuracy",
            "seconds",
        }
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(workdir.glob("*.tmp"))

    accuracies = {r["epoch"]: r["test_accuracy"] for r in history["epochs"]}
    best = max(sorted(accuracies), key=lambda epoch: (accuracies[epoch], epoch))
    store = checkpoints.RunCheckpoints(workdir, read_only=True)
    try:
        kept = set(store.manager.all_steps())
        assert kept == {2, 3, 4} | {best}  # the last KEEP_LATEST plus the best
        assert store.best_epoch() == best
    finally:
        store.close()


def test_interrupted_and_resumed_runs_reproduce_the_straight_run(
    straight_run, idx_dir, tmp_path, monkeypatch, capsys
):
    _, straight = straight_run
    workdir = tmp_path / "resumed"

    # Two epochs, finished normally.
    train.train_and_evaluate(tiny_config(idx_dir, workdir, epochs=2))

    # Asked for four; Ctrl-C arrives in the middle of epoch 4 (after its first batch).
    make_batches = input_pipeline.make_batches

    class InterruptedDataset:
        def __init__(self, dataset):
            self.dataset = dataset

        def as_numpy_iterator(self):
            for index, batch in enumerate(self.dataset.as_numpy_iterator()):
                if index == 1:
                    raise KeyboardInterrupt
                yield batch

    def interrupt_epoch_4(split, *, shuffle_seed, **options):
        dataset = make_batches(split, shuffle_seed=shuffle_seed, **options)
        if shuffle_seed == input_pipeline.epoch_seed(0, 4):
            return InterruptedDataset(dataset)
        return dataset

    monkeypatch.setattr(input_pipeline, "make_batches", interrupt_epoch_4)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(tiny_config(idx_dir, workdir))
    monkeypatch.undo()
    saved = json.loads((workdir / "history.json").read_text())
    assert [record["epoch"] for record in saved["epochs"]] == [1, 2, 3]
    assert "interrupted during epoch 4" in capsys.readouterr().out

    # The same command again resumes from epoch 3 and finishes.
    resumed = train.train_and_evaluate(tiny_config(idx_dir, workdir))
    assert "resuming from the epoch-3 checkpoint" in capsys.readouterr().out
    assert without_seconds(resumed) == without_seconds(straight)  # identical numbers on CPU
    assert {**resumed["config"], "workdir": None} == {**straight["config"], "workdir": None}


def test_a_finished_run_is_not_trained_again(straight_run, idx_dir, capsys):
    workdir, history = straight_run
    before = snapshot(workdir / "checkpoints")
    again = train.train_and_evaluate(tiny_config(idx_dir, workdir))
    assert without_seconds(again) == without_seconds(history)
    assert snapshot(workdir / "checkpoints") == before
    assert "4 of 4 epochs done" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change",
    [
        {"alpha": 0.5},
        {"image_size": 48},
        {"learning_rate": 1e-2},
        {"weights": "imagenet"},
        {"dataset": "fashion_mnist"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_a_workdir_of_another_run_is_refused_and_left_as_it_was(straight_run, idx_dir, change):
    workdir, _ = straight_run
    before = snapshot(workdir)
    field = next(iter(change))
    with pytest.raises(checkpoints.CheckpointMismatchError, match=f"{field}="):
        train.train_and_evaluate(tiny_config(idx_dir, workdir, **change))
    assert snapshot(workdir) == before


def test_bad_inputs_fail_before_anything_is_written(idx_dir, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(input_pipeline.DataError):
        train.train_and_evaluate(tiny_config(tmp_path / "no-such-dir", workdir))
    with pytest.raises(config.ConfigError, match="--epochs"):
        train.train_and_evaluate(tiny_config(idx_dir, workdir, epochs=0))
    assert not workdir.exists()

    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    with pytest.raises(checkpoints.WorkdirError, match="is a file"):
        train.train_and_evaluate(tiny_config(idx_dir, a_file / "run"))
    assert a_file.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_evaluate_restores_the_best_checkpoint_and_draws_its_errors(straight_run, tmp_path, capsys):
    source, history = straight_run
    workdir = tmp_path / "copy"
    shutil.copytree(source, workdir)
    best = max(history["epochs"], key=lambda r: (r["test_accuracy"], r["epoch"]))

    result = evaluate.evaluate(workdir)

    assert result["epoch"] == best["epoch"]
    assert result["test_accuracy"] == pytest.approx(best["test_accuracy"], abs=1e-6)
    assert result["num_examples"] == 20
    assert np.asarray(result["confusion"]).shape == (10, 10)
    assert "test accuracy" in capsys.readouterr().out
    for name in ("confusion.png", "misclassified.png"):
        assert (workdir / name).read_bytes()[:4] == b"\x89PNG"

    latest = evaluate.evaluate(workdir, checkpoint="latest")
    assert latest["epoch"] == 4
    assert latest["test_accuracy"] == pytest.approx(
        history["epochs"][-1]["test_accuracy"], abs=1e-6
    )


def test_evaluate_an_empty_workdir_says_so(tmp_path):
    with pytest.raises(checkpoints.WorkdirError, match="no checkpoint"):
        evaluate.evaluate(tmp_path)


def test_device_resize_trains_like_host_resize(idx_dir, tmp_path, he_backbone):
    """`resize="device"` ships uint8 digits and resizes in the step: same run within float noise.

    The He-initialised backbone makes the features depend on the pixels (the Glorot one's are
    ~1e-11 whatever the input), so a resize that computed other pixels would change the history.
    """
    config = tiny_config(idx_dir, tmp_path / "device", epochs=1, resize="device")
    device = train.train_and_evaluate(config)
    host = train.train_and_evaluate(
        dataclasses.replace(config, resize="host", workdir=str(tmp_path / "host"))
    )
    for a, b in zip(without_seconds(device), without_seconds(host), strict=True):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
