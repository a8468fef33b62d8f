"""Prometheus metrics of a server: one registry per server (tests build several), fed by the batcher's
observer hooks and by the HTTP middleware."""

from __future__ import annotations

from ..install import install_hint
import time

from ..errors import BackendError
from .batching import Batcher, BatchObserver

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.parser import text_string_to_metric_families
except ImportError as _e:  # pragma: no cover - depends on the install
    raise BackendError(f'`aptp serve` needs prometheus-client ({_e}): {install_hint("serve")}') from None

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
        self.heap_trims = Counter("aptp_heap_trim_released_bytes_total",
                                  "resident memory returned by the periodic malloc_trim", registry=r)
        self.python_blocks = Gauge("aptp_python_allocated_blocks",
                                   "live Python memory blocks at the last heap trim (flat unless Python objects "
                                   "leak)", registry=r)
        self.routed_prompts = Counter("aptp_routed_prompts_total", "prompts run through the router, by endpoint",
                                      ["endpoint"], registry=r)

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

    def routed(self, prompts: int, endpoint: str = "/v1/images/generations") -> None:
        self.routed_prompts.labels(endpoint).inc(prompts)

    def heap_trimmed(self, info: dict) -> None:
        """A HeapTrimmer round (engines.serving.memory)."""
        if info["rss_before"] is not None and info["rss_after"] is not None:
            self.heap_trims.inc(max(0, info["rss_before"] - info["rss_after"]))
        self.python_blocks.set(info["python_blocks"])


def replica_name(name: str) -> str:
    """aptp_active_images -> aptp_replica_active_images; process_open_fds -> aptp_replica_process_open_fds."""
    return "aptp_replica_" + (name[len("aptp_"):] if name.startswith("aptp_") else name)


class ReplicaMetrics:
    """A collector for the Ray ingress's registry: the last exposition each replica of each expert deployment
    gave (ExpertReplica.stats), renamed aptp_replica_* and labelled {deployment, replica}, so one scrape of the
    ingress shows the queues, UNet calls and memory of the replicas behind it. A replica not heard from for
    `stale_s` is dropped; aptp_replica_scrape_ok{deployment} is 0 when its last scrape failed or timed out."""

    def __init__(self, stale_s: float = 60.0):
        self.stale_s = stale_s
        self._seen: dict[tuple[str, str], tuple[float, list]] = {}
        self._ok: dict[str, bool] = {}

    def update(self, deployment: str, answer: dict | None) -> None:
        """`answer`: {"replica": id, "text": Prometheus exposition}, or None when the scrape failed."""
        now = time.monotonic()
        self._ok[deployment] = answer is not None
        if answer is not None:
            self._seen[(deployment, str(answer["replica"]))] = (now, list(text_string_to_metric_families(answer["text"])))
        self._seen = {k: v for k, v in self._seen.items() if now - v[0] <= self.stale_s}

    def collect(self):
        families: dict[str, Metric] = {}
        for (deployment, replica), (_, fams) in sorted(self._seen.items()):
            for f in fams:
                name = replica_name(f.name)
                if name not in families:
                    families[name] = Metric(name, f.documentation, f.type)
                for s in f.samples:
                    families[name].add_sample(replica_name(s.name), {**s.labels, "deployment": deployment,
                                                                     "replica": replica}, s.value)
        ok = GaugeMetricFamily("aptp_replica_scrape_ok", "1 when the deployment answered the ingress's last scrape",
                               labels=["deployment"])
        for deployment, answered in sorted(self._ok.items()):
            ok.add_metric([deployment], 1.0 if answered else 0.0)
        yield from families.values()
        yield ok

