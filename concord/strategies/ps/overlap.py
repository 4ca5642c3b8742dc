"""``ParameterServer(overlap=True)``: push during backward, pull during the next batch's loading.

A shard (the pieces one server holds) is the unit of overlap, as a bucket is for AllReduce:
the server protocol takes one push per worker, step and shard.

- **Push early.** Every trainable parameter has a post-accumulate-grad hook. In the backward
  pass that completes a step's gradients, a shard is pushed as soon as all its trainable
  parameters have their gradient; at the end of that backward the shards still waiting
  (parameters unused this step) are pushed too. ``step()`` pushes whatever was not pushed
  and waits only until every push is handed to its sender (the gradients are copied there, so
  ``zero_grad()`` right after ``step()`` is safe).
- **Pull ahead.** Each server's reply (the new parameters) is received by a background thread;
  ``step()`` returns before it comes. The model's next forward (a forward pre-hook on the
  model given to ``distribute``) waits for the replies and loads them, on the calling thread,
  with the job's timeout; the error names the server. ``synchronize()``, ``server_stats()``
  and ``close()`` load them too.
- **Gradient accumulation** stays exact by this rule: the early push happens in backward
  number K of a step, where K is the most backward passes seen in one earlier step (none in
  the first step: it pushes at ``step()``). A step with fewer passes pushes at ``step()``; a
  step with more than K raises :class:`~concord.errors.UsageError` at its (K+1)-th backward,
  because its gradients already left (use ``overlap=False`` for a growing accumulation count).

Threads: one sender/receiver thread per server owns that server's zmq socket (zmq sockets are
not thread-safe); jobs run in submission order, so replies pair with requests as without
overlap. Parameters and optimizer state change only on the calling thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch
from torch import nn

from concord.comm.channel import ClientChannel
from concord.comm.wire import Message
from concord.errors import PeerTimeoutError, UsageError
from concord.strategies.ps.client import PSOptimizer, _goodbye

log = logging.getLogger("concord.ps")


class ChannelThread:
    """The one thread that uses ``chan``: runs submitted jobs ``fn(chan)`` in order."""

    def __init__(self, chan: ClientChannel) -> None:
        self.chan = chan
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._serve, name=f"concord-ps-{chan.peer}", daemon=True
        )
        self._thread.start()

    def submit(self, fn: Callable[[ClientChannel], Any]) -> Future:
        """Queue ``fn(chan)``; its result (or exception) lands in the returned future."""
        future: Future = Future()
        self._jobs.put((fn, future))
        return future

    def _serve(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            fn, future = item
            try:
                future.set_result(fn(self.chan))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                future.set_exception(exc)

    def stop(self, timeout: float) -> bool:
        """Finish the queued jobs and end; True if the thread ended within ``timeout``."""
        self._jobs.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()


class OverlapPSOptimizer(PSOptimizer):
    """A :class:`PSOptimizer` that pushes from autograd hooks and pulls in the background."""

    def attach(self, model: nn.Module) -> None:
        """Start the channel threads and hook ``model`` and its parameters (after register)."""
        self._push_views = False  # step() returns before zmq read them: always copy
        self._threads = [ChannelThread(chan) for chan in self.channels]
        params = list({id(p): p for shard in self._slots for _, p, _ in shard}.values())
        index = {id(p): i for i, p in enumerate(params)}
        self._shards_of: list[list[int]] = [[] for _ in params]
        for s, slots in enumerate(self._slots):
            for _, param, _ in slots:
                if s not in self._shards_of[index[id(param)]]:
                    self._shards_of[index[id(param)]].append(s)
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        self._need = [
            sum(1 for i in trainable if s in self._shards_of[i]) for s in range(len(self._slots))
        ]
        ref = weakref.ref(self)
        handles = [
            params[i].register_post_accumulate_grad_hook(_grad_hook(ref, i)) for i in trainable
        ]
        handles.append(model.register_forward_pre_hook(_await_hook(ref)))
        handles.append(model.register_state_dict_pre_hook(_await_hook(ref)))
        self._k: int | None = None  # the most backward passes seen in one step
        self.early_pushes = 0  # shard pushes made during a backward pass
        self._replies: list[Future | None] = [None] * len(self.channels)
        self._new_step()
        self._finalizer.detach()
        self._finalizer = weakref.finalize(
            self, _shutdown, self._threads, self.channels, self.rank, handles, self.timeout
        )

    def _new_step(self) -> None:
        self._backwards = 0
        self._in_backward = False
        self._sent: list[Future | None] = [None] * len(self.channels)
        self._meta: dict[str, Any] | None = None
        self._reset_backward()

    def _reset_backward(self) -> None:
        self._seen = bytearray(len(self._shards_of))
        self._left = list(self._need)

    # -- autograd -------------------------------------------------------------------------
    def _on_grad(self, index: int) -> None:
        if not self._in_backward:
            self._begin_backward()
        if self._backwards != self._k:
            return
        if self._seen[index]:
            raise UsageError(
                f"parameter #{index} got a second gradient in one backward pass after its shard "
                "was pushed (a reentrant backward, e.g. activation checkpointing with "
                "use_reentrant=True); use use_reentrant=False or overlap=False"
            )
        self._seen[index] = 1
        for s in self._shards_of[index]:
            self._left[s] -= 1
            if self._left[s] == 0 and self._sent[s] is None:
                self._push(s)

    def _begin_backward(self) -> None:
        if any(f is not None for f in self._sent):
            raise UsageError(
                f"backward pass {self._backwards + 1} of step {self.steps} came after this "
                f"step's gradients were pushed (overlap=True pushes in backward pass {self._k}, "
                "the most seen in one step so far); call step() after as many backward passes "
                "as before, or use overlap=False for a growing accumulation count"
            )
        if any(f is not None for f in self._replies):
            raise UsageError(
                "a backward pass ran on parameters that are still being pulled: its forward did "
                "not go through the model given to concord.distribute() (whose forward waits "
                "for them); call that model, or use overlap=False"
            )
        self._in_backward = True
        self._backwards += 1
        torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        if self._backwards == self._k:
            for s in range(len(self.channels)):
                if self._sent[s] is None:
                    self._push(s)
        self._in_backward = False
        self._reset_backward()

    # -- push and pull --------------------------------------------------------------------
    def _push(self, s: int) -> None:
        if self._meta is None:
            self._meta = self._hp_meta()
        self.early_pushes += self._in_backward
        meta = self._meta
        awaiting = f"new parameters after a push (worker {self.rank})"
        timeout = 2 * self.timeout + 5

        def send(chan: ClientChannel) -> None:
            # packing copies the gradients, so .grad may change once step() saw this done;
            # the step label is still this step's (step() counts only after the sends), and
            # the pack buffer is free again (the last reply of this server came before)
            chan.send(self._push_message(s, meta, *self._grads(s)))

        self._sent[s] = self._threads[s].submit(send)
        self._replies[s] = self._threads[s].submit(lambda c: c.recv(awaiting, timeout))

    def step(self, closure: Any = None) -> None:
        """Push what backward did not push, wait until every push is sent; the new
        parameters arrive in the background (the next forward waits for them)."""
        if closure is not None:
            raise ValueError("concord optimizers do not take a closure; call backward() first")
        self._check_open()
        if getattr(self, "found_inf", None) is not None:  # (set by GradScaler.step(opt))
            raise UsageError(
                "ParameterServer(overlap=True) pushes gradients during backward, before a "
                "GradScaler unscales them; use overlap=False with torch.amp.GradScaler"
            )
        if self._backwards:
            self._k = max(self._k or 0, self._backwards)
        if not any(self._sent):  # no push yet: load the last replies (async labels need them)
            self._await_params()
        for s in range(len(self.channels)):
            if self._sent[s] is None:
                self._push(s)
        for s, sent in enumerate(self._sent):
            self._result(s, sent, "the push to be sent")
        self.steps += 1
        self._new_step()

    def _await_params(self) -> None:
        """Load the replies still on their way (called by the model's forward pre-hook)."""
        for s, reply in enumerate(self._replies):
            if reply is not None:
                self._replies[s] = None
                self._load(s, self._result(s, reply, "new parameters after a push"))

    def _result(self, s: int, future: Future | None, awaiting: str) -> Any:
        limit = 2 * self.timeout + 10  # the job's own recv times out first
        try:
            return future.result(timeout=limit) if future is not None else None
        except FutureTimeout:
            raise PeerTimeoutError(
                f"server {s} did not answer within {limit:g}s (awaiting {awaiting}, worker "
                f"{self.rank}); is it running? Raise the limit with CONCORD_TIMEOUT"
            ) from None

    def _requests(
        self, make: Callable[[int], Message], awaiting: str, timeout: float | None = None
    ) -> list[Message]:
        """Send ``make(s)`` to every server ``s`` through its thread (after loading the
        parameters still on their way), then wait for each reply."""
        self._check_open()
        self._await_params()
        futures = [
            t.submit(lambda c, s=s: c.request(make(s), awaiting, timeout))
            for s, t in enumerate(self._threads)
        ]
        return [self._result(s, f, awaiting) for s, f in enumerate(futures)]

    def synchronize(self) -> None:
        """Load the servers' latest parameters."""
        replies = self._requests(lambda s: Message("pull", worker=self.rank), "parameters (pull)")
        for s, reply in enumerate(replies):
            self._load(s, reply)

    def close(self) -> None:
        """Load the last parameters, then say goodbye (also done at exit)."""
        try:
            if self._finalizer.alive:
                self._await_params()
        finally:
            self._finalizer()


def _grad_hook(ref: weakref.ref, index: int) -> Callable[[torch.Tensor], None]:
    def hook(_param: torch.Tensor) -> None:
        opt = ref()
        if opt is not None and opt._finalizer.alive:
            opt._on_grad(index)

    return hook


def _await_hook(ref: weakref.ref) -> Callable[..., None]:
    """A forward (and state-dict) pre-hook that loads the parameters still on their way."""

    def hook(*_args: Any) -> None:
        opt = ref()
        if opt is not None and opt._finalizer.alive:
            opt._await_params()

    return hook


def _shutdown(
    threads: list[ChannelThread],
    channels: list[ClientChannel],
    rank: int,
    handles: list[Any],
    timeout: float,
) -> None:
    """Remove the hooks, end the channel threads, then say goodbye on the calling thread."""
    for handle in handles:
        handle.remove()
    done = []
    for thread, chan in zip(threads, channels):
        if thread.stop(2 * timeout + 10):
            done.append(chan)
        else:
            log.warning("worker %d: the thread of %s did not end; no goodbye", rank, chan.peer)
    _goodbye(done, rank)
