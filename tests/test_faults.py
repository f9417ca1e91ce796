"""Faults a run meets, each done to a tiny run: two runs on one workdir, damaged checkpoints, a
damaged history.json or cached-features file, SIGKILL while a checkpoint or the features are written.

Each asserts the exact lines the user sees, the exit status, that no traceback reaches the user and
the outcome: a resumed or rerun run's history equals the straight run's, and what was written before
the fault is still there. Where a real process must die, it is a real `mnist-flax` process
(`Prepared`), started at the module's start so that its imports overlap the straight run; it pauses
at the point of the fault until the test kills it with SIGKILL.
"""

import gc
import hashlib
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import pytest

from mnist_flax import cli, workdir_lock

# A `mnist-flax` process for the test to act on: it imports everything, waits for the test's
# go-ahead, and where told pauses at one point (writing its pid to a file to say so) until killed:
# "checkpoint-commit": epoch 2's checkpoint is written into Orbax's temporary directory, not yet
# renamed into place; "feature-write": the first cached-features file is half written.
DRIVER = r"""
import os, pathlib, sys, time
go, paused, pause_at, *argv = sys.argv[1:]
from mnist_flax import cli, train

def pause():
    pathlib.Path(paused).write_text(str(os.getpid()))
    time.sleep(600)

if pause_at == "checkpoint-commit":
    from orbax.checkpoint._src.path import atomicity
    commit = atomicity.on_commit_callback
    async def paused_commit(tmp_dir, **kwargs):
        if tmp_dir.get_final().name == "2":
            pause()
        return await commit(tmp_dir, **kwargs)
    atomicity.on_commit_callback = paused_commit
elif pause_at == "feature-write":
    import numpy as np
    savez = np.savez
    def half_written(file, **arrays):
        savez(file, **arrays)
        file.truncate(file.tell() // 2)
        file.flush()
        pause()
    np.savez = half_written

while not os.path.exists(go):
    time.sleep(0.02)
sys.argv = ["mnist-flax", *argv]
sys.exit(cli.main())
"""


class Prepared:
    """A `DRIVER` process running `mnist-flax ARGV`, waiting for `go`."""

    def __init__(self, directory: pathlib.Path, name: str, argv: list[str], pause_at: str = ""):
        self.go_file, self.paused_file = directory / f"{name}.go", directory / f"{name}.paused"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                DRIVER,
                *map(str, (self.go_file, self.paused_file)),
                pause_at,
                *argv,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def go(self) -> None:
        self.go_file.touch()

    def wait_until_paused(self) -> None:
        deadline = time.monotonic() + 300
        while not self.paused_file.exists():
            assert self.process.poll() is None, self.process.communicate()
            assert time.monotonic() < deadline, "the run never reached its pause"
            time.sleep(0.05)

    def kill(self) -> tuple[str, str]:
        self.process.kill()  # SIGKILL
        out, err = self.process.communicate(timeout=60)
        assert self.process.returncode == -9
        return out, err


def flags(idx_dir, workdir, features) -> list[str]:
    """A tiny `mnist-flax train` run: 3 epochs of 5 steps on the block digits, on cached features."""
    return [
        "train",
        *("--data-dir", str(idx_dir), "--image-size", "32", "--alpha", "0.35"),
        *("--weights", "none", "--batch-size", "8", "--epochs", "3", "--quiet"),
        *("--feature-cache", str(features), "--workdir", str(workdir)),
        # The session's compiled steps (conftest.py), for the processes this module starts too.
        *("--compilation-cache", jax.config.jax_compilation_cache_dir),
    ]


@pytest.fixture(scope="module")
def runs(idx_dir, tmp_path_factory) -> dict:
    """The straight run (in this process), and the prepared processes the tests act on."""
    root = tmp_path_factory.mktemp("faults")
    features = root / "features"
    prepared = {
        "checkpoint": Prepared(
            root,
            "checkpoint",
            flags(idx_dir, root / "killed-in-checkpoint", features),
            "checkpoint-commit",
        ),
        "caching": Prepared(
            root,
            "caching",
            flags(idx_dir, root / "killed-in-caching", root / "fresh-features"),
            "feature-write",
        ),
    }
    try:
        straight = root / "straight"
        assert cli.main(flags(idx_dir, straight, features)) == 0
        # They run (to their pauses) while the tests before theirs run in this process.
        for run in prepared.values():
            run.go()
        yield {
            "root": root,
            "features": features,
            "straight": straight,
            "history": json.loads((straight / "history.json").read_text()),
            **prepared,
        }
    finally:
        for run in prepared.values():
            run.process.kill()
            run.process.communicate()


