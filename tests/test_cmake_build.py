"""CMakeLists.txt builds the same extension as setup.py, and the result works.

CI runs this so the CMake build (used for compile_commands.json and sanitizer builds)
cannot rot. It builds the CPU sources only; setup.py's build covers CUDA.
"""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = textwrap.dedent(
    """
    import importlib.util, sys, torch
    torch.ops.load_library(sys.argv[1])
    spec = importlib.util.spec_from_file_location("reference", sys.argv[2])
    ref = importlib.util.module_from_spec(spec); spec.loader.exec_module(ref)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 33, generator=g), torch.randn(17, 33, generator=g)
    a, b = torch.randn(2, 2, 4, 33, generator=g), torch.randn(2, 2, 17, 4, generator=g)
    off, ids, gates = torch.tensor([0, 4, 4, 9]), torch.tensor([1, -1, 0]), torch.rand(3, 2, generator=g) + 0.5
    y = torch.ops.milora_ext.gated_lora_linear(x, w, None, a, b, off, ids, gates)
    torch.testing.assert_close(y, ref.gated_lora_linear_ref(x, w, None, a, b, off, ids, gates), rtol=1e-5, atol=1e-4)
    try:
        torch.ops.milora_ext.gated_lora_linear(x, w, None, a, b, off, torch.tensor([2, -1, 0]), gates)
    except IndexError as e:
        assert "adapter_ids[0] = 2 is out of range" in str(e)
    else:
        raise AssertionError("no error for a bad adapter id")
    print("cmake-build-ok")
    """
)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_compiles_and_runs(tmp_path):
    build = tmp_path / "build"
    configure = ["cmake", "-S", ROOT, "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}"]
    subprocess.run(configure, check=True, capture_output=True, text=True)
    jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
    proc = subprocess.run(["cmake", "--build", str(build), "-j", jobs], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (build / "compile_commands.json").exists()
    libs = [p for p in build.iterdir() if p.name.startswith("_C") and p.suffix == ".so"]
    assert len(libs) == 1, list(build.iterdir())
    ref = os.path.join(ROOT, "milora_ext", "reference.py")
    out = subprocess.run([sys.executable, "-c", SMOKE, str(libs[0]), ref], capture_output=True, text=True)
    assert out.returncode == 0 and "cmake-build-ok" in out.stdout, out.stderr[-4000:]
