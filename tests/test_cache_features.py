"""`--cache-features`: the backbone runs once per split and the epochs train the head on its output.

The cached run must reproduce the end-to-end run (same head steps, same shuffled order, same
history and checkpoints), resume like it, and work in bfloat16. The random backbone is
He-initialised here (see helpers.he_initialise_backbone): the Glorot-initialised one's pooled
features are ~1e-11, on which any order of any features would give the same history.
"""

import dataclasses
import json
import os
import pathlib

import numpy as np
import pytest
from flax import nnx
from helpers import assert_same_history, tiny_config, use_he_backbone, without_seconds

from mnist_flax import checkpoints, evaluate, feature_cache, input_pipeline, train
from mnist_flax.feature_cache import FeatureCache
from mnist_flax.mobilenet_v2 import MobileNetV2


@pytest.fixture(autouse=True)
def he_backbone_everywhere(he_backbone):
    """Every run here has the He-initialised backbone."""


@pytest.fixture(scope="module")
def end_to_end(idx_dir, tmp_path_factory) -> dict:
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_he_backbone(monkeypatch)
        config = tiny_config(
            idx_dir, tmp_path_factory.mktemp("end_to_end"), epochs=2, cache_features="never"
        )
        return train.train_and_evaluate(config)


def test_cached_run_reproduces_the_end_to_end_run(end_to_end, idx_dir, tmp_path, capsys):
    workdir = tmp_path / "cached"
    cached = train.train_and_evaluate(
        tiny_config(idx_dir, workdir, epochs=2, cache_features="always")
    )
    assert "cached the backbone features" in capsys.readouterr().out
    # The head must have learnt, or equal histories would prove little.
    assert cached["epochs"][1]["train_loss"] < cached["epochs"][0]["train_loss"]
    assert_same_history(cached, end_to_end, rel=1e-5, abs=1e-6)
    assert json.loads((workdir / "history.json").read_text()) == cached
    store = checkpoints.RunCheckpoints(workdir, read_only=True)
    try:
        assert set(store.manager.all_steps()) == {1, 2}
    finally:
        store.close()


def test_cached_run_resumes_and_mixes_with_end_to_end_epochs(idx_dir, tmp_path):
    """Epoch 1 end to end, epoch 2 on cached features: the history of a straight run.

    (A constant learning rate, whose run may be extended from 1 to 2 epochs.)
    """
    constant = dict(lr_schedule="constant")
    workdir = tmp_path / "mixed"
    train.train_and_evaluate(
        tiny_config(idx_dir, workdir, epochs=1, cache_features="never", **constant)
    )
    resumed = train.train_and_evaluate(
        tiny_config(idx_dir, workdir, epochs=2, cache_features="always", **constant)
    )
    straight = train.train_and_evaluate(
        tiny_config(idx_dir, tmp_path / "straight", epochs=2, cache_features="never", **constant)
    )
    assert_same_history(resumed, straight, rel=1e-5, abs=1e-6)


def test_a_finished_run_does_not_compute_features(end_to_end, idx_dir, tmp_path, capsys):
    workdir = tmp_path / "done"
    train.train_and_evaluate(tiny_config(idx_dir, workdir, epochs=1))
    capsys.readouterr()
    train.train_and_evaluate(tiny_config(idx_dir, workdir, epochs=1, cache_features="always"))
    assert "cached" not in capsys.readouterr().out


def test_auto_caches_what_fits_the_budget_and_says_what_each_epoch_ran_on(
    idx_dir, tmp_path, capsys
):
    # 60 examples x 1280 float32 features: 0.3 MB, within the default budget.
    train.train_and_evaluate(tiny_config(idx_dir, tmp_path / "auto", epochs=1))
    out = capsys.readouterr().out
    assert "cached the backbone features" in out and "60 x 1280 float32, 0 MB" in out
    assert "img/s on cached features)" in out

    train.train_and_evaluate(tiny_config(idx_dir, tmp_path / "over", epochs=1, cache_budget_mb=0))
    out = capsys.readouterr().out
    assert "not caching the backbone features: 60 x 1280 float32" in out
    assert "over --cache-budget-mb 0" in out and "img/s on images)" in out

    train.train_and_evaluate(
        tiny_config(idx_dir, tmp_path / "never", epochs=1, cache_features="never")
    )
    out = capsys.readouterr().out
    assert "caching" not in out and "img/s on images)" in out


