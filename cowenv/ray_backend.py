"""Campaigns and training on Ray: ``cowenv fuzz --backend ray`` and ``cowenv train --backend ray``.

Fuzzing (:class:`RayBackend`, the other implementation of the seam
:class:`cowenv.campaign.LocalBackend`): worker ``w`` is a Ray actor (:class:`FuzzWorker`,
one CPU) that plays exactly the episodes a local worker process plays (same
``SeedSequence([seed, w, e])``, same share of the budget, same "report each signature the
first time this worker sees it"), so a Ray campaign finds what a local one finds. The actor
plays whole episodes in *chunks* (:data:`CHUNK_SECONDS`, or until a new signature shows
up, so findings reach the driver at once) and returns the chunk's findings with the
worker's state after it (steps, episodes, signatures reported, the agent's cross-episode
state). A thread of the driver per worker feeds those to :func:`cowenv.campaign.run_campaign`
as the messages a local worker sends, and writes the worker's checkpoint
``DIR/.campaign/worker-<w>.json`` on the driver's disk, so every file of a campaign lands
on the machine that runs ``cowenv fuzz``, whatever node did the work.

Fault tolerance is Ray's: each chunk call carries the state it starts from, the actor has
``max_restarts`` and ``max_task_retries``, so when a node dies Ray restarts its actors on
another node and re-runs the lost chunk call with the same arguments: the worker continues
from its last chunk, replays the lost episodes exactly and reports the same findings. A
chunk's findings only leave the actor with its result, so none is reported twice or lost.

Minimisation runs as Ray tasks (:func:`minimise_text`, at most ``minimisers`` at once; the
schedule travels as text, the result comes back to the driver, which writes the file).

Training (:func:`ray_vec_env`): SB3's MaskablePPO learns in the driver process while its
vector environment's slots step in Ray actors (:class:`RayVecEnv`), so checkpoints and
TensorBoard logs land where they do with ``--backend local``.

Ray is optional (``pip install 'cowenv[ray]'``); this module imports it only when used.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue as queue_mod
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from .campaign import (
    CampaignConfig,
    CampaignError,
    _checkpoint_path,
    episode_host,
    finding_data,
    minimise_finding,
    run_task,
    worker_budget,
)
from .fileio import atomic_write_text

#: One line for users without Ray (the CLI prints it and exits 2).
INSTALL_HINT = ("--backend ray needs Ray, which is not installed: pip install 'cowenv[ray]' "
                "(or pip install 'ray[default]')")
#: Seconds of episodes per actor call (whole episodes; results do not depend on it).
CHUNK_SECONDS = 0.5
#: Times Ray restarts a lost worker actor (and retries its lost call) before giving up.
MAX_RESTARTS = 16
#: Seconds between checkpoint files written by the driver (as the local backend).
CHECKPOINT_SECONDS = 3.0


def require_ray() -> Any:
    """Import Ray.

    Returns:
        The ``ray`` module.

    Raises:
        CampaignError: Ray is not installed (the message says how to install it).

    """
    try:
        import ray
    except ImportError:
        raise CampaignError(INSTALL_HINT) from None
    return ray


# ----------------------------------------------------------------------------- fuzz worker
class FuzzWorker:
    """Worker ``w`` of a campaign, as a Ray actor (see the module docstring).

    Args:
        cfg: :class:`~cowenv.campaign.CampaignConfig` as a dict.
        w: The worker number.
        known: Signatures known when the campaign (session) started: not reported.
        model: The bytes of ``cfg["model"]`` (``--agent ppo``), for nodes that do not
            see the driver's disk (written to a temporary file there).

    """

    def __init__(self, cfg: dict[str, Any], w: int, known: list[str],
                 model: bytes | None = None) -> None:
        import ray

        self.cfg = CampaignConfig(**cfg)
        if model is not None and not Path(str(self.cfg.model)).is_file():
            # One file per model per node, whatever the number of workers and restarts.
            digest = hashlib.sha1(model).hexdigest()
            p = Path(tempfile.gettempdir()) / f"cowenv-model-{digest}.zip"
            if not p.is_file():
                fd, tmp = tempfile.mkstemp(prefix=".cowenv-model-", dir=p.parent)
                with os.fdopen(fd, "wb") as f:
                    f.write(model)
                os.replace(tmp, p)
            self.cfg.model = str(p)
        self.w = w
        self.known = set(known)
        self.env = episode_host(self.cfg)
        self.budget = worker_budget(self.cfg.budget, self.cfg.workers, w)
        self.agent: Any = None
        self.at: tuple[int, int] | None = None  # (steps, episodes) of the live agent
        self.reported: set[str] = set()
        # The node this actor runs on (None outside Ray: do not let Ray auto-connect).
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def _agent(self) -> Any:
        import cowenv_agents as ca

        return ca.make_agent(self.cfg.agent, model=self.cfg.model, **self.cfg.agent_kwargs)

    def run(self, state: dict[str, Any], seconds: float) -> dict[str, Any]:
        """Play whole episodes from ``state`` for about ``seconds`` or up to a new finding.

        Args:
            state: Where the worker is: ``steps``, ``episodes``, ``reported`` and
                ``agent_state`` (a checkpoint; the actor's live agent is used when it is
                already there, the checkpoint is loaded otherwise, e.g. after a restart).
            seconds: Stop at the first episode boundary after this long.

        Returns:
            The state after the chunk (same keys), plus ``findings`` (``[signature,
            scenario data, worker step, episode]`` in the order found) and ``node`` (the
            Ray node id this ran on).

        """
        import cowenv_agents as ca

        cfg, w = self.cfg, self.w
        steps, episodes = int(state["steps"]), int(state["episodes"])
        if self.at != (steps, episodes):  # first call, or a restart: start from `state`
            self.agent = self._agent()
            if state.get("agent_state"):
                self.agent.load_state_dict(state["agent_state"])
            self.reported = set(state.get("reported", []))
        reported, found = self.reported, []
        deadline = time.monotonic() + seconds
        while steps < self.budget:
            rng, reset_seed = ca.episode_rng(cfg.seed, w, episodes)

            def on_violation(i: int, v: dict[str, Any], base: int = steps,
                             ep: int = episodes) -> bool:
                sig = v["signature"]
                if sig in reported or sig in self.known:
                    reported.add(sig)
                    return False
                reported.add(sig)
                found.append([sig, finding_data(self.env, cfg, w, ep, base + i, v), base + i,
                              ep])
                return False

            res = ca.run_episode(self.env, self.agent, rng, reset_seed,
                                 max_actions=self.budget - steps, on_violation=on_violation,
                                 teardown=cfg.teardown)
            steps += res.steps
            episodes += 1
            if found or time.monotonic() >= deadline:
                break
        self.at = (steps, episodes)
        return {"steps": steps, "episodes": episodes, "reported": sorted(reported),
                "agent_state": self.agent.state_dict(), "findings": found,
                "node": self.node}


class _ThreadProcess:
    """A driver thread with the ``multiprocessing.Process`` surface campaigns use.

    Subclasses implement :meth:`_loop` (the work) and :meth:`terminate`; a failure of
    ``_loop`` sets ``exitcode`` 1 and goes to :meth:`_failed`.
    """

    def __init__(self, name: str) -> None:
        self.thread = threading.Thread(target=self._main, daemon=True, name=name)
        self.exitcode: int | None = None
        self.killed = False

    @property
    def pid(self) -> int | None:
        """Not None once started (the driver thread's id)."""
        return self.thread.native_id

    def start(self) -> None:
        self.thread.start()

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def terminate(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        raise NotImplementedError

    def _failed(self) -> None:
        traceback.print_exc()

    def _main(self) -> None:
        try:
            self._loop()
            self.exitcode = 0
        except BaseException:
            self.exitcode = 1
            self._failed()


class _RayWorker(_ThreadProcess):
    """Driver-side handle of worker ``w``: a thread that drives its actor (process-like)."""

    def __init__(self, be: RayBackend, cfg: dict[str, Any], w: int, out: str, q: Any,
                 stop: threading.Event, known: list[str]) -> None:
        self.be, self.cfg, self.w, self.out = be, cfg, w, Path(out)
        self.q, self.stop, self.known = q, stop, list(known)
        super().__init__(f"cowenv-ray-worker-{w}")
        self.actor: Any = None

    def is_alive(self) -> bool:
        # Alive until its last message has been read (a thread ends right after it puts).
        return self.thread.is_alive() or not self.q.empty()

    def terminate(self) -> None:
        self.killed = True
        if self.actor is not None:
            self.be.ray.kill(self.actor, no_restart=True)

    def _failed(self) -> None:
        if not self.killed:
            self.q.put(("error", self.w, traceback.format_exc()))

    def _loop(self) -> None:
        ray, w = self.be.ray, self.w
        cfg = CampaignConfig(**self.cfg)
        budget = worker_budget(cfg.budget, cfg.workers, w)
        ck = _checkpoint_path(self.out, w)
        state: dict[str, Any] = {"steps": 0, "episodes": 0, "reported": [], "agent_state": {}}
        nodes: list[str] = []
        if ck.exists():
            st = json.loads(ck.read_text())
            state = {"steps": int(st["steps"]), "episodes": int(st["episodes"]),
                     "reported": st.get("reported", []),
                     "agent_state": st.get("agent_state", {})}
            nodes = list(st.get("nodes", []))

        def checkpoint() -> None:
            atomic_write_text(ck, json.dumps({
                "worker": w, "seed": [cfg.seed, w], "steps": state["steps"],
                "episodes": state["episodes"], "reported": state["reported"],
                "agent_state": state["agent_state"], "nodes": nodes}) + "\n")
            self.q.put(("checkpoint", w, state["steps"], state["episodes"]))

        model = Path(cfg.model).read_bytes() if cfg.model else None
        self.actor = self.be.actor_class.remote(self.cfg, w, self.known, model)
        last_ck = None
        while state["steps"] < budget and not self.stop.is_set():
            res = ray.get(self.actor.run.remote(state, self.be.chunk_seconds))
            for sig, data, wstep, ep in res.pop("findings"):
                self.q.put(("finding", w, sig, data, wstep, ep))
            node = res.pop("node")
            if not nodes or nodes[-1] != node:
                nodes.append(node)
            state = res
            self.q.put(("progress", w, state["steps"], state["episodes"]))
            now = time.monotonic()
            if last_ck is None or now - last_ck >= CHECKPOINT_SECONDS:
                checkpoint()
                last_ck = now
        checkpoint()
        ray.kill(self.actor, no_restart=True)  # frees its CPU for restarted or other actors
        self.q.put(("done", w, state["steps"], state["episodes"]))


# ----------------------------------------------------------------------------- minimiser
def minimise_text(name: str, text: str, signature: str, seconds: float = 0.0
                  ) -> tuple[str, dict[str, Any] | None, str, list[str] | None]:
    """:func:`cowenv.campaign.minimise_finding` of a scenario given as YAML text.

    The body of the Ray minimisation task: the node that runs it need not see the
    driver's disk, so the schedule travels as text and the result as data.
    """
    with tempfile.TemporaryDirectory(prefix="cowenv-min-") as d:
        p = Path(d) / name
        p.write_text(text)
        return minimise_finding(str(p), signature, seconds)


class _RayMinimiser(_ThreadProcess):
    """Driver-side minimiser: tasks (:func:`cowenv.campaign.minimiser_main`) in, Ray out."""

    def __init__(self, be: RayBackend, tasks: queue_mod.Queue, results: queue_mod.Queue
                 ) -> None:
        self.be, self.tasks, self.results = be, tasks, results
        super().__init__("cowenv-ray-minimise")
        self.inflight: dict[Any, tuple[Any, ...]] = {}

    def terminate(self) -> None:
        self.killed = True
        for ref in list(self.inflight):
            self.be.ray.cancel(ref, force=True)

    def _loop(self) -> None:
        ray = self.be.ray
        ending = False
        while not self.killed and not (ending and not self.inflight):
            if not ending and len(self.inflight) < self.be.minimisers:
                try:
                    task = self.tasks.get(timeout=0.05 if self.inflight else 0.5)
                except queue_mod.Empty:
                    task = False
                if task is None:
                    ending = True
                elif task and task[0] == "cause":
                    self.inflight[self.be.cause_task.remote(task)] = task
                elif task:
                    path, sig = task[0], task[1]
                    secs = float(task[2]) if len(task) > 2 else 0.0
                    ref = self.be.minimise_task.remote(Path(path).name, Path(path).read_text(),
                                                       sig, secs)
                    self.inflight[ref] = task
            if not self.inflight:
                continue
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=0.05)
            for ref in ready:
                task = self.inflight.pop(ref)
                try:
                    self.results.put(tuple(ray.get(ref)))
                except Exception as e:  # the task failed for good: keep the raw schedule
                    if task[0] == "cause":
                        self.results.put(("cause", task[1], []))
                        continue
                    self.results.put((task[1], None, f"minimisation task failed: "
                                                     f"{type(e).__name__}: {e}", None))


# ----------------------------------------------------------------------------- backend
class RayBackend:
    """Campaign workers as Ray actors, minimisation as Ray tasks (see the module docstring).

    Use as a context manager: entering connects to Ray (joins the cluster at ``address``,
    or starts a local instance when ``address`` is None) unless the process is already
    connected; leaving disconnects if it connected.

    Args:
        address: A running cluster (``ray start --head`` prints it; ``auto`` finds the one
            on this machine); None starts a local Ray instance for the campaign.
        num_cpus: CPUs of a local instance (default: the machine's, at least ``workers``).
        workers: The campaign's worker count (sizes a local instance).
        minimisers: Minimisation tasks at once (1, like the local backend's one process).
        chunk_seconds: Seconds of episodes per actor call.
        show: Say on stderr where the cluster and its dashboard are.
        include_dashboard: Start the dashboard with a local instance (None: if installed).
        log_to_driver: Ray prints its workers' and raylets' output here (off for
            ``--json`` and ``--quiet``: stdout stays one JSON object).

    """

    name = "ray"

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None,
                 workers: int = 1, minimisers: int = 1, chunk_seconds: float = CHUNK_SECONDS,
                 show: bool = False, include_dashboard: bool | None = None,
                 log_to_driver: bool = True) -> None:
        self.ray = require_ray()
        self.address = address
        self.num_cpus = num_cpus if num_cpus is not None else max(os.cpu_count() or 1,
                                                                   workers)
        self.minimisers = max(1, minimisers)
        self.chunk_seconds = chunk_seconds
        self.show = show
        self.include_dashboard = include_dashboard
        self.log_to_driver = log_to_driver
        self._connected = False
        self.dashboard_url: str | None = None
        self.actor_class = self.ray.remote(num_cpus=1, max_restarts=MAX_RESTARTS,
                                           max_task_retries=MAX_RESTARTS)(FuzzWorker)
        # Minimisation is short and bursty: it shares the CPUs of the workers (num_cpus=0)
        # as the local backend's minimiser process does, instead of waiting for one.
        self.minimise_task = self.ray.remote(num_cpus=0)(minimise_text)
        self.cause_task = self.ray.remote(num_cpus=0)(run_task)

    def __enter__(self) -> RayBackend:
        ray = self.ray
        if not ray.is_initialized():
            try:
                if self.address is None:
                    # Workers at normal priority, like local worker processes (Ray's
                    # default, nice 15, is for clusters where Ray owns the machines).
                    ctx = ray.init(address="local", num_cpus=self.num_cpus,
                                   include_dashboard=self.include_dashboard,
                                   log_to_driver=self.log_to_driver, configure_logging=False,
                                   _system_config={"worker_niceness": 0})
                else:
                    ctx = ray.init(address=self.address, log_to_driver=self.log_to_driver,
                                   configure_logging=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                where = self.address or "a local instance"
                raise CampaignError(f"--address: cannot connect to Ray at {where}: "
                                    f"{str(e).strip().splitlines()[0]}") from None
            self._connected = True
            self.dashboard_url = getattr(ctx, "dashboard_url", None) or None
        if self.show:
            import sys

            res = ray.cluster_resources()
            where = (f"joined the Ray cluster at {self.address}" if self.address
                     else "started a local Ray instance")
            dash = f"; dashboard: http://{self.dashboard_url}" if self.dashboard_url else ""
            print(f"ray: {where}: {len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPU(s)"
                  f"{dash}", file=sys.stderr)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._connected:
            self.ray.shutdown()
            self._connected = False

    def queue(self) -> queue_mod.Queue:
        """Driver threads put on it; the campaign loop reads it."""
        return queue_mod.Queue()

    def event(self) -> threading.Event:
        """The stop flag (the driver threads check it between chunks)."""
        return threading.Event()

    def worker(self, cfg: dict[str, Any], w: int, out: str, q: Any, stop: Any,
               known: list[str]) -> _RayWorker:
        """An unstarted worker ``w`` (arguments of :func:`cowenv.campaign.worker_main`)."""
        return _RayWorker(self, cfg, w, out, q, stop, known)

    def minimiser(self, tasks: Any, results: Any) -> _RayMinimiser:
        """An unstarted minimiser (arguments of :func:`cowenv.campaign.minimiser_main`)."""
        return _RayMinimiser(self, tasks, results)

    def vec_env(self, env_fns: list[Any]) -> Any:
        """A training vector env whose slots step in Ray actors (see :class:`RayVecEnv`)."""
        return ray_vec_env(self.ray, env_fns)


# ----------------------------------------------------------------------------- training
class EnvSlots:
    """Ray actor: some consecutive slots of a training vector env, as an SB3 ``DummyVecEnv``.

    Args:
        env_fns: The slots' env factories (called here, on the actor's node).

    """

    def __init__(self, env_fns: list[Any]) -> None:
        from stable_baselines3.common.vec_env import DummyVecEnv

        self.venv = DummyVecEnv(env_fns)

    def spaces(self) -> tuple[Any, Any]:
        """Observation and action spaces."""
        return self.venv.observation_space, self.venv.action_space

    def _masks(self) -> Any:
        import numpy as np

        return np.stack(self.venv.env_method("action_masks"))

    def reset(self, seeds: list[int | None], options: list[dict[str, Any]]) -> tuple[Any, ...]:
        """``DummyVecEnv.reset`` with these per-slot seeds and options; plus action masks."""
        self.venv._seeds, self.venv._options = list(seeds), list(options)
        obs = self.venv.reset()
        return obs, list(self.venv.reset_infos), self._masks()

    def step(self, actions: Any) -> tuple[Any, ...]:
        """``DummyVecEnv.step`` (auto-reset included); plus the action masks after it."""
        obs, rews, dones, infos = self.venv.step(actions)
        return obs, rews, dones, infos, list(self.venv.reset_infos), self._masks()

    def call(self, what: str, name: str, indices: list[int], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        """``get_attr``/``set_attr``/``env_method``/``env_is_wrapped`` on local ``indices``."""
        return getattr(self.venv, what)(name, *args, indices=indices, **kwargs)


def ray_vec_env(ray: Any, env_fns: list[Any]) -> Any:
    """Build a :class:`RayVecEnv` (the class is made on first use: SB3 imports torch).

    Args:
        ray: The connected ``ray`` module.
        env_fns: One env factory per slot (cloudpickled to the actors).

    Returns:
        The vector env: slots grouped into at most as many actors (one CPU each) as the
        cluster has CPUs, in order, so slot ``i`` gets seed ``seed + i`` as in
        ``DummyVecEnv`` and training sees the very same episodes.

    """
    import numpy as np
    from stable_baselines3.common.vec_env import VecEnv

    actor_cls = ray.remote(num_cpus=1)(EnvSlots)

    class RayVecEnv(VecEnv):
        """SB3 vector env over :class:`EnvSlots` actors (``DummyVecEnv`` semantics)."""

        def __init__(self, env_fns: list[Any]) -> None:
            n = len(env_fns)
            k = max(1, min(n, int(ray.cluster_resources().get("CPU", 1))))
            bounds = [n * i // k for i in range(k + 1)]
            self.slices = [(bounds[i], bounds[i + 1]) for i in range(k)]
            self.actors = [actor_cls.remote(env_fns[a:b]) for a, b in self.slices]
            self._refs: list[Any] = []
            self._masks: Any = None
            self.reset_infos: list[dict[str, Any]] = [{} for _ in range(n)]
            obs_space, act_space = ray.get(self.actors[0].spaces.remote())
            super().__init__(n, obs_space, act_space)

        def reset(self) -> Any:
            res = ray.get([act.reset.remote(self._seeds[a:b], self._options[a:b])
                           for act, (a, b) in zip(self.actors, self.slices, strict=True)])
            self.reset_infos = [i for r in res for i in r[1]]
            self._masks = np.concatenate([r[2] for r in res])
            self._reset_seeds()
            self._reset_options()
            return np.concatenate([r[0] for r in res])

        def step_async(self, actions: Any) -> None:
            self._refs = [act.step.remote(actions[a:b])
                          for act, (a, b) in zip(self.actors, self.slices, strict=True)]

        def step_wait(self) -> Any:
            res = ray.get(self._refs)
            self._refs = []
            self.reset_infos = [i for r in res for i in r[4]]
            self._masks = np.concatenate([r[5] for r in res])
            return (np.concatenate([r[0] for r in res]), np.concatenate([r[1] for r in res]),
                    np.concatenate([r[2] for r in res]), [i for r in res for i in r[3]])

        def close(self) -> None:
            for act in self.actors:
                ray.kill(act)
            self.actors = []

        def _call(self, what: str, name: str, indices: Any, *args: Any,
                  **kwargs: Any) -> list[Any]:
            idx = list(self._get_indices(indices))
            refs = []
            for act, (a, b) in zip(self.actors, self.slices, strict=True):
                mine = sorted({i for i in idx if a <= i < b})
                if mine:
                    refs.append((mine, act.call.remote(what, name, [i - a for i in mine], args,
                                                       kwargs)))
            by_slot = {i: r for mine, ref in refs
                       for i, r in zip(mine, ray.get(ref), strict=True)}
            return [by_slot[i] for i in idx]

        def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
            return self._call("get_attr", attr_name, indices)

        def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
            self._masks = None
            self._call("set_attr", attr_name, indices, value)

        def env_method(self, method_name: str, *method_args: Any, indices: Any = None,
                       **method_kwargs: Any) -> list[Any]:
            if (method_name == "action_masks" and not method_args and not method_kwargs
                    and self._masks is not None):  # sent with every step: no round trip
                return [self._masks[i] for i in self._get_indices(indices)]
            self._masks = None
            return self._call("env_method", method_name, indices, *method_args,
                              **method_kwargs)

        def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
            return self._call("env_is_wrapped", wrapper_class, indices)

    return RayVecEnv(env_fns)
