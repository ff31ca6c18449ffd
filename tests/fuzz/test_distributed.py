"""Bounded property tests over hostile distributed layouts (the targets of
``fuzz/distributed.py``): mutated DCP metadata and chunk files, random chunk layouts over
real blobs, DCP's safetensors sharding info, mutated and random ``.nemo`` archives.

Same contract as ``tests/fuzz/test_formats.py``: loaded, or one wsurgery error of one line; a
valid layout loads with its values; nothing runs. ``make fuzz`` runs them for minutes.
"""

from __future__ import annotations

import shutil

from hypothesis import given, settings

from fuzz.distributed import TARGETS
from tests.fuzz.test_formats import PROFILE, exercise, put, workdir


def _property(name: str):
    strategy, target = TARGETS[name]
    return settings(settings.get_profile(PROFILE))(given(strategy)(target))


test_mutated_dcp_metadata = _property("mutated_dcp_metadata")
test_mutated_dcp_chunks = _property("mutated_dcp_chunks")
test_structural_dcp = _property("structural_dcp")
test_dcp_safetensors_offsets = _property("dcp_safetensors_offsets")
test_mutated_nemo = _property("mutated_nemo")
test_structural_nemo = _property("structural_nemo")
test_dcp_chunk_grid = _property("dcp_chunk_grid")
test_nemo_member_paths = _property("nemo_member_paths")


def test_the_seeds_themselves_load():
    from fuzz.distributed import FIXTURES, NEMO_SEEDS

    for kind, data in NEMO_SEEDS.items():
        assert exercise(put(data, f"seed-{kind}.nemo")) == "loaded", kind
    for name in ("tiny_lm_dcp", "tiny_lm_dcp_sharded", "tiny_lm_dcp_hf", "megatron_tiny"):
        copy = workdir() / f"seed-{name}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(FIXTURES / name, copy)  # exercise writes beside its input
        assert exercise(copy) == "loaded", name
