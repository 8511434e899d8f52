"""fill_boxes: direct reads, slab reads (dense column blocks) and run-by-run reads (sparse), all exact."""


import numpy as np
import pytest

import jaxreshard.fill as fill
from jaxreshard.box import Box
from jaxreshard.formats.base import FileHandles, aligned_empty
from jaxreshard.formats.safetensors_io import SafetensorsWriter, read_safetensors_index
from jaxreshard.layout import ParamLayout
from jaxreshard.plan import make_plan


@pytest.fixture
def source(tmp_path):
    full = np.arange(24 * 10, dtype=np.int32).reshape(24, 10)
    path = tmp_path / "w.safetensors"
    w = SafetensorsWriter(path, [("w", full.dtype, full.shape)])
    w.write("w", full)
    w.close()
    entries = {e.param: e for e in read_safetensors_index(path)[0]}
    return full, {0: entries}


class Cols:
    """A layout splitting dim 1 over 5 ranks (column blocks of 2)."""

    num_ranks = 5

    def resolve(self, names):
        return {n: ParamLayout((("mp", 5),), ((), ("mp",)), (0,)) for n in names}


def fill_all(plan):
    out = {}
    with FileHandles() as handles:
        targets = [(s, aligned_empty(s.dst_box.shape, np.int32)) for r in plan.ranks for s in r.shards]
        fill.fill_boxes(plan, targets, handles)
        for (_shard, buf), rank in zip(targets, plan.ranks):
            out[rank.dst_rank] = buf
    return out


def recorded_reads(monkeypatch) -> list:
    """The boxes `fill` reads through `read_box`, in order (the reads still happen)."""
    calls: list = []
    real = fill.read_box
    monkeypatch.setattr(fill, "read_box", lambda *a: (calls.append(a[2]), real(*a)))
    return calls


@pytest.mark.parametrize("slab", [fill.SLAB_BYTES, 3 * 40, 40])  # whole tensor, 3-row and 1-row slabs
def test_dense_column_blocks_read_in_slabs(source, monkeypatch, slab):
    full, entries = source
    monkeypatch.setattr(fill, "SLAB_BYTES", slab)
    calls = recorded_reads(monkeypatch)
    out = fill_all(make_plan(entries, None, Cols()))
    for r in range(5):
        assert out[r].tobytes() == np.ascontiguousarray(full[:, 2 * r : 2 * r + 2]).tobytes()
    rows = max(1, slab // 40)
    assert len(calls) == -(-24 // rows)  # one read per slab, shared by all 5 column blocks
    assert all(box.shape[1] == 10 for box in calls)


def test_sparse_columns_read_only_their_runs(source, monkeypatch):
    full, entries = source
    calls = recorded_reads(monkeypatch)
    out = fill_all(make_plan(entries, None, Cols(), dst_ranks=[3]))
    assert out[3].tobytes() == np.ascontiguousarray(full[:, 6:8]).tobytes()
    assert calls == [Box((0, 6), (24, 8))]  # just the wanted columns (run by run inside read_box)


def test_row_blocks_read_in_place(source, monkeypatch):
    full, entries = source

    class Rows(Cols):
        num_ranks = 4

        def resolve(self, names):
            return {n: ParamLayout((("mp", 4),), (("mp",),), (0,)) for n in names}

    calls = recorded_reads(monkeypatch)
    out = fill_all(make_plan(entries, None, Rows()))
    assert [out[r].tobytes() for r in range(4)] == [full[6 * r : 6 * r + 6].tobytes() for r in range(4)]
    assert calls == [Box((6 * r, 0), (6 * r + 6, 10)) for r in range(4)]


@pytest.mark.parametrize("slab", [fill.SLAB_BYTES, 40])
def test_sparse_regions_are_read_in_pipelined_groups(source, monkeypatch, slab):
    full, entries = source
    monkeypatch.setattr(fill, "SLAB_BYTES", slab)
    calls = recorded_reads(monkeypatch)
    plan = make_plan(entries, None, Cols(), dst_ranks=[1, 3])
    out = fill_all(plan)
    assert out[1].tobytes() == np.ascontiguousarray(full[:, 2:4]).tobytes()
    assert out[3].tobytes() == np.ascontiguousarray(full[:, 6:8]).tobytes()
    assert calls == [Box((0, 2), (24, 4)), Box((0, 6), (24, 8))]


def test_a_failed_slab_read_surfaces_after_the_others_settle(source, monkeypatch):
    full, entries = source
    monkeypatch.setattr(fill, "SLAB_BYTES", 40)
    real, calls = fill.read_box, []

    def failing(handles, entry, box, out):
        calls.append(box)
        if len(calls) == 5:
            raise OSError(5, "Input/output error")
        real(handles, entry, box, out)

    monkeypatch.setattr(fill, "read_box", failing)
    with pytest.raises(OSError, match="Input/output"):
        fill_all(make_plan(entries, None, Cols()))
    assert len(calls) == 5  # nothing was read after the failure


def test_o_direct_reads_fill_the_same_bytes(source, monkeypatch):
    from jaxreshard.formats import storage

    full, entries = source
    monkeypatch.setenv(storage.DIRECT_ENV, "1")
    monkeypatch.setattr(fill, "SLAB_BYTES", 3 * 40)
    out = fill_all(make_plan(entries, None, Cols()))
    for r in range(5):
        assert out[r].tobytes() == np.ascontiguousarray(full[:, 2 * r : 2 * r + 2]).tobytes()
