"""Atomic output folders: write everything into a temporary sibling, then rename."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hubprune.record import RECORD_FILE

logger = logging.getLogger(__name__)


def check_output(out: str | os.PathLike, *, overwrite: bool = False, protect: tuple[str, ...] = ()) -> Path:
    """Refuse an output folder that exists (unless ``overwrite``), that is, lies inside or contains one of
    ``protect`` (the source), or that ``overwrite`` would replace although hubprune did not write it."""
    out = Path(out).expanduser()
    target = out.resolve()
    for source in protect:
        if not source:
            continue
        folder = Path(source).expanduser().resolve()
        if target == folder:
            raise ValueError(f"output folder {out} is the source model's folder; choose another output folder")
        if folder in target.parents:
            raise ValueError(
                f"output folder {out} lies inside the source model's folder {source}; "
                "choose an output folder outside it"
            )
        if target in folder.parents:
            raise ValueError(
                f"output folder {out} contains the source model's folder {source}, which replacing "
                "it would delete; choose another output folder"
            )
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"output folder {out} already exists; choose another one or pass overwrite=True (--overwrite)"
        )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another output path")
    if out.exists() and not _written_by_hubprune(out):
        raise FileExistsError(
            f"{out} was not written by hubprune (it has files but no {RECORD_FILE}), and "
            "--overwrite only replaces hubprune's own outputs; choose another --out, or move "
            "that folder away yourself"
        )
    return out


def _written_by_hubprune(folder: Path) -> bool:
    return (folder / RECORD_FILE).is_file() or not any(folder.iterdir())


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` that a killed hubprune process left (``.NAME.tmp-PID-*``,
    ``.NAME.old-PID-*`` whose process is gone). Returns what was removed."""
    import psutil

    removed = []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)-")
    for path in out.parent.glob(f".{out.name}.*-*") if out.parent.is_dir() else ():
        match = pattern.match(path.name)
        if match and path.is_dir() and not psutil.pid_exists(int(match.group(2))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        logger.info("removed %d temporary folder(s) a stopped hubprune run left beside %s", len(removed), out)
    return removed


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, *, overwrite: bool = False, protect: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out``, on failure it is removed.

    Example::

        with atomic_output("out/model") as tmp:
            model.save_pretrained(tmp)
    """
    out = check_output(out, overwrite=overwrite, protect=protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output folder should not be
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
