"""health.NativeHealth: which trigger fires for which measurements (docs/modes.md, "Degradation")."""

from __future__ import annotations

from baton.health import MIN_OPS, NativeHealth, Triggers


class Clock:
    """Time that moves only when the test says: the window arithmetic is the thing under test."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def health(**kw: float) -> tuple[NativeHealth, Clock]:
    clock = Clock()
    return NativeHealth(Triggers(**kw), clock), clock  # type: ignore[arg-type]


def test_a_probe_slower_than_the_limit_or_unanswered_fires() -> None:
    h, _ = health()
    assert h.observe(12.0, 0, 0, 0) is None
    assert h.observe(499.0, 0, 0, 0) is None
    v = h.observe(501.0, 0, 0, 0)
    assert v is not None and v.trigger == "probe_latency" and "501 ms" in v.detail
    v = h.observe(None, 0, 0, 0)
    assert v is not None and v.trigger == "probe_latency" and "no answer" in v.detail
    off, _ = health(probe_ms=0)
    assert off.observe(None, 0, 0, 0) is None  # 0 disables the trigger


def test_error_rate_is_judged_over_the_window_and_only_with_enough_operations() -> None:
    h, clock = health(error_rate=0.03, window_s=30)
    assert h.observe(1.0, 0, 0, 0) is None
    clock.t += 1
    assert h.observe(1.0, MIN_OPS - 1, 10, 0) is None  # too few operations to call it a rate
    clock.t += 1
    assert h.observe(1.0, 1000, 30, 0) is None  # 3.0% is not above 3%
    clock.t += 1
    v = h.observe(1.0, 1001, 31, 0)
    assert v is not None and v.trigger == "error_rate" and "31 of 1001" in v.detail
    # 60 s later the old failures have left the window: 1000 clean operations since
    h.reset()
    clock.t += 60
    assert h.observe(1.0, 1001, 31, 0) is None
    clock.t += 1
    assert h.observe(1.0, 2001, 31, 0) is None


def test_window_slides_failures_out() -> None:
    h, clock = health(error_rate=0.03, window_s=10)
    h.observe(1.0, 0, 0, 0)
    clock.t += 5
    assert h.observe(1.0, 100, 2, 0) is None  # 2%
    clock.t += 20  # the first two samples are older than the window: the baseline moves to (100, 2)
    h.observe(1.0, 200, 2, 0)
    clock.t += 1
    assert h.observe(1.0, 300, 5, 0) is None  # 3 of 200 since the baseline: 1.5%
    clock.t += 1
    v = h.observe(1.0, 400, 20, 0)
    assert v is not None and v.trigger == "error_rate"


def test_agent_failures_above_the_limit_in_the_window_fire() -> None:
    h, clock = health(agent_failures=5, window_s=30)
    h.observe(1.0, 0, 0, 0)
    clock.t += 1
    assert h.observe(1.0, 0, 0, 5) is None  # 5 is not more than 5
    clock.t += 1
    v = h.observe(1.0, 0, 0, 6)
    assert v is not None and v.trigger == "agent_failures" and "6 agent connections" in v.detail
    later, clock2 = health(agent_failures=5, window_s=30)
    later.observe(1.0, 0, 0, 0)
    clock2.t += 31
    later.observe(1.0, 0, 0, 4)
    clock2.t += 31
    assert later.observe(1.0, 0, 0, 8) is None  # 4 in this window, the other 4 in the previous one


def test_latency_is_checked_first_and_probes_are_counted() -> None:
    h, _ = health()
    v = h.observe(900.0, 1000, 1000, 100)
    assert v is not None and v.trigger == "probe_latency"
    assert h.probes == 1 and h.last_probe_ms == 900.0
