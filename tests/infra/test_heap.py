"""infra.heap: frozen objects are skipped by collections, and refreeze lets cyclic garbage among
them go."""

from __future__ import annotations

import gc
import weakref

import pytest

from infra import heap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()   # leave the test process as it was


def test_frozen_cycles_wait_for_refreeze(unfrozen):
    a, b = Node(), Node()
    a.other, b.other = b, a
    alive = weakref.ref(a)
    assert heap.freeze() > 0 and gc.get_freeze_count() > 0
    del a, b
    gc.collect()
    assert alive() is not None          # a frozen cycle is out of the collector's sight
    kept = heap.refreeze()
    assert alive() is None              # seen once more, collected
    assert kept > 0 and gc.get_freeze_count() > 0   # what is left stays frozen


def test_refreeze_does_nothing_where_nothing_was_frozen(unfrozen):
    gc.unfreeze()
    assert heap.refreeze() == 0 and gc.get_freeze_count() == 0

