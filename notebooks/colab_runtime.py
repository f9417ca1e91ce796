"""Rebuilds a Colab runtime's starting point here and puts the notebook's install cell through it.

    PYENV_VERSION=3.13.0 python notebooks/colab_runtime.py cpu --smoke   # also: gpu --dry-run, tpu

For `cpu`, `gpu` or `tpu` it makes a Python 3.13 virtualenv with the versions that Colab's package
list for that runtime (`../shared/colab/pip-freeze*.txt`) names for the packages that matter to the
install: the project's dependencies, Colab's packages that depend on them or bound their versions
(TensorFlow's add-ons, numba's numpy bound, grpcio-status's and ydf's protobuf bounds, chex,
grain), JAX's accelerator build (libtpu, jax-cuda12-plugin with its CUDA wheels) and what runs a
notebook (ipykernel, nbclient, pytest). That
environment is built once (`--base`) and copied (hard links) for each run. Then it runs the
notebook's cell tagged "install" in it, as Colab would, with the project's wheel in an upload folder
(`MNIST_FLAX_UPLOAD_DIR`), and reports what changed: distributions added, removed, upgraded and
downgraded, `pip check`'s complaints before and after, the seconds the cell took, and whether a
running kernel would have to restart. `--dry-run` (for the GPU runtime, whose CUDA wheels are
large) asks pip for `install --dry-run --report` of the cell's commands instead of running them.
`--smoke` then runs the notebook in smoke mode in the installed environment
(tests/test_notebook.py). `--project` and `--notebook` take another checkout's source and cell
(the "before" rows of docs/install.md).

Restart: Colab offers a restart when pip replaces a distribution one of whose modules the kernel has
imported (google.colab's `_pip.print_previous_import_warning`). A fresh Colab kernel has imported
what google.colab's own modules import at start (`COLAB_KERNEL_IMPORTS`); the install cell imports
the standard library only. So a restart is needed when a changed distribution provides one of those
modules: a kernel would go on with the old numpy in memory while the new JAX needs the new one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
FREEZE = {"cpu": "pip-freeze.txt", "gpu": "pip-freeze.gpu.txt", "tpu": "pip-freeze.tpu.txt"}
# Installed where Colab's list has them, at its versions, with everything they need (constraints).
# grpcio-status and ydf bound protobuf from above (<6, <7).
ROOTS = (
    *("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy", "ml_dtypes"),
    *("tensorflow", "tensorflow-datasets", "keras", "protobuf", "h5py", "importlib_resources"),
    *("matplotlib", "pillow", "tqdm", "tf_keras", "tensorflow-text", "tensorflow-hub", "keras-hub"),
    *("tensorflow-probability", "chex", "grain", "numba", "libtpu", "jax-cuda12-pjrt"),
    *("jax-cuda12-plugin[with-cuda]", "grpcio-status", "ydf", "ipykernel", "nbclient", "nbformat"),
    *("ipywidgets", "pytest"),
)
# What google.colab imports at start (colabtools 3c07d776: google/colab/__init__.py and the modules
# it imports at module level), so what a fresh Colab kernel holds before the first cell.
COLAB_KERNEL_IMPORTS = (
    *("ipykernel", "IPython", "numpy", "PIL", "traitlets", "psutil", "pexpect", "httplib2"),
    "packaging",
)
SMOKE_TEST = "tests/test_notebook.py::test_every_cell_runs_in_smoke_mode"


def shared_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MNIST_FLAX_SHARED", ROOT.parent / "shared"))


def colab_pins(runtime: str) -> dict[str, str]:
    """{canonical name: version} of Colab's list, minus what pip cannot take from an index."""
    pins = {}
    for line in (shared_dir() / "colab" / FREEZE[runtime]).read_text().splitlines():
        found = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line.strip())
        if found:
            pins[canonicalize_name(found.group(1))] = found.group(2)
    return pins


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    print("$", shlex.join(map(str, command)), flush=True)
    return subprocess.run(command, check=True, text=True, **kwargs)


def build_base(runtime: str, base: pathlib.Path, python: str) -> None:
    """The runtime's starting point in `base`, unless the same one is there already."""
    pins = colab_pins(runtime)
    roots = [r for r in ROOTS if canonicalize_name(r.split("[")[0]) in pins]
    stamp = hashlib.sha256(json.dumps([roots, pins, python]).encode()).hexdigest()
    if (base / "colab-base.sha256").is_file() and (base / "colab-base.sha256").read_text() == stamp:
        return
    shutil.rmtree(base, ignore_errors=True)
    run([python, "-m", "venv", base])
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        constraints.write("".join(f"{name}=={version}\n" for name, version in pins.items()))
        constraints.flush()
        pip = [base / "bin" / "python", "-m", "pip"]
        run([*pip, "install", "-q", "-c", constraints.name, *roots])
    (base / "colab-base.sha256").write_text(stamp)


