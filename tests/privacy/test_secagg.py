"""Secure aggregation core (fedmed.privacy.secagg): masks cancel, dropouts recover with t survivors,
sites refuse below t, and the server with one hospital's key material cannot read another's update."""

import numpy as np
import pytest

from fedmed.privacy.secagg import (
    SecAggRefused,
    SiteSession,
    dequantize,
    default_threshold,
    pair_seed,
    prg,
    route_shares,
    shamir_combine,
    shamir_split,
    unmask_sum,
)

pytestmark = pytest.mark.unit
CONTEXT = b"job-1|round-0"


def _round(n=3, threshold=None, length=50, min_sites=3, seed=0):
    """Run keys + shares + masking for n sites; return (sessions, roster, routed shares, updates, masked)."""
    rng = np.random.default_rng(seed)
    names = [f"site-{i + 1}" for i in range(n)]
    sessions = {name: SiteSession(name, CONTEXT, min_sites=min_sites) for name in names}
    roster = {name: s.advertise() for name, s in sessions.items()}
    t = threshold or default_threshold(n)
    routed = route_shares({name: s.share_keys(roster, t) for name, s in sessions.items()})
    updates = {name: rng.normal(0, 0.05, length) * (10 + i) for i, name in enumerate(names)}
    masked = {name: sessions[name].mask(updates[name], names) for name in names}
    return sessions, roster, routed, updates, masked, t


def test_pairwise_and_self_masks_cancel_to_the_exact_sum():
    sessions, roster, routed, updates, masked, t = _round(n=4)
    names = sorted(sessions)
    answers = {name: sessions[name].unmask(names, [], routed[name]) for name in names}
    total = dequantize(unmask_sum(masked, roster, names, answers, t, CONTEXT))
    assert np.allclose(total, sum(updates.values()), atol=len(names) * 2**-20)
    # while a single masked vector is far from the update it carries (uniform in Z_2^64)
    single = dequantize(masked["site-1"])
    assert np.abs(single - updates["site-1"]).min() > 1e3


def test_dropped_sites_are_recovered_with_t_plus_1_survivors_and_not_with_fewer():
    sessions, roster, routed, updates, masked, t = _round(n=6, threshold=4, min_sites=3)
    names = sorted(sessions)
    survivors, dropped = names[:5], names[5:]  # a site dropped after its shares went out
    arrived = {name: masked[name] for name in survivors}
    answers = {name: sessions[name].unmask(survivors, dropped, routed[name]) for name in survivors}
    assert all(name not in answers[name]["b"] for name in survivors)  # no site reveals a share of its own secrets
    total = dequantize(unmask_sum(arrived, roster, names, answers, t, CONTEXT))
    assert np.allclose(total, sum(updates[name] for name in survivors), atol=6 * 2**-20)
    with pytest.raises(SecAggRefused, match="threshold t=4"):  # 4 answers: a self mask would need 4 others
        unmask_sum(arrived, roster, names, dict(list(answers.items())[:4]), t, CONTEXT)
    # two dropped of 6 with t=4: the sites refuse to unmask at all (4 survivors < t + 1)
    again = _round(n=6, threshold=4, seed=1)[0]
    with pytest.raises(SecAggRefused, match="only 4 site\\(s\\) in the round"):
        again["site-1"].unmask(names[:4], names[4:], {})


def test_sites_refuse_to_mask_or_reveal_shares_below_t_or_their_minimum():
    sessions, roster, routed, updates, masked, t = _round(n=3)
    names = sorted(sessions)
    pair = {name: SiteSession(name, CONTEXT, min_sites=2) for name in names[:2]}
    with pytest.raises(SecAggRefused, match="at most 1"):  # 2 sites: no threshold works (each could read the other)
        pair["site-1"].share_keys({n: x.advertise() for n, x in pair.items()}, 2)
    strict = {name: SiteSession(name, CONTEXT, min_sites=4) for name in names}  # a site whose policy asks for 4
    with pytest.raises(SecAggRefused, match="only 3 site\\(s\\) in the round.*at least 4"):
        strict["site-1"].share_keys({n: x.advertise() for n, x in strict.items()}, 2)
    # a cohort of 3 keyed, but the server names only 2 for the masked update: refused at the site
    late = {name: SiteSession(name, CONTEXT) for name in names}
    keys = {name: s.advertise() for name, s in late.items()}
    for s in late.values():
        s.share_keys(keys, 2)
    with pytest.raises(SecAggRefused, match="refused to send its masked update: only 2"):
        late["site-1"].mask(np.zeros(4), ["site-1", "site-2"])
    # unmasking with one survivor named (server claims two dropped): refused
    with pytest.raises(SecAggRefused, match="refused to send unmasking shares: only 2"):
        sessions["site-1"].unmask(["site-1", "site-2"], ["site-3"], routed["site-1"])


