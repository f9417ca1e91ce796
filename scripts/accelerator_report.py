"""The accelerator run's bookkeeping (`scripts/accelerator.sh`): each step's status, and the table.

    python scripts/accelerator_report.py status OUT_DIR STEP EXIT_STATUS SECONDS COMMAND
    python scripts/accelerator_report.py table OUT_DIR STEP...

`status` writes OUT_DIR/STEP.status.json: how the step ended ("ok"; "failed" with its exit status;
"timed out"; "skipped" with why, EXIT_STATUS -1 and the reason as COMMAND), how long it took and
the last line of its log (OUT_DIR/STEP.log). `table` reads whatever the STEPs (in the run's order)
left (their status files, the benchmark JSON files bench-*.json, environment.json,
train/history.json) and writes OUT_DIR/table.md, also printed: a step that failed or never ran is
a row saying so, never a missing section. Only the standard library: it runs after any step, even
one that broke the installation.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys

# Exit statuses of `timeout` (coreutils): the limit was reached, and the kill after it.
TIMED_OUT = (124, 137)


def last_line(log: pathlib.Path) -> str:
    if not log.exists():
        return ""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    return next((line for line in reversed(lines) if line), "")


def write_status(out: pathlib.Path, step: str, exit_status: int, seconds: float, command: str):
    if exit_status == -1:
        status = "skipped"
    elif exit_status == 0:
        status = "ok"
    elif exit_status in TIMED_OUT:
        status = "timed out"
    else:
        status = "failed"
    record = {
        "step": step,
        "status": status,
        "exit_status": exit_status,
        "seconds": round(seconds, 1),
        "command": command,
        "last_line": last_line(out / f"{step}.log"),
    }
    (out / f"{step}.status.json").write_text(json.dumps(record, indent=2) + "\n")


def read_json(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def number(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def figure(row: dict, measurement: str, key: str = "images_per_second") -> float | None:
    return row.get(measurement, {}).get(key)


def step_rows(out: pathlib.Path, steps: list[str]) -> list[str]:
    lines = ["| step | status | seconds | last line of its log |", "| --- | --- | --- | --- |"]
    for step in steps:
        status = read_json(out / f"{step}.status.json") or {"status": "not run"}
        what = status["status"]
        if what in ("failed", "timed out"):
            what += f" (exit {status['exit_status']})"
        detail = status.get("command" if what == "skipped" else "last_line", "")
        detail = detail.replace("|", "/")[:160]
        lines.append(f"| {step} | {what} | {status.get('seconds', '')} | {detail} |")
    return lines


BENCHMARK_HEADER = [
    "| model | batch | dtype | who | conv | resize | train step img/s | step ms, median / p90 "
    "| forward img/s | end to end img/s | pipeline img/s | compile s | ours / Keras, step "
    "| ours / Keras, forward |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]


def benchmark_rows(results: dict) -> list[str]:
    """Ours then Keras, for each batch size and dtype of one benchmark's results."""
    lines = []
    for keras in results["keras"] or [None]:
        ours = [
            row
            for row in results["rows"]
            if keras is None
            or (row["batch_size"], row["dtype"]) == (keras["batch_size"], keras["dtype"])
        ]
        for row in [*ours, *([keras] if keras else [])]:
            who = f"Keras on {row['backend']}" if row is keras else "ours"
            ratios = row.get("ours_over_keras", {})
            step_ms = ""
            if "step" in row:
                step_ms = (
                    f"{number(figure(row, 'step', 'median_seconds') * 1e3)} / "
                    f"{number(figure(row, 'step', 'p90_seconds') * 1e3)}"
                )
            cells = [
                row["model"],
                row["batch_size"],
                row["dtype"],
                who,
                row.get("conv_impl", ""),
                row.get("resize", ""),
                number(figure(row, "step")),
                step_ms,
                number(figure(row, "forward")),
                number(figure(row, "end-to-end")),
                number(figure(row, "pipeline"), 0),
                number(row.get("compile_seconds")),
                number(ratios.get("step"), 2) + ("x" if "step" in ratios else ""),
                number(ratios.get("forward"), 2) + ("x" if "forward" in ratios else ""),
            ]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def device(row: dict) -> str:
    """ "gpu NVIDIA H200", or "cpu" (not "cpu cpu")."""
    if row["device"].lower() == row["platform"]:
        return row["platform"]
    return f"{row['platform']} {row['device']}"


