"""Where candles come from and go: the candle pipeline (store first), the seeded simulator,
replays of recorded candles, their scorecard over many files, and the equity plot."""
