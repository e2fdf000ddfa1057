"""The per-round deadline policy (fedmed.deadline) without FLARE: adaptive grace, catch-up rounds, back-off."""

import pytest

from fedmed.deadline import DeadlinePolicy

pytestmark = pytest.mark.unit

SITES = ["site-1", "site-2", "site-3", "site-4", "site-5"]
FAST = {"site-1": 4.0, "site-2": 5.0, "site-3": 5.0, "site-4": 6.0}


def test_a_round_closes_after_the_quorum_plus_a_grace_that_follows_the_median_site():
    policy = DeadlinePolicy(min_sites=2, max_grace=30.0)
    assert not policy.should_close(3.0, {"site-1": 3.0}, SITES)  # below the quorum
    # quorum at 5 s, median 5 s -> grace 2.5 s: closes at 7.5 s, not after the fixed 30 s wait
    assert not policy.should_close(7.0, FAST, SITES)
    assert policy.should_close(7.6, FAST, SITES)
    assert policy.should_close(6.0, {**FAST, "site-5": 6.0}, SITES)  # everyone answered
    slow = {"site-1": 100.0, "site-2": 120.0}
    assert policy.grace(slow) == 30.0 and not policy.should_close(140.0, slow, SITES) and policy.should_close(150.0, slow, SITES)


def test_a_slow_site_is_named_every_round_then_waited_for_and_contributes_one_round_in_three():
    """A site twice as slow as the median (9 s): left out, named, waited for every third round."""
    policy = DeadlinePolicy(min_sites=2, max_grace=30.0)
    contributed, waited, wall = 0, 0.0, 0.0
    for r in range(9):
        waiting = policy.waits_for(SITES)
        answered = dict(FAST)
        if waiting:  # the slow site (9 s) answers when the round waits for it
            assert waiting == ["site-5"]
            limit = policy.catch_up_limit("site-5")
            assert not policy.should_close(8.9, answered, SITES, waiting)
            answered["site-5"] = 9.0
            assert policy.should_close(9.0, answered, SITES, waiting)
            contributed, wall = contributed + 1, wall + 9.0
            notes = policy.record_round(answered, [], waiting)
            assert limit >= 30.0 and notes == []
        else:
            assert policy.should_close(7.6, answered, SITES, waiting)
            wall += 7.6
            notes = policy.record_round(answered, ["site-5"], waiting)
            assert len(notes) == 1 and notes[0].startswith("site-5 left out")
        if r == 0:
            policy.record_late("site-5", 9.0)  # its late reply tells the policy how long it takes
    assert contributed == 3  # rounds 3, 6, 9: neither every round nor never
    assert wall < 9 * 30.0  # the old fixed 30 s wait per round cost 270 s


def test_a_site_that_misses_its_catch_up_waits_twice_as_long_for_the_next_one():
    policy = DeadlinePolicy(min_sites=2, max_grace=10.0, round_timeout=600.0)
    catch_ups = []
    for r in range(20):
        waiting = policy.waits_for(SITES)
        if waiting:
            catch_ups.append(r)
            assert policy.catch_up_limit("site-5") <= 600.0
        policy.record_round(FAST, ["site-5"], waiting)  # site-5 is dead: never answers
    assert catch_ups == [2, 6, 14]  # after 2, then 4, then 8 missed rounds in a row: log2(rounds) waits


def test_the_policy_state_round_trips_for_resume():
    policy = DeadlinePolicy(min_sites=2)
    policy.record_round(FAST, ["site-5"])
    policy.record_round(FAST, ["site-5"])
    again = DeadlinePolicy(min_sites=2)
    again.load_state_dict(policy.state_dict())
    assert again.waits_for(SITES) == ["site-5"] and again.median_seconds == policy.median_seconds


def test_the_round_waits_with_patience_for_the_sites_the_tolerance_needs_but_not_for_a_known_slow_one():
    """3 sites tolerating f=1 need all 3 answers: a bigger (slower) honest site is waited for up to
    4x the median reply time, so the round keeps its tolerance; a site measured slower than that is
    waited for only in catch-up rounds."""
    sites = ["site-1", "site-2", "site-3"]
    policy = DeadlinePolicy(min_sites=2, max_grace=30.0, target_sites=3)
    two = {"site-1": 8.0, "site-2": 9.0}
    assert not policy.should_close(30.0, two, sites)  # would have closed at 9 + 4.25 s without the target
    assert policy.should_close(34.1, two, sites)  # 4 x the median (8.5 s) = 34 s: bounded
    assert policy.should_close(18.0, {**two, "site-3": 18.0}, sites)
    policy.record_round(two, ["site-3"])  # missed once, never measured: still waited for with patience
    assert not policy.should_close(30.0, two, sites)
    policy.record_round({**two, "site-3": 70.0}, [])  # answered in 70 s (start-up?): still waited for next round
    assert not policy.should_close(30.0, two, sites)
    policy.record_round(two, ["site-3"])  # missed, and measured slower than the patience: known slow
    assert policy.should_close(13.3, two, sites) and not policy.waits_for(sites)


