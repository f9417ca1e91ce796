"""`--cache-features`: the backbone runs once per split and the epochs train the head on its output.

The cached run must reproduce the end-to-end run (same head steps, same shuffled order, same
history and checkpoints), resume like it, and work in bfloat16. The random backbone is
He-initialised here (see helpers.he_initialise_backbone): the Glorot-initialised one's pooled
features are ~1e-11, on which any order of any features would give the same history.
"""

import dataclasses
import json

import pytest
from helpers import assert_same_history, tiny_config, use_he_backbone

from mnist_flax import checkpoints, evaluate, train


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
