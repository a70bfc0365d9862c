"""bench.py --peers: one scorer, the peers' data layouts, a table that survives a missing or failing peer."""

import csv
import json
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import skimage.io
import yaml

import bench
from segmentation.benchmarks import peers
from segmentation.benchmarks.peers import Annotated, read_annotated, score, write_nnunet_raw
from segmentation.data.synthetic import clumped_nuclei
from tests.helpers import TINY


def annotated(foreground: np.ndarray, ids: np.ndarray) -> Annotated:
    return Annotated("a", foreground.astype(np.uint8) * 200, foreground, ids.astype(np.int32), True)


def two_squares() -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((10, 10), np.int32)
    ids[1:4, 1:4], ids[6:9, 6:9] = 1, 2
    return ids > 0, ids


def test_a_perfect_prediction_scores_zero_errors_and_f1_one():
    foreground, ids = two_squares()
    scores = score([annotated(foreground, ids)], [(foreground, ids * 7)])  # ids need not be the same numbers
    assert scores == {"pixel_error": 0.0, "dice": 1.0, "iou": 1.0, "rand_error": 0.0, "object_f1": 1.0}


def test_scores_by_hand_for_a_missed_object_and_a_merge():
    foreground, ids = two_squares()
    missed = ids.copy()
    missed[missed == 2] = 0  # 9 of 100 pixels wrong; 1 of 2 objects found, nothing false
    scores = score([annotated(foreground, ids)], [(missed > 0, missed)])
    assert scores["pixel_error"] == pytest.approx(9 / 100)
    assert scores["dice"] == pytest.approx(2 * 9 / (9 + 18))
    assert scores["iou"] == pytest.approx(9 / 18)
    assert scores["object_f1"] == pytest.approx(2 * 1 / (1 + 2))  # F1 = 2 TP / (2 TP + FP + FN)
    # both squares as one object: over pairs of distinct pixels (n = 18), the adapted Rand error's precision is
    # (sum n_ij^2 - n) / (sum b_j^2 - n) = (162 - 18) / (324 - 18) = 8/17, its recall 1, so the error is
    # 1 - 2 p r / (p + r) = 1 - 16/25; no object matches at IoU 0.5 (9 / 18 is not above it)
    merged = (ids > 0).astype(np.int32)
    scores = score([annotated(foreground, ids)], [(foreground, merged)])
    assert scores["rand_error"] == pytest.approx(1 - 16 / 25)
    assert scores["object_f1"] == 0.0


def write_nuclei(folder, count: int, seed: int, size: int = 64) -> None:
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(seed)
    for index in range(count):
        image, ids = clumped_nuclei(size, rng)
        skimage.io.imsave(folder / "images" / f"n{index}.png", (image * 255).astype(np.uint8), check_contrast=False)
        skimage.io.imsave(folder / "masks" / f"n{index}.tif", ids.astype(np.uint16), check_contrast=False)


def test_read_annotated_takes_ids_and_classes_as_our_reader_does(tmp_path):
    write_nuclei(tmp_path / "ids", 2, seed=1)
    samples = read_annotated(tmp_path / "ids", 1)
    truth = skimage.io.imread(tmp_path / "ids" / "masks" / "n0.tif")
    assert samples[0].ids_given and np.array_equal(samples[0].ids, truth)
    assert np.array_equal(samples[0].foreground, truth > 0)
    # 0/255 masks: foreground the 255s, objects their 4-connected components (two squares touching at a corner
    # are two objects)
    (tmp_path / "binary" / "images").mkdir(parents=True)
    (tmp_path / "binary" / "masks").mkdir()
    mask = np.zeros((8, 8), np.uint8)
    mask[0:2, 0:2], mask[2:4, 2:4] = 255, 255
    skimage.io.imsave(tmp_path / "binary" / "images" / "b.png", mask, check_contrast=False)
    skimage.io.imsave(tmp_path / "binary" / "masks" / "b.png", mask, check_contrast=False)
    (binary,) = read_annotated(tmp_path / "binary", 1)
    assert not binary.ids_given and binary.ids.max() == 2 and np.array_equal(binary.foreground, mask == 255)


