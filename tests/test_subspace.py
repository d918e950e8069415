"""The automatic subspace rank, against a direct reading of its rule."""

from __future__ import annotations

import numpy as np
import pytest

from gist_index.config import SelectConfig
from gist_index.errors import ConfigError
from gist_index.subspace import build_target, choose_rank


def reference_rank(s: np.ndarray, n_subtasks: int, energy: float, max_rank: int) -> int:
    """The rule as the docs state it, one k at a time: the smallest k whose squared singular values hold
    ``energy`` of the total, at most ``max_rank``; at least the number of sub-tasks and 2; at most the number of
    numerically non-zero singular values."""
    s2 = np.asarray(s, dtype=np.float64) ** 2
    nonzero = sum(1 for v in s2 if v > s2[0] * 1e-10)
    k = 1
    while s2[:k].sum() < energy * s2.sum() * (1 - 1e-12) and k < len(s2):
        k += 1
    k = min(k, max_rank)
    return max(1, min(nonzero, max(k, n_subtasks, 2)))


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("max_rank", [2, 5, 128])
def test_choose_rank_follows_the_rule(energy, max_rank):
    rng = np.random.default_rng(int(energy * 100) + max_rank)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        s = np.sort(rng.exponential(1.0, n) ** 3)[::-1]
        if rng.random() < 0.3:  # a rank-deficient spectrum
            s[int(rng.integers(1, n + 1)) :] = 0.0
        n_sub = int(rng.integers(1, 6))
        assert choose_rank(s, n_sub, energy, max_rank) == reference_rank(s, n_sub, energy, max_rank)


def test_default_keeps_every_validation_direction_up_to_the_cap():
    rng = np.random.default_rng(0)
    cfg = SelectConfig(top=1)
    assert (cfg.energy, cfg.max_rank) == (1.0, 128)
    small = rng.standard_normal((9, 300))  # 9 validation examples: all 9 directions
    assert build_target([small], [None] * 9, [1.0]).ranks == [9]
    big = rng.standard_normal((200, 300))  # more than the cap
    assert build_target([big], [None] * 200, [1.0]).ranks == [128]
    # the sub-task floor wins over the cap: every sub-task keeps a direction of its own
    labels = [f"t{i % 4}" for i in range(200)]
    assert build_target([big], labels, [1.0], max_rank=2).ranks == [4]
    # the old default (energy 0.9) keeps fewer than all on a decaying spectrum
    decaying = small * np.geomspace(1.0, 0.01, 9)[:, None]
    assert build_target([decaying], [None] * 9, [1.0], energy=0.9).ranks[0] < 9


def test_max_rank_is_checked():
    with pytest.raises(ConfigError, match="max-rank"):
        SelectConfig(top=1, max_rank=1)
