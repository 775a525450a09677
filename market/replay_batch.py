"""One scorecard over many replay files (``--replay A.csv B.csv …`` or a folder; SPEC section 15).

Each file is replayed by its own ``python bot.py --replay FILE --replay-worker``
process, at most ``--jobs`` at once. A worker reports on stdout in JSON lines
(:data:`EVENT_PREFIX`): progress marks while it runs, then its summary row; its log
goes to stderr. :func:`run_batch` starts the workers, turns their reports into
lines prefixed with the file name, makes a row of every file (a worker that fails,
crashes or is killed becomes that file's error row) and writes ``summary.json`` and
``summary.md``. A single file runs in-process (``app.run``) and uses the same rows,
lines and summary.

The figures are pure functions of the per-file reports: :func:`file_row`,
:func:`error_row`, :func:`totals`, :func:`build_summary`, :func:`render_markdown`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from errors import ConfigError
from market.replay import hit_rate_block

log = logging.getLogger(__name__)

BOT_PY = Path(__file__).resolve().parents[1] / "bot.py"
EVENT_PREFIX = "@replay "
STRATEGY_NAMES = ("regime_aware", "symmetric", "buy_and_hold")
STRATEGY_FIELDS = (
    "net_pnl_usd",
    "max_drawdown_pct",
    "grid_max_drawdown_usd",
    "realized_pnl_usd",
    "cycles",
    "fees_usd",
    "capacity_stop_share",
    "inventory_peak_usd",
)
REGIME_FIELDS = (
    "tier_share",
    "tier2_share_while_shallow",
    "shallow_cycles",
    "tier2_cycles_while_shallow",
    "direction_hit_rate",
)
HIT_KEYS = ("1", "2", "directional")
SUMMED_FIELDS = ("net_pnl_usd", "grid_max_drawdown_usd", "realized_pnl_usd", "cycles", "fees_usd", "inventory_peak_usd")
PROGRESS_STEP_PCT = 10
KILL_AFTER_SEC = 10.0  # a stopped worker that has not gone by then is killed
STDERR_KEPT = 20  # a crashed worker's last log lines, for its error


# ---------------------------------------------------------------- the command line


def replay_files(paths: Sequence[str]) -> list[str]:
    """The files of ``--replay``: a directory stands for its ``*_1m.csv`` files, sorted by name.

    A path that is not a directory is kept as given, even if it does not exist: a file
    that cannot be read is that file's error row, not an error of the whole command.
    """
    files: list[str] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted((p for p in path.glob("*_1m.csv") if not p.is_dir()), key=lambda p: p.name)
            if not found:
                raise ConfigError(f"--replay: no *_1m.csv files in {given}")
            files.extend(str(p) for p in found)
        else:
            files.append(given)
    return files


def report_paths(files: Sequence[str], *, report: str | None, report_dir: str | None) -> list[Path]:
    """Where each file's report goes: ``--report`` (one file only), else ``--report-dir/NAME.report.json``,
    else ``FILE.report.json`` beside the file. Two files may not share a report."""
    if report is not None:
        if len(files) > 1:
            raise ConfigError("--report names one file's report; with several files use --report-dir")
        return [Path(report)]
    if report_dir is not None:
        paths = [Path(report_dir) / f"{Path(f).name}.report.json" for f in files]
    else:
        paths = [Path(f"{f}.report.json") for f in files]
    seen: dict[Path, str] = {}
    for file, path in zip(files, paths, strict=True):
        key = path.resolve()
        if key in seen:
            raise ConfigError(f"--replay: {seen[key]} and {file} would both write {path}")
        seen[key] = file
    return paths


def check_usage(args: argparse.Namespace, files: Sequence[str]) -> None:
    """Refuse flag combinations that make no sense for the files given (a usage error, exit 2)."""
    if not args.replay:
        for flag, value in (("--report-dir", args.report_dir), ("--jobs", args.jobs)):
            if value is not None:
                raise ConfigError(f"{flag} only applies to --replay")
        if args.replay_worker:
            raise ConfigError("--replay-worker only applies to --replay")
        return
    if len(files) > 1:
        for flag, value in (("--serve", args.serve), ("--db", args.db), ("--replay-worker", args.replay_worker)):
            if value:
                raise ConfigError(f"{flag} needs a single --replay file ({len(files)} given)")
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")


def make_report_dir(report_dir: str | None) -> None:
    """Create ``--report-dir`` before anything runs: one that cannot exist is a usage error."""
    if report_dir is None:
        return
    try:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--report-dir {report_dir}: {exc.strerror or exc}") from exc


def summary_dir(report_dir: str | None, first_report: Path) -> Path:
    """``--report-dir``, else the directory of the first file's report (beside the file by default)."""
    return Path(report_dir) if report_dir is not None else first_report.parent


