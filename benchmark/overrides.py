"""OVERRIDES as Make passes them: ``$(foreach o,$(OVERRIDES),--set $(o))`` splits the variable at every space, so
``OVERRIDES="method.network_inits=[default, default]"`` arrives as ``--set method.network_inits=[default,`` and
``--set default]``. The pieces of one value are joined again here (a piece continues the previous one while that
has more opening than closing brackets), so a YAML list or mapping may be written with spaces."""
from __future__ import annotations

from typing import Sequence

PAIRS = (("[", "]"), ("{", "}"))


def _open_brackets(text: str) -> bool:
    return any(text.count(opening) > text.count(closing) for opening, closing in PAIRS)


def join_split_overrides(overrides: Sequence[str]) -> list[str]:
    joined: list[str] = []
    for piece in overrides:
        if joined and _open_brackets(joined[-1]):
            joined[-1] = f"{joined[-1]} {piece}"
        else:
            joined.append(piece)
    return joined
