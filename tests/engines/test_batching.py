"""engines.serving.batching.Batcher on the tiny export: both policies give Runtime.generate's images bitwise,
also with mixed settings in one batch; admission is bounded; deadlines, cancellation and draining
free images at step boundaries."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from engines_export_fixture import ANCHORS, build_export

from engines import Runtime
from engines.serving import batching as batching_mod
from engines.serving.batching import Batcher, BatchObserver
from engines.errors import (
    DeadlineExceededError,
    EngineError,
    ParamError,
    RequestCancelledError,
    UnavailableError,
)
from engines.serving.config import ServeConfig
from engines.stepping import ImageState, unet_step

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [ANCHORS[0], ANCHORS[1], "a red circle", "the letter K above a square"]




@pytest.fixture(scope="module")
def rt():
    return Runtime.load(build_export("pixel").dir, threads=1)


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


class Gate:
    """Replaces unet_step so a test decides when each UNet call may run."""

    def __init__(self, monkeypatch):
        self.open = threading.Event()
        self.calls = 0
        self.entered = threading.Event()

        def gated(unet, states):
            self.entered.set()
            assert self.open.wait(30), "gate never opened"
            self.calls += 1
            unet_step(unet, states)

        monkeypatch.setattr(batching_mod, "unet_step", gated)


class Recorder(BatchObserver):
    def __init__(self):
        self.releases, self.cancels, self.rejects, self.batches = [], [], [], []

    def released(self, reason, seconds, calls_after):
        self.releases.append((reason, seconds, calls_after))

    def cancelled(self, reason):
        self.cancels.append(reason)

    def rejected(self, reason):
        self.rejects.append(reason)

    def unet_call(self, expert, images, seconds):
        self.batches.append((expert, images))


@pytest.mark.parametrize("policy", ["request", "step"])
def test_policies_give_runtime_images_bitwise(rt, policy):
    ref = {}
    for p in PROMPTS:
        for rescale in (0.0, 0.7):  # guidance_rescale (diffusers' rescale_noise_cfg) on half of the requests
            for s, im in zip((5, 6), rt.generate([p, p], steps=5, seed=5, guidance_rescale=rescale), strict=True):
                ref[(p, s, rescale)] = im
    assert not _same(ref[(PROMPTS[0], 5, 0.0)], ref[(PROMPTS[0], 5, 0.7)])  # the rescale changes the image
    with Batcher(rt, ServeConfig(batching=policy, workers=2, max_batch=3)) as b:
        b.warm_up()
        tickets = []
        for i, p in enumerate(PROMPTS * 2):  # staggered: requests join running batches (step policy)
            tickets.append((b.submit(p, n=2, seed=5, steps=5, guidance_rescale=0.7 * (i % 2)), 0.7 * (i % 2)))
            time.sleep(0.005 * i)
        for t, rescale in tickets:
            results = t.result(60)
            assert [r.seed for r in results] == [5, 6]
            assert [r.expert for r in results] == [rt.route([t.prompt])[0]] * 2
            assert all(_same(r.image, ref[(t.prompt, r.seed, rescale)]) for r in results)


def test_mixed_settings_share_a_step_batch(rt):
    """Images at different steps, step counts, guidance scales and schedulers in one UNet call."""
    settings = [dict(steps=3, guidance_scale=7.5, scheduler="ddim"), dict(steps=5, guidance_scale=1.0),
                dict(steps=4, guidance_scale=3.0, scheduler="euler"), dict(steps=6, guidance_scale=7.5, scheduler="pndm")]
    rec = Recorder()
    with Batcher(rt, ServeConfig(batching="step", workers=1, max_batch=8), rec) as b:
        tickets = [b.submit(ANCHORS[0], seed=10 + i, expert=0, **kw) for i, kw in enumerate(settings)]
        got = [t.result(60)[0].image for t in tickets]
    for i, (kw, img) in enumerate(zip(settings, got, strict=True)):
        assert _same(img, rt.generate(ANCHORS[0], seed=10 + i, expert=0, **kw)[0]), kw
    assert max(n for _, n in rec.batches) >= 2  # they really shared calls


def test_a_light_request_is_not_held_behind_another_experts_backlog(rt):
    """Two n=8, steps=100 requests fill every lane of expert 0 (workers * max_batch = 16 images); a steps=2
    request for expert 1 still starts at the next step boundary and finishes long before them."""
    rec = Recorder()
    with Batcher(rt, ServeConfig(batching="step", workers=2, max_batch=8, max_steps=100), rec) as b:
        heavy = [b.submit(ANCHORS[0], n=8, steps=100, expert=0, seed=s) for s in (1, 100)]
        while sum(n for e, n in rec.batches if e == 0) < 16:  # expert 0's lanes are full and running
            time.sleep(0.005)
        light = b.submit(ANCHORS[1], steps=2, expert=1)
        r = light.result(60)[0]
        assert not any(t.future.done() for t in heavy), "the light request waited for the heavy ones"
        calls_before = sum(1 for e, _ in rec.batches if e == 0)
        for t in heavy:
            t.cancel("test")
    assert r.unet_calls == 2 and (1, 1) in rec.batches
    assert calls_before < 60  # it finished while expert 0 had done well under its 2 x 100 calls


def test_step_policy_admits_at_step_boundaries(rt, monkeypatch):
    gate = Gate(monkeypatch)
    rec = Recorder()
    with Batcher(rt, ServeConfig(batching="step", workers=1, max_batch=4), rec) as b:
        first = b.submit(ANCHORS[0], steps=6, expert=0)
        assert gate.entered.wait(10)  # its first call is in flight
        second = b.submit(ANCHORS[0], steps=2, expert=0, seed=3)
        gate.open.set()
        r2 = second.result(30)[0]
        r1 = first.result(30)[0]
    assert r2.unet_calls == 2 and r1.unet_calls == 6
    assert (0, 2) in rec.batches  # the newcomer joined the running batch at the next step
    assert r2.seconds < r1.seconds  # and left it when its own steps were done


def test_queue_is_bounded_overall_and_per_expert(rt):
    rec = Recorder()
    b = Batcher(rt, ServeConfig(max_queue_images=5, max_queue_images_per_expert=3), rec)  # not started: all wait
    b.submit(ANCHORS[0], n=3, expert=0)
    with pytest.raises(UnavailableError) as e:
        b.submit(ANCHORS[0], n=1, expert=0)
    assert e.value.reason == "expert_queue_full" and e.value.retry_after_s >= 1
    b.submit(ANCHORS[1], n=2, expert=1)
    with pytest.raises(UnavailableError) as e:
        b.submit(ANCHORS[1], n=1, expert=1)
    assert e.value.reason == "queue_full"
    assert rec.rejects == ["expert_queue_full", "queue_full"]
    assert b.stats()["queued"] == {0: 3, 1: 2}


def test_bad_arguments_name_the_field(rt):
    b = Batcher(rt, ServeConfig(max_n=4, max_steps=10, default_steps=5))
    for kwargs, param in [(dict(n=5), "n"), (dict(steps=11), "steps"), (dict(guidance_scale=float("nan")), "guidance_scale"),
                          (dict(guidance_rescale=1.5), "guidance_rescale"), (dict(scheduler="nope"), "scheduler"),
                          (dict(expert=7), "model"), (dict(seed=-1), "seed")]:
        with pytest.raises(ParamError, match="expert" if param == "model" else param.split("_")[0]) as e:
            b.submit(ANCHORS[0], **kwargs)
        assert e.value.param == param
    with pytest.raises(EngineError, match="prompt"):
        b.submit("   ")


def test_deadline_drops_queued_and_running_images(rt, monkeypatch):
    gate = Gate(monkeypatch)
    rec = Recorder()
    with Batcher(rt, ServeConfig(batching="step", workers=1, max_batch=1), rec) as b:
        running = b.submit(ANCHORS[0], steps=20, expert=0, timeout_s=0.3)
        assert gate.entered.wait(10)
        queued = b.submit(ANCHORS[0], steps=20, expert=0, timeout_s=0.3)  # max_batch=1: it waits
        with pytest.raises(DeadlineExceededError):
            queued.result(5)
        assert b.stats()["queued"][0] == 0  # it left the queue at its deadline, nothing ran for it
        gate.open.set()
        with pytest.raises(DeadlineExceededError):
            running.result(5)
        assert b.drain(10)
    assert rec.cancels.count("deadline") == 2
    assert sorted(c for _, _, c in rec.releases) == [0, 1]  # the running one: only the call in flight


def test_cancel_frees_images_at_the_next_step(rt, monkeypatch):
    gate = Gate(monkeypatch)
    rec = Recorder()
    with Batcher(rt, ServeConfig(batching="request", workers=1), rec) as b:
        t = b.submit(ANCHORS[0], n=2, steps=50, expert=0)
        assert gate.entered.wait(10)
        assert t.cancel("disconnect") and not t.cancel("disconnect")
        with pytest.raises(RequestCancelledError):
            t.result(1)
        gate.open.set()
        assert b.drain(10)
        assert gate.calls == 1  # no UNet call started after the cancel
    assert [c for _, _, c in rec.releases] == [1, 1] and rec.cancels == ["disconnect"]


def test_drain_finishes_admitted_work_and_refuses_new(rt):
    with Batcher(rt, ServeConfig(batching="step", workers=2)) as b:
        tickets = [b.submit(p, steps=4) for p in PROMPTS]
        assert b.drain(30)
        assert all(len(t.result(0)) == 1 for t in tickets)
        with pytest.raises(UnavailableError) as e:
            b.submit(ANCHORS[0])
        assert e.value.reason == "draining"


def test_close_cancels_what_is_left(rt, monkeypatch):
    gate = Gate(monkeypatch)  # opened only after the drain gave up: nothing finishes in time
    b = Batcher(rt, ServeConfig(workers=1)).start()
    t = b.submit(ANCHORS[0], steps=3)
    threading.Timer(0.5, gate.open.set).start()
    b.close(drain_timeout=0.2)
    with pytest.raises(RequestCancelledError):
        t.result(1)


def test_stepping_matches_denoise_for_latent_exports():
    """The latent export (VAE decoder) through the Batcher: bitwise Runtime.generate too."""
    rt = Runtime.load(build_export("latent").dir, threads=1)
    ref = rt.generate([ANCHORS[1]] * 2, steps=3, seed=2)
    with Batcher(rt, ServeConfig(batching="step", workers=1)) as b:
        out = [r.image for r in b.submit(ANCHORS[1], n=2, steps=3, seed=2).result(60)]
    assert all(_same(a, c) for a, c in zip(ref, out, strict=True))


def test_unet_step_refuses_a_finished_image(rt):
    m = rt.manifest
    from engines.denoise import initial_noise
    from engines.request import GenerationParams
    from engines.schedulers import make_scheduler

    s = ImageState(initial_noise([0], (m.in_channels, *m.sample_size)), rt.encode_text(["x"]), rt.uncond(),
                   make_scheduler("ddim", m.scheduler.config), GenerationParams(steps=1, guidance_scale=7.5))
    unet_step(rt.unet(0), [s])
    assert s.done and s.finite()
    with pytest.raises(EngineError, match="finished"):
        unet_step(rt.unet(0), [s])
