"""The failover policy, driven with a fake clock: every signal, every rule, and properties over
random observation sequences. The policy is pure, so everything here is real; nothing is faked
but time.

Why one module: every test drives the one pure class through the same simulator (`Sim`, a fake
clock and observation helpers); split by rule, each file would rebuild that scaffolding.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings, strategies as st

from sidecar.config import ProbeSettings
from sidecar.policy import Decision, Policy, PolicyError
from sidecar.probes import ProbeResult

S = ProbeSettings(interval=10, timeout=5, fall=3, rise=2, min_dwell=60, cooldown_429=60,
                  damping_base=30, damping_cap=300)
CHAIN = ("claude", "gpt", "local")


class Sim:
    """A policy plus a clock; `step` advances the clock and feeds one round of probes."""

    def __init__(self, settings=S, chain=CHAIN, active="claude") -> None:
        self.now = 1000.0
        self.p = Policy(chain, settings, active, self.now)
        self.switches: list[dict] = []

    def see(self, backend, ok=True, reason=None, **kw):
        self.p.observe(backend, ok, reason or ("ok" if ok else "http_5xx"), self.now, **kw)

    def round(self, **state):
        """One probe round: state maps backend -> True (pass) / reason string (failure)."""
        for b, s in state.items():
            if s is True:
                self.see(b)
            else:
                self.see(b, False, s)

    def tick(self, seconds=10.0, apply=True, **state):
        self.now += seconds
        self.round(**state)
        d = self.p.decide(self.now)
        if d is not None and apply:
            self.switches.append(self.p.commit(d, self.now, True))
        return d

    def kinds(self):
        return [s["kind"] for s in self.switches]

    def alerts(self):
        return [e.kind for e in self.p.drain_events()]


def healthy_all(sim, n=2):
    for _ in range(n):
        sim.tick(claude=True, gpt=True, local=True)


# --- fall / rise and each signal class ---------------------------------------------------------

@pytest.mark.parametrize("reason", ["refused", "reset", "dns", "timeout", "http_5xx", "passive",
                                    "bad_response"])
def test_counted_failures_need_fall_in_a_row(reason):
    sim = Sim()
    healthy_all(sim)
    assert sim.tick(claude=reason, gpt=True) is None
    assert sim.tick(claude=reason, gpt=True) is None
    d = sim.tick(claude=reason, gpt=True)
    assert d == Decision("gpt", d.reason, "failover")
    assert reason in d.reason
    assert sim.p.active == "gpt"


def test_a_pass_between_failures_resets_the_count():
    sim = Sim()
    healthy_all(sim)
    for _ in range(5):
        sim.tick(claude="timeout", gpt=True)
        sim.tick(claude="timeout", gpt=True)
        sim.tick(claude=True, gpt=True)
    assert sim.switches == []
    assert sim.p.health["claude"].fails == 0


def test_unhealthy_needs_rise_passes_to_recover():
    sim = Sim(settings=ProbeSettings(fall=2, rise=3, min_dwell=0, damping_base=0, damping_cap=0))
    healthy_all(sim, 3)
    sim.tick(claude="refused", gpt=True)
    sim.tick(claude="refused", gpt=True)
    assert sim.p.active == "gpt"
    sim.tick(claude=True, gpt=True)
    sim.tick(claude=True, gpt=True)
    assert sim.p.health["claude"].healthy is False and sim.p.active == "gpt"
    d = sim.tick(claude=True, gpt=True)
    assert d is not None and d.kind == "failback" and sim.p.active == "claude"


def test_429_switches_at_once_and_holds_until_retry_after():
    sim = Sim(settings=ProbeSettings(min_dwell=0, damping_base=0, damping_cap=0))
    healthy_all(sim)
    sim.now += 10
    sim.see("gpt")
    sim.see("claude", False, "rate_limited", status=429, retry_after=45)
    d = sim.p.decide(sim.now)
    assert d.kind == "failover" and d.target == "gpt" and "rate limited" in d.reason
    sim.p.commit(d, sim.now, True)
    assert "rate_limited" in sim.alerts()
    hit = sim.now
    # Passing probes during the hold do not bring it back before Retry-After.
    while sim.now < hit + 40:
        assert sim.tick(claude=True, gpt=True) is None
    assert sim.p.active == "gpt"
    sim.tick(5, claude=True, gpt=True)   # hit + 45: hold over, passes counted, dwell 0
    assert sim.p.active == "claude"


def test_429_without_retry_after_uses_the_cooldown():
    sim = Sim(settings=ProbeSettings(cooldown_429=100, min_dwell=0, damping_base=0, damping_cap=0))
    healthy_all(sim)
    sim.now += 10
    sim.see("gpt")
    sim.see("claude", False, "rate_limited", status=429, retry_after=None)
    sim.p.commit(sim.p.decide(sim.now), sim.now, True)
    hit = sim.now
    assert sim.p.health["claude"].held_until == hit + 100
    while sim.now + 10 < hit + 100:
        assert sim.tick(claude=True, gpt=True) is None
    sim.tick(claude=True, gpt=True)
    assert sim.p.active == "claude"


def test_retry_after_zero_still_moves_traffic():
    sim = Sim()
    healthy_all(sim)
    sim.see("claude", False, "rate_limited", status=429, retry_after=0)
    assert sim.p.decide(sim.now).target == "gpt"


def test_429_alert_once_per_hold():
    sim = Sim()
    healthy_all(sim)
    sim.see("claude", False, "rate_limited", retry_after=30)
    sim.see("claude", False, "rate_limited", retry_after=30)
    assert sim.alerts().count("rate_limited") == 1


@pytest.mark.parametrize("status", [401, 403])
def test_key_rejected_switches_at_once_with_alert_and_needs_rise(status):
    sim = Sim(settings=ProbeSettings(min_dwell=0, damping_base=0, damping_cap=0))
    healthy_all(sim)
    sim.now += 10
    sim.see("gpt")
    sim.see("claude", False, "auth", status=status)
    d = sim.p.decide(sim.now)
    assert d.target == "gpt" and "key rejected" in d.reason
    sim.p.commit(d, sim.now, True)
    alerts = sim.p.drain_events()
    assert [a.kind for a in alerts] == ["key_rejected"]
    assert str(status) in alerts[0].detail
    sim.tick(claude=True, gpt=True)
    assert sim.p.health["claude"].key_rejected and sim.p.active == "gpt"
    sim.tick(claude=True, gpt=True)
    assert not sim.p.health["claude"].key_rejected and sim.p.active == "claude"


@pytest.mark.parametrize("status,effect", [(429, "rate_limited"), (401, "auth"), (503, "passive")])
def test_passive_signals_are_classified_by_status(status, effect):
    sim = Sim()
    healthy_all(sim)
    sim.see("claude", False, "passive", status=status)
    h = sim.p.health["claude"]
    if effect == "rate_limited":
        assert h.held_until > sim.now
    elif effect == "auth":
        assert h.key_rejected
    else:
        assert h.fails == 1 and h.healthy is True


def test_unattributed_passive_errors_are_ignored():
    sim = Sim()
    sim.p.observe("", False, "passive", sim.now)
    assert set(sim.p.health) == set(CHAIN)


def test_observe_result_takes_probe_results():
    sim = Sim()
    sim.p.observe_result(ProbeResult("gpt", False, "rate_limited", 429, 12.0, 0.1, ""), sim.now)
    assert sim.p.health["gpt"].held_until == sim.now + 12


# --- failback, dwell, damping ------------------------------------------------------------------

def test_failback_waits_for_min_dwell():
    sim = Sim()
    healthy_all(sim)
    for _ in range(3):
        sim.tick(claude="http_5xx", gpt=True)
    assert sim.p.active == "gpt"
    switched_at = sim.now
    while sim.now + 10 < switched_at + 60:
        assert sim.tick(claude=True, gpt=True) is None
    d = sim.tick(claude=True, gpt=True)
    assert d.kind == "failback" and sim.now - switched_at >= 60


def test_failback_goes_to_the_highest_recovered_backend():
    sim = Sim(settings=ProbeSettings(min_dwell=0, damping_base=0, damping_cap=0, fall=1))
    healthy_all(sim)
    sim.tick(claude="dns", gpt="dns", local=True)
    assert sim.p.active == "local"
    sim.tick(claude=True, gpt=True, local=True)
    sim.tick(claude=True, gpt=True, local=True)
    assert sim.p.active == "claude" and sim.kinds() == ["failover", "failback"]


def test_failover_skips_unhealthy_and_unknown_backends():
    sim = Sim(settings=ProbeSettings(fall=1))
    sim.tick(claude=True, gpt=True, local=True)
    sim.tick(claude=True, gpt="refused", local=True)
    sim.tick(claude="refused", gpt="refused", local=True)
    assert sim.p.active == "local"


def test_never_onto_a_backend_without_observations():
    sim = Sim(settings=ProbeSettings(fall=1))
    sim.tick(claude="refused")  # gpt and local never probed
    assert sim.p.active == "claude" and sim.p.dark
    sim.tick(claude="refused", local=True)
    assert sim.p.active == "local"


def test_never_onto_a_stale_observation():
    sim = Sim(settings=ProbeSettings(fall=1, interval=10, timeout=5))
    sim.tick(claude=True, gpt=True)
    sim.now += 100
    sim.see("claude", False, "refused")
    assert sim.p.decide(sim.now) is None and sim.p.dark
    sim.see("gpt")   # the deep probe the daemon sends before switching
    assert sim.p.decide(sim.now).target == "gpt"


def flap(sim, seconds, period=4.0, step=2.0):
    """Primary alternates down/up every `period` seconds; the others stay healthy."""
    end = sim.now + seconds
    while sim.now < end:
        up = int((sim.now // period) % 2) == 0
        sim.tick(step, claude=True if up else "http_5xx", gpt=True, local=True)


def test_damping_bounds_a_flapping_primary():
    s = ProbeSettings(interval=2, timeout=1, fall=1, rise=1, min_dwell=5, damping_base=5, damping_cap=40)
    damped = Sim(settings=s)
    healthy_all(damped)
    flap(damped, 600)
    undamped = Sim(settings=ProbeSettings(interval=2, timeout=1, fall=1, rise=1, min_dwell=5,
                                          damping_base=0, damping_cap=0))
    healthy_all(undamped)
    flap(undamped, 600)
    # Each failback needs min_dwell + hold; the hold reaches the cap after a few switches.
    ramp = 2 * 4  # switches before the hold is capped (5, 10, 20, 40)
    bound = ramp + 2 * (600 / (s.min_dwell + s.damping_cap) + 1)
    assert len(damped.switches) <= bound
    assert len(undamped.switches) > 2 * len(damped.switches)
    gaps = [b["at"] - a["at"] for a, b in zip(damped.switches, damped.switches[1:])
            if b["kind"] == "failback"]
    assert gaps[-1] >= s.min_dwell + s.damping_cap


def test_primary_flapping_for_a_minute_with_defaults():
    sim = Sim(settings=ProbeSettings(interval=2, timeout=1))
    healthy_all(sim)
    flap(sim, 60, period=6)
    # Defaults: min_dwell 60 s, so within one minute at most one failover and one failback.
    assert len(sim.switches) <= 2


def test_damping_streak_resets_after_a_quiet_period():
    s = ProbeSettings(fall=1, rise=1, min_dwell=10, damping_base=10, damping_cap=40)
    sim = Sim(settings=s)
    healthy_all(sim)
    sim.tick(claude="timeout", gpt=True)
    sim.tick(10, claude=True, gpt=True)
    assert sim.kinds() == ["failover", "failback"] and sim.p.streak == 1
    sim.tick(sim.p.quiet_period + 1, claude=True, gpt=True)
    sim.tick(1, claude="timeout", gpt=True)
    assert sim.p.streak == 0 and sim.p.damping_hold() == 0


def test_damping_hold_is_exponential_and_capped():
    p = Policy(CHAIN, S, "claude", 0)
    holds = []
    for n in range(8):
        p.streak = n
        holds.append(p.damping_hold())
    assert holds == [0, 30, 60, 120, 240, 300, 300, 300]


# --- dark --------------------------------------------------------------------------------------

def test_dark_when_nothing_is_healthy_and_cleared_after():
    sim = Sim(settings=ProbeSettings(fall=1))
    healthy_all(sim)
    sim.alerts()
    sim.tick(claude="refused", gpt="refused", local="timeout")
    assert sim.p.dark and sim.p.active == "claude" and sim.alerts() == ["dark"]
    sim.tick(claude="refused", gpt="refused", local="timeout")
    assert sim.alerts() == []  # raised once, not every round
    sim.tick(claude="refused", gpt="refused", local=True)
    assert sim.p.dark, "one pass after falling is not healthy yet (rise 2)"
    sim.tick(claude="refused", gpt="refused", local=True)
    assert not sim.p.dark and sim.p.active == "local"
    assert sim.alerts() == ["undark"]


def test_failed_switch_counts_against_the_target():
    sim = Sim()
    healthy_all(sim)
    for _ in range(3):
        d = sim.tick(apply=False, claude="http_5xx", gpt=True, local=True)
    assert d.target == "gpt"
    rec = sim.p.commit(d, sim.now, False, "verify failed")
    assert not rec["ok"] and sim.p.active == "claude"
    assert sim.p.health["gpt"].healthy is False
    assert sim.p.decide(sim.now).target == "local"


# --- manual controls ---------------------------------------------------------------------------

def test_force_switches_now_when_healthy():
    sim = Sim()
    healthy_all(sim)
    assert sim.p.force("local", sim.now) == "local"
    d = sim.p.decide(sim.now)
    assert d == Decision("local", d.reason, "manual")
    sim.p.commit(d, sim.now, True)
    assert sim.p.forced is None and sim.p.active == "local"
    # After the drill, ordinary failback after the dwell.
    for _ in range(6):
        sim.tick(claude=True, gpt=True, local=True)
    assert sim.p.active == "claude"


def test_a_drills_stay_holds_the_fallback_then_expires():
    # `neverdark drill` sends turns to the fallback while the primary is healthy: without a
    # stay the sidecar fails back after min_dwell, between two of the drill's turns.
    sim = Sim(settings=ProbeSettings(interval=10, min_dwell=0, damping_base=0, damping_cap=0))
    healthy_all(sim)
    sim.p.force("local", sim.now, stay=100)
    sim.p.commit(sim.p.decide(sim.now), sim.now, True)
    for _ in range(9):   # 90 s of healthy probes of the primary
        sim.tick(claude=True, gpt=True, local=True)
    assert sim.p.active == "local"
    assert 0 < sim.p.describe(sim.now, 0.0)["stay_for"] <= 10
    for _ in range(3):
        sim.tick(claude=True, gpt=True, local=True)
    assert sim.p.active == "claude" and sim.p.stay_until is None


def test_a_stay_never_stops_a_failover():
    sim = Sim(settings=ProbeSettings(fall=1, min_dwell=0, damping_base=0, damping_cap=0))
    healthy_all(sim)
    sim.p.force("gpt", sim.now, stay=1000)
    sim.p.commit(sim.p.decide(sim.now), sim.now, True)
    sim.tick(claude="refused", gpt="refused", local=True)
    assert sim.p.active == "local"


def test_a_stay_is_bounded_by_max_hold_and_cleared_by_the_failback_or_release():
    sim = Sim(settings=ProbeSettings(max_hold=50))
    healthy_all(sim)
    sim.p.force("local", sim.now, stay=10_000)
    assert sim.p.stay_until == sim.now + 50
    sim.p.commit(sim.p.decide(sim.now), sim.now, True)
    sim.p.force("claude", sim.now)           # the drill's own failback
    assert sim.p.stay_until is None
    sim.p.force("gpt", sim.now, stay=30)
    sim.p.release()
    assert sim.p.stay_until is None


def test_force_without_target_picks_the_next_healthy():
    sim = Sim()
    healthy_all(sim)
    assert sim.p.force(None, sim.now) == "gpt"


@pytest.mark.parametrize("target,fragment", [("nope", "unknown backend"), ("claude", "already on"),
                                             ("local", "unhealthy")])
def test_force_refusals(target, fragment):
    sim = Sim(settings=ProbeSettings(fall=1))
    healthy_all(sim)
    sim.tick(claude=True, gpt=True, local="refused")
    with pytest.raises(PolicyError, match=fragment):
        sim.p.force(target, sim.now)


def test_force_is_dropped_when_the_target_goes_bad():
    sim = Sim()
    healthy_all(sim)
    sim.p.force("gpt", sim.now)
    sim.see("gpt", False, "timeout")   # the pre-switch deep probe failed
    assert sim.p.decide(sim.now) is None and sim.p.forced is None


def test_pin_holds_through_failures_until_release():
    sim = Sim(settings=ProbeSettings(fall=1, min_dwell=0, damping_base=0, damping_cap=0))
    healthy_all(sim)
    sim.p.pin("gpt", sim.now)
    d = sim.p.decide(sim.now)
    assert d.kind == "manual" and d.target == "gpt"
    sim.p.commit(d, sim.now, True)
    for _ in range(5):
        assert sim.tick(claude=True, gpt="refused", local=True) is None
    assert sim.p.active == "gpt"
    with pytest.raises(PolicyError, match="pinned to gpt"):
        sim.p.force("local", sim.now)
    sim.p.release()
    sim.tick(claude=True, gpt="refused", local=True)
    assert sim.p.active == "claude"


def test_pin_defaults_to_active_and_refuses_unhealthy():
    sim = Sim(settings=ProbeSettings(fall=1))
    healthy_all(sim)
    sim.tick(claude=True, gpt="dns", local=True)
    assert sim.p.pin(None, sim.now) == "claude"
    with pytest.raises(PolicyError, match="unhealthy"):
        sim.p.pin("gpt", sim.now)


# --- persistence -------------------------------------------------------------------------------

WALL0 = 1_700_000_000.0   # the wall clock's reading when the Sim's monotonic clock reads 0
BOOT = "boot-a"


def through_json(doc):
    return json.loads(json.dumps(doc, allow_nan=False))


def test_snapshot_restore_round_trip_through_json():
    sim = Sim()
    healthy_all(sim)
    for _ in range(3):
        sim.tick(claude="http_5xx", gpt=True, local=True)
    sim.see("local", False, "rate_limited", retry_after=99)
    sim.p.pin("gpt", sim.now)
    snap = through_json(sim.p.snapshot(sim.now, WALL0 + sim.now, BOOT))
    assert snap["health"]["local"]["held_until"] == WALL0 + sim.now + 99   # wall time on disk
    other = Policy(CHAIN, S, "claude", 0.0)
    other.restore(snap, sim.now, WALL0 + sim.now, BOOT)
    assert other.snapshot(sim.now, WALL0 + sim.now, BOOT) == sim.p.snapshot(sim.now, WALL0 + sim.now, BOOT)
    assert other.decide(sim.now) == sim.p.decide(sim.now)


def test_restore_drops_backends_no_longer_configured():
    sim = Sim()
    healthy_all(sim)
    sim.p.pin("local", sim.now)
    other = Policy(("claude", "gpt"), S, "claude", 0.0)
    other.restore(sim.p.snapshot(sim.now, WALL0, BOOT), sim.now, WALL0, BOOT)
    assert other.pinned is None and set(other.health) == {"claude", "gpt"}


def test_same_boot_restore_is_exact_whatever_the_wall_clock_did():
    """A sidecar restart (same boot): the monotonic clock ran on, so the saved pair of clock
    readings brings every instant back exactly, even if the wall clock was stepped meanwhile."""
    sim = Sim()
    healthy_all(sim)
    sim.see("claude", False, "rate_limited", retry_after=500)
    snap = through_json(sim.p.snapshot(sim.now, WALL0 + sim.now, BOOT))
    later = sim.now + 30
    for step in (-3600.0, 0.0, 86400.0):
        other = Policy(CHAIN, S, "claude", later)
        other.restore(snap, later, WALL0 + later + step, BOOT)
        assert other.health["claude"].held_until == sim.now + 500
        assert other.since == sim.p.since and other.health["gpt"].last_at == sim.p.health["gpt"].last_at


def test_restore_after_a_reboot_clamps_implausible_instants():
    """Another boot: the wall clock is all there is. A hold further ahead than max_hold is cut to
    it, a past instant that lies in the future (the clock went back) counts from now, an
    observation of unknown age is stale, and a hold that ended is gone."""
    s = ProbeSettings(interval=10, timeout=5, max_hold=600)
    p = Policy(CHAIN, s, "claude", 100.0)
    p.observe("gpt", True, "ok", 100.0)
    doc = through_json(p.snapshot(100.0, WALL0, BOOT))
    doc["health"]["claude"]["held_until"] = WALL0 + 10 * 86400     # ten days ahead
    doc["health"]["local"]["held_until"] = WALL0 - 5                # over
    doc["health"]["local"]["hold_note"] = "provider asked 7 s"
    doc["since"] = WALL0 + 3600                                      # "in the future"
    doc["restarts"] = [WALL0 + 3600, WALL0 - 10 * 86400]
    doc["health"]["gpt"]["last_at"] = WALL0 + 3600
    boot_now, wall_now = 12.0, WALL0 + 60                           # rebooted a minute later
    q = Policy(CHAIN, s, None, boot_now, gateway="u")
    q.restore(doc, boot_now, wall_now, "boot-b")
    assert q.health["claude"].held_until == boot_now + 600
    assert not q.held("local", boot_now) and q.health["local"].hold_note == ""
    assert q.since == boot_now
    assert list(q.restarts) == [boot_now]       # the old one dropped, the odd one counted as now
    assert not q.eligible("gpt", boot_now)      # stale: a fresh probe comes first
    assert q.restart_wait(boot_now) == 0


def test_restore_ignores_non_finite_and_wrong_types():
    p = Policy(CHAIN, S, "claude", 0.0)
    doc = through_json(p.snapshot(0.0, WALL0, BOOT))
    doc["since"] = "yesterday"
    doc["streak"] = True
    doc["restarts"] = ["x", None]
    doc["clock"] = {"wall": "x", "monotonic": None, "boot": BOOT}
    q = Policy(CHAIN, S, None, 50.0)
    q.restore(doc, 50.0, WALL0 + 50, BOOT)
    assert q.active == "claude" and q.since == 50.0 and q.streak == 0 and not q.restarts
    json.dumps(q.describe(50.0, WALL0 + 50), allow_nan=False)


def test_constructor_rejects_unconfigured_active():
    with pytest.raises(ValueError):
        Policy(CHAIN, S, "nope", 0)


def test_unknown_active_fails_over_to_the_best_eligible():
    p = Policy(CHAIN, S, None, 0)
    p.observe("gpt", True, "ok", 0)
    d = p.decide(0)
    assert d.target == "gpt" and "matches no configured backend" in d.reason


# --- properties over random observation sequences ----------------------------------------------

REASONS = ["ok", "ok", "ok", "refused", "timeout", "http_5xx", "passive", "rate_limited", "auth"]

observation = st.tuples(
    st.floats(min_value=0.0, max_value=15.0),      # seconds since the previous one
    st.sampled_from(CHAIN), st.sampled_from(REASONS),
    st.one_of(st.none(), st.floats(min_value=0, max_value=120)),  # retry_after
    st.booleans(),                                  # does the switch succeed
)
small = ProbeSettings(interval=5, timeout=2, fall=2, rise=2, min_dwell=20, cooldown_429=30,
                      damping_base=10, damping_cap=60)


@settings(max_examples=300, deadline=None)
@given(st.lists(observation, min_size=1, max_size=150), st.sampled_from(CHAIN))
def test_invariants_over_random_sequences(obs, start):
    now = 0.0
    p = Policy(CHAIN, small, start, now)
    last_switch = None
    for dt, backend, reason, retry_after, switch_ok in obs:
        now += dt
        p.observe(backend, reason == "ok", reason, now, retry_after=retry_after,
                  status={"rate_limited": 429, "auth": 401}.get(reason))
        before_active, before_since, hold = p.active, p.since, p.damping_hold()
        d = p.decide(now)
        # dark iff the active is unusable and no other backend is eligible
        alt = any(p.eligible(b, now) for b in CHAIN if b != p.active)
        assert p.dark == (not p.usable(p.active, now) and not alt)
        if d is None:
            continue
        h = p.health[d.target]
        assert d.target != before_active
        assert h.last_ok is True and now - h.last_at <= p.fresh_window
        assert p.usable(d.target, now)
        if d.kind == "failback":
            assert p.usable(before_active, now)
            assert CHAIN.index(d.target) < CHAIN.index(before_active)
            assert now - before_since >= small.min_dwell + hold
            assert h.passes >= small.rise
        else:
            assert d.kind == "failover" and not p.usable(before_active, now)
        p.commit(d, now, switch_ok)
        assert p.active in CHAIN
        if switch_ok:
            last_switch = now
        assert p.active == (d.target if switch_ok else before_active)
    assert p.active in CHAIN
    assert last_switch is None or p.last_switch_at == last_switch


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=10, max_size=400), st.integers(min_value=1, max_value=4))
def test_flapping_primary_transitions_are_bounded(pattern, step):
    """Primary up/down at random each probe round, secondary always fine: in any window of W
    seconds there are at most 2 * (W / min_dwell + 1) transitions."""
    s = ProbeSettings(interval=step, timeout=1, fall=1, rise=1, min_dwell=20, damping_base=10,
                      damping_cap=80)
    p = Policy(("a", "b"), s, "a", 0.0)
    now, times, kinds = 0.0, [], []
    for up in pattern:
        now += step
        p.observe("a", up, "ok" if up else "http_5xx", now)
        p.observe("b", True, "ok", now)
        d = p.decide(now)
        if d is not None:
            p.commit(d, now, True)
            times.append(now)
            kinds.append(d.kind)
    for i, t0 in enumerate(times):
        for window in (20.0, 60.0, 200.0):
            inside = sum(1 for t in times[i:] if t - t0 < window)
            assert inside <= 2 * (window / s.min_dwell + 1)
    assert kinds == ["failover", "failback"] * (len(kinds) // 2) + ["failover"] * (len(kinds) % 2)
    failback_gaps = [t - prev for prev, t, k in zip(times, times[1:], kinds[1:]) if k == "failback"]
    assert all(g >= s.min_dwell for g in failback_gaps)


# --- provider hints are bounded -----------------------------------------------------------------

HINTS = ProbeSettings(cooldown_429=60, max_hold=3600, min_dwell=0, damping_base=0, damping_cap=0)


@pytest.mark.parametrize("asked", [float("inf"), float("nan"), float("-inf"), -5, "30", True])
def test_unusable_retry_after_falls_back_to_the_cooldown(asked):
    sim = Sim(settings=HINTS)
    healthy_all(sim)
    sim.see("claude", False, "rate_limited", status=429, retry_after=asked)
    h = sim.p.health["claude"]
    assert h.held_until == sim.now + 60 and "cooldown_429" in h.hold_note
    json.dumps(sim.p.describe(sim.now, WALL0 + sim.now), allow_nan=False)


def test_a_huge_retry_after_is_capped_at_max_hold_and_says_so():
    sim = Sim(settings=HINTS)
    healthy_all(sim)
    sim.alerts()
    sim.see("claude", False, "rate_limited", status=429, retry_after=999999999)
    [alert] = sim.p.drain_events()
    assert alert.kind == "rate_limited"
    assert alert.detail == "held 3600 s (provider asked 999999999 s; capped by max_hold)"
    view = sim.p.describe(sim.now, WALL0 + sim.now)["backends"]["claude"]
    assert view["held_for"] == 3600
    assert view["hold_note"] == "provider asked 999999999 s; capped by max_hold"
    # A longer hint later cannot stretch the hold past max_hold either.
    sim.now += 100
    sim.see("claude", False, "rate_limited", status=429, retry_after=1e9)
    assert sim.p.health["claude"].held_until == sim.now + 3600


def test_a_modest_retry_after_is_kept_as_asked():
    sim = Sim(settings=HINTS)
    healthy_all(sim)
    sim.alerts()
    sim.see("claude", False, "rate_limited", status=429, retry_after=7.25)
    assert [a.detail for a in sim.p.drain_events()] == ["held 7.25 s (provider asked 7.25 s)"]


def test_cooldown_longer_than_max_hold_is_capped():
    sim = Sim(settings=ProbeSettings(cooldown_429=7200, max_hold=600))
    healthy_all(sim)
    sim.see("claude", False, "rate_limited", status=429)
    assert sim.p.health["claude"].held_until == sim.now + 600
    assert sim.p.health["claude"].hold_note == "no usable Retry-After: cooldown_429; capped by max_hold"


# --- plan: the restart budget and the pre-switch confirmation -----------------------------------

def failing_primary(sim, rounds=3):
    for _ in range(rounds):
        sim.now += 10
        sim.see("claude", False, "http_5xx")
        sim.see("gpt")


def test_plan_confirms_the_target_with_a_deep_probe_before_switching():
    sim = Sim()
    healthy_all(sim)
    failing_primary(sim)
    plan = sim.p.plan(sim.now)
    assert plan.action == "confirm" and plan.decision.target == "gpt"
    sim.see("gpt")                           # a listing is no confirmation
    assert sim.p.plan(sim.now).action == "confirm"
    sim.p.observe("gpt", True, "ok", sim.now, deep=True)
    assert sim.p.plan(sim.now).action == "switch"
    sim.now += S.interval + 1                # from an earlier probe round: confirm again
    sim.see("gpt")
    assert sim.p.plan(sim.now).action == "confirm"
    sim.p.observe("gpt", False, "timeout", sim.now, deep=True)
    assert sim.p.plan(sim.now).decision.target == "local" if sim.p.plan(sim.now) else True


def test_plan_defers_while_the_restart_budget_is_spent():
    sim = Sim()
    sim.p = Policy(CHAIN, S, "claude", sim.now, gateway="neverdark-wizard-merlin.service")
    healthy_all(sim)
    for i in range(4):
        assert sim.p.take_restart(sim.now + i) is None
    refusal = sim.p.take_restart(sim.now + 5)
    assert refusal == ("neverdark-wizard-merlin.service already restarted 4 times in 120s "
                       "(Hermes' respawn-storm brake and systemd's start limit)")
    failing_primary(sim)                     # now = start + 30
    sim.p.observe("gpt", True, "ok", sim.now, deep=True)
    plan = sim.p.plan(sim.now)
    assert plan.action == "defer" and plan.decision.target == "gpt"
    assert plan.wait == pytest.approx(120 - 30)
    assert sim.p.deferred == "gpt"
    assert sim.p.describe(sim.now, WALL0)["restart_budget"]["free_in"] == pytest.approx(90, abs=0.1)
    sim.now += plan.wait
    sim.see("claude", False, "http_5xx")
    sim.p.observe("gpt", True, "ok", sim.now, deep=True)
    assert sim.p.plan(sim.now).action == "switch" and sim.p.deferred is None


def test_the_restart_budget_survives_a_sidecar_restart():
    p = Policy(CHAIN, S, "claude", 1000.0, gateway="u")
    for i in range(4):
        p.take_restart(1000.0 + i)
    doc = through_json(p.snapshot(1010.0, WALL0 + 1010, BOOT))
    q = Policy(CHAIN, S, None, 1020.0, gateway="u")
    q.restore(doc, 1020.0, WALL0 + 1020 - 3600, BOOT)   # and the wall clock went back an hour
    assert q.restart_wait(1020.0) == pytest.approx(100.0)
    assert q.take_restart(1020.0) is not None


def test_no_budget_when_switches_restart_nothing():
    p = Policy(CHAIN, S, "claude", 0.0)
    for i in range(10):
        assert p.take_restart(float(i)) is None
    assert p.restart_wait(10.0) == 0 and p.describe(10.0, WALL0)["restart_budget"] is None


def test_commit_keeps_its_record_to_itself():
    sim = Sim()
    healthy_all(sim)
    failing_primary(sim)
    d = sim.p.decide(sim.now)
    sim.p.begin(d, WALL0 + sim.now)
    assert sim.p.intent["to"] == "gpt" and sim.p.decide(sim.now) is None  # one switch at a time
    rec = sim.p.commit(d, sim.now, True, "ok", wall=WALL0 + sim.now,
                       timings={"install": 0.0123, "first_turn": 1.5, "bad": float("inf")})
    assert rec["timings"] == {"install": 0.01, "first_turn": 1.5} and rec["at"] == WALL0 + sim.now
    assert sim.p.intent is None
    rec["timings"]["x"] = 1
    rec["ok"] = False
    assert sim.p.transitions[-1]["ok"] is True and "x" not in sim.p.transitions[-1]["timings"]
    view = sim.p.describe(sim.now, WALL0 + sim.now)
    view["transitions"][-1]["at_iso"] = "added by a reader"
    assert "at_iso" not in sim.p.transitions[-1]


# --- a switch interrupted by a sidecar restart ------------------------------------------------

def interrupted(actual, saved_active="claude", intent=True):
    """A policy saved mid-switch claude -> local, restored in a new process; then reconciled."""
    p = Policy(CHAIN, S, saved_active, 100.0)
    for b in CHAIN:
        p.observe(b, True, "ok", 99.0)
        p.observe(b, True, "ok", 100.0)
    p.force("local", 100.0)
    if intent:
        p.begin(Decision("local", "switch to local requested by operator", "manual"), WALL0 + 100)
    doc = through_json(p.snapshot(100.0, WALL0 + 100, BOOT))
    q = Policy(CHAIN, S, None, 103.0)
    q.restore(doc, 103.0, WALL0 + 103, BOOT)
    note = q.reconcile(actual, 103.0, WALL0 + 103)
    return q, note


def test_an_intent_found_on_the_target_completes_after_the_check():
    p, note = interrupted("local")
    assert "was in flight" in note and p.needs_check and p.active == "local"
    assert p.intent["outcome"] == "completed after a sidecar restart" and p.intent["check"] == "local"
    assert p.forced is None and p.plan(103.0) is None      # nothing moves until the check
    rec = p.recovered(110.0, WALL0 + 110, True, "local answered", {"check_turn": 2.0})
    assert rec["ok"] and rec["from"] == "claude" and rec["to"] == "local" and rec["kind"] == "manual"
    assert rec["reason"] == "switch to local requested by operator; completed after a sidecar restart"
    assert rec["recovered"] == "completed after a sidecar restart" and rec["at"] == WALL0 + 110
    assert rec["detail"] == "check turn on local: local answered"
    assert not p.needs_check and p.intent is None and p.active == "local"
    assert p.last_switch_at == 110.0 and p.transitions[-1] == rec


def test_an_intent_found_on_the_origin_was_rolled_back():
    p, _ = interrupted("claude")
    assert p.active == "claude" and p.intent["outcome"] == "interrupted; rolled back"
    rec = p.recovered(110.0, WALL0 + 110, True, "claude answered")
    assert not rec["ok"] and rec["recovered"] == "interrupted; rolled back"
    assert rec["check"] == {"backend": "claude", "ok": True}
    # An interrupted switch does not count against its target, and the drill is not retried.
    assert p.health["local"].healthy is True and p.forced is None


def test_a_failed_check_moves_the_wizard_to_a_healthy_backend():
    p, _ = interrupted("local")
    rec = p.recovered(110.0, WALL0 + 110, False, "verify answered HTTP 500")
    assert not rec["ok"] and p.health["local"].healthy is False
    assert p.health["local"].last_reason == "check_failed"
    p.observe("claude", True, "ok", 111.0)
    p.observe("gpt", True, "ok", 111.0)
    plan = p.plan(111.0)
    assert plan.decision.kind == "failover" and plan.decision.target == "claude"


def test_an_active_config_other_than_the_saved_one_is_checked_too():
    p, note = interrupted("gpt", intent=False)
    assert p.needs_check and p.active == "gpt" and p.intent["kind"] == "recovered"
    assert "the active config says gpt, the state file said claude" in p.why
    rec = p.recovered(110.0, WALL0 + 110, True, "gpt answered")
    assert rec["ok"] and rec["from"] == "claude" and rec["to"] == "gpt"


def test_agreeing_start_needs_no_check():
    p, note = interrupted("claude", intent=False)
    assert note is None and not p.needs_check and p.forced == "local"


def test_first_start_trusts_the_active_config():
    p = Policy(CHAIN, S, None, 0.0)
    assert p.reconcile("gpt", 0.0, WALL0) == "found on gpt (no saved state)"
    assert p.active == "gpt" and not p.needs_check
    q = Policy(CHAIN, S, None, 0.0)
    assert "no saved state" in q.reconcile(None, 0.0, WALL0) and q.active is None


# --- clock steps: the wall clock moves, no timer does ---------------------------------------

class Driver:
    """The daemon's loop around the policy, with both clocks injected: a probe round (held
    backends are not probed), plan, the confirming deep probe, the switch. `step` moves only the
    wall clock; `restart` saves and restores through JSON as a restarted sidecar does."""

    def __init__(self, settings, active="claude", chain=("claude", "local")):
        self.mono = 5000.0
        self.wall_base = WALL0
        self.boot = BOOT
        self.start = self.mono
        self.p = Policy(chain, settings, active, self.mono)
        self.log: list[tuple[float, str, str]] = []

    @property
    def wall(self) -> float:
        return self.wall_base + self.mono

    def step(self, seconds: float) -> None:
        self.wall_base += seconds

    def restart(self, boot: str | None = None, mono: float | None = None, step: float = 0.0) -> None:
        """Save, (reboot: the monotonic clock begins again at `mono`), step the wall clock,
        restore."""
        doc = through_json(self.p.snapshot(self.mono, self.wall, self.boot))
        self.step(step)
        if boot is not None:
            self.wall_base += self.mono - mono
            self.start += mono - self.mono
            self.mono, self.boot = mono, boot
        p = Policy(self.p.order, self.p.s, None, self.mono)
        p.restore(doc, self.mono, self.wall, self.boot)
        p.reconcile(doc["active"], self.mono, self.wall)
        self.p = p

    def round(self, seconds=10.0, **state):
        self.mono += seconds
        for b, s in state.items():
            if self.p.held(b, self.mono):
                continue
            if s is True:
                self.p.observe(b, True, "ok", self.mono)
            elif isinstance(s, tuple):
                self.p.observe(b, False, "rate_limited", self.mono, status=429, retry_after=s[1])
            else:
                self.p.observe(b, False, s, self.mono)
        plan = self.p.plan(self.mono)
        if plan is not None and plan.action == "confirm":
            self.p.observe(plan.decision.target, True, "ok", self.mono, deep=True)
            plan = self.p.plan(self.mono)
        if plan is not None and plan.action == "switch":
            self.p.begin(plan.decision, self.wall)
            self.p.commit(plan.decision, self.mono, True, wall=self.wall)
            self.log.append((self.mono - self.start, plan.decision.kind, plan.decision.target))


CLOCK = ProbeSettings(interval=10, timeout=5, fall=2, rise=2, min_dwell=60, cooldown_429=60,
                      damping_base=30, damping_cap=300, max_hold=3600)
STEPS = {"none": 0.0, "back an hour": -3600.0, "forward a day": 86400.0}


def dwell_run(step: float, restart: bool) -> list:
    """Primary down 20 s: failover; it recovers at once; the step comes 30 s into the dwell."""
    d = Driver(CLOCK)
    d.round(claude=True, local=True)
    d.round(claude=True, local=True)
    d.round(claude="http_5xx", local=True)
    d.round(claude="http_5xx", local=True)          # fall 2: failover at 40 s
    for i in range(20):
        if i == 3:   # the step while running, or between the save and the restore
            d.restart(step=step) if restart else d.step(step)
        d.round(claude=True, local=True)
    return d.log


def hold_run(step: float, restart: bool) -> list:
    """A 429 asking for 300 s: failover at once; the step comes 100 s into the hold."""
    d = Driver(CLOCK)
    d.round(claude=True, local=True)
    d.round(claude=True, local=True)
    d.round(claude=("rate_limited", 300), local=True)   # held until 330 s
    for i in range(50):
        if i == 10:
            d.restart(step=step) if restart else d.step(step)
        d.round(claude=True, local=True)
    return d.log


@pytest.mark.parametrize("restart", [False, True], ids=["running", "sidecar restarted"])
@pytest.mark.parametrize("step", list(STEPS), ids=list(STEPS))
def test_a_wall_clock_step_mid_dwell_changes_no_decision(step, restart):
    baseline = dwell_run(0.0, restart=False)
    assert baseline == [(40.0, "failover", "local"), (100.0, "failback", "claude")]
    assert dwell_run(STEPS[step], restart) == baseline


@pytest.mark.parametrize("restart", [False, True], ids=["running", "sidecar restarted"])
@pytest.mark.parametrize("step", list(STEPS), ids=list(STEPS))
def test_a_wall_clock_step_mid_429_hold_changes_no_decision(step, restart):
    baseline = hold_run(0.0, restart=False)
    # Held until 330 s: probed again at 330 and 340 (rise 2), failback at 340.
    assert baseline == [(30.0, "failover", "local"), (340.0, "failback", "claude")]
    assert hold_run(STEPS[step], restart) == baseline


def test_a_reboot_with_the_clock_behind_holds_no_longer_than_max_hold():
    """A Pi reboots mid-hold with its clock an hour behind (no RTC; NTP not synced yet): the
    saved hold looks an hour longer than it is, and is cut to max_hold."""
    s = ProbeSettings(**{**vars(CLOCK), "max_hold": 600})
    d = Driver(s)
    d.round(claude=True, local=True)
    d.round(claude=True, local=True)
    d.round(claude=("rate_limited", 300), local=True)   # held until 330 s
    d.round(100.0, local=True)                          # 130 s
    d.restart(boot="boot-b", mono=20.0, step=-3600)
    assert d.p.health["claude"].held_until == d.mono + 600
    for _ in range(80):
        d.round(claude=True, local=True)
    failback = [t for t, kind, _ in d.log if kind == "failback"]
    assert failback and 130 + 600 <= failback[0] <= 130 + 600 + 2 * CLOCK.interval


def test_a_reboot_with_the_clock_ahead_shortens_nothing_it_can_know():
    """A reboot with the clock a day ahead: the saved hold looks over. That is the one case the
    sidecar cannot tell from a long power cut; it probes before it trusts anything again."""
    d = Driver(CLOCK)
    d.round(claude=True, local=True)
    d.round(claude=True, local=True)
    d.round(claude=("rate_limited", 300), local=True)
    d.round(100.0, local=True)
    d.restart(boot="boot-b", mono=20.0, step=86400)
    assert not d.p.held("claude", d.mono)
    assert not d.p.eligible("claude", d.mono)     # nothing carried over counts as fresh
    d.round(claude=True, local=True)
    assert d.p.active == "local"                  # rise 2: one pass is not enough


# --- queries are reads ---------------------------------------------------------------------------

UNIT = "neverdark-wizard-merlin.service"
op = st.one_of(
    st.tuples(st.just("observe"), st.sampled_from(CHAIN), st.sampled_from(REASONS),
              st.one_of(st.none(), st.floats(min_value=0, max_value=200))),
    st.tuples(st.just("wait"), st.floats(min_value=0.0, max_value=200.0)),
    st.tuples(st.just("force"), st.sampled_from(CHAIN), st.one_of(st.none(), st.floats(1, 300))),
    st.tuples(st.just("pin"), st.sampled_from(CHAIN)),
    st.tuples(st.just("release")),
    st.tuples(st.just("restart")),
    st.tuples(st.just("tick"), st.booleans()),
)


def read_everything(p, now):
    """Every query the daemon makes of a policy outside its tick: /status, /metrics, the
    state file, the watchdog's status line, the probe loop's hold check."""
    p.describe(now, WALL0 + now)
    p.fingerprint()
    p.snapshot(now, WALL0 + now, BOOT)
    p.restart_wait(now)
    for b in CHAIN:
        p.held(b, now), p.usable(b, now), p.eligible(b, now), p.confirmed(b, now)
    p.damping_hold(), p.needs_check, p.active, p.dark, p.pinned


def apply_op(p, step, now):
    kind = step[0]
    if kind == "observe":
        _, b, reason, retry_after = step
        p.observe(b, reason == "ok", reason, now, retry_after=retry_after, deep=reason == "ok",
                  status={"rate_limited": 429, "auth": 401}.get(reason))
    elif kind in ("force", "pin"):
        try:
            p.force(step[1], now, step[2]) if kind == "force" else p.pin(step[1], now)
        except PolicyError:
            pass
    elif kind == "release":
        p.release()
    elif kind == "restart":
        p.take_restart(now)
    elif kind == "tick":
        plan = p.plan(now)
        if plan is not None and plan.action == "switch":
            p.begin(plan.decision, WALL0 + now)
            p.commit(plan.decision, now, step[1], wall=WALL0 + now)
        return plan
    return None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(op, st.integers(min_value=0, max_value=3)), min_size=1, max_size=120))
def test_reading_a_policy_any_number_of_times_changes_nothing(steps):
    """Two policies fed the same inputs, one of them read 0-3 times after every step: the same
    snapshots, the same views and the same decisions throughout, restart budget included (a
    restart that left the window stays counted until the tick prunes it)."""
    now = 0.0
    quiet = Policy(CHAIN, small, "claude", now, gateway=UNIT)
    looked_at = Policy(CHAIN, small, "claude", now, gateway=UNIT)
    for step, reads in steps:
        if step[0] == "wait":
            now += step[1]
            continue
        assert apply_op(quiet, step, now) == apply_op(looked_at, step, now)
        for _ in range(reads):
            read_everything(looked_at, now)
        assert looked_at.snapshot(now, WALL0 + now, BOOT) == quiet.snapshot(now, WALL0 + now, BOOT)
        assert looked_at.fingerprint() == quiet.fingerprint()
        assert looked_at.describe(now, WALL0 + now) == quiet.describe(now, WALL0 + now)
        assert looked_at.drain_events() == quiet.drain_events()


def test_status_does_not_prune_the_restart_budget():
    p = Policy(CHAIN, S, "claude", 0.0, gateway=UNIT)
    for t in (0.0, 1.0, 100.0):
        p.take_restart(t)
    before = p.snapshot(200.0, WALL0 + 200, BOOT)
    for _ in range(3):
        view = p.describe(200.0, WALL0 + 200)
    assert view["restart_budget"]["restarts_in_window"] == 1
    assert p.snapshot(200.0, WALL0 + 200, BOOT) == before and len(p.restarts) == 3
    p.plan(200.0)                       # the tick prunes
    assert list(p.restarts) == [100.0]


# --- a reload keeps the policy's memory (Policy.reconfigure) ------------------------------------

def busy(settings=S, gateway=UNIT):
    """On gpt after a forced switch with a 2000 s stay, claude held 900 s by a 429, one gateway
    restart."""
    sim = Sim(settings=settings)
    sim.p = Policy(CHAIN, settings, "claude", sim.now, gateway=gateway)
    healthy_all(sim)
    sim.p.take_restart(sim.now)
    sim.p.force("gpt", sim.now, stay=2000)
    sim.p.commit(sim.p.decide(sim.now), sim.now, True, wall=WALL0 + sim.now)
    sim.now += 5
    sim.see("claude", False, "rate_limited", status=429, retry_after=900)
    sim.tick(claude="rate_limited", gpt=True, local=True)
    return sim


def test_a_reload_that_changes_nothing_keeps_everything():
    sim = busy()
    before = (sim.p.snapshot(sim.now, WALL0, BOOT), sim.p.describe(sim.now, WALL0))
    sim.p.reconfigure(CHAIN, S, sim.now, gateway=UNIT)
    assert (sim.p.snapshot(sim.now, WALL0, BOOT), sim.p.describe(sim.now, WALL0)) == before
    assert sim.p.stay_until is not None


@pytest.mark.parametrize("chain", [CHAIN + ("spare",), ("spare",) + CHAIN, ("claude", "gpt")],
                         ids=["appended", "prepended", "local removed"])
def test_a_reload_of_the_chain_keeps_what_still_means_the_same(chain):
    """A drill's stay (issue 19: it was lost, and the wizard failed back at once), the dwell, the
    damping streak, holds, health, the restart budget, transitions: kept for the backends kept."""
    sim = busy()
    was = sim.p.snapshot(sim.now, WALL0, BOOT)
    stay_until, since, streak = sim.p.stay_until, sim.p.since, sim.p.streak
    sim.p.reconfigure(chain, S, sim.now, gateway=UNIT)
    assert sim.p.order == chain and sim.p.active == "gpt"
    assert (sim.p.stay_until, sim.p.since, sim.p.streak) == (stay_until, since, streak)
    now = sim.p.snapshot(sim.now, WALL0, BOOT)
    for b in chain:
        assert now["health"][b] == was["health"].get(b, now["health"][b])
    assert now["restarts"] == was["restarts"] and now["transitions"] == was["transitions"]
    assert "spare" not in was["health"] or now["health"]["spare"]["healthy"] is None
    # The stay still holds the fallback after the 429 hold is over and claude is healthy.
    sim.now += 900
    for _ in range(5):
        assert sim.tick(claude=True, gpt=True, **{b: True for b in chain if b not in CHAIN}) is None


def test_a_reload_drops_a_pin_and_a_forced_switch_onto_a_removed_backend():
    sim = Sim()
    healthy_all(sim)
    sim.p.pin("local", sim.now)
    sim.p.reconfigure(("claude", "gpt"), S, sim.now, gateway=None)
    assert sim.p.pinned is None
    sim.p.force("gpt", sim.now)
    sim.p.reconfigure(("claude", "local"), S, sim.now, gateway=None)
    assert sim.p.forced is None and sim.p.active == "claude"


def test_a_reload_that_removes_the_active_backend_fails_over():
    sim = busy()
    sim.p.reconfigure(("claude", "local"), S, sim.now, gateway=UNIT)
    assert sim.p.active is None
    sim.tick(claude="rate_limited", local=True)
    assert sim.p.active == "local" and sim.kinds()[-1] == "failover"


def test_a_backend_whose_probe_target_changed_starts_over():
    """A new key, URL or model: what was observed (the 429 hold, a rejected key) was about the
    old one."""
    sim = busy()
    sim.see("local", False, "auth", status=401)
    sim.p.reconfigure(CHAIN, S, sim.now, gateway=UNIT, fresh={"claude", "local"})
    for b in ("claude", "local"):
        h = sim.p.health[b]
        assert h.healthy is None and not h.held(sim.now) and not h.key_rejected and h.last_ok is None
    assert sim.p.health["gpt"].healthy is True


@pytest.mark.parametrize("chain", [CHAIN, CHAIN + ("spare",)], ids=["same chain", "new chain"])
def test_lowering_max_hold_shortens_a_running_hold_from_when_it_began(chain):
    """Issue 19: with the backend list unchanged the hold ran on; with a new chain it was cut to
    max_hold from the reload, not from the 429."""
    sim = busy()
    began = sim.p.health["claude"].held_since
    assert sim.p.health["claude"].held_until == began + 900
    sim.now += 100
    sim.p.reconfigure(chain, replace(S, max_hold=300), sim.now, gateway=UNIT)
    h = sim.p.health["claude"]
    assert h.held_until == began + 300
    assert h.hold_note == "provider asked 900 s; capped by max_hold"
    sim.p.reconfigure(chain, replace(S, max_hold=50), sim.now, gateway=UNIT)
    assert not sim.p.held("claude", sim.now) and sim.p.health["claude"].hold_note == ""


def test_raising_max_hold_lengthens_no_running_hold_and_cooldown_applies_as_max_hold_does():
    sim = busy(settings=replace(S, max_hold=600))
    h = sim.p.health["claude"]
    until = h.held_until
    sim.p.reconfigure(CHAIN, replace(S, max_hold=3600), sim.now, gateway=UNIT)
    assert h.held_until == until
    sim.see("gpt", False, "rate_limited", status=429)                 # cooldown_429: 60 s
    began = sim.now
    sim.p.reconfigure(CHAIN, replace(S, max_hold=3600, cooldown_429=20), sim.now + 5, gateway=UNIT)
    assert sim.p.health["gpt"].held_until == began + 20


def test_lowering_max_hold_shortens_a_drills_stay_from_when_it_was_asked():
    sim = busy()
    asked = sim.p.stay_from
    sim.p.reconfigure(CHAIN, replace(S, max_hold=100), sim.now, gateway=UNIT)
    assert sim.p.stay_until == asked + 100


def test_the_restart_budget_belongs_to_its_gateway_unit():
    sim = busy()
    sim.p.reconfigure(CHAIN, S, sim.now, gateway=UNIT)
    assert len(sim.p.restarts) == 1
    sim.p.reconfigure(CHAIN, S, sim.now, gateway="neverdark-wizard-other.service")
    assert len(sim.p.restarts) == 0 and sim.p.gateway == "neverdark-wizard-other.service"
    sim.p.reconfigure(CHAIN, S, sim.now, gateway=None)
    assert sim.p.restart_wait(sim.now) == 0 and sim.p.describe(sim.now, WALL0)["restart_budget"] is None


def test_new_thresholds_apply_to_the_counts_a_backend_has():
    sim = Sim(settings=replace(S, fall=3))
    healthy_all(sim)
    sim.tick(claude="timeout", gpt=True, local=True)
    sim.tick(claude="timeout", gpt=True, local=True)
    assert sim.p.health["claude"].healthy is True
    sim.p.reconfigure(CHAIN, replace(S, fall=2), sim.now, gateway=None)
    assert sim.p.health["claude"].healthy is False and sim.p.decide(sim.now).kind == "failover"


def test_a_reload_raises_dark_when_the_new_chain_has_nothing_usable():
    sim = Sim(settings=replace(S, fall=1))
    healthy_all(sim)
    sim.tick(claude="refused", gpt="refused", local=True)
    assert sim.p.active == "local"
    sim.alerts()
    sim.p.reconfigure(("claude", "gpt", "local"), S, sim.now, gateway=None, fresh={"local"})
    assert not sim.p.dark
    sim.p.reconfigure(("claude", "gpt"), S, sim.now, gateway=None)
    assert sim.p.dark and sim.alerts() == ["dark"]


# --- a restart with a new config keeps the same rules ------------------------------------------

def test_a_restart_with_a_lower_max_hold_ends_the_hold_from_when_it_began():
    sim = busy()
    began = sim.p.health["claude"].held_since
    doc = through_json(sim.p.snapshot(sim.now, WALL0 + sim.now, BOOT))
    assert doc["health"]["claude"]["held_since"] == WALL0 + began
    assert doc["health"]["claude"]["hold_asked"] == 900
    q = Policy(CHAIN, replace(S, max_hold=300), None, 0.0, gateway=UNIT)
    q.restore(doc, sim.now + 10, WALL0 + sim.now + 10, BOOT)
    assert q.health["claude"].held_until == began + 300
    assert q.health["claude"].hold_note == "provider asked 900 s; capped by max_hold"
    assert q.stay_until is None      # a stay is not saved: a restarted sidecar applies the rules
