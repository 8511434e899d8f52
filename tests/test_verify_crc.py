"""--verify-crc checks MindSpore's crc_num trailer before converting; without it the trailer is only stripped."""

from pathlib import Path

import numpy as np

from jaxreshard.cli import main
from jaxreshard.formats.mindspore_ckpt_write import write_ckpt


def test_verify_crc(tmp_path, capsys):
    path = tmp_path / "src" / "rank_0" / "checkpoint_0.ckpt"
    path.parent.mkdir(parents=True)
    write_ckpt(path, {"w": np.arange(64, dtype=np.float32).reshape(8, 8)}, crc=True)
    assert main(["convert", "--src", str(path), "--dst", str(tmp_path / "ok"), "--verify-crc", "-q"]) == 0
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF  # a byte of the tensor content, before the 17-byte trailer
    path.write_bytes(bytes(data))
    assert main(["convert", "--src", str(path), "--dst", str(tmp_path / "bad"), "--verify-crc", "-q"]) == 2
    assert "CRC mismatch" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["convert", "--src", str(path), "--dst", str(tmp_path / "unchecked"), "-q"]) == 0
    assert Path(tmp_path / "unchecked" / "rank_0" / "checkpoint_0.ckpt").exists()
