"""Is Mask R-CNN trainable on the digit canvases in reasonable CPU time? Its training throughput against the
segmentation preset's `unet` teacher, in the same run.

Mask R-CNN is torchvision's (`MaskRCNN` on a MobileNetV3 FPN backbone, `weights=None`), sized for the canvases:
64 px inputs, anchors of 12-36 px, and optionally fewer sampled RoIs (`--light`). Its instance masks are the
canvases' class masks cut to each digit's box. The U-Net trains as the preset's does (bf16 autocast,
channels_last, class-weighted CE + Dice). Both take batches of 16; their rounds alternate, so the machine's load
hits both alike. Prints images per second for each, their ratio, and how long one pass over the preset's
3,552 train canvases takes.

    python bench/bench_mask_rcnn.py [--backbone mobilenet_v3_large] [--light] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

BATCH = 16
PRESET_TRAIN_IMAGES = 3552


def instance_targets(c, i: int) -> dict:
    keep = c.labels[i] >= 0
    boxes, labels = torch.from_numpy(c.boxes[i][keep]).float(), torch.from_numpy(c.labels[i][keep]).long()
    masks = np.zeros((len(labels), *c.masks.shape[1:]), np.uint8)
    for j, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist())):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        masks[j, y0:y1, x0:x1] = c.masks[i, y0:y1, x0:x1] == 1 + label
    return {"boxes": boxes, "labels": labels + 1, "masks": torch.from_numpy(masks)}  # torchvision: 0 is background


def mask_rcnn(backbone: str, light: bool):
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import mobilenet_backbone
    from torchvision.models.detection.mask_rcnn import MaskRCNN

    sampling = dict(box_batch_size_per_image=64, rpn_batch_size_per_image=64, rpn_pre_nms_top_n_train=200,
                    rpn_post_nms_top_n_train=100) if light else {}
    net = MaskRCNN(mobilenet_backbone(backbone_name=backbone, weights=None, fpn=True, trainable_layers=6), num_classes=11,
                   min_size=64, max_size=64, image_mean=[0.5] * 3, image_std=[0.25] * 3,
                   rpn_anchor_generator=AnchorGenerator(((12, 18, 26, 36),) * 3, ((0.5, 1.0, 2.0),) * 3), **sampling)
    return net.train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="mobilenet_v3_large", choices=["mobilenet_v3_large", "mobilenet_v3_small"])
    ap.add_argument("--light", action="store_true", help="64 sampled RoIs and anchors per image instead of 512 and 256")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mask-rcnn-steps", type=int, default=4)
    ap.add_argument("--unet-steps", type=int, default=40)
    args = ap.parse_args()

    from visionops.data.canvases import make_canvases
    from visionops.models import create_model
    from visionops.tasks.segmentation.losses import PixelLoss

    torch.manual_seed(0)
    c = make_canvases(256, size=64, seed=0)
    x = torch.from_numpy(c.images).permute(0, 3, 1, 2).float() / 255
    masks = torch.from_numpy(c.masks)
    targets = [instance_targets(c, i) for i in range(len(c))]
    mrcnn = mask_rcnn(args.backbone, args.light)
    m_opt = torch.optim.AdamW(mrcnn.parameters(), lr=1e-3)
    unet = create_model("unet", in_channels=1, num_classes=11, image_size=64).train().to(memory_format=torch.channels_last)
    u_opt = torch.optim.AdamW(unet.parameters(), lr=6e-3)
    loss_fn = PixelLoss([1.0] * 11)
    g = torch.Generator().manual_seed(0)

    def mrcnn_step() -> None:
        idx = torch.randint(0, len(c), (BATCH,), generator=g).tolist()
        loss = sum(mrcnn([x[i].expand(3, -1, -1) for i in idx], [targets[i] for i in idx]).values())
        m_opt.zero_grad()
        loss.backward()
        m_opt.step()

    def unet_step() -> None:
        idx = torch.randint(0, len(c), (BATCH,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = unet(x[idx].contiguous(memory_format=torch.channels_last))
        loss = loss_fn(logits, masks[idx])
        u_opt.zero_grad()
        loss.backward()
        u_opt.step()

    def rate(step, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return steps * BATCH / (time.perf_counter() - t0)

    rate(mrcnn_step, 1), rate(unet_step, 2)  # warm-up
    m_rates, u_rates = [], []
    for r in range(args.rounds):
        m_rates.append(rate(mrcnn_step, args.mask_rcnn_steps))
        u_rates.append(rate(unet_step, args.unet_steps))
        print(f"round {r + 1}: Mask R-CNN {m_rates[-1]:.1f} images/s, unet {u_rates[-1]:.1f} images/s", flush=True)
    m, u = statistics.median(m_rates), statistics.median(u_rates)
    params = sum(p.numel() for p in mrcnn.parameters())
    print(f"Mask R-CNN ({args.backbone} FPN{', light sampling' if args.light else ''}, {params:,} parameters): "
          f"{m:.1f} train images/s; one pass over {PRESET_TRAIN_IMAGES:,} canvases {PRESET_TRAIN_IMAGES / m / 60:.1f} min")
    print(f"unet (the segmentation teacher): {u:.1f} train images/s; one pass {PRESET_TRAIN_IMAGES / u:.1f} s")
    print(f"unet / Mask R-CNN: {u / m:.0f}x")


if __name__ == "__main__":
    main()
