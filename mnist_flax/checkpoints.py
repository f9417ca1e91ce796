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
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers

CHECKPOINT_DIR = "checkpoints"
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


@dataclasses.dataclass
class Restored:
    """One epoch's checkpoint, read back."""

    epoch: int
    trainable: Any
    optimizer: Any
    data_seed: int
    run_config: dict
    history: list[dict]


def _recorded_run_config(workdir: pathlib.Path) -> tuple[dict, str] | None:
    """The config the workdir's latest checkpoint (or else its history.json) recorded, and where."""
    store = RunCheckpoints(workdir, read_only=True)
    try:
        epoch = store.latest_epoch()
        if epoch is not None:
            return store.run_config(epoch), f"its epoch-{epoch} checkpoint"
    finally:
        store.close()
    history = workdir / HISTORY_FILE
    if history.is_file():
        try:
            return json.loads(history.read_text())["config"], str(history)
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointMismatchError(
                f"{history} is not a history file of this project ({error}); "
                "choose another --workdir"
            ) from None
    return None


def _check_writable(workdir: pathlib.Path) -> None:
    """Raises WorkdirError unless files can be created in `workdir` (or where it would be made)."""
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


def check_workdir(workdir: str | os.PathLike, run_config: dict) -> None:
    """Refuses, without writing anything, a workdir of another run or one that cannot be written."""
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} is a file; choose a directory")
    recorded = _recorded_run_config(workdir) if workdir.is_dir() else None
    if recorded is not None:
        recorded_config, source = recorded
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
    _check_writable(workdir)


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

    def latest_epoch(self) -> int | None:
        return self.manager.latest_step()

    def best_epoch(self, metric: str = BEST_METRIC) -> int | None:
        """The kept epoch with the highest `metric` in the run's history (the latest of equals);
        None when no kept epoch recorded it (a run without a validation split)."""
        latest = self.latest_epoch()
        if latest is None:
            return None
        recorded = {r["epoch"]: r[metric] for r in self.run_meta(latest)["history"] if metric in r}
        kept = [epoch for epoch in self.manager.all_steps() if epoch in recorded]
        return max(kept, key=lambda epoch: (recorded[epoch], epoch)) if kept else None

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

    def run_config(self, epoch: int) -> dict:
        return self.run_meta(epoch)["config"]

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
