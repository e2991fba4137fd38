"""`norm-exp-fetch msd TASK` against a real HTTP server on 127.0.0.1 serving an MSD-style archive built here.

The archive is a small synthetic task in the MSD layout (norm_experiments.data.synthetic), tarred as the MSD
archives are (one top-level TaskXX_Name/ folder). No network is reachable from the test machines; the
server is real (http.server in a thread), so is the download (MONAI's download_url) and the extraction.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from norm_experiments.data.fetch import fetch_msd, main, msd_tasks
from norm_experiments.data.synthetic import SynthConfig, generate_dataset
from norm_experiments.errors import UserError
from tests.helpers import metrics_of, run_cli

TASK = "Task04_Hippocampus"


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic stand-in for Task04 in the MSD layout: 1 mm spacing, background + 2 classes, MR."""
    root = tmp_path_factory.mktemp("source") / TASK
    cfg = SynthConfig(
        num_cases=6, shape=(16, 20, 16), spacing=(1.0, 1.0, 1.0), radius_range=(2.0, 4.0), seed=3
    )
    return generate_dataset(root, cfg, "msd")


def make_tar(folder: Path, out: Path, skip: str | None = None, extra: dict[str, bytes] | None = None) -> Path:
    """Tar `folder` as TaskXX_Name/..., optionally without one file, optionally with extra raw members."""
    with tarfile.open(out, "w") as tar:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder.parent).as_posix()
            if skip is None or not rel.endswith(skip):
                tar.add(path, arcname=rel, recursive=False)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


@pytest.fixture(scope="module")
def archive(task_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tar(task_folder, tmp_path_factory.mktemp("served") / f"{TASK}.tar")


class ArchiveHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files; with server.truncate_at set, promises the whole file but sends only that many bytes
    and drops the connection (a server that goes away in the middle of a download)."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        cut = self.server.truncate_at  # type: ignore[attr-defined]
        if cut is None:
            super().do_GET()
            return
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:cut])
        self.wfile.flush()
        self.close_connection = True


