"""Pipeline schedules, checked in one process by running all stages' lists against each other."""

from __future__ import annotations

import pytest

from concord.algorithms import schedules as S
from concord.algorithms.schedules import Action


def _compute(actions: list[Action]) -> str:
    return " ".join(str(a) for a in actions if a.op in S.COMPUTE)


def test_gpipe_and_1f1b_orders_for_three_stages_four_microbatches():
    gpipe = S.build("gpipe", 3, 4)
    assert [_compute(a) for a in gpipe] == ["F0 F1 F2 F3 B0 B1 B2 B3"] * 3
    one = S.build("1f1b", 3, 4)
    assert [_compute(a) for a in one] == [
        "F0 F1 F2 B0 F3 B1 B2 B3",  # 2 warm-up forwards
        "F0 F1 B0 F2 B1 F3 B2 B3",  # 1 warm-up forward
        "F0 B0 F1 B1 F2 B2 F3 B3",  # last stage: strictly alternating
    ]


def test_messages_surround_compute():
    middle = S.gpipe(3, 1, 1)
    assert middle == [
        Action(S.RECV_ACT, 0, 0), Action(S.FORWARD, 0), Action(S.SEND_ACT, 0, 2),
        Action(S.RECV_GRAD, 0, 2), Action(S.BACKWARD, 0), Action(S.SEND_GRAD, 0, 0),
    ]  # fmt: skip
    assert S.one_f_one_b(1, 2, 0) == [
        Action(S.FORWARD, 0), Action(S.BACKWARD, 0), Action(S.FORWARD, 1), Action(S.BACKWARD, 1)
    ]  # fmt: skip


@pytest.mark.parametrize("name", sorted(S.SCHEDULES))
def test_all_small_pipelines_finish_with_every_microbatch_once(name):
    """No deadlock, dependencies respected, each micro-batch F and B once per stage."""
    for stages in range(1, 9):
        for mbs in range(1, 33):
            plan = S.build(name, stages, mbs)
            sim = S.simulate(plan, mbs, forward_time=1.0, backward_time=2.0)  # validates
            for spans in sim.timeline:
                assert sorted((s.op, s.microbatch) for s in spans) == sorted(
                    (op, i) for op in S.COMPUTE for i in range(mbs)
                )
            # equal stages: makespan (M + P - 1) * (f + b), bubble (P - 1) / (M + P - 1)
            assert sim.makespan == pytest.approx((mbs + stages - 1) * 3.0)
            assert sim.bubble == pytest.approx(S.theoretical_bubble(stages, mbs))
            if name == "1f1b":
                assert sim.peak_in_flight == [min(stages - s, mbs) for s in range(stages)]
            else:
                assert sim.peak_in_flight == [mbs] * stages


def test_theoretical_bubble_by_hand():
    assert S.theoretical_bubble(4, 8) == 3 / 11
    assert S.theoretical_bubble(1, 5) == 0


def test_uneven_stages_and_comm_time_stretch_the_makespan():
    plan = S.build("gpipe", 2, 2)
    # stage 0: F0 [0,1] F1 [1,2]; stage 1 (f=3): F0 [1.5,4.5] F1 [4.5,7.5], B0 [7.5,8.5]
    # B1 [8.5,9.5]; stage 0: B0 needs grad at 8.5+0.5 -> [9,11], B1 at 10 -> [11,13]
    sim = S.simulate(plan, 2, forward_time=[1, 3], backward_time=[2, 1], comm_time=0.5)
    assert sim.makespan == 13
    assert [(s.start, s.end) for s in sim.timeline[1]] == [
        (1.5, 4.5),
        (4.5, 7.5),
        (7.5, 8.5),
        (8.5, 9.5),
    ]
    assert sim.busy == [6, 8]


def test_deadlock_is_detected_and_names_the_stuck_stages():
    swapped = [
        [Action(S.RECV_GRAD, 0, 1), Action(S.FORWARD, 0), Action(S.SEND_ACT, 0, 1),
         Action(S.BACKWARD, 0)],
        S.gpipe(2, 1, 1),
    ]  # fmt: skip
    with pytest.raises(S.ScheduleError, match="stage 0: micro-batch 0 must run"):
        S.simulate(swapped, 1)
    # locally valid lists that wait on each other: stage 0 sends micro-batch 1 first
    crossed = [
        [Action(S.FORWARD, 0), Action(S.FORWARD, 1), Action(S.SEND_ACT, 1, 1),
         Action(S.SEND_ACT, 0, 1), *S.gpipe(2, 2, 0)[4:]],
        S.gpipe(2, 2, 1),
    ]  # fmt: skip
    with pytest.raises(S.ScheduleError, match="sent micro-batch 1 first"):
        S.simulate(crossed, 2)
    # stage 0 holds back activation 1 until gradient 0 returns; GPipe's stage 1 wants
    # activation 1 before it sends gradient 0
    stuck = [
        [Action(S.FORWARD, 0), Action(S.SEND_ACT, 0, 1), Action(S.FORWARD, 1),
         Action(S.RECV_GRAD, 0, 1), Action(S.BACKWARD, 0), Action(S.SEND_ACT, 1, 1),
         Action(S.RECV_GRAD, 1, 1), Action(S.BACKWARD, 1)],
        S.gpipe(2, 2, 1),
    ]  # fmt: skip
    with pytest.raises(S.DeadlockError, match=r"stage 0 at recv_grad0@1; stage 1 at recv_act1@0"):
        S.simulate(stuck, 2)


def test_missing_or_repeated_microbatches_are_rejected():
    with pytest.raises(S.ScheduleError, match="micro-batch 1 has no backward"):
        S.validate([[Action(S.FORWARD, 0), Action(S.BACKWARD, 0), Action(S.FORWARD, 1)]], 2)
    twice = [Action(S.FORWARD, 0), Action(S.FORWARD, 0), Action(S.BACKWARD, 0)]
    with pytest.raises(S.ScheduleError, match="F0 appears twice"):
        S.validate([twice], 1)
    with pytest.raises(S.ScheduleError, match="unknown micro-batches"):
        S.validate([S.gpipe(1, 2, 0)], 1)
    with pytest.raises(ValueError, match="unknown schedule 'zb'"):
        S.build("zb", 2, 2)
    with pytest.raises(ValueError, match="stage 3 is outside 0..2"):
        S.gpipe(3, 2, 3)
