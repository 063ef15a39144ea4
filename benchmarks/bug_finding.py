"""Bug-finding benchmark: steps and seconds until each agent first detects each flaw.

    .venv/bin/python benchmarks/bug_finding.py [--json] [--budget N] [--seeds S]
        [--agents random,pct,ql,ppo,greybox] [--flaws ...] [--train-steps N]
        [--train-seeds N] [--jobs 2] [--merge] [--out DIR]

For every flaw of ``FLAW_IDS``, switched on *alone* (variant ``cowpte``), every agent
plays with ``S`` seeds until it first detects *that flaw's* violation or has spent the
step budget. Writes ``benchmarks/out/bug_finding.{json,md,png}``.

* **Which signatures belong to a flaw** is measured, not written down: the flaw's
  scenario ``scenarios/flaws/<flaw>.yaml`` is run with the flaw alone and every
  signature it reports (scenario ``selftest`` checks excluded) counts for that flaw.
* **Attribution**: a detection counts only if the schedule so far, replayed on the
  ``fixed`` variant (:func:`cowenv.minimize.run_lenient`, illegal steps skipped), does
  *not* report the same signature, i.e. the flaw's code path is what made it happen.
  Non-attributable reports (simulator soundness problems) are counted separately.
* **Env**: ``cowenv/CowPte-v0`` with the small geometry (8 entries per table; the
  default workload, catalogue and limits otherwise), episodes of 256 actions that go on
  after a violation, on the flaw's base (:func:`flaw_base`: 6.2, v4's base, except
  for the flaw of the per-VMA-lock fault path). No reachability prefixes: every flaw
  is reached by search alone from the default workload and catalogue.
* **PPO is never measured on a flaw it was trained on**: the flaws are split into
  ``FOLDS`` groups (flaw ``i`` in group ``i % FOLDS``); one MaskablePPO model per group is
  trained on the other groups' flaws (one vector-env slot per flaw, each alone), and
  measured on its own group's flaws. Training time is reported apart.
* Per run: steps (and wall seconds, this machine) to the first attributed detection.
  Table: median over seeds (not-found seeds count as the budget, so a median at the
  budget means "not found by most seeds"), found/total. Summary: geometric mean over
  flaws of those medians per agent.
* Seeds: run ``(flaw, agent, seed)`` plays episode ``e`` with
  ``cowenv_agents.episode_rng(seed, flaw index, e)``: everything is deterministic except
  the seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
DEFAULT_AGENTS = ("random", "random-template", "pct", "ql", "ppo", "greybox")
#: Benchmark agent name -> (cowenv_agents name, settings). Greybox never seeds its corpus
#: from the scenarios of the flaw it is measured on (:func:`flaw_scenarios`: held out,
#: like PPO's folds); it may seed from the other scenarios. ``greybox-label`` is greybox
#: with plain label coverage as feedback (the measurement behind the choice of
#: interleaving feedback); ``greybox-noseed`` starts from an empty corpus (no scenario
#: seeds at all).
#: ``random-template`` / ``random-op`` / ``pct-template`` / ``pct-d10``: the uniform
#: agents with their other ways of choosing an action (the measurement behind the
#: defaults); ``ql-fine`` is QL as it was (fine states, Q over catalogue entries) and
#: ``ql-fine-kind`` with Q over action kinds. ``greybox-race`` / ``greybox-race20``:
#: greybox with race episodes (Razzer/Snowboard-style race pairs, README "Greybox") in
#: 3 / 2 of 10 episodes after the seed replays.
#: Round 15's settings (session 17): seed plans replayed in 5 of 10 episodes after the
#: first pass, ``plan_race``, ``fault_kthreads``, ``aim_untried`` and
#: ``plan_fault_scope`` and every window of rounds 17-18 (``window_kthread``,
#: ``window_faults``, ``window_kthread_multi``, ``window_kthread_gup``,
#: ``window_forks``) and round 19's ``window_release_nosplit`` off. Every earlier round
#: pins them.
R15: dict[str, Any] = {"plan_cycle": 0.5, "plan_race": 0.0, "fault_kthreads": False,
                       "aim_untried": False, "plan_fault_scope": False,
                       "window_kthread": 0.0, "window_faults": 0.0,
                       "window_kthread_multi": False, "window_kthread_gup": False,
                       "window_forks": 0.0, "window_release_nosplit": False}
#: Round 17's default (session 19): kernel-thread windows and fault windows on, at
#: 10 % / 5 % of the steps; round 18's three options off (as in R15).
R17: dict[str, Any] = {**R15, "window_kthread": 1.0, "window_kthread_share": 0.1,
                       "window_faults": 1.0, "window_faults_share": 0.05}
#: Round 18's default (session 20): round 17 with kernel-thread windows aimed at PMDs of
#: two or more VMAs, a sibling's GUP-fast pin as their other side, fork-layout windows.
R18: dict[str, Any] = {**R17, "window_kthread_multi": True, "window_kthread_gup": True,
                       "window_forks": 1.0}
#: Round 14's default (session 16): seed plans replayed in 3 of 10 episodes after the
#: first pass.
R14: dict[str, Any] = {**R15, "plan_cycle": 0.3}
#: Round 13's default (rounds 12 and 13, sessions 14-15): round 14's plan cycles and
#: fault tries in a seed plan's continuation off.
R13: dict[str, Any] = {**R14, "plan_cycle": 0.0, "plan_tail_faults": False}
#: Round 11's default (session 13): round 12's early-played windows, whole-table
#: releases, settled race pairs and race pairs aimed at a paused walk's range off.
R11: dict[str, Any] = {**R13, "window_early": False, "window_whole_release": False,
                       "race_settle": False, "race_walk": False}
#: Round 10's default (session 12): round 11's fault-injection range classes, shared-
#: table aiming and extra tries on shared tables off.
R10: dict[str, Any] = {**R11, "fault_ranges": False, "fault_split_pmd": False,
                       "aim_shared": 0.0, "fault_shared": 0.0}
#: Round 9's default (session 12): round 10's fork layouts as sharing states off too.
R9: dict[str, Any] = {**R10, "layout_states": False}
#: Round 8's default (session 11): round 9's state picks off.
R8: dict[str, Any] = {**R9, "state_pick": 0.0}
#: Round 7's default (session 10): round 8's race-pair choices and plan tails off.
R7: dict[str, Any] = {**R8, "race_block_ops": False, "race_meet": False, "plan_tail": 0.0}
#: Round 6's default (sessions 8–9): the settings round 7 added, off too. Every variant
#: measured before round 7 became the default pins them, so its command still measures
#: what its table says.
R6: dict[str, Any] = {**R7, "tail": 0.0, "content_features": False, "window_release": 0.0}
#: ``greybox-r5``: the round-5 greybox (context-sensitive fault injection and systematic
#: windows off: the defaults before round 6). Every variant measured before round 6 pins
#: it, so that its command still measures what its table says; the round-6 stages are set
#: on top where a variant names them.
R5: dict[str, Any] = {**R6, "fault_contexts": 0, "window_prob": 0.0, "window_decay": 0.0,
                      "window_share": 1.0}
#: Round 8's race-pair choices (session 11), what the plan-tail variants were measured on.
BM: dict[str, Any] = {**R8, "race_block_ops": True, "race_meet": True,
                      "race_kthreads": False}
AGENT_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "random-template": ("random", {"choice": "template"}),
    "random-op": ("random", {"choice": "op"}),
    "pct-template": ("pct", {"start_policy": "template"}),
    "pct-d10": ("pct", {"depth": 10}),
    "ql-fine": ("ql", {"state": "fine", "actions": "catalogue"}),
    "ql-fine-kind": ("ql", {"state": "fine", "actions": "kind"}),
    "greybox": ("greybox", {}),
    "greybox-r5": ("greybox", R5),
    "greybox-label": ("greybox", {**R5, "feedback": "label"}),
    "greybox-noseed": ("greybox", {**R5, "seeds": []}),
    "greybox-thread": ("greybox", {**R5, "choice": "thread"}),
    "greybox-explore30": ("greybox", {**R5, "explore": 0.3}),
    "greybox-race": ("greybox", {**R5, "race_episodes": 0.3}),
    "greybox-race20": ("greybox", {**R5, "race_episodes": 0.2}),
    "greybox-norace": ("greybox", {**R5, "race_episodes": 0.0}),
    "greybox-triage": ("greybox", {**R5, "fault_triage": True, "explore_max": 0.4}),
    "greybox-race20-triage": ("greybox", {**R5, "race_episodes": 0.2, "fault_triage": True,
                                          "explore_max": 0.4}),
    "greybox-faultctx": ("greybox", {**R5, "fault_contexts": 4}),
    "greybox-faultctx1": ("greybox", {**R5, "fault_contexts": 1}),
    "greybox-window": ("greybox", {**R5, "window_prob": 1.0}),
    "greybox-window30": ("greybox", {**R5, "window_prob": 0.3}),
    "greybox-window-d4s30": ("greybox", {**R5, "window_prob": 1.0, "window_decay": 4.0,
                                         "window_share": 0.3}),
    "greybox-window-d4s20": ("greybox", {**R5, "window_prob": 1.0, "window_decay": 4.0,
                                         "window_share": 0.2}),
    "greybox-faultctx-window": ("greybox", {**R6, "fault_contexts": 4, "window_prob": 1.0,
                                            "window_decay": 4.0, "window_share": 0.2}),
    "greybox-s30": ("greybox", {**R6, "fault_contexts": 4, "window_prob": 1.0,
                                "window_decay": 4.0, "window_share": 0.3}),
    "greybox-fcw-args": ("greybox", {**R6, "fault_contexts": 4, "window_prob": 1.0,
                                     "window_decay": 4.0, "window_share": 0.2,
                                     "arg_features": True}),
    "greybox-r6": ("greybox", R6),
    "greybox-race30d": ("greybox", {**R6, "race_episodes": 0.3}),
    "greybox-release": ("greybox", {**R6, "window_release": 0.1}),
    "greybox-trc": ("greybox", {**R7, "window_release": 0.1, "tail": 32.0,
                                "content_features": True}),
    "greybox-r7": ("greybox", R7),
    "greybox-blockops": ("greybox", {**R7, "race_block_ops": True}),
    "greybox-meet": ("greybox", {**R7, "race_meet": True}),
    "greybox-bm": ("greybox", {**R7, **BM}),
    "greybox-kt": ("greybox", {**R7, **BM, "race_kthreads": True}),
    "greybox-pt32": ("greybox", {**BM, "plan_tail": 32.0}),
    "greybox-pt64": ("greybox", {**BM, "plan_tail": 64.0}),
    "greybox-r8": ("greybox", {**BM, "plan_tail": 64.0}),
    "greybox-pt128": ("greybox", {**BM, "plan_tail": 128.0}),
    "greybox-pt64-race30": ("greybox", {**BM, "plan_tail": 64.0, "race_episodes": 0.3}),
    "greybox-pt64-fc6": ("greybox", {**BM, "plan_tail": 64.0, "fault_contexts": 6}),
    "greybox-sp10": ("greybox", {**BM, "plan_tail": 64.0, "state_pick": 0.1}),
    "greybox-sp20": ("greybox", {**BM, "plan_tail": 64.0, "state_pick": 0.2}),
    "greybox-sp30": ("greybox", {**BM, "plan_tail": 64.0, "state_pick": 0.3}),
    "greybox-r9": ("greybox", {**R9}),
    "greybox-lay": ("greybox", {**R10, "layout_states": True}),
    "greybox-r10": ("greybox", {**R10}),
    "greybox-fr": ("greybox", {**R10, "fault_ranges": True}),
    "greybox-r11": ("greybox", {**R11}),
    "greybox-we": ("greybox", {**R11, "window_early": True}),
    "greybox-ld": ("greybox", {**R11, "layout_data": True}),
    "greybox-rb2": ("greybox", {**R11, "window_early": True, "layout_data": True,
                                "window_release_bound": 2}),
    "greybox-wr": ("greybox", {**R11, "window_whole_release": True}),
    "greybox-we-ld-wr": ("greybox", {**R11, "window_early": True, "layout_data": True,
                                     "window_whole_release": True}),
    "greybox-we-wr": ("greybox", {**R11, "window_early": True, "window_whole_release": True}),
    "greybox-rs": ("greybox", {**R11, "race_settle": True}),
    "greybox-rs-rw": ("greybox", {**R11, "race_settle": True, "race_walk": True}),
    "greybox-rn25": ("greybox", {**R13, "race_nest": 0.25}),
    "greybox-kb": ("greybox", {**R13, "race_kthread_b": True}),
    "greybox-kb-fnc": ("greybox", {**R13, "race_kthread_b": True, "fault_n_context": True}),
    # Round 14: plan_cycle=0.3 with plan_tail_faults; greybox-r13 is the agent before
    # it, greybox-pc15/-pc30 plan cycles without the tails' fault tries. Round 15 (the
    # default): plan_cycle=0.5 (greybox-pc50); greybox-r14 is the agent before it.
    "greybox-r13": ("greybox", R13),
    "greybox-r14": ("greybox", R14),
    "greybox-pc15": ("greybox", {**R14, "plan_cycle": 0.15, "plan_tail_faults": False}),
    "greybox-pc30": ("greybox", {**R14, "plan_cycle": 0.3, "plan_tail_faults": False}),
    "greybox-pc30-ptf": ("greybox", {**R14, "plan_cycle": 0.3, "plan_tail_faults": True}),
    "greybox-pc50": ("greybox", R15),
    "greybox-r15": ("greybox", R15),
    # Measured on greybox-pc50 and left off (README "Greybox, round 15").
    "greybox-pc70": ("greybox", {**R15, "plan_cycle": 0.7}),
    "greybox-pr30": ("greybox", {**R15, "plan_race": 0.3, "plan_race_first": True}),
    "greybox-prr30": ("greybox", {**R15, "plan_race": 0.3}),
    # Round 16, measured on round 15 and left off (README "Greybox, round 16"): the
    # kernel thread's calls get fault tries too; the aimed choice takes the least-tried
    # fault context; each seed plan's continuation has fault tries of its own.
    "greybox-fk": ("greybox", {**R15, "fault_kthreads": True}),
    "greybox-au": ("greybox", {**R15, "aim_untried": True}),
    "greybox-pfs": ("greybox", {**R15, "plan_fault_scope": True}),
    # Round 17: kernel-thread windows (reclaim or compaction of a page against its
    # process's fork) and fault windows (the calls on a COW-shared table, each failed at
    # fail_nth 1 and 2), searched from the state an episode reached; 10 % / 5 % of the
    # steps at most.
    "greybox-wkfw": ("greybox", R17),
    "greybox-wkfw-mv": ("greybox", {**R17, "window_kthread_multi": True}),
    # Round 18 (greybox-wkfw-mv-gup-fl): kernel-thread windows aimed at
    # PMDs of two or more VMAs (-mv), a sibling's GUP-fast pin as their other side
    # (-gup), fork-layout windows (-fl; 3 % of the steps at most). greybox-wkfw pins
    # round 17 (R15 holds the three off).
    "greybox-wkfw-mv-gup": ("greybox", {**R17, "window_kthread_multi": True,
                                        "window_kthread_gup": True}),
    "greybox-wkfw-mv-gup-fl": ("greybox", R18),
    # Round 19 (the default now): table-release windows take a munmap that splits no
    # VMA at a COW-protected PMD, where there is one (-ns). greybox-wkfw-mv-gup-fl pins
    # round 18.
    "greybox-wkfw-mv-gup-fl-ns": ("greybox", {**R18, "window_release_nosplit": True}),
    "greybox-pc30-ka10": ("greybox", {**R14, "plan_cycle": 0.3, "plan_tail_faults": False,
                                      "race_kthread_a": 0.1}),
    "greybox-aim30-fsr10": ("greybox", {**R10, "fault_ranges": True, "aim_shared": 0.3,
                                        "fault_shared": 0.1}),
    "greybox-aim30-fsr10-sp": ("greybox", {**R10, "fault_ranges": True, "aim_shared": 0.3,
                                           "fault_shared": 0.1, "fault_split_pmd": True}),
    "greybox-contents": ("greybox", {**R6, "content_features": True}),
    "greybox-tail32": ("greybox", {**R6, "tail": 32.0}),
    "greybox-tail32-contents": ("greybox", {**R6, "tail": 32.0, "content_features": True}),
}
#: Every agent the benchmark runs: the four base agents and every named setting above.
AGENTS = ("random", "pct", "ql", "ppo") + tuple(AGENT_SPECS)
FOLDS = 3
BASE_ENV: dict[str, Any] = {"geometry": "small", "terminate_on_violation": False}
#: The last actions of every episode are the harness's teardown (cowenv_agents.Teardown).
TEARDOWN = 32

GEOMETRY_P = 8  # entries per table of the "small" geometry
PAGE = 4096


def flaw_base(flaw: str) -> str:
    """The upstream base the flaw's own scenario runs on (its ``config.base``).

    Every flaw but one lives in v4's code on its base, 6.2; ``vma-lock-fault-breaks-shared``
    lives in the per-VMA-lock fault path, which exists from 6.4 (its scenario's
    ``fault_mode: vma_lock`` resolves to base 6.5). On a base with per-VMA locks the env's
    faults take them (:func:`cowenv.harness.make_config`), as the kernel does: nothing
    else differs from the other flaws' env.
    """
    from cowenv.scenario import load_scenario

    return load_scenario(ROOT / "scenarios" / "flaws" / f"{flaw}.yaml").config.base


def flaw_scenarios(flaw: str) -> list[Path]:
    """The flaw's held-out set: every scenario that configures this flaw alone.

    :func:`cowenv.campaign.flaw_scenarios`: ``scenarios/flaws/<flaw>.yaml`` and any other
    scenario whose config enables this flaw and no other (e.g.
    ``tlb/table-free-no-deferral-stale-psc``, the same flaw through the hardware walker
    instead of GUP-fast; ``windows/pmd-clear-window-empty-offset``). Their signatures
    are the flaw's targets (:func:`flaw_signatures`) and none of them seeds greybox's
    corpus in the flaw's runs.

    Raises:
        FileNotFoundError: the flaw has no scenario of its own.

    """
    from cowenv.campaign import flaw_scenarios as scenarios_of

    own = ROOT / "scenarios" / "flaws" / f"{flaw}.yaml"
    if not own.is_file():
        raise FileNotFoundError(own)
    return scenarios_of(flaw)


def flaw_signatures(flaw: str) -> list[str]:
    """The flaw's targets: what its scenarios report with it alone and not on fixed.

    :func:`cowenv.campaign.flaw_harms` over :func:`flaw_scenarios` (sorted): a flaw with
    two manifestations (GUP-fast and the paging-structure cache for
    ``table-free-no-deferral``) is detected by either. A run's detection is then checked
    again on its own schedule (:func:`attributable`).

    Raises:
        FileNotFoundError: the flaw has no scenario of its own.

    """
    from cowenv.campaign import flaw_harms

    flaw_scenarios(flaw)
    return sorted(flaw_harms(flaw))


def env_kwargs(flaw: str) -> dict[str, Any]:
    """The benchmark env of ``flaw``: ``BASE_ENV``, the flaw alone, on its base."""
    return {**BASE_ENV, "variant": "cowpte", "flaws": [flaw], "base": flaw_base(flaw)}


def attributable(env: Any, signature: str) -> bool:
    """Whether the episode so far does *not* report ``signature`` on ``fixed``."""
    from cowenv.minimize import run_lenient
    from cowenv.scenario import override_config, parse_scenario

    sc = parse_scenario(env.get_schedule())
    cfg = override_config(sc.config, "fixed", None)
    run = run_lenient(cfg, sc.steps, stop_on={signature})
    return signature not in run.kernel.signatures


def run_one(flaw: str, fi: int, agent: str, seed: int, budget: int, targets: list[str],
            model: str | None, make: Any = None) -> dict[str, Any]:
    """One (flaw, agent, seed) run: play until an attributed detection or the budget.

    ``make``: builds the agent from its cowenv_agents name and settings (default
    :func:`cowenv_agents.make_agent`; ``benchmarks/race_pairs.py`` passes one that
    records the greybox agent's race pairs).
    """
    import cowenv_agents as ca

    from cowenv.env import CowEnv

    env = CowEnv(**env_kwargs(flaw))
    name, akw = AGENT_SPECS.get(agent, ("ppo" if agent.startswith("ppo-t") else agent, {}))
    if name == "greybox":
        akw = {**akw, "seed_exclude": [p.stem for p in flaw_scenarios(flaw)]}
    ag = (make or ca.make_agent)(name, model=model, **akw)
    tset = set(targets)
    t0 = time.perf_counter()
    steps = episodes = 0
    found: dict[str, Any] | None = None
    unattributed: dict[str, int] = {}
    # Steps an agent executes outside the env (greybox's systematic windows search from
    # a state of the episode with their own kernel copy) count like env steps: those of
    # the episode so far at a detection, all of them after it (EpisodeResult).
    while steps < budget and found is None:
        rng, reset_seed = ca.episode_rng(seed, fi, episodes)
        base = steps
        off0 = getattr(ag, "offline_steps", 0)

        def hook(i: int, v: dict[str, Any], base: int = base, off0: int = off0) -> bool:
            nonlocal found
            sig = v["signature"]
            if sig not in tset or v["kind"] == "simulator":
                return False
            step = base + i + getattr(ag, "offline_steps", 0) - off0
            if step > budget:
                return False
            if not attributable(env, sig):
                unattributed[sig] = unattributed.get(sig, 0) + 1
                return False
            found = {"step": step, "signature": sig,
                     "seconds": time.perf_counter() - t0,
                     "stage": getattr(ag, "episode_kind", None)}
            return True

        res = ca.run_episode(env, ag, rng, reset_seed, max_actions=budget - steps,
                             on_violation=hook, teardown=TEARDOWN)
        steps += res.steps + res.offline_steps
        episodes += 1
    return {"flaw": flaw, "agent": agent, "seed": seed, "found": found is not None,
            "steps": found["step"] if found else None,
            "seconds": round(found["seconds"], 3) if found else None,
            "signature": found["signature"] if found else None,
            "stage": found["stage"] if found else None,
            "steps_run": steps, "episodes": episodes,
            "run_seconds": round(time.perf_counter() - t0, 3), "unattributed": unattributed}


def one_run_args(description: str, argv: list[str] | None,
                 extra: Any = None) -> argparse.Namespace:
    """Parse the arguments of a one-run diagnosis tool (``race_pairs.py``, ``states.py``).

    ``--flaw``, ``--seed``, ``--agent`` (greybox or a greybox setting of
    :data:`AGENT_SPECS`; another agent exits 2 with a one-line error) and ``--budget``;
    ``extra(parser)`` adds the tool's own.
    """
    from cowenv.kernel.config import FLAW_IDS

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--flaw", required=True, choices=FLAW_IDS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--agent", default="greybox",
                   help="greybox or a greybox setting of bug_finding.AGENT_SPECS")
    p.add_argument("--budget", type=int, default=100_000)
    if extra is not None:
        extra(p)
    a = p.parse_args(argv)
    if AGENT_SPECS.get(a.agent, (a.agent, {}))[0] != "greybox":
        p.error(f"--agent: expected greybox or a greybox setting, got {a.agent!r}")
    a.parser = p
    return a


def run_recorded(a: argparse.Namespace, recording: type) -> dict[str, Any]:
    """One bug-finding run of :func:`one_run_args`'s ``a``, greybox played by ``recording``.

    ``recording`` is a :class:`cowenv_agents.greybox.GreyboxAgent` subclass that records
    what a diagnosis tool counts; the run is :func:`run_one`'s (the same steps and
    detection rule as the benchmark).
    """
    import cowenv_agents as ca

    from cowenv.kernel.config import FLAW_IDS

    def make(nm: str, model: str | None = None, **kw: Any) -> Any:
        return recording(**kw) if nm == "greybox" else ca.make_agent(nm, model=model, **kw)

    return run_one(a.flaw, FLAW_IDS.index(a.flaw), a.agent, a.seed, a.budget,
                   flaw_signatures(a.flaw), None, make=make)


def run_outcome(a: argparse.Namespace, r: dict[str, Any]) -> str:
    """The first line of a one-run diagnosis tool: the run and what it found."""
    found = f"found at step {r['steps']:,} ({r['stage']})" if r["found"] else "not found"
    return f"{a.flaw}, {a.agent}, seed {a.seed}: {found}; {r['episodes']} episodes"


def stage_table(runs: list[dict[str, Any]], flaws: list[str], agents: list[str]) -> str:
    """Which kind of greybox episode made each detection (``stage``), per flaw and agent.

    Markdown (empty when no run recorded a stage): the counts of the found runs per
    :attr:`cowenv_agents.GreyboxAgent.episode_kind` (a seed plan, a played window, a race
    episode, a replayed prefix, a mutated child, a random episode, a triage job).
    """
    staged = [a for a in agents if any(r["agent"] == a and r.get("stage") for r in runs)]
    if not staged:
        return ""
    lines = ["", "Detections by greybox episode kind (found runs):", "",
             "| flaw | " + " | ".join(staged) + " |", "|---|" + "---|" * len(staged)]
    for f in flaws:
        row = [f"`{f}`"]
        for a in staged:
            c: dict[str, int] = {}
            for r in runs:
                if r["agent"] == a and r["flaw"] == f and r["found"]:
                    k = r.get("stage") or "?"
                    c[k] = c.get(k, 0) + 1
            row.append(", ".join(f"{k} {n}" for k, n in sorted(c.items(), key=lambda x: -x[1]))
                       or "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def train_fold(fold: int, flaws: list[str], steps: int, seed: int, model_dir: str,
               tag: str = "") -> dict:
    """Train the PPO model of ``fold`` on ``flaws`` (each alone, one env slot each)."""
    import cowenv_agents.ppo as ppo

    t0 = time.perf_counter()
    path = ppo.train_ppo([env_kwargs(f) for f in flaws], steps,
                         Path(model_dir) / f"ppo{tag}-fold{fold}.zip", seed=seed,
                         log_dir=Path(model_dir) / "runs", run_name=f"{tag}fold{fold}",
                         checkpoint_freq=max(steps // 4, 1), eval_freq=max(steps // 4, 1),
                         eval_episodes=2, teardown=TEARDOWN)
    return {"fold": fold, "tag": tag, "seed": seed, "model": str(path), "trained_on": flaws,
            "steps": steps,
            "seconds": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------- report
def summarise(runs: list[dict[str, Any]], flaws: list[str], agents: list[str],
              budget: int) -> dict[str, Any]:
    """Per (flaw, agent): found count, median steps/seconds; per agent: geometric mean."""
    cells: dict[str, dict[str, Any]] = {}
    for f in flaws:
        for a in agents:
            rs = [r for r in runs if r["flaw"] == f and r["agent"] == a]
            if not rs:
                continue
            st = sorted(r["steps"] if r["found"] else budget for r in rs)
            secs = [r["seconds"] for r in rs if r["found"]]
            cells[f"{f}|{a}"] = {
                "found": sum(r["found"] for r in rs), "n": len(rs),
                "median_steps": float(np.median(st)),
                "median_seconds": float(np.median(secs)) if secs else None,
                "unattributed": sum(sum(r["unattributed"].values()) for r in rs)}
    geo = {}
    for a in agents:
        vals = [cells[f"{f}|{a}"]["median_steps"] for f in flaws if f"{f}|{a}" in cells]
        if vals:
            geo[a] = _geomean(vals)
    found_by_any = {f: any(cells.get(f"{f}|{a}", {}).get("found", 0) for a in agents)
                    for f in flaws}
    common = [f for f in flaws if all(f"{f}|{a}" in cells for a in agents)]
    geo_common = {}
    if common and len(common) < len(flaws):
        for a in agents:
            geo_common[a] = _geomean([cells[f"{f}|{a}"]["median_steps"] for f in common])
    # The tail: runs found late or not at all (what decides "every flaw in every seed").
    tail = {a: {"runs": len(rs), "found": sum(r["found"] for r in rs),
                "over_50k": sum(not r["found"] or r["steps"] > 50_000 for r in rs),
                "over_70k": sum(not r["found"] or r["steps"] > 70_000 for r in rs)}
            for a in agents if (rs := [r for r in runs if r["agent"] == a])}
    # "Every flaw in 8 of 8 seeds" per block of 8 consecutive seeds (whole blocks only,
    # counted from each agent's lowest seed): the flaws found in every seed of the block,
    # and the block's geometric mean of the flaws' median steps.
    blocks_of: dict[str, list[int]] = {}
    block_geo: dict[str, list[float]] = {}
    for a in tail:
        rs = [r for r in runs if r["agent"] == a]
        lo = min(r["seed"] for r in rs)
        blocks, bgeo = [], []
        for b0 in range(lo, max(r["seed"] for r in rs) + 1, 8):
            blk = [r for r in rs if b0 <= r["seed"] < b0 + 8]
            per = {f: [r for r in blk if r["flaw"] == f] for f in flaws}
            if all(len(v) == 8 for v in per.values()):
                blocks.append(sum(all(r["found"] for r in v) for v in per.values()))
                bgeo.append(_geomean([float(np.median(
                    [r["steps"] if r["found"] else budget for r in v])) for v in per.values()]))
        blocks_of[a] = blocks
        block_geo[a] = bgeo
    return {"cells": cells, "geomean_steps": geo, "found_by_any": found_by_any,
            "common_flaws": common, "geomean_common": geo_common, "tail": tail,
            "blocks": blocks_of, "block_geomean": block_geo}


def _geomean(vals: list[float]) -> float:
    """Geometric mean of step counts (each at least 1)."""
    return float(math.exp(np.mean([math.log(max(v, 1.0)) for v in vals])))


def markdown(summary: dict[str, Any], flaws: list[str], agents: list[str], budget: int,
             seeds: int) -> str:
    """The results as a markdown table (median steps (seconds), found/seeds).

    Rows are grouped by the flaw's origin (``v4`` first, then ``seeded``;
    :data:`cowenv.kernel.config.FLAW_ORIGINS`).
    """
    from cowenv.kernel.config import FLAW_ORIGINS

    head = "| flaw | origin | " + " | ".join(agents) + " |"
    lines = [head, "|" + "---|" * (len(agents) + 2)]
    cells = summary["cells"]
    for f in sorted(flaws, key=lambda x: FLAW_ORIGINS[x] != "v4"):
        row = [f"`{f}`", FLAW_ORIGINS[f]]
        for a in agents:
            c = cells.get(f"{f}|{a}")
            if c is None:
                row.append("-")
                continue
            if c["found"] == 0:
                row.append(f"not found (0/{c['n']})")
                continue
            med = c["median_steps"]
            ms = "≥ budget" if med >= budget else f"{med:,.0f}"
            sec = f" ({c['median_seconds']:.1f}s)" if c["median_seconds"] is not None else ""
            row.append(f"{ms}{sec}, {c['found']}/{c['n']}")
        lines.append("| " + " | ".join(row) + " |")
    geo = summary["geomean_steps"]
    lines.append("| **geometric mean of medians** | | "
                 + " | ".join(f"**{geo[a]:,.0f}**" if a in geo else "-" for a in agents) + " |")
    gc = summary.get("geomean_common") or {}
    if gc:
        lines.append(f"| **geometric mean over the {len(summary['common_flaws'])} flaws every "
                     f"agent ran** | | "
                     + " | ".join(f"**{gc[a]:,.0f}**" for a in agents) + " |")
        geo = gc
    tail = summary.get("tail") or {}
    lines.append("| **runs found / runs above 50k / above 70k steps (not found included)** "
                 "| | " + " | ".join(
                     f"{tail[a]['found']}/{tail[a]['runs']} / {tail[a]['over_50k']} / "
                     f"{tail[a]['over_70k']}" if a in tail else "-" for a in agents) + " |")
    blocks = summary.get("blocks") or {}
    if any(blocks.get(a) for a in agents):
        lines.append(f"| **flaws in 8/8 per block of 8 seeds (of {len(flaws)})** | | "
                     + " | ".join(" / ".join(map(str, blocks[a])) if blocks.get(a) else "-"
                                  for a in agents) + " |")
        bgeo = summary.get("block_geomean") or {}
        lines.append("| **geometric mean per block of 8 seeds** | | "
                     + " | ".join(" / ".join(f"{g:,.0f}" for g in bgeo[a]) if bgeo.get(a)
                                  else "-" for a in agents) + " |")
    ppo = sorted(geo[a] for a in agents if a.startswith("ppo-t") and a in geo)
    if len(ppo) > 1:
        lines.append("")
        lines.append(f"PPO over {len(ppo)} training seeds (columns `ppo-t*`, one model per "
                     f"held-out group and training seed): geometric mean {ppo[0]:,.0f} to "
                     f"{ppo[-1]:,.0f}, median {float(np.median(ppo)):,.0f}.")
    lines.append("")
    ns = sorted({c["n"] for c in cells.values()})
    over = f"{ns[0]} seeds" if len(ns) == 1 else f"{'/'.join(map(str, ns))} seeds (see found/seeds)"
    lines.append(f"Median steps to the first attributed detection over {over} "
                 f"(median wall seconds of the found runs), found/seeds; budget "
                 f"{budget:,} steps per run; not-found runs count as the budget in the medians "
                 f"and geometric means. No reachability prefixes: every env is the default "
                 f"workload and catalogue on the flaw's base.")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], flaws: list[str], agents: list[str], budget: int,
         path: Path) -> None:
    """Detection curves: fraction of seeds that found the flaw vs steps, per agent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cowenv.kernel.config import FLAW_ORIGINS

    flaws = sorted(flaws, key=lambda x: FLAW_ORIGINS[x] != "v4")  # grouped by origin
    n = len(flaws) + 1
    cols = 4
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    xs = np.geomspace(1, budget, 200)
    colors = {"random": "tab:gray", "pct": "tab:blue", "ql": "tab:green", "greybox": "tab:purple"}
    for i, f in enumerate([*flaws, "all flaws"]):
        ax = axes[i // cols][i % cols]
        for a in agents:
            rs = [r for r in runs if r["agent"] == a and (f == "all flaws" or r["flaw"] == f)]
            if not rs:
                continue
            hits = np.array([r["steps"] if r["found"] else np.inf for r in rs])
            ys = [(hits <= x).mean() for x in xs]
            ax.plot(xs, ys, label=a, color="tab:red" if a.startswith("ppo") else colors.get(a))
        ax.set_title(f if f == "all flaws" else f"{f} [{FLAW_ORIGINS[f]}]", fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xscale("log")
        ax.set_xlim(10, budget)
        ax.tick_params(labelsize=7)
        if i % cols == 0:
            ax.set_ylabel("fraction found", fontsize=8)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.supxlabel("env steps (log scale)", fontsize=9)
    fig.suptitle("cowenv bug-finding: detection curves per flaw (each flaw alone)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    from cowenv.kernel.config import FLAW_IDS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--budget", type=int, default=100_000,
                   help="steps per run (default 100000)")
    p.add_argument("--seeds", type=int, default=8, help="seeds per (flaw, agent) (default 8)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="the first run seed (default 0): seeds FIRST .. FIRST+SEEDS-1, to "
                        "confirm on fresh seeds a setting chosen on seeds 0-7")
    p.add_argument("--agents", default=",".join(DEFAULT_AGENTS),
                   help=f"comma-separated, of {', '.join(AGENTS)} (default "
                        f"{','.join(DEFAULT_AGENTS)}; ppo = one column per training seed)")
    p.add_argument("--flaws", default="all", help="comma-separated flaw ids (default all)")
    p.add_argument("--train-steps", type=int, default=200_000,
                   help="PPO training steps per held-out group (default 200000)")
    p.add_argument("--train-seeds", type=int, default=3,
                   help="PPO training seeds (one model per held-out group and seed; columns "
                        "ppo-t0, ppo-t1, ...) (default 3)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", default=None,
                   help="output folder (default benchmarks/out for a full run with the default "
                        "settings; any smaller run writes to a new temporary folder, so it "
                        "never overwrites the committed results)")
    p.add_argument("--merge", action="store_true",
                   help="keep the (agent, flaw) cells not run now from the existing "
                        "bug_finding.json in --out (same budget and seeds; runs are "
                        "deterministic); cells run now replace the old ones")
    p.add_argument("--combine", nargs="+", metavar="JSON", default=None,
                   help="run nothing: combine the runs of earlier bug_finding.json files "
                        "(same budget; each (agent, flaw) cell from the first file that "
                        "has it) into one table, written to --out")
    p.add_argument("--reuse-models", action="store_true",
                   help="use the models already in --model-dir (ppo-t<seed>-fold<k>.zip) "
                        "instead of training them again, e.g. to re-measure some flaws "
                        "after a kernel change with the same held-out models")
    p.add_argument("--model-dir", default=str(ROOT / "runs" / "bench"),
                   help="where PPO models, TensorBoard logs and checkpoints go")
    a = p.parse_args(argv)
    agents = [x for x in a.agents.split(",") if x]
    for x in agents:
        if x not in AGENTS:
            p.error(f"--agents: unknown agent {x!r}")
    if a.train_seeds < 1:
        p.error("--train-seeds: expected >= 1")
    if a.first_seed < 0:
        p.error("--first-seed: expected >= 0")
    ppo_cols = [f"ppo-t{j}" for j in range(a.train_seeds)]
    if "ppo" in agents:
        i = agents.index("ppo")
        agents[i:i + 1] = ppo_cols
    flaws = list(FLAW_IDS) if a.flaws == "all" else [x for x in a.flaws.split(",") if x]
    missing = [f for f in flaws if not (ROOT / "scenarios" / "flaws" / f"{f}.yaml").exists()]
    if missing:
        p.error(f"no scenario for flaw(s) {', '.join(missing)}")
    t_start = time.perf_counter()
    if a.combine:
        return _combine(a, p)
    targets = {f: flaw_signatures(f) for f in flaws}
    fidx = {f: FLAW_IDS.index(f) for f in flaws}
    folds = {k: [f for f in FLAW_IDS if FLAW_IDS.index(f) % FOLDS == k] for k in range(FOLDS)}
    ctx = get_context("spawn")
    # The jobs are the parallelism: one BLAS/OpenMP thread per worker (PPO's numpy actor
    # and torch training would otherwise each start a thread per core).
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    runs: list[dict[str, Any]] = []
    trainings: list[dict[str, Any]] = []
    pending: dict[Future, tuple[str, Any]] = {}
    reused: dict[tuple[int, str], str] = {}  # --reuse-models: (fold, column) -> model
    # --merge reads the old results now: partial writes below go to the same file.
    merge_from = Path(a.out or OUT) / "bug_finding.json"
    old = json.loads(merge_from.read_text()) if a.merge and merge_from.exists() else None
    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=ctx) as pool:
        for j, col in enumerate(c for c in agents if c.startswith("ppo-t")):
            for k in range(FOLDS):
                test = [f for f in folds[k] if f in flaws]
                if not test:
                    continue
                train = [f for f in FLAW_IDS if f not in folds[k]]
                saved = Path(a.model_dir) / f"ppo-t{j}-fold{k}.zip"
                if a.reuse_models and saved.exists():
                    reused[(k, col)] = str(saved)
                    continue
                fut = pool.submit(train_fold, k, train, a.train_steps, 1000 + k + 100 * j,
                                  a.model_dir, f"-t{j}")
                pending[fut] = ("train", (k, col))
        # Seed-major order (every flaw and agent at seed 0, then seed 1, ...), so that a run
        # cut short still has every cell at the first seeds (see the partial writes below).
        for s in range(a.first_seed, a.first_seed + a.seeds):
            for f in flaws:
                for ag in agents:
                    if ag.startswith("ppo-t"):
                        continue
                    fut = pool.submit(run_one, f, fidx[f], ag, s, a.budget, targets[f], None)
                    pending[fut] = ("run", (f, ag, s))
        n_train = sum(kind == "train" for kind, _ in pending.values()) + len(reused)
        models: dict[tuple[int, str], str] = dict(reused)
        for (fk, col), path in sorted(reused.items()):
            trainings.append({"fold": fk, "tag": col[3:], "model": path, "reused": True})
            print(f"reusing PPO {col} fold {fk}: {path}", file=sys.stderr)

        def measure_models() -> None:
            # Every model is trained: measure them seed-major, training seeds
            # interleaved, so a cut run reports every training seed alike.
            for s in range(a.first_seed, a.first_seed + a.seeds):
                for f in flaws:
                    for c in (c for c in agents if c.startswith("ppo-t")):
                        nf = pool.submit(run_one, f, fidx[f], c, s, a.budget,
                                         targets[f], models[(fidx[f] % FOLDS, c)])
                        pending[nf] = ("run", (f, c, s))

        if reused and len(models) == n_train:
            measure_models()
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                kind, key = pending.pop(fut)
                r = fut.result()
                if kind == "train":
                    trainings.append(r)
                    fk, col = key
                    models[(fk, col)] = r["model"]
                    print(f"trained PPO {col} fold {fk} in {r['seconds']:.0f}s "
                          f"(held out: {', '.join(folds[fk])})", file=sys.stderr)
                    if len(models) == n_train:
                        measure_models()
                else:
                    runs.append(r)
                    res = f"step {r['steps']:,}" if r["found"] else "not found"
                    print(f"{r['flaw']:32s} {r['agent']:6s} seed {r['seed']}: {res} "
                          f"({r['run_seconds']:.1f}s)", file=sys.stderr)
                    if a.out is not None:
                        # Partial results after every run (json and md, no plot), marked
                        # ``complete: false``: a run stopped early keeps what it measured.
                        _write(a, p, list(runs), flaws, list(agents), list(trainings),
                               targets, folds, t_start, final=False)
    if old is not None and old["budget"] == a.budget:
        # Keep every (agent, flaw) cell not measured now; a cell measured now replaces
        # the old one (runs are deterministic, so only a code change makes them differ).
        now = {(r["agent"], r["flaw"]) for r in runs}
        runs += [r for r in old["runs"] if (r["agent"], r["flaw"]) not in now]
        trainings = old.get("trainings", []) + trainings
        agents = old["agents"] + [x for x in agents if x not in old["agents"]]
        flaws = [f for f in FLAW_IDS if f in set(old["flaws"]) | set(flaws)]
        targets = {**old.get("flaw_signatures", {}), **targets}
    return _write(a, p, runs, flaws, agents, trainings, targets, folds, t_start)


def _combine(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    """``--combine``: one table from the runs of several result files."""
    from cowenv.kernel.config import FLAW_IDS

    runs: list[dict[str, Any]] = []
    agents: list[str] = []
    trainings: list[dict[str, Any]] = []
    targets: dict[str, list[str]] = {}
    folds: dict[str, Any] = {}
    budget = None
    for path in a.combine:
        try:
            d = json.loads(Path(path).read_text())
            b = int(d["budget"])
            file_runs = list(d["runs"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            p.error(f"--combine: {path}: not a bug_finding.json ({e})")
        if budget is not None and b != budget:
            p.error(f"--combine: {path}: budget {b}, expected {budget} (the first file's)")
        budget = b
        agents += [x for x in d.get("agents", []) if x not in agents]
        # A run is (agent, flaw, seed): files of other seed blocks add their runs.
        have = {(r["agent"], r["flaw"], r["seed"]) for r in runs}
        runs += [r for r in file_runs if (r["agent"], r["flaw"], r["seed"]) not in have]
        trainings += d.get("trainings", [])
        targets = {**d.get("flaw_signatures", {}), **targets}
        folds = folds or d.get("folds", {})
    assert budget is not None
    a.budget = budget
    present = {r["flaw"] for r in runs}
    flaws = [f for f in FLAW_IDS if f in present]
    if a.out is None:
        a.out = tempfile.mkdtemp(prefix="cowenv-bug-finding-")
    return _write(a, p, runs, flaws, agents, trainings, targets, folds, time.perf_counter(),
                  combined=list(a.combine))


def _write(a: argparse.Namespace, p: argparse.ArgumentParser, runs: list[dict[str, Any]],
           flaws: list[str], agents: list[str], trainings: list[dict[str, Any]],
           targets: dict[str, list[str]], folds: dict[Any, Any], t_start: float,
           combined: list[str] | None = None, final: bool = True) -> int:
    """Summarise ``runs`` and write ``bug_finding.{json,md,png}`` to ``a.out``.

    With ``final=False`` (the partial writes during a run) only the json and md are
    written, the json says ``"complete": false``, and nothing is printed.
    """
    runs.sort(key=lambda r: (flaws.index(r["flaw"]), agents.index(r["agent"]), r["seed"]))
    summary = summarise(runs, flaws, agents, a.budget)
    if a.out is None:
        full = all(getattr(a, k) == p.get_default(k) for k in
                   ("budget", "seeds", "first_seed", "agents", "flaws", "train_steps",
                    "train_seeds"))
        a.out = str(OUT) if full else tempfile.mkdtemp(prefix="cowenv-bug-finding-")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(summary, flaws, agents, a.budget, a.seeds) + stage_table(runs, flaws, agents)
    if not final:
        md = (f"**Partial** ({len(runs)} runs so far; the run is still going or was "
              f"stopped).\n\n" + md)
    result = {"budget": a.budget, "seeds": a.seeds, "first_seed": a.first_seed,
              "agents": agents, "flaws": flaws,
              "seeds_per_agent": {ag: len({r["seed"] for r in runs if r["agent"] == ag})
                                  for ag in agents},
              "base_env": BASE_ENV, "bases": {f: flaw_base(f) for f in flaws},
              "flaw_signatures": targets, "folds": folds, "trainings": trainings,
              "summary": summary, "runs": runs,
              "wall_seconds": round(time.perf_counter() - t_start, 1),
              "commit": _commit(),
              "cpus": os.cpu_count(), "jobs": a.jobs, "combined_from": combined,
              "complete": final}
    for name, text in (("bug_finding.json", json.dumps(result, indent=1, sort_keys=True) + "\n"),
                       ("bug_finding.md", md)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    if not final:
        return 0
    plot(runs, flaws, agents, a.budget, out / "bug_finding.png")
    if a.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(md)
        print(f"wall time {result['wall_seconds']:.0f}s; wrote {out}/bug_finding.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
