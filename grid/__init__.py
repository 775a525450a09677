"""The grid: the exchange protocol every venue implements, the pure engine, its signals, the
runner that drives an exchange with it, and the paper exchange that fills against candles."""
