"""``python -m mtkernels.data.fetch --dest DIR``: get MovieLens-100K (RecBole atomic files).

Reads ``ml-100k.inter/.user/.item`` out of the PyPI wheel ``recbole==1.2.1`` (``pip download
--no-deps``, sha256-checked; recbole is never imported) into ``DIR/ml-100k/``. Idempotent. ``--wheel``
reads a local copy of the wheel instead of downloading it. Exit status 0 on success, 1 on failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .sources import SUBDIR, default_data_dir, fetch_ml100k, ml100k_complete


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mtkernels.data.fetch",
        description="Fetch MovieLens-100K (RecBole atomic files from the recbole==1.2.1 wheel on PyPI).",
    )
    parser.add_argument("--dest", type=Path, default=None, help="data folder (default $MTKERNELS_DATA or ./.cache/data)")
    parser.add_argument("--wheel", type=Path, default=None, help="use this local recbole-1.2.1 wheel instead of pip download")
    parser.add_argument("--cache", type=Path, default=None, help="where pip download puts the wheel (default DEST/downloads)")
    args = parser.parse_args(argv)
    dest = args.dest if args.dest is not None else default_data_dir()
    already = ml100k_complete(dest / SUBDIR)
    try:
        folder = fetch_ml100k(dest, wheel=args.wheel, cache_dir=args.cache)
    except RuntimeError as exc:
        print(f"fetch failed: {exc}", file=sys.stderr)
        return 1
    print(f"ml-100k {'already present' if already else 'fetched'} in {folder.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
