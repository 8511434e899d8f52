"""When an automatic conversion may be reused: its markers say it finished AND its files are still all there.

A converter's `<block>.done` marker records the fingerprint of what was converted and every file it wrote with
its size. Before anyone loads the output, each of those files must exist with that size, with the size its own
header implies (a safetensors file: 8 + header length + the end of its data; a MindSpore .ckpt: every record
whole), and with the size the output's manifest (`jaxreshard.manifest.json`, when present) lists. Anything
missing or short means "convert again", never "load it anyway".
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import FormatError
from ..formats.manifest import MANIFEST_NAME
from ..formats.mindspore_ckpt import read_ckpt_index
from ..formats.safetensors_io import read_safetensors_index

log = logging.getLogger(__name__)

MANIFEST = MANIFEST_NAME  # the output's manifest (formats/manifest.py)
MAX_MARKER_BYTES = 64 * 2**20  # a marker lists file names and sizes; anything bigger is not ours


def block_record(fingerprint: str, out: Path, files: Iterable[Path]) -> dict[str, Any]:
    """What a `.done` marker holds: the conversion's fingerprint and each written file's size."""
    return {"fingerprint": fingerprint,
            "files": {str(Path(f).relative_to(out)): Path(f).stat().st_size for f in sorted(files)}}


def _read_json(path: Path) -> Any:
    """A marker or manifest as JSON, or None when it is absent, too big or unreadable."""
    try:
        if path.stat().st_size > MAX_MARKER_BYTES:
            return None
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None


def implied_size(path: Path) -> int | None:
    """The size a rank file's own header says it has (None for formats without one); a corrupt or truncated
    file raises FormatError."""
    if path.suffix == ".safetensors":
        entries, _ = read_safetensors_index(path)
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
        return max((off + n for e in entries for off, n in e.segments), default=8 + header_len)
    if path.suffix == ".ckpt":
        read_ckpt_index(path)  # walks every record header: a record cut short raises
    return None


class Reuse:
    """The markers and output of one automatic conversion, checked before they are trusted."""

    def __init__(self, out: Path, markers: Path, fingerprint: str) -> None:
        self.out, self.markers, self.fingerprint = out, markers, fingerprint
        self._checked: set[str] = set()  # blocks already found complete (files do not grow back once gone)

    def job_fingerprint(self) -> str | None:
        job = _read_json(self.markers / "job.json")
        return job.get("fingerprint") if isinstance(job, dict) else None

    def failure(self, block: str) -> tuple[str, float] | None:
        """The error a converter recorded for this conversion's block, if it failed, and when (the marker's
        mtime: a marker older than the waiting process may be a previous attempt's, about to be cleared)."""
        path = self.markers / f"{block}.failed"
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        record = _read_json(path)
        if not isinstance(record, dict):
            return "(the converter's failure marker is unreadable)", mtime
        if record.get("fingerprint") not in (None, self.fingerprint):
            return None  # a failure of another conversion into the same folder
        return str(record.get("error")), mtime

    def why_not(self, block: str) -> str | None:
        """Why this block's output cannot be loaded as it is (None: it can)."""
        record = _read_json(self.markers / f"{block}.done")
        if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
            return f"no completion marker for {block}"
        if record.get("fingerprint") != self.fingerprint:
            return f"{block} was converted from another checkpoint or layout"
        if record["files"] and not self.out.is_dir():
            return f"the output folder {self.out} is missing"
        manifest = _read_json(self.out / MANIFEST)
        listed = manifest.get("files") if isinstance(manifest, dict) else None
        for name, size in record["files"].items():
            problem = self._file_problem(name, size, listed if isinstance(listed, dict) else {})
            if problem is not None:
                return problem
        return None

    def _file_problem(self, name: str, size: Any, listed: dict) -> str | None:
        path = self.out / name
        try:
            actual = path.stat().st_size
        except OSError:
            return f"{path} is missing"
        if actual != size:
            return f"{path} has {actual} bytes but the conversion wrote {size}"
        entry = listed.get(name)
        if isinstance(entry, dict) and isinstance(entry.get("size"), int) and entry["size"] != actual:
            return f"{path} has {actual} bytes but {self.out / MANIFEST} lists {entry['size']}"
        try:
            implied = implied_size(path)
        except FormatError as e:
            return str(e)
        if implied is not None and implied != actual:
            return f"{path} has {actual} bytes but its header implies {implied}"
        return None

    def block_done(self, block: str) -> bool:
        if block in self._checked:
            return True
        if self.why_not(block) is None:
            self._checked.add(block)
            return True
        return False

    def all_done(self, blocks: Iterable[str]) -> bool:
        return all(self.block_done(b) for b in blocks)
