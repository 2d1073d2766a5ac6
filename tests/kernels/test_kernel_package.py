"""Package-level behaviour: availability checks, the interpreter set-up, and life without Triton."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lisa_kernels
from lisa_kernels import decode, require_triton, triton_available
from lisa_kernels._triton import check_launch, is_interpreted

ON_GPU = os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()


def test_public_api():
    for name in ("lisa_decode", "lisa_prefill", "anchor_attention", "triton_available", "require_triton"):
        assert callable(getattr(lisa_kernels, name))
        if name not in ("triton_available", "require_triton"):
            assert callable(getattr(lisa_kernels, f"{name}_reference"))


@pytest.mark.skipif(ON_GPU, reason="checks the CPU interpreter set-up of tests/kernels/conftest.py")
def test_conftest_selects_the_interpreter():
    assert os.environ["TRITON_INTERPRET"] == "1"
    assert triton_available()
    require_triton()
    assert is_interpreted(decode._lisa_decode_logits_kernel)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_require_triton_names_the_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_available()
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1.*kernel='torch'"):
        require_triton()


@pytest.mark.skipif(ON_GPU, reason="interpreter only")
def test_kernel_decorated_in_another_mode_is_refused():
    # A kernel compiled for the GPU while triton's standard library is interpreted (TRITON_INTERPRET
    # set too late) must give a clear error, not a crash inside the interpreter.
    def fake_compiled_kernel():
        pass

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET was changed"):
        check_launch(fake_compiled_kernel)


def test_package_works_without_triton(tmp_path):
    # References import and run; kernels raise RuntimeError naming the fix.
    code = """
import sys
sys.modules["triton"] = None  # import triton -> ImportError
import torch
import lisa_kernels as lk
assert not lk.triton_available()
B, H, G, N, r, D = 1, 2, 1, 5, 2, 4
args = (torch.randn(B, H, N), torch.randn(B, H, r), torch.randn(B, G, N, r), torch.randn(B, G, N, D),
        lk.LisaWeights(torch.randn(4, H), torch.randn(4), torch.randn(H, 4), torch.randn(H)), 0.5)
out, logits = lk.lisa_decode_reference(*args)
assert out.shape == (B, H, D) and logits.shape == (B, H, N)
try:
    lk.lisa_decode(*args)
except RuntimeError as e:
    assert "install triton" in str(e) and "kernel='torch'" in str(e), e
    print("ok")
"""
    kernels_dir = str(Path(lisa_kernels.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": kernels_dir + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
