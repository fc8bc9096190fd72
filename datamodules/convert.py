"""Converters from the raw public downloads to the canonical forms the suite trains on."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Converter:
    function: Callable[..., Path]
    dataset: str  # the dataset name whose layout the output has (for `data verify`)
    help: str

    def run(self, source, target, seed: int = 0) -> Path:
        return self.function(Path(source), Path(target), seed=seed)


CONVERTERS: dict[str, Converter] = {}
