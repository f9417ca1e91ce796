"""Checkpoints of a training run (Orbax): what each epoch saves, which are kept, whose workdir it is.

Each epoch saves, under `<workdir>/checkpoints/<epoch>/`:
- `trainable`: the parameters some stage of the run trains (the head, the notebook model's adapter,
  the fine-tuned layers). The frozen rest of the backbone is not saved: it is rebuilt from the
  run's `weights` source, which is why that source must not change on resume.
- `optimizer`: the state of the epoch's stage's optimizer (step count, Adam moments).
- `meta` (JSON): the epoch, the seed the per-epoch data orders derive from, the run's config and
  the history so far, so a checkpoint alone is enough to resume.

The last `KEEP_LATEST` epochs are kept, plus, in a run with a validation split, the one with the
best validation accuracy. Nothing is ever chosen by test accuracy.

A run resumes only into a workdir that holds the same run: `check_workdir` compares the fields of
`MUST_MATCH` with what the workdir's checkpoint (or history.json) recorded and refuses, before
anything is written, when they differ.

A checkpoint that does not read whole (a file emptied, cut short or missing, as a full disk or a
partial copy leaves it) is reported in one line and passed over for the newest one that reads:
`RunCheckpoints.readable`, which training, evaluation and any later reader call. Training also
sets it aside, out of `checkpoints/` into `damaged-checkpoints/`, never deleting it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers

CHECKPOINT_DIR = "checkpoints"
# Where training moves the checkpoints that do not read, as <epoch>-<when>/.
DAMAGED_DIR = "damaged-checkpoints"
HISTORY_FILE = "history.json"
KEEP_LATEST = 3
# What a resumed run must share with the checkpointed one: the model (weights source, width, input
# size, classes, compute dtype) and the recipe whose history it continues (data, batch, optimizer,
# seed). Everything else (workdir, quiet, data_dir, resize, conv_impl, cache_features, and epochs
# unless the learning rate decays) may change.
MUST_MATCH = (
    "model",
    "dataset",
    "train_split",
    "test_split",
    "num_classes",
    "image_size",
    "alpha",
    "weights",
    "dtype",
    "batch_size",
    "learning_rate",
    "lr_schedule",
    "warmup_epochs",
    # The optimizer steps the learning rate decays over: a decaying schedule's run resumes only
    # with the same length (None for a constant rate, whose run may be extended).
    "decay_steps",
    "validation_split",
    "seed",
    # The fine-tuning stage (None in a run without one): the layer it starts at, the epoch it
    # follows, its learning rate and the steps that rate decays over.
    "fine_tune",
)
# The metric that chooses the best checkpoint of a run with a validation split.
BEST_METRIC = "validation_accuracy"


class CheckpointMismatchError(ValueError):
    """The workdir holds a run with another model or recipe than the one requested."""


class WorkdirError(ValueError):
    """The workdir cannot be written, or holds nothing to evaluate."""


class DamagedCheckpointsError(WorkdirError):
    """The workdir has checkpoints and none of them reads."""


@dataclasses.dataclass
class Readable:
    """The checkpoint `RunCheckpoints.readable` chose, and those passed over for it."""

    epoch: int
    meta: dict  # the epoch, data seed, config and history it recorded
    passed_over: list[int]  # the epochs asked for before it that do not read


@dataclasses.dataclass
class Restored:
    """One epoch's checkpoint, read back."""

    epoch: int
    trainable: Any
    optimizer: Any
    data_seed: int
    run_config: dict
    history: list[dict]


