"""scripts/benchmark.py runs end to end (smoke profile) and writes its tables; no timing is asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_benchmark_smoke_writes_tables(tmp_path: Path) -> None:
    out = tmp_path / "b.md"
    result = subprocess.run(
        # One torch thread: on a loaded CI machine two OpenMP threads per op can be several times slower.
        [
            sys.executable,
            "scripts/benchmark.py",
            "--smoke",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    for header in (
        "## Machine",
        "## Targets",
        "## a. Overhead ratio",
        "## b. One epoch",
        "## c. Per norm",
        "## d. CUDA only",
        "## e. Batch 1 on a CPU",
        "| layer (batch 1) | ATen backend | PyTorch ms |",
        "| norm | step | ms/step (median) | ratio to bare |",
        "| pipeline | patches/epoch |",
    ):
        assert header in text, header
    assert re.search(r"\| overhead ratio \(batch\) \| \d+\.\d{3} \|", text), text
    assert re.search(r"\| epoch speed-up vs tutorial \| \d+\.\d+x \|", text), text
    assert "pending a run on a GPU" in text  # CPU run: section d is skipped with a note
    # section e: every norm of the profile gets a batch-1/batch-2 ratio and a verdict against 0.7
    assert re.search(
        r"\| batch 1 / batch 2 per-patch throughput, worst norm .* \| \d\.\d\d \(\w+\) \|", text
    ), text
    for norm in ("batch", "weightnorm"):
        assert re.search(rf"\| {norm} \|( [\d.]+ \|){{4}} \d\.\d\d \| \*\*\d\.\d\d\*\* ", text), norm
