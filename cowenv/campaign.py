"""Fuzzing campaigns: ``cowenv fuzz`` and ``cowenv train``.

A campaign runs one agent (``random``, ``pct``, ``ql`` or ``ppo``, from the
``cowenv_agents`` package, imported only here and only when a campaign runs) in ``N``
worker processes (``multiprocessing``, *spawn* context) against ``cowenv/CowPte-v0``; with
``--backend ray`` the same workers run as Ray actors (:mod:`cowenv.ray_backend`, behind
the seam :class:`LocalBackend`), with the same results.

Determinism: worker ``w`` plays episode ``e`` with the generator of
``SeedSequence([seed, w, e])`` (:func:`cowenv_agents.episode_rng`) and gets a fixed share
of the step budget (``budget // N``, the first ``budget % N`` workers one more), so a
worker's episodes, and the signatures it finds at which of its steps, depend only on
``(seed, w, agent, env settings, budget)``. The wall clock is used for reporting (the
progress bar, "seconds to first finding") and for *when* checkpoints are written, never
for a decision.

Findings: the first time a worker sees a violation signature (``kind@site``; simulator
defects included) it sends the episode's schedule so far (``env.get_schedule``, with the
expectation set to that violation) to the main process, which files it at once in
``DIR/<signature>.yaml`` (atomic write, :class:`cowenv.findings.FindingStore`) unless the
signature is already known. A separate process then minimises it
(:func:`cowenv.minimize.minimize`), checks that the result replays
(:func:`cowenv.replay.replay`) and atomically replaces the file, so the progress bar keeps
moving while schedules shrink. Every file replays with ``cowenv replay FILE``.

Resume: ``DIR/campaign.json`` (atomic) records the campaign settings, steps and episodes
done per worker, and where and when each signature was first found. Each worker writes
its own checkpoint ``DIR/.campaign/worker-<w>.json`` (atomic) at episode boundaries:
episodes and steps done, the agent's cross-episode state (the Q-table of ``ql``) and the
signatures it has reported. Running ``cowenv fuzz --out DIR`` again with the same settings
continues every worker from its last checkpoint (episodes are replayed exactly from
there), keeps the findings already in ``DIR`` (they are not reported as new again) and
re-minimises any that were interrupted mid-minimisation. A larger ``--budget`` extends a
finished campaign; a smaller one is refused.

Safety: a campaign holds ``flock`` on ``DIR/.lock`` (:class:`CampaignLock`, its pid written
in the file), so a second campaign on the same folder exits 2 naming that pid. Workers and
the minimiser call :func:`die_with_parent` (``PR_SET_PDEATHSIG``) first, so they die with
the main process even when it is SIGKILLed; :func:`campaign_status` then reports the
``running`` left in ``campaign.json`` as ``interrupted``, and so does the next start.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text

STATE_NAME = "campaign.json"
LOCK_NAME = ".lock"
CHECKPOINT_DIR = ".campaign"
STATE_VERSION = 1
#: Seconds between worker checkpoints (when, not what: results do not depend on it).
CHECKPOINT_SECONDS = 3.0
#: Re-reports of known signatures in new contexts per worker (cause-search candidates).
MAX_REHITS = 1000
AGENT_CHOICES = ("random", "pct", "ql", "ppo", "greybox")
#: Caps on campaign flags (checked before anything is created).
MAX_BUDGET = 10**12
MAX_WORKERS = 256
MAX_EPISODE_STEPS = 1_000_000
MAX_TRAIN_STEPS = 10**9
MAX_SEED = 2**63 - 1


class CampaignError(Exception):
    """A campaign cannot run as asked (one line; the CLI exits 2)."""


# ----------------------------------------------------------------------------- helpers
def worker_budget(budget: int, workers: int, w: int) -> int:
    """Return the steps of ``budget`` that worker ``w`` of ``workers`` runs."""
    return budget // workers + (1 if w < budget % workers else 0)


@dataclass
class CampaignConfig:
    """What a campaign is (everything but ``budget`` must match to resume one).

    Attributes:
        agent: Agent name.
        seed: Campaign seed.
        workers: Number of worker processes.
        budget: Total env steps over all workers.
        env_kwargs: Keyword arguments of ``cowenv/CowPte-v0``.
        agent_kwargs: Keyword arguments of the agent.
        model: Saved PPO model (``ppo`` only).
        teardown: The last actions of every episode are the harness's teardown (every
            operation finished, every thread exited: exit-time checks run), see
            :class:`cowenv_agents.Teardown`; 0 = none.
        minimise: Minimise findings before keeping them.
        minimise_seconds: CPU seconds of search per finding for the minimiser (0 = no
            limit); past them the smallest schedule verified so far is kept.
        cause_seconds: CPU seconds (summed over the minimiser processes) of the cause
            search at the end of a campaign with several flaws on (0 = none; see
            :func:`cause_flaws`).

    """

    agent: str = "random"
    seed: int = 0
    workers: int = 2
    budget: int = 100_000
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    agent_kwargs: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    teardown: int = 32
    minimise: bool = True
    minimise_seconds: float = 20.0
    cause_seconds: float = 30.0

    def identity(self) -> dict[str, Any]:
        """Return the settings a resumed campaign must share."""
        d = asdict(self)
        for k in ("budget", "minimise", "minimise_seconds", "cause_seconds"):
            d.pop(k)
        return json.loads(json.dumps(d, sort_keys=True))


def default_env_kwargs() -> dict[str, Any]:
    """Return the campaign's env settings: the env's defaults, but episodes go on.

    With ``as-posted``, the lockdep splat of the first COW break would otherwise end
    every episode before any deeper flaw could show.
    """
    return {"terminate_on_violation": False}


# ----------------------------------------------------------------------------- worker
def _checkpoint_path(out: Path, w: int) -> Path:
    return out / CHECKPOINT_DIR / f"worker-{w}.json"


def _parent_alive() -> bool:
    p = mp.parent_process()
    return p is None or p.is_alive()


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Make this child process die with its parent, even if the parent is SIGKILLed.

    ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (Linux, through ctypes) asks the kernel to kill
    this process when the thread that created it exits; then, in case the parent died
    before the call, a parent-alive check exits at once. Elsewhere only the check runs
    (workers and the minimiser also poll :func:`_parent_alive`).
    """
    import ctypes

    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no libc prctl
            pass
    parent = mp.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(0)  # already orphaned: the parent died before prctl


