"""Train the shapes segmenter on the train split (made on the spot) and write its weights as safetensors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from segmenter_data import LABELS, load_split, write_data
from segmenter_model import build_model
from torch import nn


def train(checkpoint: Path, epochs: int = 8, seed: int = 0, batch: int = 64, lr: float = 8e-3) -> dict[str, float]:
    """Make the data if missing, train from scratch with per-pixel cross-entropy and write ``checkpoint``."""
    write_data()
    torch.manual_seed(seed)
    scenes = load_split("train")
    images = torch.from_numpy(np.stack([s.image for s in scenes]))
    masks = torch.from_numpy(np.stack([s.mask for s in scenes]).astype(np.int64))
    model = build_model(num_classes=len(LABELS))
    steps = epochs * math.ceil(len(images) / batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch):
            pick = order[start : start + batch]
            optimizer.zero_grad()
            loss = loss_fn(model(images[pick]), masks[pick])
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        final = float(loss_fn(model(images[:256]), masks[:256]))
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    save_file(model.state_dict(), str(tmp))
    tmp.replace(checkpoint)
    return {"train_loss": final}
