"""The file formats the synthetic generators write, exactly as the real data sets have them (docs/datasets.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import h5py
import numpy as np


def write_h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    """Exactly two datasets, no attributes, gzip with h5py's automatic chunks: what the real files contain."""
    with h5py.File(path, "w") as f:
        # h5py's default gzip level is 4, the level the real files have.
        f.create_dataset("image", data=image, compression="gzip")
        f.create_dataset("label", data=label, compression="gzip")


def write_list(path: Path, names: Sequence[str], crlf: bool = False) -> None:
    """One name per line, no extension, every line terminated (as the real lists are)."""
    newline = "\r\n" if crlf else "\n"
    # Bytes, not text mode, so no platform ever translates the line endings.
    path.write_bytes("".join(name + newline for name in names).encode("ascii"))
