"""`mnist-flax seeds`: one run per seed, the final test accuracies and their summary as JSON."""

import json
import statistics

import pytest

from mnist_flax import cli, config


def test_seeds_runs_each_seed_in_its_own_workdir_and_summarises(
    idx_dir, tmp_path, capsys, he_backbone
):
    """The seeds share one backbone (He-initialised from a fixed seed), so its features are
    computed once; a random backbone drawn from each seed (`--weights none` alone) would not be."""
    workdir, summary_file = tmp_path / "seeds", tmp_path / "summary.json"
    flags = ["--image-size", "32", "--alpha", "0.35", "--weights", "none", "--batch-size", "8"]
    flags += ["--epochs", "2", "--quiet", "--data-dir", str(idx_dir), "--workdir", str(workdir)]
    status = cli.main(["seeds", "--seeds", "3", "5", "--json", str(summary_file), *flags])
    assert status == 0, capsys.readouterr().err

    summary = json.loads(summary_file.read_text())
    finals = [
        json.loads((workdir / f"seed-{seed}" / "history.json").read_text())["epochs"][-1][
            "test_accuracy"
        ]
        for seed in (3, 5)
    ]
    assert summary["seeds"] == [3, 5]
    assert summary["final_test_accuracy"] == finals
    assert summary["mean"] == pytest.approx(statistics.fmean(finals))
    assert summary["sd"] == pytest.approx(statistics.stdev(finals))
    assert (summary["min"], summary["max"]) == (min(finals), max(finals))
    out = capsys.readouterr().out
    assert "seed 3: final test accuracy" in out and "seed 5: final test accuracy" in out
    assert out.count("cached the backbone features") == 1, "computed once for both seeds"
    assert out.count("reusing the backbone features") == 1
    assert f"over 2 seeds: mean {summary['mean']:.2%}" in out


def test_seeds_must_be_distinct(capsys):
    assert cli.main(["seeds", "--seeds", "1", "1", "--weights", "none"]) == 2
    assert "--seeds must list distinct seeds" in capsys.readouterr().err


def test_seeds_takes_every_train_flag_but_seed():
    parser = cli.build_parser()
    args = parser.parse_args(["seeds", "--lr-schedule", "constant", "--learning-rate", "1e-3"])
    assert (args.lr_schedule, args.learning_rate, args.seeds) == ("constant", 1e-3, [0, 1, 2, 3, 4])
    with pytest.raises(cli.UsageError, match="--seed"):
        parser.parse_args(["seeds", "--seed", "1"])
    assert set(config.fields()) <= set(vars(args))
