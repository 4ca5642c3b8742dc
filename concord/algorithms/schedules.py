"""Pipeline schedules as pure functions, and a simulator that runs them against each other.

A schedule is, for every stage, the ordered list of what that stage does in one batch:
``forward``/``backward`` of micro-batch *i*, and the point-to-point messages around them
(``recv_act`` / ``send_act`` towards the next stage, ``recv_grad`` / ``send_grad`` towards the
previous one). The runtime (``concord.strategies.pipeline``) executes a stage's list as is.

* **GPipe**: all forwards, then all backwards (every stage holds all M micro-batches).
* **1F1B** (PipeDream-Flush): stage *s* runs ``P - s - 1`` warm-up forwards, then alternates
  one forward and one backward, then drains; it holds at most ``P - s`` micro-batches.

Sends are asynchronous (the sender does not wait for the receiver) and receives block; the
simulator models exactly that, checks every dependency, raises ``DeadlockError`` when no stage
can move, and measures the bubble. Both schedules have the same ideal bubble,
``(P - 1) / (M + P - 1)`` of the time, when all stages take equally long.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

FORWARD = "forward"
BACKWARD = "backward"
SEND_ACT = "send_act"
RECV_ACT = "recv_act"
SEND_GRAD = "send_grad"
RECV_GRAD = "recv_grad"
COMPUTE = (FORWARD, BACKWARD)
SENDS = {SEND_ACT: RECV_ACT, SEND_GRAD: RECV_GRAD}


class ScheduleError(ValueError):
    """A schedule breaks a rule: a micro-batch missing or repeated, or a dependency violated."""


class DeadlockError(ScheduleError):
    """No stage can make progress: every unfinished stage waits for a message never sent."""


@dataclass(frozen=True)
class Action:
    """One step of a stage: ``op`` on micro-batch ``microbatch`` (``peer``: the other stage)."""

    op: str
    microbatch: int
    peer: int | None = None

    def __str__(self) -> str:
        short = {FORWARD: "F", BACKWARD: "B"}.get(self.op)
        if short:
            return f"{short}{self.microbatch}"
        return f"{self.op}{self.microbatch}@{self.peer}"


def _forward(stage: int, stages: int, mb: int) -> list[Action]:
    out = [] if stage == 0 else [Action(RECV_ACT, mb, stage - 1)]
    out.append(Action(FORWARD, mb))
    if stage < stages - 1:
        out.append(Action(SEND_ACT, mb, stage + 1))
    return out


def _backward(stage: int, stages: int, mb: int) -> list[Action]:
    out = [] if stage == stages - 1 else [Action(RECV_GRAD, mb, stage + 1)]
    out.append(Action(BACKWARD, mb))
    if stage > 0:
        out.append(Action(SEND_GRAD, mb, stage - 1))
    return out


def _check(stages: int, microbatches: int, stage: int) -> None:
    if stages < 1 or microbatches < 1:
        raise ValueError(f"need stages >= 1 and microbatches >= 1, got {stages}, {microbatches}")
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is outside 0..{stages - 1}")


def gpipe(stages: int, microbatches: int, stage: int) -> list[Action]:
    """GPipe: forward micro-batches 0..M-1, then backward them in the same order."""
    _check(stages, microbatches, stage)
    out: list[Action] = []
    for mb in range(microbatches):
        out += _forward(stage, stages, mb)
    for mb in range(microbatches):
        out += _backward(stage, stages, mb)
    return out


def one_f_one_b(stages: int, microbatches: int, stage: int) -> list[Action]:
    """1F1B: ``P - s - 1`` warm-up forwards, then one forward / one backward, then drain."""
    _check(stages, microbatches, stage)
    warmup = min(stages - stage - 1, microbatches)
    out: list[Action] = []
    for mb in range(warmup):
        out += _forward(stage, stages, mb)
    for i in range(microbatches - warmup):
        out += _forward(stage, stages, warmup + i)
        out += _backward(stage, stages, i)
    for mb in range(microbatches - warmup, microbatches):
        out += _backward(stage, stages, mb)
    return out


SCHEDULES: dict[str, Callable[[int, int, int], list[Action]]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
}


def build(name: str, stages: int, microbatches: int) -> list[list[Action]]:
    """Every stage's action list for schedule ``name`` (``gpipe`` or ``1f1b``)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    return [SCHEDULES[name](stages, microbatches, s) for s in range(stages)]


def theoretical_bubble(stages: int, microbatches: int) -> float:
    """Idle fraction of an ideal pipeline with equal stages: ``(P - 1) / (M + P - 1)``."""
    return (stages - 1) / (microbatches + stages - 1)


def validate(plan: Sequence[Sequence[Action]], microbatches: int) -> None:
    """Check each stage's list on its own: every micro-batch forward and backward exactly once,
    received before it is used, sent after it is made, backward after forward."""
    stages = len(plan)
    for s, actions in enumerate(plan):
        seen: dict[tuple[str, int], int] = {}
        for pos, act in enumerate(actions):
            if (act.op, act.microbatch) in seen:
                raise ScheduleError(
                    f"stage {s}: {act} appears twice "
                    f"(positions {seen[act.op, act.microbatch]} and {pos})"
                )
            seen[act.op, act.microbatch] = pos
        need = [FORWARD, BACKWARD]
        need += [RECV_ACT, SEND_GRAD] if s > 0 else []
        need += [SEND_ACT, RECV_GRAD] if s < stages - 1 else []
        for mb in range(microbatches):
            for op in need:
                if (op, mb) not in seen:
                    raise ScheduleError(f"stage {s}: micro-batch {mb} has no {op}")
            order = [op for op in (RECV_ACT, FORWARD, SEND_ACT) if op in need]
            order += [op for op in (RECV_GRAD, BACKWARD, SEND_GRAD) if op in need]
            pos = [seen[op, mb] for op in order]
            if pos != sorted(pos):
                raise ScheduleError(f"stage {s}: micro-batch {mb} must run {' < '.join(order)}")
        extra = len(actions) - len(need) * microbatches
        if extra:
            raise ScheduleError(f"stage {s}: {extra} action(s) for unknown micro-batches")


