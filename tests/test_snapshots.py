"""The checks a restored snapshot must pass (pure: a document and ``now`` in, a refusal naming a path out),
and the model parameters its owner refuses."""

import math

import numpy as np
import pytest
from conftest import make_sim_bot
from test_snapshot_restore import SAVED_AT, good_snapshot

from hmm_regime_detector import RegimeDetector, _pack, _unpack
from loop.snapshots import MAX_AMOUNT, SnapshotInvalid, check_snapshot, distrust_message
from market.sim import generate
from regime.model_slot import ModelSlot, SlotSpec

NOW = SAVED_AT + 60


def spoiled(path: str, value):
    """The good snapshot with the value at ``path`` (dots, and [i] for a list item) replaced."""
    snap = good_snapshot(
        advisor={
            "override": {
                "tier": 1, "direction": "long_bias", "applied_at": SAVED_AT - 60, "expires_at": SAVED_AT + 600,
                "source_conviction": 70, "opinion_ts": SAVED_AT - 90,
            },
            "scorecard": {"pending": [{"ts": SAVED_AT - 30, "price": 0.1}]},
        },
        direction_skill={"hits": 1.5, "misses": 0.5, "scored": 2, "pending": None, "last_call_at": SAVED_AT - 10},
        regime_history=[{"ts": SAVED_AT - 5, "regime": "RANGING", "conf": 0.4}],
    )  # fmt: skip
    snap["grid"]["engine"]["orders"] = [
        {"id": "g1", "price": 0.1, "volume": 50.0, "placed_at": SAVED_AT - 5, "side": "buy", "role": "entry",
         "tier_at_entry": 0},
    ]  # fmt: skip
    if path:
        *head, last = path.replace("[", ".[").split(".")
        node = snap
        for part in head:
            node = node[int(part[1:-1])] if part.startswith("[") else node[part]
        node[last] = value
    return snap


def test_the_good_snapshot_passes():
    check_snapshot(spoiled("", None), pair="XDGUSD", now=NOW)


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        ("version", True, "this bot reads version 1 only"),
        ("pair", "ETHUSD", "the bot runs XDGUSD"),
        ("saved_at", NOW + 3600, "lies in the future"),
        ("saved_at", "yesterday", "must be a number"),
        ("tier.tier", 3, "must be one of 0, 1, 2"),
        ("tier.direction", "sideways", "must be one of 'symmetric', 'long_bias', 'short_bias'"),
        ("pinned_since", math.inf, "must be finite"),
        ("regime_history[0].conf", 1.5, "must lie in [0, 1]"),
        ("direction_skill.hits", -1, "must lie in [0, 1e+12]"),
        ("advisor.override.direction", "symmetric", "does not go with tier 1"),
        ("advisor.override.applied_at", NOW + 86400, "lies in the future"),
        ("advisor.override.expires_at", SAVED_AT - 120, "lies before applied_at"),
        ("advisor.override.source_conviction", 70.5, "must be an integer"),
        ("advisor.scorecard.pending[0].price", 0, "must be positive"),
        ("grid.engine.balances.quote", MAX_AMOUNT * 2, "must lie in [0, 1e+12]"),
        ("grid.engine.balances.base", 1e14, "is worth more than 1e+12 in the quote asset"),
        ("grid.engine.balances.quote", -1.0, "must lie in [0, 1e+12]"),
        ("grid.engine.orders[0].price", 0.0, "must be positive"),
        ("grid.engine.orders[0].volume", "50", "must be a number"),
        ("grid.engine.orders[0].side", "hold", "must be one of 'buy', 'sell'"),
        ("grid.engine.seq", 1.5, "must be an integer"),
        ("grid.engine.posture", [], "must be an object"),
    ],
)
def test_each_untrustworthy_value_is_refused_by_its_key_path(path, value, reason):
    with pytest.raises(SnapshotInvalid) as refused:
        check_snapshot(spoiled(path, value), pair="XDGUSD", now=NOW)
    assert refused.value.path == path and reason in str(refused.value)
    assert str(refused.value).startswith(f"{path} = {value!r}: ")


def test_the_refusal_says_how_to_recover():
    problem = SnapshotInvalid("version", 2, "this bot reads version 1 only")
    assert distrust_message("snapshot:X", "snapshot:X", "data/bot.sqlite3", problem) == (
        "the snapshot snapshot:X in data/bot.sqlite3 cannot be trusted: version = 2: this bot reads version 1 only. "
        "Nothing was changed. Start from the previous snapshot the bot kept with --restore-previous, or from "
        "scratch with --discard-snapshot (either moves this one aside to snapshot:X:rejected:<time>, not deleted)"
    )


@pytest.fixture(scope="module")
def trained_slot_snapshot():
    slot = ModelSlot(SlotSpec("primary", 1, target=4000, min_samples=500, retrain_interval_sec=86_400), RegimeDetector)
    candles, _ = generate(1500, seed=3)
    assert slot.train(candles, SAVED_AT, "initial").ok
    return slot.snapshot()


def repacked(snap: dict, field: str, change) -> dict:
    model = dict(snap["model"])
    arr = _unpack(model[field])
    model[field] = _pack(change(arr))
    return {**snap, "model": model}


@pytest.mark.parametrize(
    ("field", "change", "problem"),
    [
        ("startprob", lambda a: a * 2, "startprob is not a probability vector"),
        ("transmat", lambda a: a[:, ::-1] - np.eye(3) * 0.5, "transmat rows do not sum to 1"),
        ("means", lambda a: np.where(a == a[0, 0], np.nan, a), "field means is malformed"),
        ("covars", lambda a: a[:2], "field covars is malformed"),
    ],
)
def test_model_parameters_that_are_not_a_model_refuse_the_snapshot(trained_slot_snapshot, field, change, problem):
    slot = ModelSlot(SlotSpec("primary", 1, target=4000, min_samples=500, retrain_interval_sec=86_400), RegimeDetector)
    assert ModelSlot(slot.spec, RegimeDetector).restore(trained_slot_snapshot) is True  # the unspoilt one loads
    with pytest.raises(ValueError, match=f"primary model: model snapshot {problem}"):
        slot.restore(repacked(trained_slot_snapshot, field, change))
    assert not slot.trained  # untouched


def test_a_model_of_another_version_is_retrained_not_refused(trained_slot_snapshot):
    slot = ModelSlot(SlotSpec("primary", 1, target=4000, min_samples=500, retrain_interval_sec=86_400), RegimeDetector)
    older = {**trained_slot_snapshot, "model": {**trained_slot_snapshot["model"], "version": 0}}
    assert slot.restore(older) is False and not slot.trained


def test_a_snapshot_holding_nan_is_not_written_and_the_error_is_recorded_not_raised(tmp_path):
    bot = make_sim_bot(tmp_path / "n.sqlite3")
    try:
        bot.tick()
        kept = bot.store.load_state("snapshot:XDGUSD")
        bot.pinned_since = math.nan  # whatever produced it, the store must never hold it
        bot.save_snapshot(bot.clock.now() + 60)
        assert bot.store.load_state("snapshot:XDGUSD") == kept
        error = bot.status()["health"]["errors"][0]
        assert error["source"] == "store" and error["message"] == (
            "snapshot not saved: pinned_since is nan, not a finite number"
        )
    finally:
        bot.store.close()
