"""Evaluation of a saved run or a converted classifier: measure it on a split, draw what it got wrong.

`evaluate` rebuilds the run's model from the config its checkpoint recorded and restores the trained
head; `evaluate_classifier` builds a whole classifier that `mnist-flax convert --keras-model` wrote
(a trained Keras model) from its directory. Both run the test split through the same `StepRunner`
eval step as training (`_measure`), and write confusion.png and misclassified.png into the workdir.
Which checkpoint of a run is used (`choose_checkpoint`), how its model is rebuilt (`restore_model`)
and how a converted classifier's config is read (`converted_classifier_config`) are shared with
`mnist-flax predict`; `mnist-flax export` takes its classifier, with the test split it checks on,
from `restore_run` and `load_classifier`, which `evaluate` and `evaluate_classifier` measure.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np
from flax import nnx

from mnist_flax import checkpoints, convert, input_pipeline, plotting, runtime
from mnist_flax.build import create_model
from mnist_flax.config import EVALUATE_CHECKPOINTS, ConfigError, TrainConfig
from mnist_flax.freezing import trainable_filter
from mnist_flax.model import TransferClassifier, resolve_resize
from mnist_flax.steps import StepRunner, make_metrics


def evaluate(
    workdir: str | os.PathLike, *, checkpoint: str = "auto", test_split: str | None = None
) -> dict:
    """Restores a checkpoint of the workdir's run and evaluates it on the test split.

    `checkpoint` (`config.EVALUATE_CHECKPOINTS`): "auto" takes the best by validation accuracy in a
    run with a validation split, else the final one; nothing is ever chosen by test accuracy.
    Prints the test accuracy and which checkpoint it measured and why, and writes confusion.png and
    misclassified.png into the workdir. Returns {"epoch", "checkpoint", "chosen", "test_split",
    "test_loss", "test_accuracy", "num_examples", "confusion"}.
    """
    run = restore_run(workdir, checkpoint=checkpoint, test_split=test_split)
    measured = _measure(run.model, run.config, run.split, pathlib.Path(workdir), run.description)
    return {"epoch": run.epoch, "checkpoint": checkpoint, "chosen": run.chosen, **measured}


@dataclasses.dataclass
class Loaded:
    """A classifier to measure or export, the config it was built from and its test split."""

    model: TransferClassifier
    config: TrainConfig
    split: input_pipeline.Split
    description: str  # which classifier, for the printed line
    epoch: int | None = None  # a run's: the checkpoint's epoch and why it was chosen
    chosen: str | None = None


def restore_run(
    workdir: str | os.PathLike, *, checkpoint: str = "auto", test_split: str | None = None
) -> Loaded:
    """The workdir's run as `evaluate` measures it (and `mnist-flax export` exports it): its model
    rebuilt from the config its checkpoint recorded, the chosen checkpoint's head restored.

    `checkpoint` as for `evaluate`; `test_split` (default: the run's) is loaded and checked against
    the run's classes before the slow model build.
    """
    workdir = pathlib.Path(workdir)
    chosen = choose_checkpoint(workdir, checkpoint)
    config = dataclasses.replace(chosen.config, test_split=test_split or chosen.config.test_split)
    split = input_pipeline.load_split(config.dataset, config.test_split, data_dir=config.data_dir)
    if split.num_classes != chosen.num_classes:
        raise checkpoints.CheckpointMismatchError(
            f"--test-split {config.test_split} of {config.dataset} has {split.num_classes} "
            f"classes but the checkpoint in {workdir} was trained on {chosen.num_classes}"
        )
    model = restore_model(chosen, config)
    description = f"{chosen.chosen}, epoch {chosen.epoch}"
    return Loaded(model, config, split, description, chosen.epoch, chosen.chosen)


@dataclasses.dataclass(frozen=True)
class ChosenCheckpoint:
    """The checkpoint of a run that `--checkpoint` chooses, and the run it belongs to."""

    workdir: pathlib.Path
    epoch: int
    chosen: str  # which checkpoint and why, for the user ("the final checkpoint (...)")
    run_config: dict  # as the run recorded it

    @property
    def config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.run_config)

    @property
    def num_classes(self) -> int:
        return self.run_config["num_classes"]


def choose_checkpoint(workdir: str | os.PathLike, checkpoint: str = "auto") -> ChosenCheckpoint:
    """Which checkpoint of the workdir's run `checkpoint` (`config.EVALUATE_CHECKPOINTS`) means.

    "auto": the best by validation accuracy in a run with a validation split, else the final one;
    "best" only in a run with a validation split; "latest". Never by test accuracy. A workdir
    without a checkpoint is a `checkpoints.WorkdirError`.
    """
    workdir = pathlib.Path(workdir)
    if checkpoint not in EVALUATE_CHECKPOINTS:
        raise ConfigError(
            f"--checkpoint must be one of {', '.join(EVALUATE_CHECKPOINTS)}, got {checkpoint!r}"
        )
    store = checkpoints.RunCheckpoints(workdir, read_only=True)
    try:
        # The newest checkpoint that reads: its config and history are the run's (evaluation
        # reads only, so those that do not read are passed over, not moved).
        newest = store.readable(say=print)
        if newest is None:
            raise checkpoints.WorkdirError(
                f"{workdir} holds no checkpoint; train into it first (mnist-flax train --workdir ...)"
            )
        run_config, history = newest.meta["config"], newest.meta["history"]
        validated = run_config.get("validation_split") is not None
        if checkpoint == "best" and not validated:
            raise ConfigError(
                f"--checkpoint best: the run in {workdir} has no validation split, so no "
                "checkpoint was chosen as best (choosing by test accuracy would overstate it); "
                "use --checkpoint latest, or train with --validation-split"
            )
        # Named for what it is: "final" or "best" only while no newer or better one was passed over.
        if checkpoint == "latest" or not validated:
            epoch = newest.epoch
            chosen = (
                "the newest checkpoint that reads"
                if newest.passed_over
                else ("the latest checkpoint" if checkpoint == "latest" else "the final checkpoint")
            )
            if checkpoint != "latest":
                chosen += " (the run has no validation split to choose a best by)"
        else:
            best = store.readable(store.ranked(history, checkpoints.BEST_METRIC), say=print)
            epoch = best.epoch
            recorded = history[epoch - 1][checkpoints.BEST_METRIC]
            chosen = (
                f"the best checkpoint{' that reads' if best.passed_over else ''} by validation "
                f"accuracy ({recorded:.2%} on {run_config['validation_split']})"
            )
    finally:
        store.close()
    return ChosenCheckpoint(workdir, epoch, chosen, run_config)


def restore_model(
    chosen: ChosenCheckpoint, config: TrainConfig | None = None
) -> TransferClassifier:
    """The run's model (`config`, by default the run's own) with the chosen checkpoint's trained
    parameters; the frozen backbone is rebuilt from the run's weights source."""
    config = chosen.config if config is None else config
    runtime.enable_compilation_cache(config.compilation_cache)
    model = create_model(config, chosen.num_classes)
    store = checkpoints.RunCheckpoints(chosen.workdir, read_only=True)
    try:
        restored = store.restore(chosen.epoch, trainable=nnx.state(model, trainable_filter(model)))
    finally:
        store.close()
    # In place: the head (and whatever else the run trained) as trained.
    nnx.update(model, restored.trainable)
    return model


