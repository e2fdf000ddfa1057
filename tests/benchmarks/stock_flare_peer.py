"""The peer, side by side: FLARE's stock FedAvgRecipe on the very same site files as our run (issue 10, item 3).

Given OUT, a finished ``python -m fedmed simulate ... --out OUT`` run, this script

1. runs NVIDIA FLARE's own stock recipe, ``nvflare.app_opt.pt.recipes.fedavg.FedAvgRecipe`` with a
   Client API training script (``stock_flare_peer_client.py``: a plain 3-block CNN, Adam lr 1e-3,
   batch 32, 1 local epoch, no augmentation; ``stock_flare_peer_net.py``), in FLARE's ``SimEnv`` on
   ``OUT/sites/*.npz`` (one FLARE client per file, each told its own file) for OUT's number of rounds,
   with its workspace under ``OUT/stock_flare_peer/`` (never /tmp/nvflare);
2. evaluates the stock recipe's final global model on every ``OUT/external/*.npz`` hospital (AUC with
   MONAI's ``ROCAUCMetric``; accuracy at argmax, what the stock user gets) and times the stock run;
3. computes our FLARE overhead per round from OUT: round wall time minus the slowest site's
   ``train_seconds``; median over rounds, also as a fraction of the round wall time;
4. prints a side-by-side table and writes ``OUT/peer_benchmark.json``.

    python tests/benchmarks/stock_flare_peer.py OUT [--threads N]

A benchmark script, not a test (pytest does not collect it); ``tests/test_peer_overhead.py`` checks its
pure functions (:func:`flare_overhead`, :func:`parse_round_walls`, :func:`log_span_seconds`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENT_SCRIPT = HERE / "stock_flare_peer_client.py"
RESULT_FILE = "peer_benchmark.json"
PEER_DIR = "stock_flare_peer"  # under OUT: the stock run's FLARE workspace; this script owns it
JOB_NAME = "stock_fedavg_peer"
TRAINING = {"network": "PeerCNN: conv 32/64/128, ReLU, 2x2 max-pool, linear head", "optimizer": "Adam",
            "lr": 1e-3, "batch_size": 32, "local_epochs": 1, "augmentation": None}

# a line of our controller in simulator.log: "[fedmed] round 3/20: ... ; 5.5 s"
ROUND_LINE = re.compile(r"\[fedmed\] round (\d+)/(\d+):.*;\s*(\d+(?:\.\d+)?) s\s*$")
TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
# FLARE's FedAvg controller: "Round 3 started." / "Finished FedAvg."
STOCK_ROUND_START = re.compile(r"Round (\d+) started\.")
STOCK_FINISHED = "Finished FedAvg."
STOCK_TRAIN_LINE = re.compile(r"\[stock-peer\] (\S+) round (\d+): .* trained \d+ steps in (\d+(?:\.\d+)?) s")


class PeerBenchmarkError(Exception):
    """Bad input: the message names the file or key and what to do."""


# ----------------------------------------------------------------------------------------- pure parts


def flare_overhead(round_walls: dict[int, float], train_seconds: dict[int, dict[str, float]]) -> dict:
    """FLARE overhead per round: the round's wall time minus its slowest site's training time.

    ``round_walls``: {round: wall seconds}; ``train_seconds``: {round: {site: training seconds}}.
    Rounds missing from either side, or without any site time, are left out (and counted in
    ``rounds_skipped``). Returns the per-round rows, the median overhead in seconds, the median of the
    per-round fractions (overhead / wall) and the total fraction (sum of overheads / sum of walls);
    ``after_first_round`` gives the same medians without the first measured round (process start-up,
    data loading and imports land there).
    """
    rows, skipped = [], []
    for round_index in sorted(set(round_walls) | set(train_seconds)):
        wall = round_walls.get(round_index)
        sites = train_seconds.get(round_index) or {}
        if wall is None or not sites:
            skipped.append(round_index)
            continue
        if wall <= 0:
            raise ValueError(f"round {round_index}: wall time must be positive, got {wall}")
        slowest_site = max(sites, key=sites.get)
        overhead = wall - sites[slowest_site]
        rows.append({"round": round_index, "wall_seconds": wall, "slowest_site": slowest_site,
                     "slowest_train_seconds": sites[slowest_site], "overhead_seconds": overhead,
                     "overhead_fraction": overhead / wall})
    if not rows:
        return {"rounds": [], "rounds_skipped": skipped, "median_seconds": None, "median_fraction": None,
                "total_fraction": None, "median_round_wall_seconds": None, "after_first_round": None}
    later = rows[1:]
    return {
        "rounds": rows,
        "rounds_skipped": skipped,
        "median_seconds": statistics.median(r["overhead_seconds"] for r in rows),
        "median_fraction": statistics.median(r["overhead_fraction"] for r in rows),
        "total_fraction": sum(r["overhead_seconds"] for r in rows) / sum(r["wall_seconds"] for r in rows),
        "median_round_wall_seconds": statistics.median(r["wall_seconds"] for r in rows),
        "after_first_round": {
            "rounds": len(later),
            "median_seconds": statistics.median(r["overhead_seconds"] for r in later),
            "median_fraction": statistics.median(r["overhead_fraction"] for r in later),
            "median_round_wall_seconds": statistics.median(r["wall_seconds"] for r in later),
        } if later else None,
    }


def parse_round_walls(log_text: str) -> dict[int, float]:
    """{round (0-based, as in metrics.json): wall seconds} from our controller's '[fedmed] round N/M: ...; X s' lines."""
    walls = {}
    for line in log_text.splitlines():
        match = ROUND_LINE.search(line)
        if match:
            walls[int(match.group(1)) - 1] = float(match.group(3))
    return walls


