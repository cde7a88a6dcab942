"""The measured schedule search's moves: step 0 stays, no step repeats, at most K skips in a row."""

from magcache.studio.schedule_search import neighbours


def test_neighbours_move_one_step_by_one_and_keep_the_constraints():
    steps = [0, 3, 7, 10, 14, 17, 20, 24, 27]
    found = neighbours(steps, 28, 6)
    assert found, "uniform skipping has neighbours"
    for cand in found:
        assert cand[0] == 0 and len(cand) == len(set(cand)) == len(steps)
        assert len(set(cand) - set(steps)) == 1 and all(abs(a - b) <= 1 for a, b in zip(cand, steps))
        assert max(b - a - 1 for a, b in zip(cand, cand[1:] + [28])) <= 6
    assert [0, 2, 7, 10, 14, 17, 20, 24, 27] in found and [0, 3, 7, 10, 14, 17, 20, 24, 26] in found
    assert [0, 3, 7, 10, 14, 17, 20, 24, 28] not in found  # outside the run


def test_neighbours_refuse_a_move_that_skips_more_than_k():
    # moving 7 to 8 would skip 1..7 (seven steps); moving it to 6 skips 1..5 and 7..12
    assert [0, 8, 13, 20] not in neighbours([0, 7, 13, 20], 21, 6)
    assert [0, 6, 13, 20] in neighbours([0, 7, 13, 20], 21, 6)


def test_neighbours_per_branch_and_longer_moves():
    both = {"cond": [0, 3, 7, 13], "uncond": [0, 3, 7, 13]}
    shared_only = neighbours(both, 14, 6, (-2, -1, 1, 2))
    assert all(c["cond"] == c["uncond"] for c in shared_only)
    assert {"cond": [0, 3, 9, 13], "uncond": [0, 3, 9, 13]} in shared_only  # a move by 2
    assert {"cond": [0, 3, 5, 13], "uncond": [0, 3, 5, 13]} not in shared_only  # would skip 6..12: more than K
    found = neighbours(both, 14, 6, (-1, 1), per_branch=True)
    assert {"cond": [0, 2, 7, 13], "uncond": [0, 3, 7, 13]} in found  # one branch alone
    assert {"cond": [0, 3, 7, 13], "uncond": [0, 3, 7, 12]} in found
    assert found[: len(neighbours(both, 14, 6))] == neighbours(both, 14, 6)  # moves in both branches first
    for cand in found:
        for steps in cand.values():
            assert steps[0] == 0 and len(steps) == len(set(steps)) == 4
            assert sum(x not in both["cond"] for x in steps) <= 1
    # branches that differ: a shared move only moves a step both compute
    apart = {"cond": [0, 2, 7, 13], "uncond": [0, 3, 7, 13]}
    assert {"cond": [0, 2, 8, 13], "uncond": [0, 3, 8, 13]} in neighbours(apart, 14, 6)
    assert not any(c["cond"][1] != 2 and c["uncond"][1] != 3 for c in neighbours(apart, 14, 6))
