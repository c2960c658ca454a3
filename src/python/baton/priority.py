"""The calculated priority: one formula, for explanations (the breakdown) and for dispatch order (the rank).

    priority(now) = W_base    * base_priority / 10
                  + W_unblock * depth / (depth + unblock_half)       depth = longest chain of dependents
                  + W_source  * source_weight(source)
                  + W_urgency * urgency(now)
                  + aging_rate * (now - ready_at)                    linear and unbounded

    urgency(now) = 0                                  without a deadline
                 = 1                                  when slack = deadline - now - estimate <= 0
                 = horizon / (horizon + slack)        otherwise (rises smoothly as the deadline nears)

Every factor is non-decreasing in base priority and in deadline nearness, so (all else equal) a higher base or
a nearer deadline never ranks lower.  Aging is unbounded: the bounded factors sum to at most
W_base + W_unblock + W_source + W_urgency, so a task that has been ready that many points' worth of aging
longer than another always ranks above it -- nothing starves.

Why a ``rank`` instead of the priority: ``aging_rate * now`` is the same for every task, so ordering by
``static + W_urgency*urgency - aging_rate*ready_at`` is ordering by priority.  That key only changes with time
for tasks that have a deadline, so the ready queues stay ordered and only deadline tasks are re-queued as time
passes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from baton.models import PriorityBreakdown, Source

__all__ = ["PriorityWeights", "DEFAULT_WEIGHTS", "static_score", "urgency", "rank_key", "explain", "NO_DEADLINE"]

# Sort key for tasks without a deadline (they sort after every task with one when ranks tie).
NO_DEADLINE: Final = 1e18

_DEFAULT_SOURCES: Final = MappingProxyType(
    {
        Source.HUMAN.value: 1.0,
        Source.AGENT_REQUIREMENTS.value: 0.75,
        Source.AGENT_PLANNER.value: 0.5,
        Source.AGENT_IMPLEMENTATION.value: 0.25,
    }
)


@dataclass(frozen=True, slots=True)
class PriorityWeights:
    base: float = 40.0
    urgency: float = 25.0
    unblock: float = 15.0
    source: float = 10.0
    # 30 points per hour: after (40+25+15+10)/30 = 3 hours of waiting a task outranks any fresh task.
    aging_per_hour: float = 30.0
    urgency_horizon_s: float = 3600.0
    unblock_half: float = 3.0
    source_weights: Mapping[str, float] = field(default_factory=lambda: _DEFAULT_SOURCES)
    custom_source_weight: float = 0.5

    def __post_init__(self) -> None:
        for name in ("base", "urgency", "unblock", "source", "aging_per_hour"):
            if getattr(self, name) < 0:
                raise ValueError(f"priority weight {name} must be >= 0")
        if self.urgency_horizon_s <= 0 or self.unblock_half <= 0:
            raise ValueError("urgency_horizon_s and unblock_half must be > 0")

    @property
    def aging_rate(self) -> float:
        """Points per second of waiting."""
        return self.aging_per_hour / 3600.0

    def source_weight(self, source: str) -> float:
        return self.source_weights.get(source, self.custom_source_weight)


DEFAULT_WEIGHTS: Final = PriorityWeights()


def static_score(w: PriorityWeights, base_priority: int, depth: int, source: str) -> float:
    """The part of the priority that does not change with time."""
    return (
        w.base * base_priority / 10.0
        + w.unblock * depth / (depth + w.unblock_half)
        + w.source * w.source_weight(source)
    )


def urgency(w: PriorityWeights, deadline: float | None, estimate: float, now: float) -> float:
    if deadline is None:
        return 0.0
    slack = deadline - now - estimate
    if slack <= 0:
        return 1.0
    h = w.urgency_horizon_s
    return h / (h + slack)


def rank_key(
    w: PriorityWeights, static: float, deadline: float | None, estimate: float, ready_at: float, now: float
) -> float:
    """The stored ordering key: priority(now) minus the aging term every task shares."""
    return static + w.urgency * urgency(w, deadline, estimate, now) - w.aging_rate * ready_at


def explain(
    w: PriorityWeights,
    *,
    base_priority: int,
    depth: int,
    source: str,
    deadline: float | None,
    estimate: float,
    ready_at: float | None,
    now: float,
) -> PriorityBreakdown:
    """Per-factor breakdown of the priority at ``now``.  Tasks not yet ready have not started aging."""
    base = w.base * base_priority / 10.0
    unblock = w.unblock * depth / (depth + w.unblock_half)
    src = w.source * w.source_weight(source)
    urg = w.urgency * urgency(w, deadline, estimate, now)
    waited = max(0.0, now - ready_at) if ready_at is not None else 0.0
    aging = w.aging_rate * waited
    return PriorityBreakdown(
        base=base,
        urgency=urg,
        unblock=unblock,
        source=src,
        aging=aging,
        total=base + urg + unblock + src + aging,
        base_priority=base_priority,
        seconds_to_deadline=None if deadline is None else deadline - now,
        downstream_depth=depth,
        waited_s=waited,
    )