def test_catch_ups_are_spaced_by_their_cost_so_a_very_slow_site_costs_at_most_about_double():
    policy = DeadlinePolicy(min_sites=2, max_grace=30.0)
    policy.record_round(FAST, ["site-5"])
    policy.record_round(FAST, ["site-5"])
    waiting = policy.waits_for(SITES)
    assert waiting == ["site-5"]
    policy.record_round({**FAST, "site-5": 110.0}, [], waiting)  # its catch-up took 110 s, the median site ~5 s
    spacing = policy.due["site-5"]
    assert spacing == 22  # 110 s / 5 s: the next wait comes after as much time in normal rounds
    for _ in range(spacing - 1):
        policy.record_round(FAST, ["site-5"])
        assert not policy.waits_for(SITES)
    policy.record_round(FAST, ["site-5"])
    assert policy.waits_for(SITES) == ["site-5"]


def test_a_slow_site_that_held_its_task_unanswered_gets_a_catch_up_long_enough_for_it():
    """The simulator drops a late reply unseen. Measured: a site answering 60 s late (others 2-4 s)
    was left out of all 10 rounds while every catch-up waited 10x the median (30 s): futile waits.
    A round that closes while a site holds its task proves the site needs at least that long."""
    fast = {"site-1": 3.5, "site-2": 4.0, "site-3": 4.0, "site-4": 4.5}
    policy = DeadlinePolicy(min_sites=2, max_grace=30.0)
    policy.record_unanswered("site-5", 20.0)  # round 0 closed after 20 s, site-5 still training
    policy.record_round(fast, ["site-5"])
    assert policy.known_slow("site-5", patience=16.0)  # the next round's patience does not wait for it
    rounds = 1
    while not policy.waits_for(SITES):  # spaced by its cost: 20 s is 5 median replies
        policy.record_round(fast, ["site-5"])
        rounds += 1
    assert rounds == 5
    limit = policy.catch_up_limit("site-5")
    assert limit == 2.5 * 20.0  # long enough for a site that needs more than 20 s
    assert not policy.should_close(45.0, fast, SITES, ["site-5"])
    policy.record_round({**fast, "site-5": 44.0}, [], ["site-5"])
    assert policy.missed["site-5"] == 0 and policy.reply_seconds["site-5"] == 44.0


def test_waits_for_a_site_that_takes_tasks_and_never_answers_cost_about_as_much_as_the_rounds_between():
    policy = DeadlinePolicy(min_sites=2, max_grace=10.0, round_timeout=3600.0)
    waits, rounds_wall = [], 0.0
    for r in range(60):
        waiting = policy.waits_for(SITES)
        wall = policy.catch_up_limit("site-5") if waiting else 7.5  # quorum + grace
        policy.record_unanswered("site-5", wall)  # held the task until the round closed
        if waiting:
            waits.append(wall)
        else:
            rounds_wall += wall
        policy.record_round(FAST, ["site-5"], waiting)
    assert 2 <= len(waits) <= 6 and sum(waits) <= 2.5 * rounds_wall
    state = policy.state_dict()
    fresh = DeadlinePolicy(min_sites=2, max_grace=10.0, round_timeout=3600.0)
    fresh.load_state_dict(state)
    assert fresh.unanswered_seconds == policy.unanswered_seconds and fresh.due == policy.due


def test_a_catch_up_is_spaced_by_the_sites_cost_in_the_pace_of_later_rounds_not_round_ones_start_up():
    """Round 1's replies include start-up (median 14 s here), later rounds take 2 s: a site seen
    needing 60 s costs 30 rounds, not 5, so it is not waited for within a 10-round job."""
    policy = DeadlinePolicy(min_sites=2, max_grace=30.0)
    policy.record_unanswered("site-5", 60.0)
    policy.record_round({"site-1": 12.0, "site-2": 14.0, "site-3": 14.0, "site-4": 16.0}, ["site-5"])
    assert policy.due["site-5"] == 5
    quick = {"site-1": 1.8, "site-2": 2.0, "site-3": 2.0, "site-4": 2.2}
    waited = [r for r in range(1, 10) if policy.waits_for(SITES) or policy.record_round(quick, ["site-5"]) is None]
    assert waited == [] and policy.due["site-5"] == 30 and policy.missed["site-5"] == 10