def _timestamp(line: str) -> float | None:
    match = TIMESTAMP.match(line)
    if not match:
        return None
    stamp = dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
    return stamp.timestamp() + int(match.group(2)) / 1000.0


def log_span_seconds(log_text: str, until: str | None = None) -> float | None:
    """Seconds from the first timestamped line of a FLARE log to the last one, or to the first line holding
    ``until`` (None when no line holds it)."""
    first = last = None
    found = until is None
    for line in log_text.splitlines():  # a banner line without a timestamp belongs to the latest one above it
        stamp = _timestamp(line)
        if stamp is not None:
            first = stamp if first is None else first
            last = stamp
        if until is not None and until in line and last is not None:
            found = True
            break
    if first is None or last is None or not found:
        return None
    return last - first


def stock_round_walls(server_log: str) -> dict[int, float]:
    """{round (0-based): wall seconds} from FLARE's FedAvg 'Round N started.' lines (the last round ends at 'Finished FedAvg.').

    FLARE prints these as banners on the lines after the timestamped one: each takes the latest timestamp above it.
    """
    starts, finished, stamp = {}, None, None
    for line in server_log.splitlines():
        stamp = _timestamp(line) or stamp
        if stamp is None:
            continue
        match = STOCK_ROUND_START.search(line)
        if match:
            starts.setdefault(int(match.group(1)), stamp)
        elif STOCK_FINISHED in line:
            finished = stamp
    walls, ordered = {}, sorted(starts)
    for i, round_index in enumerate(ordered):
        end = starts[ordered[i + 1]] if i + 1 < len(ordered) else finished
        if end is not None:
            walls[round_index] = end - starts[round_index]
    return walls


def stock_train_seconds(log_texts: list[str]) -> dict[int, dict[str, float]]:
    """{round: {site: seconds}} from the peer client script's '[stock-peer] SITE round N: ... trained K steps in X s' lines."""
    seconds: dict[int, dict[str, float]] = {}
    for text in log_texts:
        for match in STOCK_TRAIN_LINE.finditer(text):
            seconds.setdefault(int(match.group(2)), {})[match.group(1)] = float(match.group(3))
    return seconds


# ----------------------------------------------------------------------------------------- OUT inputs


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise PeerBenchmarkError(f"{path} does not exist: pass the folder of a finished "
                                 f"'python -m fedmed simulate ... --out OUT' run")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PeerBenchmarkError(f"{path} is not valid JSON ({exc}); rerun simulate to recreate it") from exc


