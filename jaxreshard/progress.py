"""Progress on a terminal (bytes, rate, ETA), silence in logs and CI.

tqdm already does the rate/ETA arithmetic and the TTY detection (`disable=None` turns it off when stderr is
not a terminal), so this is a thin wrapper with the one policy we add: `-q` always silences it.
"""

from __future__ import annotations

from tqdm import tqdm


class Progress:
    def __init__(self, total_bytes: int, *, enabled: bool, desc: str = "writing") -> None:
        self._bar = tqdm(
            total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
            disable=None if enabled else True, leave=False, dynamic_ncols=True,
        )  # fmt: skip

    def update(self, nbytes: int) -> None:
        self._bar.update(nbytes)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()