@contextmanager
def serve(directory: Path, truncate_at: int | None = None) -> Iterator[tuple[http.server.HTTPServer, str]]:
    handler = functools.partial(ArchiveHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = []  # type: ignore[attr-defined]
    server.truncate_at = truncate_at  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("NORM_EXP_CACHE", str(root))
    return root


def fetch(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """norm-exp-fetch in this process: (exit status, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_nothing_left(cache: Path) -> None:
    """No dataset, no work folder, no archive: nothing that looks like (part of) a dataset."""
    msd = cache / "msd"
    left = sorted(p.name for p in msd.iterdir()) if msd.is_dir() else []
    assert left == [], left


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------


def test_monai_keeps_the_published_tasks() -> None:
    tasks = msd_tasks()
    assert tasks[TASK][0].endswith(f"/{TASK}.tar") and len(tasks[TASK][1]) == 32
    assert "Task09_Spleen" in tasks


@pytest.mark.slow  # a subprocess of the real CLI
def test_fetch_over_http_then_train_with_the_printed_override(
    archive: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with serve(archive.parent) as (server, base):
        code, out, err = fetch(
            ["msd", TASK, "--url", f"{base}/{archive.name}", "--md5", md5_of(archive)], capsys
        )
        assert code == 0, err
        target = cache / "msd" / TASK
        assert json.loads((target / "dataset.json").read_text())["numTraining"] == 6
        assert len(list((target / "imagesTr").glob("*.nii.gz"))) == 6
        assert sorted(p.name for p in (cache / "msd").iterdir()) == [TASK]  # no work folder, no archive
        assert f"6 training cases at {target}" in out
        override = out.strip().splitlines()[-1].removeprefix("train with: norm-exp-train ").split()
        assert override == ["data=msd_hippocampus"]

        # Fetched already: not downloaded again.
        code, out, _ = fetch(
            ["msd", TASK, "--url", f"{base}/{archive.name}", "--md5", md5_of(archive)], capsys
        )
        assert code == 0 and "already fetched" in out
        assert server.requests == [f"/{archive.name}"]

    run_dir = tmp_path / "run"
    result = run_cli(
        [*override, "experiment=smoke", "trainer.num_threads=1", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env={"NORM_EXP_CACHE": str(cache)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = metrics_of(run_dir)
    assert metrics["status"] == "completed"
    assert set(metrics["val_dice_per_class"]) == {"class1", "class2"}
    assert metrics["preprocessing"]["modalities"] == ["MRI"]
    assert metrics["preprocessing"]["channel_intensity"] == ["zscore"]  # MR: per-case z-score, by itself


def test_wrong_checksum_keeps_nothing_and_the_next_run_retries(
    archive: Path, cache: Path, capsys: pytest.CaptureFixture
) -> None:
    with serve(archive.parent) as (server, base):
        url = f"{base}/{archive.name}"
        code, _, err = fetch(["msd", TASK, "--url", url], capsys)  # the published MD5 of the real Task04
        assert code == 2
        line = one_error_line(err)
        assert "MD5" in line and msd_tasks()[TASK][1] in line and "nothing was kept" in line
        assert_nothing_left(cache)

        code, _, err = fetch(["msd", TASK, "--url", url, "--md5", md5_of(archive)], capsys)
        assert code == 0, err
        assert server.requests == [f"/{archive.name}"] * 2  # the retry downloaded again
    assert (cache / "msd" / TASK / "dataset.json").is_file()


def test_server_gone_mid_download_keeps_nothing_and_a_rerun_starts_again(
    archive: Path, cache: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["msd", TASK, "--md5", md5_of(archive)]
    with serve(archive.parent, truncate_at=archive.stat().st_size // 2) as (_, base):
        url = f"{base}/{archive.name}"
        code, _, err = fetch([*args, "--url", url], capsys)
    assert code == 2
    assert "download of" in one_error_line(err) and "run the same command" in err
    assert_nothing_left(cache)

    code, _, err = fetch([*args, "--url", url], capsys)  # the server is gone now: connection refused
    assert code == 2 and "download of" in one_error_line(err)
    assert_nothing_left(cache)

    with serve(archive.parent) as (_, base):
        code, _, err = fetch([*args, "--url", f"{base}/{archive.name}"], capsys)
    assert code == 0, err
    assert (cache / "msd" / TASK / "dataset.json").is_file()


@pytest.mark.parametrize(
    "kind, message",
    [
        ("no_dataset_json", "no dataset.json in the archive"),
        ("missing_image", "not usable"),
        ("escaping_member", "unsafe archive member"),
        ("not_an_archive", "not a tar or zip archive"),
    ],
)
def test_bad_archive_is_refused_and_nothing_is_left(
    kind: str, message: str, task_folder: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    bad = served / f"{TASK}.tar"
    if kind == "no_dataset_json":
        make_tar(task_folder, bad, skip="dataset.json")
    elif kind == "missing_image":
        make_tar(task_folder, bad, skip="imagesTr/synth_002.nii.gz")
    elif kind == "escaping_member":
        make_tar(task_folder, bad, extra={f"{TASK}/../../escaped.txt": b"outside"})
    else:
        bad.write_bytes(b"<html>a proxy's login page</html>")
    with serve(served) as (_, base):
        code, _, err = fetch(["msd", TASK, "--url", f"{base}/{bad.name}", "--md5", md5_of(bad)], capsys)
    assert code == 2
    assert message in one_error_line(err)
    assert_nothing_left(cache)
    assert not list(tmp_path.rglob("escaped.txt"))


@pytest.mark.parametrize("form", ["path", "file_url_zip"])
def test_local_archive_by_path_or_file_url(
    form: str, archive: Path, task_folder: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    if form == "path":
        source, md5 = str(archive), md5_of(archive)
    else:
        zipped = tmp_path / f"{TASK}.zip"
        with zipfile.ZipFile(zipped, "w") as zf:
            for path in sorted(task_folder.rglob("*")):
                zf.write(path, path.relative_to(task_folder.parent).as_posix())
        source, md5 = zipped.as_uri(), md5_of(zipped)
    code, out, err = fetch(["msd", TASK, "--url", source, "--md5", md5], capsys)
    assert code == 0, err
    assert (cache / "msd" / TASK / "imagesTr" / "synth_005.nii.gz").is_file()
    assert out.strip().endswith("norm-exp-train data=msd_hippocampus")


def test_other_cache_dir_is_in_the_printed_override(
    archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = tmp_path / "elsewhere"
    code, out, err = fetch(
        ["msd", TASK, "--url", str(archive), "--md5", md5_of(archive), "--cache-dir", str(other)], capsys
    )
    assert code == 0, err
    assert (other / "msd" / TASK / "dataset.json").is_file()
    assert out.strip().endswith(f"norm-exp-train data=msd_hippocampus data.cache_dir={other}")


def test_abandoned_work_folder_of_a_killed_fetch_is_removed(
    archive: Path, cache: Path, capsys: pytest.CaptureFixture
) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    abandoned = cache / "msd" / f".{TASK}.tmp-{socket.gethostname()}-{dead.pid}-x1y2"
    (abandoned / "extract" / TASK).mkdir(parents=True)
    (abandoned / "extract" / TASK / "dataset.json").write_text("{}")
    mine = cache / "msd" / f".{TASK}.tmp-{socket.gethostname()}-{os.getpid()}-live"  # a running fetch's
    mine.mkdir()
    code, _, err = fetch(["msd", TASK, "--url", str(archive), "--md5", md5_of(archive)], capsys)
    assert code == 0, err
    assert not abandoned.exists() and mine.is_dir()


def test_a_folder_that_is_not_a_fetched_task_is_never_replaced(
    archive: Path, cache: Path, capsys: pytest.CaptureFixture
) -> None:
    mine = cache / "msd" / TASK
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my own file")
    code, _, err = fetch(["msd", TASK, "--url", str(archive), "--md5", md5_of(archive)], capsys)
    assert code == 2 and "holds no dataset.json" in one_error_line(err)
    assert (mine / "notes.txt").read_text() == "my own file"


def test_unknown_task_lists_the_tasks(cache: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = fetch(["msd", "Task99_Nothing"], capsys)
    assert code == 2 and "Task04_Hippocampus" in one_error_line(err)


@pytest.mark.slow  # a subprocess of the real CLI
@pytest.mark.parametrize("preset, task", [("msd_hippocampus", TASK), ("msd_spleen", "Task09_Spleen")])
def test_preset_without_the_data_says_how_to_fetch(
    preset: str, task: str, cache: Path, tmp_path: Path
) -> None:
    result = run_cli([f"data={preset}"], cwd=tmp_path, env={"NORM_EXP_CACHE": str(cache)})
    assert result.returncode == 2
    expected = (
        f"error: data={preset}: dataset not found at {cache / 'msd' / task}; run: norm-exp-fetch msd {task}"
    )
    assert result.stderr.strip().splitlines()[-1] == expected
    assert not (cache / "msd").exists()  # nothing downloaded at run time


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("Task04_Hipocampus", "Task04_Hippocampus"),
        ("hippocampus", "Task04_Hippocampus"),
        ("9", "Task09_Spleen"),
    ],
)
def test_a_misspelt_task_names_the_closest_one(tmp_path: Path, typed: str, meant: str) -> None:
    """Refused before anything is downloaded or written, with the task meant (a typo, its number or name)."""
    with pytest.raises(
        UserError, match=rf"^unknown MSD task '{typed}' \(did you mean {meant}\?\); choose one of "
    ):
        fetch_msd(typed, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_preset_with_its_own_cache_dir_names_it_in_the_fetch_command(tmp_path: Path) -> None:
    """With data.cache_dir=X the advice `norm-exp-fetch msd TASK` fetched into the default cache, where the run
    would not look."""
    from norm_experiments.command_line import command_line_problem
    from norm_experiments.config import validate_config

    other = tmp_path / "my cache"
    problem = command_line_problem(["data=msd_spleen", f"data.cache_dir='{other}'"], "train", validate_config)
    assert problem == (
        f"data=msd_spleen: dataset not found at {other / 'msd' / 'Task09_Spleen'}; run: norm-exp-fetch msd "
        f"Task09_Spleen --cache-dir '{other}'"
    )


def test_odd_arguments_and_an_unusable_cache_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Each was a traceback and exit 1: an infinite --timeout (the alarm overflowed), a malformed URL, a cache
    whose msd entry is a file, a cache that cannot be created."""
    md5 = "0123456789abcdef0123456789abcdef"
    (tmp_path / "filecache").mkdir()
    (tmp_path / "filecache" / "msd").write_text("not a folder")
    cases = [
        (["--timeout", "inf"], "error: --timeout inf: must be a positive number of seconds, at most 86400"),
        (
            ["--url", "http://[::1", "--md5", md5],
            "error: --url http://[::1: not a URL or path (Invalid IPv6 URL)",
        ),
        (
            ["--cache-dir", str(tmp_path / "filecache"), "--url", str(tmp_path / "x.tar"), "--md5", md5],
            f"error: {tmp_path / 'filecache' / 'msd'}: cannot create the folder to fetch into (EEXIST",
        ),
    ]
    for args, line in cases:
        code, _, err = fetch(["msd", TASK, *args], capsys)
        assert code == 2 and one_error_line(err).startswith(line), (args, err)


def test_a_local_archive_with_another_md5_is_not_told_to_download_again(
    archive: Path, cache: Path, capsys: pytest.CaptureFixture
) -> None:
    code, _, err = fetch(["msd", TASK, "--url", str(archive), "--md5", "0" * 32], capsys)
    line = one_error_line(err)
    assert code == 2 and line.endswith(
        "nothing was fetched: check the file, or pass --md5 for an archive you trust"
    )
    assert "download" not in line
