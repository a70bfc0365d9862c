"""segmentation.inference.infer: tiled whole-image inference against one pass over the whole mirrored image,
test-time augmentation and scales, the predictor's own batch size, the watershed cut and the calibrated
threshold."""

import dataclasses

import numpy as np
import pytest
import skimage.io
import torch
from skimage import measure
from skimage.metrics import adapted_rand_error
from torch import nn

from model import UNet, build_model
from segmentation.config import UserError, load_config
from segmentation.data.preprocess import pad_for_model
from segmentation.engine.step import train_step
from segmentation.inference import predict
from segmentation.inference.infer import (
    Predictor,
    calibrate_threshold,
    predict_probabilities,
    predicted_classes,
    separate_cells,
)
from segmentation.inference.objects import ObjectRules
from tests.helpers import CUDA_SIZE, datasets_of, learnable_batch, plan_of, run_out_of_memory, small_unet


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two spin-wait badly when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ConvStandIn(nn.Module):
    """One same-size convolution with the attributes of a padding-1 UNet that inference reads."""

    def __init__(self, kernel_size: int, image_channels: int = 1, num_classes: int = 3, depth: int = 2):
        super().__init__()
        self.image_channels, self.num_classes, self.depth, self.padding = image_channels, num_classes, depth, 1
        self.conv = nn.Conv2d(image_channels, num_classes, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def whole_image_probabilities(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Reference: softmax of one forward pass over the whole mirrored image, cropped to the image."""
    padded = torch.from_numpy(pad_for_model(image.numpy(), model.depth, model.padding))
    with torch.no_grad():
        return model(padded[None]).softmax(1)[0, :, : image.shape[-2], : image.shape[-1]]


def record_batches(model: nn.Module) -> list[tuple[int, ...]]:
    """Input shapes of every forward call of ``model`` from now on; the model must be in eval mode."""
    shapes = []

    def hook(module, inputs):
        assert not module.training
        shapes.append(tuple(inputs[0].shape))

    model.register_forward_pre_hook(hook)
    return shapes


def unet(widths=(4, 8), padding=0, norm="none", image_channels=1, seed=0) -> UNet:
    torch.manual_seed(seed)
    return UNet(image_channels, 2, widths, padding=padding, norm=norm).eval()


# --- padding 0: seamless overlap-tile ------------------------------------------


@pytest.mark.parametrize(
    "widths, tile_size, shape",
    [
        ((4, 8), 60, (1, 97, 130)),  # many 20 px output tiles, the last row and column shifted back
        ((4, 8), 60, (1, 5, 7)),  # smaller than one tile
        ((4, 8), 60, (1, 20, 20)),  # exactly one output tile
        ((4, 8), 60, (3, 41, 23)),  # colour
        ((4, 8, 16), 124, (1, 97, 130)),  # depth 3: 36 px output tiles, 8 px pooling period
        ((4, 8), 60, (1, 1, 50)),  # one row
    ],
)
@pytest.mark.parametrize("norm", ["layer", "none"])
def test_padding0_tiles_equal_whole_image(widths, tile_size, shape, norm):
    model = unet(widths, norm=norm, image_channels=shape[0])
    image = torch.randn(shape)
    shapes = record_batches(model)
    probabilities = predict_probabilities(model, image, tile_size=tile_size)
    assert probabilities.shape == (2, *shape[1:]) and probabilities.dtype == torch.float32
    assert probabilities.device.type == "cpu"
    torch.testing.assert_close(probabilities, whole_image_probabilities(model, image), atol=1e-5, rtol=0)
    if shape[1:] == (97, 130):
        assert len(shapes) > 1, "the image should have been cut into several tiles"


def test_padding0_one_exact_tile_is_one_forward_pass():
    model = unet()
    shapes = record_batches(model)
    predict_probabilities(model, torch.randn(1, 20, 20), tile_size=60)
    assert shapes == [(1, 1, 60, 60)]


def test_padding0_default_tile_shrinks_to_a_small_image():
    model = unet((4, 8, 16, 32))
    image = torch.randn(1, 5, 7)
    shapes = record_batches(model)
    predict_probabilities(model, image)
    assert shapes == [(1, 1, *pad_for_model(image.numpy(), 4, 0).shape[-2:])]


# --- padding 1: Gaussian blending ------------------------------------------------


def test_padding1_per_pixel_model_is_exact():
    torch.manual_seed(0)
    model = ConvStandIn(kernel_size=1)
    image = torch.randn(1, 97, 130)
    probabilities = predict_probabilities(model, image, tile_size=32, overlap=0.25)
    torch.testing.assert_close(probabilities, whole_image_probabilities(model, image), atol=1e-5, rtol=0)


def test_padding1_gaussian_blending_hides_tile_edges():
    # A 3x3 convolution sees zero padding at every tile edge, which is wrong inside the image. Each
    # such edge lies nearer the centre of an overlapping tile: the Gaussian weights keep the edge's
    # share to a few per cent, where plain averaging (or a floor on the weights, near the image's
    # border) gives it about half: a maximum error of 0.6 (0.46) instead of 0.03 here.
    torch.manual_seed(0)
    model = ConvStandIn(kernel_size=3)
    with torch.no_grad():
        model.conv.weight.mul_(10)
    image = torch.randn(1, 100, 100)
    probabilities = predict_probabilities(model, image, tile_size=32, overlap=0.5)
    error = (probabilities - whole_image_probabilities(model, image)).abs().max()
    assert error < 0.05


def test_padding1_unet_close_to_whole_image():
    model = unet(padding=1)
    image = torch.randn(1, 150, 170)
    reference = whole_image_probabilities(model, image)
    errors = {
        overlap: (predict_probabilities(model, image, tile_size=64, overlap=overlap) - reference).abs().mean()
        for overlap in (0.0, 0.5)
    }
    assert errors[0.5] < 0.02
    assert errors[0.5] < errors[0.0] / 2


def test_padding1_image_smaller_than_a_tile_is_one_padded_tile():
    model = unet(padding=1)
    image = torch.randn(1, 13, 30)
    shapes = record_batches(model)
    probabilities = predict_probabilities(model, image, tile_size=64)
    assert shapes == [(1, 1, 16, 32)]
    torch.testing.assert_close(probabilities, whole_image_probabilities(model, image), atol=1e-5, rtol=0)


# --- test-time augmentation -----------------------------------------------------


def test_tta_leaves_an_equivariant_model_unchanged():
    torch.manual_seed(0)
    model = ConvStandIn(kernel_size=1)
    image = torch.randn(1, 40, 70)  # tiles of 32 x 64 px: a rotation swaps their sides
    plain = predict_probabilities(model, image, tile_size=64)
    augmented = predict_probabilities(model, image, tile_size=64, tta=True)
    torch.testing.assert_close(augmented, plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape, tile_size", [((1, 50, 70), 60), ((1, 10, 70), 76)])  # square, oblong tiles
def test_tta_averages_the_eight_dihedral_transforms(shape, tile_size):
    model = unet()
    image = torch.randn(shape)
    padded = torch.from_numpy(pad_for_model(image.numpy(), model.depth, model.padding))[None]
    expected = 0
    with torch.no_grad():
        for flip in (False, True):
            for turns in range(4):
                transformed = (padded.flip(-1) if flip else padded).rot90(turns, (-2, -1))
                probabilities = model(transformed).softmax(1).rot90(-turns, (-2, -1))
                expected = expected + (probabilities.flip(-1) if flip else probabilities) / 8
    expected = expected[0, :, : shape[1], : shape[2]]
    augmented = predict_probabilities(model, image, tile_size=tile_size, tta=True)
    torch.testing.assert_close(augmented, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(augmented, predict_probabilities(model, image, tile_size=tile_size), atol=1e-3)


# --- batching, mode, errors ------------------------------------------------------


@pytest.mark.parametrize("padding, tta", [(0, False), (1, False), (0, True)])
def test_batch_size_bounds_memory_not_the_result(padding, tta):
    model = unet(padding=padding)
    image = torch.randn(1, 70, 90)
    tile_size = 60 if padding == 0 else 32
    results, largest = {}, {}
    for batch_size in (1, 3, 100):

        def record(module, inputs, batch_size=batch_size):
            largest[batch_size] = max(largest.get(batch_size, 0), len(inputs[0]))

        handle = model.register_forward_pre_hook(record)
        results[batch_size] = predict_probabilities(model, image, tile_size=tile_size, batch_size=batch_size, tta=tta)
        handle.remove()
    tiles = largest[100]  # all tiles in one batch
    assert tiles > 3
    assert largest[1] == 1 and largest[3] == 3
    torch.testing.assert_close(results[1], results[3], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[1], results[100], atol=1e-5, rtol=0)


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_is_restored(training):
    model = unet(norm="batch").train(training)
    record_batches(model)  # asserts eval mode during the forward passes
    predict_probabilities(model, torch.randn(1, 30, 30), tile_size=60)
    assert all(module.training == training for module in model.modules())


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"image has 3 channels but the model expects 1 \(unet.image_channels\)"):
        predict_probabilities(unet(), torch.randn(3, 20, 20))


@pytest.mark.parametrize("shape", [(20, 20), (1, 1, 20, 20), (1, 0, 20)])
def test_image_that_is_not_c_h_w_is_a_clear_error(shape):
    with pytest.raises(ValueError, match=r"image must be a \(C, H, W\) tensor"):
        predict_probabilities(unet(), torch.randn(shape))


def test_probabilities_sum_to_one():
    probabilities = predict_probabilities(unet(padding=1), torch.randn(1, 45, 77), tile_size=32, tta=True)
    np.testing.assert_allclose(probabilities.sum(0).numpy(), 1.0, atol=1e-5)


def test_image_scale_predicts_on_the_resized_image_and_returns_the_full_size():
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = UNet(1, 2, (4, 8), padding=1, norm="batch").eval()
    image = torch.randn(1, 90, 70)
    probabilities = predict_probabilities(model, image, 64, image_scale=0.5)
    assert probabilities.shape == (2, 90, 70)
    torch.testing.assert_close(probabilities.sum(0), torch.ones(90, 70))
    small = F.interpolate(image[None], size=(45, 35), mode="bilinear", antialias=True, align_corners=False)[0]
    expected = F.interpolate(
        predict_probabilities(model, small, 64)[None], size=(90, 70), mode="bilinear", align_corners=False
    )[0]
    torch.testing.assert_close(probabilities, expected)


def test_image_scale_shrinks_the_training_images_only():
    from skimage.transform import resize

    from segmentation.config import load_config
    from segmentation.data.synthetic import synthetic_em_set

    config = load_config(
        None,
        [
            "unet.input_channels=[4, 8]",
            "train.synthetic_images=4",
            "train.synthetic_size=63",
            "train.val_images=[3]",
            "train.tile_size=60",
            "train.image_scale=0.3333333",
        ],
    )
    data = datasets_of(config, lambda message: None)
    _, label, _ = synthetic_em_set(4, 63, config.train.seed)[0]
    example_image, example_label, example_weight = data.example  # the first training image
    assert example_image.shape == (1, 21, 21) and example_weight.shape == (21, 21)
    # nearest neighbour at 1/3 samples every third pixel from the second, as scikit-image's order-0 resize does
    expected = resize(label, (21, 21), order=0, anti_aliasing=False, preserve_range=True).astype(label.dtype)
    assert np.array_equal(example_label, expected)
    image, val_label, _ = data.val[0]
    assert image.shape[-2:] == (63, 63) and val_label.shape == (63, 63)


def test_tta_uses_only_the_transforms_that_training_augmented():
    from dataclasses import replace

    from segmentation.config import AugmentSettings
    from segmentation.inference.infer import DIHEDRAL, tta_transforms

    augment = AugmentSettings()
    assert tta_transforms(augment) == DIHEDRAL and len(set(DIHEDRAL)) == 8
    assert tta_transforms(replace(augment, rotate90=False)) == [(0, False), (0, True), (2, False), (2, True)]
    assert tta_transforms(replace(augment, rotate90=False, vertical_flip=False)) == [(0, False), (0, True)]
    assert tta_transforms(replace(augment, rotate90=False, flip=False)) == [(0, False)]
    assert tta_transforms(replace(augment, rotate90=False, flip=False, rotation=180.0)) == DIHEDRAL

    torch.manual_seed(0)
    model = UNet(1, 2, (4, 8), padding=1, norm="batch").eval()
    image = torch.randn(1, 64, 64)
    plain = predict_probabilities(model, image, 64)
    mirrored = predict_probabilities(model, image.flip(-1), 64).flip(-1)
    both = predict_probabilities(model, image, 64, tta=[(0, False), (0, True)])
    torch.testing.assert_close(both, (plain + mirrored) / 2)
    upside_down = predict_probabilities(model, image.flip(-2), 64).flip(-2)
    four = predict_probabilities(model, image, 64, tta=[(0, False), (0, True), (2, False), (2, True)])
    half_turn = predict_probabilities(model, image.rot90(2, (-2, -1)), 64).rot90(-2, (-2, -1))
    torch.testing.assert_close(four, (plain + mirrored + upside_down + half_turn) / 4)


def test_predict_scales_average_the_predictions_at_each_multiple_of_image_scale():
    import torch.nn.functional as F

    from segmentation.config import ConfigError, load_config
    from segmentation.inference.infer import Predictor

    torch.manual_seed(0)
    model = UNet(1, 2, (4, 8), padding=1, norm="batch").eval()
    image = torch.randn(1, 80, 60)
    config = load_config(
        None,
        [
            "unet.input_channels=[4, 8]",
            "train.image_scale=0.5",
            "predict.scales=[0.8, 1.0, 1.5]",
            "predict.tile_size=64",
        ],
    )
    expected = []
    for size in ((32, 24), (40, 30), (60, 45)):  # 80 x 60 at 0.5 times 0.8, 1.0 and 1.5
        small = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        expected.append(
            F.interpolate(
                predict_probabilities(model, small, 64)[None], size=(80, 60), mode="bilinear", align_corners=False
            )[0]
        )
    averaged = Predictor(model, plan_of(config), config.predict, config.data.image_scale).probabilities(image)
    torch.testing.assert_close(averaged, sum(expected) / 3)
    assert not torch.allclose(averaged, expected[1], atol=1e-3)  # the other scales changed the result
    for wrong in ("predict.scales=[]", "predict.scales=[0.0, 1.0]", "predict.scales=1.0"):
        with pytest.raises(ConfigError, match="predict.scales"):
            load_config(None, [wrong])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiled_bf16_inference_gives_the_fp32_masks():
    device = torch.device("cuda")
    model, batch = small_unet(device), learnable_batch(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):  # a trained model: its probabilities are not all near 0.5
        train_step(model, optimizer, batch, "ce", 1.0, device)
    image = learnable_batch(device, count=1, size=300, seed=1)[0][0]
    masks = [predict_probabilities(model, image, tile_size=CUDA_SIZE, amp=amp).argmax(0) for amp in (True, False)]
    overlap = (masks[0] & masks[1]).sum().item()
    dice = 2 * overlap / (masks[0].sum().item() + masks[1].sum().item())
    assert dice >= 0.999, dice


def write_images(folder, count: int = 2) -> list:
    folder.mkdir()
    for index in range(count):
        skimage.io.imsave(
            folder / f"{index}.png",
            (np.random.default_rng(index).random((70, 70)) * 255).astype(np.uint8),
            check_contrast=False,
        )
    return sorted(folder.iterdir())


def test_prediction_halves_its_batch_until_it_fits(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    config = load_config(
        None, ["unet.input_channels=[4, 8]", "train.device=cpu", "predict.tile_size=60", "predict.batch_size=4"]
    )
    model = build_model(config.unet).eval()
    inputs = write_images(tmp_path / "images")
    reference = load_config(None, ["unet.input_channels=[4, 8]", "predict.tile_size=60", "predict.batch_size=1"])
    predict.predict_files(
        Predictor(model, plan_of(reference), reference.predict), inputs, tmp_path / "reference", probabilities=True
    )
    sizes = run_out_of_memory(monkeypatch, above_batch=1)
    predictor = Predictor(model, plan_of(config), config.predict)
    predict.predict_files(predictor, inputs, tmp_path / "out", probabilities=True)
    notes = [line for line in capsys.readouterr().err.splitlines() if "out of memory" in line]
    assert notes == [
        "note: out of memory predicting on cpu: predict.batch_size is now 2 (tiles per forward pass), retrying",
        "note: out of memory predicting on cpu: predict.batch_size is now 1 (tiles per forward pass), retrying",
    ]
    # the predictor keeps its smaller batch for the second image; the settings stay as resolved
    assert predictor.batch_size == 1 and max(sizes[-10:]) == 1 and config.predict.batch_size == 4
    for name in ("0_probability.tif", "1_probability.tif"):
        assert np.array_equal(
            skimage.io.imread(tmp_path / "out" / name), skimage.io.imread(tmp_path / "reference" / name)
        )
    run_out_of_memory(monkeypatch, above_batch=0)
    with pytest.raises(
        UserError,
        match=(
            r"^out of memory while predicting on cpu \(.*\) with predict.batch_size=1, predict.tile_size=60: "
            r"lower predict.tile_size"
        ),
    ):
        predict.predict_files(predictor, inputs, tmp_path / "again")


def test_calibrate_threshold_against_a_hand_computation():
    generator = np.random.default_rng(0)
    probability = generator.random((2, 40, 40))
    labels = [(p >= 0.3).astype(np.int64) for p in probability]  # a perfect prediction at threshold 0.3
    threshold, table = calibrate_threshold(list(probability), labels, "pixel_error")
    assert threshold == pytest.approx(0.3)
    for row in table:
        wrong = sum(np.count_nonzero((p >= row["threshold"]) != (label == 1)) for p, label in zip(probability, labels))
        assert row["pixel_error"] == pytest.approx(wrong / probability.size)
        expected = np.mean(
            [
                adapted_rand_error(
                    measure.label(label == 1, connectivity=1),
                    measure.label(p >= row["threshold"], connectivity=1),
                    ignore_labels=(0,),
                )[0]
                for p, label in zip(probability, labels)
            ]
        )
        assert row["rand_error"] == pytest.approx(expected)
    assert table[[row["threshold"] for row in table].index(0.3)]["rand_error"] == pytest.approx(0.0)
    assert calibrate_threshold(list(probability), labels, "dice")[0] == pytest.approx(0.3)


def test_separate_cells_cuts_a_thin_bridge_and_keeps_unseeded_cells():
    # two cells (probability peaks) joined by a 2-px bridge where the membrane has a gap, and a third,
    # faint cell with no seed
    y, x = np.mgrid[0:40, 0:60]
    probability = np.maximum(
        np.exp(-((y - 20) ** 2 + (x - 15) ** 2) / 60), np.exp(-((y - 20) ** 2 + (x - 40) ** 2) / 60)
    )
    cells = probability >= 0.3
    cells[19:21, 15:41] = True
    probability[19:21, 15:41] = np.maximum(probability[19:21, 15:41], 0.35)
    cells[2:6, 52:58] = True  # the faint cell
    probability[2:6, 52:58] = 0.4
    assert measure.label(cells, connectivity=1).max() == 2
    separated = separate_cells(cells, probability, seed_threshold=0.9)
    assert not np.any(separated & ~cells)
    components = measure.label(separated, connectivity=1)
    assert components.max() == 3
    assert components[20, 15] != components[20, 40]
    assert np.count_nonzero(cells & ~separated) <= 2 * 40  # a 1-px line, no more
    assert np.array_equal(separated[2:6, 52:58], cells[2:6, 52:58])


def test_separate_cells_ignores_seeds_smaller_than_min_seed_area():
    # one cell: a large sure centre, and a 3x3 island of high probability behind a dip (an organelle);
    # a second cell whose only sure pixels are a 2x2 island
    probability = np.full((30, 60), 0.8)
    probability[:, 28:32] = 0.0  # a membrane between the two cells
    probability[5:20, 3:18] = 0.99  # 225 px seed
    probability[20:25, 19:26] = 0.7  # the dip around the island
    probability[21:24, 21:24] = 0.99  # 9 px island
    probability[10:12, 40:42] = 0.99  # 4 px, the second cell's only seed
    cells = probability >= 0.5
    assert measure.label(cells, connectivity=1).max() == 2
    split = separate_cells(cells, probability, seed_threshold=0.95)
    assert measure.label(split, connectivity=1).max() == 3  # every island seeds its own piece
    whole = separate_cells(cells, probability, seed_threshold=0.95, min_seed_area=10)
    assert np.array_equal(whole, cells)  # the island floods from the big seed; the seedless cell stays whole
    assert np.array_equal(separate_cells(cells, probability, seed_threshold=0.95, min_seed_area=9), split)


def predictor_for(boundary_class: bool, rules: ObjectRules, *overrides: str) -> Predictor:
    model = UNet(input_channels=(4, 8), padding=1, boundary_class=boundary_class)
    config = load_config(None, ["unet.input_channels=[4, 8]", "unet.padding=1", *overrides])
    plan = dataclasses.replace(plan_of(config), min_object_size=rules.min_size, fill_holes=rules.fill_holes)
    return Predictor(model, plan.for_prediction(config.predict), config.predict)


def test_class_masks_are_decided_as_before_and_the_border_joins_its_object():
    rng = np.random.default_rng(0)
    two = torch.from_numpy(rng.random((1, 40, 50)).astype(np.float32))
    probabilities = torch.cat([1 - two, two])
    plain = predictor_for(False, ObjectRules(), "predict.watershed_seeds=0.9")
    assert not plain.decides_by_objects
    expected = predicted_classes(probabilities, 0.5, 0.9, 0)
    assert torch.equal(plain.classes(probabilities), expected)  # the ISBI path: unchanged
    assert np.array_equal(plain.objects(probabilities), measure.label(expected.numpy(), connectivity=1))
    three = torch.from_numpy(rng.dirichlet([1, 1, 1], size=(40, 50)).transpose(2, 0, 1).astype(np.float32))
    bordered = predictor_for(True, ObjectRules())
    folded = bordered.class_probabilities(three)
    assert torch.allclose(folded, torch.stack([three[0], three[1] + three[2]]))
    assert torch.equal(bordered.classes(three), torch.from_numpy(bordered.objects(three) > 0).long())
    assert torch.equal(bordered.classes(three), (folded[1] >= 0.5).long())  # every foreground pixel is in an object


def test_active_rules_clean_the_mask_and_the_objects_alike():
    probability = np.zeros((30, 40), np.float32)
    probability[5:15, 5:15] = 0.9  # 100 px object with a 4 px hole
    probability[9:11, 9:11] = 0.1
    probability[25:27, 30:32] = 0.9  # a 4 px speck
    probabilities = torch.from_numpy(np.stack([1 - probability, probability]))
    cleaning = predictor_for(False, ObjectRules(min_size=10, fill_holes=True))
    objects = cleaning.objects(probabilities)
    assert np.unique(objects).tolist() == [0, 1] and np.count_nonzero(objects) == 100
    assert torch.equal(cleaning.classes(probabilities), torch.from_numpy(objects > 0).long())