def load_run(out: Path) -> dict:
    """Everything the benchmark needs from OUT, checked; errors name the missing file or key."""
    if not out.is_dir():
        raise PeerBenchmarkError(f"{out} is not a folder: pass the --out folder of a finished simulate run")
    if (out / "INCOMPLETE").exists():
        raise PeerBenchmarkError(f"{out} holds an unfinished simulate run ({out / 'INCOMPLETE'}); rerun simulate first")
    metrics = _read_json(out / "metrics.json")
    for key in ("num_rounds", "rounds", "external"):
        if key not in metrics:
            raise PeerBenchmarkError(f"{out / 'metrics.json'} has no '{key}'; it comes from an older fedmed: rerun simulate")
    sites = sorted((out / "sites").glob("*.npz"))
    if not sites:
        raise PeerBenchmarkError(f"no site files {out / 'sites'}/*.npz: this benchmark needs a classification run "
                                 f"(simulate writes each site's train/val images there)")
    externals = sorted((out / "external").glob("*.npz"))
    if not externals:
        raise PeerBenchmarkError(f"no external hospitals {out / 'external'}/*.npz: rerun simulate with a fedmed that "
                                 f"writes them (issue 10)")
    results = metrics["external"].get("results", {})
    for path in externals:
        if "global_model" not in results.get(path.stem, {}):
            raise PeerBenchmarkError(f"{out / 'metrics.json'}: external.results['{path.stem}']['global_model'] is missing "
                                     f"although {path} exists; rerun simulate")
    run_config = out / "run_config.json"
    task_args = (_read_json(run_config).get("task") or {}).get("args", {}) if run_config.is_file() else {}
    log_path = out / "simulator.log"
    if not log_path.is_file():
        raise PeerBenchmarkError(f"{log_path} does not exist: it holds the round wall times; rerun simulate")
    return {"metrics": metrics, "sites": sites, "externals": externals, "num_classes": int(task_args.get("num_classes", 2)),
            "simulator_log": log_path.read_text(errors="replace")}


def check_site_files(sites: list[Path], num_classes: int) -> tuple[int, int]:
    """Every site file has the MedMNIST layout with one image geometry; returns (in_channels, image_size)."""
    from fedmed.data import DataError, load_npz

    shapes = set()
    for path in sites:
        try:
            site = load_npz(path, num_classes=num_classes)
        except DataError as exc:
            raise PeerBenchmarkError(f"site file {path}: {exc}") from exc
        shapes.add(tuple(site.train.images.shape[1:]))
    if len(shapes) != 1:
        raise PeerBenchmarkError(f"site files {', '.join(p.name for p in sites)} hold different image shapes {sorted(shapes)}")
    channels, height, width = shapes.pop()
    if height != width:
        raise PeerBenchmarkError(f"site files hold {height}x{width} images; the peer's CNN expects square images")
    return channels, height


def round_walls_from_metrics(metrics: dict) -> dict[int, float]:
    """Per-round wall time when metrics.json records it (rounds[].wall_seconds or rounds[].round_seconds)."""
    walls = {}
    for entry in metrics.get("rounds", []):
        for key in ("wall_seconds", "round_seconds"):
            if isinstance(entry.get(key), (int, float)):
                walls[int(entry["round"])] = float(entry[key])
                break
    return walls


def our_train_seconds(metrics: dict) -> dict[int, dict[str, float]]:
    seconds = {}
    for entry in metrics.get("rounds", []):
        sites = {site: float(m["train_seconds"]) for site, m in (entry.get("sites") or {}).items()
                 if isinstance(m.get("train_seconds"), (int, float))}
        seconds[int(entry["round"])] = sites
    return seconds


