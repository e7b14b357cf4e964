"""The trainers' step plan: it fits its time budget when steps slow down, and its learning rate
never rises after the warm-up (which the first measurement, at step 30, sizes with the plan)."""
import pytest

from blockdraft.train.schedule import StepPlan


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(plan: StepPlan, clock: _Clock, step_seconds) -> tuple[int, float, list[float]]:
    done, lrs = 0, []
    while not plan.finished(done):
        lrs.append(plan.lr_factor(done))
        clock.now += step_seconds(done)
        done += 1
        plan.tick(done)
    return done, clock.now, lrs


@pytest.mark.parametrize("slow_from", [40, 200, 10_000])
def test_a_run_whose_steps_slow_down_ends_near_its_budget(slow_from):
    clock = _Clock()
    plan = StepPlan(5_000, max_seconds=600.0, warmup=0.03, clock=clock)
    done, elapsed, lrs = _run(plan, clock, lambda step: 1.0 if step < slow_from else 1.5)
    assert elapsed <= 600.0 + 50 * 1.5  # within one re-measured window of the budget
    assert elapsed >= 0.85 * 600.0  # and it used the budget, not a fraction of it
    after = lrs[max(30, int(0.03 * plan.total)):]  # past the warm-up (sized by the plan from step 30 on)
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))


def test_without_a_budget_the_plan_keeps_its_steps():
    clock = _Clock()
    done, _, _ = _run(StepPlan(300, clock=clock), clock, lambda step: 5.0)
    assert done == 300


def test_a_budget_larger_than_the_run_keeps_its_steps():
    clock = _Clock()
    done, _, _ = _run(StepPlan(300, max_seconds=10_000.0, clock=clock), clock, lambda step: 1.0)
    assert done == 300
