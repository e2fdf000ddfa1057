"""Client API training script of the stock FLARE peer: what a FLARE user writes (issue 10, item 3).

Run at every site by ``nvflare.app_opt.pt.recipes.fedavg.FedAvgRecipe`` (see ``stock_flare_peer.py``),
shaped like FLARE's own hello-pt example: ``flare.init()``, then while ``flare.is_running()``:
receive the global model, measure its accuracy on this site's validation split, train one local
epoch (Adam, batch 32, no augmentation) on the site's training split, and send the weights back with
the metrics and ``NUM_STEPS_CURRENT_ROUND`` (FLARE's FedAvg weights sites by it).

    --data PATH.npz   the site's file (train_images, train_labels, val_images, val_labels)

CUDA is used when present; no AMP, no schedule, no augmentation: the peer is the plain stock user.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nvflare.client as flare
from stock_flare_peer_net import PeerCNN, image_tensor, label_tensor


def accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            predicted = model(images.to(device)).argmax(dim=1).cpu()
            correct += int((predicted == labels).sum())
            total += int(labels.numel())
    return correct / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--data", required=True, help="this site's npz file")
    parser.add_argument("--num_classes", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--local_epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    with np.load(args.data, allow_pickle=False) as archive:
        train = TensorDataset(image_tensor(archive["train_images"]), label_tensor(archive["train_labels"]))
        val = TensorDataset(image_tensor(archive["val_images"]), label_tensor(archive["val_labels"]))
    in_channels, image_size = int(train.tensors[0].shape[1]), int(train.tensors[0].shape[-1])
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    val_loader = DataLoader(val, batch_size=256)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = PeerCNN(in_channels=in_channels, num_classes=args.num_classes, image_size=image_size).to(device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    flare.init()
    site = flare.get_site_name()
    while flare.is_running():
        global_model = flare.receive()
        model.load_state_dict(global_model.params)
        val_accuracy = accuracy(model, val_loader, device)

        model.train()
        started, steps = time.perf_counter(), 0
        for _ in range(args.local_epochs):
            for images, labels in train_loader:
                optimizer.zero_grad()
                loss = loss_fn(model(images.to(device)), labels.to(device))
                loss.backward()
                optimizer.step()
                steps += 1
        print(f"[stock-peer] {site} round {global_model.current_round}: global model val accuracy {val_accuracy:.4f}; "
              f"trained {steps} steps in {time.perf_counter() - started:.2f} s", flush=True)
        flare.send(flare.FLModel(params=model.cpu().state_dict(), metrics={"accuracy": val_accuracy},
                                 meta={"NUM_STEPS_CURRENT_ROUND": steps}))
        model.to(device)


if __name__ == "__main__":
    main()
