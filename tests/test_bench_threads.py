"""`dbkit bench threads`' arithmetic on hand-made logs (no training runs here: the bench itself
takes minutes and measures the machine)."""

import json

from dbkit import bench_threads as bt


def test_the_reference_is_the_lone_run_with_every_core():
    first, *rest = bt.settings(cores=6)
    assert (first.processes, first.threads, first.env) == (1, 6, {})
    assert {(s.processes, s.threads) for s in rest} == {(1, 1), (1, 6), (2, 6), (2, 1)}


def test_throughput_and_identity_by_hand(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": x, "elapsed_s": s / 10})
                           for s, x in ((1, 0.5), (2, 0.25000000000000006))).replace("}{", "}\n{") + "\n")
    ref = bt.losses(log)
    assert ref == [0.5, 0.25000000000000006]  # read back to the last digit
    two = bt.Setting("two at once", 2, 1)
    row = bt.summarise(two, [12.0, 13.0], [ref, [0.5, 0.25]], ref_rate=20.0, ref_losses=ref, wall=3.04)
    # (12 + 13) / 20; the second log differs from the lone run's in the 17th digit only
    assert row["throughput_x"] == 1.25
    assert row["identical_to_alone"] == [True, False]
    assert (row["processes"], row["threads_each"], row["wall_s"]) == (2, 1, 3.0)
