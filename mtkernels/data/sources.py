"""Where the data lives and how MovieLens-100K is fetched (the CLI is ``python -m mtkernels.data.fetch``).

The three atomic files (``ml-100k.inter``, ``.user``, ``.item``) are read out of the PyPI wheel
``recbole==1.2.1`` (path ``recbole/dataset_example/ml-100k/``) with `zipfile`; recbole itself is never
installed or imported. The wheel comes from ``pip download --no-deps`` (PyPI is the one source a fresh
machine can reach), is checked against its sha256, and so is every extracted file
(shared/data/ml-100k/SOURCE.md). Idempotent: files already in place with the right checksums are kept.

Data folder resolution for the loaders: an explicit ``data_dir``, else ``$MTKERNELS_DATA``, else
``./.cache/data`` (what ``make data`` fills).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

RECBOLE_REQUIREMENT = "recbole==1.2.1"
WHEEL_NAME = "recbole-1.2.1-py3-none-any.whl"
WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
MEMBER_DIR = "recbole/dataset_example/ml-100k/"
SUBDIR = "ml-100k"
FILES = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}


def default_data_dir() -> Path:
    """``$MTKERNELS_DATA`` if set, else ``./.cache/data`` (relative to the working directory)."""
    env = os.environ.get("MTKERNELS_DATA")
    return Path(env) if env else Path(".cache") / "data"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ml100k_complete(folder: Path) -> bool:
    """True when ``folder`` holds the three RecBole files with their published checksums."""
    return all((folder / name).is_file() and sha256_of(folder / name) == sha for name, sha in FILES.items())


def download_wheel(cache_dir: Path, quiet: bool = True) -> Path:
    """``pip download --no-deps recbole==1.2.1`` into ``cache_dir`` (reused when already there).

    Raises:
        RuntimeError: pip failed (no network / PyPI unreachable) or the wheel's sha256 is wrong.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = cache_dir / WHEEL_NAME
    if wheel.is_file() and sha256_of(wheel) == WHEEL_SHA256:
        return wheel
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(cache_dir), RECBOLE_REQUIREMENT]
    if quiet:
        command.insert(4, "-q")
    result = subprocess.run(command, capture_output=quiet, text=True)
    if result.returncode != 0:
        detail = (result.stderr or "")[-2000:] if quiet else ""
        raise RuntimeError(f"`{' '.join(command)}` failed (exit {result.returncode}); is PyPI reachable?\n{detail}")
    return check_wheel(wheel)


def check_wheel(wheel: Path) -> Path:
    """Return ``wheel`` if its sha256 is the published one, else raise RuntimeError."""
    if not wheel.is_file():
        raise RuntimeError(f"wheel not found: {wheel}")
    digest = sha256_of(wheel)
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{wheel}: sha256 {digest} differs from the expected {WHEEL_SHA256}")
    return wheel


def extract_ml100k(wheel: Path, folder: Path) -> None:
    """Write the three files from the wheel into ``folder`` (each checked, written atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        for name, expected in FILES.items():
            data = archive.read(MEMBER_DIR + name)
            digest = hashlib.sha256(data).hexdigest()
            if digest != expected:
                raise RuntimeError(f"{name} in {wheel}: sha256 {digest} differs from the expected {expected}")
            # Temporary file + rename: an interrupted fetch never leaves a truncated file behind.
            with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{name}.", delete=False) as handle:
                handle.write(data)
                temporary = handle.name
            os.chmod(temporary, 0o644)  # NamedTemporaryFile creates 0600; data files are shared
            os.replace(temporary, folder / name)


def fetch_ml100k(dest: Optional[Path] = None, wheel: Optional[Path] = None, cache_dir: Optional[Path] = None,
                 quiet: bool = True) -> Path:
    """Make sure ``dest/ml-100k/`` holds the RecBole ML-100K files; return that folder.

    Args:
        dest: data folder (default `default_data_dir`).
        wheel: a local ``recbole-1.2.1-py3-none-any.whl`` to read instead of downloading one.
        cache_dir: where ``pip download`` puts the wheel (default ``dest/downloads``).

    Raises:
        RuntimeError: the download failed or a checksum did not match.
    """
    dest = Path(dest) if dest is not None else default_data_dir()
    folder = dest / SUBDIR
    if ml100k_complete(folder):
        return folder
    source = check_wheel(Path(wheel)) if wheel is not None else download_wheel(Path(cache_dir or dest / "downloads"), quiet)
    extract_ml100k(source, folder)
    return folder