def our_side(run: dict) -> dict:
    metrics, log_text = run["metrics"], run["simulator_log"]
    walls = round_walls_from_metrics(metrics)
    wall_source = "metrics.json rounds[]"
    if not walls:
        walls, wall_source = parse_round_walls(log_text), "simulator.log '[fedmed] round N/M: ...; X s' lines"
    if not walls:
        raise PeerBenchmarkError("no round wall times: metrics.json rounds[] has none and simulator.log has no "
                                 "'[fedmed] round N/M: ...; X s' lines; rerun simulate")
    overhead = flare_overhead(walls, our_train_seconds(metrics))
    overhead["wall_source"] = wall_source
    run_wall = metrics.get("wall_seconds")
    if isinstance(run_wall, (int, float)):
        wall = {"seconds": float(run_wall), "source": "metrics.json wall_seconds"}
    else:
        wall = {"seconds": log_span_seconds(log_text),
                "source": "simulator.log, first to last timestamp (FLARE simulator from its first log line to its end; "
                          "includes our cross-site evaluation, excludes the Python start-up before the first line)"}
    wall["training_seconds"] = log_span_seconds(log_text, until=f"[fedmed] finished {metrics['num_rounds']} rounds")
    external = {}
    for name, models in metrics["external"]["results"].items():
        m = models.get("global_model")
        if m:
            external[name] = {k: m.get(k) for k in ("auc", "accuracy", "accuracy_argmax", "threshold", "num_images")}
    return {"model": "global_model (final) of OUT, metrics.json external.results[set].global_model",
            "rounds": int(metrics["num_rounds"]), "external": external, "wall": wall,
            "round_wall_seconds": {str(k): v for k, v in sorted(walls.items())}, "flare_overhead": overhead}


# ----------------------------------------------------------------------------------------- stock run


def _end_leftover_children() -> list[int]:
    """End any process this one started that is still alive (by PID); returns their PIDs."""
    import psutil

    me = psutil.Process()
    children = me.children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    return [c.pid for c in children]


def run_stock_recipe(out: Path, sites: list[Path], num_rounds: int, num_classes: int, in_channels: int,
                     image_size: int, threads: int) -> dict:
    """FLARE's stock FedAvgRecipe + Client API in SimEnv on OUT/sites/*.npz; returns paths and timings."""
    import torch
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.recipe import SimEnv, set_per_site_config

    sys.path.insert(0, str(HERE))
    from stock_flare_peer_net import PeerCNN

    root = out / PEER_DIR
    (out / RESULT_FILE).unlink(missing_ok=True)  # never leave an earlier result beside a failed rerun
    if root.exists():
        shutil.rmtree(root)  # this script's own earlier stock run
    root.mkdir(parents=True)
    override = os.environ.pop("NVFLARE_SIMULATOR_WORKSPACE_ROOT", None)  # would move the workspace elsewhere
    if override:
        print(f"  ignoring NVFLARE_SIMULATOR_WORKSPACE_ROOT={override}: the stock run's workspace stays under {root}")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // threads)))  # as simulate does

    # The recipe does not ship the model instance's weights: FLARE's server persistor rebuilds PeerCNN from
    # its class path and arguments, so without a checkpoint every run starts from different random weights.
    # A seeded initial checkpoint (absolute path, read by the persistor at run time) makes runs repeatable.
    torch.manual_seed(0)
    network = PeerCNN(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    initial_ckpt = root / "initial_model.pt"
    torch.save({"model": network.state_dict()}, initial_ckpt)
    site_names = [path.stem for path in sites]
    recipe = FedAvgRecipe(name=JOB_NAME, model=network, initial_ckpt=str(initial_ckpt),
                          min_clients=len(sites), num_rounds=num_rounds, train_script=str(CLIENT_SCRIPT))
    common = (f"--num_classes {num_classes} --lr {TRAINING['lr']} --batch_size {TRAINING['batch_size']} "
              f"--local_epochs {TRAINING['local_epochs']}")
    set_per_site_config(recipe, {path.stem: {"train_args": f"--data {path.resolve()} {common}"} for path in sites})
    env = SimEnv(clients=site_names, num_threads=threads, workspace_root=str(root))

    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)  # FLARE ends its simulator on KeyboardInterrupt
    started = time.perf_counter()
    try:
        recipe.execute(env)
    except (RuntimeError, KeyboardInterrupt) as exc:
        raise PeerBenchmarkError(f"the stock FLARE run did not finish ({exc}); logs: {root / JOB_NAME}/server/log.txt "
                                 f"and {root / JOB_NAME}/<site>/log.txt") from exc
    finally:
        seconds = time.perf_counter() - started
        signal.signal(signal.SIGTERM, previous_term)
        leftover = _end_leftover_children()
        if leftover:
            print(f"  ended {len(leftover)} leftover process(es) of the stock run: {leftover}")
    workspace = root / JOB_NAME
    model_path = workspace / "server" / "simulate_job" / "app_server" / "FL_global_model.pt"
    if not model_path.is_file():
        raise PeerBenchmarkError(f"the stock run left no final global model at {model_path}; see {workspace}/server/log.txt")
    return {"workspace": workspace, "model_path": model_path, "seconds": seconds, "site_names": site_names}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _read_logs(workspace: Path, names: list[str]) -> list[str]:
    texts = []
    for name in names:
        for path in sorted((workspace / name).rglob("log.txt")):
            texts.append(path.read_text(errors="replace"))
    return texts