def _recorded_history_config(workdir: pathlib.Path) -> dict | None:
    """The config the workdir's history.json recorded (a workdir without checkpoints), or None."""
    history = workdir / HISTORY_FILE
    if not history.is_file():
        return None
    try:
        return json.loads(history.read_text())["config"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointMismatchError(
            f"{history} is not a history file of this project ({error}); choose another --workdir"
        ) from None


def check_writable(workdir: str | os.PathLike) -> None:
    """Raises WorkdirError unless files can be created in `workdir` (or where it would be made)."""
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} is a file; choose a directory")
    existing = workdir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise WorkdirError(
            f"--workdir {workdir} cannot be created: {existing} is a file; choose another --workdir"
        )
    try:
        # Creating (and removing) a file is the only test that also holds for root and read-only mounts.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise WorkdirError(
            f"--workdir {workdir} is not writable ({error.strerror} in {existing}); "
            "choose another --workdir"
        ) from None


def check_workdir(
    workdir: str | os.PathLike, run_config: dict, *, say: Callable[[str], None]
) -> int:
    """The epoch a run of `run_config` resumes from in `workdir` (0: none, it starts afresh).

    Refuses, without writing anything, a workdir of another run (by its newest checkpoint that
    reads, or else its history.json). Then sets aside the newer checkpoints that do not read,
    saying so with `say` (`RunCheckpoints.readable`). Call it holding the workdir's lock.
    """
    workdir = pathlib.Path(workdir)

    def same_run(recorded_config: dict, source: str) -> None:
        differences = [
            f"{field}={recorded_config.get(field)!r} (asked {run_config.get(field)!r})"
            for field in MUST_MATCH
            if recorded_config.get(field) != run_config.get(field)
        ]
        if differences:
            raise CheckpointMismatchError(
                f"--workdir {workdir} holds another run ({source} has {', '.join(differences)}); "
                "pass the same options to resume it, or choose another --workdir"
            )

    if (workdir / CHECKPOINT_DIR).is_dir():
        store = RunCheckpoints(workdir, read_only=True)
        try:
            found = store.readable(
                say=say,
                set_aside=True,
                check=lambda epoch, meta: same_run(meta["config"], f"its epoch-{epoch} checkpoint"),
            )
        finally:
            store.close()
        if found is not None:
            return found.epoch
    recorded = _recorded_history_config(workdir)
    if recorded is not None:
        same_run(recorded, str(workdir / HISTORY_FILE))
    return 0


def to_saved(state: Any) -> dict:
    """How every NNX state of this project is saved: as the plain nested dict `nnx.to_pure_dict`
    makes of it (Flax's checkpointing guide), so Orbax needs to know no NNX or optax type."""
    return nnx.to_pure_dict(state)


def saved_target(target: Any, sharding: jax.sharding.Sharding | None = None) -> dict:
    """What Orbax restores a `to_saved` dict into: the shapes and dtypes of the state `target`
    (concrete or abstract), placed like `target`'s arrays or, when given, with `sharding`."""

    def abstract(leaf):
        placement = sharding if sharding is not None else getattr(leaf, "sharding", None)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=placement)

    return jax.tree.map(abstract, to_saved(target))


def into_state(target: Any, restored: dict) -> Any:
    """`target` (an `nnx.State`) holding the arrays of a restored `to_saved` dict."""
    nnx.replace_by_pure_dict(target, restored)
    return target