class CampaignLock:
    """An OS lock on a campaign folder: ``flock`` on ``DIR/.lock``, holder's pid inside.

    The lock is released by the kernel when the holder exits, however it exits (SIGKILL
    included), so a stale lock file never blocks a later campaign; the pid in it only
    serves the error message.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting.

        Raises:
            CampaignError: another live process holds it (naming its pid).
            OSError: the lock file cannot be created.
        """
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise CampaignError(
                f"--out: {self.path.parent} is in use by another campaign (pid {holder}); "
                f"wait for it to end or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a new holder)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def lock_holder(folder: str | Path) -> int | None:
    """Return the pid of the live process holding ``folder``'s campaign lock, or None."""
    import fcntl

    p = Path(folder) / LOCK_NAME
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            txt = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(txt) if txt.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def campaign_status(folder: str | Path) -> str | None:
    """The true status of the campaign in ``folder`` (None if there is none).

    ``campaign.json`` says ``running`` from the start of a session until it ends; a
    session that was killed (SIGKILL, power loss) never rewrites it. So ``running`` is
    believed only while a live process holds the folder's lock; otherwise the campaign
    was ``interrupted``.
    """
    p = Path(folder) / STATE_NAME
    try:
        st = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    status = st.get("status") if isinstance(st, dict) else None
    if status == "running" and lock_holder(folder) is None:
        return "interrupted"
    return status


def worker_main(cfg: dict[str, Any], w: int, out: str, q: Any, stop: Any,
                known: list[str]) -> None:
    """Body of worker process ``w`` (spawn entry point; see the module docstring).

    Messages put on ``q``: ``("progress", w, steps, episodes)``, ``("finding", w, sig,
    schedule, worker_step, episode)``, ``("rehit", w, sig, schedule, context)`` (a known
    signature met in a new context, :func:`violation_context`; candidates of the cause
    search), ``("checkpoint", w, steps, episodes)``, ``("done", w, steps, episodes)``,
    ``("error", w, text)``.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop
    die_with_parent()
    try:
        _worker_loop(CampaignConfig(**cfg), w, Path(out), q, stop, set(known))
    except BaseException:  # report everything, including a bad model or env setting
        q.put(("error", w, traceback.format_exc()))


def _worker_loop(cfg: CampaignConfig, w: int, out: Path, q: Any, stop: Any,
                 known: set[str]) -> None:
    import cowenv_agents as ca

    env = episode_host(cfg)
    agent = ca.make_agent(cfg.agent, model=cfg.model, **cfg.agent_kwargs)
    if hasattr(agent, "attach_campaign"):  # greybox: corpus shared through OUT/greybox
        agent.attach_campaign(out, w, cfg.workers)
    budget = worker_budget(cfg.budget, cfg.workers, w)
    steps = episodes = 0
    reported: set[str] = set()
    contexts: set[tuple[str, str]] = set()  # (signature, context) re-reported
    rehits = bool(cfg.cause_seconds) and len(env.config.flaws) >= 2
    ck = _checkpoint_path(out, w)
    if ck.exists():
        st = json.loads(ck.read_text())
        steps, episodes = int(st["steps"]), int(st["episodes"])
        reported = set(st.get("reported", []))
        agent.load_state_dict(st.get("agent_state", {}))

    def checkpoint() -> None:
        atomic_write_text(ck, json.dumps({
            "worker": w, "seed": [cfg.seed, w], "steps": steps, "episodes": episodes,
            "reported": sorted(reported), "agent_state": agent.state_dict()}) + "\n")
        q.put(("checkpoint", w, steps, episodes))

    last_ck = time.monotonic()
    while steps < budget and not stop.is_set():
        rng, reset_seed = ca.episode_rng(cfg.seed, w, episodes)
        base = steps

        def on_violation(i: int, v: dict[str, Any], base: int = base,
                         ep: int = episodes) -> bool:
            sig = v["signature"]
            if sig in reported or sig in known:
                reported.add(sig)
                if rehits:
                    key = (sig, violation_context(env))
                    if key not in contexts and len(contexts) < MAX_REHITS:
                        contexts.add(key)
                        q.put(("rehit", w, sig, finding_data(env, cfg, w, ep, base + i, v),
                               key[1]))
                return False
            reported.add(sig)
            q.put(("finding", w, sig, finding_data(env, cfg, w, ep, base + i, v), base + i, ep))
            return False

        res = ca.run_episode(env, agent, rng, reset_seed, max_actions=budget - steps,
                             on_violation=on_violation, teardown=cfg.teardown)
        # Steps an agent executed outside the env (greybox's systematic windows) count
        # against the budget like env steps.
        steps += res.steps + res.offline_steps
        episodes += 1
        q.put(("progress", w, steps, episodes))
        now = time.monotonic()
        if now - last_ck >= CHECKPOINT_SECONDS:
            checkpoint()
            last_ck = now
        if not _parent_alive():
            q.cancel_join_thread()  # nobody reads the queue any more: do not hang at exit
            return
    checkpoint()
    q.put(("done", w, steps, episodes))


def violation_context(env: Any, depth: int = 2) -> str:
    """The context of a violation for the cause search: the last operations started.

    The same oracle failing after different operations is a candidate for another root
    cause (syzkaller's crash titles name the function for the same reason); a worker
    re-reports a known signature once per context (:data:`MAX_REHITS` in all). The
    context is the names of the last ``depth`` operations started in the episode, oldest
    first (``madvise>fork``).
    """
    h = getattr(env, "harness", env)
    cat = h.catalogue
    ops: list[str] = []
    for a in reversed(h.actions):
        sp = cat[a] if 0 <= a < len(cat) else None
        if sp is not None and sp.kind == "start":
            ops.append(sp.op)
            if len(ops) == depth:
                break
    return ">".join(reversed(ops))


def episode_host(cfg: CampaignConfig) -> Any:
    """What a worker plays its episodes on.

    The Gymnasium env (:class:`cowenv.env.CowEnv`) for agents that read observations,
    the :class:`cowenv.harness.Harness` for the rest: the same episodes, rewards and
    findings without the cost of encoding observations.
    """
    import cowenv_agents as ca

    if ca.needs_observation(cfg.agent):
        from .env import CowEnv

        return CowEnv(**cfg.env_kwargs)
    from .harness import Harness

    return Harness(**cfg.env_kwargs)


def finding_data(env: Any, cfg: CampaignConfig, w: int, episode: int, worker_step: int,
                 v: dict[str, Any]) -> dict[str, Any]:
    """The scenario a worker reports for violation ``v``: the episode's schedule so far.

    Args:
        env: The worker's env, at the step that reported ``v``.
        cfg: The campaign settings.
        w: The worker.
        episode: The worker's episode number.
        worker_step: The worker's step count at the violation.
        v: The violation (``kind``, ``site``, ``step``, ``message``, ...).

    Returns:
        Scenario data (``env.get_schedule``) expecting ``v``.

    """
    data = env.get_schedule(name=f"{cfg.agent}-seed{cfg.seed}-w{w}-e{episode}")
    data["description"] = (
        f"Found by `cowenv fuzz --agent {cfg.agent}` (seed {cfg.seed}, worker {w}, "
        f"episode {episode}, worker step {worker_step}): {v.get('message', '')}").strip()
    data["expect"] = {"violation": {"kind": v["kind"], "site": v["site"],
                                    "step": int(v["step"])}}
    return data


# ----------------------------------------------------------------------------- backends
class LocalBackend:
    """Where a campaign runs its workers and minimiser: processes on this machine.

    :func:`run_campaign` talks to workers through this small seam: :meth:`queue` and
    :meth:`event` make the message queue and stop flag, :meth:`worker` and
    :meth:`minimiser` make unstarted process-like handles (``start``, ``is_alive``,
    ``exitcode``, ``pid``, ``join``, ``terminate``) that speak the message protocol of
    :func:`worker_main` and :func:`minimiser_main`. :class:`cowenv.ray_backend.RayBackend`
    is the other implementation.
    """

    name = "local"

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")

    def queue(self) -> Any:
        """A queue the workers and the minimiser can put on."""
        return self.ctx.Queue()

    def event(self) -> Any:
        """The stop flag the workers watch."""
        return self.ctx.Event()

    def worker(self, cfg: dict[str, Any], w: int, out: str, q: Any, stop: Any,
               known: list[str]) -> Any:
        """An unstarted worker ``w`` (arguments of :func:`worker_main`)."""
        return self.ctx.Process(target=worker_main, daemon=True, name=f"cowenv-fuzz-{w}",
                                args=(cfg, w, out, q, stop, known))

    def minimiser(self, tasks: Any, results: Any) -> Any:
        """An unstarted minimiser (arguments of :func:`minimiser_main`)."""
        return self.ctx.Process(target=minimiser_main, args=(tasks, results), daemon=True,
                                name="cowenv-minimise")


# ----------------------------------------------------------------------------- minimiser
def minimiser_main(tasks: Any, results: Any) -> None:
    """Body of a minimiser process: tasks in, results out (:func:`run_task`).

    Tasks: ``(path, signature, seconds)`` -> :func:`minimise_finding`;
    ``("cause", key, data, signature, flaws)`` -> ``("cause", key, cause_flaws(...),
    cpu_seconds)``.

    Ends on a ``None`` task, or when the main process has gone (``PR_SET_PDEATHSIG``, and
    checked every 0.5 s).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    while True:
        try:
            task = tasks.get(timeout=0.5)
        except queue_mod.Empty:
            if not _parent_alive():
                results.cancel_join_thread()
                return
            continue
        if task is None:
            return
        results.put(run_task(task))


def run_task(task: tuple[Any, ...]) -> tuple[Any, ...]:
    """One minimiser task (see :func:`minimiser_main`)."""
    if task[0] == "cause":
        _, key, data, sig, flaws = task
        t0 = time.process_time()
        found = confirm_flaws(data, sig, flaws)
        return ("cause", key, found, time.process_time() - t0)
    return minimise_finding(*task)


def cause_flaws(data: dict[str, Any], signature: str, flaws: list[str]) -> list[str]:
    """Which of ``flaws``, each switched on alone, make schedule ``data`` show ``signature``.

    The cause search: a signature is filed once, by its first schedule, and attributed
    (:func:`attribute_flaws`) on that schedule; another flaw that reaches the same
    oracle (``isolation@shadow_sweep`` is the harm of several) stays hidden behind it.
    Schedules of the signature met later in other contexts are tried with each flaw
    not demonstrated yet; a flaw that alone shows the signature, while ``fixed`` does
    not, is a further cause. Returns those flaws (in the order given).
    """
    from .scenario import parse_scenario

    try:
        sc = parse_scenario(data)
    except Exception:  # a schedule the worker recorded always parses; never fail on it
        return []
    out = [f for f in flaws if _shows(sc, signature, [f])]
    if out and _shows(sc, signature, []):
        return []
    return out


#: Violation kinds the cause search never attributes to a flaw (:func:`confirm_flaws`).
_NOT_HARM = ("simulator", "selftest")


def _harms(sc: Any, flaws: list[str]) -> set[str]:
    """Signatures ``sc``'s schedule shows with only ``flaws`` on (none: ``fixed``).

    Run leniently to the end (:func:`cowenv.minimize.run_lenient`); simulator defects and
    scenario self-checks are left out.
    """
    from .minimize import run_lenient
    from .scenario import override_config

    c = (override_config(sc.config, "cowpte", flaws) if flaws
         else override_config(sc.config, "fixed", None))
    run = run_lenient(c, sc.steps)
    return {s for s in run.kernel.signatures if s.split("@", 1)[0] not in _NOT_HARM}


def confirm_flaws(data: dict[str, Any], signature: str, flaws: list[str]
                  ) -> list[tuple[str, str, list[dict[str, Any]] | None, str]]:
    """The cause search's confirm runs: which of ``flaws`` schedule ``data`` shows.

    :func:`cause_flaws` asks whether a flaw alone shows the schedule's own ``signature``.
    In a campaign with several flaws on, two more cases hide a flaw:

    * *masked*: its violation never fires there because another flaw's runs first
      (lockdep reports one splat and turns itself off, as the kernel's
      ``debug_locks_off`` does, so ``fork-ptl-nesting``'s splat at the first fork hides
      ``ptl-recursive-nesting``'s at the first COW break);
    * *needed with the others*: the schedule was played with every flaw on, and with
      one alone it takes another course (another flaw's path made a fork wait, an
      allocation fail), so the flaw alone shows nothing there, yet it is what the
      violation needs.

    So each flaw ``f`` of ``flaws`` is tried three ways, the first that holds counts
    (``how``):

    1. ``alone``: ``f`` alone, run to the end, shows ``signature``, and ``fixed`` does not;
    2. ``masked``: ``f`` alone shows another violation (not a simulator defect) that
       ``fixed`` does not (one of its known harms, :func:`flaw_harms`, if it shows one;
       else the first in sorted order);
    3. ``leave-one-out``: ``signature`` is one of ``f``'s known harms
       (:func:`flaw_harms`), with the schedule's own flaws (as recorded) the schedule
       shows it, with the same flaws but ``f`` it does not, and ``fixed`` does not: the
       violation goes away with ``f`` off. (Without the first condition any flaw that
       changes the course of the schedule would count: turning off ``rmap-stale-table``
       made one schedule's ``lock-discipline@handle_cow_pte_fault``, the
       ``fault-asserts-write-lock`` assertion, go away.)

    Returns:
        ``(flaw, signature shown, steps, how)`` per cause, in the order of ``flaws``;
        ``steps`` are the steps that took effect in the flaw-alone run (the schedule
        to file, with that flaw alone) for ``masked``, else None (the recorded
        schedule replays as it is).

    """
    from .minimize import run_lenient
    from .scenario import override_config, parse_scenario

    try:
        sc = parse_scenario(data)
    except Exception:  # a schedule the worker recorded always parses; never fail on it
        return []
    base = _harms(sc, [])
    own = list(sc.config.flaws) if sc.config.variant == "cowpte" else []
    with_all: bool | None = None
    out: list[tuple[str, str, list[dict[str, Any]] | None, str]] = []
    for f in flaws:
        sigs = _harms(sc, [f]) - base
        if signature in sigs:
            out.append((f, signature, None, "alone"))
        elif sigs:
            other = min(sigs, key=lambda x: (x not in flaw_harms(f), x))
            c = override_config(sc.config, "cowpte", [f])
            out.append((f, other, run_lenient(c, sc.steps, stop_on={other}).effective,
                        "masked"))
        elif f in own and len(own) > 1 and signature not in base \
                and signature in flaw_harms(f):
            if with_all is None:
                with_all = _shows(sc, signature, own)
            if with_all and not _shows(sc, signature, [x for x in own if x != f]):
                out.append((f, signature, None, "leave-one-out"))
    return out


_HARMS: dict[str, frozenset[str]] = {}


def flaw_scenarios(flaw: str) -> list[Path]:
    """Every scenario of the repository's ``scenarios/`` configured with exactly ``flaw``.

    ``scenarios/flaws/<flaw>.yaml`` and any other file whose config is variant ``cowpte``
    with this flaw and no other (e.g. ``scenarios/tlb/``'s stale-PSC scenario of
    ``table-free-no-deferral``), sorted by path; a file that does not load is left out.
    Empty when the scenarios are not there (an installed package without the repository).
    """
    from .scenario import load_scenario

    root = Path(__file__).resolve().parent.parent / "scenarios"
    out: list[Path] = []
    for path in sorted(root.rglob("*.yaml")) if root.is_dir() else []:
        try:
            sc = load_scenario(path)
        except Exception:  # a scenario that does not load says nothing here
            continue
        if sc.config.variant == "cowpte" and list(sc.config.flaws) == [flaw]:
            out.append(path)
    return out


def flaw_harms(flaw: str) -> frozenset[str]:
    """The violations ``flaw`` is known to cause: what its scenarios show with it alone.

    Every scenario of :func:`flaw_scenarios` is run with the flaw alone and on ``fixed``;
    the signatures of the first run that the second lacks (simulator defects and
    scenario self-checks left out), as the bug-finding benchmark's targets. Cached per
    process; empty when the scenarios are not there.
    """
    if flaw in _HARMS:
        return _HARMS[flaw]
    from .scenario import load_scenario, run_scenario

    out: set[str] = set()
    for path in flaw_scenarios(flaw):
        try:
            sc = load_scenario(path)
            on = run_scenario(sc, "cowpte", [flaw])
            off = run_scenario(sc, "fixed")
        except Exception:  # a scenario that does not run says nothing here
            continue
        bad = {v.signature for v in off.violations}
        out |= {v.signature for v in on.violations
                if v.kind not in _NOT_HARM and v.signature not in bad}
    _HARMS[flaw] = frozenset(out)
    return _HARMS[flaw]


def _shows(sc: Any, signature: str, flaws: list[str]) -> bool:
    """Whether ``sc``'s schedule shows ``signature`` with only ``flaws`` on (none: ``fixed``).

    Run leniently (:func:`cowenv.minimize.run_lenient`), stopping at the signature.
    """
    from .minimize import run_lenient
    from .scenario import override_config

    c = (override_config(sc.config, "cowpte", flaws) if flaws
         else override_config(sc.config, "fixed", None))
    return signature in run_lenient(c, sc.steps, stop_on={signature}).kernel.signatures


def attribute_flaws(sc: Any, signature: str) -> list[str] | None:
    """Which flaws of ``sc``'s configuration, each switched on alone, reproduce ``signature``.

    The schedule is run leniently (:func:`cowenv.minimize.run_lenient`) once per flaw with
    only that flaw on, and once on ``fixed``. Returns the flaws that show the signature
    (``[]``: none alone does, a combination is needed), ``["fixed"]`` when the fixed
    variant shows it too (not a flaw: a simulator or upstream problem), or None when the
    configuration has no flaws to attribute to.
    """
    cfg = sc.config
    if cfg.variant != "cowpte" or not cfg.flaws:
        return None
    if _shows(sc, signature, []):
        return ["fixed"]
    return [f for f in cfg.flaws if _shows(sc, signature, [f])]


def minimise_finding(path: str, signature: str, seconds: float = 0.0
                     ) -> tuple[str, dict[str, Any] | None, str, list[str] | None]:
    """Minimise the schedule in ``path`` for ``signature`` (runs in a minimiser process).

    ``seconds`` caps the minimiser's search (0 = none; :func:`cowenv.minimize.minimize`).

    Returns:
        ``(signature, minimised data or None, note, flaws)``: data is None when
        minimisation failed or its result does not replay (the note says why); ``flaws``
        is :func:`attribute_flaws` of the schedule kept.

    """
    from .minimize import NotReproducible, minimize
    from .replay import replay
    from .scenario import load_scenario, parse_scenario

    data: dict[str, Any] | None = None
    try:
        sc = load_scenario(path)
    except Exception as e:  # the raw file is unreadable: nothing to do
        return signature, None, f"{type(e).__name__}: {e}", None
    try:
        res = minimize(sc, [signature], time_limit=seconds or None)
        rep = replay(parse_scenario(res.data, path))
        if rep.reproduced:
            data, note = res.data, f"{res.original_len} -> {res.minimal_len} steps"
            if not res.complete:
                note += f" (stopped at the {seconds:g} s limit)"
        else:
            note = f"minimised schedule does not replay: {rep.divergence}"
    except NotReproducible as e:
        note = f"not reproducible: {e}"
    except Exception as e:  # keep the raw schedule; say why
        note = f"{type(e).__name__}: {e}"
    try:
        flaws = attribute_flaws(parse_scenario(data, path) if data is not None else sc,
                                signature)
    except Exception:  # attribution is a courtesy; never lose the finding over it
        flaws = None
    return signature, data, note, flaws


# ----------------------------------------------------------------------------- campaign
@dataclass
class CampaignResult:
    """Outcome of :func:`run_campaign`.

    Attributes:
        out: The findings folder.
        steps: Env steps done over all workers.
        episodes: Episodes over all workers.
        findings: One row per signature, in discovery order (``signature``, ``file``,
            ``worker``, ``worker_step``, ``campaign_step``, ``seconds``, ``agent``,
            ``steps`` (schedule length), ``flaws`` (:func:`attribute_flaws`, after
            minimisation), ``minimised``, ``hits``, ``reports``: ``{worker: worker
            step}`` of each worker's first report of the signature in this folder; the
            first of these to reach the main process gives ``worker``/``worker_step``).
        interrupted: Stopped before the budget was spent.
        seconds: Wall time of the whole campaign (all sessions).
        errors: Worker errors (tracebacks).

    """

    out: str
    steps: int
    episodes: int
    findings: list[dict[str, Any]]
    interrupted: bool
    seconds: float
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


class _Display:
    """Live progress (rich) on a terminal, one line every few seconds otherwise."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self.total = total
        self.last_line = 0.0
        self.progress: Any = None
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]fuzz[/bold]"), BarColumn(), MofNCompleteColumn(),
                TextColumn("steps"), TextColumn("{task.fields[episodes]} episodes"),
                TextColumn("[green]{task.fields[findings]} findings[/green]"),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                TimeRemainingColumn(), console=self.console, transient=False)
            self.task = self.progress.add_task("fuzz", total=total, completed=done,
                                               episodes=0, findings=0, rate="")
            self.progress.start()

    def update(self, steps: int, episodes: int, findings: int, rate: float) -> None:
        if not self.enabled:
            return
        if self.live:
            self.progress.update(self.task, completed=steps, episodes=episodes,
                                 findings=findings, rate=f"{rate:,.0f} steps/s")
            return
        now = time.monotonic()
        if now - self.last_line >= 5.0:
            self.last_line = now
            self.console.print(f"fuzz: {steps:,}/{self.total:,} steps, {episodes:,} episodes, "
                               f"{findings} findings, {rate:,.0f} steps/s", highlight=False)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self.live:
            self.progress.stop()


def _load_state(out: Path) -> dict[str, Any] | None:
    p = out / STATE_NAME
    if not p.exists():
        return None
    try:
        st = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CampaignError(f"{p}: unreadable campaign state: {e}") from None
    if not isinstance(st, dict) or st.get("version") != STATE_VERSION:
        raise CampaignError(f"{p}: not a campaign state file of version {STATE_VERSION}")
    return st


def run_campaign(cfg: CampaignConfig, out: str | Path, *, show: bool = True,
                 backend: Any = None) -> CampaignResult:
    """Run (or resume) a campaign writing its findings to ``out``.

    Args:
        cfg: The campaign settings.
        out: Findings folder (created; resumed if it holds a campaign).
        show: Print progress and new findings on stderr.
        backend: Where workers and the minimiser run: :class:`LocalBackend` (default) or
            a :class:`cowenv.ray_backend.RayBackend` (connected). Results do not depend
            on it.

    Returns:
        The :class:`CampaignResult`; a KeyboardInterrupt (or SIGTERM) stops the workers,
        keeps everything found so far and returns with ``interrupted`` set.

    Raises:
        CampaignError: bad settings, or ``out`` holds a campaign with other settings.

    """
    if cfg.agent not in AGENT_CHOICES:
        raise CampaignError(f"--agent: expected one of {', '.join(AGENT_CHOICES)}")
    if not 1 <= cfg.workers <= MAX_WORKERS:
        raise CampaignError(f"--workers: expected 1 to {MAX_WORKERS}, got {cfg.workers}")
    if not 0 <= cfg.budget <= MAX_BUDGET:
        raise CampaignError(f"--budget: expected 0 to {MAX_BUDGET:.0e}, got {cfg.budget}")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise CampaignError(f"--seed: expected 0 to 2**63-1, got {cfg.seed}")
    if cfg.teardown < 0:
        raise CampaignError("--teardown: expected >= 0")
    _check_setup(cfg)
    outp = Path(out)
    lock = _lock_folder(outp)
    try:
        return _run_locked(cfg, outp, show, backend)
    finally:
        lock.release()


def _lock_folder(outp: Path) -> CampaignLock:
    """Create (if needed) and lock the campaign folder ``outp``.

    Raises:
        CampaignError: not a folder, cannot be created or written, or locked by a live
            campaign (one line naming ``--out`` and what was expected).
    """
    if outp.exists() and not outp.is_dir():
        raise CampaignError(f"--out: {outp} is a file (expected a folder: new, or holding a "
                            "campaign to resume)")
    try:
        outp.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CampaignError(f"--out: cannot create folder {outp} ({e.strerror or e}; "
                            "expected a writable place)") from None
    if not os.access(outp, os.W_OK | os.X_OK):
        raise CampaignError(f"--out: folder {outp} is not writable (expected a writable "
                            "folder)")
    lock = CampaignLock(outp)
    try:
        lock.acquire()
    except OSError as e:
        raise CampaignError(f"--out: cannot write in folder {outp} ({e.strerror or e}; "
                            "expected a writable folder)") from None
    return lock


def _run_locked(cfg: CampaignConfig, outp: Path, show: bool,
                backend: Any = None) -> CampaignResult:
    """:func:`run_campaign` once ``outp`` is locked."""
    from .findings import FindingStore
    from .harness import Harness

    prev = _load_state(outp)
    if prev is not None and prev.get("config") != cfg.identity():
        diff = sorted(k for k in set(prev.get("config", {})) | set(cfg.identity())
                      if prev.get("config", {}).get(k) != cfg.identity().get(k))
        raise CampaignError(f"{outp}: holds a campaign with other settings ({', '.join(diff)}); "
                            f"use another --out or the same settings to resume it")
    notes: list[str] = []
    if prev is not None:
        prev_budget = prev.get("budget")
        if isinstance(prev_budget, int) and cfg.budget < prev_budget:
            raise CampaignError(f"--budget: expected >= {prev_budget} (the campaign in {outp} "
                                f"has --budget {prev_budget}; a resumed campaign can only "
                                f"grow), got {cfg.budget}")
        if prev.get("status") == "running":  # we hold the lock: that session is dead
            notes.append(f"note: the previous session (pid {prev.get('pid', '?')}) was killed "
                         "while running; its campaign is resumed as interrupted")
            prev["status"] = "interrupted"
            atomic_write_text(outp / STATE_NAME, json.dumps(prev, indent=1, sort_keys=True)
                              + "\n")
    cpus = usable_cpus()  # every check passed: a warning now is not mixed with an error
    if cfg.workers > cpus:
        print(f"warning: --workers {cfg.workers} is more than the {cpus} CPU(s) this process "
              "may use; the workers share them (same results, no faster)", file=sys.stderr)
    store = FindingStore(outp, minimise=False)
    # campaign.json is written before index.json for each new finding (below), so a
    # session killed between the two leaves an entry here whose finding was never filed:
    # drop it (its worker resumes from an earlier checkpoint and reports it again).
    meta: dict[str, dict[str, Any]] = {
        s: m for s, m in (prev.get("findings", {}) if prev else {}).items() if s in store}
    elapsed0 = float(prev.get("elapsed", 0.0)) if prev else 0.0
    wsteps = [0] * cfg.workers
    weps = [0] * cfg.workers
    for w in range(cfg.workers):
        ck = _checkpoint_path(outp, w)
        if ck.exists():
            st = json.loads(ck.read_text())
            wsteps[w], weps[w] = int(st["steps"]), int(st["episodes"])
    t0 = time.monotonic()
    errors: list[str] = []

    def elapsed() -> float:
        return elapsed0 + time.monotonic() - t0

    def save_state(status: str) -> None:
        atomic_write_text(outp / STATE_NAME, json.dumps({
            "version": STATE_VERSION, "config": cfg.identity(), "budget": cfg.budget,
            "status": status, "pid": os.getpid(), "elapsed": round(elapsed(), 3),
            "workers": [{"worker": w, "seed": [cfg.seed, w],
                         "budget": worker_budget(cfg.budget, cfg.workers, w),
                         "steps": wsteps[w], "episodes": weps[w]} for w in range(cfg.workers)],
            "findings": meta}, indent=1, sort_keys=True) + "\n")

    save_state("running")
    display = _Display(show, cfg.budget, sum(wsteps))
    for n in notes:
        display.note(n)
    be = backend if backend is not None else LocalBackend()
    q = be.queue()
    stop = be.event()
    todo = [w for w in range(cfg.workers)
            if wsteps[w] < worker_budget(cfg.budget, cfg.workers, w)]
    procs = {w: be.worker(asdict(cfg), w, str(outp), q, stop, store.signatures) for w in todo}
    min_tasks: Any = None
    min_results: Any = None
    minimisers: list[Any] = []
    pending_min: list[str] = []
    pending_cause: dict[int, tuple[str, str, dict[str, Any]]] = {}
    cause_results: list[tuple[int, list[str], float]] = []
    # Cause-search candidates: (signature, context, schedule), first report per pair.
    rehits: dict[tuple[str, str], dict[str, Any]] = {}
    # The flaws the cause search tries (none without one).
    flaws_on = list(Harness(**cfg.env_kwargs).config.flaws) if cfg.cause_seconds else []
    cause_on = len(flaws_on) >= 2

    def start_minimisers(n: int) -> None:
        """Have ``n`` minimiser processes (one while the workers run, more after)."""
        nonlocal min_tasks, min_results
        if min_tasks is None:
            min_tasks, min_results = be.queue(), be.queue()
        while len(minimisers) < n:
            m = be.minimiser(min_tasks, min_results)
            m.start()
            minimisers.append(m)

    def submit(sig: str) -> None:
        if not cfg.minimise or sig in pending_min:
            return
        start_minimisers(1)
        pending_min.append(sig)
        min_tasks.put((str(store.path_for(sig)), sig, float(cfg.minimise_seconds)))

    def apply(sig: str, data: dict[str, Any] | None, note: str,
              flaws: list[str] | None = None) -> None:
        from .scenario import save_scenario

        if sig in pending_min:
            pending_min.remove(sig)
        f = store.findings[sig]
        if data is not None:
            save_scenario(data, store.path_for(sig))
            f["steps"], f["minimised"] = len(data["steps"]), True
        else:
            f["minimised"] = False
        meta.setdefault(sig, {})["minimise_note"] = note
        if flaws is not None:
            meta[sig]["flaws"] = flaws
        store.flush()

    def collect(block: bool, one: bool = False) -> None:
        """Apply minimiser results; ``one``: return after one cause result (or a wait)."""
        while pending_min or pending_cause:
            try:
                r = min_results.get(timeout=0.5 if block else 0.001)
            except queue_mod.Empty:
                if not block:
                    return
                if not any(m.is_alive() for m in minimisers):
                    for sig in list(pending_min):
                        apply(sig, None, "minimiser exited with code "
                                         f"{minimisers[0].exitcode if minimisers else None}")
                    pending_cause.clear()
                    return
                if one:
                    return  # the cause search polls
                continue
            if r[0] == "cause":
                if r[1] in pending_cause:
                    cause_results.append((r[1], r[2], float(r[3]) if len(r) > 3 else 0.0))
                    del pending_cause[r[1]]
                if one:
                    return
                continue
            apply(*r)

    for sig in store.signatures:
        if store.findings[sig].get("minimised") is not True and cfg.minimise:
            submit(sig)

    def record(msg: tuple[Any, ...]) -> bool:
        """File a worker's finding report; True when its signature is new.

        ``campaign.json`` is written before the finding's file and ``index.json``: killed
        at any point, ``index.json`` never lists a finding ``campaign.json`` lacks.
        """
        _, w, sig, data, wstep, ep = msg
        if sig in store:
            store.findings[sig]["hits"] += 1
            # Every worker's first report (which one arrives first is timing).
            meta.setdefault(sig, {}).setdefault("reports", {}).setdefault(str(w), wstep)
            return False
        meta[sig] = {"worker": w, "worker_step": wstep, "episode": ep,
                     "campaign_step": sum(wsteps) - wsteps[w] + wstep,
                     "seconds": round(elapsed(), 3), "agent": cfg.agent,
                     "file": store.path_for(sig).name, "reports": {str(w): wstep}}
        save_state("running")
        store.add(data, sig)
        display.note(f"[{elapsed():7.1f}s] new finding {sig} (worker {w}, "
                     f"step {wstep:,}) -> {store.path_for(sig)}")
        return True

    def demonstrated() -> set[str]:
        out: set[str] = set()
        for m in meta.values():
            out.update(f for f in m.get("flaws") or [] if f != "fixed")
            out.update(c["flaw"] for c in m.get("causes", []))
        return out

    def search_causes() -> int:
        """The cause search (:func:`confirm_flaws`) over this session's re-reports.

        Candidates (this session's re-reports and every finding's own schedule) are
        tried shortest first (a violation early in its episode has the
        fewest other flaws' effects around it), each against the flaws not demonstrated
        yet, two per minimiser in flight, until their CPU time adds up to
        ``cause_seconds`` (or ten times that in wall time passes). A flaw found is filed
        as ``DIR/causes/<signature>--<flaw>.yaml`` (the recorded schedule, replayable)
        and listed under its signature in ``campaign.json`` with ``how`` (``alone``,
        ``masked``, ``leave-one-out``: :func:`confirm_flaws`); a masked one under the
        signature it was met as, with ``shows``, its file named after the signature it
        shows and configured with that flaw alone.
        """
        import yaml

        from .findings import signature_slug
        from .scenario import save_scenario

        if not cfg.cause_seconds or not rehits or interrupted:
            return 0
        todo = [f for f in flaws_on if f not in demonstrated()]
        # The findings' own (minimised) schedules too: one filed as "(combination)" or
        # for one flaw may still show another one masked, or need it (leave-one-out).
        filed: list[tuple[str, str, dict[str, Any]]] = []
        for sig in store.signatures:
            try:
                d = yaml.safe_load(store.path_for(sig).read_text())
            except (OSError, yaml.YAMLError):  # an unreadable file is no candidate
                continue
            if isinstance(d, dict) and isinstance(d.get("steps"), list):
                filed.append((sig, "(finding)", d))
        cands = sorted(filed + [(sig, ctx, d) for (sig, ctx), d in rehits.items()],
                       key=lambda c: len(c[2]["steps"]))
        if not todo or not cands:
            return 0
        start_minimisers(max(1, min(cfg.workers, usable_cpus())))
        wall = time.monotonic() + 10.0 * float(cfg.cause_seconds)
        cpu = 0.0
        i = n_found = 0
        while todo and (i < len(cands) or pending_cause) and time.monotonic() < wall:
            while (i < len(cands) and len(pending_cause) < 2 * len(minimisers)
                   and cpu < cfg.cause_seconds):
                sig, ctx, d = cands[i]
                pending_cause[i] = (sig, ctx, d)
                min_tasks.put(("cause", i, d, sig, list(todo)))
                i += 1
            if not pending_cause:
                break
            collect(True, one=True)
            while cause_results:
                j, fl, spent = cause_results.pop(0)
                cpu += spent
                sig, ctx, d = cands[j]
                new = [c for c in fl if c[0] in todo]
                if not new:
                    continue
                for flaw, shown, steps, how in new:
                    fd = dict(d)
                    if how == "alone":  # the candidate's own signature
                        fd["description"] = (
                            d.get("description", "") + f" Cause search: with {flaw} alone "
                            f"(and not on fixed) this schedule shows {sig}, filed first for "
                            "other flaws.").strip()
                    elif how == "leave-one-out":
                        fd["description"] = (
                            d.get("description", "") + f" Cause search (leave-one-out): "
                            f"this schedule shows {sig} with the campaign's flaws on, not "
                            f"with all of them but {flaw}, and not on fixed.").strip()
                    else:  # masked: the flaw alone shows another signature
                        assert steps is not None
                        fd["config"] = dict(d["config"], variant="cowpte", flaws=[flaw])
                        fd["steps"] = steps
                        v_kind, v_site = shown.split("@", 1)
                        fd["expect"] = {"violation": {"kind": v_kind, "site": v_site}}
                        for key in ("expect_by_variant", "outcome", "recorded"):
                            fd.pop(key, None)  # of the campaign's run, not of this one
                        fd["description"] = (
                            d.get("description", "") + f" Cause search (masked): with "
                            f"{flaw} alone (and not on fixed) this schedule, met as {sig}, "
                            f"shows {shown}, which the campaign's other flaws kept from "
                            "firing; the steps are those that took effect with it alone."
                        ).strip()
                    rel = f"causes/{signature_slug(shown)}--{flaw}.yaml"
                    if (outp / rel).exists():  # the same signature and flaw, another way
                        rel = f"causes/{signature_slug(shown)}--{flaw}--{how}.yaml"
                    save_scenario(fd, outp / rel)
                    row = {"flaw": flaw, "file": rel, "context": ctx,
                           "steps": len(fd["steps"]), "how": how}
                    if shown != sig:
                        row["shows"] = shown
                    meta.setdefault(sig, {}).setdefault("causes", []).append(row)
                    display.note(f"[{elapsed():7.1f}s] cause search: {flaw} shows {shown}"
                                 + (f" (masked; met as {sig})" if shown != sig else "")
                                 + (" (leave-one-out)" if how == "leave-one-out" else "")
                                 + f" -> {outp / rel}")
                todo = [f for f in todo if f not in {c[0] for c in new}]
                n_found += len(new)
                save_state("running")
        display.note(f"cause search: {min(i, len(cands))} of {len(cands)} candidate "
                     f"schedule(s) tried, {cpu:.1f} CPU s")
        pending_cause.clear()
        return n_found

    old_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    in_main = (mp.current_process().name == "MainProcess"
               and threading.current_thread() is threading.main_thread())
    if in_main:
        signal.signal(signal.SIGTERM, on_term)
    interrupted = False
    rate_t, rate_s, rate = time.monotonic(), sum(wsteps), 0.0
    try:
        for p in procs.values():
            p.start()
        live = set(procs)
        while live:
            try:
                msg = q.get(timeout=0.25)
            except queue_mod.Empty:
                msg = None
            if msg is not None:
                kind, w = msg[0], msg[1]
                if kind in ("progress", "checkpoint", "done"):
                    wsteps[w], weps[w] = msg[2], msg[3]
                    if kind == "checkpoint":
                        save_state("running")
                    if kind == "done":
                        live.discard(w)
                elif kind == "finding":
                    if record(msg):
                        submit(msg[2])
                    if cause_on:
                        # The first report's own schedule, before minimisation, is a
                        # cause-search candidate too: minimising keeps the signature,
                        # not its cause (a shorter schedule may reach the same oracle
                        # through other flaws' paths).
                        rehits.setdefault((msg[2], "(first report)"), msg[3])
                elif kind == "rehit":
                    rehits.setdefault((msg[2], msg[4]), msg[3])
                elif kind == "error":
                    errors.append(f"worker {w}: {msg[2]}")
                    live.discard(w)
                    display.note(f"worker {w} failed:\n{msg[2]}")
            for w in list(live):
                if not procs[w].is_alive() and msg is None:
                    live.discard(w)
                    errors.append(f"worker {w}: exited with code {procs[w].exitcode}")
            collect(False)
            now = time.monotonic()
            if now - rate_t >= 1.0:
                rate = (sum(wsteps) - rate_s) / (now - rate_t)
                rate_t, rate_s = now, sum(wsteps)
            display.update(sum(wsteps), sum(weps), len(store), rate)
        display.update(sum(wsteps), sum(weps), len(store), rate)
        if pending_min:
            display.note(f"minimising {len(pending_min)} finding(s)...")
            # The workers are done: their CPUs go to minimisation.
            start_minimisers(max(1, min(cfg.workers, usable_cpus(), len(pending_min))))
        collect(True)
        found = search_causes()
        if found:
            display.note(f"cause search: {found} more flaw(s) shown by known signatures")
    except KeyboardInterrupt:
        interrupted = True
        stop.set()
        # Keep reading the queue while the workers stop: a worker exits only once its
        # queue buffer is flushed into the pipe, which a full pipe nobody reads blocks.
        started = [p for p in procs.values() if p.pid is not None]
        deadline = time.monotonic() + 10.0
        while any(p.is_alive() for p in started) and time.monotonic() < deadline:
            _drain(q, wsteps, weps, record)
        for p in started:
            if p.is_alive():
                p.terminate()
        _drain(q, wsteps, weps, record)
    finally:
        display.close()
        if in_main:
            signal.signal(signal.SIGTERM, old_term)
        if minimisers:
            if not interrupted:
                for _ in minimisers:
                    min_tasks.put(None)
                for m in minimisers:
                    if m.is_alive():
                        m.join(timeout=5.0)
            if any(m.is_alive() for m in minimisers):
                for m in minimisers:
                    if m.is_alive():
                        m.terminate()
                # Tasks still buffered for a minimiser that is gone would block this
                # process's exit (the queue's feeder thread waits on a full pipe).
                for mq in (min_tasks, min_results):
                    cancel = getattr(mq, "cancel_join_thread", None)
                    if cancel is not None:
                        cancel()
            for m in minimisers:
                m.join(timeout=5.0)
        for p in procs.values():
            if p.pid is None:  # never started
                continue
            if p.is_alive():
                p.terminate()
            p.join(timeout=5.0)
    if errors and not interrupted:
        interrupted = any(wsteps[w] < worker_budget(cfg.budget, cfg.workers, w)
                          for w in range(cfg.workers))
    store.flush()
    save_state("interrupted" if interrupted else "finished")
    rows = []
    for sig in store.signatures:
        f, m = store.findings[sig], meta.get(sig, {})
        rows.append({"signature": sig, "file": str(outp / f["file"]),
                     "worker": m.get("worker"), "worker_step": m.get("worker_step"),
                     "campaign_step": m.get("campaign_step"), "seconds": m.get("seconds"),
                     "agent": m.get("agent", cfg.agent), "steps": f["steps"],
                     "flaws": m.get("flaws"), "reports": m.get("reports"),
                     "causes": m.get("causes", []),
                     "minimised": f.get("minimised"), "hits": f.get("hits", 1)})
    return CampaignResult(str(outp), sum(wsteps), sum(weps), rows, interrupted,
                          round(elapsed(), 3), errors)


def _drain(q: Any, wsteps: list[int], weps: list[int],
           record: Callable[[tuple[Any, ...]], bool]) -> None:
    """Take what is left in the queue after a stop: counts, and findings (``record``).

    A finding reported before a worker's last checkpoint would be lost with the queue:
    the resumed worker starts after it.
    """
    while True:
        try:
            msg = q.get(timeout=0.1)
        except (queue_mod.Empty, OSError, ValueError):
            return
        if msg[0] in ("checkpoint", "done"):
            wsteps[msg[1]], weps[msg[1]] = msg[2], msg[3]
        elif msg[0] == "finding":
            record(msg)


#: The flag that sets each env/kernel setting (for error lines).
_FLAG_OF = {"ptrs_per_pte": "--geometry", "geometry": "--geometry", "fault_mode": "--fault-mode",
            "max_steps": "--max-steps", "flaws": "--flaws", "variant": "--preset",
            "preset": "--preset"}


def env_error(e: Exception) -> str:
    """One line for an invalid env setting, naming the flag that set it when there is one."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    flag = _FLAG_OF.get(msg.split(":", 1)[0].strip())
    return f"{flag}: {msg}" if flag else f"env settings: {msg}"


def _check_setup(cfg: CampaignConfig) -> None:
    """Fail early (in the main process) on settings a worker would choke on."""
    try:
        import cowenv_agents as ca
    except ImportError as e:  # pragma: no cover - installation problem
        raise CampaignError(f"the agents package is not installed ({e}); run "
                            f"`pip install -e .` in the repository") from None

    from .env import CowEnv

    try:
        env = CowEnv(**cfg.env_kwargs)
    except (TypeError, ValueError) as e:
        raise CampaignError(env_error(e)) from None
    if cfg.agent == "ppo":
        if not cfg.model:
            raise CampaignError("--agent ppo needs --model PATH (a model saved by `cowenv train`)")
        try:
            agent = ca.make_agent("ppo", model=cfg.model, **cfg.agent_kwargs)
            agent.check_env(env)  # type: ignore[attr-defined]
        except (OSError, ValueError) as e:
            raise CampaignError(f"--model: {e}") from None
    else:
        if cfg.model:
            raise CampaignError("--model applies to --agent ppo only")
        try:
            ca.make_agent(cfg.agent, **cfg.agent_kwargs)
        except (TypeError, ValueError) as e:
            raise CampaignError(f"agent settings: {e}") from None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1
