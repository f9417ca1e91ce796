"""Draws a run's training curves (the Keras tutorial's accuracy plot, plus loss) from its history.json.

    python scripts/plot.py WORKDIR_OR_HISTORY_JSON [-o PNG]

Writes curves.png next to the history unless -o says where. `mnist-flax train` draws the same figure
with the same code (`mnist_flax.plotting.plot_history`) at the end of every run.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from mnist_flax import plotting


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("history", help="a workdir of `mnist-flax train`, or its history.json")
    parser.add_argument(
        "-o", "--output", help="PNG to write (default: curves.png beside the history)"
    )
    args = parser.parse_args(argv)
    source = pathlib.Path(args.history)
    output = (
        pathlib.Path(args.output)
        if args.output
        else ((source if source.is_dir() else source.parent) / "curves.png")
    )
    try:
        written = plotting.plot_history(plotting.load_history(source), output)
    except plotting.HistoryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
