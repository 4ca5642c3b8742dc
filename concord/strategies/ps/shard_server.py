"""``ShardServer``: the request loop of one parameter-server shard (run by
:mod:`concord.strategies.ps.server`, the server process).

Operations (all authenticated, see :mod:`concord.comm.wire`): ``register`` (worker 0 sends
the initial pieces and the optimizer spec; others are checked against it), ``push`` (a
gradient, or a parameter change with push="delta", as one flat tensor per pack of the shard,
or, for a sparse gradient's one-piece pack, the rows it touched, see
:mod:`concord.algorithms.row_grads`; ``meta["absent"]`` lists the pieces without a gradient),
``pull``, ``stats``, ``state`` (the shard's optimizer state, see
:mod:`concord.algorithms.ps_state`), ``load_state`` (worker 0: parameters and optimizer state
from a checkpoint, before the first step; other workers wait for it) and ``goodbye``. Every
``push``/``pull``/``register``/``load_state`` is answered with ``params`` (step = the shard
version; one tensor per pack).

Sync rounds and the staleness clock are the pure cores of :mod:`concord.algorithms.ps_rules`;
the shard's tensors and optimizer live in :mod:`concord.strategies.ps.shard`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any

import torch

from concord.algorithms.ps_rules import StalenessClock, SyncAggregator
from concord.algorithms.ps_state import decode_state, encode_state
from concord.comm.server_channel import Request, ServerChannel
from concord.comm.wire import Message, WireError, error_message
from concord.errors import PeerTimeoutError
from concord.strategies.ps.config import ParameterServer
from concord.strategies.ps.norms import NormExchange, clip_by_global_norm
from concord.strategies.ps.shard import Shard

log = logging.getLogger("concord.ps.server")
STATS_EVERY = 30.0
_DROPPED_LOG = 1000


class ShardServer:
    """The request loop of one shard (single-threaded: every state change happens here)."""

    def __init__(
        self,
        channel: ServerChannel,
        rank: int,
        workers: int,
        timeout: float,
        exit_when_done: bool = True,
        norms: NormExchange | None = None,
    ) -> None:
        self.chan, self.rank, self.workers, self.timeout = channel, rank, workers, timeout
        self.exit_when_done = exit_when_done
        self.norms = norms  # with several servers: where max_grad_norm's parts meet
        self.shard = Shard(rank)
        self.strategy: ParameterServer | None = None
        self.sync: SyncAggregator | None = None
        self.clock: StalenessClock | None = None
        self.waiting: dict[int, bytes] = {}  # sync: workers whose gradient is in this round
        self.overflowed: set[int] = set()  # sync: ... whose loss scaler overflowed
        self.gated: dict[int, tuple[bytes, int]] = {}  # async: held replies (peer, version)
        self.pending: list[tuple[float, Request]] = []  # registrations before worker 0's
        self.loading: list[tuple[float, Request]] = []  # state loads before worker 0's
        self.loaded = False  # worker 0 loaded a checkpoint (opt.load_state_dict)
        self.done: set[int] = set()
        self.lost: set[int] = set()
        self.last_seen: dict[int, float] = {}
        self.round_started: float | None = None
        self.trackers: list[Any] = []
        self.staleness: Counter[int] = Counter()
        self.lead: Counter[int] = Counter()
        self.counts: Counter[str] = Counter()
        self.fatal: str | None = None
        self.started = time.monotonic()

    # -- the loop ---------------------------------------------------------------------------
    def serve(self) -> int:
        """Serve until every worker is done or lost (or, with ``exit_when_done`` False, until
        stopped); 1 if a sync step could not complete."""
        next_log = time.monotonic() + STATS_EVERY
        said_done = False
        while True:
            if self.finished() and not said_done:
                said_done = True
                if self.exit_when_done:
                    break
                self.log_stats()
                log.info("server %d: every worker is done; serving until stopped", self.rank)
            req = self.chan.poll(timeout=0.25)
            if req is not None:
                self.dispatch(req)
            self.check_deadlines(time.monotonic())
            if self.fatal:
                log.error("server %d: %s", self.rank, self.fatal)
                return 1
            if time.monotonic() > next_log:
                self.log_stats()
                next_log = time.monotonic() + STATS_EVERY
        self.log_stats()
        return 0

    def finished(self) -> bool:
        return (
            self.shard.registered
            and not self.pending
            and self.done | self.lost >= set(range(self.workers))
        )

    def dispatch(self, req: Request) -> None:
        handler = {
            "register": self.on_register,
            "push": self.on_push,
            "pull": self.on_pull,
            "stats": self.on_stats,
            "state": self.on_state,
            "load_state": self.on_load_state,
            "goodbye": self.on_goodbye,
        }.get(req.msg.op)
        try:
            if handler is None:
                raise WireError("op", f"unknown op {req.msg.op!r}")
            if not 0 <= req.msg.worker < self.workers:
                raise WireError(
                    "header", f"worker {req.msg.worker} is not in 0..{self.workers - 1}"
                )
            self.last_seen[req.msg.worker] = time.monotonic()
            handler(req)
        except (WireError, ValueError, TypeError) as exc:
            kind = getattr(exc, "kind", "request")
            self.chan.rejected[kind] += 1
            log.warning(
                "server %d: rejected %s from worker %d: %s",
                self.rank,
                req.msg.op,
                req.msg.worker,
                exc,
            )
            self.chan.reply(req.peer, error_message(kind, str(exc)))

    def reply_params(
        self,
        peers: bytes | list[bytes],
        grads: Mapping[str, torch.Tensor] | None = None,
        rows: Mapping[str, torch.Tensor] | None = None,
        since: int | None = None,
    ) -> None:
        """Send the shard to ``peers``: a copy of it, or, when every peer has lanes (the bytes
        are copied into them as they are sent), the live tensors, tracked so that the next
        update waits until zmq has read what did not fit. With ``grads`` (a finished sync
        round) send the live tensors, each reply part stepped with ``grads`` just before it is
        signed and sent (workers check and load part k while this server updates part k+1),
        tracked the same way; a pack that came as ``rows`` from every contributor and whose
        optimizer changes only those rows goes back as those rows (see
        :meth:`~concord.strategies.ps.shard.Shard.round_reply`). With ``since`` (async: every
        peer holds the shard as it was at that version or later) a sparse table's piece goes
        as the rows changed after it (:meth:`~concord.strategies.ps.shard.Shard.reply_since`)."""
        peers = [peers] if isinstance(peers, bytes) else peers
        if grads is None:
            live = all(self.chan.has_lanes(peer) for peer in peers)
            if since is None:
                tensors = self.shard.snapshot(copy=not live)
            else:
                tensors = self.shard.reply_since(since, copy=not live)
            msg = Message("params", step=self.shard.version, tensors=tensors)
            trackers = self.chan.reply_many(peers, msg, track=live)
            self.trackers.extend(t for t in trackers if t is not None)
            return
        version = self.shard.version + 1
        tensors, fill = self.shard.round_reply(rows or {})

        def step_part(part: Message) -> None:
            self.shard.apply_grads(grads, keys=self.shard.pieces_in(part.tensors))
            fill(part.tensors)

        msg = Message("params", step=version, tensors=tensors)
        trackers = self.chan.reply_many(peers, msg, track=True, before_part=step_part)
        self.shard.version = version
        self.trackers.extend(t for t in trackers if t is not None)

    # -- operations -------------------------------------------------------------------------
    def on_register(self, req: Request) -> None:
        msg = req.msg
        config = msg.meta.get("config")
        if not isinstance(config, dict) or config.get("workers") != self.workers:
            got = config.get("workers") if isinstance(config, dict) else config
            raise WireError(
                "config",
                f"worker {msg.worker} says the job has {got} workers but server {self.rank} "
                f"was started with WORLD_SIZE={self.workers}",
            )
        if self.shard.registered:
            self.shard.check_worker(msg.worker, config, msg.meta.get("params"))
            self.reply_params(req.peer)
        elif msg.worker == 0:
            self.strategy = _strategy(config)
            self.shard.register_first(
                config, msg.meta.get("params"), msg.meta.get("optimizer"), msg.tensors
            )
            self._start_mode(self.strategy)
            log.info(
                "server %d: %d pieces registered (%s)",
                self.rank,
                len(self.shard.values),
                self.strategy.name,
            )
            self.reply_params(req.peer)
            pending, self.pending = self.pending, []
            for _, waiting in pending:
                self.dispatch(waiting)
        else:  # kept past the next poll: no tensors (they may be views of a lane)
            self.pending.append((time.monotonic(), replace(req, msg=replace(msg, tensors={}))))

    def _start_mode(self, strategy: ParameterServer) -> None:
        if strategy.mode == "sync":
            self.sync = SyncAggregator(self.workers, strategy.backup_workers)
        else:
            self.clock = StalenessClock(range(self.workers), strategy.max_staleness)

    def on_push(self, req: Request) -> None:
        msg = self._registered(req)
        worker = msg.worker
        if worker in self.done:
            raise WireError("request", f"worker {worker} said goodbye and cannot push again")
        if worker in self.lost:
            self.lost.discard(worker)
            log.warning("server %d: lost worker %d is back", self.rank, worker)
        what = "delta" if self.shard.config.get("push") == "delta" else "gradient"
        packs = self.shard.check_push(msg.tensors, what)
        absent = self.shard.absent_pieces(msg.meta.get("absent"))
        staleness = self.shard.version - msg.step
        if staleness < 0:
            raise WireError(
                "request",
                f"worker {worker} pushed for version {msg.step} but server {self.rank} is at "
                f"version {self.shard.version}",
            )
        self.shard.set_hyperparameters(msg.meta.get("hp"))
        self.counts["pushes"] += 1
        self.staleness[staleness] += 1
        if self.sync is not None:
            self._sync_push(req, packs, absent)
        else:
            self._async_push(req, packs, absent)

    def _sync_push(self, req: Request, packs: Mapping[str, Any], absent: frozenset[str]) -> None:
        assert self.sync is not None
        status = self.sync.push(req.msg.worker, req.msg.step, packs, absent)
        if status == "late":
            self.counts["dropped"] += 1
            log.debug(
                "server %d: dropped late gradient of worker %d for step %d",
                self.rank,
                req.msg.worker,
                req.msg.step,
            )
            self.reply_params(req.peer)
            return
        self.waiting[req.msg.worker] = req.peer
        if req.msg.meta.get("overflow") is True:  # its loss scaler found inf/NaN
            self.overflowed.add(req.msg.worker)
        if self.round_started is None:
            self.round_started = time.monotonic()
        if status == "complete":
            self._finish_round()

    def _finish_round(self) -> None:
        assert self.sync is not None
        self._wait_trackers()
        result = self.sync.finish()
        self.counts["applied"] += 1
        self.round_started = None
        # a worker's loss scaler overflowed: no update this round (GradScaler skips the step)
        overflow = not self.overflowed.isdisjoint(result.contributors)
        self.overflowed.clear()
        self.counts["skipped"] += overflow
        grads = {} if overflow else self.shard.piece_grads(result.grads, result.absent)
        peers = [self.waiting.pop(w) for w in result.contributors]
        if self._clip(grads, result.step, peers):
            self.reply_params(peers, grads, {} if overflow else result.rows)

    def _clip(self, grads: dict[str, torch.Tensor], step: int, peers: list[bytes]) -> bool:
        """With ``max_grad_norm``, scale the round's averaged gradient as ``clip_grad_norm_``
        scales the whole model's (the norm spans every shard). False, with the job over and
        the waiting workers told why, if another server did not share its part in time."""
        limit = self.strategy.max_grad_norm if self.strategy is not None else None
        if limit is None:
            return True
        try:
            self.counts["clipped"] += clip_by_global_norm(grads, limit, step, self.norms) < 1
        except PeerTimeoutError as exc:
            self.fatal = f"sync step {step}: server {self.rank}: {exc}"
            for peer in peers:
                self.chan.reply(peer, error_message("timeout", self.fatal))
            return False
        return True

    def _wait_trackers(self) -> None:
        """Parameters are about to change in place: let zmq finish sending the last replies."""
        deadline = time.monotonic() + min(self.timeout, 10.0)
        for tracker in self.trackers:
            try:
                tracker.wait(max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - zmq.NotDone: a dead peer's reply; go on
                log.warning("server %d: a reply was still unsent after 10s", self.rank)
        self.trackers = []

    def _async_push(self, req: Request, packs: Mapping[str, Any], absent: frozenset[str]) -> None:
        assert self.clock is not None
        self._wait_trackers()  # replies may still be read from the live tensors
        if self.shard.config.get("push") == "delta":
            self.shard.apply_deltas(packs)
        else:
            self.shard.apply_grads(self.shard.piece_grads(packs, absent))
        self.shard.mark_changed(packs, absent)
        self.counts["applied"] += 1
        self.clock.tick(req.msg.worker)
        if not self.clock.may_proceed(req.msg.worker):
            self.counts["gate_waits"] += 1
        # the push's label is the version of the last reply this worker loaded: the reply
        # needs only the rows changed since (see Shard.reply_since)
        self.gated[req.msg.worker] = (req.peer, req.msg.step)
        self._release()

    def _release(self) -> None:
        """Answer every held push whose worker may now go on (lead <= max_staleness)."""
        assert self.clock is not None
        released = [w for w in self.gated if self.clock.may_proceed(w)]
        for worker in released:
            self.lead[self.clock.lead(worker)] += 1
        if released:
            held = [self.gated.pop(w) for w in released]
            self.reply_params([peer for peer, _ in held], since=min(v for _, v in held))

    def on_pull(self, req: Request) -> None:
        self._registered(req)
        self.reply_params(req.peer)

    def on_stats(self, req: Request) -> None:
        self.chan.reply(req.peer, Message("stats", meta=self.stats()))

    def on_state(self, req: Request) -> None:
        """The shard's optimizer state (``opt.state_dict()``), as :func:`encode_state` puts it."""
        self._registered(req)
        entries, tensors = encode_state(self.shard.export_state())
        msg = Message("state", step=self.shard.version, meta={"state": entries}, tensors=tensors)
        self.chan.reply(req.peer, msg)

    def on_load_state(self, req: Request) -> None:
        """``opt.load_state_dict()``: worker 0 sends its parameters and the shard's optimizer
        state; every worker (worker 0 too) is answered with the parameters once they are in."""
        msg = self._registered(req)
        if msg.worker != 0:
            if self.loaded:
                self.reply_params(req.peer)
            else:
                self.loading.append((time.monotonic(), replace(req, msg=replace(msg, tensors={}))))
            return
        early = list(self.sync.contributors) if self.sync is not None else []
        if self.shard.version or early:
            done = f"gradients of workers {early}" if early else f"{self.shard.version} updates"
            raise WireError(
                "request",
                f"load_state_dict must come before the first step, but server {self.rank} has "
                f"{done} already; call it on every worker before training",
            )
        packs = {k: t for k, t in msg.tensors.items() if k in self.shard.flats}
        self.shard.check_packs(packs, "parameter")
        states = decode_state(msg.meta.get("state"), msg.tensors, len(self.shard.metas))
        self._wait_trackers()  # replies may still be read from the live tensors
        self.shard.load_checkpoint(packs, states, msg.meta.get("hp"))
        self.loaded = True
        log.info("server %d: loaded the optimizer state and parameters of worker 0", self.rank)
        waiting, self.loading = self.loading, []
        self.reply_params([req.peer, *(r.peer for _, r in waiting)])

    def on_goodbye(self, req: Request) -> None:
        worker = req.msg.worker
        self.done.add(worker)
        self.chan.reply(req.peer, Message("bye"))
        self._forget(worker)

    def _forget(self, worker: int) -> None:
        """Stop waiting for ``worker`` (goodbye or lost)."""
        if self.sync is not None and self.sync.remove(worker):
            self._finish_round()
        if self.clock is not None:
            self.clock.remove(worker)
            self._release()

    def _registered(self, req: Request) -> Message:
        if not self.shard.registered:
            raise WireError("request", "worker 0 has not registered the parameters yet")
        return req.msg

    # -- deadlines --------------------------------------------------------------------------
    def check_deadlines(self, now: float) -> None:
        for waiting, what in ((self.pending, "register"), (self.loading, "load its checkpoint")):
            for since, req in list(waiting):
                if now - since > self.timeout:
                    waiting.remove((since, req))
                    self.chan.reply(
                        req.peer,
                        error_message(
                            "timeout",
                            f"server {self.rank}: worker 0 did not {what} within "
                            f"{self.timeout:g}s, so worker {req.msg.worker} cannot start",
                        ),
                    )
        if self.sync is not None and self.round_started is not None:
            if now - self.round_started > self.timeout:
                self._round_timeout()
        if self.clock is not None and (self.gated or self.done):
            for worker in list(self.clock.clock):  # (a held worker is waiting on us)
                silent = now - self.last_seen.get(worker, self.started)
                if worker not in self.gated and silent > self.timeout:
                    self.lost.add(worker)
                    log.warning(
                        "server %d: lost worker %d (silent for %gs); the others go on",
                        self.rank,
                        worker,
                        self.timeout,
                    )
                    self._forget(worker)

    def _round_timeout(self) -> None:
        assert self.sync is not None and self.strategy is not None
        missing, got = self.sync.missing(), list(self.sync.contributors)
        floor = self.strategy.min_workers
        if floor is not None and len(got) >= floor:
            log.warning(
                "server %d: step %d goes on with workers %s; lost %s after %gs",
                self.rank,
                self.sync.version,
                got,
                missing,
                self.timeout,
            )
            self.lost.update(missing)
            for worker in missing:
                self.sync.remove(worker)
            self._finish_round()
            return
        self.fatal = (
            f"sync step {self.sync.version}: worker(s) {missing} sent no gradient to server "
            f"{self.rank} within {self.timeout:g}s (got workers {got}); a worker died or hangs. "
            "ParameterServer(min_workers=m) would go on with the survivors"
        )
        for peer in self.waiting.values():
            self.chan.reply(peer, error_message("timeout", self.fatal, missing=missing))
        self.waiting = {}

    # -- stats ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Versions, staleness and lead histograms, bytes, dropped late gradients, CPU time."""
        dropped = self.sync.dropped[-_DROPPED_LOG:] if self.sync is not None else []
        lanes = self.chan.lane_bytes
        return {
            "server": self.rank,
            "strategy": self.strategy.name if self.strategy else None,
            "version": self.shard.version,
            "pushes": self.counts["pushes"],
            "applied": self.counts["applied"],
            "dropped": self.counts["dropped"],
            "dropped_log": [list(d) for d in dropped],
            "staleness": {str(k): v for k, v in sorted(self.staleness.items())},
            "lead": {str(k): v for k, v in sorted(self.lead.items())},
            "max_lead": max(self.lead, default=0),
            "gate_waits": self.counts["gate_waits"],
            "clipped": self.counts["clipped"],
            "skipped": self.counts["skipped"],
            "bytes_in": self.chan.bytes_in,
            "bytes_out": self.chan.bytes_out,
            "lane_bytes_in": lanes.received,
            "lane_bytes_out": lanes.sent,
            "lane_bytes_shared": lanes.shared,
            "local_messages_in": self.chan.local_messages[0],
            "local_messages_out": self.chan.local_messages[1],
            "rejected": dict(self.chan.rejected),
            "done": sorted(self.done),
            "lost": sorted(self.lost),
            "cpu_seconds": time.process_time(),  # this server process, all threads
        }

    def log_stats(self) -> None:
        s = self.stats()
        log.info(
            "server %d stats: version=%d pushes=%d dropped=%d clipped=%d skipped=%d staleness=%s "
            "lead=%s in=%.1fMB out=%.1fMB rejected=%s lost=%s",
            self.rank,
            s["version"],
            s["pushes"],
            s["dropped"],
            s["clipped"],
            s["skipped"],
            s["staleness"],
            s["lead"],
            s["bytes_in"] / 1e6,
            s["bytes_out"] / 1e6,
            s["rejected"],
            s["lost"],
        )


def _strategy(config: dict[str, Any]) -> ParameterServer:
    names = {f.name for f in fields(ParameterServer)}
    try:
        return ParameterServer(**{k: v for k, v in config.items() if k in names})
    except (TypeError, ValueError) as exc:
        raise WireError("config", f"bad ParameterServer settings {config}: {exc}") from None