def test_nnunet_raw_layout_has_what_its_reader_expects(tmp_path):
    write_nuclei(tmp_path / "ids", 3, seed=2)
    samples = read_annotated(tmp_path / "ids", 1)
    write_nnunet_raw(samples[:2], samples[2:], tmp_path)
    dataset = tmp_path / "nnUNet_raw" / f"Dataset{peers.NNUNET_DATASET_ID}_peers"
    description = json.loads((dataset / "dataset.json").read_text())
    assert description == {
        "channel_names": {"0": "gray"},
        "labels": {"background": 0, "foreground": 1},
        "numTraining": 2,
        "file_ending": ".png",
    }
    label = skimage.io.imread(dataset / "labelsTr" / "case0001.png")
    assert np.array_equal(label, samples[1].foreground.astype(np.uint8))
    assert np.array_equal(skimage.io.imread(dataset / "imagesTr" / "case0000_0000.png"), samples[0].image)
    assert sorted(path.name for path in (dataset / "imagesTs").iterdir()) == ["held0000_0000.png"]


@pytest.mark.skipif(not peers.environment_ready("nnunet"), reason="no nnU-Net environment in cache/peers/nnunet")
def test_nnunet_itself_accepts_the_raw_dataset(tmp_path):
    write_nuclei(tmp_path / "ids", 3, seed=3)
    samples = read_annotated(tmp_path / "ids", 1)
    write_nnunet_raw(samples[:2], samples[2:], tmp_path)
    dataset = tmp_path / "nnUNet_raw" / f"Dataset{peers.NNUNET_DATASET_ID}_peers"
    check = (
        "import sys; from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity; "
        "verify_dataset_integrity(sys.argv[1], num_processes=1)"
    )
    python = peers.ENVIRONMENTS / "nnunet" / "bin" / "python"
    done = subprocess.run([str(python), "-c", check, str(dataset)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def tiny_yaml(tmp_path) -> str:
    sections: dict = {}
    for override in TINY:
        key, value = override.split("=", 1)
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = yaml.safe_load(value)
    for name in ("synthetic_images", "synthetic_size", "val_fraction"):
        sections["train"].pop(name)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(sections))
    return str(path)


@pytest.mark.slow
def test_ours_trains_for_the_minutes_and_a_missing_peer_is_one_line_in_its_row(tmp_path, monkeypatch, capsys):
    write_nuclei(tmp_path / "train", 6, seed=4)
    write_nuclei(tmp_path / "held", 2, seed=5)
    monkeypatch.setattr(peers, "ENVIRONMENTS", tmp_path / "peers")  # no environments there
    (tmp_path / "temporary").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temporary"))  # where the systems' work folders go
    out = tmp_path / "table.csv"
    arguments = ["--peers", "nnunet", "--data", str(tmp_path / "train"), "--held", str(tmp_path / "held")]
    bench.main([*arguments, "--minutes", "0.1", "--config", tiny_yaml(tmp_path), "--csv", str(out)])
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["system", "minutes", "pixel_error", "dice", "rand_error", "object_f1"]
    assert [row["system"] for row in rows] == ["ours", "nnunet"]
    assert [row["minutes"] for row in rows] == ["0.1", "0.1"]
    assert 0 <= float(rows[0]["pixel_error"]) <= 1 and 0 <= float(rows[0]["object_f1"]) <= 1
    assert rows[1]["pixel_error"] == ""
    assert "nnunet: no environment; build it with --install-peers, or: python -m venv" in printed
    assert "pip install torch==2.14.1 torchvision==0.29.1 nnunetv2==2.8.1" in printed
    assert list((tmp_path / "temporary").iterdir()) == []  # every system's work folder removed


def test_peers_options_are_checked_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.parse_options(["--peers", "nnunet", "--data", str(tmp_path)])
    assert "--peers needs --data (the training folder), --held" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_options(["--peers", "cellpose", "--data", "a", "--held", "b", "--minutes", "1"])
    assert "some of nnunet, stardist" in capsys.readouterr().err
    (tmp_path / "old.csv").write_text("x")
    with pytest.raises(SystemExit):
        bench.parse_options(
            ["--peers", "nnunet", "--data", "a", "--held", "b", "--minutes", "1", "--csv", str(tmp_path / "old.csv")]
        )
    assert "exists; name a new file" in capsys.readouterr().err


def test_peer_figure_plots_each_data_set_and_refuses_tables_without_scores(tmp_path, capsys):
    for name, rows in (
        ("isbi-3.csv", [["ours", 3, 0.12, 0.9, 0.3, 0.7], ["nnunet", 3, 0.2, 0.8, 0.6, 0.5]]),
        ("isbi-10.csv", [["ours", 10, 0.1, 0.92, 0.2, 0.75], ["nnunet", 10, 0.16, 0.85, 0.58, 0.55]]),
        ("nuclei-10.csv", [["ours", 10, 0.05, 0.9, 0.2, 0.6], ["stardist", 10, "", "", "", ""]]),
    ):
        with (tmp_path / name).open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(peers.CSV_COLUMNS)
            writer.writerows(rows)
    figure = tmp_path / "peers.png"
    bench.main(
        ["--peer-figure", str(figure), *(str(tmp_path / n) for n in ("isbi-3.csv", "isbi-10.csv", "nuclei-10.csv"))]
    )
    assert capsys.readouterr().out.splitlines()[0] == (
        "isbi: nnunet to reach ours at 10 min: pixel_error 0.1000 not by 10 min (best 0.1600); "
        "rand_error 0.2000 not by 10 min (best 0.5800); object_f1 0.7500 not by 10 min (best 0.5500)"
    )
    image = skimage.io.imread(figure)
    assert image.shape[1] == 2 * 400 and image.shape[0] == 3 * 300  # 2 data sets x 3 scores, 100 dpi
    (tmp_path / "empty-1.csv").write_text(",".join(peers.CSV_COLUMNS) + "\nstardist,1,,,,\n")
    done = subprocess.run(
        [
            sys.executable,
            str(peers.ROOT / "bench.py"),
            "--peer-figure",
            str(tmp_path / "e.png"),
            str(tmp_path / "empty-1.csv"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'empty-1.csv'}: no scored rows to plot"
    ]


def test_catch_up_names_the_first_budget_at_which_a_peer_scores_as_well_as_ours():
    def scores(pixel, rand, f1):
        return {"pixel_error": pixel, "dice": 0.0, "rand_error": rand, "object_f1": f1}

    curves = {
        "nuclei": {
            "ours": [(3.0, scores(0.08, 0.5, 0.4)), (10.0, scores(0.05, 0.3, 0.5))],
            "stardist": [(3.0, scores(0.2, 0.7, 0.45)), (10.0, scores(0.1, 0.6, 0.55)), (30.0, scores(0.05, 0.4, 0.6))],
        }
    }
    # ours at 10 min: pixel 0.05 (stardist equals it at 30, not at 10), rand 0.3 (never), F1 0.5 (passed at 10)
    assert peers.catch_up_lines(curves) == [
        "nuclei: stardist to reach ours at 10 min: pixel_error 0.0500 by 30 min (not at 10); "
        "rand_error 0.3000 not by 30 min (best 0.4000); object_f1 0.5000 by 10 min (not at 3)"
    ]
    # the reference is ours' budget nearest the one asked for
    assert peers.catch_up_lines(curves, reference_minutes=4)[0].startswith("nuclei: stardist to reach ours at 3 min")
