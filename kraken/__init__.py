"""Everything that speaks to Kraken: the public client (OHLC, AssetPairs), the private client
(signed orders), the exchange adapter over it, the trades backfill, and the built-in pair rules."""