def test_sites_refuse_a_threshold_a_single_party_or_a_lying_server_could_exploit():
    names = [f"site-{i}" for i in range(4)]
    sessions = {n: SiteSession(n, CONTEXT, min_sites=2) for n in names}
    roster = {n: s.advertise() for n, s in sessions.items()}
    with pytest.raises(SecAggRefused, match="t must be an integer >= 2"):
        sessions["site-0"].share_keys(roster, 1)
    with pytest.raises(SecAggRefused, match="more than half the cohort"):
        sessions["site-0"].share_keys(roster, 2)  # 2 of 4: a lying server could collect both kinds of shares
    with pytest.raises(SecAggRefused, match="at most 3"):
        sessions["site-0"].share_keys(roster, 4)  # t = n: a self mask could never be rebuilt
    sessions["site-0"].share_keys(roster, 3)


def test_a_site_never_reveals_both_shares_of_one_peer():
    sessions, roster, routed, updates, masked, t = _round(n=3)
    with pytest.raises(SecAggRefused, match="named both survivor and dropped"):
        sessions["site-1"].unmask(["site-1", "site-2", "site-3"], ["site-2"], routed["site-1"])
    sessions["site-1"].unmask(["site-1", "site-2", "site-3"], [], routed["site-1"])
    with pytest.raises(SecAggRefused, match="already revealed"):  # asking again with other lists is refused too
        sessions["site-1"].unmask(["site-1", "site-3"], ["site-2"], routed["site-1"])


def _unmask_with(view_key, mask_keys_of_peers, masked, roster, target, names):
    """What a coalition rebuilds of ``target``'s update from its self-mask seed and mask key."""
    length = masked[target].size
    y = masked[target] - prg(view_key, length)
    for peer in names:
        if peer != target:
            mask = prg(pair_seed(mask_keys_of_peers, roster[peer]["mask_pk"], CONTEXT), length)
            y = y - mask if target < peer else y + mask
    return dequantize(y)


def test_the_server_with_one_hospitals_keys_cannot_read_another_hospitals_update_but_with_t_it_can():
    """Server + site-1 (all of site-1's private keys, seeds and received shares) against site-2, t=2 of 3.

    The server asks site-3 (honest) for shares as a lying server would: site-2 "survived" (b shares)
    and also "dropped" (s shares). The honest site answers one kind only; with site-1's share the
    coalition holds 2 shares of site-2's self-mask seed but 1 of its mask key: the rebuilt key is
    not site-2's and the "unmasked" vector is noise. One step past the bound (site-3 also colludes:
    2 hospitals = t) the same computation returns site-2's update exactly.
    """
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    sessions, roster, routed, updates, masked, t = _round(n=3, threshold=2)
    names = sorted(sessions)
    target, colluder, honest = "site-2", "site-1", "site-3"
    xs = {name: i + 1 for i, name in enumerate(names)}
    colluder_share = sessions[colluder]._open(target, routed[colluder][target])  # site-1's own key material
    honest_answer = sessions[honest].unmask(names, [], routed[honest])  # honest: site-2 survived -> b share only
    with pytest.raises(SecAggRefused):
        sessions[honest].unmask([colluder, honest], [target], routed[honest])  # the lie, a second time: refused
    b_target = shamir_combine({xs[colluder]: int(colluder_share["b"], 16), xs[honest]: int(honest_answer["b"][target], 16)})
    assert b_target == sessions[target].self_seed  # the self mask is legitimately recoverable...
    guessed = X25519PrivateKey.from_private_bytes(shamir_combine({xs[colluder]: int(colluder_share["s"], 16)}))
    assert guessed.public_key().public_bytes_raw() != roster[target]["mask_pk"]  # ...the mask key is not
    recovered = _unmask_with(b_target, guessed, masked, roster, target, names)
    assert np.abs(recovered - updates[target]).min() > 1e3  # noise, not the update
    # one step past the bound: a second hospital's share of the mask key (t = 2 colluding hospitals)
    honest_share = sessions[honest]._open(target, routed[honest][target])
    key = X25519PrivateKey.from_private_bytes(shamir_combine({xs[colluder]: int(colluder_share["s"], 16),
                                                              xs[honest]: int(honest_share["s"], 16)}))
    exposed = _unmask_with(b_target, key, masked, roster, target, names)
    assert np.allclose(exposed, updates[target], atol=2**-19)


