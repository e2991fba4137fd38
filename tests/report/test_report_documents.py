"""report.html (report.md with its plots embedded, values from run folders escaped), summary.json (nnU-Net's
shape, per-case scores equal to metrics.json) and learning_curves.png (mean and range over seeds; a corrupt
curve is a note), on one sweep written once for the module: two norms and a norm named like a script tag,
per-case scores in two evaluation modes, learning curves (one corrupt, one record without any), a run folder
and run names that are HTML, a failed run and a run that saved predictions (the worst case the report
links)."""

from __future__ import annotations

import base64
import json
import re
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

from norm_experiments.report import Report, curves, write_report
from norm_experiments.report.html_report import MAX_INLINE_CHARS, body, href, inline
from norm_experiments.run_record import Status
from tests.report.conftest import make_metrics, per_case

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HOSTILE_NORM = "<script>alert('norm')</script>"
HOSTILE_FOLDER = "x<script>alert('folder')</script> (1)"  # a '/' inside: two nested folders
HOSTILE_NAME = "<img src=x onerror=alert('name')>"
FAILED_FOLDER = "f<script>alert('failed')</script>"  # listed, as a path, under the runs without a result
CASES = ("case_a", "case_b", "case_c")
TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "h4", "p", "ul", "ol", "li"} | {
    "table", "thead", "tbody", "tr", "th", "td", "code", "strong", "a", "img", "figure", "figcaption", "span",
    "pre",
}  # fmt: skip


def _scores(base: float, seed: int) -> dict[str, float]:
    return {case: round(base + 0.01 * seed + 0.02 * i, 4) for i, case in enumerate(CASES)}


def loss_history(seed: int) -> list[dict]:
    """Logging windows at steps 10..50, as training writes them: loss 2.0 - 0.1 k + 0.01 seed."""
    return [{"step": 10 * k, "loss": 2.0 - 0.1 * k + 0.01 * seed} for k in range(1, 6)]


def history(batch_size: int, seed: int) -> list[dict]:
    """Validations at steps 25 and 50 (patches = step x batch size), Dice 0.5 / 0.6 + 0.01 seed."""
    return [
        {"step": step, "samples_seen": step * batch_size, "val_dice": dice + 0.01 * seed}
        for step, dice in ((25, 0.5), (50, 0.6))
    ]


CORRUPT_CURVE = ("batch", 2, 1)  # its loss_history has a step that is not a number
NO_CURVE = ("instance", 2, 2)  # an older record: no history at all


def record(norm: str, bs: int, seed: int, base: float) -> dict:
    """A completed run with per-case scores (BatchNorm: in the batch mode too) and learning curves."""
    running = _scores(base + 0.05 * bs, seed)
    modes = {"running": running} | ({"batch": _scores(base + 0.1, seed)} if norm == "batch" else {})
    means = {mode: sum(v.values()) / len(v) for mode, v in modes.items()}
    data = make_metrics(norm, bs, seed, means["running"], per_case=per_case(modes, hd95=3.0 + seed))
    if norm == "batch":
        data["eval_modes"] = means  # the recorded means of the per-case scores
    data |= {"global_batch": bs, "loss_history": loss_history(seed), "history": history(bs, seed)}
    if (norm, bs, seed) == CORRUPT_CURVE:
        data["loss_history"][1]["step"] = "ten"
    if (norm, bs, seed) == NO_CURVE:
        del data["loss_history"], data["history"]
    return data


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Report]:
    sweep = tmp_path_factory.mktemp("hostile") / "sweep"
    for norm, base in (("batch", 0.6), ("instance", 0.7), (HOSTILE_NORM, 0.5)):
        for bs in (1, 2):
            for seed in range(3):
                data = record(norm, bs, seed, base)
                folder = sweep / f"{'n' if norm == HOSTILE_NORM else norm}/bs{bs}/s{seed}"
                if (norm, bs, seed) == (
                    "instance",
                    1,
                    0,
                ):  # saved predictions: the report links its worst case
                    folder = sweep / HOSTILE_FOLDER
                    data["run_name"] = HOSTILE_NAME
                    (folder / "predictions" / "case_a").mkdir(parents=True)
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "metrics.json").write_text(json.dumps(data))
    failed = make_metrics("instance", 2, 3, None, status=Status.FAILED.value, error=f"crashed {HOSTILE_NAME}")
    failed["run_name"] = HOSTILE_NAME
    (sweep / FAILED_FOLDER).mkdir(parents=True)
    (sweep / FAILED_FOLDER / "metrics.json").write_text(json.dumps(failed))
    return sweep, write_report([sweep])


