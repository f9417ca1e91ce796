"""`python -m mnist_flax` is the `mnist-flax` command."""

from mnist_flax.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
