"""Regression tests from a hostile review, in process."""

from __future__ import annotations

import pytest

from shm_protocol import long_inputs


@pytest.mark.parametrize("truncate, direction, default, want", [
    (None, None, "chunk", "truncate"),  # the request said no chunking: it was chunked anyway
    (None, None, "refuse", "refuse"),
    (None, None, "truncate_left", "truncate_left"),
    (False, None, "chunk", "refuse"),
    (None, "left", "chunk", "truncate_left"),
])
def test_chunk_false_is_heard_when_chunking_is_the_default(truncate, direction, default, want):
    assert long_inputs.resolve_policy(truncate, direction, False, default) == want