def test_shamir_rebuilds_from_any_t_shares_and_not_from_fewer():
    secret = bytes(range(32))
    shares = shamir_split(secret, 3, [1, 2, 3, 4, 5])
    assert shamir_combine({x: shares[x] for x in (1, 3, 5)}) == secret
    assert shamir_combine({x: shares[x] for x in (2, 4, 5)}) == secret
    assert shamir_combine({x: shares[x] for x in (1, 2)}) != secret


def test_a_tampered_or_misaddressed_share_does_not_authenticate():
    sessions, roster, routed, updates, masked, t = _round(n=3)
    forged = dict(routed["site-1"])
    forged["site-2"] = routed["site-3"]["site-2"]  # a share meant for site-3, replayed to site-1
    with pytest.raises(SecAggRefused, match="does not authenticate"):
        sessions["site-1"].unmask(sorted(sessions), [], forged)


def test_a_site_refuses_to_mask_nonfinite_or_out_of_range_values():
    sessions, roster, routed, updates, masked, t = _round(n=3)
    fresh = {name: SiteSession(name, CONTEXT) for name in sessions}
    keys = {name: s.advertise() for name, s in fresh.items()}
    for s in fresh.values():
        s.share_keys(keys, 2)
    with pytest.raises(SecAggRefused, match="NaN/Inf"):
        fresh["site-1"].mask(np.array([1.0, np.nan]), sorted(fresh))
    with pytest.raises(SecAggRefused, match="fixed-point range"):
        fresh["site-2"].mask(np.array([1e13]), sorted(fresh))


def test_a_server_lying_about_dropouts_with_one_colluder_fails_and_with_two_succeeds():
    """n=5, t=3: the server tells some honest sites the target dropped (they reveal shares of its mask
    key) and the others that it survived (they reveal shares of its self-mask seed). With one
    colluding hospital no split of the 3 honest peers gives 3 shares of both secrets (the target
    never reveals its own): n - 1 + c = 5 < 2t = 6. With two colluders (6 >= 6) both secrets fall."""
    import itertools

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    def attack(colluders, told_dropped, seed):
        sessions, roster, routed, updates, masked, t = _round(n=5, threshold=3, seed=seed)
        names = sorted(sessions)
        xs = {name: i + 1 for i, name in enumerate(names)}
        target = "site-3"
        s_shares, b_shares = {}, {}
        for site in names:
            if site in colluders:  # a colluder hands over everything it holds
                share = sessions[site]._open(target, routed[site][target])
                s_shares[xs[site]], b_shares[xs[site]] = int(share["s"], 16), int(share["b"], 16)
            elif site in told_dropped:  # 4 survivors named = t + 1: the honest site answers
                answer = sessions[site].unmask([n for n in names if n != target], [target], routed[site])
                s_shares[xs[site]] = int(answer["s"][target], 16)
            else:  # told everyone survived (the target too)
                answer = sessions[site].unmask(names, [], routed[site])
                if target in answer["b"]:
                    b_shares[xs[site]] = int(answer["b"][target], 16)
        assert xs[target] not in b_shares  # the target never reveals a share of its own seed
        if len(b_shares) < t or len(s_shares) < t:
            return False
        seed_b = shamir_combine(dict(list(b_shares.items())[:t]))
        key = X25519PrivateKey.from_private_bytes(shamir_combine(dict(list(s_shares.items())[:t])))
        return np.allclose(_unmask_with(seed_b, key, masked, roster, target, names), updates[target], atol=2**-19)

    honest = ["site-2", "site-4", "site-5"]
    splits = [set(c) for k in range(len(honest) + 1) for c in itertools.combinations(honest, k)]
    assert not any(attack({"site-1"}, dropped, seed=i) for i, dropped in enumerate(splits))
    assert attack({"site-1", "site-2"}, {"site-4"}, seed=99)  # one step past the bound: exposed
