"""The epoch loop: `train_and_evaluate` trains a run's epochs and writes what a run leaves behind.

This module owns the order of a run: load the splits, take the workdir (its lock, one run per
workdir: `workdir_lock.py`), refuse a workdir of another run, build the model (`model.py`), resume
from the newest checkpoint that reads (setting aside those that do not), then per stage (frozen,
then optionally fine-tuning) the stage's optimizer, what its epochs run on (images, or what its
frozen layers compute, cached: `feature_cache.py`), and per epoch a train pass and a test pass
through the `StepRunner` (`steps.py`), a line of progress, history.json and an Orbax checkpoint
(`checkpoints.py`); at the end curves.png (`plotting.py`). Ctrl-C stops after the last complete
epoch's checkpoint.

Data parallel over every device of every process (`parallel.py`): the batch is split over a 1-D
mesh and the state replicated, the same code on one device and on a pod slice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from mnist_flax import checkpoints, input_pipeline, parallel, plotting, runtime, workdir_lock
from mnist_flax.config import FINE_TUNE_STAGE, FROZEN_STAGE, TrainConfig, fine_tune_layer
from mnist_flax.feature_cache import Caching, FeatureCache
from mnist_flax.freezing import learning_rate_schedule, make_optimizer, trainable_filter
from mnist_flax.model import create_model, resolve_resize
from mnist_flax.steps import StepRunner, make_metrics, prefetch_to_device

# How often the progress bar reads the running loss and accuracy back from the device. Each read
# waits for the queued steps, so it is kept rare.
PROGRESS_REFRESH_SECONDS = 1.0
# Train or eval steps per call on a split of cached values (`_EpochLoop.run_steps`): one call per
# block instead of one per batch; Ctrl-C and the progress bar act between blocks.
STEPS_PER_CALL = 128


def train_and_evaluate(config: TrainConfig, *, feature_cache: FeatureCache | None = None) -> dict:
    """Trains the run's epochs (resuming the workdir's latest checkpoint); returns the history.

    A run has one or two stages (`config.STAGES`): `config.epochs` with the backbone frozen, then
    `config.fine_tune_epochs` in which its layers from `config.fine_tune_from` on train too, each
    stage with its own optimizer (`model.make_optimizer`) and learning-rate schedule.

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
    if feature_cache is None:
        feature_cache = FeatureCache.for_flag(config.feature_cache)
    mesh = parallel.data_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    workdir = config.resolved_workdir()
    config = dataclasses.replace(config, workdir=str(workdir))

    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
    splits = {
        role: input_pipeline.load_split(config.dataset, name, data_dir=config.data_dir, **shard)
        for role, name in (
            ("train", config.train_split),
            ("validation", config.validation_split),
            ("test", config.test_split),
        )
        if name is not None
    }
    _warn_about_overlaps(splits)
    # Every process steps through as many batches as the largest shard needs (the others pad).
    steps_per_epoch = math.ceil(
        splits["train"].max_process_examples / parallel.local_batch_size(config.batch_size)
    )
    run_config = {
        **dataclasses.asdict(config),
        "num_classes": splits["train"].num_classes,
        "decay_steps": _decay_steps(config, config.epochs, steps_per_epoch),
        # What a fine-tuning stage depends on (None without one).
        "fine_tune": {
            "layer": fine_tune_layer(config.fine_tune_from),
            "start": config.epochs,
            "learning_rate": config.fine_tune_learning_rate,
            "decay_steps": _decay_steps(config, config.fine_tune_epochs, steps_per_epoch),
        }
        if config.fine_tune_epochs
        else None,
    }
    # Process 0 holds the workdir's lock from here to the end; every process resumes from the
    # checkpoint it chose.
    with _holding_workdir(workdir, run_config) as resume:
        model = create_model(config, splits["train"].num_classes)
        # Each stage's learning rate at each of its optimizer steps (Adam's count restarts with the
        # stage's new optimizer).
        schedules = {
            FROZEN_STAGE: learning_rate_schedule(
                config.lr_schedule,
                config.learning_rate,
                epochs=config.epochs,
                steps_per_epoch=steps_per_epoch,
                warmup_epochs=config.warmup_epochs,
            )
        }
        if config.fine_tune_epochs:
            schedules[FINE_TUNE_STAGE] = learning_rate_schedule(
                config.lr_schedule,
                config.fine_tune_learning_rate,
                epochs=config.fine_tune_epochs,
                steps_per_epoch=steps_per_epoch,
                warmup_epochs=config.warmup_epochs,
            )
        # Replicated before restoring: Orbax restores each array with the sharding of its target.
        nnx.update(model, parallel.replicate(nnx.state(model), mesh))
        history: list[dict] = []
        data_seed = config.seed
        store = checkpoints.RunCheckpoints(workdir, keep_best="validation" in splits)
        try:
            if resume:
                restored = store.restore(
                    resume, trainable=nnx.state(model, trainable_filter(model))
                )
                # In place: every parameter some stage trains, as the checkpoint left it.
                nnx.update(model, restored.trainable)
                history, data_seed = restored.history, restored.data_seed
                _say(
                    f"resuming from the epoch-{restored.epoch} checkpoint in {workdir} "
                    f"({restored.epoch} of {config.total_epochs} epochs done)"
                )
                if _is_writer():
                    _rewrite_stale_history(
                        workdir / checkpoints.HISTORY_FILE,
                        {"config": run_config, "epochs": history},
                        restored.epoch,
                    )

            def runner_for(stage: str) -> StepRunner:
                """The stage's optimizer, restored when the latest checkpoint stopped inside the stage."""
                optimizer = make_optimizer(model, schedules[stage], stage=stage)
                nnx.update(optimizer, parallel.replicate(nnx.state(optimizer), mesh))
                done = len(history)
                if done and config.stage(done) == stage:
                    restored = store.restore(done, optimizer=nnx.state(optimizer))
                    # In place: Adam's moments and the schedule's position (Adam's step count)
                    # continue where the checkpoint left them.
                    nnx.update(optimizer, restored.optimizer)
                return StepRunner(model, optimizer, make_metrics(), stage=stage, mesh=mesh)

            def learning_rate(epoch: int) -> float:
                """The rate of the epoch's last step."""
                stage = config.stage(epoch)
                steps = (
                    epoch if stage == FROZEN_STAGE else epoch - config.epochs
                ) * steps_per_epoch
                return float(schedules[stage](steps - 1))

            epochs = _EpochLoop(
                config,
                run_config,
                runner_for,
                store,
                history,
                data_seed,
                learning_rate=learning_rate,
                feature_cache=feature_cache,
            )
            epochs.run(splits)
        finally:
            store.close()
        history_file = {"config": run_config, "epochs": history}
        if _is_writer():
            plotting.plot_history(history_file, workdir / "curves.png")
    return history_file


