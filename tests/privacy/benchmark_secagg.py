"""Compute cost of secure aggregation (fedmed.privacy.secagg) without FLARE (not a test; run by hand).

    python tests/privacy/benchmark_secagg.py --params 95426 --sites 3 5 10 --dropped 0 1

For each cohort size: a site's key sharing and masking time, the server's unmasking time (with
``--dropped`` sites recovered from the survivors' shares), and the bytes a site sends per round
(masked vector, public keys, encrypted shares, unmasking shares) next to the plaintext float32 update.
Prints a markdown table; CPU seconds are process time of this one thread.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from fedmed.privacy.secagg import SiteSession, default_threshold, route_shares, unmask_sum


def one(n: int, params: int, dropped: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    names = [f"site-{i:02d}" for i in range(1, n + 1)]
    context = b"bench|0"
    sessions = {name: SiteSession(name, context) for name in names}
    roster = {name: s.advertise() for name, s in sessions.items()}
    t = default_threshold(n)
    started = time.process_time()
    outgoing = {name: s.share_keys(roster, t) for name, s in sessions.items()}
    share_s = (time.process_time() - started) / n
    routed = route_shares(outgoing)
    updates = {name: rng.normal(0, 0.01, params) * 100 for name in names}
    started = time.process_time()
    masked = {name: sessions[name].mask(updates[name], names) for name in names}
    mask_s = (time.process_time() - started) / n
    survivors, gone = names[: n - dropped], names[n - dropped:]
    started = time.process_time()
    answers = {name: sessions[name].unmask(survivors, gone, routed[name]) for name in survivors}
    answer_s = (time.process_time() - started) / len(survivors)
    started = time.process_time()
    total = unmask_sum({name: masked[name] for name in survivors}, roster, names, answers, t, context)
    unmask_s = time.process_time() - started
    exact = sum(updates[name] for name in survivors)
    error = float(np.max(np.abs(total.view(np.int64).astype(np.float64) / 2**20 - exact)))
    key_bytes = 64
    share_bytes = sum(len(blob) for blob in outgoing[names[0]].values())
    answer_bytes = len(json.dumps(answers[names[0]]))
    return {"sites": n, "t": t, "dropped": dropped, "params": params, "plaintext_bytes": 4 * params,
            "masked_bytes": int(masked[names[0]].nbytes), "protocol_bytes": key_bytes + share_bytes + answer_bytes,
            "share_s": share_s, "mask_s": mask_s, "answer_s": answer_s, "server_unmask_s": unmask_s, "max_abs_error": error}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=int, default=95426, help="model parameters (cxr_cnn of the main job: 95,426)")
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument("--dropped", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    print("| sites | t | dropped | plaintext bytes / site | masked bytes / site | protocol bytes / site | share keys s / site | mask s / site | unmask answer s / site | server unmask s | max abs error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sites:
        for dropped in args.dropped:
            if n - dropped < default_threshold(n) + 1 or n - dropped < 3:
                continue
            r = one(n, args.params, dropped)
            print(f"| {r['sites']} | {r['t']} | {r['dropped']} | {r['plaintext_bytes']:,} | {r['masked_bytes']:,} | "
                  f"{r['protocol_bytes']:,} | {r['share_s']:.4f} | {r['mask_s']:.4f} | {r['answer_s']:.4f} | "
                  f"{r['server_unmask_s']:.3f} | {r['max_abs_error']:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
