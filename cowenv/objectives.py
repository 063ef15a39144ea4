"""The ``fork_cost`` objective: reward an agent for making COW PTE slow relative to fork.

The env's kernel runs the configured variant (normally ``cowpte``) under the agent's
interleaving. Beside it, :class:`ClassicShadow` keeps a *classic* kernel that executes
the **same sequence of operations**: when the agent starts an operation on the env's
kernel, the shadow starts the same operation on the corresponding thread and runs it to
completion at once. Interleaving choices (which thread runs next) and memory pressure
— BRIEF §1's third kind of action: kswapd's ``reclaim`` and ``fail_nth`` — do not apply to
the shadow: it answers "what would plain fork have cost for these system calls", not "for
this schedule under this pressure". (Pressure is counted in ``info["fork_cost"]["pressure"]``.)

Both kernels account simulated time with :class:`cowenv.kernel.cost.CostMeter`; the
quantity compared is the **fork-attributable** cost (``immediate`` inside fork +
``deferred``: COW PTE table breaks and the faults that copy or reuse pages fork shared).
With ``V`` the variant's and ``C`` the shadow's fork-attributable nanoseconds and ``N``
the normaliser (default: what classic fork spends on one fully populated PTE table of
the env's geometry, ``fork_table_ns("classic", P)``), the per-step reward is

* ``mode="difference"`` (default): ``Δ(V − C) / N`` — the episode return is the extra
  time COW PTE cost, in units of "one table's worth of plain fork";
* ``mode="ratio"``: ``Δ((V + N) / (C + N))`` — the return is the (smoothed) ratio minus
  its starting value, for agents that should maximise the ratio itself.

Operation identities are mapped, not assumed: threads, processes and pins created by an
operation are paired when the env's operation completes (fork's child pid and thread,
clone's tid, pin ids). An operation whose thread (or pin) has no counterpart in the shadow
is skipped there and counted in ``info["fork_cost"]["shadow_skipped"]``; an operation
that succeeded on one kernel and failed on the other is counted in ``diverged``. The
shadow gets generous process/thread caps and frames (:data:`SHADOW_LIMITS`) so that its
operations do not fail where the env's succeed merely because it runs them earlier.

Because the shadow runs every operation at its start, an agent can profit from the
*order* in which operations take effect on the env's kernel (e.g. start a write, then
fork and finish the fork before the write: the env's write pays a COW copy, the shadow's
did not). ``twin=True`` adds a second shadow running the configured variant on the same
start-ordered sequence; ``info["fork_cost"]["sequential_ratio"]`` (twin / classic shadow)
is then the ratio of the *operations alone*, which interleaving cannot inflate. The
benchmark judges schedules by it.

:class:`ForkCost` holds the logic; :class:`ForkCostObjective` adapts it to
:class:`Objective` and is registered as ``objective="fork_cost"``.

This module is also the objective framework: :class:`Objective`, the default
:class:`ViolationObjective`, :func:`register_objective` and :func:`make_objective`.
The harness (:mod:`cowenv.harness`) scores every legal action with its objective; it
does not depend on gymnasium.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from .catalogue import ActionSpec
from .kernel import KSWAPD_TID, Kernel, KernelUsageError, make_kernel
from .kernel.config import KernelConfig
from .kernel.cost import fork_table_ns
from .kernel.trace import Violation
from .scenario import StepError, apply_step, parse_scenario

MODES: tuple[str, ...] = ("difference", "ratio")
#: Limits of a shadow kernel: caps high enough that a shadow operation does not fail
#: where the env's (run later, or never) succeeds; frames ``FRAME_FACTOR`` × the env's.
SHADOW_LIMITS: dict[str, int] = {"max_processes": 64, "max_threads": 64}
FRAME_FACTOR = 4


class ShadowKernel:
    """A kernel that executes, each to completion, the operations started on another.

    Args:
        config: The configuration to run (geometry and flaws as given; the caps of
            :data:`SHADOW_LIMITS` and ``FRAME_FACTOR`` × the frames are applied).
        workload: Scenario steps (as parsed by :func:`cowenv.scenario.parse_scenario`) to
            run first, exactly as the env runs its workload at reset.

    Raises:
        RuntimeError: The workload cannot run on the shadow.

    """

    def __init__(self, config: KernelConfig, workload: list[dict[str, Any]]) -> None:
        cfg = dataclasses.replace(config, nr_frames=config.nr_frames * FRAME_FACTOR,
                                  **SHADOW_LIMITS)
        self.kernel: Kernel = make_kernel(cfg, oracles=False, trace=False)
        names: dict[str, Any] = {}
        pending: dict[int, dict] = {}
        for i, s in enumerate(workload):
            try:
                apply_step(self.kernel, copy.deepcopy(s), names, pending, i)
            except (StepError, KernelUsageError) as e:
                raise RuntimeError(f"shadow workload step {i}: {e}") from None
        # env id -> shadow id; identity for what both kernels hold after the workload.
        self.tids: dict[int, int] = {}
        self.pids: dict[int, int] = {}
        self.pins: dict[int, int] = {}
        self._started: dict[int, tuple[str, Any]] = {}
        #: Operations the shadow could not run (no counterpart thread/pin, or refused).
        self.skipped = 0
        #: Operations that succeeded on one kernel and failed on the other.
        self.diverged = 0
        #: kswapd operations (memory pressure) seen and, by design, not run.
        self.pressure = 0

    def pair_existing(self, env_kernel: Kernel) -> None:
        """Pair threads, processes and pins that exist in both kernels (same ids)."""
        k = self.kernel
        for tid, t in sorted(env_kernel.threads.items()):
            st = k.threads.get(tid)
            if st is not None and not t.exited and not st.exited:
                self.tids[tid] = tid
        for pid, p in sorted(env_kernel.procs.items()):
            sp = k.procs.get(pid)
            if sp is not None and p.alive and sp.alive:
                self.pids[pid] = pid
        for pin, p in sorted(env_kernel.pins.items()):
            sp = k.pins.get(pin)
            if sp is not None and p.active and sp.active:
                self.pins[pin] = pin

    def start(self, tid: int, op: str, args: dict[str, Any]) -> bool:
        """Run operation ``op`` of env thread ``tid`` to completion on the shadow.

        Args:
            tid: The env thread that started it (kswapd's reclaim is not run).
            op: Operation name.
            args: Its arguments as the env bound them (pin ids of the env).

        Returns:
            Whether the shadow ran it.

        """
        if tid == KSWAPD_TID:
            self.pressure += 1  # reclaim is memory pressure, not a system call
            return False
        stid = self.tids.get(tid)
        self._started[tid] = (op, None)
        a = dict(args)
        if "pin" in a and op in ("unpin", "dev_read", "dev_write"):
            a["pin"] = self.pins.get(a["pin"], -1)
        k = self.kernel
        if stid is None or a.get("pin", 0) == -1 or not k.can_start(stid, op):
            self.skipped += 1
            return False
        try:
            res = k.do(stid, op, **a)
        except KernelUsageError:
            self.skipped += 1
            return False
        self._started[tid] = (op, res)
        return True

    def finished(self, tid: int, env_kernel: Kernel) -> None:
        """Env thread ``tid`` completed its operation: pair what it created."""
        op, sres = self._started.pop(tid, ("", None))
        eres = env_kernel.threads[tid].result
        if not isinstance(eres, int) or not isinstance(sres, int):
            return
        if (eres < 0) != (sres < 0):
            self.diverged += 1
        if eres <= 0 or sres <= 0:
            return
        k = self.kernel
        if op == "fork":
            self.pids[eres] = sres
            ep, sp = env_kernel.procs.get(eres), k.procs.get(sres)
            if ep is not None and sp is not None and ep.tids and sp.tids:
                self.tids[ep.tids[0]] = sp.tids[0]
        elif op == "clone":
            self.tids[eres] = sres
        elif op == "pin":
            self.pins[eres] = sres

    def pending(self, tid: int) -> bool:
        """Whether env thread ``tid`` has an operation the shadow has already run."""
        return tid in self._started


class ClassicShadow(ShadowKernel):
    """The classic shadow: ``config`` with ``variant="classic"`` and no flaws."""

    def __init__(self, config: KernelConfig, workload: list[dict[str, Any]]) -> None:
        super().__init__(dataclasses.replace(config, variant="classic", flaws=()), workload)


class ForkCost:
    """Fork-attributable cost of a kernel relative to its classic shadow.

    Args:
        config: The env kernel's configuration.
        workload: The env's parsed workload steps.
        mode: ``difference`` or ``ratio`` (see the module docstring).
        normaliser_ns: ``N``; default ``fork_table_ns("classic", config.ptrs_per_pte)``.
        twin: Also run the configured variant sequentially (``sequential_ratio``).

    Raises:
        ValueError: Unknown ``mode`` or a non-positive ``normaliser_ns``.

    """

    def __init__(self, config: KernelConfig, workload: list[dict[str, Any]],
                 mode: str = "difference", normaliser_ns: float | None = None,
                 twin: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        n = (fork_table_ns("classic", config.ptrs_per_pte) if normaliser_ns is None
             else float(normaliser_ns))
        if not n > 0:
            raise ValueError(f"normaliser_ns: expected > 0, got {normaliser_ns!r}")
        self.config = config
        self.workload = workload
        self.mode = mode
        self.normaliser_ns = n
        self.use_twin = bool(twin)
        self.shadow: ClassicShadow | None = None
        self.twin: ShadowKernel | None = None
        self._score = 0.0

    def _value(self, kernel: Kernel) -> float:
        assert self.shadow is not None
        v = kernel.cost.fork_attributable_ns
        c = self.shadow.kernel.cost.fork_attributable_ns
        if self.mode == "difference":
            return (v - c) / self.normaliser_ns
        return (v + self.normaliser_ns) / (c + self.normaliser_ns)

    def reset(self, kernel: Kernel) -> dict[str, Any]:
        """Start an episode on ``kernel`` (its workload has run): build the shadow.

        Returns:
            ``{"fork_cost": summary}``.

        """
        self.shadow = ClassicShadow(self.config, self.workload)
        self.shadow.pair_existing(kernel)
        self.twin = None
        if self.use_twin:
            self.twin = ShadowKernel(self.config, self.workload)
            self.twin.pair_existing(kernel)
        self._score = self._value(kernel)
        return {"fork_cost": self.summary(kernel)}

    def step(self, kernel: Kernel, record: dict[str, Any] | None) -> tuple[float, dict]:
        """Mirror one env action on the shadow and score it.

        Args:
            kernel: The env's kernel, after the action.
            record: The scenario step the env recorded for the action (``start`` runs
                the operation on the shadow; a ``step`` that completed an operation
                pairs what it created; events are not mirrored).

        Returns:
            ``(reward, {"fork_cost": summary})``.

        """
        if self.shadow is None:
            raise RuntimeError("call reset() first")
        shadows = [self.shadow] + ([self.twin] if self.twin is not None else [])
        if record is not None and "start" in record:
            for sh in shadows:
                sh.start(int(record["tid"]), record["start"], record.get("args") or {})
        elif record is not None and "step" in record:
            tid = int(record["tid"])
            t = kernel.threads.get(tid)
            if t is not None and t.gen is None:
                for sh in shadows:
                    if sh.pending(tid):
                        sh.finished(tid, kernel)
        new = self._value(kernel)
        reward = new - self._score
        self._score = new
        return float(reward), {"fork_cost": self.summary(kernel)}

    def summary(self, kernel: Kernel) -> dict[str, Any]:
        """Plain-data state: both kernels' fork-attributable costs and their ratio.

        ``ratio`` is ``variant / classic`` (1.0 while classic has no fork cost yet); with
        the twin, ``twin_ns`` and ``sequential_ratio`` (twin / classic) too.
        """
        assert self.shadow is not None
        kc, sc = kernel.cost, self.shadow.kernel.cost
        v, c = kc.fork_attributable_ns, sc.fork_attributable_ns
        out = {
            "variant_ns": v, "classic_ns": c,
            "variant_immediate_ns": kc.immediate_ns, "variant_deferred_ns": kc.deferred_ns,
            "classic_immediate_ns": sc.immediate_ns, "classic_deferred_ns": sc.deferred_ns,
            "ratio": v / c if c > 0 else 1.0,
            "shadow_skipped": self.shadow.skipped,
            "diverged": self.shadow.diverged,
            "pressure": self.shadow.pressure,
        }
        if self.twin is not None:
            w = self.twin.kernel.cost.fork_attributable_ns
            out["twin_ns"] = w
            out["sequential_ratio"] = w / c if c > 0 else 1.0
        return out


@dataclass(slots=True)
class StepOutcome:
    """What one harness step did, handed to the objective.

    Attributes:
        spec: The catalogue entry taken.
        record: The scenario step recorded for it (None for an illegal action).
        label: Preemption label reached (``run`` actions), else "".
        violations: Violations reported during this step (all, in order).
        new_signatures: Signatures first seen in this episode during this step
            (``simulator`` defects excluded).
        new_labels: Number of preemption labels reached for the first time this
            episode during this step.
        illegal: The action was illegal (a no-op).

    """

    spec: ActionSpec
    record: dict[str, Any] | None
    label: str
    violations: list[Violation]
    new_signatures: list[str]
    new_labels: int
    illegal: bool


class Objective:
    """What the agent is rewarded for. Subclass and :func:`register_objective` it.

    The harness calls :meth:`reset` after the workload has run and :meth:`step` after every
    action (never for an illegal one: those always earn 0). An objective reads the
    kernel through its public API; it must be deterministic.

    Args:
        env: The host: the :class:`cowenv.harness.Harness` (read its settings --
            ``config``, ``workload``, ``violation_reward``, ``terminate_on_violation``,
            ``novelty_coef`` -- but do not step it). Named ``env`` for compatibility.
        **kwargs: Objective-specific settings (the env's ``objective_kwargs``).

    """

    name: ClassVar[str] = ""

    def __init__(self, env: Any, **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"objective_kwargs: {self.name} takes no {sorted(kwargs)[0]!r}")
        self.env = env

    def reset(self, kernel: Kernel) -> dict[str, Any]:
        """Start of an episode; returns extra reset ``info`` entries."""
        return {}

    def step(self, kernel: Kernel, outcome: StepOutcome) -> tuple[float, bool, dict[str, Any]]:
        """Score one legal action.

        Returns:
            ``(reward, terminated, extra info)``.

        """
        raise NotImplementedError


class ViolationObjective(Objective):
    """The ``violation`` objective.

    ``violation_reward`` for a step that reports a violation signature new in this
    episode (once per step, however many oracles fire; the episode ends if
    ``terminate_on_violation``), plus ``novelty_coef`` per preemption label reached for
    the first time this episode.
    """

    name = "violation"

    def step(self, kernel: Kernel, outcome: StepOutcome) -> tuple[float, bool, dict[str, Any]]:  # noqa: D102
        env = self.env
        r = env.violation_reward if outcome.new_signatures else 0.0
        r += env.novelty_coef * outcome.new_labels
        done = bool(outcome.new_signatures) and env.terminate_on_violation
        return float(r), done, {}


#: Objective name -> class (``fork_cost`` is registered below).
OBJECTIVES: dict[str, type[Objective]] = {"violation": ViolationObjective}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Make ``cls`` available as ``objective=cls.name`` (usable as a decorator)."""
    if not cls.name:
        raise ValueError("objective classes need a non-empty name")
    OBJECTIVES[cls.name] = cls
    return cls


# ------------------------------------------------------------------------ the env


@register_objective
class ForkCostObjective(Objective):
    """The ``fork_cost`` objective (see the module docstring).

    ``objective_kwargs``: ``mode`` (``difference`` | ``ratio``), ``normaliser_ns``
    and ``twin`` (bool). Never terminates an episode by itself; ``info["fork_cost"]``
    carries both kernels' costs and their ratio after every step.
    """

    name = "fork_cost"

    def __init__(self, env: Any, mode: str = "difference",
                 normaliser_ns: float | None = None, twin: bool = False) -> None:
        super().__init__(env)
        steps = parse_scenario({"config": env.config.to_dict(), "steps": env.workload},
                               "<workload>").steps
        self.logic = ForkCost(env.config, steps, mode, normaliser_ns, twin)

    def reset(self, kernel: Kernel) -> dict[str, Any]:  # noqa: D102
        return self.logic.reset(kernel)

    def step(self, kernel: Kernel,  # noqa: D102
             outcome: StepOutcome) -> tuple[float, bool, dict[str, Any]]:
        reward, info = self.logic.step(kernel, outcome.record)
        return reward, False, info


def make_objective(name: str, host: Any, kwargs: dict[str, Any] | None = None) -> Objective:
    """Instantiate the objective registered as ``name`` for ``host`` (a harness).

    Raises:
        ValueError: Unknown name, or a keyword the objective does not take.

    """
    if name not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {', '.join(sorted(OBJECTIVES))}, "
                         f"got {name!r}")
    return OBJECTIVES[name](host, **dict(kwargs or {}))


__all__ = ["FRAME_FACTOR", "MODES", "OBJECTIVES", "SHADOW_LIMITS", "ClassicShadow", "ForkCost",
           "ForkCostObjective", "Objective", "ShadowKernel", "StepOutcome",
           "ViolationObjective", "make_objective", "register_objective"]