class RunCheckpoints:
    """The Orbax CheckpointManager of one workdir, one step per epoch."""

    def __init__(
        self, workdir: str | os.PathLike, *, read_only: bool = False, keep_best: bool = False
    ):
        """`keep_best`: also keep the epoch with the best `BEST_METRIC` (a run with validation)."""
        self.directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
        self.keep_best = keep_best
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True)
        else:
            policies = [checkpoint_managers.LatestN(n=KEEP_LATEST)]
            if keep_best:
                policies.append(
                    checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1)
                )
            options = ocp.CheckpointManagerOptions(
                preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
                # One save per epoch: writing synchronously keeps "saved" meaning "on disk" when
                # Ctrl-C arrives.
                enable_async_checkpointing=False,
            )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._read: dict[int, dict | str] = {}  # epoch -> its meta, or what failed to read
        self._said: set[int] = set()  # the epochs said not to read

    def readable(
        self,
        epochs: Sequence[int] | None = None,
        *,
        say: Callable[[str], None],
        set_aside: bool = False,
        check: Callable[[int, dict], None] | None = None,
    ) -> Readable | None:
        """The first of `epochs` (default: every kept epoch, newest first) whose checkpoint reads
        whole; None when there is no checkpoint.

        Each one before it that does not read is said with `say`, in one line naming what failed
        (once per store), and passed over; with `set_aside` (training, which holds the workdir's
        lock) it is moved to `<workdir>/damaged-checkpoints/<epoch>-<time>/`, never deleted, where
        Orbax no longer lists it. `check(epoch, meta)` runs on the chosen checkpoint before anything
        is moved (a refusal then writes nothing). When none of `epochs` reads, each is said, nothing
        is moved and DamagedCheckpointsError is raised.
        """
        if epochs is None:
            epochs = sorted(self.manager.all_steps(), reverse=True)
        if not epochs:
            return None
        passed_over = []
        for epoch in epochs:
            if isinstance(self._read_whole(epoch), dict):
                break
            passed_over.append(epoch)
        else:
            for epoch in passed_over:
                self._say_unreadable(epoch, say, "")
            history = self.directory.parent / HISTORY_FILE
            raise DamagedCheckpointsError(
                f"no checkpoint in {self.directory} can be read (epoch"
                f"{'s' if len(passed_over) > 1 else ''} {', '.join(map(str, passed_over))}, as "
                f"said above); nothing was moved: restore them from a copy, or move "
                f"{self.directory} and {history} away to train the run again from the start"
            )
        meta = self._read_whole(epoch)
        if check is not None:
            check(epoch, meta)
        for damaged in passed_over:
            if set_aside:
                moved = self._set_aside(damaged)
                self._say_unreadable(damaged, say, f"; moved it to {moved}")
            else:
                self._say_unreadable(
                    damaged,
                    say,
                    f"; passing over it (training on this workdir again moves it to "
                    f"{self.directory.parent / DAMAGED_DIR})",
                )
        return Readable(epoch=epoch, meta=meta, passed_over=passed_over)

    def ranked(self, history: list[dict], metric: str = BEST_METRIC) -> list[int]:
        """The kept epochs that recorded `metric` in `history`, best first (the later of equals);
        empty in a run without a validation split."""
        recorded = {r["epoch"]: r[metric] for r in history if metric in r}
        kept = [epoch for epoch in self.manager.all_steps() if epoch in recorded]
        return sorted(kept, key=lambda epoch: (recorded[epoch], epoch), reverse=True)

    def _read_whole(self, epoch: int) -> dict | str:
        """Epoch `epoch`'s meta when every part of its checkpoint reads, as saved (no model is
        needed to read it), else what failed. Read once per store."""
        if epoch not in self._read:
            self._read[epoch] = self._try_reading(epoch)
        return self._read[epoch]

    def _try_reading(self, epoch: int) -> dict | str:
        part = "meta"
        try:
            meta = self.run_meta(epoch)
            missing = {"epoch", "data_seed", "config", "history"} - set(meta)
            if missing:
                raise ValueError(f"it records no {', '.join(sorted(missing))}")
            for part in ("trainable", "optimizer"):
                saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(epoch) / part)
                # Host arrays of the saved shapes: read on any device count.
                target = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), saved.tree)
                self.manager.restore(
                    epoch, args=ocp.args.Composite(**{part: ocp.args.StandardRestore(target)})
                )
        # Orbax and TensorStore fail to read in many types (ValueError, OSError, KeyError, JSON's,
        # a bare Exception); whichever it is, this checkpoint does not read.
        except Exception as error:
            _hush_abandoned_reads()
            return f"{part}: {_innermost_line(error)}"
        return meta

    def _say_unreadable(self, epoch: int, say: Callable[[str], None], then: str) -> None:
        if epoch not in self._said:
            self._said.add(epoch)
            say(
                f"the epoch-{epoch} checkpoint in {self.directory} cannot be read "
                f"({self._read[epoch]}){then}"
            )

    def _set_aside(self, epoch: int) -> pathlib.Path:
        """Moves epoch `epoch`'s checkpoint to `<workdir>/damaged-checkpoints/<epoch>-<time>/`."""
        damaged = self.directory.parent / DAMAGED_DIR
        damaged.mkdir(exist_ok=True)
        name = f"{epoch}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        target, copies = damaged / name, 1
        while target.exists():
            copies += 1
            target = damaged / f"{name}-{copies}"
        # A rename within the workdir: atomic, and nothing is copied or deleted.
        os.rename(self.directory / str(epoch), target)
        self.manager.reload()
        return target

    def save(
        self,
        epoch: int,
        *,
        trainable: Any,
        optimizer: Any,
        data_seed: int,
        run_config: dict,
        history: list[dict],
    ) -> None:
        """Writes epoch `epoch` (its record must be the last of `history`) and prunes old ones."""
        meta = {"epoch": epoch, "data_seed": data_seed, "config": run_config, "history": history}
        self.manager.save(
            epoch,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardSave(to_saved(trainable)),
                optimizer=ocp.args.StandardSave(to_saved(optimizer)),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics={BEST_METRIC: history[-1][BEST_METRIC]} if self.keep_best else None,
        )
        self.manager.wait_until_finished()

    def run_meta(self, epoch: int) -> dict:
        return self.manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore(
        self, epoch: int, *, trainable: Any | None = None, optimizer: Any | None = None
    ) -> Restored:
        """Reads epoch `epoch` into trees shaped like `trainable` and `optimizer` (those given)."""
        items = {"meta": ocp.args.JsonRestore()}
        targets = {"trainable": trainable, "optimizer": optimizer}
        for name, target in targets.items():
            if target is not None:
                items[name] = ocp.args.StandardRestore(saved_target(target))
        try:
            restored = self.manager.restore(epoch, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError) as error:
            raise CheckpointMismatchError(
                f"the epoch-{epoch} checkpoint in {self.directory} does not fit this model "
                f"({str(error).splitlines()[0]}); choose another --workdir"
            ) from None
        meta = restored["meta"]
        read = {
            name: into_state(target, restored[name]) if target is not None else None
            for name, target in targets.items()
        }
        return Restored(
            epoch=meta["epoch"],
            data_seed=meta["data_seed"],
            run_config=meta["config"],
            history=meta["history"],
            **read,
        )

    def close(self) -> None:
        self.manager.close()


