"""Prometheus metrics of a server: one registry per server (tests build several), fed by the batcher's
observer hooks and by the HTTP middleware."""

from __future__ import annotations

from ..errors import BackendError
from .batching import Batcher, BatchObserver

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
except ImportError as _e:  # pragma: no cover - depends on the install
    raise BackendError(f'`aptp serve` needs prometheus-client ({_e}): pip install "aptp[serve]"') from None

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics(BatchObserver):
    """Prometheus metrics of one server (its own registry, so tests can build several)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_open_fds, CPU seconds (Linux)
        self.in_flight = Gauge("aptp_in_flight_requests", "HTTP requests being answered, by endpoint", ["endpoint"],
                               registry=r)
        self.requests = Counter("aptp_requests_total", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=r)
        self.request_seconds = Histogram("aptp_request_seconds", "HTTP request duration", ["endpoint"],
                                         buckets=SECONDS_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram("aptp_queue_wait_seconds", "submission to an image's first UNet call",
                                    ["expert"], buckets=SECONDS_BUCKETS, registry=r)
        self.queued = Gauge("aptp_queued_images", "images waiting to start", ["expert"], registry=r)
        self.active = Gauge("aptp_active_images", "images being denoised", ["expert"], registry=r)
        self.batch_size = Histogram("aptp_batch_size_images", "images per UNet call", ["expert"],
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.unet_seconds = Histogram("aptp_unet_call_seconds", "duration of one UNet call", ["expert"],
                                      buckets=SECONDS_BUCKETS, registry=r)
        self.images = Counter("aptp_images_total", "images generated", ["expert"], registry=r)
        self.rejections = Counter("aptp_rejections_total", "requests refused at admission", ["reason"], registry=r)
        self.cancellations = Counter("aptp_cancellations_total", "requests dropped after admission", ["reason"],
                                     registry=r)
        self.release_seconds = Histogram("aptp_cancel_release_seconds",
                                         "drop of a request to its images leaving the queue or their batch",
                                         ["reason"], buckets=SECONDS_BUCKETS, registry=r)
        self.release_calls = Histogram("aptp_cancel_release_unet_calls",
                                       "UNet calls including an image that ended after its request was dropped",
                                       ["reason"], buckets=(0, 1, 2, 5), registry=r)
        self.ready = Gauge("aptp_ready", "1 when ready to serve", registry=r)
        self.routed = Counter("aptp_routed_prompts_total", "prompts run through the router (/v1/route)", registry=r)

    def queue_wait(self, expert, seconds):
        self.queue_wait_seconds.labels(str(expert)).observe(seconds)

    def unet_call(self, expert, images, seconds):
        self.batch_size.labels(str(expert)).observe(images)
        self.unet_seconds.labels(str(expert)).observe(seconds)

    def image_done(self, expert):
        self.images.labels(str(expert)).inc()

    def rejected(self, reason):
        self.rejections.labels(reason).inc()

    def cancelled(self, reason):
        self.cancellations.labels(reason).inc()

    def released(self, reason, seconds, calls_after):
        self.release_seconds.labels(reason).observe(seconds)
        self.release_calls.labels(reason).observe(calls_after)

    def refresh(self, batcher: Batcher) -> None:
        stats = batcher.stats()
        for e in batcher.experts:
            self.queued.labels(str(e)).set(stats["queued"][e])
            self.active.labels(str(e)).set(stats["active"][e])
        self.ready.set(1 if stats["ready"] and stats["accepting"] else 0)
