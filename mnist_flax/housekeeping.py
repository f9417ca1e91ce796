"""What a training run does besides training: takes its workdir, records itself, talks, stops cleanly.

- `holding_workdir`: one run per workdir (`workdir_lock.py`), a workdir of another run refused,
  unreadable checkpoints set aside, and the epoch to resume from, decided by process 0;
- `describe_run`: what history.json and every checkpoint record of the run;
- `write_json_atomically`, `rewrite_stale_history`: history.json never half written, and written
  again where a run was killed between a checkpoint and it;
- `say`, `summary_line`, `warn_about_overlaps`: the lines a run prints (process 0 only);
- `stop_on_ctrl_c`: Ctrl-C sets a flag that the loops act on between batches (`StopRequest`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import jax
from tqdm.auto import tqdm

from mnist_flax import checkpoints, input_pipeline, parallel, workdir_lock
from mnist_flax.config import FINE_TUNE_STAGE, TrainConfig, fine_tune_layer


@contextlib.contextmanager
def holding_workdir(workdir: pathlib.Path, run_config: dict) -> Iterator[int]:
    """Takes the workdir for this run; yields the epoch to resume from (0: start afresh).

    Before the (slow) model build and before anything is written: refuses a file or an unwritable
    place, takes the workdir's lock (one run per workdir), refuses a workdir of another run, and
    sets aside the checkpoints that do not read (`checkpoints.check_workdir`). Process 0 does
    this; the others follow its choice. The lock is released however the run ends.
    """
    lock = workdir_lock.WorkdirLock(workdir)

    def take() -> int:
        checkpoints.check_writable(workdir)
        lock.acquire(say=say)
        return checkpoints.check_workdir(workdir, run_config, say=say)

    try:
        yield parallel.decided_by_process_0(take)
    finally:
        lock.release()


def describe_run(config: TrainConfig, num_classes: int, steps_per_epoch: int) -> dict:
    """The run as history.json and every checkpoint record it: its config, and what each stage's
    schedule depends on (a resumed run must be the same run)."""

    def decay_steps(epochs: int) -> int | None:
        return None if config.lr_schedule == "constant" else epochs * steps_per_epoch

    return {
        **dataclasses.asdict(config),
        "num_classes": num_classes,
        "decay_steps": decay_steps(config.epochs),
        # What a fine-tuning stage depends on (None without one).
        "fine_tune": {
            "layer": fine_tune_layer(config.fine_tune_from),
            "start": config.epochs,
            "learning_rate": config.fine_tune_learning_rate,
            "decay_steps": decay_steps(config.fine_tune_epochs),
        }
        if config.fine_tune_epochs
        else None,
    }


def write_json_atomically(path: pathlib.Path, content: Any) -> None:
    """Writes JSON so that readers see the old file or the new one, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(temporary, path)


def rewrite_stale_history(path: pathlib.Path, content: dict, epoch: int) -> None:
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
    say(f"{path} {why}; wrote it again from the epoch-{epoch} checkpoint")


def is_writer() -> bool:
    """Whether this process writes the run's files and talks: process 0 of a multi-process run.

    Every process runs the same loop and holds the same replicated state and metrics, so the
    others would only repeat (and race to rewrite) what process 0 writes.
    """
    return jax.process_index() == 0


def say(message: str) -> None:
    """Prints a line (process 0 only), above any progress bar."""
    if is_writer():
        tqdm.write(message)


def summary_line(record: dict, epochs: int, images_per_second: float, inputs: str) -> str:
    """The line an epoch ends with: its losses, accuracies, learning rate and speed."""
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


def warn_about_overlaps(splits: dict[str, input_pipeline.Split]) -> None:
    """One line per pair of splits that select the same examples of one source."""
    roles = list(splits)
    for i, first in enumerate(roles):
        for second in roles[i + 1 :]:
            shared = input_pipeline.shared_examples(splits[first], splits[second])
            if shared:
                say(
                    f"warning: --{first}-split and --{second}-split share {shared} examples; "
                    f"the {second} figures are not measured on unseen data"
                    if first == "train"
                    else f"warning: --{first}-split and --{second}-split share {shared} examples"
                )


class StopRequest:
    """A Ctrl-C noted while the epochs run (`stop_on_ctrl_c`), acted on where `check` is called."""

    def __init__(self):
        self.requested = False

    def check(self) -> None:
        """Raises KeyboardInterrupt, here, if Ctrl-C was pressed."""
        if self.requested:
            raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_ctrl_c() -> Iterator[StopRequest]:
    """While the epochs run, Ctrl-C only sets the yielded `StopRequest`; the loops check it.

    They check it after every batch and after every checkpoint, and raise KeyboardInterrupt
    there: a checkpoint and history.json are never half written, and the interrupt cannot land
    inside library code that would swallow it.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request_stop(signum, frame):
        stop.requested = True

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def interrupted_line(epoch: int, saved: int, workdir: pathlib.Path) -> str:
    """What a run stopped by Ctrl-C during `epoch` says, `saved` epochs being in `workdir`."""
    if saved:
        return (
            f"interrupted during epoch {epoch}; epochs 1-{saved} are saved in {workdir}, run "
            "the same command again to resume"
        )
    return f"interrupted during epoch {epoch}; nothing was saved yet"
