"""scripts/gpu_check.sh on a machine without a GPU: a dry run that checks the prerequisites,
says "no GPU" and exits 0 (so the script itself is tested before a GPU machine is lent)."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_dry_run_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would build and run (scripts/gpu_check.sh OUT --dry-run checks only)")
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHON=sys.executable))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "no GPU: prerequisites checked, nothing built or run" in summary
    for line in ("torch", "ninja:", "pytest:", "compute-sanitizer", "CUDA toolkit", "prerequisites:"):
        assert line in summary, (line, summary)
    assert not (tmp_path / "build.log").exists(), "a dry run must not build"
