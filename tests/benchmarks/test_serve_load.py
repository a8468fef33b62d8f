"""benchmarks.serve_load's pure parts: reading Prometheus text and summarising request records."""

from benchmarks.serve_load import metric_sum, summarise

TEXT = """# HELP aptp_cancellations_total x
aptp_cancellations_total{reason="disconnect"} 3.0
aptp_cancellations_total{reason="deadline"} 2.0
aptp_unet_call_seconds_sum{expert="0"} 1.5
aptp_unet_call_seconds_sum{expert="1"} 0.5
aptp_ready 1.0
"""


def test_metric_sum_filters_labels():
    assert metric_sum(TEXT, "aptp_cancellations_total") == 5.0
    assert metric_sum(TEXT, "aptp_cancellations_total", reason="deadline") == 2.0
    assert metric_sum(TEXT, "aptp_unet_call_seconds_sum") == 2.0
    assert metric_sum(TEXT, "aptp_ready") == 1.0
    assert metric_sum(TEXT, "aptp_missing") == 0.0


def test_summarise_counts_codes_and_images():
    recs = [{"code": 200, "images": 1, "latency_s": 1.0, "queued_s": 0.1},
            {"code": 200, "images": 1, "latency_s": 3.0, "queued_s": 0.3},
            {"code": 503, "latency_s": 0.01}]
    s = summarise(recs, wall=2.0)
    assert s["codes"] == {"200": 2, "503": 1} and s["images_per_s"] == 1.0
    assert s["latency_p50_s"] == 2.0 and s["queued_max_s"] == 0.3
