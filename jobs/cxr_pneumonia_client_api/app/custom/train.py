"""A site's own PyTorch training loop, run by FLARE's Client API (nvflare.client) under fedmed's FedAvg controller.

Bring your own loop: replace `train_one_round` (and `evaluate`, if you like) with yours. What the
federation needs back is in the three `flare.send(...)` calls:

- train:        FLModel(params=<state_dict after training>, metrics={...},
                        meta={"NUM_STEPS_CURRENT_ROUND": <number of training samples>})
                FLARE sends the difference to the global model; the server weights sites by that count.
- validate:     FLModel(metrics={"val_auc": ..., "val_accuracy": ..., "val_loss": ..., "num_val_samples": ...})
- submit_model: FLModel(params=<this site's latest local state_dict>)   (cross-site evaluation)

The global model arrives as FLModel params (a PyTorch state_dict) with meta "network" and "task"
(the specs the server trains; fedmed.networks.build_network builds the network). The site's data
is where its own local/fedmed_site.json says (the same file FedMedExecutor reads).
"""

import argparse

import torch

import nvflare.client as flare
from nvflare.client import FLModel

from fedmed.networks import build_network
from fedmed.site_config import SITE_CONFIG_FILE, load_site_config
from fedmed.tasks import build_task


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--local_epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--site_config", default=f"local/{SITE_CONFIG_FILE}",
                        help="the site's data config (relative to the site's workspace, where FLARE runs the job)")
    return parser.parse_args()


def train_one_round(net, task, loader, args, device) -> float:
    """Plain PyTorch: Adam, the task's loss, `local_epochs` passes over the local data; returns the mean loss."""
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    loss_fn = task.loss()
    net.train()
    total, batches = 0.0, 0
    for _ in range(args.local_epochs):
        for batch in loader:
            inputs, targets = task.batch_to_device(batch, device)
            optimizer.zero_grad()
            loss = loss_fn(net(inputs), targets)
            loss.backward()
            optimizer.step()
            total, batches = total + float(loss.detach()), batches + 1
    return total / max(batches, 1)


def evaluate(net, task, val_ds, args, device) -> dict:
    loader = torch.utils.data.DataLoader(val_ds, batch_size=args.batch_size, shuffle=False)
    return task.evaluate(net, loader, device)  # val_auc, val_accuracy, val_loss, num_val_samples


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flare.init()
    site = flare.get_site_name()
    task = train_ds = val_ds = None
    local_state, local_network = None, None
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        if flare.is_submit_model():
            if local_state is None:
                raise RuntimeError(f"site {site}: no local model to submit (this site has not trained in this job)")
            flare.send(FLModel(params=local_state, meta={"network": local_network, "num_samples": len(train_ds)}))
            continue
        if task is None:  # first task: the job's task spec says how to read this site's data
            task = build_task(model.meta["task"])
            data_config = load_site_config(args.site_config, site)["data"]
            train_ds, val_ds = task.load_site_data(data_config, site)
            print(f"site {site}: {len(train_ds)} training and {len(val_ds)} validation samples")
        net = build_network(model.meta["network"]).to(device)
        net.load_state_dict(model.params)
        metrics = evaluate(net, task, val_ds, args, device)  # the global model it received, on local data
        if flare.is_evaluate():
            flare.send(FLModel(metrics=metrics))
            continue
        generator = torch.Generator().manual_seed(args.seed + int(model.current_round or 0))
        loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, generator=generator)
        train_loss = train_one_round(net, task, loader, args, device)
        local_state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        local_network = model.meta["network"]
        print(f"site {site} round {model.current_round}: train_loss {train_loss:.4f}, global model val_auc {metrics.get('val_auc')}")
        flare.send(FLModel(params=local_state, metrics={**metrics, "train_loss": train_loss, "learning_rate": args.lr},
                           meta={"NUM_STEPS_CURRENT_ROUND": len(train_ds)}))


if __name__ == "__main__":
    main()
