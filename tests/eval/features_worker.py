"""Extract features of a small folder with ``extract_features``, alone or under torchrun; rank 0 saves them.

Usage: python tests/eval/features_worker.py DATA_DIR N_IMAGES OUT.pth
"""

import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from utils.data.augment.per_image import eval_transform  # noqa: E402
from utils.data.folders import build_image_dataset  # noqa: E402
from utils.eval.features import extract_features  # noqa: E402
from utils.model.vit import build_backbone  # noqa: E402
from utils.runtime.distributed import cleanup, init_distributed_mode  # noqa: E402


def main(data_dir: str, n_images: int, out_path: str) -> None:
    ctx = init_distributed_mode("cpu", timeout_s=120)
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", patch_size=16, img_size=32)
    dataset = Subset(build_image_dataset(data_dir, "train", transform=eval_transform(32)), range(n_images))
    features, labels = extract_features(model, dataset, ctx.device, batch_size=4, num_workers=0)
    if ctx.is_main:
        torch.save({"features": features, "labels": labels}, out_path)
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
