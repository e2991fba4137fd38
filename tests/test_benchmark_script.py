"""scripts/benchmark.py runs end to end (smoke profile) and writes its tables; scripts/gpu_check.sh is wired
(dry run) and refuses to start without a GPU. No timing is asserted: only that the numbers are there."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(
    0, str(REPO / "scripts")
)  # scripts/benchmarks/ is imported as `benchmarks`, as the script does

from benchmarks.batch1 import max_fixed_per_sample, step_cost_split  # noqa: E402
from benchmarks.common import interval_verdict, paired_ratio  # noqa: E402

# Subprocess runs of the real CLI or trainings: the full suite runs them, `pytest -m "not slow"` does not.
pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
NUMBER = r"\d+\.\d+"
INTERVAL = rf"{NUMBER}x? \[{NUMBER}, {NUMBER}\]"


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)


def test_benchmark_smoke_writes_tables(tmp_path: Path) -> None:
    out = tmp_path / "b.md"
    # One torch thread: on a loaded CI machine two OpenMP threads per op can be several times slower.
    result = run(
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
        ]
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
        "## f. Several runs on one GPU",
        "| layer (batch 1) | ATen backend | PyTorch ms |",
        "| norm | step | ms/step (median block) | ratio to bare [95 % interval] |",
        "| pipeline | patches/epoch |",
        "Load average at the end:",
    ):
        assert header in text, header
    # a: the ratio with its interval, half-width and number of paired blocks (3 in smoke)
    assert re.search(
        rf"\| batch \| Run.train_step \| {NUMBER} \| \*\*{INTERVAL}\*\* \| {NUMBER} \| 3 \|", text
    ), text
    # b: ours against the tutorial as written, the fast-training recipe and the uncached pipeline
    for baseline in ("(i) MONAI 3D tutorial", "(ii) MONAI fast-training recipe"):
        assert re.search(
            rf"\| epoch speed-up vs {re.escape(baseline)} \| {INTERVAL} \| >= 1.0x \(cpu\) \|", text
        )
    assert re.search(
        r"\| \(i\) MONAI 3D tutorial: CacheDataset\(cache_rate=1.0\), DataLoader\(num_workers=\d\) \|", text
    )
    assert "| uncached Dataset, DataLoader(num_workers=0) (no tutorial runs so) |" in text
    assert "pending a run on a GPU" in text  # CPU run: sections d and f are skipped with a note
    # e: every norm of the profile gets a batch-1/batch-2 ratio and a verdict against 0.7
    # the worst norm's ratio, its interval where it has rounds, and its interval's verdict
    worst = r"\| batch 1 / batch 2 per-patch throughput, worst norm .* \| \d\.\d\d( \[\d\.\d\d, \d\.\d\d\])? \(\w+\) \|"
    assert re.search(worst + r" >= 0.7 \| (met|MISSED|undecided)", text)
    for norm in ("batch", "weightnorm"):
        assert re.search(rf"\| {norm} \|( [\d.]+ \|){{4}} \d\.\d\d \| \*\*\d\.\d\d\*\* ", text), norm
    # ... and its step split into F (once per step) and c (per sample), with their ratio
    assert re.search(rf"\| {NUMBER} / -?{NUMBER} \(-?{NUMBER}\) \| {NUMBER}x \|\n", text), text


def test_step_cost_split_recovers_the_fixed_and_per_sample_cost() -> None:
    fixed, per_sample = 0.008, 0.0045  # seconds; steps at batch 1 and 2 = F + c, F + 2c, with per-round noise
    noise = [0.0, 0.0004, -0.0002]
    step_b1 = [fixed + per_sample + e for e in noise]
    step_b2 = [fixed + 2 * per_sample + e for e in noise]
    assert step_cost_split(step_b1, step_b2) == pytest.approx((fixed, per_sample))
    # the boundary: at F = 1.5 c batch 1 reaches exactly 0.7 of batch 2's per-patch throughput
    assert max_fixed_per_sample(0.7) == pytest.approx(1.5)
    c = 1.0
    f = max_fixed_per_sample(0.7) * c
    assert (f + 2 * c) / (2 * (f + c)) == pytest.approx(0.7)
    assert max_fixed_per_sample(0.75) == pytest.approx(1.0)


def test_paired_ratio_interval_from_per_round_ratios() -> None:
    ours, bare = [1.02, 1.04, 1.06, 1.02], [1.0, 1.0, 1.0, 1.0]
    ratio = paired_ratio(ours, bare)
    logs = [math.log(x) for x in ours]
    assert ratio.value == pytest.approx(math.exp(sum(logs) / 4))  # geometric mean of the per-round ratios
    # Student's t with 3 degrees of freedom: t(0.975) = 3.182
    mean, sd = sum(logs) / 4, (sum((x - sum(logs) / 4) ** 2 for x in logs) / 3) ** 0.5
    assert ratio.high == pytest.approx(math.exp(mean + 3.182 * sd / 2), rel=1e-4)
    assert ratio.low < ratio.value < ratio.high and ratio.rounds == 4
    assert interval_verdict(ratio, 1.05, at_most=True) == "undecided (the interval spans the target)"
    assert interval_verdict(paired_ratio([1.0] * 3, [1.0] * 3), 1.05, at_most=True) == "met"
    assert interval_verdict(paired_ratio([2.0, 2.1, 1.9], [1.0] * 3), 1.05, at_most=True) == "MISSED"
    assert interval_verdict(paired_ratio([2.0, 2.1, 1.9], [1.0] * 3), 1.0, at_most=False) == "met"
    # one round has no interval: no verdict either (--smoke wrote "MISSED" from a single 0.54)
    assert (
        interval_verdict(paired_ratio([2.0], [1.0]), 1.05, at_most=True)
        == "undecided (one round: no interval)"
    )


def test_benchmark_refuses_nonsense_numbers_and_an_unwritable_out_before_measuring(tmp_path: Path) -> None:
    """--threads -1 was a traceback, --repeats -2 a report of "-2 rounds", and an --out that cannot be written a
    traceback after the measuring (--dry-run passed it)."""
    import benchmark

    assert (
        benchmark.out_problem(str(tmp_path)) == f"--out {tmp_path}: a folder; give the markdown file to write"
    )
    assert "cannot write into" in benchmark.out_problem(str(tmp_path / "no" / "x.md"))
    assert benchmark.out_problem(str(tmp_path / "x.md")) is None and benchmark.out_problem("-") is None
    for args in (["--threads", "-1"], ["--repeats", "0"], ["--overhead-cap", "-5"]):
        with pytest.raises(SystemExit) as stop:
            benchmark.parse_args(["--smoke", *args])
        assert stop.value.code == 2, args
    # A smoke run prints only, unless told where to write; the other profiles write the default report.
    assert benchmark.parse_args(["--smoke"]).out == "-"
    assert benchmark.parse_args(["--smoke", "--out", str(tmp_path / "x.md")]).out == str(tmp_path / "x.md")
    assert benchmark.parse_args(["--quick"]).out == str(benchmark.DEFAULT_OUT)


def test_benchmark_dry_run_checks_the_command_line_and_config(tmp_path: Path) -> None:
    out = tmp_path / "b.md"
    ok = run(
        [
            sys.executable,
            "scripts/benchmark.py",
            "--quick",
            "--device",
            "cuda",
            "--out",
            str(out),
            "--dry-run",
        ]
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "nothing measured" in ok.stdout and not out.exists()


def test_benchmark_refuses_a_bad_override_or_section_in_one_line(capsys: pytest.CaptureFixture) -> None:
    """The script's main() in this process (the subprocess test above covers the real command line)."""
    import benchmark

    assert benchmark.main(["--smoke", "--override", "trainer.samples=0", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == "error: trainer.samples: must be a whole number >= 1, got 0"
    with pytest.raises(SystemExit) as unknown:
        benchmark.main(["--only", "nothing", "--dry-run"])
    assert unknown.value.code == 2 and "invalid choice: 'nothing'" in capsys.readouterr().err


def test_gpu_check_dry_run_checks_every_step_without_a_gpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    result = run(["bash", "scripts/gpu_check.sh", "--dry-run", str(out)], timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    for name in ("tests", "benchmark", "study", "report"):
        assert re.search(rf"^\| {name} \| ok \| \d+ \| ", result.stdout, re.M), result.stdout
    assert (out / "summary.md").read_text() in result.stdout
    collected = re.search(r"^(\d+)/\d+ tests collected", (out / "tests.log").read_text(), re.M)
    assert collected and int(collected.group(1)) >= 8  # every test marked cuda
    # the GPU study, composed by norm-exp-train exactly as the step runs it, and validated
    cfg = (out / "study.yaml").read_text()
    assert "patch_size:\n  - 64\n  - 64\n  - 64\n" in cfg and "runs_per_gpu: 4\n" in cfg
    assert "validates" in (out / "study.log").read_text()
    # the benchmark's GPU sections only: AMP (at 64^3 too), compile, cache on device, runs per GPU
    assert "sections cuda, runs_per_gpu" in (out / "benchmark.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_refuses_to_start_without_a_gpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    result = run(["bash", "scripts/gpu_check.sh", str(out)], timeout=60)
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(
        "gpu_check: no CUDA GPU visible to torch"
    )
    assert not out.exists()  # nothing done before the check


def test_gpu_check_never_writes_into_a_folder_that_holds_something(tmp_path: Path) -> None:
    (tmp_path / "earlier.md").write_text("an earlier result")
    result = run(["bash", "scripts/gpu_check.sh", "--dry-run", str(tmp_path)], timeout=60)
    assert result.returncode == 2 and "is not an empty folder" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["earlier.md"]