def forwarded_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, skip: Iterable[str]) -> list[str]:
    """The flags the user gave (those not at their default), as a worker's command line needs them.

    Generic on purpose: a flag added later reaches the workers without changing this.
    """
    skipped = set(skip) | {"help"}
    out: list[str] = []
    for action in parser._actions:
        if action.dest in skipped or not action.option_strings:
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default:
            continue
        option = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        if action.nargs == 0:  # store_true / store_false / store_const / count
            times = value if isinstance(value, int) and not isinstance(value, bool) else 1
            out.extend([option] * times)
        elif isinstance(value, list):
            if action.nargs in ("+", "*") or isinstance(action.nargs, int):
                out.extend([option, *map(str, value)])
            else:  # append
                for item in value:
                    out.append(f"{option}={item}")
        else:
            out.append(f"{option}={value}")
    return out


# ---------------------------------------------------------------- rows, totals, table (pure)


def file_row(
    file: str, report: Mapping[str, Any], *, report_path: str | None = None, wall_sec: float | None = None
) -> dict[str, Any]:
    """A file's row of ``summary.json`` from its replay report."""
    strategies = report.get("strategies")
    if not strategies:
        return error_row(file, "the replay priced no candle", report_path=report_path, wall_sec=wall_sec)
    picked: dict[str, Any] = {}
    for name in STRATEGY_NAMES:
        s = strategies.get(name) or {}
        fields = STRATEGY_FIELDS + (REGIME_FIELDS if name == "regime_aware" else ())
        picked[name] = {k: s.get(k) for k in fields}
    return {
        "file": file,
        "error": None,
        "candles": report.get("candles"),
        "strategies": picked,
        "report": report_path,
        "wall_sec": None if wall_sec is None else round(wall_sec, 3),
    }


def error_row(
    file: str, error: str, *, report_path: str | None = None, wall_sec: float | None = None
) -> dict[str, Any]:
    """The row of a file that could not be replayed to its end."""
    return {
        "file": file,
        "error": error,
        "candles": None,
        "strategies": None,
        "report": report_path,
        "wall_sec": None if wall_sec is None else round(wall_sec, 3),
    }


def _sum(values: Iterable[float | None], digits: int) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present), digits) if present else None


def _weighted(pairs: Iterable[tuple[float | None, float]], digits: int = 4) -> float | None:
    """Mean of ``value`` weighted by ``weight``, over the values present."""
    num = den = 0.0
    for value, weight in pairs:
        if value is not None and weight:
            num += value * weight
            den += weight
    return round(num / den, digits) if den else None


