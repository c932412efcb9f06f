"""Logged throughput counts exactly the training steps of the timed span, never eval time."""

import pytest

from lcjax.train.metrics import Throughput


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _train(throughput, clock, steps, seconds_per_step=1.0):
  for _ in range(steps):
    clock.now += seconds_per_step
    throughput.step()


def test_eval_between_logs_is_excluded_and_every_step_counted():
  # log_every=10, eval_every=15: the eval at step 15 falls inside the second log interval.
  clock = FakeClock()
  t = Throughput(tokens_per_step=100, flops_per_token=6.0, peak_flops=1200.0, clock=clock)
  _train(t, clock, 10)
  first = t.report()
  assert first["tokens_per_sec"] == pytest.approx(100.0)
  _train(t, clock, 5)
  with t.excluded():
    clock.now += 1000.0  # eval
  _train(t, clock, 5)
  second = t.report()  # steps 11-20: 10 steps in 10 s of training
  assert second["step_time"] == pytest.approx(1.0)
  assert second["tokens_per_sec"] == pytest.approx(100.0)
  assert second["mfu"] == pytest.approx(6.0 * 100.0 / 1200.0)


def test_eval_right_after_a_log_and_no_peak():
  clock = FakeClock()
  t = Throughput(tokens_per_step=8, flops_per_token=1.0, peak_flops=None, clock=clock)
  with t.excluded():
    clock.now += 50.0
  _train(t, clock, 4, seconds_per_step=0.5)
  logged = t.report()
  assert logged["step_time"] == pytest.approx(0.5)
  assert logged["tokens_per_sec"] == pytest.approx(16.0)
  assert logged["mfu"] is None
