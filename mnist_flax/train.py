"""The training run: `train_and_evaluate` and the passes over the data it runs.

Read `train_and_evaluate` top to bottom: the splits are loaded, the workdir is taken
(`housekeeping.py`), the model is built (`build.py`) and resumed from the newest checkpoint that
reads; then for each stage (the frozen backbone, then optionally fine-tuning) its optimizer and
what its epochs run on (images, or the values its frozen layers compute, cached:
`feature_cache.py`), and for each epoch a train pass, the evaluation passes, an Orbax checkpoint
and history.json (`checkpoints.py`). A pass (`run_pass`) feeds a split's batches to the compiled
steps of the `StepRunner` (`steps.py`). At the end, curves.png (`plotting.py`).

Data parallel over every device of every process (`parallel.py`): the batch is split over a 1-D
mesh and the state replicated, the same code on one device and on a pod slice.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time

import jax
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from mnist_flax import checkpoints, housekeeping, input_pipeline, parallel, plotting, runtime
from mnist_flax.build import create_model
from mnist_flax.config import FINE_TUNE_STAGE, FROZEN_STAGE, TrainConfig
from mnist_flax.feature_cache import FeatureCache, stage_inputs
from mnist_flax.freezing import learning_rate_schedule, make_optimizer, trainable_filter
from mnist_flax.steps import StepRunner, epoch_batches, make_metrics, prefetch_to_device

# How often the progress bar reads the running loss and accuracy back from the device. Each read
# waits for the queued steps, so it is kept rare.
PROGRESS_REFRESH_SECONDS = 1.0
# Train or eval steps per call on a split of cached values (`run_pass`): one call per block
# instead of one per batch; Ctrl-C and the progress bar act between blocks.
STEPS_PER_CALL = 128


def train_and_evaluate(config: TrainConfig, *, feature_cache: FeatureCache | None = None) -> dict:
    """Trains the run's epochs (resuming the workdir's latest checkpoint); returns the history.

    A run has one or two stages (`config.STAGES`): `config.epochs` with the backbone frozen, then
    `config.fine_tune_epochs` in which its layers from `config.fine_tune_from` on train too, each
    stage with its own optimizer (`freezing.make_optimizer`) and learning-rate schedule.

    The workdir receives history.json (rewritten after every epoch), Orbax checkpoints of every
    epoch (the last few and the best kept) and curves.png at the end. A workdir that another run
    holds (its lock) or that holds another run is refused before anything is written. Ctrl-C stops
    after the last complete epoch's checkpoint; running again resumes from it, in either stage,
    and from the newest checkpoint that reads where the latest does not.

    `config.batch_size` is the global batch, split over every device of every process (it must be
    a multiple of their count). In a multi-process run (after `parallel.initialize_distributed`)
    each process reads its own shard of each split, every process saves its part of the
    checkpoints (all must see the same workdir), and process 0 alone writes history.json and the
    plots.

    `feature_cache`: where cached backbone features (and activations) are kept and found again
    (`feature_cache.py`: this process's memory and the `--feature-cache` directory); several runs
    in one process (`mnist-flax seeds`) share one. By default a new one for `--feature-cache`.
    """
    config.validate()
    runtime.enable_compilation_cache(config.compilation_cache)
    feature_cache = feature_cache or FeatureCache.for_flag(config.feature_cache)
    mesh = parallel.data_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    workdir = config.resolved_workdir()
    config = dataclasses.replace(config, workdir=str(workdir))
    splits = load_splits(config)
    housekeeping.warn_about_overlaps(splits)
    # Every process steps through as many batches as the largest shard needs (the others pad).
    local_batch = parallel.local_batch_size(config.batch_size)
    steps_per_epoch = math.ceil(splits["train"].max_process_examples / local_batch)
    run_config = housekeeping.describe_run(config, splits["train"].num_classes, steps_per_epoch)
    history: list[dict] = []
    epoch = 0  # the epoch being trained, for the line Ctrl-C leaves

    # Process 0 holds the workdir's lock to the end; every process resumes where it decided.
    # From here Ctrl-C stops the run between batches, never inside a checkpoint's writing.
    with (
        housekeeping.holding_workdir(workdir, run_config) as resume,
        housekeeping.stop_on_ctrl_c() as stop,
    ):
        model = create_model(config, splits["train"].num_classes)
        # Replicated before restoring: Orbax restores each array with the sharding of its target.
        nnx.update(model, parallel.replicate(nnx.state(model), mesh))
        store = checkpoints.RunCheckpoints(workdir, keep_best="validation" in splits)
        data_seed = config.seed
        try:
            if resume:
                history, data_seed = restore_run(store, resume, model, run_config)
            stages = (
                (FROZEN_STAGE, 0, config.epochs),
                (FINE_TUNE_STAGE, config.epochs, config.total_epochs),
            )
            for stage, before, last in stages:  # `before` epochs of other stages, up to `last`
                if len(history) >= last:
                    continue  # a finished stage: nothing to train or cache
                schedule = stage_schedule(config, stage, steps_per_epoch)
                optimizer = stage_optimizer(model, stage, schedule, store, history, mesh)
                runner = StepRunner(model, optimizer, make_metrics(), stage=stage, mesh=mesh)
                epoch = len(history) + 1
                inputs, stage_splits = stage_inputs(
                    stage, runner, splits, config=config, cache=feature_cache, stop=stop
                )
                on_device = cached_on_device(runner, stage_splits)
                for epoch in range(len(history) + 1, last + 1):
                    start = time.perf_counter()
                    metrics, images_per_second = run_pass(
                        runner, stage_splits["train"], config, stop, train=True,
                        shuffle_seed=input_pipeline.epoch_seed(data_seed, epoch),
                        examples=on_device.get("train"),
                        description=f"epoch {epoch}/{config.total_epochs}",
                    )  # fmt: skip
                    record = {
                        "epoch": epoch,
                        "stage": stage,
                        # The rate of the epoch's last step (Adam's count restarts each stage).
                        "learning_rate": float(schedule((epoch - before) * steps_per_epoch - 1)),
                        "train_loss": metrics["loss"],
                        "train_accuracy": metrics["accuracy"],
                    }
                    for role in ("validation", "test"):
                        if role in stage_splits:
                            metrics, _ = run_pass(
                                runner, stage_splits[role], config, stop, train=False,
                                examples=on_device.get(role), description=role,
                            )  # fmt: skip
                            record[f"{role}_loss"] = metrics["loss"]
                            record[f"{role}_accuracy"] = metrics["accuracy"]
                    record["seconds"] = time.perf_counter() - start
                    history.append(record)
                    save_epoch(store, runner, history, data_seed, run_config)
                    line = housekeeping.summary_line(
                        record, config.total_epochs, images_per_second, inputs
                    )
                    housekeeping.say(line)
                    stop.check()
                # The next stage's runner starts from the parameters this one trained.
                runner.sync()
        except KeyboardInterrupt:
            if epoch:
                housekeeping.say(housekeeping.interrupted_line(epoch, len(history), workdir))
            raise
        finally:
            store.close()
    history_file = {"config": run_config, "epochs": history}
    if housekeeping.is_writer():
        plotting.plot_history(history_file, workdir / "curves.png")
    return history_file


def run_pass(
    runner: StepRunner,
    split: input_pipeline.Split,
    config: TrainConfig,
    stop: housekeeping.StopRequest,
    *,
    train: bool,
    description: str,
    shuffle_seed: int | None = None,
    examples: dict[str, jax.Array] | None = None,
) -> tuple[dict[str, float], float]:
    """Runs the train (or eval) step on every batch of `split`; returns the pass's metrics and
    images/s.

    A split of cached values already on the device (`examples`, from `cached_on_device`) runs
    `STEPS_PER_CALL` steps a call there (`StepRunner.train_block`), on the batches tf.data would
    have gathered; otherwise tf.data's batches are copied to the device ahead of the step, one
    step a batch.
    """
    runner.reset_metrics()
    local_batch = parallel.local_batch_size(config.batch_size)
    num_steps = math.ceil(split.max_process_examples / local_batch)
    show = not config.quiet and housekeeping.is_writer()
    start = last_refresh = time.perf_counter()
    seen = 0
    with tqdm(total=num_steps, desc=description, unit="step", leave=False, disable=not show) as bar:

        def done(steps: int, real: int) -> None:
            """After each call: progress, throughput, and Ctrl-C acted on."""
            nonlocal seen, last_refresh
            # Processes step in lockstep on shards that differ by at most one example, so this
            # process's count times the process count is the global throughput.
            seen += real * jax.process_count()
            bar.update(steps)
            stop.check()
            now = time.perf_counter()
            if show and now - last_refresh >= PROGRESS_REFRESH_SECONDS:
                running = runner.read_metrics()
                bar.set_postfix(
                    img_s=f"{seen / (now - start):.0f}",
                    loss=f"{running['loss']:.4f}",
                    acc=f"{running['accuracy']:.4f}",
                )
                last_refresh = now

        if examples is not None:
            indices = input_pipeline.batch_indices(
                split.num_examples, local_batch, shuffle_seed, num_steps
            )
            for first in range(0, num_steps, STEPS_PER_CALL):
                block = indices[first : first + STEPS_PER_CALL]
                if train:
                    runner.train_block(examples, block)
                else:
                    runner.eval_block(examples, block)
                done(len(block), int(np.sum(block >= 0)))
        else:
            batches = epoch_batches(split, config, shuffle_seed).as_numpy_iterator()

            def place(batch):
                return int(np.sum(batch["mask"])), parallel.shard_batch(batch, runner.mesh)

            for real, batch in prefetch_to_device(batches, place=place):
                if train:
                    runner.train(batch)
                else:
                    runner.eval(batch)
                done(1, real)
        metrics = runner.read_metrics()
    return metrics, seen / (time.perf_counter() - start)


def load_splits(config: TrainConfig) -> dict[str, input_pipeline.Split]:
    """This process's shard of the train, validation (if any) and test splits."""
    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
    names = {
        "train": config.train_split,
        "validation": config.validation_split,
        "test": config.test_split,
    }
    return {
        role: input_pipeline.load_split(config.dataset, name, data_dir=config.data_dir, **shard)
        for role, name in names.items()
        if name is not None
    }


def restore_run(
    store: checkpoints.RunCheckpoints, epoch: int, model: nnx.Module, run_config: dict
) -> tuple[list[dict], int]:
    """Puts the epoch-`epoch` checkpoint's parameters into `model`; returns its history and data
    seed. A history.json the run left behind stale is written again from the checkpoint."""
    restored = store.restore(epoch, trainable=nnx.state(model, trainable_filter(model)))
    # In place: every parameter some stage trains, as the checkpoint left it.
    nnx.update(model, restored.trainable)
    workdir = run_config["workdir"]
    total = run_config["epochs"] + run_config["fine_tune_epochs"]
    housekeeping.say(
        f"resuming from the epoch-{epoch} checkpoint in {workdir} ({epoch} of {total} epochs done)"
    )
    if housekeeping.is_writer():
        housekeeping.rewrite_stale_history(
            pathlib.Path(workdir, checkpoints.HISTORY_FILE),
            {"config": run_config, "epochs": restored.history},
            epoch,
        )
    return restored.history, restored.data_seed


def stage_schedule(config: TrainConfig, stage: str, steps_per_epoch: int) -> optax.Schedule:
    """The stage's learning rate at each of its optimizer steps."""
    frozen = stage == FROZEN_STAGE
    return learning_rate_schedule(
        config.lr_schedule,
        config.learning_rate if frozen else config.fine_tune_learning_rate,
        epochs=config.epochs if frozen else config.fine_tune_epochs,
        steps_per_epoch=steps_per_epoch,
        warmup_epochs=config.warmup_epochs,
    )


def stage_optimizer(
    model: nnx.Module,
    stage: str,
    schedule: optax.Schedule,
    store: checkpoints.RunCheckpoints,
    history: list[dict],
    mesh: jax.sharding.Mesh,
) -> nnx.Optimizer:
    """The stage's optimizer, restored where the latest checkpoint stopped inside the stage."""
    optimizer = make_optimizer(model, schedule, stage=stage)
    nnx.update(optimizer, parallel.replicate(nnx.state(optimizer), mesh))
    done = len(history)
    if done and history[-1]["stage"] == stage:
        # In place: Adam's moments and the schedule's position (Adam's step count) continue
        # where the checkpoint left them.
        nnx.update(optimizer, store.restore(done, optimizer=nnx.state(optimizer)).optimizer)
    return optimizer


def cached_on_device(
    runner: StepRunner, splits: dict[str, input_pipeline.Split]
) -> dict[str, dict[str, jax.Array]]:
    """The splits of cached values, copied to the device once for the stage's epochs, which then
    gather their batches there. Not in a multi-process run: its batches are stacked from every
    process's rows, which tf.data gives each process."""
    if jax.process_count() > 1:
        return {}
    return {
        role: runner.place_examples(split.arrays)
        for role, split in splits.items()
        if split.arrays is not None
    }


def save_epoch(
    store: checkpoints.RunCheckpoints,
    runner: StepRunner,
    history: list[dict],
    data_seed: int,
    run_config: dict,
) -> None:
    """The checkpoint of the epoch `history` ends with, then history.json rewritten."""
    runner.sync()
    # Every process saves: Orbax writes each array once and synchronises the processes.
    store.save(
        len(history),
        trainable=nnx.state(runner.model, trainable_filter(runner.model)),
        optimizer=nnx.state(runner.optimizer),
        data_seed=data_seed,
        run_config=run_config,
        history=history,
    )
    if housekeeping.is_writer():
        housekeeping.write_json_atomically(
            pathlib.Path(run_config["workdir"], checkpoints.HISTORY_FILE),
            {"config": run_config, "epochs": history},
        )
