"""Issue 23: `python -m core doctor` says what this machine supports and what an Ascend export needs, on a CPU-only
machine too, and prints torch_npu's kernel self-check where torch_npu is present."""
import sys
import types

import torch

from core.cli import main
from torch_npu_double import CLIP_OLD, module, variant


def _doctor(capsys) -> list[str]:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("All done!")
    return out.splitlines()


def test_doctor_on_this_cpu_machine(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu -> ImportError
    lines = _doctor(capsys)
    text = "\n".join(lines)
    assert lines[1].startswith("CPU: ") and "vCPUs" in lines[1]
    isa = next(s for s in lines if s.startswith("ISA flags: "))
    assert ("avx2 " in isa and "avx512_vnni " in isa) or "neon (asimd)" in isa
    assert any(s.startswith("native int4 kernels: ") for s in lines)
    assert any(s.startswith("real-quant backend for a model on the cpu: cpu") for s in lines)
    assert any(s.startswith("compute dtype (auto) on cpu: ") for s in lines)
    assert f"torch {torch.__version__}" in lines
    if not torch.cuda.is_available():
        assert any(s.startswith("CUDA: no CUDA device") for s in lines)
    assert "NPU: torch_npu not installed" in lines
    for fact in ("vllm serve DIR --quantization ascend", "W4A4_FLATQUANT_DYNAMIC", "scale = clip_ratio * max|x| / 7",
                 "vllm-ascend: >= 0.11.0rc1", "CANN: >= 8.3.RC1", "torch_npu: 2.7.1", "bfloat16 or float16"):
        assert fact in text, fact


def test_doctor_prints_the_npu_self_check(capsys, monkeypatch):
    import core.commands.doctor as doctor

    monkeypatch.setitem(sys.modules, "torch_npu", module(variant(CLIP_OLD), version="2.7.1.old"))
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 1),
                        raising=False)
    monkeypatch.setattr(doctor, "NPU_DEVICE", "cpu")  # the double's ops run on cpu tensors
    lines = _doctor(capsys)
    assert any(s.startswith("NPU: torch_npu 2.7.1.old, CANN ") and "1 device(s)" in s for s in lines)
    checks = [s.strip() for s in lines if s.startswith("  npu_")]
    assert len(checks) == 4 and all(": ok (" in s for s in checks), checks
    assert any("npu_kronecker_quant: ok (scale = max / (7 * clip)" in s for s in checks)


def test_doctor_without_an_npu_device(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", module())
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_available=lambda: False), raising=False)
    lines = _doctor(capsys)
    assert any(s.startswith("NPU: torch_npu 2.7.1.double") and "no NPU device" in s for s in lines)
