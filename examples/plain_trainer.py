"""LayerFreeze with a plain Lightning ``Trainer`` (no Hydra) on the built-in digits task.

The backbone, pretrained on digits 0-4 (cached after the first run), stays frozen for two epochs
while the new head learns digits 5-9; then it thaws and fine-tunes at a 10x smaller learning rate.

    python examples/plain_trainer.py
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_freeze import LayerFreeze, SplitRunDataModule
from lightning_freeze.tasks.digits import DigitsClassifier, DigitsDataset


def main() -> dict[str, float]:
    torch.set_num_threads(1)  # the model is tiny; threads only add overhead
    pl.seed_everything(0, verbose=False)
    datamodule = SplitRunDataModule(dataset=DigitsDataset(classes=[5, 6, 7, 8, 9]), seed=0)  # Holdout split
    model = DigitsClassifier()  # configure_optimizers: AdamW over self.parameters(), nothing filtered
    trainer = pl.Trainer(
        max_epochs=4,
        accelerator="cpu",
        callbacks=[LayerFreeze("backbone.*", until_epoch=2, lr=3e-4)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir="outputs/plain_trainer",
    )
    trainer.fit(model, datamodule=datamodule)
    (metrics,) = trainer.test(model, datamodule=datamodule, verbose=False)
    print(f"test accuracy {metrics['test/acc']:.3f}  (backbone frozen for 2 epochs, then fine-tuned)")
    return metrics


if __name__ == "__main__":
    main()