@dataclass(frozen=True)
class Span:
    """One compute action as simulated: ``op`` of ``microbatch`` from ``start`` to ``end``."""

    op: str
    microbatch: int
    start: float
    end: float


@dataclass(frozen=True)
class Simulation:
    """Result of ``simulate``: timeline per stage, makespan, bubble and peak in-flight counts."""

    timeline: list[list[Span]]
    makespan: float
    busy: list[float]
    bubble: float
    peak_in_flight: list[int]


def _durations(value: float | Sequence[float], stages: int, name: str) -> list[float]:
    out = [float(value)] * stages if isinstance(value, int | float) else [float(v) for v in value]
    if len(out) != stages or any(v < 0 for v in out):
        raise ValueError(f"{name} must be one number or {stages} non-negative numbers, got {value}")
    return out


def simulate(
    plan: Sequence[Sequence[Action]],
    microbatches: int,
    forward_time: float | Sequence[float] = 1.0,
    backward_time: float | Sequence[float] = 2.0,
    comm_time: float = 0.0,
) -> Simulation:
    """Execute all stages' lists against each other in one process.

    Sends are buffered (the sender goes on), a receive waits for the message, which must be the
    next one on its (sender, receiver, kind) channel. Raises ``ScheduleError`` when a rule is
    broken and ``DeadlockError`` (naming each stuck stage and what it waits for) when no stage
    can move. Times are per stage (one number or one per stage); the result is deterministic.
    """
    validate(plan, microbatches)
    stages = len(plan)
    run = _Run(
        plan,
        _durations(forward_time, stages, "forward_time"),
        _durations(backward_time, stages, "backward_time"),
        comm_time,
    )
    while any(run.pos[s] < len(plan[s]) for s in range(stages)):
        moved = [run.advance(s) for s in range(stages)]
        if not any(moved):
            stuck = [
                f"stage {s} at {plan[s][p]}" for s, p in enumerate(run.pos) if p < len(plan[s])
            ]
            raise DeadlockError(f"deadlock: {'; '.join(stuck)} wait(s) for messages never sent")
    _check_dependencies(run.timeline)
    makespan = max(run.clock)
    busy = [sum(span.end - span.start for span in spans) for spans in run.timeline]
    bubble = 1 - sum(busy) / (stages * makespan) if makespan > 0 else 0.0
    return Simulation(run.timeline, makespan, busy, bubble, run.peak)


class _Run:
    """The state of a simulation: per-stage position and clock, and the message channels."""

    def __init__(
        self, plan: Sequence[Sequence[Action]], fwd: list[float], bwd: list[float], comm: float
    ) -> None:
        self.plan, self.fwd, self.bwd, self.comm = plan, fwd, bwd, comm
        stages = len(plan)
        self.channels: dict[tuple[int, int, str], deque[tuple[int, float]]] = {}
        self.pos, self.clock = [0] * stages, [0.0] * stages
        self.timeline: list[list[Span]] = [[] for _ in range(stages)]
        self.in_flight, self.peak = [0] * stages, [0] * stages

    def advance(self, s: int) -> bool:
        """Run stage ``s`` until it waits for a message or ends; True if it moved."""
        start_pos = self.pos[s]
        while self.pos[s] < len(self.plan[s]):
            act = self.plan[s][self.pos[s]]
            if act.op in SENDS:
                queue = self.channels.setdefault((s, act.peer, SENDS[act.op]), deque())
                queue.append((act.microbatch, self.clock[s] + self.comm))
            elif act.op in (RECV_ACT, RECV_GRAD):
                queue = self.channels.get((act.peer, s, act.op))
                if not queue:
                    break
                mb, ready = queue.popleft()
                if mb != act.microbatch:
                    raise ScheduleError(
                        f"stage {s} expects {act} but stage {act.peer} sent micro-batch "
                        f"{mb} first on that channel"
                    )
                self.clock[s] = max(self.clock[s], ready)
            else:
                start = self.clock[s]
                self.clock[s] += self.fwd[s] if act.op == FORWARD else self.bwd[s]
                self.timeline[s].append(Span(act.op, act.microbatch, start, self.clock[s]))
                self.in_flight[s] += 1 if act.op == FORWARD else -1
                self.peak[s] = max(self.peak[s], self.in_flight[s])
            self.pos[s] += 1
        return self.pos[s] > start_pos


def _check_dependencies(timeline: list[list[Span]]) -> None:
    """Forward on s after forward on s-1; backward on s after backward on s+1 (and forward)."""
    ends = {(s, sp.op, sp.microbatch): sp.end for s, spans in enumerate(timeline) for sp in spans}
    last = len(timeline) - 1
    for s, spans in enumerate(timeline):
        for sp in spans:
            if sp.op == FORWARD:
                before = (s - 1, FORWARD, sp.microbatch) if s > 0 else None
            else:
                before = (
                    (s + 1, BACKWARD, sp.microbatch) if s < last else (s, FORWARD, sp.microbatch)
                )
            if before is not None and sp.start < ends[before]:
                raise ScheduleError(
                    f"stage {s} starts {sp.op} {sp.microbatch} before {before} ended"
                )