@contextlib.contextmanager
def _holding_workdir(workdir: pathlib.Path, run_config: dict) -> Iterator[int]:
    """Takes the workdir for this run; yields the epoch to resume from (0: start afresh).

    Before the (slow) model build and before anything is written: refuses a file or an unwritable
    place, takes the workdir's lock (one run per workdir), refuses a workdir of another run, and
    sets aside the checkpoints that do not read (`checkpoints.check_workdir`). Process 0 does
    this; the others follow its choice. The lock is released however the run ends.
    """
    lock = workdir_lock.WorkdirLock(workdir)

    def take() -> int:
        checkpoints.check_writable(workdir)
        lock.acquire(say=_say)
        return checkpoints.check_workdir(workdir, run_config, say=_say)

    try:
        yield parallel.decided_by_process_0(take)
    finally:
        lock.release()


def _rewrite_stale_history(path: pathlib.Path, content: dict, epoch: int) -> None:
    """Writes history.json again from the checkpoint it resumes where the file does not read or
    holds fewer epochs (a run killed between a checkpoint and its history.json): a finished run
    trains no epoch that would rewrite it. One that holds more (a newer checkpoint set aside) is
    left as it is until its epochs are trained again."""
    try:
        recorded = json.loads(path.read_text())
    except FileNotFoundError:
        why = "is missing"
    except ValueError as error:
        why = f"does not read ({error})"
    else:
        epochs = recorded.get("epochs") if isinstance(recorded, dict) else None
        if isinstance(epochs, list) and len(epochs) >= len(content["epochs"]):
            return
        why = f"records {len(epochs)} epochs" if isinstance(epochs, list) else "records no epochs"
    write_json_atomically(path, content)
    _say(f"{path} {why}; wrote it again from the epoch-{epoch} checkpoint")


def _decay_steps(config: TrainConfig, epochs: int, steps_per_epoch: int) -> int | None:
    """The optimizer steps a stage's learning rate decays over; None for a constant rate."""
    return None if config.lr_schedule == "constant" else epochs * steps_per_epoch


def _warn_about_overlaps(splits: dict[str, input_pipeline.Split]) -> None:
    """One line per pair of splits that select the same examples of one source."""
    roles = list(splits)
    for i, first in enumerate(roles):
        for second in roles[i + 1 :]:
            shared = input_pipeline.shared_examples(splits[first], splits[second])
            if shared:
                _say(
                    f"warning: --{first}-split and --{second}-split share {shared} examples; "
                    f"the {second} figures are not measured on unseen data"
                    if first == "train"
                    else f"warning: --{first}-split and --{second}-split share {shared} examples"
                )


