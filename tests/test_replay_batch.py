"""Replay of many files (``replay_batch``): the summary's rows, totals and table from hand-made
reports; the command line; and real ``python bot.py --replay`` batches with workers that run at
once, fail, are killed or are stopped."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import threading
from pathlib import Path

import pytest
from test_replay import write_csv

import bot
from market import replay_batch
from market.replay_batch import (
    EventReporter,
    ReplayProgress,
    build_summary,
    error_row,
    file_row,
    forwarded_flags,
    parse_event,
    render_markdown,
    replay_files,
    report_paths,
    result_line,
)
from market.sim import generate

STRATEGY_KEYS = set(replay_batch.STRATEGY_FIELDS)
REGIME_KEYS = STRATEGY_KEYS | set(replay_batch.REGIME_FIELDS)
ROW_KEYS = {"file", "error", "candles", "strategies", "report", "wall_sec"}
TOTALS_KEYS = {
    "regime_aware",
    "symmetric",
    "buy_and_hold",
    "files",
    "failed_files",
    "candles",
    "grid_drawdown_compared_files",
    "regime_aware_lower_grid_drawdown_files",
}


def hits(hits: int, scored: int, scorable: int) -> dict:
    return {
        "hit_rate": round(hits / scored, 4) if scored else None,
        "hits": hits,
        "scored": scored,
        "scorable": scorable,
        "coverage": round(scored / scorable, 4),
    }


def grid(net, dd, gdd, realized, cycles, fees, stop, inventory, **more) -> dict:
    return {
        "net_pnl_usd": net,
        "max_drawdown_pct": dd,
        "grid_max_drawdown_usd": gdd,
        "realized_pnl_usd": realized,
        "cycles": cycles,
        "fees_usd": fees,
        "capacity_stop_share": stop,
        "inventory_peak_usd": inventory,
        "start_equity_usd": 1000.0,  # in a report, not in the summary
        **more,
    }


def report(candles: int, aware: dict, symmetric: dict, hold: dict) -> dict:
    return {"candles": candles, "strategies": {"regime_aware": aware, "symmetric": symmetric, "buy_and_hold": hold}}


REPORT_A = report(
    1000,
    grid(10.0, 5.0, 3.0, 4.0, 10, 1.0, 0.5, 100.0, tier_share={"0": 0.5, "1": 0.25, "2": 0.25},
         tier2_share_while_shallow=0.5, shallow_cycles=100, tier2_cycles_while_shallow=50,
         direction_hit_rate={"1": hits(6, 10, 900), "2": hits(3, 5, 900), "directional": hits(9, 15, 900)}),
    grid(5.0, 4.0, 4.0, 2.0, 8, 0.8, 0.1, 80.0),
    grid(20.0, 10.0, None, 0.0, 0, 2.5, None, 1100.0),
)  # fmt: skip
REPORT_B = report(
    3000,
    grid(-4.0, 7.5, 6.0, 1.0, 5, 0.5, 0.1, 50.0, tier_share={"0": 1.0, "1": 0.0, "2": 0.0},
         tier2_share_while_shallow=None, shallow_cycles=0, tier2_cycles_while_shallow=0,
         direction_hit_rate={"1": hits(0, 0, 2900), "2": hits(0, 0, 2900), "directional": hits(0, 0, 2900)}),
    grid(-2.0, 6.0, 5.0, 1.5, 4, 0.4, 0.0, 40.0),
    grid(-30.0, 12.0, None, 0.0, 0, 2.5, None, 1000.0),
)  # fmt: skip
BAD_ERROR = "data/c_1m.csv:7: times must be strictly ascending"


def hand_made_rows() -> list[dict]:
    return [
        file_row("data/a_1m.csv", REPORT_A, report_path="out/a_1m.csv.report.json", wall_sec=3.21),
        file_row("data/b_1m.csv", REPORT_B),
        error_row("data/c_1m.csv", BAD_ERROR),
    ]


# ---------------------------------------------------------------- rows, totals, table


def test_summary_has_exactly_the_documented_shape():
    summary = json.loads(json.dumps(build_summary(hand_made_rows())))  # JSON-safe
    assert set(summary) == {"files", "totals"}
    assert [r["file"] for r in summary["files"]] == ["data/a_1m.csv", "data/b_1m.csv", "data/c_1m.csv"]
    for row in summary["files"]:
        assert set(row) == ROW_KEYS
    a, _, c = summary["files"]
    assert (a["error"], a["candles"], a["report"], a["wall_sec"]) == (None, 1000, "out/a_1m.csv.report.json", 3.21)
    assert set(a["strategies"]) == {"regime_aware", "symmetric", "buy_and_hold"}
    assert set(a["strategies"]["regime_aware"]) == REGIME_KEYS
    assert set(a["strategies"]["symmetric"]) == set(a["strategies"]["buy_and_hold"]) == STRATEGY_KEYS
    assert "start_equity_usd" not in a["strategies"]["symmetric"]  # the report keeps the rest
    assert c == {"file": "data/c_1m.csv", "error": BAD_ERROR, "candles": None, "strategies": None,
                 "report": None, "wall_sec": None}  # fmt: skip
    totals = summary["totals"]
    assert set(totals) == TOTALS_KEYS
    assert set(totals["regime_aware"]) == REGIME_KEYS
    assert set(totals["symmetric"]) == set(totals["buy_and_hold"]) == STRATEGY_KEYS


def test_totals_add_accounts_weight_shares_and_pool_hit_rates():
    totals = build_summary(hand_made_rows())["totals"]
    assert (totals["files"], totals["failed_files"], totals["candles"]) == (3, 1, 4000)
    aware, sym, hold = totals["regime_aware"], totals["symmetric"], totals["buy_and_hold"]
    # USD figures, cycles and fees add up (each file is its own account); the drawdown % is the worst file's.
    assert (aware["net_pnl_usd"], aware["realized_pnl_usd"], aware["cycles"], aware["fees_usd"]) == (6.0, 5.0, 15, 1.5)
    assert (aware["grid_max_drawdown_usd"], aware["inventory_peak_usd"], aware["max_drawdown_pct"]) == (9.0, 150.0, 7.5)
    assert (sym["net_pnl_usd"], sym["grid_max_drawdown_usd"], sym["max_drawdown_pct"]) == (3.0, 9.0, 6.0)
    # Shares weighted by candles: (0.5 x 1000 + 0.1 x 3000) / 4000.
    assert aware["capacity_stop_share"] == 0.2
    assert sym["capacity_stop_share"] == 0.025
    assert aware["tier_share"] == {"0": 0.875, "1": 0.0625, "2": 0.0625}
    # Tier 2 while shallow weighted by shallow cycles: only file a had any.
    assert (aware["tier2_share_while_shallow"], aware["shallow_cycles"], aware["tier2_cycles_while_shallow"]) == (
        0.5, 100, 50
    )  # fmt: skip
    # Hit rates pooled over scored cycles, coverage over all scorable ones.
    assert aware["direction_hit_rate"]["1"] == {"hit_rate": 0.6, "hits": 6, "scored": 10, "scorable": 3800,
                                                "coverage": 0.0026}  # fmt: skip
    assert aware["direction_hit_rate"]["directional"]["hit_rate"] == 0.6
    assert aware["direction_hit_rate"]["directional"]["coverage"] == round(15 / 3800, 4)
    # Buy-and-hold has no grid: those figures stay null in total too.
    assert (hold["grid_max_drawdown_usd"], hold["capacity_stop_share"], hold["cycles"]) == (None, None, 0)
    assert (hold["net_pnl_usd"], hold["max_drawdown_pct"], hold["inventory_peak_usd"]) == (-10.0, 12.0, 2100.0)
    # a: 3 < 4 (lower); b: 6 > 5.
    assert (totals["regime_aware_lower_grid_drawdown_files"], totals["grid_drawdown_compared_files"]) == (1, 2)


def test_totals_of_nothing_but_failures():
    totals = build_summary([error_row("x_1m.csv", "boom")])["totals"]
    assert (totals["files"], totals["failed_files"], totals["candles"]) == (1, 1, 0)
    assert totals["regime_aware"]["net_pnl_usd"] is None and totals["regime_aware"]["tier2_share_while_shallow"] is None
    assert totals["regime_aware"]["direction_hit_rate"]["1"]["hit_rate"] is None
    render_markdown(build_summary([error_row("x_1m.csv", "boom")]))  # renders all the same


def test_a_report_without_strategies_is_an_error_row():
    row = file_row("x_1m.csv", {"candles": 0, "strategies": None})
    assert row["error"] and row["strategies"] is None and row["candles"] is None


def tables(markdown: str) -> list[list[str]]:
    """Each Markdown table of the page as its lines."""
    out, current = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            out.append(current)
            current = []
    return out + ([current] if current else [])


def test_table_reads_in_a_terminal_and_has_every_row():
    md = render_markdown(build_summary(hand_made_rows()))
    assert md.startswith("# Replay summary\n")
    assert "3 file(s), 1 failed, 4,000 candles" in md and "on 1 of 2 file(s)" in md
    strategies, regime = tables(md)
    for table in (strategies, regime):
        assert len({len(line) for line in table}) == 1  # padded: the columns line up
        assert len({line.count("|") for line in table}) == 1
    header = [c.strip() for c in strategies[0].strip("|").split("|")]
    assert header == ["file", "strategy", "net P&L USD", "max DD %", "grid max DD USD", "realized USD", "cycles",
                      "fees USD", "capacity stop", "inventory peak USD"]  # fmt: skip
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in strategies[2:]]
    assert [c[:2] for c in cells] == [
        ["a_1m.csv", "regime_aware"], ["", "symmetric"], ["", "buy_and_hold"],
        ["b_1m.csv", "regime_aware"], ["", "symmetric"], ["", "buy_and_hold"],
        ["c_1m.csv", "FAILED"],
        ["**total**", "regime_aware"], ["", "symmetric"], ["", "buy_and_hold"],
    ]  # fmt: skip
    assert cells[0][2:] == ["+10.00", "5.00", "3.00", "+4.00", "10", "1.00", "50.0%", "100.00"]
    assert cells[2][4] == "n/a" and cells[2][8] == "n/a"  # buy-and-hold has no grid
    assert cells[7][2:5] == ["+6.00", "7.50", "9.00"]
    regime_rows = [[c.strip() for c in line.strip("|").split("|")] for line in regime[2:]]
    assert regime_rows[0] == ["a_1m.csv", "50.0%", "25.0%", "25.0%", "50.0% of 100", "60.0% of 10 (cov. 1.1%)",
                              "60.0% of 5 (cov. 0.6%)", "60.0% of 15 (cov. 1.7%)"]  # fmt: skip
    assert regime_rows[1][4:] == ["n/a of 0", "n/a", "n/a", "n/a"]
    assert regime_rows[-1][0] == "**total**"
    assert f"- `c_1m.csv`: {BAD_ERROR}" in md


def test_result_lines_name_the_file():
    a, _, c = hand_made_rows()
    assert (
        result_line(a) == "a_1m.csv: done: 1,000 candles in 3.2 s; net P&L regime_aware +10.00 USD, symmetric +5.00 USD"
    )
    assert result_line(c) == f"c_1m.csv: FAILED: {BAD_ERROR}"


# ---------------------------------------------------------------- progress and worker events


def test_progress_marks_every_ten_percent_without_work_in_between():
    seen: list[tuple[float, int]] = []
    start, end = 1_000_000, 1_000_000 + 1000 * 60
    progress = ReplayProgress(start, end, lambda t, pct: seen.append((t, pct)))
    for now in range(start, end + 1, 60):
        progress.check(now)
    assert [pct for _, pct in seen] == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert seen[0] == (start + 100 * 60 - 60, 10)  # the newest closed candle at the mark


def test_worker_events_round_trip():
    out = io.StringIO()
    reporter = EventReporter(out)
    reporter.progress(1_680_393_600, 24)
    reporter.result(error_row("x_1m.csv", "boom"))
    events = [parse_event(line) for line in out.getvalue().splitlines()]
    assert events == [
        {"event": "progress", "time": 1_680_393_600, "pct": 24},
        {"event": "result", "row": error_row("x_1m.csv", "boom")},
    ]
    assert parse_event("2026-01-01 INFO bot: hello") is None
    assert parse_event(replay_batch.EVENT_PREFIX + "{not json") is None


# ---------------------------------------------------------------- the command line


def test_a_folder_stands_for_its_1m_files_sorted_by_name(tmp_path):
    for name in ("b_1m.csv", "a_1m.csv", "a_15m.csv", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "sub_1m.csv").mkdir()
    assert replay_files([str(tmp_path), "missing_1m.csv"]) == [
        str(tmp_path / "a_1m.csv"), str(tmp_path / "b_1m.csv"), "missing_1m.csv"
    ]  # fmt: skip
    (tmp_path / "empty").mkdir()
    with pytest.raises(replay_batch.ConfigError, match=r"no \*_1m\.csv files"):
        replay_files([str(tmp_path / "empty")])


def test_report_paths(tmp_path):
    files = ["d1/a_1m.csv", "d2/b_1m.csv"]
    assert report_paths(files, report=None, report_dir=None) == [Path("d1/a_1m.csv.report.json"),
                                                                  Path("d2/b_1m.csv.report.json")]  # fmt: skip
    assert report_paths(files, report=None, report_dir="out") == [Path("out/a_1m.csv.report.json"),
                                                                   Path("out/b_1m.csv.report.json")]  # fmt: skip
    assert report_paths(files[:1], report="r.json", report_dir="out") == [Path("r.json")]
    with pytest.raises(replay_batch.ConfigError, match="both write"):
        report_paths(["d1/a_1m.csv", "d2/a_1m.csv"], report=None, report_dir="out")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--report", "r.json"], "--report names one file's report"),
        (["--serve"], "--serve needs a single --replay file"),
        (["--db", "x.sqlite3"], "--db needs a single --replay file"),
        (["--jobs", "0"], "--jobs must be at least 1"),
    ],
)
def test_usage_errors_of_a_batch_exit_2(tmp_path, capsys, extra, message):
    files = [str(tmp_path / "a_1m.csv"), str(tmp_path / "b_1m.csv")]
    assert bot.run(["--replay", *files, *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_report_dir_that_cannot_exist_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert bot.run(["--replay", str(tmp_path / "a_1m.csv"), "--report-dir", str(tmp_path / "file" / "out")]) == 2
    assert "--report-dir" in capsys.readouterr().err


def test_batch_flags_need_replay(capsys):
    assert bot.run(["--market", "sim", "--report-dir", "out"]) == 2
    assert "--report-dir only applies to --replay" in capsys.readouterr().err


def test_workers_get_the_flags_the_user_gave():
    parser = bot.build_parser()
    args = parser.parse_args(["--replay", "a.csv", "b.csv", "--seed", "3", "--log-level", "INFO", "--jobs", "2",
                              "--report-dir", "out", "--env-file", "my.env", "--port", "0"])  # fmt: skip
    assert forwarded_flags(parser, args, bot.BATCH_ONLY_FLAGS) == [
        "--port=0", "--seed=3", "--log-level=INFO", "--env-file=my.env"
    ]  # fmt: skip
    assert forwarded_flags(parser, parser.parse_args(["--replay", "a.csv"]), bot.BATCH_ONLY_FLAGS) == []


# ---------------------------------------------------------------- real batches


def csv_text(candles) -> str:
    return "time,open,high,low,close,volume\n" + "".join(
        f"{c.time},{c.open},{c.high},{c.low},{c.close},{c.volume}\n" for c in candles
    )


def feed_together(fifos: dict[Path, str]) -> threading.Event:
    """Write each named pipe's text once every one of them has a reader.

    Opening a pipe for writing waits until a process opens it for reading; the texts are
    written only after all are open, so every reader was waiting at the same moment.
    """
    all_open = threading.Event()

    def feed() -> None:
        handles = [open(path, "w") for path in fifos]  # noqa: SIM115 (closed below, after all are open)
        all_open.set()
        for handle, text in zip(handles, fifos.values(), strict=True):
            handle.write(text)
            handle.close()

    threading.Thread(target=feed, daemon=True).start()
    return all_open


def test_a_folder_replays_in_parallel_with_a_bad_file_as_its_error_row(tmp_path, bot_process):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    # a and b are named pipes: each worker waits in reading its file until the test writes it.
    texts = {
        data / "a_1m.csv": csv_text(generate(2000, seed=31)[0]),
        data / "b_1m.csv": csv_text(generate(2000, seed=32)[0]),
    }
    for path in texts:
        os.mkfifo(path)
    bad, _ = generate(1200, seed=33)
    write_csv(data / "c_1m.csv", [*bad[:500], bad[499], *bad[500:]])  # a duplicate time on line 502
    both_reading = feed_together(texts)
    p = bot_process(["--replay", str(data), "--report-dir", str(out), "--jobs", "2"])
    # Both pipes had a reader at once: two workers were running together.
    assert both_reading.wait(90), p.output
    assert p.proc.wait(120) == 1, p.output

    summary = json.loads((out / "summary.json").read_text())
    assert [r["file"] for r in summary["files"]] == [str(data / n) for n in ("a_1m.csv", "b_1m.csv", "c_1m.csv")]
    a, b, c = summary["files"]
    for row in (a, b):
        assert row["error"] is None and row["candles"] == 2000
        assert set(row["strategies"]["regime_aware"]) == REGIME_KEYS
        report = json.loads(Path(row["report"]).read_text())
        assert row["report"] == str(out / f"{Path(row['file']).name}.report.json")
        assert report["strategies"]["regime_aware"]["net_pnl_usd"] == row["strategies"]["regime_aware"]["net_pnl_usd"]
        assert Path(report["plot"]).exists()
    assert c["error"] == f"{data / 'c_1m.csv'}:502: times must be strictly ascending"
    assert (c["candles"], c["strategies"]) == (None, None)
    assert not (out / "c_1m.csv.report.json").exists()
    assert (summary["totals"]["files"], summary["totals"]["failed_files"]) == (3, 1)

    lines = p.lines
    pids = {m[1]: int(m[2]) for line in lines if (m := re.match(r"^(\w+_1m\.csv): started \(pid (\d+)\)$", line))}
    assert set(pids) == {"a_1m.csv", "b_1m.csv", "c_1m.csv"} and len(set(pids.values())) == 3
    for name in ("a_1m.csv", "b_1m.csv"):
        marks = [
            int(m[1]) for line in lines if (m := re.match(rf"^{name}: 2026-\d\d-\d\d \d\d:\d\d \((\d+)%\)$", line))
        ]
        assert marks == [10, 20, 30, 40, 50, 60, 70, 80, 90]
        assert any(re.match(rf"^{name}: done: 2,000 candles in [\d.]+ s; net P&L regime_aware [+-]", x) for x in lines)
    assert f"c_1m.csv: FAILED: {c['error']}" in lines
    assert (out / "summary.md").read_text().strip() in p.output


def test_a_killed_worker_is_its_files_error_row_and_the_others_finish(tmp_path, bot_process):
    data = tmp_path / "data"
    data.mkdir()
    os.mkfifo(data / "stuck_1m.csv")  # nobody ever writes it: its worker waits until killed
    write_csv(data / "fine_1m.csv", generate(700, seed=34)[0])
    p = bot_process(["--replay", str(data), "--jobs", "2"])
    pid = int(p.wait_for_log(r"^stuck_1m\.csv: started \(pid (\d+)\)$", timeout=60)[1])
    os.kill(pid, signal.SIGKILL)
    assert p.proc.wait(120) == 1, p.output
    summary = json.loads((data / "summary.json").read_text())  # beside the first file's report
    fine, stuck = summary["files"]
    assert fine["error"] is None and fine["candles"] == 700
    assert stuck["error"] == "the worker was killed by SIGKILL"
    assert "stuck_1m.csv: FAILED: the worker was killed by SIGKILL" in p.lines
    assert (data / "fine_1m.csv.report.json").exists()


def test_sigterm_stops_every_worker_and_exits_non_zero(tmp_path, bot_process):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a_1m.csv", "b_1m.csv", "c_1m.csv"):
        os.mkfifo(data / name)  # never written: the workers wait until stopped
    p = bot_process(["--replay", str(data), "--jobs", "2", "--report-dir", str(tmp_path / "out")])
    pids = [int(p.wait_for_log(rf"^{n}: started \(pid (\d+)\)$", timeout=60)[1]) for n in ("a_1m.csv", "b_1m.csv")]
    assert p.terminate() == 128 + signal.SIGTERM, p.output
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # stopped and reaped
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())["files"]
    assert [r["error"] for r in rows] == [
        "interrupted: the batch was stopped by SIGTERM",
        "interrupted: the batch was stopped by SIGTERM",
        "not run: the batch was stopped by SIGTERM",
    ]
    assert not any("c_1m.csv: started" in line for line in p.lines)
