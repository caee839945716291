"""Evidence records: "a figure without its record is not a figure."

A figure quoted in README.md and docs/*.md (or in the toy base's model card) must come from a
committed record written by the command that measured it. A record is one JSON file in the
top-level ``benchmarks/`` folder, written by ``dbkit bench … --save`` (:func:`record` +
:func:`save`);
a committed report's ``reports/<experiment>/<hash>/summary.json`` is a record too (its rows'
metrics, its metrics and timings). ``tests/test_readme_figures.py`` checks every figure those
pages quote against them with :func:`unmatched`.

A record holds the command, git commit and dirty flag (reports/ left out, as provenance does),
the UTC date, the hardware (``dbkit.hardware.describe()``: toy training is chaotic in float
rounding, so a figure is exact only on its hardware), the load average when the command
started (other work on a 2-core machine moves timings far beyond its share), the package
versions runs.py records for provenance, and ``figures``: everything the command printed.
Files are never overwritten: a second record of the same bench, day and commit gets a suffix.

Which numbers of a Markdown text are figures (:func:`figures_in`):

- only prose counts: fenced code blocks, inline code spans and HTML comments are commands and
  settings. Backticks are also how prose marks a number that is not a measurement: a setting
  or target (`` `0.3` ``, `` `1.5×` ``), arithmetic, another paper's figure;
- a decimal (``0.86``, ``20.7``), a ratio (``1.35×``, ``0.01x``; not a size such as
  ``64×64``), a percentage (``84%``, ``14 %``), a number with a unit of time or rate
  (``286 s``, ``9.3 min``, ``80 minutes``, ``47 ms``, ``5 µs``, ``20.7 steps/s``), and a table
  cell that is a bare number (a column header names its unit); a range ``0.58–0.75`` or a
  list ``88/97%`` gives every number in it, with the unit of its last;
- not figures: integers without such a unit (steps, seeds, ranks, counts), version numbers
  (``3.11.7``, ``v2.5``, ``SD1.5``: a dot-separated triple or a number glued to letters),
  dates and times of day (``2026-11-30``, ``10:00``), commit hashes, scientific notation
  (``2e-3``), numbers inside words or paths (``p0``, ``lora_te1_``, ``90-minute``), and a
  confidence level (``Wilson 95% interval``: a setting of the statistic).

A figure matches a record value when the value rounds to it at the quoted precision (half a
unit of the last quoted digit either way): ``84%`` matches 0.84 (or 84), ``9.3 min`` matches
558 s, ``47 ms`` matches 0.047 s. A figure with a time unit matches only values the record
names as times (a key ending in ``_s``/``seconds``/``_ms``/``_min``, or under ``timings``),
one in steps/s only a rate (``per_s``), and a percentage or ratio never a time, so a timing
cannot pass by equalling some metric. Where a figure's paragraph names records
(``benchmarks/<file>.json``, ``reports/<experiment>[/<hash>]``; a table belongs to the
paragraph above it) only those count: with some thirty reports of two-decimal rates, almost
any value in [0, 1] is in one of them, so a figure should say where it comes from.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import hardware
from .files import atomic_write_json, read_json
from .runs import _REPO_ROOT, code_state, package_versions, utc_now

BENCHMARKS = _REPO_ROOT / "benchmarks"
FORMAT = "dbkit-evidence/1"


# ----------------------------------------------------------------------------- writing records


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none): a timing taken at
    load 3 on 2 cores is not one taken idle."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def record(command: str, figures: dict, **extra: Any) -> dict:
    """The evidence record of one measurement: ``figures`` is what ``command`` printed.
    Pass ``load_avg_start=load_average()`` taken before measuring (else it is read now, which
    is the end of the measurement); other keyword arguments are stored as they are."""
    load = extra.pop("load_avg_start", None) or load_average()
    hw = hardware.describe()
    return {"format": FORMAT, "command": command, "date": utc_now(), **code_state(),
            "hardware": hw, "hardware_summary": hardware.summary(hw), "load_avg_start": load,
            "load_avg_end": load_average(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "python": sys.version.split()[0], "packages": package_versions(),
            **extra, "figures": figures}


def _file_name(rec: Mapping[str, Any], name: str) -> str:
    date = str(rec.get("date") or utc_now())[:10].replace("-", "")
    commit = (rec.get("git_commit") or "nogit")[:7]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "record"
    return f"{safe}-{date}-{commit}"


def save(rec: Mapping[str, Any], name: str, folder: str | Path | None = None) -> Path:
    """Write ``rec`` as ``<folder>/<name>-<UTC date>-<short commit>.json`` (folder: the
    repository's ``benchmarks/``), atomically; an existing file is never replaced: the next
    free ``-2``, ``-3`` … name is taken instead."""
    folder = Path(folder) if folder is not None else BENCHMARKS
    stem = _file_name(rec, name)
    folder.mkdir(parents=True, exist_ok=True)
    # the complete file is written under a hidden name first, then hard-linked to its final
    # name: link() fails when the name exists, so even two savers racing cannot overwrite
    tmp = folder / f".{stem}.{os.getpid()}.partial"
    atomic_write_json(tmp, dict(rec))
    try:
        for k in range(1, 10_000):
            path = folder / (f"{stem}.json" if k == 1 else f"{stem}-{k}.json")
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                continue
            except OSError:  # a filesystem without hard links: check, then rename (not race-free)
                if path.exists():
                    continue
                os.replace(tmp, path)
                return path
        raise FileExistsError(f"{folder}: no free name for {stem}")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def relative_name(path: str | Path) -> str:
    """``benchmarks/<file>.json`` as README.md and docs/*.md quote it: relative to the repository
    when inside it."""
    path = Path(path).resolve()
    try:
        return path.relative_to(_REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- figures in text

_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "min": 60.0, "h": 3600.0}
_UNIT_WORDS = {"minute": "min", "minutes": "min", "second": "s", "seconds": "s", "hour": "h", "hours": "h"}
_NUM = r"\d+(?:\.\d+)?"
# a number not glued to a word, path, version, date or time of day; more numbers of a range
# (0.58–0.75) or a list (88/97%), sharing its unit;
# an optional unit, itself not the start of a longer word
_FIGURE_RE = re.compile(
    rf"(?<![\w.:\-–+^/])(?P<a>{_NUM})(?P<more>(?:[–/]{_NUM})*)"
    r"(?P<unit>\s?%|[×x](?![\w\d])|\s(?:steps/s|minutes?|min|seconds?|ms|µs|s|hours?|h)(?![\w/]))?"
    r"(?![\w\-:]|\.\d)")
_FENCE_RE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
_CODE_RE = re.compile(r"`[^`]*`")
_COMMENT_RE = re.compile(r"<!--.*?-->", re.S)
_LEVEL_RE = re.compile(r"\s+(?:\w+\s+)?(?:interval|confidence|CI)\b")
_CELL_RE = re.compile(r"(?<=\|)\s*(\d+)\s*(?=\|)")


@dataclass(frozen=True)
class Figure:
    """A number quoted as a measurement: as written, its value, unit ('' for none; '%', '×',
    's', 'min', 'ms', 'µs', 'h', 'steps/s'), decimals quoted, and the 1-based line."""

    text: str
    value: float
    unit: str
    decimals: int
    line: int


def _blank(m: re.Match) -> str:
    # keeps newlines so that offsets still give the right line numbers
    return re.sub(r"[^\n]", " ", m.group(0))


def prose(text: str) -> str:
    """``text`` with fenced code, inline code and HTML comments blanked (same length, same lines)."""
    for rx in (_FENCE_RE, _COMMENT_RE, _CODE_RE):
        text = rx.sub(_blank, text)
    return text


def _figure(number: str, unit: str, line: int, written: str) -> Figure:
    decimals = len(number.split(".")[1]) if "." in number else 0
    return Figure(written, float(number), unit, decimals, line)


def figures_in(text: str) -> list[Figure]:
    """Every figure of a Markdown text, in order (the rule is in the module docstring)."""
    clean = prose(text)
    found: list[tuple[int, Figure]] = []
    for m in _FIGURE_RE.finditer(clean):
        unit = (m.group("unit") or "").strip().replace("x", "×")
        unit = _UNIT_WORDS.get(unit, unit)
        numbers = [m.group("a"), *re.findall(_NUM, m.group("more"))]
        if not unit and not any("." in n for n in numbers):
            continue  # a bare integer (steps, seeds, counts) is not a figure, except in a table
        if unit == "%" and _LEVEL_RE.match(clean, m.end()):
            continue  # "Wilson 95% interval": a confidence level is a setting of the statistic
        line = clean.count("\n", 0, m.start()) + 1
        for n in numbers:
            if unit or "." in n:
                found.append((m.start(), _figure(n, unit, line, m.group(0).strip())))
    for m in _CELL_RE.finditer(clean):
        line_text = clean[clean.rfind("\n", 0, m.start()) + 1:clean.find("\n", m.start())]
        if line_text.lstrip().startswith("|"):
            found.append((m.start(), _figure(m.group(1), "", clean.count("\n", 0, m.start()) + 1, m.group(1))))
    return [f for _, f in sorted(found, key=lambda p: p[0])]


# ----------------------------------------------------------------------------- matching records


def record_values(rec: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """Every (dotted key path, number) in ``rec``; booleans are not numbers."""
    if isinstance(rec, Mapping):
        for k, v in rec.items():
            yield from record_values(v, f"{path}.{k}" if path else str(k))
    elif isinstance(rec, list):
        for i, v in enumerate(rec):
            yield from record_values(v, f"{path}[{i}]")
    elif isinstance(rec, (int, float)) and not isinstance(rec, bool) and math.isfinite(rec):
        yield path, float(rec)


def figures_of_record(rec: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The measured numbers of a record: a bench record's ``figures``; a report's rows'
    metrics, its metrics and its timings (not its params, hashes or provenance)."""
    if "figures" in rec:
        return list(record_values(rec["figures"], "figures"))
    out: list[tuple[str, float]] = []
    for i, row in enumerate(rec.get("rows") or []):
        if isinstance(row, Mapping):
            out += record_values(row.get("metrics") or {}, f"rows[{i}].metrics")
    for key in ("metrics", "timings"):
        out += record_values(rec.get(key) or {}, key)
    return out


def _time_unit_of(key: str) -> float | None:
    """Seconds per unit of a value named as a time, else None."""
    k = key.lower()
    if "per_s" in k:
        return None
    if k.startswith("timings.") or ".timings." in k or k.endswith(("_s", "seconds", "_sec")):
        return 1.0
    if k.endswith("_ms"):
        return 1e-3
    if k.endswith("_min"):
        return 60.0
    return None


def matches(fig: Figure, key: str, value: float) -> bool:
    """Whether ``value`` (named ``key`` in its record) rounds to ``fig`` at its quoted precision."""
    tol = 0.5 * 10 ** -fig.decimals + 1e-9
    if fig.unit in _TIME_UNITS:
        seconds_per = _time_unit_of(key)
        return seconds_per is not None and abs(value * seconds_per / _TIME_UNITS[fig.unit] - fig.value) <= tol
    if fig.unit == "steps/s":
        return "per_s" in key.lower() and abs(value - fig.value) <= tol
    if fig.unit and (_time_unit_of(key) is not None or "per_s" in key.lower()):
        return False  # a share or a ratio is not a time: 92% must not pass as 92.4 s
    candidates = [value, value * 100] if fig.unit == "%" else [value]
    return any(abs(c - fig.value) <= tol for c in candidates)


def load_records(paths: Iterable[str | Path]) -> dict[str, list[tuple[str, float]]]:
    """file name → its measured numbers, for every readable JSON record among ``paths``."""
    out = {}
    for p in paths:
        rec = read_json(p)
        if isinstance(rec, Mapping):
            out[str(p)] = figures_of_record(rec)
    return out


def committed_records(root: str | Path = _REPO_ROOT) -> list[Path]:
    """``benchmarks/*.json`` and the committed ``reports/*/*/summary.json`` of ``root`` (a
    report folder that git does not track is a local run's, not a record anyone can read)."""
    root = Path(root)
    out = sorted((root / "benchmarks").glob("*.json"))
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--", "reports/*/*/summary.json"], cwd=root,
                                capture_output=True, text=True, timeout=30, check=True).stdout
        out += [root / p for p in sorted(listed.split("\0")) if p]
    except (OSError, subprocess.SubprocessError):  # no git: every report on disk
        out += sorted(root.glob("reports/*/*/summary.json"))
    return out


# a bench record's file, or a committed report (reports/<experiment>[/<hash12>]; not the
# index page, nor a pattern such as reports/notes-*/ or reports/<experiment>)
_NAMED_RE = re.compile(r"benchmarks/[\w.-]+\.json|reports/(?!index\.html)[\w-]+(?:/[0-9a-f]{12})?(?![\w*<-]|\.\w)")


def named_records(text: str) -> dict[int, list[str]]:
    """1-based line → the records its paragraph names, ``benchmarks/….json`` files and
    ``reports/<experiment>[/<hash>]`` folders (a table counts as part of the paragraph above
    it): a paragraph that names its records is checked against those alone, so a figure
    cannot pass by equalling some unrelated record's value (with some thirty reports of
    two-decimal rates, most values in [0, 1] are in one of them)."""
    blocks: list[list[int]] = [[]]
    lines = text.split("\n")
    for i, line in enumerate(lines, start=1):
        if line.strip():
            blocks[-1].append(i)
        elif blocks[-1]:
            blocks.append([])
    out: dict[int, list[str]] = {}
    above: list[str] = []
    for block in blocks:
        if not block:
            continue
        names = [n for i in block for n in _NAMED_RE.findall(lines[i - 1])]
        if lines[block[0] - 1].lstrip().startswith("|"):
            names += above
        else:
            above = names
        for i in block:
            out[i] = names
    return out


def _is_named(path: str, named: list[str]) -> bool:
    p = "/" + Path(path).as_posix()
    return any(p.endswith("/" + n) if n.endswith(".json") else f"/{n}/" in p for n in named)


def unmatched(text: str, records: Mapping[str, list[tuple[str, float]]]) -> list[Figure]:
    """The figures of ``text`` that no record holds (only the records its paragraph names,
    when it names some)."""
    scope = named_records(text)
    missing = []
    for f in figures_in(text):
        named = scope.get(f.line) or []
        pool = [kv for path, vals in records.items() if not named or _is_named(path, named) for kv in vals]
        if not any(matches(f, k, v) for k, v in pool):
            missing.append(f)
    return missing
