"""Runs the notebook top to bottom in a fresh kernel and writes it back with its outputs.

This is how the committed outputs are made, and what tests/test_notebook.py runs in smoke mode:

    pip wheel --no-deps . -w dist          # the install cell finds the project's wheel there
    python notebooks/execute.py --size small \\
      --weights ../shared/weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5 \\
      --data-dir ../shared/data/mnist --upload-dir dist

`--size` is the notebook's SIZE ("small": real weights and digits at the sizes the settings cell
states; "smoke": the tests' tiny run). MNIST and the weights come from `--data-dir` and
`--weights` (a Colab user's run downloads them). The install cell only shows its pip commands unless
`--install` (then it installs: run this in the virtualenv to install into). The runs are written
under `--cwd` (a fresh temporary directory by default), and each code cell's metadata records the
SHA-256 of the source that made its outputs (`"mnist_flax": {"source_sha256": ...}`), which the
tests compare with the committed sources.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import pathlib
import tempfile
from collections.abc import Iterator

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).with_name("mnist_transfer_learning.ipynb")
METADATA_KEY = "mnist_flax"


def source_hash(source: str) -> str:
    """What a code cell's metadata records of the source that made its outputs."""
    return hashlib.sha256(source.encode()).hexdigest()


@contextlib.contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """`variables` set in this process's environment (the kernel inherits it), then restored."""
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def execute(
    notebook: nbformat.NotebookNode,
    *,
    size: str,
    cwd: str | os.PathLike,
    data_dir: str | os.PathLike,
    weights: str | os.PathLike,
    upload_dir: str | os.PathLike,
    install: bool = False,
    timeout: int = 1800,
) -> nbformat.NotebookNode:
    """Executes every cell of `notebook` in order (in place) and records each code cell's hash.

    The kernel runs in `cwd`, where `data_dir`, `weights` and `upload_dir` are linked under short
    names and its caches are kept, so that no output names a path of the machine that made it.
    Progress bars are for a person watching; in saved outputs they would be fragments.
    """
    cwd = pathlib.Path(cwd)
    links = {"mnist": data_dir, pathlib.Path(weights).name: weights, "upload": upload_dir}
    for name, target in links.items():
        (cwd / name).symlink_to(pathlib.Path(target).absolute())
    variables = {
        "MNIST_FLAX_NOTEBOOK_SIZE": size,
        "MNIST_FLAX_DATA_DIR": "mnist",
        "MNIST_FLAX_WEIGHTS": pathlib.Path(weights).name,
        "MNIST_FLAX_UPLOAD_DIR": "upload",
        "MNIST_FLAX_NOTEBOOK_DRY_INSTALL": "0" if install else "1",
        "XDG_CACHE_HOME": "cache",  # the kernel's, relative to `cwd`
        "MNIST_FLAX_NOTEBOOK_QUIET": "1",
    }
    with environment(variables):
        client = NotebookClient(
            notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": cwd}}
        )
        client.execute()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.metadata[METADATA_KEY] = {"source_sha256": source_hash(cell.source)}
    return notebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("small", "smoke"), default="small")
    parser.add_argument("--weights", required=True, help="the ImageNet MobileNetV2 .h5 file")
    parser.add_argument("--data-dir", required=True, help="MNIST IDX files")
    parser.add_argument("--upload-dir", default="dist", help="where the project's wheel is")
    parser.add_argument("--cwd", help="where the notebook's runs go (default: a temporary dir)")
    parser.add_argument("--install", action="store_true", help="let the install cell install")
    parser.add_argument("--out", type=pathlib.Path, default=NOTEBOOK, help="the notebook written")
    args = parser.parse_args()
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with contextlib.ExitStack() as stack:
        cwd = args.cwd or stack.enter_context(tempfile.TemporaryDirectory(prefix="notebook-"))
        execute(
            notebook,
            size=args.size,
            cwd=cwd,
            data_dir=args.data_dir,
            weights=args.weights,
            upload_dir=args.upload_dir,
            install=args.install,
        )
    nbformat.write(notebook, args.out)
    print(f"wrote {args.out}: {len(notebook.cells)} cells executed in {args.size} mode")


if __name__ == "__main__":
    main()
