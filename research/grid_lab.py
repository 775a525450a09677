"""Grid laboratory: the grid engine alone over real candle files, fast, for design experiments.

    python research/grid_lab.py                          # the six shared files, default grid
    python research/grid_lab.py --set max_open_orders=60 --set exit_pct=1.5
    python research/grid_lab.py --response size:1:0.5:0.5  # needs research/signal_cache.py first
    python research/grid_lab.py FILE.csv ... --jobs 2

No models, no store, no bot: a paper :class:`grid_runner.GridRunner` is stepped
once per candle exactly as the bot's replay steps it (the closed candles so far,
the next candle's open as the price), under a symmetric posture unless a
response (``--response``, see :func:`postures`) reads the cached regime
signals. Prints the SPEC section 15 grid figures per file and in total.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bot import grid_config, runner_settings
from candles import read_candles_csv
from config import load_settings
from grid.engine import GridConfig, Posture, capacity
from grid.paper_exchange import paper_exchange_factory
from grid.runner import GridRunner
from kraken.pair_rules import replay_pair

DATA = Path(os.environ.get("SHARED_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
SIX = [DATA / f"{p}USDT_1m.csv" for p in ("DOGE", "ADA", "XRP", "LTC", "LINK", "MATIC")]


DIRECTION_NAMES = {0: "symmetric", 1: "long_bias", -1: "short_bias"}


def postures(response: str, sig: dict, t0: float) -> list[Posture]:
    """One posture per cycle from the cached regime signals.

    - ``symmetric``: none (the baseline grid).
    - ``mechanical``: the cached mechanical tier and direction, skewed by |bias|.
    - ``size:M:P:S``: entry size ``S`` while model ``M`` (1 or 15) puts probability ``P`` or more on a
      directional regime (bearish + bullish): the bot's response is ``size:1:0.5:0.5``.
    Controls for it: ``placebo:M:P:S:D`` (the same flags shifted by ``D`` days, circularly: same
    coverage and persistence, no alignment with the market), ``volsize:Q:S`` (size ``S`` while the
    trailing volatility is above its running ``Q`` quantile), ``const:S`` (always ``S``),
    ``rand:P:S:SEED`` (random hours with probability ``P``).
    """
    n = len(sig["t"])
    kind, *params = response.split(":")
    if kind == "symmetric":
        return [Posture(since=t0)] * n
    if kind == "mechanical":
        return [
            Posture(int(sig["tier"][i]), DIRECTION_NAMES[int(sig["direction"][i])], min(1.0, abs(sig["bias"][i])), t0)
            for i in range(n)
        ]
    if kind == "size":
        model, level, size = params
        p = sig["p1" if model == "1" else "p15"]
        directional = np.nan_to_num(p[:, 0] + p[:, 2], nan=0.0) >= float(level)
        small, flat = Posture(since=t0, size=float(size)), Posture(since=t0)
        return [small if directional[i] else flat for i in range(n)]
    if kind == "volsize":
        q, size = float(params[0]), float(params[1])
        hot = trailing_vol_above_quantile(sig["price"], q)
        small, flat = Posture(since=t0, size=size), Posture(since=t0)
        return [small if hot[i] else flat for i in range(n)]
    if kind == "placebo":
        # Control: the model's own flags, shifted in time by K days (circularly): the same coverage and
        # persistence, no alignment with the market.
        model, level, size, days = params
        p = sig["p1" if model == "1" else "p15"]
        directional = np.roll(np.nan_to_num(p[:, 0] + p[:, 2], nan=0.0) >= float(level), int(float(days) * 1440))
        small, flat = Posture(since=t0, size=float(size)), Posture(since=t0)
        return [small if directional[i] else flat for i in range(n)]
    if kind == "const":
        return [Posture(since=t0, size=float(params[0]))] * n
    if kind == "rand":
        # Control: the same size cut on random hours (seeded), flagged with probability P.
        share, size = float(params[0]), float(params[1])
        rng = np.random.default_rng(int(params[2]) if len(params) > 2 else 0)
        hours = rng.random(n // 60 + 1) < share
        small, flat = Posture(since=t0, size=size), Posture(since=t0)
        return [small if hours[i // 60] else flat for i in range(n)]
    raise ValueError(f"unknown response {response!r}")


def trailing_vol_above_quantile(price: np.ndarray, q: float, halflife: float = 60.0) -> np.ndarray:
    """Per cycle: is the EWMA of absolute 1m log returns above the q-quantile of its values so far (causal)?"""
    r = np.abs(np.diff(np.log(price), prepend=np.log(price[0])))
    a = 1.0 - 0.5 ** (1.0 / halflife)
    vol = np.empty_like(r)
    m = r[0]
    for i, x in enumerate(r):
        m += a * (x - m)
        vol[i] = m
    out = np.zeros(len(vol), dtype=bool)
    step = 60  # refresh the running quantile hourly
    for start in range(1440, len(vol), step):
        level = np.quantile(vol[:start], q)
        out[start : start + step] = vol[start : start + step] >= level
    return out


def run_file(path: str, overrides: dict, response: str = "symmetric") -> dict:
    s = load_settings({"LOG_LEVEL": "WARNING"}, environ={}, env_file=None)
    candles = read_candles_csv(path)
    rules = replay_pair(path, candles, None, s).rules
    cfg = grid_config(s, rules)
    cfg = replace(cfg, **{k: _parse(getattr(cfg, k), v) for k, v in overrides.items() if k in _CFG_FIELDS})
    make = paper_exchange_factory(rules, start_quote=s.PAPER_START_USD, base_share=s.PAPER_BASE_SHARE)
    runner = GridRunner(cfg, make, settings=runner_settings(s))
    if response == "symmetric":
        plan = postures(response, {"t": candles}, candles[0].time + 60)
    else:
        from signal_cache import load

        sig = load(path)
        if len(sig["t"]) == len(candles) - 1:  # a cache made before the last cycle was recorded
            sig = {k: np.append(v, v[-1:], axis=0) for k, v in sig.items()}
        if len(sig["t"]) != len(candles):
            raise ValueError(f"{path}: the signal cache has {len(sig['t'])} cycles for {len(candles)} candles")
        plan = postures(response, sig, candles[0].time + 60)
    start_base = None
    peak_grid = -math.inf
    max_dd = 0.0
    inv_peak = 0.0
    stop = one_side = 0
    n = len(candles)
    for i in range(n):
        now = candles[i].time + 60
        price = candles[i + 1].open if i + 1 < n else candles[i].close
        runner.step(now, candles[max(0, i - 4) : i + 1], price, "RANGING", plan[i])
        bal = runner.state.balances
        if start_base is None:
            start_base = runner.equity.start_base
        grid_eq = bal.quote + (bal.base - start_base) * price
        peak_grid = max(peak_grid, grid_eq)
        max_dd = max(max_dd, peak_grid - grid_eq)
        inv_peak = max(inv_peak, abs(bal.base - start_base) * price)
        cap = capacity(cfg, runner.state.orders)
        stop += cap["band"] == "stop"
        one_side += cap["band"] != "normal"
    summary = runner.summary(candles[-1].close)
    return {
        "file": Path(path).name,
        "net": summary["net_pnl_usd"],
        "grid_pnl": summary["net_pnl_usd"] - summary["start_inventory_drift_usd"],
        "realized": summary["realized_pnl_usd"],
        "grid_dd": max_dd,
        "cycles": summary["cycles"],
        "fees": summary["fees_usd"],
        "stop": stop / n,
        "one_side": one_side / n,
        "inv_peak": inv_peak,
        "skipped": summary["entries_skipped"],
    }


_CFG_FIELDS = {f.name for f in fields(GridConfig)}


def _parse(current: object, text: str) -> object:
    if isinstance(current, bool):
        return text.lower() in ("1", "true", "yes", "on")
    return type(current)(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", default=[str(p) for p in SIX])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="GridConfig override")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--response", default="symmetric", help="posture source (see postures())")
    args = ap.parse_args(argv)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    unknown = set(overrides) - _CFG_FIELDS
    if unknown:
        ap.error(f"not GridConfig fields: {sorted(unknown)}")
    with ProcessPoolExecutor(args.jobs) as pool:
        n = len(args.files)
        rows = list(pool.map(run_file, args.files, [overrides] * n, [args.response] * n))
    head = f"{'file':<18}{'net':>9}{'grid pnl':>9}{'realized':>9}{'grid dd':>9}"
    head += f"{'cycles':>7}{'fees':>8}{'stop':>7}{'caut+':>7}{'inv pk':>8}"
    print(head)
    for r in rows:
        print(f"{r['file']:<18}{r['net']:>9.2f}{r['grid_pnl']:>9.2f}{r['realized']:>9.2f}{r['grid_dd']:>9.2f}"
              f"{r['cycles']:>7}{r['fees']:>8.2f}{r['stop']:>7.3f}{r['one_side']:>7.3f}"
              f"{r['inv_peak']:>8.1f}")  # fmt: skip
    tot = {k: sum(r[k] for r in rows) for k in ("net", "grid_pnl", "realized", "grid_dd", "cycles", "fees")}
    print(f"{'total':<18}{tot['net']:>9.2f}{tot['grid_pnl']:>9.2f}{tot['realized']:>9.2f}{tot['grid_dd']:>9.2f}"
          f"{tot['cycles']:>7}{tot['fees']:>8.2f}{max(r['stop'] for r in rows):>7.3f}"
        f"{max(r['one_side'] for r in rows):>7.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
