"""From model signals to a trading posture: consensus and tiers (``policy``), training depth,
the model slots that train and restore the detectors, and the direction calls' track record."""
