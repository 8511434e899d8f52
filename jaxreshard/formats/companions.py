"""A model folder's non-weight files (config.json, tokenizer files, chat template, README): found in the source
folder and copied, byte for byte, into every conversion's output root.

A Hugging Face folder is only usable with its companions (transformers' `from_pretrained` needs config.json,
a tokenizer needs its files), so they travel through per-rank outputs back to the `--hf` output. Only the top
level of the folder is taken, regular files only (a link is followed only when it stays inside the folder, or
inside the Hugging Face cache's `blobs/` next to `snapshots/`), each size-capped: a source folder is untrusted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

from ..errors import FormatError
from .manifest import MANIFEST_NAME, FileRecord, file_sha256
from .safetensors_io import HF_INDEX
from .untrusted import list_dir, open_regular

MAX_COMPANION_BYTES = 1 << 30  # tokenizer.json of large vocabularies is tens of MB; a GB is no companion
MAX_COMPANIONS = 1000
# weight files of any framework (never copied: they are converted, or belong to another format) and indexes
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".npz", ".npy",
                   ".onnx", ".tflite", ".pdparams")  # fmt: skip
INDEX_SUFFIXES = (".index.json",)
INDEX_NAMES = (HF_INDEX, "param_name_map.json")  # MindSpore's unified index describes the source's parts only


def is_companion_name(name: str) -> bool:
    """Not a weight file, an index, our manifest, a hidden file (locks, journals, .gitattributes) or a part."""
    return not (name.startswith(".") or name == MANIFEST_NAME or name in INDEX_NAMES
                or name.endswith(WEIGHT_SUFFIXES) or name.endswith(INDEX_SUFFIXES))  # fmt: skip


def find_companions(src: Path) -> tuple[Path, ...]:
    """The companion files of a source: those at the top of its folder (nothing for a single-file source)."""
    folder = Path(src)
    if not folder.is_dir():
        return ()
    out = []
    for child in list_dir(folder):
        if not is_companion_name(child.name):
            continue
        try:
            st = os.stat(child)
        except OSError:
            raise FormatError(f"{child}: a companion file of the source cannot be read (a dangling link?); remove "
                              "it or copy the file in") from None
        if stat.S_ISDIR(st.st_mode):
            continue  # sub-folders (rank_<n>, original/, onnx/) are not companions
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{child}: a companion file of the source is not a regular file; remove it")
        _check_inside(folder, child)
        if st.st_size > MAX_COMPANION_BYTES:
            raise FormatError(f"{child}: {st.st_size} bytes, over the {MAX_COMPANION_BYTES}-byte cap for a "
                              "non-weight file carried with the checkpoint; move it out of the source folder")
        out.append(child)
        if len(out) > MAX_COMPANIONS:
            raise FormatError(f"{folder}: more than {MAX_COMPANIONS} non-weight files at the top of the source "
                              "folder; a model folder has a handful, move the others out")
    return tuple(out)


def _check_inside(folder: Path, child: Path) -> None:
    """A link must stay inside the folder (or the Hugging Face cache's blobs): a conversion never copies
    files from elsewhere on the machine into its output."""
    if not child.is_symlink():
        return
    root, target = folder.resolve(), child.resolve()
    blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    if not (target.is_relative_to(root) or (blobs is not None and target.is_relative_to(blobs))):
        raise FormatError(f"{child}: a link to {target}, outside the source folder {folder}; companion files "
                          "are copied only from inside it: copy the file in instead of linking it")


def copy_companions(files: tuple[Path, ...], dst: Path) -> dict[str, FileRecord]:
    """Copy each file to `dst` (an output root being written), hashing as it goes; the records for the manifest."""
    out: dict[str, FileRecord] = {}
    for path in files:
        target = dst / path.name
        if os.path.lexists(target):
            raise FormatError(f"{path}: the output already has a file named {path.name}; rename the companion file")
        digest = hashlib.sha256()
        with open_regular(path, "the companion file") as src, open(target, "xb") as out_f:
            size = 0
            while chunk := src.read(8 << 20):
                size += len(chunk)
                if size > MAX_COMPANION_BYTES:
                    raise FormatError(f"{path}: grew past {MAX_COMPANION_BYTES} bytes while being copied")
                digest.update(chunk)
                out_f.write(chunk)
            out_f.flush()
            os.fsync(out_f.fileno())
        out[path.name] = FileRecord(size, digest.hexdigest())
    return out


def place_companions(files: tuple[Path, ...], dst: Path) -> dict[str, FileRecord]:
    """`--ranks` runs (each node its share of one destination): copy the companions into the destination root
    beside the rank folders, each appearing whole (copied aside, then renamed into place). A file already
    there with the same bytes (another node's copy) is kept; different bytes are an error, never overwritten."""
    if not files:
        return {}
    staging = Path(tempfile.mkdtemp(prefix=".companions-", dir=dst))
    try:
        records = copy_companions(files, staging)
        for name, record in records.items():  # every conflict first: nothing is placed unless all can be
            target = dst / name
            if os.path.lexists(target) and (not target.is_file() or file_sha256(target) != record.sha256):
                raise FormatError(f"{target}: the destination already has a different {name}; it is the "
                                  "source's companion file, remove the other one or write to a fresh folder")
        for name in records:
            if not os.path.lexists(dst / name):
                os.replace(staging / name, dst / name)
        return records
    finally:
        shutil.rmtree(staging, ignore_errors=True)
