"""`python -m mtkernels.data.fetch`: checksums, idempotence, the pip-download path (simulated)."""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from mtkernels.data import fetch, sources
from mtkernels.data.sources import FILES, MEMBER_DIR, WHEEL_NAME

REPO = Path(__file__).resolve().parents[1]


def real_wheel():
    """The recbole wheel where set-up left it (``make data``), or a path given in $MTKERNELS_RECBOLE_WHEEL."""
    candidates = [os.environ.get("MTKERNELS_RECBOLE_WHEEL"), sources.default_data_dir() / "downloads" / WHEEL_NAME,
                  REPO / ".cache" / "data" / "downloads" / WHEEL_NAME]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def fake_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name in FILES:
            archive.writestr(MEMBER_DIR + name, "not the data\n")
    return path


def test_wrong_wheel_is_rejected(tmp_path):
    wheel = fake_wheel(tmp_path / WHEEL_NAME)
    with pytest.raises(RuntimeError, match="sha256"):
        sources.fetch_ml100k(tmp_path / "data", wheel=wheel)
    assert fetch.main(["--dest", str(tmp_path / "data"), "--wheel", str(wheel)]) == 1
    assert not (tmp_path / "data" / "ml-100k" / "ml-100k.inter").exists()


def test_pip_download_path(tmp_path, monkeypatch):
    """Without --wheel, fetch runs `pip download --no-deps recbole==1.2.1` and checks what it got."""
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        destination = Path(command[command.index("-d") + 1])
        fake_wheel(destination / WHEEL_NAME)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(sources.subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match="sha256"):
        sources.fetch_ml100k(tmp_path / "data")
    assert calls and calls[0][1:4] == ["-m", "pip", "download"] and "--no-deps" in calls[0]
    assert "recbole==1.2.1" in calls[0] and str(tmp_path / "data" / "downloads") in calls[0]

    def failing_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: could not connect")

    monkeypatch.setattr(sources.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="PyPI"):
        sources.download_wheel(tmp_path / "other")


def fetched_folder():
    for base in (sources.default_data_dir(), REPO / ".cache" / "data"):
        if sources.ml100k_complete(base / "ml-100k"):
            return base / "ml-100k"
    return None


def test_fetch_from_wheel_is_idempotent(tmp_path, capsys, monkeypatch):
    wheel = real_wheel()
    if wheel is None:
        # No wheel kept here (the data was fetched earlier): a zip of the fetched files stands in
        # for it, its own sha256 standing in for the published one.
        folder = fetched_folder()
        if folder is None:
            pytest.skip("neither the recbole wheel nor the ml-100k files are here (make data fetches them)")
        wheel = tmp_path / WHEEL_NAME
        with zipfile.ZipFile(wheel, "w") as archive:
            for name in FILES:
                archive.write(folder / name, MEMBER_DIR + name)
        monkeypatch.setattr(sources, "WHEEL_SHA256", sources.sha256_of(wheel))
    dest = tmp_path / "data"
    assert fetch.main(["--dest", str(dest), "--wheel", str(wheel)]) == 0
    assert "fetched" in capsys.readouterr().out
    assert sources.ml100k_complete(dest / "ml-100k")
    stamp = (dest / "ml-100k" / "ml-100k.inter").stat().st_mtime_ns
    assert fetch.main(["--dest", str(dest)]) == 0  # no wheel needed: the files are there
    assert "already present" in capsys.readouterr().out
    assert (dest / "ml-100k" / "ml-100k.inter").stat().st_mtime_ns == stamp
    # A damaged file is replaced.
    (dest / "ml-100k" / "ml-100k.user").write_text("damaged")
    assert fetch.main(["--dest", str(dest), "--wheel", str(wheel)]) == 0
    assert sources.ml100k_complete(dest / "ml-100k")