def keras_notes(results: dict) -> list[str]:
    """What each Keras row ran on and whether it computes what ours does."""
    notes = []
    for keras in results["keras"]:
        note = (
            f"- {keras['model']} model, batch {keras['batch_size']}, {keras['dtype']}: Keras "
            f"{keras['keras']} on {keras['backend']} {keras['backend_version']}, "
            f"{device(keras)}; {keras['parameters']['trainable']:,} of "
            f"{keras['parameters']['total']:,} parameters trainable"
        )
        if "output_difference" in keras:
            note += (
                f"; outputs max |ours - Keras| {keras['output_difference']:.1e} (ours "
                f"{keras['compared_with']}, its head copied into Keras)"
            )
        notes.append(note)
    return notes


def train_rows(out: pathlib.Path) -> list[str]:
    history = read_json(out / "train" / "history.json")
    status = read_json(out / "train.status.json") or {}
    if not history or not history.get("epochs"):
        return [f"No history.json: the train step {status.get('status', 'did not run')}."]
    epochs = history["epochs"]
    config = history["config"]
    seconds = [record["seconds"] for record in epochs]
    return [
        "| epochs | batch | image size | final test accuracy | whole process s | epoch 1 s "
        "(caches the features) | later epochs s, median |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {len(epochs)} | {config['batch_size']} | {config['image_size']} | "
        f"{epochs[-1]['test_accuracy']:.2%} | {status.get('seconds', '')} | {seconds[0]:.1f} | "
        f"{number(statistics.median(seconds[1:]) if len(seconds) > 1 else None)} |",
        "",
        f"Splits: {config['train_split']} / {config['test_split']}, weights {config['weights']}, "
        f"data {config['data_dir'] or 'tfds'}.",
    ]


def write_table(out: pathlib.Path, steps: list[str]) -> str:
    environment = read_json(out / "environment.json") or {}
    lines = ["# The accelerator run", ""]
    if environment:
        lines += [
            f"{environment.get('date')}, commit {environment.get('commit')}: "
            f"{environment.get('device_count')} x {device(environment)}, jax {environment.get('jax')}, Keras "
            f"{environment.get('keras')}, TensorFlow {environment.get('tensorflow')}, Python "
            f"{environment.get('python')}, {environment.get('cpu_count')} CPUs"
            + (" (dry run: tiny sizes on the CPU)" if environment.get("dry_run") else ""),
            "",
        ]
        lines += [f"Installed: {item}" for item in environment.get("installed", [])]
        lines += [""] if environment.get("installed") else []
    lines += ["## Steps", "", *step_rows(out, steps), ""]
    lines += ["## Benchmark: ours and Keras on the same device", ""]
    found = [(out / f"{step}.json", read_json(out / f"{step}.json")) for step in steps]
    found = [
        (path, results) for path, results in found if path.stem.startswith("bench-") and results
    ]
    if found:
        lines += BENCHMARK_HEADER
        for _, results in found:
            lines += benchmark_rows(results)
        lines.append("")
        for path, results in found:
            lines += [f"{path.name}: {results['data']}", *keras_notes(results), ""]
    else:
        lines += ["No benchmark finished (see the steps above).", ""]
    lines += ["## The default run on the shared split", "", *train_rows(out), ""]
    text = "\n".join(lines)
    (out / "table.md").write_text(text)
    return text


def main(argv: list[str]) -> None:
    command, out = argv[0], pathlib.Path(argv[1])
    if command == "status":
        step, exit_status, seconds, run = argv[2], int(argv[3]), float(argv[4]), argv[5]
        write_status(out, step, exit_status, seconds, run)
    elif command == "table":
        print(write_table(out, argv[2:]))
    else:
        raise SystemExit(f"usage: {__doc__.splitlines()[2].strip()}")


if __name__ == "__main__":
    main(sys.argv[1:])