def evaluate_classifier(
    weights: str | os.PathLike,
    workdir: str | os.PathLike,
    *,
    dataset: str = TrainConfig.dataset,
    data_dir: str | os.PathLike | None = None,
    test_split: str = TrainConfig.test_split,
    batch_size: int = TrainConfig.batch_size,
) -> dict:
    """Evaluates the whole classifier in `weights` (`mnist-flax convert --keras-model`) on a split.

    Its kind (pipeline or notebook), alpha, image size and classes come from the directory's
    config.json. Prints the test accuracy and writes confusion.png and misclassified.png into
    `workdir`. Returns {"test_split", "test_loss", "test_accuracy", "num_examples", "confusion"}.
    """
    loaded = load_classifier(
        weights, dataset=dataset, data_dir=data_dir, test_split=test_split, batch_size=batch_size
    )
    return _measure(
        loaded.model, loaded.config, loaded.split, pathlib.Path(workdir), loaded.description
    )


def load_classifier(
    weights: str | os.PathLike,
    *,
    dataset: str = TrainConfig.dataset,
    data_dir: str | os.PathLike | None = None,
    test_split: str = TrainConfig.test_split,
    batch_size: int = TrainConfig.batch_size,
) -> Loaded:
    """The whole classifier in `weights` as `evaluate_classifier` measures it (and `mnist-flax
    export` exports it), with the test split, checked against its classes."""
    config, num_classes = converted_classifier_config(
        weights,
        dataset=dataset,
        data_dir=None if data_dir is None else str(data_dir),
        test_split=test_split,
        batch_size=batch_size,
    )
    split = input_pipeline.load_split(config.dataset, config.test_split, data_dir=config.data_dir)
    if split.num_classes != num_classes:
        raise checkpoints.CheckpointMismatchError(
            f"--test-split {config.test_split} of {config.dataset} has {split.num_classes} "
            f"classes but the classifier in {weights} has {num_classes}"
        )
    runtime.enable_compilation_cache(config.compilation_cache)
    model = create_model(config, num_classes)  # every parameter from the directory
    return Loaded(model, config, split, f"the {config.model} classifier in {weights}")


