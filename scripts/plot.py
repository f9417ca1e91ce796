"""Draws a run's training curves (the Keras tutorial's accuracy plot, plus loss) from its history.json.

    python scripts/plot.py WORKDIR_OR_HISTORY_JSON [-o PNG]

Writes curves.png next to the history unless -o says where. The code is `mnist_flax.plotting.main`,
the same that draws curves.png at the end of every `mnist-flax train`.
"""

from mnist_flax import plotting

if __name__ == "__main__":
    raise SystemExit(plotting.main())
