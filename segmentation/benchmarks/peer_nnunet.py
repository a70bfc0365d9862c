"""nnU-Net v2 for a time budget, run by nnU-Net's own Python (``bench.py --peers nnunet``), not by this project's.

    PYTHON peer_nnunet.py WORK DATASET_ID MINUTES

``WORK`` holds ``nnUNet_raw/Dataset<ID>_<name>`` (imagesTr, labelsTr, imagesTs and dataset.json, written by
``segmentation.benchmarks.peers``); nnU-Net's folders for preprocessed data and results go beside it. Steps, as a
new user runs them: fingerprint, plan and preprocess (``nnUNetv2_plan_and_preprocess``), the ``2d`` configuration
trained on fold 0 on the CPU (``nnUNetv2_train DATASET 2d 0 -device cpu``) with nnU-Net's defaults but for one
thing, a trainer subclass that ends at the budget (counted from this script's start, preprocessing included), and
``imagesTs`` predicted by nnU-Net's own predictor into ``WORK/predictions``. Prints one line
``nnunet: <iterations> iterations, <seconds> s`` on success.

Only the standard library, nnU-Net and what it brings may be imported here.
"""

import json
import os
import sys
import time

STARTED = time.monotonic()


def main(work: str, dataset_id: int, minutes: float) -> None:
    folders = {name: os.path.join(work, name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, folder in folders.items():  # read by nnunetv2.paths when nnU-Net is imported
        os.environ[name] = folder
        os.makedirs(folder, exist_ok=True)
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    deadline = STARTED + 60 * minutes

    class nnUNetTrainerBudget(nnUNetTrainer):
        """nnUNetTrainer's loop, ending after the iteration that spends the budget (checkpoint_final.pth)."""

        # nnU-Net records its constructor's arguments by name, so a subclass spells them out
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):  # noqa: B008
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.iterations = 0

        def run_training(self):
            self.on_train_start()
            for _ in range(self.current_epoch, self.num_epochs):
                self.on_epoch_start()
                self.on_train_epoch_start()
                outputs = []
                for _ in range(self.num_iterations_per_epoch):
                    outputs.append(self.train_step(next(self.dataloader_train)))
                    self.iterations += 1
                    if time.monotonic() >= deadline:
                        break
                if time.monotonic() >= deadline:
                    self.current_epoch += 1  # on_train_end steps it back, as after on_epoch_end
                    break
                self.on_train_epoch_end(outputs)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    steps = range(self.num_val_iterations_per_epoch)
                    self.on_validation_epoch_end([self.validation_step(next(self.dataloader_val)) for _ in steps])
                self.on_epoch_end()
            self.on_train_end()

    extract_fingerprints([dataset_id], check_dataset_integrity=True, num_processes=2)
    plan_experiments([dataset_id])
    preprocess([dataset_id], configurations=("2d",), num_processes=(2,))
    preprocessed = os.path.join(folders["nnUNet_preprocessed"], maybe_convert_to_dataset_name(dataset_id))
    with (
        open(os.path.join(preprocessed, "nnUNetPlans.json")) as plans,
        open(os.path.join(preprocessed, "dataset.json")) as dataset_json,
    ):
        plans, dataset_json = json.load(plans), json.load(dataset_json)
    plans["continue_training"] = False  # as nnUNetv2_train without --c
    trainer = nnUNetTrainerBudget(plans, "2d", 0, dataset_json, device=torch.device("cpu"))
    trainer.run_training()
    final = os.path.join(trainer.output_folder, "checkpoint_final.pth")
    # the subclass changes when training ends, not the network: nnU-Net's predictor rebuilds nnUNetTrainer's
    checkpoint = torch.load(final, map_location="cpu", weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainer"
    torch.save(checkpoint, final)
    trained = time.monotonic() - STARTED
    # the predictor finds the trainer among nnU-Net's own modules, which import timm and torchvision: the peer's
    # environment pins a torch and torchvision pair that import together
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(trainer.output_folder_base, use_folds=(0,))
    raw = os.path.join(folders["nnUNet_raw"], maybe_convert_to_dataset_name(dataset_id))
    predictor.predict_from_files(
        os.path.join(raw, "imagesTs"),
        os.path.join(work, "predictions"),
        num_processes_preprocessing=1,
        num_processes_segmentation_export=1,
    )
    print(f"nnunet: {trainer.iterations} iterations, {trained:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
