"""Progress on a terminal (bytes, rate, ETA), silence in logs and CI.

tqdm already does the rate/ETA arithmetic and the TTY detection (`disable=None` turns it off when stderr is
not a terminal), so this is a thin wrapper with the one policy we add: `-q` always silences it.
"""

from __future__ import annotations

from tqdm import tqdm


class Progress:
    """Bytes written (with rate and ETA) plus parameters done, for `ranks` destination ranks."""

    def __init__(self, total_bytes: int, *, enabled: bool, params: int = 0, ranks: int = 0) -> None:
        self._params, self._done = params, 0
        self._bar = tqdm(
            total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"{ranks} rank(s)" if ranks else "writing", disable=None if enabled else True, leave=False,
            dynamic_ncols=True,
        )  # fmt: skip

    def update(self, nbytes: int, param: str | None = None) -> None:
        """Count written bytes; a `param` name marks that parameter done."""
        if param is not None:
            self._done += 1
            self._bar.set_postfix_str(f"params {self._done}/{self._params}", refresh=False)
        self._bar.update(nbytes)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()
