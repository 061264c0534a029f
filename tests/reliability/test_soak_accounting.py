"""The soak's accounting: a duplicate is explained only by evidence tied to its id (issue 21, 7)."""

from __future__ import annotations

import collections
import importlib.util
import os
import sys
from pathlib import Path

import pytest

_SOAK = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


@pytest.fixture(scope="module")
def explain():
    # The script sets PYTHONPATH for the runners' workers when imported: restored after these tests.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        patch.setattr(sys, "path", list(sys.path))
        spec = importlib.util.spec_from_file_location("soak_under_test", _SOAK)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        patch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module.explain_by_posts


def _stored(*ids: int) -> collections.Counter:
    return collections.Counter(ids)


def test_a_batch_posted_again_after_the_injected_failure_explains_its_ids(explain):
    # (status, ids, step started, session). The failure (step 5) hit session 1 and discarded the
    # answer to [3, 4]; session 1 went on posting [5, 6] before the bundle failed; the retried
    # bundle, on a new client (session 2), posted all three again.
    posts = [(202, [1, 2], 1, 1), (202, [3, 4], 3, 1), (202, [5, 6], 6, 1), (202, [1, 2], 7, 2),
             (202, [3, 4], 9, 2), (202, [5, 6], 11, 2)]
    assert explain(posts, (5, 1), _stored(1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6)) == (6, 0)


def test_a_double_post_by_one_client_is_not_put_down_to_the_retry(explain):
    # Session 2 posting [5, 6] twice: only the re-posted batch [1, 2] is explained.
    posts = [(202, [1, 2], 1, 1), (202, [1, 2], 4, 2), (202, [5, 6], 6, 2), (202, [5, 6], 8, 2)]
    assert explain(posts, (3, 1), _stored(1, 1, 2, 2, 5, 5, 6, 6)) == (2, 0)
    # The failed client posting a batch twice, either side of the failure: not explained either.
    posts = [(202, [7], 1, 1), (202, [7], 4, 1)]
    assert explain(posts, (3, 1), _stored(7, 7)) == (0, 0)
    # No failure in the round: a repeated batch is not explained at all.
    assert explain([(202, [1, 2], 1, 1), (202, [1, 2], 2, 2)], None, _stored(1, 1, 2, 2)) == (0, 0)


def test_an_unanswered_attempt_explains_only_the_ids_it_carried(explain):
    posts = [(None, [1, 2], 1, 1), (202, [1, 2], 3, 1), (202, [3], 5, 1)]
    assert explain(posts, None, _stored(1, 1, 2, 2, 3, 3)) == (0, 2)
    # A batch re-posted in different batches after the failure is no evidence of a bundle retry.
    posts = [(202, [1, 2], 1, 1), (202, [1], 4, 2), (202, [2], 6, 2)]
    assert explain(posts, (3, 1), _stored(1, 1, 2, 2)) == (0, 0)