def converted_classifier_config(
    weights: str | os.PathLike, **options: object
) -> tuple[TrainConfig, int]:
    """The validated config (and class count) that builds the whole classifier in `weights`.

    The model kind, alpha and image size come from the directory's config.json; `options` are
    other `TrainConfig` fields (the data to run it on, the batch). A directory that holds no
    converted classifier is a `convert.WeightsError`.
    """
    if not convert.is_converted_classifier(weights):
        raise convert.WeightsError(
            f"{weights} holds no converted classifier (a config.json of kind "
            f"{convert.CLASSIFIER_KIND!r}); write one with `mnist-flax convert --keras-model FILE "
            "--out DIR` (a run's workdir is given with --workdir alone)"
        )
    saved = convert.classifier_config(weights)
    config = TrainConfig(
        model=saved["model"],
        alpha=saved["alpha"],
        image_size=saved["image_size"],
        weights=str(weights),
        **options,
    )
    config.validate()
    return config, saved["num_classes"]


def _measure(
    model: TransferClassifier,
    config: TrainConfig,
    split: input_pipeline.Split,
    workdir: pathlib.Path,
    measured: str,
) -> dict:
    """Runs `split` through the eval step; prints the accuracy, saying it `measured` what; draws the figures."""
    num_classes = model.head.out_features
    runner = StepRunner(model, None, make_metrics())
    batches = input_pipeline.make_batches(
        split,
        batch_size=config.batch_size,
        image_size=config.image_size,
        shuffle_seed=None,
        resize=resolve_resize(config.resize, config.model),
    )
    confusion = np.zeros((num_classes, num_classes), np.int64)
    wrong_images, wrong_predicted, wrong_true = [], [], []
    for batch in batches.as_numpy_iterator():
        predicted = np.asarray(runner.eval(batch))
        real = batch["mask"]
        true, predicted, images = batch["label"][real], predicted[real], batch["image"][real]
        if config.model == "notebook":
            # The notebook model's [0, 1] digits, as the uint8 digits they were (the plot reads
            # float images as the pipeline's [-1, 1]).
            images = np.round(images * 255.0).astype(np.uint8)
        np.add.at(confusion, (true, predicted), 1)
        for index in np.flatnonzero(true != predicted)[
            : plotting.MISCLASSIFIED_SHOWN - len(wrong_images)
        ]:
            wrong_images.append(images[index])
            wrong_predicted.append(int(predicted[index]))
            wrong_true.append(int(true[index]))
    computed = runner.read_metrics()
    result = {
        "test_split": config.test_split,
        "test_loss": computed["loss"],
        "test_accuracy": computed["accuracy"],
        "num_examples": int(confusion.sum()),
        "confusion": confusion.tolist(),
    }
    plotting.plot_confusion(confusion, workdir / "confusion.png")
    plotting.plot_misclassified(
        wrong_images, wrong_predicted, wrong_true, workdir / "misclassified.png"
    )
    print(
        f"test accuracy {result['test_accuracy']:.2%} "
        f"({int(np.trace(confusion))}/{result['num_examples']}) on {config.dataset} "
        f"{config.test_split}, {measured}; wrote "
        f"{workdir / 'confusion.png'} and {workdir / 'misclassified.png'}"
    )
    return result
