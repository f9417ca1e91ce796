"""Whole runs of `train_and_evaluate` on tiny IDX files: checkpoints, resume, Ctrl-C, refusals, evaluate.

Every run uses 32x32 inputs, MobileNetV2 alpha 0.35 with random weights and a few dozen examples
(`idx_dir`); the session's persistent compilation cache lets the runs after the first skip XLA.
"""

import dataclasses
import hashlib
import json
import logging
import pathlib
import shutil
import signal

import jax
import numpy as np
import pytest
from helpers import assert_same_history, tiny_config, use_he_backbone, without_seconds

from mnist_flax import checkpoints, config, evaluate, input_pipeline, train
from mnist_flax.steps import StepRunner


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
            "stage",
            "learning_rate",
            "train_loss",
            "train_accuracy",
            "test_loss",
            "test_accuracy",
            "seconds",
        }
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(workdir.glob("*.tmp"))

    # Without a validation split nothing is "best": the last KEEP_LATEST are kept.
    store = checkpoints.RunCheckpoints(workdir, read_only=True)
    try:
        assert set(store.manager.all_steps()) == {2, 3, 4}
        assert store.ranked(history["epochs"]) == []
    finally:
        store.close()


@pytest.fixture(scope="module")
def validated_run(idx_dir, tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """Four epochs with a validation split (and a backbone whose features say something)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_he_backbone(monkeypatch)
        workdir = tmp_path_factory.mktemp("validated")
        config = tiny_config(
            idx_dir, workdir, train_split="train[:30]", validation_split="train[30:]"
        )
        return workdir, train.train_and_evaluate(config)


def test_a_validation_split_chooses_the_best_checkpoint_and_evaluate_says_so(
    validated_run, capsys, he_backbone
):
    workdir, history = validated_run
    records = history["epochs"]
    assert all({"validation_loss", "validation_accuracy"} <= record.keys() for record in records)
    by_validation = max(records, key=lambda r: (r["validation_accuracy"], r["epoch"]))["epoch"]
    store = checkpoints.RunCheckpoints(workdir, read_only=True)
    try:
        assert set(store.manager.all_steps()) == {2, 3, 4, by_validation}
        assert store.ranked(records)[0] == by_validation
    finally:
        store.close()
    capsys.readouterr()

    result = evaluate.evaluate(workdir)
    assert result["epoch"] == by_validation
    chosen = records[by_validation - 1]
    assert result["test_accuracy"] == pytest.approx(chosen["test_accuracy"], abs=1e-6)
    assert (
        f"the best checkpoint by validation accuracy ({chosen['validation_accuracy']:.2%} on "
        f"train[30:]), epoch {by_validation}"
    ) in capsys.readouterr().out


def test_overlapping_splits_get_a_one_line_warning(idx_dir, tmp_path, capsys):
    config = tiny_config(
        idx_dir,
        tmp_path / "overlap",
        epochs=1,
        train_split="train[:35]",
        validation_split="train[30:]",
        test_split="test+train[38:]",
    )
    train.train_and_evaluate(config)
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert warnings == [
        "warning: --train-split and --validation-split share 5 examples; the validation figures "
        "are not measured on unseen data",
        "warning: --validation-split and --test-split share 2 examples",
    ]


def test_interrupted_and_resumed_runs_reproduce_the_straight_run(
    straight_run, idx_dir, tmp_path, monkeypatch, capsys
):
    """Two Ctrl-Cs and two resumptions of a 4-epoch run with the default (cosine) schedule.

    The schedule's position is Adam's step count, restored with the optimizer state: the
    resumed epochs see the learning rates the straight run saw.
    """
    _, straight = straight_run
    assert straight["config"]["lr_schedule"] == "cosine"
    workdir = tmp_path / "resumed"
    batch_indices, train_block = input_pipeline.batch_indices, StepRunner.train_block
    shuffled = []  # the shuffle seed of the epoch being trained

    def interrupt_in(epoch: int):
        """Ctrl-C (a real SIGINT) right after the first call of epoch `epoch`'s train pass."""

        def indices(num_examples, batch_size, shuffle_seed, *args):
            shuffled.append(shuffle_seed)
            return batch_indices(num_examples, batch_size, shuffle_seed, *args)

        def block(runner, *args):
            train_block(runner, *args)
            if shuffled[-1] == input_pipeline.epoch_seed(0, epoch):
                signal.raise_signal(signal.SIGINT)

        monkeypatch.setattr(input_pipeline, "batch_indices", indices)
        monkeypatch.setattr(StepRunner, "train_block", block)

    # Ctrl-C in the middle of epoch 3 (its train steps ran, its evaluation did not), then of epoch
    # 4 of the resumed run.
    for epoch in (3, 4):
        interrupt_in(epoch)
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(tiny_config(idx_dir, workdir))
        monkeypatch.undo()
        saved = json.loads((workdir / "history.json").read_text())
        assert [record["epoch"] for record in saved["epochs"]] == list(range(1, epoch))
        assert f"interrupted during epoch {epoch}" in capsys.readouterr().out

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
        {"lr_schedule": "constant"},
        # The cosine schedule decays over the run's length: another length is another recipe.
        {"epochs": 6},
        {"validation_split": "train[30:]"},
        {"weights": "imagenet"},
        {"dataset": "fashion_mnist"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_a_workdir_of_another_run_is_refused_and_left_as_it_was(straight_run, idx_dir, change):
    workdir, _ = straight_run
    before = snapshot(workdir)
    field = "decay_steps" if "epochs" in change else next(iter(change))
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


def test_evaluate_without_a_validation_split_uses_the_final_checkpoint(
    straight_run, tmp_path, capsys
):
    source, history = straight_run
    workdir = tmp_path / "copy"
    shutil.copytree(source, workdir)

    result = evaluate.evaluate(workdir)

    assert result["epoch"] == 4
    assert result["test_accuracy"] == pytest.approx(
        history["epochs"][-1]["test_accuracy"], abs=1e-6
    )
    assert result["num_examples"] == 20
    assert np.asarray(result["confusion"]).shape == (10, 10)
    assert "the final checkpoint (the run has no validation split" in capsys.readouterr().out
    for name in ("confusion.png", "misclassified.png"):
        assert (workdir / name).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(config.ConfigError, match="no validation split"):
        evaluate.evaluate(workdir, checkpoint="best")


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
    assert_same_history(device, host, rel=1e-4, abs=1e-5)


def test_each_step_compiles_once_and_a_second_run_loads_them_from_the_cache(
    idx_dir, tmp_path, caplog
):
    """Nothing compiles twice in a run, and a second run of the same command compiles nothing.

    JAX logs a "Compiling <function>" line for every compilation it starts (`jax_log_compiles`);
    the persistent cache (the session's, kept by `compilation_cache="auto"`) counts its misses.
    """
    misses = []
    jax.monitoring.register_event_listener(
        lambda name, **_: misses.append(name) if name.endswith("/cache_misses") else None
    )
    # A batch and image size no other test uses: the first run compiles everything it runs.
    config = tiny_config(idx_dir, tmp_path / "first", epochs=2, batch_size=6, image_size=36)
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            train.train_and_evaluate(config)
            compiled = [
                r.getMessage().split()[1] for r in caplog.records if "Compiling" in r.getMessage()
            ]
            first_misses, misses[:] = len(misses), []
            train.train_and_evaluate(dataclasses.replace(config, workdir=str(tmp_path / "second")))
    finally:
        jax.config.update("jax_log_compiles", False)
    # On cached features the epochs run blocks of steps (one block a pass here).
    for step in ("_train_block_fn", "_eval_block_fn", "_forward_fn"):
        assert sum(step in name for name in compiled) == 1, (step, compiled)
    assert first_misses > 0
    assert misses == []
