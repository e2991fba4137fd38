"""norm-exp-fetch and dataset.json against hostile archives and servers: entries that point outside the
dataset, a stalled server, SIGTERM in the middle of a download, JSON nested or numbered to break a parser,
an MD5 in capitals, and HOME unset. A real HTTP server on 127.0.0.1 (tests/data/test_fetch.py's)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from norm_experiments.data.checks import check_cases
from norm_experiments.data.fetch import msd_tasks
from norm_experiments.data.layouts import find_cases
from norm_experiments.data.synthetic import SynthConfig, generate_dataset
from norm_experiments.errors import UserError
from tests.data.test_fetch import (
    TASK,
    assert_nothing_left,
    fetch,
    make_tar,
    md5_of,
    one_error_line,
    serve,
)
from tests.helpers import assert_clean_failure, compose_config, run_cli


def _rewrite_dataset_json(folder: Path, change) -> None:
    meta = json.loads((folder / "dataset.json").read_text())
    text = change(meta)
    (folder / "dataset.json").write_text(text if isinstance(text, str) else json.dumps(meta))


def _copy(task_folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "src" / TASK
    generate_dataset(
        copy, SynthConfig(num_cases=4, shape=(16, 20, 16), radius_range=(2.0, 4.0), seed=3), "msd"
    )
    return copy


HOSTILE_JSON = {
    "parent": lambda m: m["training"][0].update(image="../../../outside.nii.gz"),
    "absolute": lambda m: m["training"][0].update(label="/etc/hostname"),
    "deep": lambda m: json.dumps(m)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "huge int": lambda m: json.dumps(m)[:-1] + ', "numTraining2": ' + "9" * 5000 + "}",
}
EXPECTED = {
    "parent": "lies outside the dataset folder",
    "absolute": "lies outside the dataset folder",
    "deep": "nested 100001 levels deep",
    "huge int": "a number of 5000 characters",
}


@pytest.mark.parametrize("kind", list(HOSTILE_JSON))
def test_hostile_dataset_json_in_an_archive_is_refused_and_nothing_kept(
    kind: str, task_folder: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = _copy(task_folder, tmp_path)
    (tmp_path / "outside.nii.gz").write_bytes((source / "imagesTr" / "synth_000.nii.gz").read_bytes())
    _rewrite_dataset_json(source, HOSTILE_JSON[kind])
    served = tmp_path / "served"
    served.mkdir()
    bad = make_tar(source, served / f"{TASK}.tar")
    with serve(served) as (_, base):
        code, _, err = fetch(["msd", TASK, "--url", f"{base}/{bad.name}", "--md5", md5_of(bad)], capsys)
    assert code == 2, err
    line = one_error_line(err)
    assert "the archive's dataset is not usable" in line and EXPECTED[kind] in line, line
    assert_nothing_left(cache)


@pytest.mark.slow  # a subprocess of the real CLI
@pytest.mark.parametrize("kind", list(HOSTILE_JSON))
def test_hostile_dataset_json_at_load_and_in_training_is_one_line(kind: str, tmp_path: Path) -> None:
    root = tmp_path / "data"
    generate_dataset(
        root, SynthConfig(num_cases=4, shape=(16, 20, 16), radius_range=(2.0, 4.0), seed=3), "msd"
    )
    _rewrite_dataset_json(root, HOSTILE_JSON[kind])
    with pytest.raises(UserError, match=EXPECTED[kind]):
        find_cases("msd", root)
    if kind in ("deep", "huge int"):  # through the real CLI: exit 2, not an internal error (5)
        result = run_cli(["experiment=smoke", "data=msd", f"data.root={root}"], cwd=tmp_path, timeout=120)
        assert_clean_failure(result, EXPECTED[kind])


def test_a_listed_file_linked_in_from_outside_is_followed_but_paths_that_escape_are_refused(
    tmp_path: Path,
) -> None:
    """Linking data into a dataset folder is the user's doing (archives with links are refused before they
    are extracted): the link is followed. A path written in dataset.json that leaves the folder is not."""
    root = tmp_path / "data"
    generate_dataset(
        root, SynthConfig(num_cases=4, shape=(16, 20, 16), radius_range=(2.0, 4.0), seed=3), "msd"
    )
    outside = tmp_path / "elsewhere" / "scan.nii.gz"
    outside.parent.mkdir()
    image = root / "imagesTr" / "synth_001.nii.gz"
    outside.write_bytes(image.read_bytes())
    image.unlink()
    image.symlink_to(outside)
    cases, info = find_cases("msd", root)
    check_cases(cases, info)  # read through the link
    assert cases[1].images == (image,)
    # The same file, named by a path that climbs out of the folder: refused, though it exists.
    _rewrite_dataset_json(
        root, lambda m: m["training"][1].update(image="./imagesTr/../../elsewhere/scan.nii.gz")
    )
    with pytest.raises(UserError, match=r"'training'\[1\]\['image'\].*lies outside the dataset folder"):
        find_cases("msd", root)


def test_md5_in_capitals_is_accepted(archive: Path, cache: Path, capsys: pytest.CaptureFixture) -> None:
    with serve(archive.parent) as (_, base):
        code, out, err = fetch(
            ["msd", TASK, "--url", f"{base}/{archive.name}", "--md5", md5_of(archive).upper()], capsys
        )
    assert code == 0, err
    assert (cache / "msd" / TASK / "dataset.json").is_file()
    code, _, err = fetch(["msd", "Task05_Prostate", "--url", str(archive), "--md5", "xyz"], capsys)
    assert code == 2 and "--md5 xyz: not an MD5 sum" in one_error_line(err)


@contextmanager
def stalling_server(send_headers: bool) -> Iterator[str]:
    """Accepts connections and never finishes an answer: nothing at all, or headers and a few bytes."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()
    held = []

    def serve_forever() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            held.append(conn)
            if send_headers:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 300_000)

    thread = threading.Thread(target=serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/{TASK}.tar"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


@pytest.mark.parametrize("send_headers", [False, True])
def test_a_stalled_server_times_out_in_one_line(
    send_headers: bool, cache: Path, capsys: pytest.CaptureFixture
) -> None:
    with stalling_server(send_headers) as url:
        started = time.monotonic()
        code, _, err = fetch(["msd", TASK, "--url", url, "--timeout", "1"], capsys)
    assert code == 2 and time.monotonic() - started < 30
    line = one_error_line(err)
    assert "stalled: less than 1 KiB in 1 s (--timeout)" in line, line
    assert_nothing_left(cache)


@contextmanager
def trickling_server(where: str, give_up_after: float = 8.0) -> Iterator[str]:
    """Answers slowly enough to hold a download forever, fast enough for every read to return in time: one
    header line every 0.3 s ("headers"), or the headers and 1 KiB, then one byte every 0.3 s ("body"). It
    gives up after `give_up_after` seconds, so that a client without a progress deadline ends (and fails
    the test) instead of hanging it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def answer(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            if where == "headers":
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                drip = b"X-Slow: 1\r\n"
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 1024)
                drip = b"x"
            ends = time.monotonic() + give_up_after
            while time.monotonic() < ends and not stop.wait(0.3):
                try:
                    conn.sendall(drip)
                except OSError:  # the client gave up
                    return

    def serve_forever() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/{TASK}.tar"
    finally:
        stop.set()
        thread.join()
        server.close()


@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_trickling_server_times_out_in_one_line(
    where: str, cache: Path, capsys: pytest.CaptureFixture
) -> None:
    """1 KiB, then a byte now and then (or headers, a line now and then): every read returns within the
    socket timeout, yet the download would never end. Less than 1 KiB in --timeout seconds is a stall."""
    msd_tasks()  # MONAI imported before the clock starts: only the download is timed
    with trickling_server(where) as url:
        started = time.monotonic()
        code, _, err = fetch(["msd", TASK, "--url", url, "--timeout", "1"], capsys)
        took = time.monotonic() - started
    line = one_error_line(err)
    assert code == 2 and "stalled: less than 1 KiB in 1 s (--timeout)" in line, line
    assert took < 5, took  # the server trickles for 8 s
    assert_nothing_left(cache)


@pytest.mark.slow  # a subprocess of the real CLI
def test_sigterm_during_a_download_leaves_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with stalling_server(send_headers=True) as url:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "norm_experiments.data.fetch",
                "msd",
                TASK,
                "--url",
                url,
                "--cache-dir",
                str(cache),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        partial = []
        while not partial and time.monotonic() < deadline:  # the download has begun writing
            partial = (
                [p for p in (cache / "msd").rglob("*.tar") if p.stat().st_size > 0]
                if (cache / "msd").is_dir()
                else []
            )
            time.sleep(0.1)
        assert partial, "the download never started"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, out + err
    assert err.strip() == "interrupted: nothing was kept; run the same command to start again", err
    assert_nothing_left(cache)


@pytest.mark.slow  # a subprocess of the real CLI
def test_train_with_line_works_when_home_is_unset(archive: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "NORM_EXP_CACHE")}
    cwd = tmp_path / "somewhere"
    cwd.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "norm_experiments.data.fetch",
            "msd",
            TASK,
            "--url",
            str(archive),
            "--md5",
            md5_of(archive),
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("train with: norm-exp-train "), line
    overrides = shlex.split(line.removeprefix("train with: norm-exp-train "))
    expected = cwd / ".cache" / "norm-experiments"
    assert overrides == ["data=msd_hippocampus", f"data.cache_dir={expected}"]
    # In another folder, HOME still unset, the printed overrides find the dataset.
    os.environ.pop("HOME", None)
    try:
        cfg = compose_config(overrides)
    finally:
        os.environ["HOME"] = env.get("HOME", "/root") if "HOME" in env else os.path.expanduser("~root")
    assert (Path(cfg.data.root) / "dataset.json").is_file()


def test_output_into_a_full_stdout_is_one_line_and_the_task_is_fetched(archive: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "norm_experiments.data.fetch", "msd", TASK, "--url", str(archive)]
    command += ["--md5", md5_of(archive), "--cache-dir", str(tmp_path / "cache")]
    with open("/dev/full", "w") as full:
        result = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr
        == "error: cannot write to standard output (ENOSPC: No space left on device); output lost\n"
    )
    assert (tmp_path / "cache" / "msd" / TASK / "dataset.json").is_file()
