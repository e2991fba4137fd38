"""The declared questions as the reader sees them: a table, the design, one sentence and one power line each.

Every verdict and interval printed here is the one sequential.answer decided; the text adds nothing the
verdict does not say.
"""

from __future__ import annotations

from norm_experiments.report.primary import STOP_TIME, Primary, power_text
from norm_experiments.report.questions import Question
from norm_experiments.report.sequential import Answer, Look
from norm_experiments.report.tables import NO_DATA, markdown_table, verdict_word
from norm_experiments.report.verdicts import Verdict

NOT_STOPPED = "the sweep's study.json does not say how it stopped (still running, or interrupted)"


def _digits(found: Answer) -> int:
    return 3 if found.question.metric == "val_dice" else 1


def difference_text(found: Answer) -> str:
    """'-0.087 [-0.121, -0.053]' at the deciding (or last) look; '—' before any look."""
    look = found.final
    interval = look.interval if look else None
    if look is None or interval is None:
        return NO_DATA
    d = _digits(found)
    return f"{look.estimate.mean:+.{d}f} [{interval[0]:+.{d}f}, {interval[1]:+.{d}f}]"  # type: ignore[union-attr]


def metric_word(question: Question) -> str:
    """What a question's differences are in: Dice or HD95 (questions.METRICS)."""
    return "Dice" if question.metric == "val_dice" else "HD95"


def verdict_text(found: Answer) -> str:
    look = found.final
    if look is None:
        return "no look yet"
    word = verdict_word(look.verdict, found.question.margin)
    if look.verdict is Verdict.INCONCLUSIVE:
        return f"{word} (open)"
    return word


def _look_text(look: Look | None, primary: Primary) -> str:
    if look is None:
        return NO_DATA
    return f"{look.k + 1} of {len(primary.design.looks)} ({look.seeds} seeds)"


def primary_table(primary: Primary) -> str:
    header = ["question", "a minus b", "look (seeds)", "a", "b", "difference [interval]", "level", "verdict"]
    rows = []
    for found in primary.answers:
        q, look = found.question, found.final
        d = _digits(found)
        rows.append(
            [
                q.name,
                f"{q.a.label()} minus {q.b.label()}",
                _look_text(look, primary),
                f"{look.a_mean:.{d}f}" if look and look.estimate else NO_DATA,
                f"{look.b_mean:.{d}f}" if look and look.estimate else NO_DATA,
                difference_text(found),
                f"{100 * (1 - look.level):.3g}%" if look else NO_DATA,
                verdict_text(found),
            ]
        )
    return markdown_table(header, rows, align="lllrrrrl")


def stop_text(primary: Primary) -> str:
    looks = primary.design.looks
    taken = f"{primary.n_looks} of {len(looks)} look(s) had all their seeds finished"
    if primary.all_decided:
        return f"{taken}; every question is decided.{_time_text(primary)}"
    reason = primary.stopped or NOT_STOPPED
    if reason == STOP_TIME:  # the cap counts every invocation of the command: rerun alone, it stops again
        reason += " (the same command with a larger hydra.sweeper.study.max_minutes takes the next look)"
    open_ = sum(not a.decided for a in primary.answers)
    return f"{taken}; {open_} question(s) open; the sweep stopped: {reason}.{_time_text(primary)}"


def _time_text(primary: Primary) -> str:
    """' The sweep ran 13.2 min (cap 14 min).': study.json's minutes, every invocation of the command."""
    if primary.minutes is None:
        return ""
    cap = primary.design.max_minutes
    return f" The sweep ran {primary.minutes:.1f} min" + (f" (cap {cap:g} min)." if cap else ".")


def sentence(found: Answer) -> str:
    """'eval_gap_bs1 (At batch 1, ...?): worse, -0.087 [...] at look 1 (6 seeds).'"""
    q, look = found.question, found.final
    if look is None or look.estimate is None:
        return f"`{q.name}` ({q.text}): no look yet."
    where = f"at look {look.k + 1} ({look.seeds} seeds)"
    unit = "" if q.metric == "val_dice" else " mm"
    return (
        f"`{q.name}` ({q.text}): **{verdict_text(found)}**; {metric_word(q)} of {q.a.label()} minus {q.b.label()}: "
        f"{difference_text(found)}{unit} {where}; equivalence margin ±{q.margin:g}{unit}."
    )


def primary_lines(primary: Primary, heading: str = "##") -> list[str]:
    title = f"{heading} Declared questions" + (f" ({primary.condition})" if primary.condition else "")
    lines = [title, "", primary_table(primary), ""]
    lines += [
        f"Design: {primary.design.describe()}. {stop_text(primary)} A verdict is read off the question's "
        "interval at its look's level: better / worse = entirely above / below 0 (for HD95, lower is better), "
        "equivalent = inside ±margin; the first look that decides a question fixes its verdict. Error rates "
        "hold over every question and look together (docs/explanation/statistics.md).",
        "",
    ]
    for found in primary.answers:
        lines.append(f"- {sentence(found)} Power: {power_text(found, primary.design)}.")
    lines += [f"- Note: {note}" for note in primary.notes]
    return lines + [""]


def console_lines(primary: Primary) -> list[str]:
    """What the end of a study prints first: one line per question, then how the study stopped."""
    where = f" ({primary.condition})" if primary.condition else ""
    lines = [f"Declared questions{where}:"]
    for found in primary.answers:
        # The metric named: `norm-exp-report --metric val_hd95` prints these Dice questions above HD95 tables.
        q = found.question
        look = f", look {_look_text(found.final, primary)}" if found.final is not None else ""
        lines.append(f"  {q.name}: {verdict_text(found)}, {metric_word(q)} {difference_text(found)}{look}")
        if not found.decided:
            lines.append(f"    power: {power_text(found, primary.design)}")
    lines.append(f"  {stop_text(primary)}")
    return lines
