"""Atomic file writes: a reader sees the old file or the complete new one, never half of one.

Every output this project writes (models, metrics, cards, datalists, ledgers) goes through
:func:`atomic_path`: the content is written to a hidden temporary name in the same folder and
renamed over the target only once it is complete; on error the temporary file is removed and the
target is left as it was. The temporary name ends with the target's own name, so writers that pick
a format from the suffix (``nib.save`` with ``.nii.gz``, ``np.savez`` with ``.npz``) behave the same.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".partial-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, payload: Any, **dump_kwargs: Any) -> Path:
    """Write ``payload`` as indented JSON (a trailing newline) atomically; return the path.

    ``dump_kwargs`` go to :func:`json.dump` (e.g. ``allow_nan=False`` to refuse NaN, ``default=float``).
    """
    path = Path(path)
    dump_kwargs.setdefault("indent", 2)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, **dump_kwargs)
            handle.write("\n")
    return path