def evaluate_external(model_path: Path, externals: list[Path], num_classes: int, in_channels: int, image_size: int) -> dict:
    """AUC (MONAI ROCAUCMetric) and accuracy at argmax of the stock final global model on each external set."""
    import torch
    from monai.metrics import ROCAUCMetric

    from fedmed.data import DataError, load_split

    sys.path.insert(0, str(HERE))
    from stock_flare_peer_net import PeerCNN

    checkpoint = torch.load(model_path, map_location="cpu", weights_only=True)
    state = checkpoint["model"] if isinstance(checkpoint, dict) and "model" in checkpoint else checkpoint
    model = PeerCNN(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    model.eval()
    results = {}
    for path in externals:
        try:
            split = load_split(path, num_classes=num_classes)
        except DataError as exc:
            raise PeerBenchmarkError(str(exc)) from exc
        images, labels = torch.from_numpy(split.images), torch.from_numpy(split.labels)
        with torch.no_grad():
            probs = torch.cat([torch.softmax(model(images[i:i + 512]), dim=1) for i in range(0, len(images), 512)])
        metric = ROCAUCMetric()
        if num_classes == 2:
            metric(probs[:, 1], labels.float())
        else:
            metric(probs, torch.nn.functional.one_hot(labels, num_classes).float())
        results[path.stem] = {"auc": float(metric.aggregate()),
                              "accuracy": float((probs.argmax(dim=1) == labels).float().mean()),
                              "num_images": int(len(labels))}
    return results


# ----------------------------------------------------------------------------------------- report


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.1f} s"


