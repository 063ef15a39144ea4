"""MaskablePPO (sb3-contrib): training, and a fuzzing agent sampling a trained policy.

Training logs to TensorBoard and writes checkpoints and evaluations.

Saved models are Stable-Baselines3 zip files, which contain **pickled** Python objects:
load only models you trust (ones you trained yourself). :class:`PPOAgent` refuses a
model whose observation or action space does not match the env.

Training (:func:`train_ppo`) runs ``n_envs`` copies of the env in a ``DummyVecEnv``
(one per entry of ``env_configs``, cycled: a policy can be trained on several flaw sets
at once) and writes, under ``log_dir/run_name``: TensorBoard events (``tb/``),
checkpoints every ``checkpoint_freq`` steps (``checkpoints/``), and periodic evaluation
on a separate env (``eval/evaluations.npz``, best model in ``best/``). A small callback
also logs how many distinct violation signatures each training episode found
(``cowenv/signatures_per_episode``).

This module imports torch and stable-baselines3; ``cowenv_agents`` imports it only when
the ``ppo`` agent or training is asked for.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import Agent

if TYPE_CHECKING:
    from sb3_contrib import MaskablePPO

    from cowenv.env import CowEnv

#: Env settings used for training unless overridden: keep going after a violation so
#: that an episode can earn several signatures, and pay a little for every preemption
#: label reached for the first time in the episode (a flaw-agnostic exploration bonus).
TRAIN_ENV_DEFAULTS: dict[str, Any] = {"terminate_on_violation": False, "novelty_coef": 1.0}


def _make_env(kwargs: dict[str, Any], teardown: int = 0) -> Any:
    import gymnasium as gym
    from stable_baselines3.common.monitor import Monitor

    import cowenv

    env = gym.make(cowenv.ENV_ID, **kwargs)
    if teardown > 0:
        env = _teardown_wrapper_class()(env, teardown)
    return Monitor(env)


def _teardown_wrapper_class() -> type:
    import gymnasium as gym

    from .base import Teardown

    class TeardownWrapper(gym.Wrapper):
        """Play the harness's teardown inside the agent's last step of an episode.

        Training then sees the episodes that :func:`~cowenv_agents.base.run_episode`
        plays (:class:`~cowenv_agents.base.Teardown`; rewards summed, violations merged).
        """

        def __init__(self, env: Any, reserve: int) -> None:
            super().__init__(env)
            self.reserve = int(reserve)
            self._n = 0
            self._td = Teardown()

        def reset(self, **kwargs: Any) -> Any:
            self._n = 0
            return self.env.reset(**kwargs)

        def action_masks(self) -> np.ndarray:
            return self.env.unwrapped.action_masks()

        def step(self, action: Any) -> Any:
            obs, r, term, trunc, info = self.env.step(action)
            self._n += 1
            base = self.env.unwrapped
            if term or trunc or self._n < base.max_steps - self.reserve:
                return obs, r, term, trunc, info
            vs = list(info.get("violations", []))
            total = float(r)
            while not (term or trunc):
                a = self._td.action(base, base.max_steps - self._n)
                if a is None:
                    trunc = True
                    break
                self._n += 1
                obs, r2, term, trunc, info = self.env.step(a)
                total += float(r2)
                vs.extend(info.get("violations", []))
            info = dict(info, violations=vs)
            return obs, total, term, trunc, info

    return TeardownWrapper


def _env_factory(kwargs: dict[str, Any], teardown: int = 0) -> Any:
    return lambda: _make_env(kwargs, teardown)


def _callback_class() -> type:
    from stable_baselines3.common.callbacks import BaseCallback

    class SignatureLogger(BaseCallback):
        """Log distinct violation signatures per finished training episode."""

        def __init__(self) -> None:
            super().__init__()
            self._seen: dict[int, set[str]] = {}
            self._done: list[int] = []

        def _on_step(self) -> bool:
            infos = self.locals.get("infos", [])
            dones = self.locals.get("dones", [])
            for i, info in enumerate(infos):
                s = self._seen.setdefault(i, set())
                for v in info.get("violations", []):
                    if v.get("kind") != "simulator":
                        s.add(v["signature"])
                if i < len(dones) and dones[i]:
                    self._done.append(len(s))
                    s.clear()
            if self._done and len(self._done) >= 8:
                self.logger.record("cowenv/signatures_per_episode", float(np.mean(self._done)))
                self._done.clear()
            return True

    return SignatureLogger


def train_ppo(env_configs: dict[str, Any] | Sequence[dict[str, Any]], steps: int,
              out: str | Path, *, seed: int = 0, n_envs: int | None = None,
              log_dir: str | Path = "runs", run_name: str = "ppo",
              checkpoint_freq: int = 20_000, eval_freq: int = 10_000, eval_episodes: int = 4,
              net_arch: Sequence[int] = (256, 256), n_steps: int = 256,
              learning_rate: float = 3e-4, ent_coef: float = 0.01, teardown: int = 0,
              torch_threads: int = 1, verbose: int = 0,
              vec_env: Callable[[list[Callable[[], Any]]], Any] | None = None) -> Path:
    """Train a MaskablePPO agent and save it (atomically) to ``out``.

    Args:
        env_configs: ``cowenv/CowPte-v0`` keyword arguments, or a list of them (one
            vector-env slot each, cycled up to ``n_envs``); :data:`TRAIN_ENV_DEFAULTS`
            fill in what is not given. All must give the same spaces.
        steps: Environment steps to train for (total over the vector env).
        out: Model path (``.zip`` is added if missing).
        seed: Seed of the model, the envs and the evaluation.
        n_envs: Vector env size (default: ``len(env_configs)``, at least 2).
        log_dir: Root for TensorBoard logs, checkpoints and evaluations.
        run_name: Sub-folder of ``log_dir`` for this run.
        checkpoint_freq: Save a checkpoint every this many steps (0 = never).
        eval_freq: Evaluate every this many steps (0 = never).
        eval_episodes: Episodes per evaluation.
        net_arch: Hidden layer sizes of the policy and value networks.
        n_steps: Rollout length per env.
        learning_rate: Adam learning rate.
        ent_coef: Entropy bonus (keeps the policy exploring).
        teardown: Actions at the end of each episode played by the harness's teardown
            (as :func:`~cowenv_agents.base.run_episode` with the same ``teardown``).
        torch_threads: ``torch.set_num_threads``.
        verbose: SB3 verbosity.
        vec_env: Builds the training vector env from one env factory per slot (default:
            SB3's ``DummyVecEnv``; :meth:`cowenv.ray_backend.RayBackend.vec_env` steps the
            slots in Ray actors). The evaluation env stays a local ``DummyVecEnv``.

    Returns:
        The path of the saved model.

    """
    import torch
    from sb3_contrib import MaskablePPO
    from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback
    from stable_baselines3.common.callbacks import CallbackList, CheckpointCallback
    from stable_baselines3.common.vec_env import DummyVecEnv

    torch.set_num_threads(max(1, int(torch_threads)))
    configs = [env_configs] if isinstance(env_configs, dict) else list(env_configs)
    if not configs:
        raise ValueError("env_configs: expected at least one configuration")
    configs = [{**TRAIN_ENV_DEFAULTS, **c} for c in configs]
    n = max(2, len(configs)) if n_envs is None else int(n_envs)
    if n < 1:
        raise ValueError("n_envs: expected >= 1")
    slots = [configs[i % len(configs)] for i in range(n)]
    venv = (vec_env or DummyVecEnv)([_env_factory(c, teardown) for c in slots])
    venv.seed(seed)
    root = Path(log_dir) / run_name
    model = MaskablePPO("MlpPolicy", venv, n_steps=n_steps, batch_size=min(256, n_steps * n),
                        n_epochs=4, learning_rate=learning_rate, ent_coef=ent_coef,
                        gamma=0.99, seed=seed, device="cpu", verbose=verbose,
                        policy_kwargs={"net_arch": list(net_arch)},
                        tensorboard_log=str(root / "tb"))
    callbacks: list[Any] = [_callback_class()()]
    if checkpoint_freq > 0:
        callbacks.append(CheckpointCallback(save_freq=max(1, checkpoint_freq // n),
                                            save_path=str(root / "checkpoints"),
                                            name_prefix="ppo"))
    if eval_freq > 0:
        eval_env = DummyVecEnv([_env_factory(configs[0], teardown)])
        eval_env.seed(seed + 1)
        callbacks.append(MaskableEvalCallback(
            eval_env, n_eval_episodes=eval_episodes, eval_freq=max(1, eval_freq // n),
            log_path=str(root / "eval"), best_model_save_path=str(root / "best"),
            deterministic=False, verbose=verbose))
    try:
        with warnings.catch_warnings():
            # A Ray vector env and the local evaluation env differ in type, on purpose.
            warnings.filterwarnings("ignore", "Training and eval env are not of the same type")
            model.learn(total_timesteps=int(steps), callback=CallbackList(callbacks),
                        tb_log_name="ppo", progress_bar=False)
        return save_model(model, out)
    finally:
        venv.close()


def save_model(model: MaskablePPO, out: str | Path) -> Path:
    """Save ``model`` atomically (temp file in the same folder, then rename)."""
    p = Path(out)
    if p.suffix != ".zip":
        p = p.with_name(p.name + ".zip")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.stem}.", suffix=".zip", dir=p.parent)
    os.close(fd)
    try:
        model.save(tmp)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def load_model(path: str | Path) -> MaskablePPO:
    """Load a saved model on the CPU. **Trusted input only** (the zip is pickle-based).

    Raises:
        FileNotFoundError: no such file.

    """
    from sb3_contrib import MaskablePPO

    p = Path(path)
    if not p.exists() and p.with_name(p.name + ".zip").exists():
        p = p.with_name(p.name + ".zip")
    if not p.is_file():
        raise FileNotFoundError(f"model: no such file: {path}")
    return MaskablePPO.load(str(p), device="cpu")


#: Activation modules :class:`NumpyActor` can evaluate (SB3's ``activation_fn`` choices
#: that are elementwise and parameter-free), by torch class name.
_NUMPY_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Tanh": np.tanh,
    "ReLU": lambda x: np.maximum(x, 0.0, dtype=x.dtype),
    "Identity": lambda x: x,
}


class NumpyActor:
    """The actor path of a trained MaskablePPO ``MlpPolicy``, evaluated with numpy.

    The same function as ``MaskableActorCriticPolicy`` computes for the action logits
    (``pi_features_extractor`` -> ``mlp_extractor.forward_actor`` -> ``action_net``), with
    the weights copied out of torch once, in float32 as torch computes them. For one
    observation at a time this is several times cheaper than the torch modules (no tensor
    conversion, no module dispatch): evaluation of a trained agent then costs about as
    much as the env step it chooses.

    Supported: a ``FlattenExtractor`` on a flat ``Box`` observation (SB3 does no
    normalisation on ``Box`` spaces), a policy MLP of ``Linear`` layers and the
    activations of :data:`_NUMPY_ACTIVATIONS`, a ``Linear`` action head.

    Args:
        policy: ``model.policy`` of a loaded ``MaskablePPO``.

    Raises:
        ValueError: the policy has another architecture (use the torch path).

    """

    def __init__(self, policy: Any) -> None:
        import torch
        from stable_baselines3.common.torch_layers import FlattenExtractor

        if not isinstance(policy.pi_features_extractor, FlattenExtractor):
            raise ValueError(f"policy: features extractor "
                             f"{type(policy.pi_features_extractor).__name__} (numpy actor "
                             f"supports FlattenExtractor only)")
        shape = getattr(policy.observation_space, "shape", None)
        if shape is None or len(shape) != 1:
            raise ValueError(f"policy: observation shape {shape} (numpy actor supports flat "
                             f"Box observations only)")
        #: ``("linear", W^T, b)`` or ``("act", fn, None)`` steps, in order.
        self.layers: list[tuple[str, Any, Any]] = []
        modules = [*policy.mlp_extractor.policy_net, policy.action_net]
        for m in modules:
            if isinstance(m, torch.nn.Linear):
                w = m.weight.detach().cpu().numpy().astype(np.float32).T.copy()
                b = (m.bias.detach().cpu().numpy().astype(np.float32) if m.bias is not None
                     else np.zeros(w.shape[1], np.float32))
                self.layers.append(("linear", w, b))
            elif type(m).__name__ in _NUMPY_ACTIVATIONS:
                self.layers.append(("act", _NUMPY_ACTIVATIONS[type(m).__name__], None))
            else:
                raise ValueError(f"policy: layer {type(m).__name__} (numpy actor supports "
                                 f"Linear and {', '.join(_NUMPY_ACTIVATIONS)})")

    def logits(self, obs: np.ndarray) -> np.ndarray:
        """Action logits (float32, one per catalogue entry) for one observation."""
        x = np.asarray(obs, dtype=np.float32).reshape(-1)
        for kind, a, b in self.layers:
            x = x @ a + b if kind == "linear" else a(x)
        return x


class PPOAgent(Agent):
    """Sample actions from a trained MaskablePPO policy (masked), with the episode's rng.

    The policy's action logits are computed once per step -- by default with
    :class:`NumpyActor` (the policy's weights in numpy), or with the torch modules
    (``backend="torch"``; the same function, to float32 rounding) -- illegal actions are
    masked out, and the action is drawn from the softmax with the episode's numpy
    generator, so episodes are reproducible from the campaign seed and diverse across
    episodes (the env is deterministic: a greedy policy would replay one schedule
    forever). ``deterministic=True`` takes the most likely legal action instead (SB3's
    ``predict(deterministic=True)``).

    Args:
        model: A model path (trusted input) or a loaded ``MaskablePPO``.
        temperature: Divide the logits by this (1 = the policy as trained).
        torch_threads: ``torch.set_num_threads`` for inference.
        backend: ``"numpy"``, ``"torch"``, or ``"auto"`` (numpy when the policy's
            architecture is one :class:`NumpyActor` supports, torch otherwise).
        deterministic: Take the argmax of the masked logits instead of sampling.

    """

    name = "ppo"
    needs_observation = True

    def __init__(self, model: str | Path | MaskablePPO, temperature: float = 1.0,
                 torch_threads: int = 1, backend: str = "auto",
                 deterministic: bool = False) -> None:
        super().__init__()
        import torch

        if temperature <= 0.0:
            raise ValueError("temperature: expected > 0")
        if backend not in ("auto", "numpy", "torch"):
            raise ValueError(f"backend: expected auto, numpy or torch, got {backend!r}")
        torch.set_num_threads(max(1, int(torch_threads)))
        self.model = load_model(model) if isinstance(model, str | Path) else model
        self.temperature = float(temperature)
        self.deterministic = bool(deterministic)
        self.actor: NumpyActor | None = None
        if backend != "torch":
            try:
                self.actor = NumpyActor(self.model.policy)
            except ValueError:
                if backend == "numpy":
                    raise
        #: The backend in use (``numpy`` or ``torch``).
        self.backend = "numpy" if self.actor is not None else "torch"
        self._checked = 0

    def check_env(self, env: CowEnv) -> None:
        """Raise ValueError if the model was trained for other spaces than ``env``'s."""
        ms, es = self.model.observation_space, env.observation_space
        if ms.shape != es.shape:
            raise ValueError(f"model: observation shape {ms.shape} does not match the env's "
                             f"{es.shape} (trained on another workload or limits?)")
        ma, ea = self.model.action_space, env.action_space
        if getattr(ma, "n", None) != getattr(ea, "n", None):
            raise ValueError(f"model: {getattr(ma, 'n', '?')} actions, the env has "
                             f"{getattr(ea, 'n', '?')}")

    def torch_logits(self, obs: np.ndarray) -> np.ndarray:
        """Action logits (float32) computed by the torch policy modules."""
        import torch

        policy = self.model.policy
        with torch.inference_mode():
            # The actor path of MaskableActorCriticPolicy.get_distribution, without
            # building distribution objects (4x faster per step); masking is done by
            # the caller.
            x = torch.as_tensor(obs, dtype=torch.float32).reshape(1, -1)
            features = policy.pi_features_extractor(x)
            logits = policy.action_net(policy.mlp_extractor.forward_actor(features))
            return logits[0].numpy()

    def logits(self, obs: np.ndarray) -> np.ndarray:
        """Action logits (float32, unmasked) with the agent's backend."""
        return self.actor.logits(obs) if self.actor is not None else self.torch_logits(obs)

    def probabilities(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Return the policy's masked action distribution (float64, sums to 1)."""
        z = self.logits(obs).astype(np.float64) / self.temperature
        z = np.where(mask, z, -np.inf)
        z -= z[mask].max()
        p = np.exp(z)
        return p / p.sum()

    def begin_episode(self, env: CowEnv, rng: np.random.Generator) -> None:  # noqa: D102
        super().begin_episode(env, rng)
        if self._checked != id(env):
            self.check_env(env)
            self._checked = id(env)

    def act(self, env: CowEnv, obs: np.ndarray, mask: np.ndarray) -> int:  # noqa: D102
        if self.deterministic:
            z = np.where(mask, self.logits(obs), -np.inf)
            return int(np.argmax(z))
        p = self.probabilities(obs, mask)
        return int(self.rng.choice(len(p), p=p))