@dataclasses.dataclass
class _EpochLoop:
    """The epochs after those in `history`, each ending in a checkpoint and a history.json rewrite."""

    config: TrainConfig
    run_config: dict
    runner_for: Callable[[str], StepRunner]  # stage -> the runner of its model and optimizer
    store: checkpoints.RunCheckpoints
    history: list[dict]
    data_seed: int
    learning_rate: Callable[[int], float]  # epoch -> the rate of its last step
    feature_cache: FeatureCache

    def __post_init__(self):
        self.stop_requested = False  # set by Ctrl-C (see `_ctrl_c_between_batches`)
        self.workdir = pathlib.Path(self.config.workdir)
        self.show_progress = not self.config.quiet and _is_writer()
        # This process's rows of each global batch.
        self.batch_size = parallel.local_batch_size(self.config.batch_size)
        self.resize = resolve_resize(self.config.resize, self.config.model)
        self.runner: StepRunner | None = None  # the current stage's (`run`)
        self.mesh = None  # the runner's
        self.device_examples: dict[int, dict] = {}  # `examples_on_device`, this stage's
        self.caching = Caching(
            self.config,
            self.feature_cache,
            self.batches,
            say=_say,
            show_progress=self.show_progress,
            check_stop=self.stop_if_requested,
        )

    def batches(self, split: input_pipeline.Split, shuffle_seed: int | None):
        return input_pipeline.make_batches(
            split,
            batch_size=self.batch_size,
            image_size=self.config.image_size,
            shuffle_seed=shuffle_seed,
            resize=self.resize,
        )

    def run(self, splits: dict[str, input_pipeline.Split]) -> None:
        """The remaining epochs of every stage over `splits` ("train", "test", maybe "validation")."""
        with _ctrl_c_between_batches(self):
            config = self.config
            stages = ((FROZEN_STAGE, config.epochs), (FINE_TUNE_STAGE, config.total_epochs))
            for stage, last in stages:
                # A finished stage: nothing to train, nothing to cache or say about caching.
                if len(self.history) < last:
                    self.runner = self.runner_for(stage)
                    self.mesh = self.runner.mesh
                    self.run_stage(stage, last, splits)
                    # The next stage's runner starts from the parameters this one trained.
                    self.runner.sync()

    def run_stage(self, stage: str, last: int, splits: dict[str, input_pipeline.Split]) -> None:
        """The stage's epochs up to `last`, on cached inputs where `Caching.inputs_for` allows."""
        config = self.config
        inputs, splits = self.caching.inputs_for(stage, self.runner, splits)
        self.device_examples.clear()  # the last stage's cached values
        evaluated = [role for role in ("validation", "test") if role in splits]
        epoch = len(self.history)
        try:
            for epoch in range(len(self.history) + 1, last + 1):
                start = time.perf_counter()
                shuffle_seed = input_pipeline.epoch_seed(self.data_seed, epoch)
                train_metrics, images_per_second = self.pass_over(
                    splits["train"],
                    True,
                    shuffle_seed,
                    f"epoch {epoch}/{config.total_epochs}",
                )
                record = {
                    "epoch": epoch,
                    "stage": stage,
                    "learning_rate": self.learning_rate(epoch),
                    "train_loss": train_metrics["loss"],
                    "train_accuracy": train_metrics["accuracy"],
                }
                for role in evaluated:
                    metrics, _ = self.pass_over(splits[role], False, None, role)
                    record[f"{role}_loss"] = metrics["loss"]
                    record[f"{role}_accuracy"] = metrics["accuracy"]
                record["seconds"] = time.perf_counter() - start
                self.save(epoch, record)
                _say(_summary_line(record, config.total_epochs, images_per_second, inputs))
                self.stop_if_requested()
        except KeyboardInterrupt:
            _say(
                f"interrupted during epoch {epoch}; epochs 1-{len(self.history)} are saved in "
                f"{self.workdir}, run the same command again to resume"
                if self.history
                else f"interrupted during epoch {epoch}; nothing was saved yet"
            )
            raise

    def pass_over(
        self,
        split: input_pipeline.Split,
        train: bool,
        shuffle_seed: int | None,
        description: str,
    ) -> tuple[dict[str, float], float]:
        """Runs the train (or eval) step on every batch of `split`; returns the pass's metrics
        and images/s."""
        runner = self.runner
        runner.reset_metrics()
        start = last_refresh = time.perf_counter()
        examples = 0
        num_steps = math.ceil(split.max_process_examples / self.batch_size)
        with tqdm(
            total=num_steps,
            desc=description,
            unit="step",
            leave=False,
            disable=not self.show_progress,
        ) as bar:
            for steps, real in self.run_steps(split, train, shuffle_seed, num_steps):
                # Processes step in lockstep on shards that differ by at most one example, so
                # this process's count times the process count is the global throughput.
                examples += real * jax.process_count()
                bar.update(steps)
                self.stop_if_requested()
                now = time.perf_counter()
                if self.show_progress and now - last_refresh >= PROGRESS_REFRESH_SECONDS:
                    running = runner.read_metrics()
                    bar.set_postfix(
                        img_s=f"{examples / (now - start):.0f}",
                        loss=f"{running['loss']:.4f}",
                        acc=f"{running['accuracy']:.4f}",
                    )
                    last_refresh = now
            metrics = runner.read_metrics()
        return metrics, examples / (time.perf_counter() - start)

    def run_steps(
        self, split: input_pipeline.Split, train: bool, shuffle_seed: int | None, num_steps: int
    ) -> Iterator[tuple[int, int]]:
        """Runs the pass's steps; yields (steps run, real examples in them) after each call.

        A split of cached values held in memory runs `STEPS_PER_CALL` steps a call on the device
        (`StepRunner.train_block`), on the batches tf.data would have gathered; images (and every
        split of a multi-process run, whose batches are stacked from every process's rows) come
        from tf.data a batch at a time, copied to the device ahead of the step.
        """
        runner = self.runner
        if split.arrays is not None and jax.process_count() == 1:
            examples = self.examples_on_device(split)
            indices = input_pipeline.batch_indices(
                split.num_examples, self.batch_size, shuffle_seed, num_steps
            )
            call = runner.train_block if train else runner.eval_block
            for start in range(0, num_steps, STEPS_PER_CALL):
                block = indices[start : start + STEPS_PER_CALL]
                call(examples, block)
                yield len(block), int(np.sum(block >= 0))
            return
        step = runner.train if train else runner.eval

        def place(batch):
            return int(np.sum(batch["mask"])), parallel.shard_batch(batch, self.mesh)

        batches = self.batches(split, shuffle_seed).as_numpy_iterator()
        for real, batch in prefetch_to_device(batches, place=place):
            step(batch)
            yield 1, real

    def examples_on_device(self, split: input_pipeline.Split) -> dict[str, jax.Array]:
        """The cached split's arrays on the device, copied there once per stage."""
        key = id(split.arrays)
        if key not in self.device_examples:
            self.device_examples[key] = self.runner.place_examples(split.arrays)
        return self.device_examples[key]

    def save(self, epoch: int, record: dict) -> None:
        """Appends the epoch's record, saves its checkpoint and rewrites history.json."""
        runner = self.runner
        runner.sync()
        self.history.append(record)
        # Every process saves: Orbax writes each array once and synchronises the processes.
        self.store.save(
            epoch,
            trainable=nnx.state(runner.model, trainable_filter(runner.model)),
            optimizer=nnx.state(runner.optimizer),
            data_seed=self.data_seed,
            run_config=self.run_config,
            history=self.history,
        )
        if _is_writer():
            write_json_atomically(
                self.workdir / checkpoints.HISTORY_FILE,
                {"config": self.run_config, "epochs": self.history},
            )

    def stop_if_requested(self) -> None:
        """Turns a Ctrl-C noted by `_ctrl_c_between_batches` into KeyboardInterrupt, here."""
        if self.stop_requested:
            raise KeyboardInterrupt


