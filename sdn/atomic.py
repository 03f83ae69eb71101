"""Atomic writes: a file is written whole under a temporary name beside it, flushed to disk and
renamed over the final name, so a reader (or DVC, or git) sees the old file or the new one and
never half of one. A failure or a kill while writing leaves the previous file untouched; a
failure also removes the temporary file (a kill leaves it, hidden, and the next write of the same
file replaces it).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def temp_name(path: Path) -> Path:
    """Where `path` is written before it is renamed: hidden, in the same folder (a rename within
    one file system is atomic), and ending in `.tmp`."""
    return path.with_name(f".{path.name}.tmp")


def atomic_write(
    path: Path | str,
    write: Callable[[Path], None],
    explain: Callable[[Exception, Path], BaseException | None] | None = None,
) -> Path:
    """Call `write(tmp)` to write the file, then fsync it and rename it to `path`.

    On any failure (including KeyboardInterrupt) the temporary file is removed and the old `path`
    is left as it was. `explain(error, tmp)`, called before the temporary file goes (so it can
    look at what was written), may return a clearer error to raise instead."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        clearer = explain(error, tmp) if explain is not None and isinstance(error, Exception) else None
        tmp.unlink(missing_ok=True)
        if clearer is not None:
            raise clearer from error
        raise
    return path


def write_text_atomic(text: str, path: Path | str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(data: Any, path: Path | str, sort_keys: bool = True) -> Path:
    """`data` as indented JSON with a final newline."""
    return write_text_atomic(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", path)


def write_csv_atomic(
    rows: Sequence[dict[str, Any]], path: Path | str, columns: Sequence[str] | None = None
) -> Path:
    """`rows` as a CSV table with a header (columns: `columns`, else those of the rows), no index."""
    import pandas as pd  # only the writers of tables pay for importing pandas

    table = pd.DataFrame(list(rows), columns=list(columns) if columns else None)
    return atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))


# --------------------------------------------------------------------------------------------
# Folders: built whole under a temporary name, then swapped in


def temp_dir(final: Path) -> Path:
    """A new hidden folder beside `final` to build it in. First undoes what a killed run left
    (see `recover_dir`). Unlike `tempfile.mkdtemp` it keeps the umask's permissions, which the
    folder keeps once it is swapped in."""
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    path = final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    path.mkdir()
    return path


def replace_dir(built: Path, final: Path) -> None:
    """Swap the complete folder `built` in as `final`: the old `final` is renamed away, `built`
    renamed in, then the old one deleted. Only between the two renames is there no `final`, and
    `recover_dir` puts the old one back if a kill lands there."""
    old = _old_dir(final)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(built, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """Undo what a killed run left beside `final`: its half-built folders, or the old `final`
    renamed away by a swap cut short."""
    for partial in final.parent.glob(f".{final.name}.*.tmp"):
        shutil.rmtree(partial, ignore_errors=True)
    old = _old_dir(final)
    if old.exists() and not final.exists():
        os.replace(old, final)


def _old_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")