def test_a_rerun_loads_the_features_an_earlier_run_kept_on_disk(idx_dir, tmp_path, capsys):
    """--feature-cache: the second run of a command reads the first one's features (the same
    history, bit for bit); a damaged file is computed again; "none" keeps nothing on disk."""
    directory = pathlib.Path(os.environ["XDG_CACHE_HOME"], "mnist_flax", "features")
    first = train.train_and_evaluate(tiny_config(idx_dir, tmp_path / "first", epochs=2))
    out = capsys.readouterr().out
    assert f"cached the backbone features of mnist train ({idx_dir})" in out
    assert f"kept in {directory}" in out
    files = sorted(directory.glob("*.npz"))
    assert len(files) == 2  # one per split: train, test

    again = train.train_and_evaluate(tiny_config(idx_dir, tmp_path / "again", epochs=2))
    out = capsys.readouterr().out
    assert f"reusing the backbone features of mnist train ({idx_dir})" in out
    assert f"cached by an earlier run ({directory})" in out
    assert without_seconds(again) == without_seconds(first)

    # Another test split: the training features are found, the new split's computed.
    other = tiny_config(idx_dir, tmp_path / "other", epochs=1, test_split="test[:10]")
    train.train_and_evaluate(other)
    out = capsys.readouterr().out
    assert "cached the backbone features" in out and "the rest cached by an earlier run" in out
    assert len(list(directory.glob("*.npz"))) == 3

    for file in files:  # damaged (an interrupted copy, a full disk): computed again, replaced
        file.write_bytes(file.read_bytes()[:100])
    damaged = train.train_and_evaluate(tiny_config(idx_dir, tmp_path / "damaged", epochs=2))
    assert "cached the backbone features" in capsys.readouterr().out
    assert without_seconds(damaged) == without_seconds(first)
    assert all(file.stat().st_size > 100 for file in files)

    elsewhere = tmp_path / "elsewhere"
    train.train_and_evaluate(
        tiny_config(idx_dir, tmp_path / "dir", epochs=1, feature_cache=str(elsewhere))
    )
    assert f"kept in {elsewhere}" in capsys.readouterr().out
    assert len(list(elsewhere.glob("*.npz"))) == 2

    nowhere = tiny_config(idx_dir, tmp_path / "nowhere", epochs=1, feature_cache="none")
    train.train_and_evaluate(dataclasses.replace(nowhere, test_split="test[:5]"))
    out = capsys.readouterr().out
    assert "cached the backbone features" in out and "kept in" not in out
    assert len(list(directory.glob("*.npz"))) == 3


def test_the_cache_key_changes_with_the_parameters_the_examples_and_the_settings(idx_dir):
    cache = FeatureCache(None)
    train_split = input_pipeline.load_split("mnist", "train", data_dir=idx_dir)
    test_split = input_pipeline.load_split("mnist", "test", data_dir=idx_dir)
    backbone = MobileNetV2(alpha=0.35, include_top=False, rngs=nnx.Rngs(0))
    modules = [backbone.Conv1, backbone.bn_Conv1]
    parameters = FeatureCache.parameters_digest(modules)
    key = cache.key(train_split, parameters, {"image_size": 32})
    assert cache.key(train_split, parameters, {"image_size": 32}) == key
    assert cache.key(test_split, parameters, {"image_size": 32}) != key
    assert cache.key(train_split, parameters, {"image_size": 64}) != key
    # A BatchNorm statistic one float32 step away is another backbone.
    mean = backbone.bn_Conv1.mean
    mean.set_value(mean[...].at[0].set(np.nextafter(np.float32(mean[0]), np.float32(1))))
    assert (
        cache.key(train_split, FeatureCache.parameters_digest(modules), {"image_size": 32}) != key
    )


def test_the_directory_keeps_the_most_recently_used_files_within_its_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(feature_cache, "DISK_BUDGET_MB", 1)
    cache = FeatureCache(tmp_path)
    half_a_megabyte = {"features": np.zeros((100, 1280), np.float32), "label": np.zeros(100, int)}
    cache.store("old", half_a_megabyte)
    cache.store("used", half_a_megabyte)
    an_hour_ago = (tmp_path / "old.npz").stat().st_mtime - 3600
    for name in ("old", "used"):
        os.utime(tmp_path / f"{name}.npz", (an_hour_ago, an_hour_ago))
    os.utime(tmp_path / "used.npz")  # what `load` does to a file it reads
    # What a run killed while writing its file leaves: it counts, and goes as the oldest.
    leftover = tmp_path / "tmpkilled.tmp"
    leftover.write_bytes(b"\0" * 2**18)
    os.utime(leftover, (an_hour_ago - 3600, an_hour_ago - 3600))
    cache.store("new", half_a_megabyte)  # 1.75 MB in all: the two least recently used files go
    assert sorted(path.name for path in tmp_path.iterdir()) == ["new.npz", "used.npz"]


@pytest.mark.slow
def test_bfloat16_trains_evaluates_and_caches(idx_dir, tmp_path):
    config = tiny_config(
        idx_dir, tmp_path / "bf16", epochs=2, dtype="bfloat16", cache_features="never"
    )
    end_to_end = train.train_and_evaluate(config)
    cached = train.train_and_evaluate(
        dataclasses.replace(config, cache_features="always", workdir=str(tmp_path / "bf16-cached"))
    )
    # The same bfloat16 backbone, compiled into different programs: equal up to bfloat16 noise.
    assert_same_history(cached, end_to_end, rel=2e-2, abs=2e-2)
    evaluated = evaluate.evaluate(tmp_path / "bf16", checkpoint="latest")
    assert evaluated["test_accuracy"] == pytest.approx(
        end_to_end["epochs"][-1]["test_accuracy"], abs=1e-6
    )
    assert evaluated["test_loss"] == pytest.approx(end_to_end["epochs"][-1]["test_loss"], rel=1e-2)