def table(result: dict) -> str:
    ours, stock = result["ours"], result["stock_flare_fedavg"]
    lines = [f"{'external set':<22} {'model':<34} {'AUC':>7} {'accuracy':>9} {'wall':>9} {'rounds':>6}"]
    for name in sorted(stock["external"]):
        o, s = ours["external"].get(name, {}), stock["external"][name]
        lines.append(f"{name:<22} {'ours (global_model)':<34} {_fmt(o.get('auc')):>7} {_fmt(o.get('accuracy')):>9} "
                     f"{_seconds(ours['wall']['seconds']):>9} {ours['rounds']:>6}")
        lines.append(f"{'':<22} {'  (accuracy at argmax)':<34} {'':>7} {_fmt(o.get('accuracy_argmax')):>9}")
        lines.append(f"{'':<22} {'stock FLARE FedAvgRecipe':<34} {_fmt(s['auc']):>7} {_fmt(s['accuracy']):>9} "
                     f"{_seconds(stock['wall_seconds']):>9} {stock['rounds']:>6}")
    o_over, s_over = ours["flare_overhead"], stock["flare_overhead"]
    lines.append("")
    lines.append(f"wall: ours {_seconds(ours['wall']['seconds'])} ({ours['wall']['source'].split(',')[0]}); "
                 f"stock {_seconds(stock['wall_seconds'])} (whole simulator process)")
    lines.append(f"first log line to the end of the last round: ours {_seconds(ours['wall']['training_seconds'])}, "
                 f"stock {_seconds(stock['training_seconds'])}")
    lines.append("FLARE overhead per round (round wall - slowest site's training), median over rounds:")
    for label, over in (("ours", o_over), ("stock", s_over)):
        if over.get("median_seconds") is None:
            lines.append(f"  {label:<6} not measurable ({over.get('note', 'no rounds with both times')})")
            continue
        lines.append(f"  {label:<6} {over['median_seconds']:.2f} s of a median {over['median_round_wall_seconds']:.2f} s round; "
                     f"median fraction {100 * over['median_fraction']:.1f} %, all rounds {100 * over['total_fraction']:.1f} %")
        later = over.get("after_first_round")
        if later:
            lines.append(f"  {'':<6} without round 1 ({later['rounds']} rounds): {later['median_seconds']:.2f} s of a median "
                         f"{later['median_round_wall_seconds']:.2f} s round; median fraction {100 * later['median_fraction']:.1f} %")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run FLARE's stock FedAvgRecipe on a finished simulate run's site files and compare it with ours.",
        allow_abbrev=False)
    parser.add_argument("out", help="the --out folder of a finished 'python -m fedmed simulate' run")
    parser.add_argument("--threads", type=int, default=None,
                        help="FLARE simulator threads for the stock run (default: one per site, as simulate)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    out = Path(args.out).resolve()
    try:
        run = load_run(out)
        in_channels, image_size = check_site_files(run["sites"], run["num_classes"])
        ours = our_side(run)
        num_rounds = ours["rounds"]
        threads = args.threads or len(run["sites"])
        print(f"[1/3] stock FLARE FedAvgRecipe (Client API, SimEnv): {len(run['sites'])} sites x {num_rounds} rounds, "
              f"{threads} thread(s), workspace {out / PEER_DIR}", flush=True)
        stock_run = run_stock_recipe(out, run["sites"], num_rounds, run["num_classes"], in_channels, image_size, threads)
        print(f"  stock run finished in {stock_run['seconds']:.1f} s", flush=True)
        print(f"[2/3] evaluating the stock final global model on {len(run['externals'])} external set(s)", flush=True)
        external = evaluate_external(stock_run["model_path"], run["externals"], run["num_classes"], in_channels, image_size)
    except PeerBenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import monai
    import nvflare
    import torch

    workspace = stock_run["workspace"]
    server_log = "\n".join(_read_logs(workspace, ["server"]))
    stock_overhead = flare_overhead(stock_round_walls(server_log),
                                    stock_train_seconds(_read_logs(workspace, stock_run["site_names"])))
    if stock_overhead["median_seconds"] is None:
        stock_overhead["note"] = "FLARE's server log or the sites' '[stock-peer]' lines were not found in the workspace"
    result = {
        "what": "issue 10 item 3: FLARE's stock FedAvgRecipe + Client API on OUT/sites/*.npz, same rounds, side by side with our run",
        "command": f"python tests/benchmarks/stock_flare_peer.py {args.out}" + (f" --threads {args.threads}" if args.threads else ""),
        "measured_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cuda": torch.cuda.is_available(),
                    "torch": torch.__version__, "nvflare": nvflare.__version__, "monai": monai.__version__},
        "out": str(out),
        "sites": stock_run["site_names"],
        "external_sets": [p.stem for p in run["externals"]],
        "ours": ours,
        "stock_flare_fedavg": {
            "recipe": "nvflare.app_opt.pt.recipes.fedavg.FedAvgRecipe + Client API script, nvflare.recipe.SimEnv",
            "training": dict(TRAINING, client_script=CLIENT_SCRIPT.name, weighting="NUM_STEPS_CURRENT_ROUND (batches)",
                             initial_model="torch.manual_seed(0), passed as initial_ckpt"),
            "model": "final global model (FL_global_model.pt); accuracy at argmax",
            "rounds": num_rounds, "threads": threads,
            "external": external,
            "wall_seconds": stock_run["seconds"],
            "wall_source": "recipe.execute(SimEnv) duration: the whole FLARE simulator process, start-up included",
            "training_seconds": log_span_seconds(server_log, until=STOCK_FINISHED),
            "round_wall_seconds": {str(r["round"]): r["wall_seconds"] for r in stock_overhead["rounds"]},
            "flare_overhead": stock_overhead,
            "workspace": str(workspace),
        },
    }
    from fedmed.atomic import write_json

    print("[3/3] side by side", flush=True)
    print(table(result))
    write_json(out / RESULT_FILE, result)
    print(f"\nwrote {out / RESULT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
