"""The generated HalfSpaceTrees walks are the loops they replace, bit for bit."""

from __future__ import annotations

import random

from models.features import FEATURE_NAMES
from models.online import SharedHalfSpaceTrees


def test_generated_walks_equal_the_loops() -> None:
    rng = random.Random(7)
    for n_trees, height, window, seed in [(6, 6, 32, 42), (3, 3, 4, 1), (2, 8, 8, 5)]:
        trees = SharedHalfSpaceTrees(FEATURE_NAMES, n_trees, height, window, seed)
        fast, slow = trees.new_state(), trees.new_state()
        for i in range(400):
            x = {k: rng.choice([0.0, 1.0, rng.random(), 0.5]) for k in FEATURE_NAMES}
            assert trees.score_one(fast, x) == trees._score_loop(slow, x)
            if i % 3:
                trees.learn_one(fast, x)
                trees._learn_loop(x, slow.l_mass)
                slow.counter += 1
                if slow.counter == window:
                    slow.r_mass, slow.l_mass = (
                        slow.l_mass,
                        type(slow.l_mass)("l", bytes(8 * trees.size)),
                    )
                    slow.first_window = False
                    slow.counter = 0
            assert fast.l_mass == slow.l_mass and fast.r_mass == slow.r_mass
            assert fast.first_window == slow.first_window and fast.counter == slow.counter
        assert not fast.first_window