def installed(python: pathlib.Path) -> dict[str, str]:
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format", "json"],
        check=True,
        text=True,
        capture_output=True,
    )
    return {canonicalize_name(d["name"]): d["version"] for d in json.loads(listed.stdout)}


def pip_check(python: pathlib.Path) -> list[str]:
    checked = subprocess.run([python, "-m", "pip", "check"], text=True, capture_output=True)
    return [line for line in checked.stdout.splitlines() if line and "No broken" not in line]


def kernel_modules(python: pathlib.Path) -> list[str]:
    """The top-level modules a fresh Colab kernel holds, as imported in this environment."""
    script = (
        "import importlib, json, sys\n"
        f"for name in {COLAB_KERNEL_IMPORTS!r}:\n"
        "    try: importlib.import_module(name)\n"
        "    except ImportError: pass\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run([python, "-c", script], check=True, text=True, capture_output=True)
    return json.loads(out.stdout)


def module_owners(python: pathlib.Path) -> dict[str, list[str]]:
    """{canonical distribution name: its top-level modules} (what Colab's restart check reads)."""
    script = (
        "import importlib.metadata as m, json\n"
        "print(json.dumps({k: v for k, v in m.packages_distributions().items()}))\n"
    )
    out = subprocess.run([python, "-c", script], check=True, text=True, capture_output=True)
    owners: dict[str, list[str]] = {}
    for module, distributions in json.loads(out.stdout).items():
        for distribution in distributions:
            owners.setdefault(canonicalize_name(distribution), []).append(module)
    return owners


def install_cell(notebook: pathlib.Path, runtime: str) -> str:
    """The source of the cell tagged "install". A cell that detects the runtime from the PCI
    devices (the one before docs/install.md's change) is told the runtime rebuilt instead."""
    cells = json.loads(notebook.read_text())["cells"]
    (cell,) = [c for c in cells if "install" in c.get("metadata", {}).get("tags", [])]
    source = "".join(cell["source"])
    return re.sub(r"^runtime = detect_runtime\(.*$", f"runtime = {runtime!r}", source, flags=re.M)


def changes(before: dict[str, str], after: dict[str, str]) -> dict[str, dict]:
    moved = sorted(name for name in before.keys() & after.keys() if before[name] != after[name])
    up = [name for name in moved if Version(after[name]) > Version(before[name])]
    return {
        "added": {name: after[name] for name in sorted(after.keys() - before.keys())},
        "removed": {name: before[name] for name in sorted(before.keys() - after.keys())},
        "upgraded": {name: [before[name], after[name]] for name in moved if name in up},
        "downgraded": {name: [before[name], after[name]] for name in moved if name not in up},
    }


def dry_run(python: pathlib.Path, printed: str, workdir: pathlib.Path) -> dict[str, str]:
    """What the cell's pip commands (as it printed them) would leave installed: pip's --report."""
    after = installed(python)
    for line in printed.splitlines():
        if not line.startswith("$ pip "):
            continue
        args = shlex.split(line[len("$ pip ") :].removesuffix("(not run: a dry run)"))
        if args[0] == "uninstall":
            for name in args[1:]:
                if not name.startswith("-"):
                    after.pop(canonicalize_name(name), None)
        else:
            report = workdir / "report.json"
            run([python, "-m", "pip", *args, "--dry-run", "--report", report])
            for item in json.loads(report.read_text())["install"]:
                after[canonicalize_name(item["metadata"]["name"])] = item["metadata"]["version"]
    return after


def default_base(runtime: str) -> pathlib.Path:
    return ROOT / f".venv-colab-{runtime}-base"


def rebuild(args: argparse.Namespace) -> dict:
    """The runtime's starting point (built once), a copy of it, the install cell run in that."""
    base = args.base or default_base(args.runtime)
    build_base(args.runtime, base, args.python)
    # Beside the base (hard links need one file system); .venv* is git-ignored.
    work = pathlib.Path(tempfile.mkdtemp(prefix=f"{base.name}-run-", dir=base.parent))
    try:
        return install_and_report(args, base, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def install_and_report(args: argparse.Namespace, base: pathlib.Path, work: pathlib.Path) -> dict:
    """The install cell run in a copy of `base` made in `work`; what it changed (`main`'s report)."""
    venv = work / "venv"
    # Hard links: pip replaces files, never writes into them, so the base stays as it was.
    run(["cp", "-al", base, venv])
    python = venv / "bin" / "python"
    upload = work / "upload"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", args.project, "-w", upload])
    before, check_before = installed(python), pip_check(python)
    kernel = kernel_modules(python)
    owners_before = module_owners(python)
    cell = work / "install_cell.py"
    cell.write_text(install_cell(args.notebook, args.runtime))
    environment = {**os.environ, "MNIST_FLAX_UPLOAD_DIR": str(upload)}
    if args.dry_run:
        environment["MNIST_FLAX_NOTEBOOK_DRY_INSTALL"] = "1"
    start = time.perf_counter()
    ran = subprocess.run(
        [python, cell], cwd=work, env=environment, text=True, capture_output=True, check=False
    )
    print(ran.stdout + ran.stderr, flush=True)
    if ran.returncode:
        raise SystemExit(f"the install cell failed in the {args.runtime} runtime (above)")
    after = dry_run(python, ran.stdout, work) if args.dry_run else installed(python)
    seconds = time.perf_counter() - start
    changed = changes(before, after)
    owners = {**owners_before, **module_owners(python)}
    replaced = [n for kind in ("removed", "upgraded", "downgraded") for n in changed[kind]]
    restart = sorted({m for n in replaced for m in owners.get(n, []) if m in kernel})
    check_after = [] if args.dry_run else pip_check(python)
    report = {
        "runtime": args.runtime,
        "notebook": str(args.notebook),
        "project": str(args.project),
        "dry_run": args.dry_run,
        "seconds": round(seconds, 1),
        **changed,
        "pip_check_before": check_before,
        "pip_check_after": check_after,
        "new_complaints": [line for line in check_after if line not in check_before],
        "restart_for": restart,
        "cell_output": ran.stdout,
    }
    if args.smoke:
        smoke = subprocess.run(
            [python, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", SMOKE_TEST], cwd=ROOT
        )
        report["smoke"] = "passed" if smoke.returncode == 0 else f"failed ({smoke.returncode})"
    return report


def summary(report: dict) -> str:
    def versions(kind: str) -> str:
        items = report[kind].items()
        if kind in ("added", "removed"):
            return ", ".join(f"{n} {v}" for n, v in items) or "-"
        return ", ".join(f"{n} {a} -> {b}" for n, (a, b) in items) or "-"

    lines = [f"{report['runtime']} runtime{' (pip --dry-run)' if report['dry_run'] else ''}:"]
    for kind in ("added", "removed", "upgraded", "downgraded"):
        lines.append(f"  {kind}: {versions(kind)}")
    lines.append(f"  pip check before: {report['pip_check_before'] or 'nothing'}")
    if not report["dry_run"]:
        lines.append(f"  pip check after, new: {report['new_complaints'] or 'nothing'}")
    lines.append(f"  seconds: {report['seconds']}")
    restart = ", ".join(report["restart_for"])
    lines.append(f"  restart: {'yes, for ' + restart if restart else 'no'}")
    if "smoke" in report:
        lines.append(f"  notebook in smoke mode: {report['smoke']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runtime", choices=sorted(FREEZE))
    parser.add_argument("--python", default="python3.13", help="the Python to rebuild with")
    parser.add_argument("--base", type=pathlib.Path, help="the starting point's virtualenv")
    parser.add_argument(
        "--base-only", action="store_true", help="build the starting point, then stop (CI)"
    )
    parser.add_argument("--project", type=pathlib.Path, default=ROOT, help="the source to install")
    parser.add_argument("--notebook", type=pathlib.Path, help="whose install cell to run")
    parser.add_argument("--dry-run", action="store_true", help="pip --dry-run --report only")
    parser.add_argument("--smoke", action="store_true", help="then the notebook in smoke mode")
    parser.add_argument("--json", type=pathlib.Path, help="write the report here too")
    parser.add_argument("--keep", action="store_true", help="keep the installed environment")
    parser.add_argument(
        "--check", action="store_true", help="fail on new pip check complaints or a restart"
    )
    args = parser.parse_args()
    args.notebook = args.notebook or args.project / "notebooks" / "mnist_transfer_learning.ipynb"
    if not (shared_dir() / "colab" / FREEZE[args.runtime]).is_file():
        raise SystemExit(
            f"no Colab package list at {shared_dir() / 'colab'}: set MNIST_FLAX_SHARED"
        )
    if args.base_only:
        build_base(args.runtime, args.base or default_base(args.runtime), args.python)
        return
    report = rebuild(args)
    print(summary(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    failed = report.get("smoke", "passed") != "passed"
    if args.check and (report["new_complaints"] or report["restart_for"]):
        failed = True
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