@contextlib.contextmanager
def _ctrl_c_between_batches(loop: _EpochLoop) -> Iterator[None]:
    """While the epochs run, Ctrl-C only sets `loop.stop_requested`; the loop acts on it.

    The loop checks the flag after every batch and after every checkpoint, and raises
    KeyboardInterrupt there: a checkpoint and history.json are never half written, and the
    interrupt cannot land inside library code that would swallow it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        loop.stop_requested = True

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def write_json_atomically(path: pathlib.Path, content: Any) -> None:
    """Writes JSON so that readers see the old file or the new one, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(temporary, path)


def _is_writer() -> bool:
    """Whether this process writes the run's files and talks: process 0 of a multi-process run.

    Every process runs the same loop and holds the same replicated state and metrics, so the
    others would only repeat (and race to rewrite) what process 0 writes.
    """
    return jax.process_index() == 0


def _say(message: str) -> None:
    if _is_writer():
        tqdm.write(message)


def _summary_line(record: dict, epochs: int, images_per_second: float, inputs: str) -> str:
    evaluated = "".join(
        f"{role} loss {record[f'{role}_loss']:.4f} acc {record[f'{role}_accuracy']:.2%}  "
        for role in ("validation", "test")
        if f"{role}_loss" in record
    )
    stage = "  fine-tune" if record["stage"] == FINE_TUNE_STAGE else ""
    return (
        f"epoch {record['epoch']:>{len(str(epochs))}}/{epochs}{stage}  "
        f"lr {record['learning_rate']:.2e}  "
        f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.2%}  {evaluated}"
        f"({record['seconds']:.1f} s, {images_per_second:.0f} img/s on {inputs})"
    )
