"""Train the digits CNN on the train split and write its weights as safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from digits_data import load_split
from digits_model import build_model
from safetensors.torch import save_file
from torch import nn


def train(checkpoint: Path, epochs: int = 15, seed: int = 0) -> dict[str, float]:
    """Train from scratch and write ``checkpoint``; returns the final training loss and accuracy."""
    torch.manual_seed(seed)
    x, y = load_split("train")
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[batch]), labels[batch])
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(inputs)
        accuracy = (logits.argmax(1) == labels).float().mean().item()
        final_loss = loss_fn(logits, labels).item()
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    save_file(model.state_dict(), str(tmp))
    tmp.replace(checkpoint)
    return {"train_loss": final_loss, "train_accuracy": accuracy}
