"""The measured schedule search's moves: step 0 stays, no step repeats, at most K skips in a row."""

from bench.schedule_search import neighbours


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
