"""What several test files build from a whole config: its data sets and the predictor of a model."""

from dataset import DataSets, build_datasets
from segmentation.config import Config
from segmentation.inference.infer import Predictor


def datasets_of(config: Config, note=lambda message: None, rank: int = 0, world_size: int = 1) -> DataSets:
    """``dataset.build_datasets`` of a config's ``unet`` and ``train`` sections, notes dropped unless given."""
    return build_datasets(config.unet, config.train, note, rank, world_size)


def predictor_of(model, config: Config, tta: bool = False, threshold: float | None = None) -> Predictor:
    """The predictor of a model trained with ``config``, as training and test.py build it."""
    return Predictor.from_settings(model, config.predict, config.augment, config.train.image_scale, tta, threshold)
