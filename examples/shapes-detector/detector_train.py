"""Train the shapes detector on the train split (made on the spot) and write its weights as safetensors.

Each ground-truth box is assigned to the grid cells whose centers lie inside it and within a
cell of its center (a cell two boxes claim goes to the smaller one); those cells learn the box
(GIoU and L1 losses) and the class (sigmoid focal loss against every other cell's background).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from detector_data import load_split, write_data
from detector_model import STRIDE, build_model
from safetensors.torch import save_file
from shapes_scenes import CLASSES, MAX_SHAPES
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

# Cells farther than this from a box center (in cells) are not taught that box: the head reaches 1.5.
ASSIGN_RADIUS = 1.0


def _targets(scenes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    boxes = torch.zeros(len(scenes), MAX_SHAPES, 4)
    labels = torch.zeros(len(scenes), MAX_SHAPES, dtype=torch.long)
    valid = torch.zeros(len(scenes), MAX_SHAPES, dtype=torch.bool)
    for i, scene in enumerate(scenes):
        n = len(scene.labels)
        boxes[i, :n] = torch.from_numpy(scene.boxes).float()
        labels[i, :n] = torch.from_numpy(scene.labels)
        valid[i, :n] = True
    return boxes, labels, valid


def assign(grid: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and anchor: whether it is positive, and the index of its box."""
    points = (grid * STRIDE).T[None, :, None, :]  # [1, A, 1, 2]
    b = boxes[:, None]  # [B, 1, M, 4]
    inside = (points[..., 0] > b[..., 0]) & (points[..., 0] < b[..., 2]) & (points[..., 1] > b[..., 1]) & (points[..., 1] < b[..., 3])
    centers = (b[..., :2] + b[..., 2:]) / 2
    near = ((points - centers).abs() <= ASSIGN_RADIUS * STRIDE).all(dim=-1)
    own_cell = ((points - centers).abs() <= STRIDE / 2).all(dim=-1)
    candidate = ((inside & near) | own_cell) & valid[:, None]
    area = ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])).expand_as(candidate)
    area = torch.where(candidate, area, torch.full_like(area, math.inf))
    smallest, index = area.min(dim=-1)
    return torch.isfinite(smallest), index


def loss_fn(model, images, boxes, labels, valid) -> torch.Tensor:
    box_terms, logits = model.raw(images)
    positive, index = assign(model.grid, boxes, valid)
    targets = torch.zeros_like(logits)
    matched_labels = labels.gather(1, index)
    targets.scatter_(1, matched_labels[:, None], positive[:, None].float())
    count = positive.sum().clamp(min=1)
    cls_loss = sigmoid_focal_loss(logits, targets, reduction="sum") / count
    predicted = box_convert(model.decode(box_terms, model.grid).transpose(1, 2)[positive], "cxcywh", "xyxy")
    matched = boxes.gather(1, index[..., None].expand(-1, -1, 4))[positive]
    box_loss = generalized_box_iou_loss(predicted, matched, reduction="mean") + (predicted - matched).abs().mean() / STRIDE
    return cls_loss + 2.0 * box_loss


def train(checkpoint: Path, epochs: int = 12, seed: int = 0, batch: int = 64, lr: float = 8e-3) -> dict[str, float]:
    """Make the data if missing, train from scratch and write ``checkpoint``; returns the final training loss."""
    write_data()
    torch.manual_seed(seed)
    scenes = load_split("train")
    images = torch.from_numpy(np.stack([s.image for s in scenes]))
    boxes, labels, valid = _targets(scenes)
    model = build_model(num_classes=len(CLASSES))
    steps = epochs * math.ceil(len(images) / batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch):
            pick = order[start : start + batch]
            optimizer.zero_grad()
            loss = loss_fn(model, images[pick], boxes[pick], labels[pick], valid[pick])
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        final = float(loss_fn(model, images[:512], boxes[:512], labels[:512], valid[:512]))
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    save_file(model.state_dict(), str(tmp))
    tmp.replace(checkpoint)
    return {"train_loss": final}
