"""The shard processes alone, with work that needs no model (this module imports nothing heavy, as
each spawned process imports it again): batches reach the parent, a shard that dies names itself."""

import os

import pytest

from synth_xray_assets.diffusion.shards import ShardFailed, run_shards


def rows_or_die(device: str, indices: list[int]):
    """One row a batch; the process dies without a word (as a killed one would) at index 1, before
    it sent anything (what a killed process had not yet flushed to the parent is lost)."""
    for i in indices:
        if i == 1:
            os._exit(7)
        yield [{"index": i, "device": device}]


def test_every_shard_sends_its_share_and_a_dead_one_is_named_with_the_index_it_was_at():
    got = []
    with pytest.raises(ShardFailed) as failed:
        run_shards(rows_or_die, ("dev-a", "dev-b"), range(6), lambda shard, rows: got.extend(rows))
    err = failed.value
    assert (err.shard, err.device, err.index) == (1, "dev-b", 1)
    assert "exit code 7" in err.reason and "shard 1 of 2" in str(err)
    assert sorted((r["index"], r["device"]) for r in got) == [(0, "dev-a"), (2, "dev-a"), (4, "dev-a")]


def test_a_shard_with_nothing_to_do_is_not_started():
    got = []
    run_shards(rows_or_die, ("dev-a", "dev-b", "dev-c"), [2, 5], lambda shard, rows: got.append(shard.number))
    assert sorted(got) == [2, 2]
