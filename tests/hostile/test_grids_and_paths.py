"""Hostile DCP chunk grids and ``.nemo`` member paths: a metadata file of tens of
thousands of tiny chunks is checked in n log n (exact: overlaps and gaps still refused),
its chunk count is bounded by its size, and an archive member nested a thousand folders
deep is one clear error, not a crash."""

from __future__ import annotations

import itertools
import json
import pickle
import random
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

from wsurgery.io.dcp_metadata import Chunk, tiling_problem

from ..hostile.test_distributed import GOOD, _member, copy_of, refused, rewrite_metadata, write_tar


def grid(shape: tuple[int, ...], step: tuple[int, ...]) -> list[Chunk]:
    ranges = [range(0, n, s) for n, s in zip(shape, step, strict=True)]
    return [Chunk(tuple(o), tuple(min(s, n - x) for x, s, n in zip(o, step, shape, strict=True)))
            for o in itertools.product(*ranges)]  # fmt: skip


def test_a_grid_of_65536_tiny_chunks_is_checked_fast():
    chunks = grid((16, 16, 16, 16), (1, 1, 1, 1))
    random.Random(0).shuffle(chunks)
    start = time.perf_counter()
    assert tiling_problem((16, 16, 16, 16), chunks) is None
    assert time.perf_counter() - start < 20  # the pairwise sweep took minutes


@pytest.mark.parametrize("where", [0, 30_000, 65_535])
def test_one_duplicated_tiny_chunk_in_65536_is_an_overlap(where):
    chunks = grid((16, 16, 16, 16), (1, 1, 1, 1))
    chunks[where] = chunks[(where + 1) % len(chunks)]
    start = time.perf_counter()
    why = tiling_problem((16, 16, 16, 16), chunks)
    assert why is not None and "overlap" in why, why
    assert time.perf_counter() - start < 5


def test_one_missing_tiny_chunk_is_a_gap():
    chunks = grid((16, 16, 16, 16), (1, 1, 1, 1))
    del chunks[12345]
    assert tiling_problem((16, 16, 16, 16), chunks) == "chunks cover 65535 of its 65536 elements (a gap)"


@pytest.mark.parametrize(
    ("shape", "chunks", "expect"),
    [
        ((8, 8), [Chunk((0, 0), (4, 4)), Chunk((2, 2), (2, 2)), Chunk((4, 0), (4, 8)), Chunk((0, 4), (4, 4))],
         "chunks at [0, 0] and [2, 2] overlap"),
        # an overlap that makes up exactly for a gap: the element count alone would pass
        ((3, 3), [Chunk((0, 0), (2, 3)), Chunk((1, 0), (1, 3)), Chunk((2, 0), (1, 2))],
         "chunks at [0, 0] and [1, 0] overlap"),
        ((3, 2), [Chunk((0, 0), (3, 1)), Chunk((0, 1), (3, 2))], "chunk at [0, 1] of size [3, 2] exceeds dim 1 (2)"),
        ((4,), [Chunk((0,), (0,)), Chunk((0,), (4,)), Chunk((4,), (0,))], None),
        ((), [Chunk((), ()), Chunk((), ())], "chunks at [] and [] overlap"),
        ((), [Chunk((), ())], None),
    ],
)  # fmt: skip
def test_small_layouts(shape, chunks, expect):
    assert tiling_problem(shape, chunks) == expect


def brick_wall(rows: int, cols: int) -> list[Chunk]:
    """Rows of one element, each cut into columns at its own points: the cell grid is
    rows x (all cut points), too large, so the sweep decides."""
    out = []
    width = cols * rows
    for r in range(rows):
        cuts = sorted({0, width, *range(r % cols + 1, width, cols)})
        out += [Chunk((r, a), (1, b - a)) for a, b in itertools.pairwise(cuts)]
    return out


def test_an_irregular_layout_is_checked_exactly():
    chunks = brick_wall(64, 16)
    assert tiling_problem((64, 64 * 16), chunks) is None
    bad = [*chunks[:-1], Chunk(chunks[-1].offsets, (1, chunks[-1].sizes[1])), Chunk((63, 0), (1, 1))]
    why = tiling_problem((64, 64 * 16), bad)
    assert why is not None and "overlap" in why, why


def _tiny_chunk_metadata(dcp: Path, n: int) -> None:
    """The fixture's embedding (32 x 8) cut into its 256 one-element chunks, repeated: a
    memoized chunk object reused ``n`` times costs a few bytes of pickle each."""

    def change(md):
        one = ChunkStorageMetadata(torch.Size((0, 0)), torch.Size((1, 1)))
        md.state_dict_metadata["embedding.weight"].chunks = [one] * n

    rewrite_metadata(dcp, change)


def test_the_chunk_count_is_bounded_by_the_metadata_size(cli, tmp_path):
    dcp = copy_of(tmp_path, "tiny_lm_dcp")
    _tiny_chunk_metadata(dcp, 200_000)
    size = (dcp / ".metadata").stat().st_size
    assert size < 200_000 * 16  # the bound applies: memo references cost less than a real chunk
    start = time.perf_counter()
    refused(cli, dcp, "chunks (at most one per 16 bytes of the file")
    assert time.perf_counter() - start < 30


def test_a_real_grid_metadata_of_many_chunks_is_inspected_fast(cli, tmp_path):
    """65,536 distinct 1x1x1x1 chunks of a 4-D tensor, each with its storage record, as
    torch pickles DCP's metadata: inspect (no chunk read) succeeds in bounded time."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    dcp = copy_of(tmp_path, "tiny_lm_dcp")

    def change(md):
        entry = md.state_dict_metadata["embedding.weight"]
        entry.size = torch.Size((16, 16, 16, 16))
        boxes = grid((16, 16, 16, 16), (1, 1, 1, 1))
        entry.chunks = [ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in boxes]
        md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != "embedding.weight"}
        for i, c in enumerate(boxes):
            md.storage_data[MetadataIndex("embedding.weight", torch.Size(c.offsets), i)] = _StorageInfo(
                "__0_0.distcp", 0, 4
            )

    rewrite_metadata(dcp, change)
    start = time.perf_counter()
    code, out, err = cli("inspect", dcp, "--json")
    elapsed = time.perf_counter() - start
    assert code == 0, (code, out, err)
    assert json.loads(out)["total_params"] > 65536
    assert elapsed < 90, elapsed  # about 5 minutes before the grid check (a linear pickle read remains)


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_a_nemo_member_a_thousand_folders_deep(cli, tmp_path, gz):
    deep = "model_weights/" + "a/" * 1400 + "x"
    path = write_tar(tmp_path / "deep.nemo", [*GOOD, _member(deep, b"x")], gz=gz)
    if gz:
        assert path.stat().st_size < 16 << 10
    refused(cli, path, "1401 folders deep, more than the 32 a checkpoint needs")


def test_a_nemo_folder_member_a_thousand_folders_deep(cli, tmp_path):
    import tarfile

    path = write_tar(tmp_path / "deep.nemo", [*GOOD, _member("a/" * 1400, kind=tarfile.DIRTYPE)], gz=True)
    refused(cli, path, "folders deep")


def test_pickled_metadata_helpers_are_ours():
    assert pickle.loads(pickle.dumps(Chunk((0,), (1,)))) == Chunk((0,), (1,))
