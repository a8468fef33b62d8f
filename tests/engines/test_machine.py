"""CPU model and ISA flags in `aptp doctor` and benchmark JSON (figures and float32 rounding depend on them)."""

from __future__ import annotations

from engines.backends.doctor import collect, format_report
from engines.machine import cpu_info

XEON = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni amx_tile
bogomips\t: 4200.00

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Some Other Name
flags\t\t: fpu
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm sve i8mm bf16
CPU implementer\t: 0x41
"""


def test_cpu_info_reads_the_first_processor(tmp_path):
    (tmp_path / "x86").write_text(XEON)
    info = cpu_info(tmp_path / "x86")
    assert info["model"] == "Intel(R) Xeon(R) Processor" and info["vendor"] == "GenuineIntel"
    assert info["isa"] == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "amx_tile"]
    assert info["flags"].split()[0] == "fpu" and "amx_tile" in info["flags"]
    (tmp_path / "arm").write_text(ARM)
    arm = cpu_info(tmp_path / "arm")
    assert arm["isa"] == ["asimd", "sve", "i8mm", "bf16"] and arm["vendor"] == "0x41"


def test_cpu_info_without_proc(tmp_path):
    info = cpu_info(tmp_path / "absent")
    assert info["isa"] == [] and info["flags"] is None and info["cores"] >= 1


def test_doctor_reports_the_cpu():
    report = collect()
    assert report["cpu"]["cores"] >= 1 and "isa" in report["cpu"]
    text = format_report(report)
    assert "cpu:" in text and "isa" in text and "flags" not in text.split("cpu:")[1].split("onnxruntime:")[0]


def test_benchmark_json_names_the_machine():
    from benchmarks.timing import machine

    m = machine()
    assert m["cpu"]["model"] and m["versions"]["numpy"] and len(m["loadavg"]) == 3
