"""Atomic output folders: write everything into a temporary sibling, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_output(out: str | os.PathLike, *, overwrite: bool = False, protect: tuple[str, ...] = ()) -> Path:
    """Refuse an output folder that exists (unless ``overwrite``) or that is one of ``protect``."""
    out = Path(out).expanduser()
    for source in protect:
        if source and out.resolve() == Path(source).expanduser().resolve():
            raise ValueError(f"output folder {out} is the source model's folder; choose another --out")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {out} already exists; choose another one or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another output path")
    return out


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, *, overwrite: bool = False, protect: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out``, on failure it is removed.

    Example::

        with atomic_output("out/model") as tmp:
            model.save_pretrained(tmp)
    """
    out = check_output(out, overwrite=overwrite, protect=protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output folder should not be
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
