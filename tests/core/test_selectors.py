"""The one name selector: exact name, then module prefix, then glob; nothing selected is
an unknown name with close matches."""

import pytest

from wsurgery.errors import UnknownNameError
from wsurgery.selectors import select, select_all, unmatched

NAMES = ["embed.weight", "layers.0.w", "layers.0.b", "layers.1.w", "layers.10.w", "conv1_BN.weight", "layers.0"]


def test_exact_name_wins_over_prefix():
    assert select(NAMES, "layers.0") == ["layers.0"]


def test_module_prefix_selects_names_under_it_only():
    assert select(NAMES, "layers.1") == ["layers.1.w"]


def test_glob_crosses_dots_and_is_case_sensitive():
    assert select(NAMES, "layers.*.w") == ["layers.0.w", "layers.1.w", "layers.10.w"]
    with pytest.raises(UnknownNameError) as info:
        select(NAMES, "conv1_bn*")
    assert "conv1_bn*" in str(info.value)


def test_unknown_name_carries_close_matches():
    with pytest.raises(UnknownNameError) as info:
        select(NAMES, "embed.wieght", path="m.safetensors")
    assert info.value.name == "embed.wieght"
    assert "embed.weight" in info.value.candidates
    assert "m.safetensors" in str(info.value)


def test_select_all_unions_in_checkpoint_order():
    assert select_all(NAMES, ["layers.1.w", "embed.weight", "*.w"]) == [
        "embed.weight",
        "layers.0.w",
        "layers.1.w",
        "layers.10.w",
    ]


def test_unmatched_lists_every_selector_that_selects_nothing():
    assert unmatched(NAMES, ["x", "embed", "y*"]) == ["x", "y*"]
