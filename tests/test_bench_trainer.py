"""`dbkit bench trainer`'s reading of each trainer's own timestamps (no trainer runs here)."""

import io
import json

from tqdm import tqdm

from dbkit import bench_trainer as bt


def test_reads_the_scripts_bar_as_tqdm_prints_it():
    out = io.StringIO()
    # what the script's bar prints under the TQDM_* environment the bench sets
    for _ in tqdm(range(7), desc="Steps", file=out, bar_format=bt.BAR_FORMAT, mininterval=0, miniters=1):
        pass
    points = bt.tqdm_points(out.getvalue())
    assert [s for s, _ in points] == list(range(8))
    assert all(a <= b for (_, a), (_, b) in zip(points, points[1:]))


def test_steady_rate_by_hand():
    # the bar prints a step twice (update, then close): the first time counts; other bars ignored
    text = ("Loading weights 3/36 elapsed_s=0.0010\rSteps 0/30 elapsed_s=0.0000\rSteps 10/30 elapsed_s=2.5000"
            "\rSteps 20/30 elapsed_s=3.5000\rSteps 30/30 elapsed_s=4.5000\rSteps 30/30 elapsed_s=4.9000\n")
    points = bt.tqdm_points(text)
    assert points == [(0, 0.0), (10, 2.5), (20, 3.5), (30, 4.5)]
    assert bt.steady_rate(points, skip=10) == 20 / 2.0  # steps 10 → 30 in 2 s; the slow first 10 left out


def test_reads_dbkits_train_log(tmp_path):
    log = tmp_path / "train_log.jsonl"
    recs = [{"step": s, "loss": 0.1, "elapsed_s": 0.5 + 0.25 * s} for s in (1, 2, 3, 5)]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    points = bt.log_points(log)
    assert points == [(1, 0.75), (2, 1.0), (3, 1.25), (5, 1.75)]
    assert bt.steady_rate(points, skip=1) == 4.0  # 4 steps in 1 s


def test_instance_folder_fills_every_batch(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (photos / name).write_bytes(name.encode())
    (photos / "metadata.jsonl").write_text("{}\n")  # the script would try to open it as an image
    folder = bt.instance_folder(photos, tmp_path / "links", batch=4)
    files = sorted(folder.iterdir())
    assert len(files) == 12  # 3 photos × 4: three full batches of 4, each photo 4 times
    assert sorted(f.read_bytes() for f in files) == sorted([b"a.png", b"b.png", b"c.png"] * 4)


def test_several_pairs_report_medians_of_the_pairs_ratios():
    pairs = [{"dbkit_steps_per_s": d, "diffusers_steps_per_s": s, "ratio": round(d / s, 2)}
             for d, s in ((20.0, 10.0), (18.0, 15.0), (30.0, 20.0))]
    out = bt.summarise_pairs(pairs)
    # ratios 2.0, 1.2, 1.5: median 1.5, while the ratio of the medians would be 20/15
    assert out["median_ratio"] == 1.5 and out["median_dbkit_steps_per_s"] == 20.0
    assert out["median_diffusers_steps_per_s"] == 15.0 and out["pairs"] == pairs
    assert bt.summarise_pairs(pairs[:1]) == pairs[0]
