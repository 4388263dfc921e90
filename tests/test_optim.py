import pytest

from lit_flash.optim import new_lr_plan, schedule_step, stretch_lr_plan


def test_a_stretched_plan_keeps_the_resume_step_and_ends_at_the_new_end():
    plan = stretch_lr_plan(new_lr_plan(60), at_step=20, new_end=100)
    assert schedule_step(plan, 20) == 20  # the same point of the schedule at the resume step: no jump
    assert schedule_step(plan, 100) == 60  # the schedule's end at the new last step
    assert schedule_step(plan, 60) == pytest.approx(40)  # in between, the rest of it stretched evenly


def test_an_ended_plan_runs_again_from_its_start_and_can_be_stretched_again():
    ended = new_lr_plan(60)
    again = stretch_lr_plan(ended, at_step=60, new_end=100)
    assert schedule_step(again, 60) == 60  # the step it ended at is unchanged
    assert schedule_step(again, 61) == pytest.approx(1.5)  # then from the start (warm-up from 0)
    assert schedule_step(again, 100) == 60
    longer = stretch_lr_plan(again, at_step=80, new_end=120)  # resumed again, mid-restart
    assert [schedule_step(longer, s) for s in (61, 80)] == [schedule_step(again, s) for s in (61, 80)]
    assert schedule_step(longer, 120) == 60