def _strategy_totals(name: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    figures = [(r["strategies"][name], r["candles"] or 0) for r in rows]
    out: dict[str, Any] = {}
    for key in SUMMED_FIELDS:
        total = _sum((s.get(key) for s, _ in figures), 6)
        out[key] = int(total) if key == "cycles" and total is not None else total
    drawdowns = [s["max_drawdown_pct"] for s, _ in figures if s.get("max_drawdown_pct") is not None]
    out["max_drawdown_pct"] = max(drawdowns) if drawdowns else None
    out["capacity_stop_share"] = _weighted((s.get("capacity_stop_share"), w) for s, w in figures)
    if name != "regime_aware":
        return {k: out[k] for k in STRATEGY_FIELDS}
    out["tier_share"] = {
        tier: _weighted(((s.get("tier_share") or {}).get(tier), w) for s, w in figures) for tier in ("0", "1", "2")
    }
    shallow = sum(s.get("shallow_cycles") or 0 for s, _ in figures)
    tier2 = sum(s.get("tier2_cycles_while_shallow") or 0 for s, _ in figures)
    out["tier2_share_while_shallow"] = round(tier2 / shallow, 4) if shallow else None
    out["shallow_cycles"] = shallow
    out["tier2_cycles_while_shallow"] = tier2
    rates = {}
    for key in HIT_KEYS:
        parts = [((s.get("direction_hit_rate") or {}).get(key) or {}) for s, _ in figures]
        rates[key] = hit_rate_block(
            sum(p.get("hits") or 0 for p in parts),
            sum(p.get("scored") or 0 for p in parts),
            sum(p.get("scorable") or 0 for p in parts),
        )
    out["direction_hit_rate"] = rates
    return {k: out[k] for k in STRATEGY_FIELDS + REGIME_FIELDS}


def totals(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``totals`` of ``summary.json`` over the rows that have figures.

    Every file is its own account, so USD figures, cycles and fees add up
    (``grid_max_drawdown_usd`` too); ``max_drawdown_pct`` is the worst file's; shares
    are weighted by candles, ``tier2_share_while_shallow`` by shallow cycles; hit rates
    and their coverage are pooled over scored and scorable cycles.
    """
    good = [r for r in rows if r.get("error") is None and r.get("strategies")]
    out: dict[str, Any] = {name: _strategy_totals(name, good) for name in STRATEGY_NAMES}
    out["files"] = len(rows)
    out["failed_files"] = len(rows) - len(good)
    out["candles"] = sum(r["candles"] or 0 for r in good)
    pairs = [
        [r["strategies"][name].get("grid_max_drawdown_usd") for name in ("regime_aware", "symmetric")] for r in good
    ]
    compared = [(a, b) for a, b in pairs if a is not None and b is not None]
    out["grid_drawdown_compared_files"] = len(compared)
    out["regime_aware_lower_grid_drawdown_files"] = sum(1 for a, b in compared if a < b)
    return out


def build_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``summary.json``: ``{"files": rows, "totals": …}``."""
    return {"files": [dict(r) for r in rows], "totals": totals(rows)}


def _usd(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:+,.2f}" if signed else f"{v:,.2f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 100:.1f}%"


def _hit(h: Mapping[str, Any] | None) -> str:
    if not h or h.get("hit_rate") is None:
        return "n/a"
    return f"{_pct(h['hit_rate'])} of {h['scored']:,} (cov. {_pct(h['coverage'])})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Iterable[int]) -> list[str]:
    """A Markdown table padded to its column widths, so it reads in a terminal too."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    right = set(right)

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if i in right else "-" * w for i, w in enumerate(widths)]
    return [line(header), line(rule), *(line(r) for r in rows)]


def _name(file: str) -> str:
    return Path(file).name.replace("|", "\\|")


def render_markdown(summary: Mapping[str, Any]) -> str:
    """``summary.md``: the strategies per file and in total, the regime-aware grid's tiers and hit
    rates, and the files that failed."""
    rows, tot = summary["files"], summary["totals"]
    lines = ["# Replay summary", ""]
    lines.append(
        f"{tot['files']} file(s), {tot['failed_files']} failed, {tot['candles']:,} candles replayed. "
        f"The regime-aware grid's drawdown beyond holding its start (grid max DD) was lower than the "
        f"symmetric grid's on {tot['regime_aware_lower_grid_drawdown_files']} of "
        f"{tot['grid_drawdown_compared_files']} file(s)."
    )
    lines.append("")
    header = ["file", "strategy", "net P&L USD", "max DD %", "grid max DD USD", "realized USD", "cycles",
              "fees USD", "capacity stop", "inventory peak USD"]  # fmt: skip
    body: list[list[str]] = []

    def strategy_cells(label: str, name: str, s: Mapping[str, Any]) -> list[str]:
        dd = s.get("max_drawdown_pct")
        return [label, name, _usd(s.get("net_pnl_usd"), signed=True), "n/a" if dd is None else f"{dd:.2f}",
                _usd(s.get("grid_max_drawdown_usd")), _usd(s.get("realized_pnl_usd"), signed=True),
                "n/a" if s.get("cycles") is None else f"{s['cycles']:,}", _usd(s.get("fees_usd")),
                _pct(s.get("capacity_stop_share")), _usd(s.get("inventory_peak_usd"))]  # fmt: skip

    for r in rows:
        if r.get("error") is not None or not r.get("strategies"):
            body.append([_name(r["file"]), "FAILED", *[""] * (len(header) - 2)])
            continue
        for i, name in enumerate(STRATEGY_NAMES):
            body.append(strategy_cells(_name(r["file"]) if i == 0 else "", name, r["strategies"][name]))
    for i, name in enumerate(STRATEGY_NAMES):
        body.append(strategy_cells("**total**" if i == 0 else "", name, tot[name]))
    lines += ["## Strategies", "", *_table(header, body, right=range(2, len(header))), ""]

    header = ["file", "tier 0", "tier 1", "tier 2", "tier 2 while shallow", "hit rate tier 1", "hit rate tier 2",
              "hit rate directional"]  # fmt: skip
    body = []

    def regime_cells(label: str, s: Mapping[str, Any]) -> list[str]:
        share = s.get("tier_share") or {}
        hits = s.get("direction_hit_rate") or {}
        shallow = f"{_pct(s.get('tier2_share_while_shallow'))} of {s.get('shallow_cycles') or 0:,}"
        return [label, *(_pct(share.get(t)) for t in ("0", "1", "2")), shallow, *(_hit(hits.get(k)) for k in HIT_KEYS)]

    for r in rows:
        if r.get("error") is None and r.get("strategies"):
            body.append(regime_cells(_name(r["file"]), r["strategies"]["regime_aware"]))
    body.append(regime_cells("**total**", tot["regime_aware"]))
    lines += [
        "## Regime-aware grid: tiers and direction",
        "",
        "Share of cycles per effective tier; mechanical tier 2 among the cycles with a shallow primary model; "
        "hit rate of each tier's direction against the sign of the next 60 minutes' return, of the scored "
        "cycles, with coverage (scored / all scorable cycles).",
        "",
        *_table(header, body, right=range(1, len(header))),
        "",
    ]
    failed = [r for r in rows if r.get("error") is not None]
    if failed:
        lines += ["## Failed files", ""]
        lines += [f"- `{_name(r['file'])}`: {r['error']}" for r in failed]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- progress and result lines


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M")


def progress_line(file: str, candle_time: float, pct: int) -> str:
    return f"{Path(file).name}: {_when(candle_time)} ({pct}%)"


def result_line(row: Mapping[str, Any]) -> str:
    """A file's last line: done (candles, wall seconds, both grids' net P&L) or its error."""
    name = Path(row["file"]).name
    if row.get("error") is not None:
        return f"{name}: FAILED: {row['error']}"
    s = row["strategies"]
    wall = row.get("wall_sec")
    took = f" in {wall:.1f} s" if wall is not None else ""
    return (
        f"{name}: done: {row['candles']:,} candles{took}; net P&L regime_aware "
        f"{_usd(s['regime_aware']['net_pnl_usd'], signed=True)} USD, "
        f"symmetric {_usd(s['symmetric']['net_pnl_usd'], signed=True)} USD"
    )


class ReplayProgress:
    """Calls ``report(candle_time, pct)`` each time the replay passes another ``step_pct`` percent
    of its span. :meth:`check` runs every cycle and costs one comparison until a mark is due."""

    def __init__(
        self, start: float, end: float, report: Callable[[float, int], None], step_pct: int = PROGRESS_STEP_PCT
    ) -> None:
        self._start, self._span = start, max(end - start, 1.0)
        self._report, self._step = report, step_pct
        self._next_at = start + self._span * step_pct / 100.0

    def check(self, now: float) -> None:
        if now < self._next_at:
            return
        pct = int((now - self._start) * 100 // self._span)
        mark = pct // self._step * self._step
        if mark >= 100:  # the end is the result line's
            self._next_at = math.inf
            return
        self._next_at = self._start + self._span * (mark + self._step) / 100.0
        self._report(now - 60, pct)  # the newest closed candle opened a minute ago


class ConsoleReporter:
    """A single-file replay's progress and result as lines on ``out``."""

    def __init__(self, file: str, out: TextIO) -> None:
        self.file, self.out = file, out

    def progress(self, candle_time: float, pct: int) -> None:
        print(progress_line(self.file, candle_time, pct), file=self.out, flush=True)

    def result(self, row: Mapping[str, Any]) -> None:
        print(result_line(row), file=self.out, flush=True)


class EventReporter:
    """A worker's progress and result as JSON lines for :func:`run_batch`."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def _emit(self, event: dict[str, Any]) -> None:
        print(EVENT_PREFIX + json.dumps(event), file=self.out, flush=True)

    def progress(self, candle_time: float, pct: int) -> None:
        self._emit({"event": "progress", "time": candle_time, "pct": pct})

    def result(self, row: Mapping[str, Any]) -> None:
        self._emit({"event": "result", "row": dict(row)})


class FileOutcome:
    """How a replay of one file in this process reports: progress marks while it runs, then its row
    (a result line, and the summary unless it is a batch's worker, whose batch writes it)."""

    def __init__(
        self,
        file: str,
        report: Path,
        *,
        reporter: ConsoleReporter | EventReporter,
        summary_to: Path | None,
        out: TextIO = sys.stdout,
    ) -> None:
        self.file, self.report, self.reporter, self.summary_to, self.out = file, report, reporter, summary_to, out
        self.started = time.monotonic()
        self._span = (0.0, 1.0)

    @classmethod
    def of_one_file(cls, file: str, report: Path, *, worker: bool, report_dir: str | None, out: TextIO) -> FileOutcome:
        """Lines and a summary for ``--replay FILE``; JSON events and no summary for a batch's worker."""
        if worker:
            return cls(file, report, reporter=EventReporter(out), summary_to=None, out=out)
        to = summary_dir(report_dir, report)
        return cls(file, report, reporter=ConsoleReporter(file, out), summary_to=to, out=out)

    def watch(
        self, until: Callable[[], bool], now: Callable[[], float], start: float, end: float
    ) -> Callable[[], bool]:
        """``until`` for the loop, reporting the progress marks on the way (no I/O between marks)."""
        progress = ReplayProgress(start, end, self.reporter.progress)
        self._span = (start, end)

        def finished() -> bool:
            progress.check(now())
            return until()

        return finished

    def done(self, report: Mapping[str, Any]) -> int:
        wall = time.monotonic() - self.started
        return self._finish(file_row(self.file, report, report_path=str(self.report), wall_sec=wall))

    def failed(self, error: str) -> int:
        return self._finish(error_row(self.file, error, wall_sec=time.monotonic() - self.started))

    def interrupted(self, now: float, signum: int) -> int:
        """Stopped by a signal before its last candle: the report is partial, the row an error."""
        start, end = self._span
        pct = int(max(0.0, now - start) * 100 // max(end - start, 1.0))
        error = f"interrupted by {_signal_name(signum)} at {_when(now - 60)} ({pct}%)"
        row = error_row(self.file, error, report_path=str(self.report), wall_sec=time.monotonic() - self.started)
        self._finish(row)
        return 128 + signum

    def _finish(self, row: dict[str, Any]) -> int:
        self.reporter.result(row)
        code = 0 if row["error"] is None else 1
        if self.summary_to is not None:
            code = max(code, print_summary(self.summary_to, [row], self.out))
        return code


def parse_event(line: str) -> dict[str, Any] | None:
    """A worker's event line, or ``None`` for any other output."""
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        event = json.loads(line[len(EVENT_PREFIX) :])
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def write_summary(directory: Path, rows: Sequence[Mapping[str, Any]]) -> tuple[Path, Path, str]:
    """Write ``summary.json`` and ``summary.md`` into ``directory`` (atomically); returns both paths and the table."""
    summary = build_summary(rows)
    table = render_markdown(summary)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / "summary.json", directory / "summary.md"
    for path, text in ((json_path, json.dumps(summary, indent=2) + "\n"), (md_path, table)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return json_path, md_path, table


def print_summary(directory: Path, rows: Sequence[Mapping[str, Any]], out: TextIO) -> int:
    """Write the summary, print its table; 0 when it was written, 1 when it could not be."""
    try:
        json_path, md_path, table = write_summary(directory, rows)
    except OSError as exc:
        print(f"bot.py: the summary could not be written to {directory}: {exc}", file=sys.stderr)
        return 1
    print("", file=out)
    print(table, file=out)
    print(f"summary written to {json_path} and {md_path}", file=out, flush=True)
    return 0


# ---------------------------------------------------------------- the workers


class _Worker:
    """One file's ``python bot.py --replay FILE --replay-worker`` process and what it said."""

    def __init__(self, file: str, report: Path, command: list[str], events: queue.SimpleQueue) -> None:
        self.file, self.name, self.report = file, Path(file).name, report
        self.row: dict[str, Any] | None = None
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_KEPT)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,  # a terminal's Ctrl-C reaches the batch, which stops its workers
        )
        self._events = events
        self._err = threading.Thread(target=self._pump, args=(self.proc.stderr, "err"), daemon=True)
        self._err.start()
        threading.Thread(target=self._pump_out, daemon=True).start()

    def _pump(self, stream: TextIO, kind: str) -> None:
        for line in stream:
            self._events.put((kind, self, line.rstrip("\n")))

    def _pump_out(self) -> None:
        assert self.proc.stdout is not None
        self._pump(self.proc.stdout, "out")
        self._err.join()  # every line is queued before the exit
        self._events.put(("exit", self, self.proc.wait()))

    def send(self, signum: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)


def worker_command(file: str, report: Path, flags: Sequence[str]) -> list[str]:
    return [sys.executable, str(BOT_PY), f"--replay={file}", f"--report={report}", "--replay-worker", *flags]


def run_batch(
    files: Sequence[str],
    reports: Sequence[Path],
    *,
    jobs: int,
    summary_to: Path,
    flags: Sequence[str],
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Replay every file in its own worker, at most ``jobs`` at once; write and print the summary.

    Exit status: 0 when every file was replayed, 1 when any failed, 128 + the signal
    number when SIGINT or SIGTERM stopped the batch (its workers are stopped too).
    """
    events: queue.SimpleQueue = queue.SimpleQueue()  # put() is safe in a signal handler
    rows: dict[int, dict[str, Any]] = {}
    # Largest first: the long files start early and the cores stay busy to the end.
    pending = deque(sorted(range(len(files)), key=lambda i: -_size(files[i])))
    running: dict[_Worker, int] = {}
    stopped_by: int | None = None
    kill_at: float | None = None

    def on_signal(signum: int, _frame: Any) -> None:
        events.put(("signal", None, signum))

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while running or (pending and stopped_by is None):
            while pending and len(running) < jobs and stopped_by is None:
                i = pending.popleft()
                try:
                    w = _Worker(files[i], reports[i], worker_command(files[i], reports[i], flags), events)
                except OSError as exc:
                    rows[i] = error_row(files[i], f"the worker could not start: {exc}")
                    print(result_line(rows[i]), file=out, flush=True)
                    continue
                running[w] = i
                print(f"{w.name}: started (pid {w.proc.pid})", file=out, flush=True)
            if not running:
                continue
            timeout = None if kill_at is None else max(0.0, kill_at - time.monotonic())
            try:
                kind, w, value = events.get(timeout=timeout)
            except queue.Empty:
                for w in running:
                    w.send(signal.SIGKILL)
                kill_at = None
                continue
            if kind == "signal":
                if stopped_by is not None:  # a second Ctrl-C: no more waiting
                    for worker in running:
                        worker.send(signal.SIGKILL)
                    continue
                stopped_by = value
                print(f"{signal.Signals(value).name} received: stopping {len(running)} worker(s)", file=err, flush=True)
                for worker in running:
                    worker.send(signal.SIGTERM)
                kill_at = time.monotonic() + KILL_AFTER_SEC
                continue
            if w not in running:
                continue
            if kind == "err":
                w.stderr_tail.append(value)
                print(f"{w.name}: {value}", file=err, flush=True)
            elif kind == "out":
                _on_output(w, value, out)
            elif kind == "exit":
                i = running.pop(w)
                rows[i] = _final_row(w, value, stopped_by)
                print(result_line(rows[i]), file=out, flush=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for i in pending:  # only left when the batch was stopped
        rows[i] = error_row(files[i], f"not run: the batch was stopped by {_signal_name(stopped_by or 0)}")
    unwritten = print_summary(summary_to, [rows[i] for i in range(len(files))], out)
    if stopped_by is not None:
        return 128 + stopped_by
    failed = any(r["error"] is not None for r in rows.values())
    return 1 if failed or unwritten else 0


def _size(file: str) -> int:
    try:
        return os.path.getsize(file)
    except OSError:
        return 0


def _on_output(w: _Worker, line: str, out: TextIO) -> None:
    event = parse_event(line)
    if event is None:
        print(f"{w.name}: {line}", file=out, flush=True)
    elif event.get("event") == "progress":
        print(progress_line(w.file, float(event["time"]), int(event["pct"])), file=out, flush=True)
    elif event.get("event") == "result" and isinstance(event.get("row"), dict):
        w.row = event["row"]


def _final_row(w: _Worker, returncode: int, stopped_by: int | None) -> dict[str, Any]:
    """The file's row once its worker has exited: its own result, else why it has none."""
    wall = time.monotonic() - w.started
    if w.row is not None:  # the worker wrote its report and said so
        return {**w.row, "file": w.file, "wall_sec": round(wall, 3)}
    if stopped_by is not None:
        error = f"interrupted: the batch was stopped by {signal.Signals(stopped_by).name}"
    elif returncode < 0:
        error = f"the worker was killed by {_signal_name(-returncode)}"
    else:
        last = next((line for line in reversed(w.stderr_tail) if line.strip()), "")
        error = f"the worker exited with status {returncode} without a result" + (f": {last}" if last else "")
    return error_row(w.file, error, wall_sec=wall)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
