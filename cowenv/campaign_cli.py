"""The ``cowenv fuzz`` and ``cowenv train`` commands: flags, backends and the summary.

Above both campaign backends: :mod:`cowenv.campaign` (the campaign itself and its local
``multiprocessing`` backend) and :mod:`cowenv.ray_backend` (Ray), so that neither imports
the other's command line. Registered with :mod:`cowenv.cli` through ``CLI_COMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .campaign import (
    AGENT_CHOICES,
    MAX_BUDGET,
    MAX_EPISODE_STEPS,
    MAX_SEED,
    MAX_TRAIN_STEPS,
    MAX_WORKERS,
    CampaignConfig,
    CampaignError,
    CampaignResult,
    default_env_kwargs,
    env_error,
    run_campaign,
)


def _env_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--preset", help="as-posted (default), fixed or classic")
    sp.add_argument("--flaws", help="comma-separated flaw ids (implies the cowpte variant), "
                                    "'all' or 'none'")
    sp.add_argument("--geometry", help="x86_64 (default), small, tiny or entries per table")
    sp.add_argument("--base", choices=("6.2", "6.4", "6.5"),
                    help="upstream release modelled (default 6.2, v4's base; 6.4+ has "
                         "per-VMA-lock faults)")
    sp.add_argument("--fault-mode", choices=("mmap_lock", "vma_lock"),
                    help="page faults under mmap_lock or per-VMA locks (default: per-VMA "
                         "locks on a base that has them)")
    sp.add_argument("--max-steps", type=int, help="actions per episode (default 256)")


def env_kwargs_from_args(a: argparse.Namespace, base: dict[str, Any]) -> dict[str, Any]:
    """Env keyword arguments from ``--preset/--flaws/--geometry/--fault-mode/--max-steps``."""
    from .cli import BadInput, _flaws_arg
    from .kernel.config import GEOMETRIES, PRESETS

    kw = dict(base)
    if a.preset is not None and a.flaws is not None:
        raise BadInput(f"--flaws: cannot be combined with --preset {a.preset} (a preset fixes "
                       "the flaws); use --flaws alone (the cowpte variant) or --preset alone")
    if a.preset is not None:
        if a.preset not in PRESETS:
            raise BadInput(f"--preset: expected one of {', '.join(PRESETS)}")
        kw["preset"] = a.preset
    if a.flaws is not None:
        kw["flaws"] = _flaws_arg(a.flaws)
        if a.preset is None:
            kw["variant"] = "cowpte"
    if a.geometry is not None:
        g: Any = a.geometry
        if g not in GEOMETRIES:
            try:
                g = int(g)
            except ValueError:
                raise BadInput(f"--geometry: expected one of {', '.join(GEOMETRIES)} or an "
                               f"int") from None
        kw["geometry"] = g
    if a.base is not None:
        kw["base"] = a.base
    if a.fault_mode is not None:
        kw["fault_mode"] = a.fault_mode
    if a.max_steps is not None:
        if not 1 <= a.max_steps <= MAX_EPISODE_STEPS:
            raise BadInput(f"--max-steps: expected 1 to {MAX_EPISODE_STEPS}, got {a.max_steps}")
        kw["max_steps"] = a.max_steps
    if a.teardown < 0:
        raise BadInput(f"--teardown: expected >= 0, got {a.teardown}")
    max_steps = kw.get("max_steps", _env_default("max_steps"))
    if a.teardown and a.teardown >= max_steps:
        raise BadInput(f"--teardown: expected less than --max-steps ({max_steps}: the episode "
                       f"length), got {a.teardown}")
    return kw


def _env_default(name: str) -> Any:
    """Default of an env keyword argument (read from the harness's signature)."""
    import inspect

    from .harness import Harness

    return inspect.signature(Harness.__init__).parameters[name].default



def _setup_fuzz(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--agent", default="random", choices=AGENT_CHOICES, help="default: random")
    sp.add_argument("--model", help="saved MaskablePPO model for --agent ppo (trusted input "
                                    "only: SB3 models are pickle-based)")
    sp.add_argument("--budget", type=int, default=100_000,
                    help="env steps over all workers (default 100000)")
    sp.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="worker processes (default: 2, or 1 on one CPU)")
    sp.add_argument("--seed", type=int, default=0, help="campaign seed (default 0)")
    sp.add_argument("--out", default="findings", help="findings folder (default findings/); "
                                                      "an existing campaign there is resumed")
    sp.add_argument("--depth", type=int, help="PCT bug depth d (default 3)")
    sp.add_argument("--teardown", type=int, default=32,
                    help="last actions of each episode that the harness uses to finish every "
                         "operation and exit every thread (exit-time checks); 0 = none "
                         "(default 32)")
    sp.add_argument("--no-minimise", action="store_true", help="keep schedules as recorded")
    sp.add_argument("--minimise-seconds", type=float, default=20.0,
                    help="search time per finding for the minimiser; past it the smallest "
                         "schedule verified so far is kept (0 = no limit; default 20)")
    sp.add_argument("--cause-seconds", type=float, default=30.0,
                    help="with several flaws on: time for the cause search at the end, which "
                         "tries later schedules of known signatures with each flaw not yet "
                         "demonstrated alone (0 = none; default 30)")
    sp.add_argument("--json", action="store_true", help="print the result as one JSON object")
    sp.add_argument("--quiet", action="store_true", help="no progress output")
    _backend_args(sp, "workers as Ray actors, minimisation as Ray tasks")
    _env_args(sp)


def _backend_args(sp: argparse.ArgumentParser, ray_help: str) -> None:
    sp.add_argument("--backend", choices=("local", "ray"), default="local",
                    help=f"local: processes on this machine (default); ray: {ray_help} "
                         f"(needs pip install 'cowenv[ray]')")
    sp.add_argument("--address", help="with --backend ray: join the Ray cluster at this "
                                      "address (default: start a local Ray instance)")


def _backend_from_args(a: argparse.Namespace, workers: int) -> Any:
    """A context manager giving the backend ``--backend/--address`` ask for (None: local)."""
    import contextlib

    from .cli import BadInput

    if a.backend != "ray":
        if a.address is not None:
            raise BadInput("--address applies to --backend ray only")
        return contextlib.nullcontext(None)
    from .ray_backend import RayBackend

    try:
        quiet = getattr(a, "quiet", False) or a.json
        be = RayBackend(a.address, workers=workers, show=not quiet, log_to_driver=not quiet)
    except CampaignError as e:
        raise BadInput(str(e)) from None

    @contextlib.contextmanager
    def session() -> Any:
        # Ray prints cluster errors (a raylet died, ...) on sys.stdout: keep stdout for
        # the command's result (--json).
        with contextlib.redirect_stdout(sys.stderr), be:
            yield be

    return session()


def _print_summary(res: CampaignResult, flaws_on: tuple[str, ...] = ()) -> None:
    from rich.table import Table

    from .cli import flaw_origins_text, print_table

    state = "interrupted" if res.interrupted else "finished"
    t = Table(title=f"{len(res.findings)} finding(s); {res.steps:,} steps, {res.episodes:,} "
                    f"episodes, {res.seconds:.1f}s ({state})")
    for col in ("signature", "flaw(s) alone", "first found: step (worker:step)", "seconds",
                "agent", "steps", "file"):
        t.add_column(col, overflow="fold")
    shown: dict[str, None] = {}
    for r in res.findings:
        if r["worker"] is not None:
            where = f"{r['campaign_step']:,} ({r['worker']}:{r['worker_step']:,})"
        else:
            where = "-"
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
        mark = "" if r["minimised"] else " (raw)"
        fl = r.get("flaws")
        flaws = "-" if fl is None else (flaw_origins_text(fl) if fl else "(combination)")
        for f in fl or []:
            if f != "fixed":
                shown[f] = None
        t.add_row(r["signature"], flaws, where, secs, r["agent"], f"{r['steps']}{mark}",
                  Path(r["file"]).name)
        for c in r.get("causes") or []:  # further causes of the signature (cause search)
            shown[c["flaw"]] = None
            how = c.get("how", "alone")
            label = (f"  {c['shows']} (cause search, masked; met as {r['signature']})"
                     if c.get("shows") else f"  {r['signature']} (cause search"
                     + (", leave-one-out)" if how == "leave-one-out" else ")"))
            t.add_row(label, flaw_origins_text([c["flaw"]]),
                      f"after op {c['context'] or '-'}", "-", r["agent"],
                      f"{c['steps']} (raw)", c["file"])
    print_table(t)
    if shown:
        of = f" of the {len(flaws_on)} on" if flaws_on else ""
        print(f"flaws demonstrated (switched on alone, the flaw reproduces a finding): "
              f"{len(shown)}{of}: {', '.join(sorted(shown))}")
        missing = [f for f in flaws_on if f not in shown]
        if missing:
            print(f"not demonstrated: {', '.join(missing)}")
    for e in res.errors:
        print(f"error: {e.strip().splitlines()[-1]}", file=sys.stderr)
    if res.findings:
        print(f"schedules: {res.out}/  (one minimised, replayable scenario per signature)")
        print(f"replay one: cowenv replay {res.findings[0]['file']} --trace")
    if res.interrupted:
        print(f"resume: run the same command again with --out {res.out}")


def _run_fuzz(a: argparse.Namespace) -> int:
    from .cli import EXIT_FAIL, EXIT_OK, BadInput

    if not 0 <= a.budget <= MAX_BUDGET:
        raise BadInput(f"--budget: expected 0 to {MAX_BUDGET:.0e}, got {a.budget}")
    if not 1 <= a.workers <= MAX_WORKERS:
        raise BadInput(f"--workers: expected 1 to {MAX_WORKERS}, got {a.workers}")
    if not 0 <= a.seed <= MAX_SEED:
        raise BadInput(f"--seed: expected 0 to 2**63-1, got {a.seed}")
    if not a.out.strip():
        raise BadInput("--out: expected a folder name, got ''")
    for flag, v in (("--minimise-seconds", a.minimise_seconds),
                    ("--cause-seconds", a.cause_seconds)):
        if not 0 <= v <= 86400:
            raise BadInput(f"{flag}: expected 0 to 86400 seconds, got {v:g}")
    akw: dict[str, Any] = {}
    if a.depth is not None:
        if a.agent != "pct":
            raise BadInput("--depth applies to --agent pct only")
        if a.depth < 1:
            raise BadInput("--depth: expected >= 1")
        akw["depth"] = a.depth
    model = str(Path(a.model).resolve()) if a.model else None
    env_kw = env_kwargs_from_args(a, default_env_kwargs())
    cfg = CampaignConfig(agent=a.agent, seed=a.seed, workers=a.workers, budget=a.budget,
                         env_kwargs=env_kw, agent_kwargs=akw, model=model,
                         teardown=a.teardown, minimise=not a.no_minimise,
                         minimise_seconds=a.minimise_seconds, cause_seconds=a.cause_seconds)
    try:
        with _backend_from_args(a, cfg.workers) as be:
            res = run_campaign(cfg, a.out, show=not a.quiet, backend=be)
    except CampaignError as e:
        raise BadInput(str(e)) from None
    if a.json:
        print(json.dumps(res.to_dict(), sort_keys=True))
    else:
        from .harness import Harness

        _print_summary(res, Harness(**env_kw).config.flaws)
    if res.interrupted:
        return 130 if not res.errors else EXIT_FAIL
    return EXIT_FAIL if res.errors else EXIT_OK


def _setup_train(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--steps", type=int, default=200_000, help="training steps (default 200000)")
    sp.add_argument("--out", default="runs/ppo.zip", help="model path (default runs/ppo.zip)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--log-dir", default="runs",
                    help="TensorBoard logs, checkpoints, evaluations (default runs/)")
    sp.add_argument("--each-flaw", action="store_true",
                    help="one vector-env slot per flaw of --flaws/--preset, each with that "
                         "flaw alone (a policy for finding any of them, not all at once)")
    sp.add_argument("--n-envs", type=int, help="vector env size (default 2, or one per flaw)")
    sp.add_argument("--teardown", type=int, default=32,
                    help="harness teardown actions at the end of each episode, as in "
                         "`cowenv fuzz` (default 32)")
    sp.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _backend_args(sp, "the vector env's slots step in Ray actors, the learner stays here")
    _env_args(sp)


def _run_train(a: argparse.Namespace) -> int:
    from .cli import EXIT_OK, BadInput
    from .kernel.config import PRESETS

    if not 1 <= a.steps <= MAX_TRAIN_STEPS:
        raise BadInput(f"--steps: expected 1 to {MAX_TRAIN_STEPS:.0e}, got {a.steps}")
    if a.n_envs is not None and not 1 <= a.n_envs <= MAX_WORKERS:
        raise BadInput(f"--n-envs: expected 1 to {MAX_WORKERS}, got {a.n_envs}")
    if not 0 <= a.seed <= MAX_SEED:
        raise BadInput(f"--seed: expected 0 to 2**63-1, got {a.seed}")
    for flag, v in (("--out", a.out), ("--log-dir", a.log_dir)):
        if not v.strip():
            raise BadInput(f"{flag}: expected a path, got ''")
    kw = env_kwargs_from_args(a, {})
    from .fileio import check_output_path

    why = check_output_path(a.out)
    if why is not None and "no such folder" not in why:  # the model's folder is created
        raise BadInput(f"--out: {a.out}: cannot write ({why})")
    log = Path(a.log_dir)
    if log.exists() and not log.is_dir():
        raise BadInput(f"--log-dir: {log} is a file (expected a folder)")
    configs: list[dict[str, Any]] = [kw]
    if a.each_flaw:
        flaws = kw.get("flaws")
        if flaws is None:
            flaws = list(PRESETS[kw.get("preset", "as-posted")][1])
        if not flaws:
            raise BadInput("--each-flaw: the configuration has no flaws")
        base = {k: v for k, v in kw.items() if k not in ("preset", "flaws", "variant")}
        configs = [{**base, "variant": "cowpte", "flaws": [f]} for f in flaws]
    try:
        from .env import CowEnv

        for c in configs:
            CowEnv(**c)
    except (TypeError, ValueError) as e:
        raise BadInput(env_error(e)) from None
    import cowenv_agents.ppo as ppo

    t0 = time.monotonic()
    run_name = Path(a.out).stem
    try:
        with _backend_from_args(a, a.n_envs or max(2, len(configs))) as be:
            path = ppo.train_ppo(configs, a.steps, a.out, seed=a.seed, n_envs=a.n_envs,
                                 log_dir=a.log_dir, run_name=run_name, teardown=a.teardown,
                                 vec_env=be.vec_env if be is not None else None)
    except CampaignError as e:
        raise BadInput(str(e)) from None
    secs = time.monotonic() - t0
    info = {"model": str(path), "steps": a.steps, "seconds": round(secs, 1),
            "log_dir": str(Path(a.log_dir) / run_name), "env_configs": configs}
    if a.json:
        print(json.dumps(info, sort_keys=True))
    else:
        print(f"trained {a.steps:,} steps in {secs:.0f}s -> {path}")
        print(f"TensorBoard: tensorboard --logdir {Path(a.log_dir) / run_name / 'tb'}")
        print(f"fuzz with it: cowenv fuzz --agent ppo --model {path}")
    return EXIT_OK


CLI_COMMANDS = {
    "fuzz": (_setup_fuzz, _run_fuzz, "run a fuzzing campaign; findings become replayable "
                                     "schedules"),
    "train": (_setup_train, _run_train, "train a MaskablePPO fuzzing agent"),
}
