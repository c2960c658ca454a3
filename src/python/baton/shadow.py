"""REDUNDANT mode's shadow: the Python routing decision for coordination traffic, kept beside the native
router and compared with what it did (docs/modes.md, "REDUNDANT").

The coordinator feeds the shadow what it sends (TASK pushes, revocations, agent credits) and what it reads
(RESULTs, closed endpoints, DISPATCHED notices), in the order of its link.  For every dispatch the native
router reports, the shadow answers whether the Python router's rules allow it:

- the task was pushed to a work queue and is still queued there (not unknown, not handed out twice);
- the agent serves that queue and has a free credit (dispatches held below the credit it was granted);
- no task pushed to that queue *before* it, with the same or a more urgent priority, is still waiting
  (CRITICAL first, FIFO within a priority).

Only what both routers decide from the same inputs is compared.  Which of several agents with free credit
gets a task, or whether a task pushed later overtakes one pushed earlier at a lower priority, depends on when
the router read each frame, which the coordinator cannot see: those choices are the router's.  The rules
above hold whatever the timing, so a divergence is a real disagreement, never a race.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Final

_N_PRIO: Final = 5


class _Agent:
    __slots__ = ("queue", "credit", "held")

    def __init__(self, queue: int, credit: int) -> None:
        self.queue = queue
        self.credit = credit
        self.held: set[int] = set()


class _Queue:
    __slots__ = ("fifos", "pending")

    def __init__(self) -> None:
        self.fifos: list[deque[int]] = [deque() for _ in range(_N_PRIO)]  # dispatch ids in push order
        self.pending: dict[int, int] = {}  # dispatch id -> priority, for the tasks still queued

    def head(self, prio: int) -> int | None:
        """The oldest task still queued at that priority (handed-out and revoked ones are dropped lazily)."""
        fifo, pending = self.fifos[prio], self.pending
        while fifo and fifo[0] not in pending:
            fifo.popleft()
        return fifo[0] if fifo else None


class RoutingShadow:
    def __init__(self) -> None:
        self._queues: dict[int, _Queue] = {}
        self._queue_of: dict[int, int] = {}  # dispatch id -> queue, for the queued ones
        self._agents: dict[int, _Agent] = {}
        self.checked = 0
        self.divergences: Counter[str] = Counter()  # by kind: task, agent, order

    def _queue(self, qid: int) -> _Queue:
        q = self._queues.get(qid)
        if q is None:
            q = self._queues[qid] = _Queue()
        return q

    # --- what the coordinator sends -------------------------------------------------------------------------

    def pushed(self, qid: int, did: int, prio: int, *, ordered: bool = True) -> None:
        """A TASK for work queue ``qid`` at wire priority ``prio`` (0-4).  ``ordered=False`` for tasks queued
        before the shadow started (their order relative to each other is unknown to it): they may be handed
        out, they never count as skipped."""
        q = self._queue(qid)
        q.pending[did] = prio
        self._queue_of[did] = qid
        if ordered:
            q.fifos[prio].append(did)

    def revoked(self, did: int) -> None:
        qid = self._queue_of.pop(did, None)
        if qid is not None:
            self._queues[qid].pending.pop(did, None)

    def agent(self, ep: int, qid: int, credit: int) -> None:
        a = self._agents.get(ep)
        if a is None:
            self._agents[ep] = _Agent(qid, credit if qid else 0)
        else:
            a.queue, a.credit = qid, credit if qid else 0

    def holding(self, ep: int, did: int) -> None:
        """``ep`` holds ``did`` already (dispatched before the shadow started)."""
        a = self._agents.get(ep)
        if a is not None:
            a.held.add(did)

    # --- what the coordinator reads --------------------------------------------------------------------------

    def result(self, ep: int, did: int) -> None:
        """A RESULT from ``ep``: the router returns a credit if it was that endpoint's dispatch."""
        a = self._agents.get(ep)
        if a is not None:
            a.held.discard(did)

    def closed(self, ep: int) -> None:
        self._agents.pop(ep, None)

    def check(self, flat: list[int]) -> list[tuple[int, str]]:
        """A DISPATCHED notice (``[endpoint, dispatch_id, ...]``): the dispatches that diverge, with why."""
        out = []
        dispatched = self.dispatched
        for i in range(0, len(flat) - 1, 2):
            problem = dispatched(flat[i], flat[i + 1])
            if problem is not None:
                out.append((flat[i + 1], problem))
        return out

    def dispatched(self, ep: int, did: int) -> str | None:
        """Check the native router's dispatch of ``did`` to ``ep`` and apply it; a description of the
        divergence, or None when the Python router could have made the same decision."""
        self.checked += 1
        qid = self._queue_of.pop(did, None)
        a = self._agents.get(ep)
        if qid is None:
            self.divergences["task"] += 1
            return f"dispatch {did} to endpoint {ep}: no such task queued (never pushed, revoked or handed out)"
        q = self._queues[qid]
        prio = q.pending.pop(did)
        problem = None
        if a is None or a.queue != qid:
            self.divergences["agent"] += 1
            problem = f"dispatch {did} to endpoint {ep}: that endpoint does not serve work queue {qid}"
        elif len(a.held) >= a.credit:
            self.divergences["agent"] += 1
            problem = f"dispatch {did} to endpoint {ep}: it holds {len(a.held)} of {a.credit} credit(s)"
        else:
            fifos, pending = q.fifos, q.pending
            for p in range(prio + 1):  # q.head(p), inlined: this runs for every task dispatched
                fifo = fifos[p]
                while fifo and fifo[0] not in pending:
                    fifo.popleft()
                head = fifo[0] if fifo else None
                if head is not None and head < did:
                    self.divergences["order"] += 1
                    problem = (f"dispatch {did} (priority {prio}) went before {head} (priority {p}), pushed "
                               "earlier to the same work queue")
                    break
        if a is not None:
            a.held.add(did)  # the router counts it against the credit, divergence or not
        return problem
