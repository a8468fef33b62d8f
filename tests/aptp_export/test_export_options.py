"""ExportOptions refuses impossible settings with a one-line UserError naming the option (engines.validation)."""

import pytest

from aptp_export.export_options import ExportOptions
from engines.errors import UserError


@pytest.mark.parametrize("changes, option", [
    (dict(backend="openvino2"), "backend"), (dict(precision="int3"), "precision"), (dict(max_batch=0), "max_batch"),
    (dict(max_batch=True), "max_batch"), (dict(size_range=(64, 32)), "size_range"), (dict(size_range=[8, 16]), "size_range"),
    (dict(round_to=0), "round_to"), (dict(scheduler="lms"), "scheduler"), (dict(exporter="magic"), "exporter"),
    (dict(steps=0), "steps"), (dict(guidance_scale=-1.0), "guidance_scale"), (dict(guidance_scale=101), "guidance_scale"),
])
def test_bad_options_name_the_option(changes, option):
    with pytest.raises(UserError, match=option):
        ExportOptions(**changes)


def test_good_options_and_replace():
    o = ExportOptions(size_range=(16, 64), max_batch=2, round_to=8)
    assert o.replace(precision="fp16").precision == "fp16" and o.replace().to_dict() == o.to_dict()
    with pytest.raises(UserError, match="unknown export option 'colour'"):
        o.replace(colour="red")


def test_sampling_defaults_recorded_at_export():
    """The manifest's sampling: the export flags, else the model's sampling.json, else 25 / 7.5."""
    from aptp_export.manifest_writer import sampling_info
    from engines.manifest import SamplingInfo

    toy = {"scheduler": "ddim", "num_inference_steps": 25, "guidance_scale": 3.0}
    assert sampling_info(ExportOptions(), toy) == SamplingInfo(25, 3.0)
    assert sampling_info(ExportOptions(), None) == SamplingInfo(25, 7.5)
    assert sampling_info(ExportOptions(steps=10, guidance_scale=5.0), toy) == SamplingInfo(10, 5.0)
    assert sampling_info(ExportOptions(guidance_scale=0.0), toy) == SamplingInfo(25, 0.0)


def test_memory_warning_names_the_graph_that_will_not_fit():
    """write_export_dir warns before exporting a graph whose weights x EXPORT_PEAK_FACTOR exceed the memory
    available (real-size T5-XXL on a 24 GB machine), and says nothing when it fits or memory is unknown."""
    import torch

    from aptp_export.manifest_writer import EXPORT_PEAK_FACTOR, memory_warnings
    from engines.machine import memory_available

    big, small = torch.nn.Linear(1000, 1000), torch.nn.Linear(10, 10)  # 4.004 MB and 440 B of fp32 weights
    jobs = [("text_encoder", big, None, None), ("router", small, None, None)]
    need = EXPORT_PEAK_FACTOR * 4_004_000
    lines = memory_warnings(jobs, int(need) - 1)
    assert len(lines) == 1 and lines[0].startswith("exporting text_encoder (0.0 GB of weights)")
    assert memory_warnings(jobs, int(need) + 1) == [] and memory_warnings(jobs, None) == []
    assert memory_available() is None or memory_available() > 0
