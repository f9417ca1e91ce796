"""The spread of one recipe over seeds (`mnist-flax seeds`): what the accuracy figures of docs/results.md rest on.

A single run's last-epoch accuracy is one sample of a noisy quantity (the head's initialisation and
the data order both come from `--seed`). `run_seeds` trains the same configuration once per seed,
each in its own workdir (`<workdir>/seed-<n>`, resumable like any run), and reports the final test
accuracy of each (never a best epoch: nothing is chosen on the test set) with its mean, sample
standard deviation, min and max. The frozen backbone's cached features depend on the backbone and
the data, not on the seed, so one `FeatureCache` serves every seed: they are computed once (unless
`--weights none` draws each seed's random backbone from the seed).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import statistics
from collections.abc import Sequence

import jax

from mnist_flax import housekeeping, train
from mnist_flax.config import ConfigError, TrainConfig
from mnist_flax.feature_cache import FeatureCache


def run_seeds(
    config: TrainConfig, seeds: Sequence[int], *, json_file: str | os.PathLike | None = None
) -> dict:
    """Trains `config` once per seed; returns (and writes to `json_file`) the final accuracies.

    {"seeds": [...], "final_test_accuracy": [...], "mean", "sd", "min", "max", "workdirs",
    "config"}; sd is the sample standard deviation (n - 1), 0 for a single seed.
    """
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must list distinct seeds, got {list(seeds)}")
    config.validate()
    base = pathlib.Path(config.workdir or os.path.join("runs", f"{config.dataset}-seeds"))
    writer = jax.process_index() == 0
    feature_cache = FeatureCache.for_flag(config.feature_cache)
    finals, workdirs = [], []
    for seed in seeds:
        run = dataclasses.replace(config, seed=seed, workdir=str(base / f"seed-{seed}"))
        history = train.train_and_evaluate(run, feature_cache=feature_cache)
        finals.append(history["epochs"][-1]["test_accuracy"])
        workdirs.append(run.workdir)
        if writer:
            print(f"seed {seed}: final test accuracy {finals[-1]:.2%} ({run.workdir})", flush=True)
    summary = {
        "seeds": list(seeds),
        "final_test_accuracy": finals,
        "mean": statistics.fmean(finals),
        "sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
        "min": min(finals),
        "max": max(finals),
        "workdirs": workdirs,
        "config": {**dataclasses.asdict(config), "seed": None, "workdir": str(base)},
    }
    if writer:
        print(
            f"final test accuracy over {len(seeds)} seeds: mean {summary['mean']:.2%}, "
            f"sd {summary['sd']:.2%}, min {summary['min']:.2%}, max {summary['max']:.2%}"
        )
        if json_file is not None:
            path = pathlib.Path(json_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            housekeeping.write_json_atomically(path, summary)
    return summary
