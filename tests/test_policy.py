"""The failover policy, driven with a fake clock: every signal, every rule, and properties over
random observation sequences. The policy is pure, so everything here is real; nothing is faked
but time."""

from __future__ import annotations

import json

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

def test_snapshot_restore_round_trip_through_json():
    sim = Sim()
    healthy_all(sim)
    for _ in range(3):
        sim.tick(claude="http_5xx", gpt=True, local=True)
    sim.see("local", False, "rate_limited", retry_after=99)
    sim.p.pin("gpt", sim.now)
    snap = json.loads(json.dumps(sim.p.snapshot()))
    other = Policy(CHAIN, S, "claude", 0.0)
    other.restore(snap)
    assert other.snapshot() == sim.p.snapshot()
    assert other.decide(sim.now) == sim.p.decide(sim.now)


def test_restore_drops_backends_no_longer_configured():
    sim = Sim()
    healthy_all(sim)
    sim.p.pin("local", sim.now)
    other = Policy(("claude", "gpt"), S, "claude", 0.0)
    other.restore(sim.p.snapshot())
    assert other.pinned is None and set(other.health) == {"claude", "gpt"}


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