class Tree(HTMLParser):
    """Start tags with their attributes, the text of every table cell by table and row, and all text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data) -> None:
        self.text.append(data)
        if self.cell is not None:
            self.cell.append(data)


def parsed(html: str) -> Tree:
    tree = Tree()
    tree.feed(html)
    tree.close()
    return tree


def markdown_tables(markdown: str) -> list[list[list[str]]]:
    """Every pipe table of the markdown as cell texts: markup (code ticks, bold, links) taken off, alignment
    rows skipped, escaped pipes restored."""
    tables: list[list[list[str]]] = []
    previous_was_row = False
    for line in markdown.splitlines():
        is_row = line.startswith("|")
        if is_row and not previous_was_row:
            tables.append([])
        previous_was_row = is_row
        if not is_row or re.fullmatch(r"\|(:?-+:?\|)+", line):
            continue
        cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
        plain = [re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", c.strip().replace("\\|", "|")) for c in cells]
        tables[-1].append([c.replace("**", "").replace("`", "") for c in plain])
    return tables


def test_the_html_has_every_table_of_the_markdown_cell_for_cell(built) -> None:
    sweep, report = built
    markdown = (sweep / "report.md").read_text()
    tree = parsed((sweep / "report.html").read_text())
    expected = markdown_tables(markdown)
    assert len(expected) >= 8  # metric, differences, verdicts, HD95, convergence, intervals, cost, problems
    assert tree.tables == expected
    assert any(HOSTILE_NORM in row[0] for table in tree.tables for row in table)  # a table row of the norm
    # The headings and the notes are there too, as text.
    text = "".join(tree.text)
    headings = [line.lstrip("#").strip() for line in markdown.splitlines() if line.startswith("#")]
    assert headings and all(h.replace("`", "") in text for h in headings)
    assert "Runs: 19 (18 completed, 1 failed)" in text


def test_the_plots_are_embedded_as_pngs_and_nothing_is_fetched(built) -> None:
    sweep, _ = built
    markdown = (sweep / "report.md").read_text()
    tree = parsed((sweep / "report.html").read_text())
    targets = re.findall(r"!\[[^\]]*\]\(([^)]*)\)", markdown)
    images = [attrs for tag, attrs in tree.tags if tag == "img"]
    assert len(targets) >= 2 and len(images) == len(targets)
    for target, attrs in zip(targets, images, strict=True):
        prefix, _, data = (attrs["src"] or "").partition(",")
        assert prefix == "data:image/png;base64"
        decoded = base64.b64decode(data, validate=True)
        assert decoded.startswith(PNG_MAGIC) and decoded == (sweep / target).read_bytes()
    # No script, no stylesheet or frame, and no attribute that loads anything but a data URI.
    assert {tag for tag, _ in tree.tags} <= TAGS
    for tag, attrs in tree.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        if "src" in attrs:
            assert (attrs["src"] or "").startswith("data:image/png;base64,")


def test_values_from_run_folders_are_escaped(built) -> None:
    sweep, _ = built
    html = (sweep / "report.html").read_text()
    assert "<script" not in html.lower() and "<img src=x" not in html
    tree = parsed(html)
    text = "".join(tree.text)
    for value in (HOSTILE_NORM, HOSTILE_NAME, str(sweep / FAILED_FOLDER)):
        assert value in text  # shown as text, not as markup
    # The worst case's link: a relative URL, percent-encoded, to the folder that exists.
    (link,) = [a["href"] for tag, a in tree.tags if tag == "a" and "predictions" in (a.get("href") or "")]
    assert link.startswith("x%3Cscript%3Ealert%28%27folder%27%29%3C/script%3E%20%281%29/predictions/")
    assert (sweep / unquote(link)).is_dir()


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("javascript:alert(1)", "javascript%3Aalert%281%29"),
        ("//evil.example/x.png", "/evil.example/x.png"),
        ('a b"<c>/d', "a%20b%22%3Cc%3E/d"),
    ],
)
def test_a_link_target_cannot_become_a_scheme_or_a_host(target: str, expected: str) -> None:
    assert href(target) == expected
    assert inline(f"[x]({target})", {}) == f'<a href="{expected}">x</a>'


def test_an_image_that_is_not_one_of_the_report_s_pngs_is_not_loaded() -> None:
    assert inline("![plot](http://example.com/a.png)", {}) == (
        '<span class="missing">[plot not embedded: plot]</span>'
    )
    assert "data:" not in inline("![p](a.png)", {"a.png": b"GIF89a"})  # not a PNG


@pytest.mark.parametrize(
    "line",
    [
        "[" * MAX_INLINE_CHARS,  # each bracket once scanned to the end: quadratic, seconds
        "".join("`" * k + "a" for k in range(1, 190)),  # tick runs of every length, none closed
        "a " + "`" * 5000 + "a" * 14000,  # one long run: no retrying every shorter run
        "[a](" + "(" * (MAX_INLINE_CHARS - 10),
        "# a" + " " * 100_000 + "<b>",  # a heading whose trailing spaces a lazy pattern would rescan
    ],
)
def test_a_hostile_line_is_converted_in_linear_time(line: str) -> None:
    """Run names, errors and condition values reach report.md unchanged and unbounded."""
    start = time.perf_counter()
    converted = body(line, {})
    assert time.perf_counter() - start < 1.0  # linear: milliseconds; the quadratic patterns took seconds
    assert converted.startswith(("<p>", "<h1>")) and "<b>" not in converted


def test_a_line_longer_than_the_limit_is_escaped_without_formatting() -> None:
    line = "**bold** <i>" + "x" * MAX_INLINE_CHARS
    assert inline(line, {}) == "**bold** &lt;i&gt;" + "x" * MAX_INLINE_CHARS


def test_summary_json_per_case_scores_equal_the_records(built) -> None:
    sweep, report = built
    summary = json.loads((sweep / "summary.json").read_text())
    assert report.files["summary.json"] == sweep / "summary.json"
    runs = summary["runs"]
    assert len(runs) == 19 and {r["status"] for r in runs} == {"completed", "failed"}
    compared = 0
    for entry in runs:
        record = json.loads((sweep / entry["sweep_dir"] / entry["run_folder"] / "metrics.json").read_text())
        assert Path(entry["sweep_dir"]) == sweep
        assert (entry["norm"], entry["batch_size"], entry["seed"]) == (
            record["norm"], record["batch_size"], record["seed"],
        )  # fmt: skip
        if entry["status"] == "failed":
            assert entry["metric_per_case"] == [] and entry["run_folder"] == FAILED_FOLDER
            continue
        for mode, block in {"running": entry, **entry["other_modes"]}.items():
            cases = record["per_case"][mode]
            assert [c["case"] for c in block["metric_per_case"]] == sorted(cases)
            for case in block["metric_per_case"]:
                want = cases[case["case"]]
                assert case["metrics"] == {
                    "fg": {"Dice": want["dice"]["fg"], "HD95": want["hd95"]["fg"]},
                    "absent": {"Dice": None, "HD95": None},
                }
                compared += 1
        # nnU-Net's means: per class over the cases holding it; the absent class has none.
        dice = [record["per_case"]["running"][c]["dice"]["fg"] for c in CASES]
        assert entry["mean"]["fg"]["Dice"] == pytest.approx(sum(dice) / 3, abs=1e-12)
        assert entry["mean"]["absent"] == {"Dice": None, "HD95": None}
        assert entry["foreground_mean"]["Dice"] == pytest.approx(record["val_dice"], abs=1e-12)
        assert entry["foreground_mean"]["HD95"] == 3.0 + entry["seed"]
    assert compared == 18 * 3 + 6 * 3  # every case of every run, the batch runs' batch mode too
    assert [
        r["run_folder"] for r in runs if r["run_name"] == HOSTILE_NAME and r["status"] == "completed"
    ] == [HOSTILE_FOLDER]


def test_summary_json_cell_means_are_over_the_completed_seeds(built) -> None:
    sweep, _ = built
    summary = json.loads((sweep / "summary.json").read_text())
    cells = {(c["norm"], c["batch_size"]): c for c in summary["cells"]}
    assert len(cells) == 6
    cell = cells[("batch", 2)]
    # Seed s scored 0.7 + 0.01 s + 0.02 i on case i: per seed the mean is 0.72 + 0.01 s, over seeds 0.73.
    assert cell["seeds"] == [0, 1, 2]
    assert cell["foreground_mean"]["Dice"] == pytest.approx(0.73, abs=1e-9)
    assert cell["mean"]["fg"]["Dice"] == pytest.approx(0.73, abs=1e-9)
    assert cell["foreground_mean"]["HD95"] == pytest.approx(4.0)  # hd95 3, 4, 5 over the seeds
    assert cell["val_dice"] == pytest.approx(0.73, abs=1e-9)
    # The failed seed of instance at bs 2 is listed with the runs but is in no mean.
    assert cells[("instance", 2)]["seeds"] == [0, 1, 2]


def test_learning_curves_are_drawn_linked_and_embedded(built) -> None:
    sweep, report = built
    assert report.files["learning_curves.png"] == sweep / "learning_curves.png"
    assert (sweep / "learning_curves.png").read_bytes().startswith(PNG_MAGIC)
    markdown = (sweep / "report.md").read_text()
    assert "![learning curves](learning_curves.png)" in markdown
    assert "learning curves" in [a.get("alt") for tag, a in parsed((sweep / "report.html").read_text()).tags]


def test_the_bands_are_the_mean_and_range_over_seeds(built) -> None:
    _, report = built
    (found,) = [cells for _, cells in curves.learning_curves(report.analysis)[0]]
    bands = {(c.cell.norm, c.cell.batch_size): c for c in found}
    assert len(bands) == 6
    loss, dice = bands[("batch", 1)].loss, bands[("batch", 1)].dice
    # Steps 10..50 at 1 patch per step; seeds 0, 1, 2 add 0, 0.01, 0.02 to the loss.
    assert loss.seeds == 3 and loss.x == [10.0, 20.0, 30.0, 40.0, 50.0]
    assert loss.mean == pytest.approx([2.0 - 0.1 * k + 0.01 for k in range(1, 6)])
    assert loss.low == pytest.approx([2.0 - 0.1 * k for k in range(1, 6)])
    assert loss.high == pytest.approx([2.0 - 0.1 * k + 0.02 for k in range(1, 6)])
    assert dice.x == [25.0, 50.0] and dice.mean == pytest.approx([0.51, 0.61])
    # At batch 2 the patches double; the corrupt seed 1 is left out: seeds 0 and 2.
    corrupt = bands[("batch", 2)].loss
    assert corrupt.seeds == 2 and corrupt.x == [20.0, 40.0, 60.0, 80.0, 100.0]
    assert corrupt.mean == pytest.approx([2.0 - 0.1 * k + 0.01 for k in range(1, 6)])
    assert bands[("instance", 2)].loss.seeds == 2  # seed 2 has no curve; seed 3 failed


def test_a_corrupt_curve_and_a_record_without_curves_are_notes(built) -> None:
    sweep, report = built
    markdown = (sweep / "report.md").read_text()
    corrupt = (
        f"learning curves of norm=batch,bs=2,seed=1 ({sweep / 'batch/bs2/s1'}) left out of learning_curves.png: "
        "loss_history[1].step is 'ten', not an integer >= 0"
    )
    missing = (
        "1 completed run(s) record no learning curve (no loss_history or history): not in learning_curves.png"
    )
    for note in (corrupt, missing):
        assert f"- {note}" in markdown and note in report.warnings
