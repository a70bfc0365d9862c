"""segmentation.engine.checkpoint: a run resumes only on the split and architecture it trained on; checkpoints of
earlier versions load, resume and predict."""

import pytest
import torch

import training
from segmentation.config import UserError
from segmentation.engine.checkpoint import load_checkpoint, load_model
from tests.helpers import folder_config, tiny_config
from training import train


def check_resume(path, config) -> dict:
    """``load_checkpoint`` of ``path`` for a run of ``config``."""
    return load_checkpoint(path, config.unet, config.train)


@pytest.mark.slow
def test_resuming_under_another_train_seed_is_refused_only_where_the_split_changes(image_folder):
    last = (
        training.train(folder_config(image_folder, "train.folds=3", "train.fold=0", "train.max_epochs=1"))[
            "run_weights"
        ]
        / "last.pt"
    )
    check_resume(
        last, folder_config(image_folder, "train.folds=3", "train.fold=0", "train.seed=5", "train.split_seed=0")
    )
    with pytest.raises(
        UserError, match=r"another split \(train.split_seed \(else train.seed\): checkpoint 0, config 5\)"
    ):
        check_resume(last, folder_config(image_folder, "train.folds=3", "train.fold=0", "train.seed=5"))


@pytest.mark.slow
def test_resuming_on_another_fold_is_refused(image_folder):
    config = folder_config(image_folder, "train.folds=3", "train.fold=0", "train.max_epochs=1")
    last = training.train(config)["run_weights"] / "last.pt"
    assert last.parent.name.endswith("-fold0")
    check_resume(last, config)  # the same fold resumes
    with pytest.raises(
        UserError,
        match=(
            r"trained on another split \(train.fold: checkpoint 0, config 1\): resuming would mix its test "
            r"images into training"
        ),
    ):
        check_resume(last, folder_config(image_folder, "train.folds=3", "train.fold=1", "train.max_epochs=1"))
    # a checkpoint of a version without the fold keys resumes as one without folds
    state = torch.load(last, weights_only=True)
    for key in ("folds", "fold", "fold_order"):
        del state["config"]["train"][key]
    torch.save(state, last)
    with pytest.raises(UserError, match=r"another split \(train.folds: checkpoint None, config 3\)"):
        check_resume(last, config)
    check_resume(last, folder_config(image_folder, "train.max_epochs=1"))


@pytest.mark.slow
def test_a_checkpoint_of_an_earlier_version_loads_resumes_and_predicts(tmp_path):
    """Checkpoints written before the settings were typed (ed6eb72) store every key as plain data, the seed's
    legacy keys as null, and lack keys that came later: test.py loads them and a run resumes from them."""
    summary = train(tiny_config(tmp_path, "train.max_epochs=1", "train.run_name=old"))
    last = summary["run_weights"] / "last.pt"
    state = torch.load(last, weights_only=True)
    state["config"]["unet"].update(use_ln=None, input_shape=None)
    del state["config"]["train"]["split_seed"]
    torch.save(state, last)
    model, config, loaded, _ = load_model(last, None, [])
    assert config.train.effective_split_seed == 0 and config.unet.norm == "batch"
    assert all(torch.equal(tensor, state["model"][name]) for name, tensor in model.state_dict().items())
    resumed = train(tiny_config(tmp_path, "train.max_epochs=2", f"train.resume={last}"))
    assert resumed["run_weights"] == summary["run_weights"] and resumed["epoch"] == 2
