"""The scheduling core of `aptp serve`: per-expert queues, worker threads sharing one `Runtime`,
request-level and step-level batching, bounded admission, deadlines, cancellation and draining.
No HTTP here: the server (engines/server.py) is one client of it, a Ray Serve deployment could be another.

    rt = Runtime.load("export/NAME")
    with Batcher(rt, ServeConfig(batching="step")) as b:     # starts the worker threads
        b.warm_up()                                           # every session runs once
        ticket = b.submit("a red circle", n=2, seed=1)        # routes, encodes, queues 2 images
        results = ticket.result(timeout=60)                   # [ImageResult] with seeds 1 and 2

Vocabulary. A *task* is one image to make (a request with n images makes n tasks, seeds seed, seed+1,
...). Waiting tasks sit in their expert's FIFO queue. A *lane* is a set of tasks of one expert that
denoise together: one tick = one UNet call over all of them (`engines.stepping.unet_step`, every
image with its own scheduler and timestep). A worker thread owns one lane at a time, so up to
`workers` UNet calls run at once (of one expert or of several); sessions are shared.

Policies (`ServeConfig.batching`):
- "request": a worker takes up to `max_batch` waiting tasks of one expert, once `max_batch` are
  waiting or the oldest has waited `max_wait_ms`, and runs that lane to its end; nothing joins it.
- "step": a worker returns its lane after every tick; at each step boundary a lane admits waiting
  tasks of its expert, and each image leaves the lane when its own steps are done. Which lane a free
  worker ticks next: first one that can admit waiting images (oldest waiting first), so a new
  request waits about one UNet call before its first step; otherwise the running lane with the least
  remaining work, aged: key = remaining UNet calls of its longest image - calls' worth of time its
  oldest image has waited (ties: oldest first). Without other work this is oldest first, close to
  run-to-completion; a short request is not held behind a long one (of its expert or another), and a
  long one waits at most about its own remaining calls. Ticking running lanes round-robin instead
  (processor sharing) made every request finish late: at Poisson 0.5x capacity on the 8-expert demo
  export, p50 latency was 6x request policy's (docs/serving.md).

In the step policy at most `workers * max_batch` images are in lanes at once; the others wait in
their queue (and count against its bound). An expert below its fair share of that cap (the cap divided by
the experts with work) may still open a lane, so a light request for an idle expert starts at the next
step boundary however long another expert's backlog is (no expert passes its share that way). Lanes of
one expert are kept about the same size, ceil(images of the expert / workers) (at most `max_batch`): on
a CPU, where a larger batch barely lowers the cost per image, that spreads work over every worker; with one worker (a GPU) it is one lane of up to `max_batch` per expert.

Every image is bitwise the image `Runtime.generate` gives for the same prompt, seed and settings
(see engines/stepping.py for the condition). Admission is bounded in images: more than
`max_queue_images` waiting overall, or `expert_queue_limit` for one expert, raises UnavailableError
at once (an HTTP 503 with Retry-After). A ticket past its deadline leaves the queue (and its lane at
the next step boundary) and fails with DeadlineExceededError; `Ticket.cancel()` frees its images the
same way. `drain()` stops admission and waits for the work already admitted.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
import uuid
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from ..conditioning import TextCondition
from ..denoise import initial_noise
from ..errors import (
    DeadlineExceededError,
    EngineError,
    ParamError,
    PromptError,
    RequestCancelledError,
    UnavailableError,
)
from ..request import GenerationParams
from ..validation import is_int
from ..runtime import Runtime
from ..schedulers import scheduler_name
from .config import ServeConfig
from ..stepping import ImageState, unet_step
from ..tokenization import clean_prompts

WARM_UP_PROMPT = "warm up"


@dataclass
class ImageResult:
    """One finished image and what made it (times in seconds from the request's submission)."""

    image: object  # PIL image
    index: int  # position in the request (seed = first seed + index)
    expert: int | str
    seed: int
    queued_s: float  # submission -> start of its first UNet call
    seconds: float  # submission -> decoded
    unet_calls: int


class BatchObserver:
    """Hooks the core calls (from worker threads) so a server can keep metrics; all no-ops here."""

    def queue_wait(self, expert, seconds: float) -> None:
        """An image started its first UNet call `seconds` after its request was submitted."""

    def unet_call(self, expert, images: int, seconds: float) -> None:
        """One UNet call over `images` images took `seconds`."""

    def image_done(self, expert) -> None:
        """An image was decoded and handed to its request."""

    def routed(self, prompts: int, endpoint: str = "/v1/images/generations") -> None:
        """`prompts` prompts went through the router (for generation, or for /v1/route)."""

    def rejected(self, reason: str) -> None:
        """A request was refused at admission ("queue_full", "expert_queue_full", "draining")."""

    def cancelled(self, reason: str) -> None:
        """A request was dropped ("disconnect", "deadline", "shutdown", "error")."""

    def released(self, reason: str, seconds: float, calls_after: int) -> None:
        """An image of a dropped request left the queue or its lane `seconds` after the drop;
        `calls_after` UNet calls that included it ended after the drop (0, or 1 for the call in flight)."""


class Ticket:
    """A submitted request: n images of one prompt routed to one expert. Thread-safe.

    `future` (concurrent.futures.Future) resolves to the list of ImageResult in seed order, or to
    the error that ended it (DeadlineExceededError, RequestCancelledError, EngineError)."""

    def __init__(self, batcher: Batcher, request_id: str, prompt: str, expert, seeds: list[int],
                 submitted: float, deadline: float):
        self.request_id = request_id
        self.prompt = prompt
        self.expert = expert
        self.seeds = seeds
        self.submitted = submitted
        self.deadline = deadline
        self.future: Future = Future()
        self.results: list[ImageResult | None] = [None] * len(seeds)
        self.closed: str | None = None  # None while running; "done" or the reason it was dropped
        self.closed_at: float | None = None
        self._batcher = batcher

    @property
    def n(self) -> int:
        return len(self.seeds)

    def cancel(self, reason: str = "disconnect") -> bool:
        """Drop the request: queued images leave at once, running ones at the next step boundary.
        Returns False if it had already finished or been dropped."""
        return self._batcher._close(self, reason, RequestCancelledError(f"request {self.request_id}: {reason}"))

    def result(self, timeout: float | None = None) -> list[ImageResult]:
        """Block for the images (raises the request's error, or TimeoutError after `timeout` s)."""
        return self.future.result(timeout)


class _Task:
    __slots__ = ("ticket", "index", "seed", "state", "arrived", "started", "cost", "calls", "calls_after")

    def __init__(self, ticket: Ticket, index: int, state: ImageState, arrived: float):
        self.ticket = ticket
        self.index = index
        self.seed = ticket.seeds[index]
        self.state = state
        self.arrived = arrived
        self.started: float | None = None
        self.cost = 0.0  # worker-seconds spent on it (its share of each UNet call)
        self.calls = 0
        self.calls_after = 0  # UNet calls that ended after its ticket was dropped


class _Lane:
    __slots__ = ("expert", "tasks", "busy", "served")

    def __init__(self, expert, served: float):
        self.expert = expert
        self.tasks: list[_Task] = []
        self.busy = False
        self.served = served


class Batcher:
    """Per-expert queues and worker threads over one Runtime (see the module doc).

    Args:
        runtime: a loaded Runtime (shared by the workers).
        config: ServeConfig (workers, batching, max_batch, max_wait_ms, queue limits, timeout_s,
            max_n, max_steps, default_steps, default_guidance_scale are used here).
        observer: BatchObserver receiving metrics events (called from worker threads).
        experts: serve only these experts (ids, or "dense"); default all of the export's. A batcher of
            one expert (a Ray Serve expert replica, engines/ray_serve.py) is given each request's text
            context by its caller: see `submit(context=, uncond=)` and `warm_up(context=)`.
    """

    def __init__(self, runtime: Runtime, config: ServeConfig | None = None, observer: BatchObserver | None = None,
                 experts: list | None = None):
        self.runtime = runtime
        self.config = (config or ServeConfig()).for_export(runtime.manifest)
        self.observer = observer or BatchObserver()
        m = runtime.manifest
        self.experts: list = [e.id for e in m.experts] + (["dense"] if m.dense is not None else [])
        if experts is not None:
            bad = [e for e in experts if e not in self.experts]
            if bad or not experts:
                raise EngineError(f"experts: {bad or experts!r} not served by this export (it has {self.experts})")
            self.experts = list(experts)
        self._shape = (m.in_channels, *m.sample_size)
        self._cond = threading.Condition()
        self._queues: dict = {e: deque() for e in self.experts}
        self._queued = 0
        self._lanes: list[_Lane] = []
        self._deadlines: list = []  # heap of (deadline, seq, weakref to ticket)
        self._seq = itertools.count()
        self._accepting = True
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._step_cost_s: float | None = None  # EWMA of worker-seconds per image and denoising step
        self._tick_s: float | None = None  # EWMA of one UNet call's seconds
        self.ready = False
        self.image_size: tuple[int, int] | None = None  # (width, height) of the images, known after warm_up

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Batcher:
        """Start the worker threads and the deadline reaper (idempotent)."""
        with self._cond:
            if self._threads:
                return self
            for i in range(self.config.workers):
                self._threads.append(threading.Thread(target=self._worker, name=f"aptp-worker-{i}", daemon=True))
            self._threads.append(threading.Thread(target=self._reaper, name="aptp-deadlines", daemon=True))
        for t in self._threads:
            t.start()
        return self

    def __enter__(self) -> Batcher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def warm_up(self, context=None) -> None:
        """Run every session once (router, text encoder, each expert's and the dense UNet, VAE decoder),
        then mark the batcher ready. Files were verified by Runtime.load. Given a text `context`
        [1, text_len, hidden] (e.g. the unconditional one), the router and text encoder are skipped."""
        rt = self.runtime
        if context is None:
            rt.route([WARM_UP_PROMPT])
            cond = rt.condition([WARM_UP_PROMPT])
            uncond = rt.uncond()
        else:
            cond = uncond = TextCondition.of(context)
        sched = scheduler_name(rt.manifest.scheduler.name)
        params = GenerationParams(steps=1, guidance_scale=self.config.default_guidance_scale)
        last = None
        for e in self.experts:
            state = self._state(0, cond, uncond, sched, params)
            unet_step(rt.unet(e), [state])
            last = state
        img = self._decode([last])[0]
        self.image_size = img.size
        self.ready = True

    def alive(self) -> str | None:
        """None while every started worker and the deadline reaper run, else what died (for /healthz)."""
        dead = [t.name for t in self._threads if not t.is_alive()]
        return None if not dead or self._stopping else f"thread(s) {', '.join(dead)} stopped"

    def drain(self, timeout: float) -> bool:
        """Stop admitting (new submissions raise UnavailableError "draining") and wait up to `timeout`
        seconds for the admitted work to finish. Returns True if nothing is left."""
        end = time.monotonic() + max(0.0, timeout)
        with self._cond:
            self._accepting = False
            self._cond.notify_all()  # request policy: stop waiting for batches to fill
            while self._queued or self._lanes:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return not (self._queued or self._lanes)

    def close(self, drain_timeout: float = 0.0) -> None:
        """Drain for up to `drain_timeout` s, drop what is left ("shutdown"), stop the threads."""
        self.drain(drain_timeout)
        with self._cond:
            self._stopping = True
            open_tickets = {t.ticket for q in self._queues.values() for t in q}
            open_tickets |= {t.ticket for lane in self._lanes for t in lane.tasks}
            self._cond.notify_all()
        for ticket in open_tickets:
            ticket.cancel("shutdown")
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=30)
        self.ready = False

    @property
    def accepting(self) -> bool:
        return self._accepting and not self._stopping

    def stats(self) -> dict:
        """Queued and active images per expert, lanes, and whether it is accepting work."""
        with self._cond:
            active = {e: 0 for e in self.experts}
            for lane in self._lanes:
                active[lane.expert] += len(lane.tasks)
            return {"queued": {e: len(q) for e, q in self._queues.items()}, "active": active,
                    "lanes": len(self._lanes), "accepting": self.accepting, "ready": self.ready}

    def retry_after_s(self) -> int:
        """A client's wait before retrying: the waiting images' steps, at the measured cost per image and step,
        spread over the workers (>= 1 s)."""
        with self._cond:
            return self._retry_after()

    def _retry_after(self) -> int:
        steps = sum(t.state.total - t.state.index for q in self._queues.values() for t in q)
        return max(1, math.ceil(steps * (self._step_cost_s or 0.05) / self.config.workers))

    # -- submission ------------------------------------------------------------------------------
    def submit(self, prompt: str, n: int = 1, params: GenerationParams | None = None, *,
               expert: int | str | None = None, timeout_s: float | None = None, request_id: str | None = None,
               context=None, uncond=None, **settings) -> Ticket:
        """Validate, route (unless `expert` forces one: an id or "dense"), encode the prompt and queue
        `n` images with seeds seed, seed+1, .... The sampler settings are `params` (an
        engines.request.GenerationParams), or its fields as keyword `settings` (steps, guidance_scale,
        guidance_rescale, seed, scheduler; steps and guidance_scale default to the serve config's). Raises
        EngineError subclasses for bad input (ParamError.param names the field) and UnavailableError when
        the queue is full or draining. `context` (and `uncond`): the prompt's condition (a TextCondition,
        or a text context [1, text_len, hidden]) and the unconditional one, computed by the caller with
        Runtime.condition; then `expert` is required and neither the router nor the text encoder runs here."""
        cfg = self.config
        if not self.accepting:
            self.observer.rejected("draining")
            raise UnavailableError("the server is shutting down", "draining", 1.0)
        if not isinstance(prompt, str):
            raise PromptError(f"prompt: expected a string, got {type(prompt).__name__}")
        if len(prompt) > cfg.max_prompt_chars:
            raise PromptError(f"prompt: {len(prompt)} characters, more than the {cfg.max_prompt_chars} accepted")
        prompts = clean_prompts([prompt])
        n = _int_arg("n", n, 1, min(cfg.max_n, cfg.max_queue_images, cfg.expert_queue_limit))  # more never fits
        if params is None:
            settings = {"steps": cfg.default_steps, "guidance_scale": cfg.default_guidance_scale, **settings}
            if isinstance(settings.get("seed"), list):
                settings["seed"] = tuple(settings["seed"])
            params = GenerationParams(**settings)
        elif settings:
            raise EngineError(f"submit: give either params or {', '.join(settings)}, not both")
        params = params.within(cfg.max_steps)
        seeds = params.seeds(n)
        sched = params.scheduler_or(self.runtime.manifest.scheduler.name)
        self.runtime.new_scheduler(sched).set_timesteps(params.steps)  # validates steps
        if expert is not None:
            expert = self._check_expert(expert)
        with self._cond:
            self._check_room(n, None)  # cheap refusal before routing and encoding
        rt = self.runtime
        if context is not None:
            if expert is None:
                raise ParamError("expert: required when the text context is given", "model")
            e, cond = expert, TextCondition.of(context)
            uncond = rt.uncond() if uncond is None else TextCondition.of(uncond)
        else:
            e = expert
            if e is None:
                e = rt.route(prompts)[0]
                self.observer.routed(len(prompts))
            cond = rt.condition(prompts, clean=False)
            uncond = rt.uncond()
        now = time.monotonic()
        timeout = cfg.timeout_s if timeout_s is None else float(timeout_s)
        ticket = Ticket(self, request_id or uuid.uuid4().hex, prompts[0], e, seeds, now, now + timeout)
        tasks = [_Task(ticket, i, self._state(s, cond, uncond, sched, params), now) for i, s in enumerate(seeds)]
        with self._cond:
            if not self.accepting:
                self.observer.rejected("draining")
                raise UnavailableError("the server is shutting down", "draining", 1.0)
            self._check_room(n, e)
            self._queues[e].extend(tasks)
            self._queued += n
            heapq.heappush(self._deadlines, (ticket.deadline, next(self._seq), weakref.ref(ticket)))
            self._cond.notify_all()
        return ticket

    def _state(self, seed: int, cond, uncond, sched: str, params: GenerationParams) -> ImageState:
        """The denoising state of one image."""
        return ImageState(initial_noise([seed], self._shape), cond, uncond, self.runtime.new_scheduler(sched), params)

    def _check_expert(self, expert):
        if expert == "dense":
            if "dense" not in self.experts:
                raise ParamError("model: this export has no dense model (export with --with-dense)", "model")
            return "dense"
        if not is_int(expert) or int(expert) not in self.experts:
            ids = [e for e in self.experts if e != "dense"]
            raise ParamError(f"expert: {expert!r} is not an expert of this export (ids {ids[0]}..{ids[-1]})", "model")
        return int(expert)

    def _check_room(self, n: int, expert) -> None:
        cfg = self.config
        reason = None
        if self._queued + n > cfg.max_queue_images:
            reason, what = "queue_full", f"{self._queued} images are waiting (limit {cfg.max_queue_images})"
        elif expert is not None and len(self._queues[expert]) + n > cfg.expert_queue_limit:
            reason = "expert_queue_full"
            what = f"{len(self._queues[expert])} images are waiting for expert {expert} (limit {cfg.expert_queue_limit})"
        if reason:
            self.observer.rejected(reason)
            raise UnavailableError(f"the queue is full: {what}; retry later", reason, self._retry_after())

    # -- dropping requests -----------------------------------------------------------------------
    def _close(self, ticket: Ticket, reason: str, error: BaseException) -> bool:
        with self._cond:
            if ticket.closed is not None:
                return False
            ticket.closed, ticket.closed_at = reason, time.monotonic()
            q = self._queues[ticket.expert]
            mine = [t for t in q if t.ticket is ticket]
            if mine:
                self._queues[ticket.expert] = deque(t for t in q if t.ticket is not ticket)
                self._queued -= len(mine)
                for _ in mine:
                    self.observer.released(reason, 0.0, 0)
            for lane in self._lanes:
                if not lane.busy:
                    self._drop_closed(lane)
            self._cond.notify_all()
        self.observer.cancelled(reason)
        _set(ticket.future, error=error)
        return True

    def _drop_closed(self, lane: _Lane) -> None:
        """Remove tasks of dropped tickets from a lane that is between steps (lock held)."""
        keep = []
        now = time.monotonic()
        for t in lane.tasks:
            if t.ticket.closed is None:
                keep.append(t)
            else:
                self.observer.released(t.ticket.closed, now - t.ticket.closed_at, t.calls_after)
        lane.tasks = keep

    def _reaper(self) -> None:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                expired = []
                while self._deadlines and self._deadlines[0][0] <= now:
                    ticket = heapq.heappop(self._deadlines)[2]()
                    if ticket is not None and ticket.closed is None:
                        expired.append(ticket)
                if expired:
                    self._cond.release()
                    try:
                        for ticket in expired:
                            self._close(ticket, "deadline", DeadlineExceededError(
                                f"request {ticket.request_id}: deadline of {ticket.deadline - ticket.submitted:.1f} s "
                                f"passed before its images were done"))
                    finally:
                        self._cond.acquire()
                    continue
                while self._deadlines and (self._deadlines[0][2]() is None
                                           or self._deadlines[0][2]().closed is not None):
                    heapq.heappop(self._deadlines)  # finished or forgotten tickets need no reaping
                self._cond.wait(self._deadlines[0][0] - now if self._deadlines else None)

    # -- workers ---------------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            with self._cond:
                lane = self._acquire()
            if lane is None:
                return
            try:
                self._tick(lane)
                while self.config.batching == "request" and lane.tasks and not self._stopping:
                    self._tick(lane)
            except Exception as e:  # a backend failure fails the lane's requests, not the worker
                err = e if isinstance(e, EngineError) else EngineError(f"generation failed: {e}")
                for ticket in {t.ticket for t in lane.tasks}:
                    self._close(ticket, "error", err)
            with self._cond:
                self._drop_closed(lane)
                lane.busy = False
                lane.served = time.monotonic()
                if not lane.tasks:
                    self._lanes.remove(lane)
                self._cond.notify_all()

    def _acquire(self) -> _Lane | None:
        """Pick the next lane to tick, admitting waiting tasks into it (lock held; blocks)."""
        cfg = self.config
        workers = cfg.workers
        while True:
            if self._stopping:
                return None
            now = time.monotonic()
            best = None  # (key, lane or expert, take)
            wake = None
            # step policy: images in lanes are capped at workers * max_batch, so the rest really waits
            # in the (bounded) queue instead of slowing every admitted image down; but an expert below its
            # fair share of that cap (cap / experts with work) may admit beyond it, so one expert's backlog
            # never holds a light request of another expert behind it (head-of-line across experts)
            tick_s = self._tick_s or 0.05
            cap = workers * cfg.max_batch
            room = cap - sum(len(lane.tasks) for lane in self._lanes)
            working = {lane.expert for lane in self._lanes if lane.tasks} | {e for e in self.experts if self._queues[e]}
            share = max(1, cap // max(1, len(working)))
            rooms = {}
            for e in self.experts:
                q = self._queues[e]
                lanes = [lane for lane in self._lanes if lane.expert == e]
                rooms[e] = max(room, share - sum(len(lane.tasks) for lane in lanes))
                if cfg.batching == "step":
                    free = [lane for lane in lanes if not lane.busy]
                    if q and rooms[e] > 0:
                        active = sum(len(lane.tasks) for lane in lanes)
                        target = min(cfg.max_batch, math.ceil((len(q) + active) / workers))
                        for lane in free:
                            if len(lane.tasks) < target:
                                best = _better(best, (0, q[0].arrived), lane, target - len(lane.tasks))
                        if len(lanes) < workers:
                            best = _better(best, (0, q[0].arrived), e, target)
                    for lane in free:  # then running lanes: least remaining work first, aged (see the doc)
                        if lane.tasks:
                            remaining = max(t.state.total - t.state.index for t in lane.tasks)
                            waited = (now - min(t.arrived for t in lane.tasks)) / tick_s
                            best = _better(best, (1, remaining - waited, min(t.arrived for t in lane.tasks)),
                                           lane, 0)
                elif q:
                    ready_at = q[0].arrived + cfg.max_wait_ms / 1000.0
                    if len(q) >= cfg.max_batch or now >= ready_at or not self._accepting:
                        free_workers = max(1, workers - sum(1 for lane in self._lanes if lane.busy))
                        best = _better(best, (0, q[0].arrived), e,
                                       min(cfg.max_batch, math.ceil(len(q) / free_workers)))
                    else:
                        wake = ready_at if wake is None else min(wake, ready_at)
            if best is None:
                self._cond.wait(None if wake is None else max(0.0, wake - now))
                continue
            _, target, take = best
            if isinstance(target, _Lane):
                lane = target
            else:
                lane = _Lane(target, now)
                self._lanes.append(lane)
            q = self._queues[lane.expert]
            if cfg.batching == "step":
                take = min(take, max(0, rooms[lane.expert]))
            for _ in range(min(take, len(q))):
                lane.tasks.append(q.popleft())
                self._queued -= 1
            lane.busy = True
            if q:
                self._cond.notify_all()  # other workers may take the rest
            return lane

    def _tick(self, lane: _Lane) -> None:
        """One UNet call over the lane's tasks; finished images are decoded and handed over."""
        with self._cond:
            self._drop_closed(lane)
            tasks = list(lane.tasks)
        if not tasks:
            return
        e = lane.expert
        start = time.monotonic()
        for t in tasks:
            if t.started is None:
                t.started = start
                self.observer.queue_wait(e, start - t.ticket.submitted)
        unet_step(self.runtime.unet(e), [t.state for t in tasks])
        end = time.monotonic()
        self.observer.unet_call(e, len(tasks), end - start)
        self._tick_s = end - start if self._tick_s is None else 0.9 * self._tick_s + 0.1 * (end - start)
        for t in tasks:
            t.cost += (end - start) / len(tasks)
            t.calls += 1
            if t.ticket.closed is not None:
                t.calls_after += 1
        finished = [t for t in tasks if t.state.done and t.ticket.closed is None]
        good = [t for t in finished if t.state.finite()]
        images = self._decode([t.state for t in good]) if good else []
        done_at = time.monotonic()
        completed, failed = [], []
        with self._cond:
            for t in [t for t in tasks if t.state.done]:
                lane.tasks.remove(t)
            for t, img in zip(good, images, strict=True):
                ticket = t.ticket
                if ticket.closed is not None:
                    continue
                img.info["aptp_expert"] = str(e)
                ticket.results[t.index] = ImageResult(img, t.index, e, t.seed, t.started - ticket.submitted,
                                                      done_at - ticket.submitted, t.calls)
                self.observer.image_done(e)
                per_step = t.cost / max(1, t.calls)
                self._step_cost_s = per_step if self._step_cost_s is None else 0.8 * self._step_cost_s + 0.2 * per_step
                if all(r is not None for r in ticket.results):
                    ticket.closed, ticket.closed_at = "done", done_at
                    completed.append(ticket)
            for t in finished:
                if not t.state.finite() and t.ticket.closed is None:
                    failed.append(t.ticket)
        for ticket in completed:
            _set(ticket.future, result=list(ticket.results))
        for ticket in set(failed):
            self._close(ticket, "error", EngineError(
                "the denoising loop produced non-finite values (NaN/inf): the expert graph or its precision "
                "is broken for these inputs"))

    def _decode(self, states: list[ImageState]) -> list:
        """PIL images of finished states (decoded together, as Runtime decodes a batch)."""
        return self.runtime.decode(np.concatenate([s.latents for s in states]))


def _better(best, key, target, take):
    if take <= 0 and not isinstance(target, _Lane):
        return best
    if best is None or key < best[0]:
        return (key, target, take)
    return best


def _int_arg(name: str, value, lo: int, hi: int) -> int:
    if not is_int(value) or not lo <= value <= hi:
        raise ParamError(f"{name}: expected an integer from {lo} to {hi}, got {value!r}", name)
    return int(value)


def _set(future: Future, result=None, error: BaseException | None = None) -> None:
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except Exception:  # InvalidStateError: raced with another completion
        pass