def epochs(workdir: pathlib.Path) -> list[dict]:
    """history.json's records without their seconds."""
    records = json.loads((workdir / "history.json").read_text())["epochs"]
    return [{key: value for key, value in r.items() if key != "seconds"} for r in records]


def snapshot(directory: pathlib.Path) -> dict[str, str]:
    """Every file under `directory`: a hash of its bytes and its modification time."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        + f"@{path.stat().st_mtime_ns}"
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def lines(text: str) -> list[str]:
    return text.splitlines()


def no_traceback(*outputs: str) -> bool:
    return not any("Traceback" in text or "Exception ignored" in text for text in outputs)


def copy_of(runs, name: str) -> pathlib.Path:
    workdir = runs["root"] / name
    shutil.copytree(runs["straight"], workdir)
    return workdir


def largest_file(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def unreadable_line(workdir, epoch, what) -> str:
    return rf"the epoch-{epoch} checkpoint in {re.escape(str(workdir / 'checkpoints'))} cannot be read \({what}\)"


def moved_to(workdir, epoch) -> str:
    return (
        rf"; moved it to {re.escape(str(workdir / 'damaged-checkpoints'))}/{epoch}-\d{{8}}-\d{{6}}"
    )


@pytest.mark.parametrize(
    ("damage", "resumed_from"),
    [
        ("the newest emptied", 2),
        ("the newest cut short, an older one missing a file", 1),
        ("the newest's meta cut short", 2),
    ],
)
def test_damaged_checkpoints_are_set_aside_and_the_run_resumes_from_the_newest_that_reads(
    runs, idx_dir, damage, resumed_from, capsys
):
    """The same command on the finished run: each checkpoint that does not read is said in one
    line and moved to damaged-checkpoints/, the run trains again from the newest that reads to the
    straight run's history, and what read is left as it was."""
    workdir = copy_of(runs, re.sub(r"\W+", "-", damage))
    checkpoints = workdir / "checkpoints"
    recorded = json.loads((workdir / "history.json").read_text())["epochs"]
    kernel = largest_file(checkpoints / "3" / "trainable")  # head.kernel's bytes
    size = kernel.stat().st_size
    if damage == "the newest emptied":
        kernel.write_bytes(b"")
        failed = {
            3: rf'trainable: OUT_OF_RANGE: Error reading "head\.kernel/0\.0" in OCDBT database at local file "{re.escape(str(checkpoints))}/3/trainable/": Requested byte range \[0, \d+\) is not valid for value of size 0'
        }
    elif damage == "the newest cut short, an older one missing a file":
        kernel.write_bytes(kernel.read_bytes()[: size // 2])
        (checkpoints / "2" / "optimizer" / "manifest.ocdbt").unlink()
        failed = {
            3: rf'trainable: OUT_OF_RANGE: Error reading "head\.kernel/0\.0" .+: Requested byte range \[0, \d+\) is not valid for value of size {size // 2}',
            2: rf'optimizer: NOT_FOUND: Error opening "zarr" driver: Metadata at "opt_state\..+/\.zarray" in OCDBT database at local file "{re.escape(str(checkpoints))}/2/optimizer/" does not exist',
        }
    else:
        meta = checkpoints / "3" / "meta" / "metadata"
        meta.write_text(meta.read_text()[:600])
        failed = {3: r"meta: .+: line 1 column \d+ \(char \d+\)"}
    damaged = {epoch: snapshot(checkpoints / str(epoch)) for epoch in failed}
    kept = {epoch: snapshot(checkpoints / str(epoch)) for epoch in range(1, resumed_from + 1)}
    capsys.readouterr()

    assert cli.main(flags(idx_dir, workdir, runs["features"])) == 0
    out, err = capsys.readouterr()
    said = lines(out)
    for line, (epoch, what) in zip(said, failed.items(), strict=False):
        assert re.fullmatch(unreadable_line(workdir, epoch, what) + moved_to(workdir, epoch), line)
    assert said[len(failed)] == (
        f"resuming from the epoch-{resumed_from} checkpoint in {workdir} "
        f"({resumed_from} of 3 epochs done)"
    )
    assert no_traceback(out, err)
    assert epochs(workdir) == epochs(runs["straight"])
    # Set aside whole, never deleted; the checkpoints that read, and their epochs' records, as
    # they were.
    for epoch, files in damaged.items():
        [moved] = (workdir / "damaged-checkpoints").glob(f"{epoch}-*")
        assert snapshot(moved) == files
    for epoch, files in kept.items():
        assert snapshot(checkpoints / str(epoch)) == files
    history = json.loads((workdir / "history.json").read_text())["epochs"]
    assert history[:resumed_from] == recorded[:resumed_from]


def test_when_no_checkpoint_reads_train_and_evaluate_stop_with_one_line(runs, idx_dir, capsys):
    workdir = copy_of(runs, "none-reads")
    for epoch in (1, 2, 3):
        largest_file(workdir / "checkpoints" / str(epoch) / "trainable").write_bytes(b"")
    before = snapshot(workdir)
    capsys.readouterr()
    checkpoints = workdir / "checkpoints"
    error = (
        f"error: no checkpoint in {checkpoints} can be read (epochs 3, 2, 1, as said above); "
        f"nothing was moved: restore them from a copy, or move {checkpoints} and "
        f"{workdir / 'history.json'} away to train the run again from the start"
    )
    for command in (
        flags(idx_dir, workdir, runs["features"]),
        ["evaluate", "--workdir", str(workdir)],
    ):
        assert cli.main(command) == 2
        out, err = capsys.readouterr()
        for line, epoch in zip(lines(out), (3, 2, 1), strict=True):
            assert re.fullmatch(
                unreadable_line(workdir, epoch, r"trainable: OUT_OF_RANGE: .+"), line
            )
        assert lines(err) == [error]
        assert snapshot(workdir) == before


def test_another_runs_workdir_is_refused_before_a_damaged_checkpoint_is_moved(
    runs, idx_dir, capsys
):
    """The newest checkpoint that reads says whose workdir it is; a refusal moves nothing."""
    workdir = copy_of(runs, "another-run")
    largest_file(workdir / "checkpoints" / "3" / "trainable").write_bytes(b"")
    before = snapshot(workdir)
    capsys.readouterr()
    assert cli.main([*flags(idx_dir, workdir, runs["features"]), "--learning-rate", "0.01"]) == 2
    out, err = capsys.readouterr()
    assert lines(err) == [
        f"error: --workdir {workdir} holds another run (its epoch-2 checkpoint has "
        "learning_rate=0.003 (asked 0.01)); pass the same options to resume it, or choose "
        "another --workdir"
    ]
    assert out == "" and snapshot(workdir) == before


def test_evaluate_passes_over_the_checkpoints_that_do_not_read(runs, monkeypatch, capsys):
    """Two lines, the newest checkpoint that reads measured, nothing moved; and none of Orbax's
    abandoned reads reaches Python's hook for unraisable exceptions (the tracebacks a process
    would print on its way out)."""
    workdir = copy_of(runs, "evaluated")
    checkpoints = workdir / "checkpoints"
    for epoch in (3, 2):
        largest_file(checkpoints / str(epoch) / "trainable").write_bytes(b"")
    before = snapshot(checkpoints)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    capsys.readouterr()

    assert cli.main(["evaluate", "--workdir", str(workdir)]) == 0
    time.sleep(0.5)  # for TensorStore's last reads to finish
    gc.collect()  # and Orbax's unfinished coroutines to be finalized
    out, err = capsys.readouterr()
    said = lines(out)
    passing_over = (
        rf"; passing over it \(training on this workdir again moves it to "
        rf"{re.escape(str(workdir / 'damaged-checkpoints'))}\)"
    )
    for line, epoch in zip(said, (3, 2), strict=False):
        assert re.fullmatch(
            unreadable_line(workdir, epoch, r"trainable: OUT_OF_RANGE: .+") + passing_over, line
        )
    accuracy = runs["history"]["epochs"][0]["test_accuracy"]
    assert said[2] == (
        f"test accuracy {accuracy:.2%} ({round(accuracy * 20)}/20) on mnist test, the newest "
        "checkpoint that reads (the run has no validation split to choose a best by), epoch 1; "
        f"wrote {workdir / 'confusion.png'} and {workdir / 'misclassified.png'}"
    )
    assert len(said) == 3 and no_traceback(out, err)
    assert unraisable == []
    assert snapshot(checkpoints) == before


@pytest.mark.parametrize("damage", ["cut in half", "an epoch short"])
def test_a_damaged_history_json_is_written_again_from_the_checkpoint(runs, idx_dir, damage, capsys):
    """The finished run again: history.json as the newest checkpoint recorded it (an epoch short:
    a run killed between its checkpoint and its history.json)."""
    workdir = copy_of(runs, f"history-{damage.replace(' ', '-')}")
    path = workdir / "history.json"
    text = path.read_text()
    if damage == "cut in half":
        path.write_text(text[: len(text) // 2])
        why = r"does not read \(.+: line \d+ column \d+ \(char \d+\)\)"
    else:
        path.write_text(json.dumps({**json.loads(text), "epochs": json.loads(text)["epochs"][:2]}))
        why = "records 2 epochs"
    capsys.readouterr()
    assert cli.main(flags(idx_dir, workdir, runs["features"])) == 0
    out, err = capsys.readouterr()
    assert (
        lines(out)[0] == f"resuming from the epoch-3 checkpoint in {workdir} (3 of 3 epochs done)"
    )
    assert re.fullmatch(
        rf"{re.escape(str(path))} {why}; wrote it again from the epoch-3 checkpoint", lines(out)[1]
    )
    assert len(lines(out)) == 2 and no_traceback(out, err)
    assert json.loads(path.read_text())["epochs"] == runs["history"]["epochs"]  # seconds too


def test_a_damaged_features_file_is_computed_again(runs, idx_dir, capsys):
    features = runs["root"] / "damaged-features"
    shutil.copytree(runs["features"], features)
    train_file = largest_file(features)  # the 40 training digits' (the test split has 20)
    train_file.write_bytes(train_file.read_bytes()[:1000])
    workdir = runs["root"] / "damaged-features-run"
    capsys.readouterr()
    assert cli.main(flags(idx_dir, workdir, features)) == 0
    out, err = capsys.readouterr()
    assert re.fullmatch(
        r"cached the backbone features of mnist train \(.+\), mnist test \(.+\): 60 x 1280 "
        r"float32, 0 MB \([\d.]+ s for mnist train \(.+\), the rest cached by an earlier run\), "
        rf"kept in {re.escape(str(features))}",
        lines(out)[0],
    )
    assert no_traceback(out, err)
    assert epochs(workdir) == epochs(runs["straight"])
    assert train_file.stat().st_size > 1000  # written again, whole


def lock_of(pid: int, host: str, process_start: str | None) -> str:
    return json.dumps(
        {"pid": pid, "host": host, "started": "2026-01-02 03:04:05", "process_start": process_start}
    )


@pytest.mark.parametrize("holder", ["another host", "no one it names", "a live process"])
def test_a_lock_that_is_not_known_to_be_stale_is_never_taken(runs, idx_dir, holder, capsys):
    """Another host's holder is never judged from here; a lock file that names no one (half
    written) is not guessed at; a live process holds, in `train` and in each seed's workdir of
    `seeds`. Each is one line, status 2, and the workdir as it was."""
    workdir = copy_of(runs, f"locked-by-{holder.replace(' ', '-')}")
    command = flags(idx_dir, workdir, runs["features"])
    lock = workdir / workdir_lock.LOCK_FILE
    sleeper = None
    if holder == "another host":
        lock.write_text(lock_of(1, "elsewhere", None))
        who = "pid 1 on host elsewhere (started 2026-01-02 03:04:05)"
    elif holder == "no one it names":
        lock.write_text("")
        who = "a process it does not name (the file is empty or unreadable)"
    else:
        sleeper = subprocess.Popen(["sleep", "60"])
        # `seeds` trains in <workdir>/seed-<n>.
        command = ["seeds", "--seeds", "0", *command[1:]]
        lock = workdir / "seed-0" / workdir_lock.LOCK_FILE
        lock.parent.mkdir()
        process_start = workdir_lock._process_start(sleeper.pid)
        lock.write_text(lock_of(sleeper.pid, socket.gethostname(), process_start))
        who = f"pid {sleeper.pid} on host {socket.gethostname()} (started 2026-01-02 03:04:05)"
    before = snapshot(workdir)
    capsys.readouterr()
    try:
        assert cli.main(command) == 2
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
    out, err = capsys.readouterr()
    assert lines(err) == [
        f"error: --workdir {lock.parent} is in use by another run: {who} holds {lock}; wait for "
        f"it to end or choose another --workdir (once that run is known to be gone, delete {lock})"
    ]
    assert out == ""
    assert snapshot(workdir) == before


def test_a_lock_whose_pid_now_belongs_to_another_process_is_taken_over(runs, idx_dir, capsys):
    """The pid is alive, but started after the lock was written (Linux's /proc says when): the
    system gave it to a new process, and the holder is gone."""
    if workdir_lock._process_start(os.getpid()) is None:
        pytest.skip("no /proc/<pid>/stat here")
    workdir = copy_of(runs, "pid-reused")
    lock = workdir / workdir_lock.LOCK_FILE
    lock.write_text(lock_of(os.getpid(), socket.gethostname(), "0"))
    capsys.readouterr()
    assert cli.main(flags(idx_dir, workdir, runs["features"])) == 0
    out, err = capsys.readouterr()
    assert lines(out) == [
        f"taking over {lock} from pid {os.getpid()} on host {socket.gethostname()} (started "
        "2026-01-02 03:04:05), which is no longer running",
        f"resuming from the epoch-3 checkpoint in {workdir} (3 of 3 epochs done)",
    ]
    assert not lock.exists() and no_traceback(out, err)


# The prepared processes' tests come last: meanwhile those processes reach their pauses.


def test_two_runs_at_once_and_sigkill_while_a_checkpoint_is_written(runs, idx_dir, capsys):
    """A run paused in epoch 2's checkpoint (written, not yet renamed into place) holds the lock: a
    second run is refused and changes nothing. SIGKILL there, then the same command: the lock is
    taken over and the run resumes from epoch 1 to the straight run's history."""
    run, workdir = runs["checkpoint"], runs["root"] / "killed-in-checkpoint"
    command = flags(idx_dir, workdir, runs["features"])
    run.wait_until_paused()
    lock = workdir / workdir_lock.LOCK_FILE
    holder = json.loads(lock.read_text())
    assert holder["pid"] == run.process.pid and holder["host"] == socket.gethostname()
    before = snapshot(workdir)
    capsys.readouterr()

    assert cli.main(command) == 2
    out, err = capsys.readouterr()
    who = f"pid {run.process.pid} on host {socket.gethostname()} (started {holder['started']})"
    assert lines(err) == [
        f"error: --workdir {workdir} is in use by another run: {who} holds {lock}; wait for it to "
        f"end or choose another --workdir (once that run is known to be gone, delete {lock})"
    ]
    assert out == ""
    assert snapshot(workdir) == before

    killed_out, killed_err = run.kill()
    assert no_traceback(killed_out, killed_err)
    names = sorted(path.name for path in (workdir / "checkpoints").iterdir())
    assert names[0] == "1" and names[1].startswith("2.orbax-checkpoint-tmp"), names
    assert [r["epoch"] for r in epochs(workdir)] == [1]

    assert cli.main(command) == 0
    out, err = capsys.readouterr()
    assert lines(out)[:2] == [
        f"taking over {lock} from {who}, which is no longer running",
        f"resuming from the epoch-1 checkpoint in {workdir} (1 of 3 epochs done)",
    ]
    assert no_traceback(out, err)
    assert epochs(workdir) == epochs(runs["straight"])
    assert sorted(path.name for path in (workdir / "checkpoints").iterdir()) == ["1", "2", "3"]
    assert not lock.exists()


def test_sigkill_while_the_features_are_written_then_the_same_command(runs, idx_dir, capsys):
    """Killed with the first features file half written: the same command computes them again
    (the half-written file is never read) and trains to the straight run's history."""
    run, workdir = runs["caching"], runs["root"] / "killed-in-caching"
    features = runs["root"] / "fresh-features"
    run.wait_until_paused()
    run.kill()
    [half_written] = list(features.iterdir())
    assert half_written.suffix == ".tmp" and half_written.stat().st_size > 0
    capsys.readouterr()

    assert cli.main(flags(idx_dir, workdir, features)) == 0
    out, err = capsys.readouterr()
    lock = workdir / workdir_lock.LOCK_FILE
    assert re.fullmatch(
        rf"taking over {re.escape(str(lock))} from pid {run.process.pid} on host "
        rf"{re.escape(socket.gethostname())} \(started [\d: -]+\), which is no longer running",
        lines(out)[0],
    )
    assert re.fullmatch(
        r"cached the backbone features of mnist train \(.+\), mnist test \(.+\): 60 x 1280 "
        rf"float32, 0 MB \([\d.]+ s\), kept in {re.escape(str(features))}",
        lines(out)[1],
    )
    assert no_traceback(out, err)
    assert epochs(workdir) == epochs(runs["straight"])
    assert len(list(features.glob("*.npz"))) == 2