def _innermost_line(error: BaseException) -> str:
    """The first line of the innermost cause of `error`, without TensorStore's spec (a JSON
    object of hundreds of characters)."""
    while error.__cause__ is not None or (
        error.__context__ is not None and not error.__suppress_context__
    ):
        error = error.__cause__ or error.__context__
    line = (str(error).splitlines() or [type(error).__name__])[0]
    return line.split(" [tensorstore_spec=")[0]


def _hush_abandoned_reads() -> None:
    """Keeps the aftermath of a failed read off the user's screen.

    When one array of a checkpoint fails to read, Orbax closes its event loop while TensorStore's
    other reads are still in flight; as they finish, and as Python finalizes Orbax's coroutines
    that never resumed, each is printed as an "Exception ignored" traceback ("Event loop is
    closed"), up to the interpreter's exit. They say nothing beyond the line that reported the
    checkpoint. Every other unraisable exception still reaches the previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "hushes_abandoned_reads", False):
        return

    def hook(unraisable):
        error, culprit = unraisable.exc_value, unraisable.object
        loop_closed = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        orbax_coroutine = "orbax" in getattr(getattr(culprit, "cr_code", None), "co_filename", "")
        if not (loop_closed or orbax_coroutine):
            previous(unraisable)

    hook.hushes_abandoned_reads = True
    sys.unraisablehook = hook
