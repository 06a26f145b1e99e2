"""Real robot-manipulation trajectories from simulators that install from PyPI and render on CPU.

``generate`` runs a simulator with a scripted policy and writes the episodes in the format of ``rlvrw.data.rt1``
(``image`` (T, H, W, 3) uint8, ``action`` (T, A) float32, ``action[t]`` taken at frame t), then the action
statistics of the training split (``action_stats.json``) and a manifest (``generation.json``):

- ``"pusht"``: PushT (``gym-pusht``; pymunk physics, pygame software drawing). A = 2: the target position of the
  round agent, in the 512 x 512 arena's pixels. The scripted policy circles the T-shaped block to the side away from
  the goal and pushes it through its centre of mass towards the goal pose, with a little noise; the block moves in
  almost every episode. Each target is held for ``action_repeat`` environment steps (3: 3.3 frames/s, time for the
  agent to get near its target), so that consecutive frames differ: at one step per frame (10 Hz) copying the last
  frame scores a VGG LPIPS of 0.020 on 64 x 64 frames, at three 0.043. Episodes also store ``block_pose`` (T, 3):
  x, y, angle before each action.
- ``"metaworld"``: Meta-World (``metaworld``; MuJoCo rendered headless through EGL or OSMesa). A = 4: end-effector
  displacement and gripper effort in [-1, 1]. Meta-World's scripted expert policy of each task, with Gaussian noise
  (std ``METAWORLD_ACTION_NOISE``) on its actions; each action is held for ``action_repeat`` simulator steps (4:
  20 frames/s). Tasks alternate by episode (``tasks``); episodes also store ``task``. Frames from the ``corner4``
  camera, rotated upright (Meta-World's corner cameras render upside down), with shadows, reflections and
  multisampling off.

Frames are rendered at ``size`` (an int or (height, width)). Generation is deterministic given the seed: episode i
depends on (seed, i) alone, so the same seed gives byte-identical files whatever the number of worker processes.
``workers > 1`` runs episodes in that many spawned processes. Meta-World always renders in worker processes, never in
the caller's: once Mesa's software OpenGL (which links its own LLVM) is loaded, a later ``import triton`` crashes the
process, and rlvrw's kernels import triton. A progress bar shows episodes done. An interrupted run resumes: rerun it
with the same settings and only the missing episodes are generated.

``default_dataset()`` is the embedded data set of ``rlvrw train``: ``DEFAULT_DATASET`` (300 PushT episodes of 32
frames at 32 x 32), generated once into the cache directory (``rlvrw.files.cache_dir``).

Install the simulators with ``pip install gym-pusht metaworld`` (the ``sim`` extra). Headless rendering needs no
display: pygame uses ``SDL_VIDEODRIVER=dummy``; MuJoCo uses ``MUJOCO_GL`` when set, else EGL when libEGL is present,
else OSMesa (``apt-get install libegl1 libgl1-mesa-dri`` or ``libosmesa6``).
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import logging
import multiprocessing
import os
import time
import warnings
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from rlvrw import checks, files, usage
from rlvrw.files import cache_dir
from rlvrw.data.rt1 import STATS_FILE, dataset_action_stats, list_episodes, save_episode
from rlvrw.usage import MissingDependencyError, UsageError

logger = logging.getLogger(__name__)

SIMULATORS = ("pusht", "metaworld")
METAWORLD_TASKS = ("push-v3", "reach-v3", "drawer-open-v3", "button-press-topdown-v3")
METAWORLD_CAMERA = "corner4"
METAWORLD_ACTION_NOISE = 0.1
DEFAULT_ACTION_REPEAT = {"pusht": 3, "metaworld": 4}
SIM_PACKAGES = {"pusht": ("gym-pusht", "pymunk", "pygame"), "metaworld": ("metaworld", "mujoco")}
MANIFEST_FILE = "generation.json"
DEFAULT_DATASET = {"sim": "pusht", "episodes": 300, "frames_per_episode": 32, "size": 32, "seed": 0}

# PushT's scripted pusher, in arena pixels (the arena is 512 x 512, the agent's radius 15, the T 120 x 120).
PUSHT_ORBIT_RADIUS = (90.0, 110.0)  # distance from the block's centre while circling it; drawn per episode
PUSHT_ALIGN_ANGLE = 0.35  # radians: closer than this to the side opposite the goal, the agent pushes
PUSHT_ORBIT_STEP = 0.7  # radians of the circle covered per step while circling
PUSHT_PUSH_DEPTH = 40.0  # the push aims this far past the block's centre
PUSHT_MAX_MOVE = 60.0  # the target is at most this far from the agent, so the agent moves smoothly
PUSHT_NOISE = 3.0  # std of the noise on the target
PUSHT_T_CENTRE = np.array([0.0, 45.0])  # centre of mass of the T in its body frame (gym-pusht's geometry)


@dataclass(frozen=True)
class GenerationConfig:
    """What ``generate`` makes; the manifest records it, and a resumed run must match it."""

    sim: str
    episodes: int
    frames_per_episode: int
    size: tuple[int, int]
    seed: int
    tasks: tuple[str, ...]
    action_repeat: int
    camera: str

    def to_dict(self) -> dict:
        data = asdict(self)
        data["size"] = list(self.size)
        data["tasks"] = list(self.tasks)
        return data


def make_config(sim: str, episodes: int, frames_per_episode: int, size, seed: int, tasks=None,
                action_repeat: int | None = None) -> GenerationConfig:
    """Validate ``generate``'s settings."""
    checks.choice("sim", sim, SIMULATORS, error=UsageError)
    # episode 0 is a test episode; the statistics need another
    episodes = checks.integer("episodes", episodes, 2, error=UsageError)
    frames = checks.integer("frames_per_episode", frames_per_episode, error=UsageError)
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (size, size)
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise UsageError(f"size must be an int or (height, width), got {size!r}")
    size = (checks.integer("size", size[0], 8, error=UsageError), checks.integer("size", size[1], 8, error=UsageError))
    seed = checks.integer("seed", seed, 0, error=UsageError)
    repeat = DEFAULT_ACTION_REPEAT[sim] if action_repeat is None else checks.integer("action_repeat", action_repeat,
                                                                                      error=UsageError)
    if sim == "pusht":
        if tasks is not None:
            raise UsageError("tasks applies to sim='metaworld' only")
        return GenerationConfig(sim, episodes, frames, size, seed, (), repeat, "")
    tasks = METAWORLD_TASKS if tasks is None else tasks
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise UsageError(f"tasks must be a non-empty sequence of Meta-World task names, got {tasks!r}")
    return GenerationConfig(sim, episodes, frames, size, seed, tuple(tasks), repeat, METAWORLD_CAMERA)


def episode_seed(seed: int, index: int) -> int:
    """The seed of episode ``index``: independent streams for every (seed, index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def configure_headless() -> None:
    """Pick headless rendering back ends before pygame or MuJoCo is imported (settings already made are kept)."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    if "MUJOCO_GL" not in os.environ:
        os.environ["MUJOCO_GL"] = "egl" if ctypes.util.find_library("EGL") else "osmesa"


def _wrap_angle(angle: float) -> float:
    return (angle + np.pi) % (2 * np.pi) - np.pi


class PushTEpisodes:
    """Episodes of PushT with the scripted pusher; ``run(seed)`` returns one episode's arrays."""

    MAX_SUPERSAMPLE = 4  # small frames are drawn at up to 4x their size and area-averaged down, against aliasing

    def __init__(self, config: GenerationConfig):
        configure_headless()
        try:
            import cv2  # a dependency of gym-pusht
            from gym_pusht.envs.pusht import PushTEnv
        except ImportError as err:
            raise MissingDependencyError("sim='pusht' needs gym-pusht (pip install gym-pusht, or rlvrw[sim])") from err
        self.cv2 = cv2
        self.config = config
        height, width = config.size
        # gym-pusht draws a 512 x 512 arena and resizes it bilinearly; more than that adds nothing
        factor = min(self.MAX_SUPERSAMPLE, max(1, 512 // max(height, width)))
        self.env = PushTEnv(obs_type="pixels", observation_width=width * factor, observation_height=height * factor)

    def close(self) -> None:
        self.env.close()

    def _action(self, rng: np.random.Generator, orbit_radius: float) -> np.ndarray:
        block, env = self.env.block, self.env
        centre = np.array(block.local_to_world(block.center_of_gravity))
        goal_x, goal_y, goal_angle = env.goal_pose
        rotation = np.array([[np.cos(goal_angle), -np.sin(goal_angle)], [np.sin(goal_angle), np.cos(goal_angle)]])
        goal_centre = np.array([goal_x, goal_y]) + rotation @ PUSHT_T_CENTRE
        agent = np.array(env.agent.position)
        direction = goal_centre - centre
        direction /= np.linalg.norm(direction) + 1e-6
        offset = agent - centre
        agent_angle = np.arctan2(offset[1], offset[0])
        behind_angle = np.arctan2(-direction[1], -direction[0])
        turn = _wrap_angle(behind_angle - agent_angle)
        if abs(turn) > PUSHT_ALIGN_ANGLE:
            # circle the block towards the side opposite the goal, instead of pushing it the wrong way
            angle = agent_angle + np.sign(turn) * min(abs(turn), PUSHT_ORBIT_STEP)
            target = centre + orbit_radius * np.array([np.cos(angle), np.sin(angle)])
        else:
            target = centre + direction * PUSHT_PUSH_DEPTH
        move = target - agent
        distance = np.linalg.norm(move)
        if distance > PUSHT_MAX_MOVE:
            move *= PUSHT_MAX_MOVE / distance
        return np.clip(agent + move + rng.normal(0.0, PUSHT_NOISE, 2), 0.0, 512.0).astype(np.float32)

    def run(self, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        orbit_radius = rng.uniform(*PUSHT_ORBIT_RADIUS)
        observation, info = self.env.reset(seed=seed)
        frames, actions, poses = [], [], []
        for _ in range(self.config.frames_per_episode):
            frames.append(self.cv2.resize(observation, self.config.size[::-1], interpolation=self.cv2.INTER_AREA))
            poses.append(info["block_pose"])
            action = self._action(rng, orbit_radius)
            actions.append(action)
            for _ in range(self.config.action_repeat):
                observation, _, _, _, info = self.env.step(action)
        return {"image": np.stack(frames), "action": np.stack(actions), "block_pose": np.stack(poses)}


class MetaWorldEpisodes:
    """Episodes of Meta-World tasks with their scripted expert policies; ``run(seed, task)`` returns one episode.

    Use it in a process of its own (as ``generate`` does): with Mesa's OpenGL loaded, importing triton afterwards
    crashes the process.
    """

    def __init__(self, config: GenerationConfig):
        configure_headless()
        warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high", module="metaworld")
        try:
            import mujoco
            from metaworld import policies
            from metaworld.env_dict import ALL_V3_ENVIRONMENTS
        except ImportError as err:
            raise MissingDependencyError("sim='metaworld' needs metaworld (pip install metaworld, or "
                                         "rlvrw[sim])") from err
        self.mujoco = mujoco
        self.config = config
        self.envs = {}
        for task in config.tasks:
            if task not in ALL_V3_ENVIRONMENTS:
                raise UsageError(f"tasks: unknown Meta-World task {task!r} (known: {sorted(ALL_V3_ENVIRONMENTS)})")
            policy_name = "Sawyer" + "".join(part.capitalize() for part in task.split("-")) + "Policy"
            if not hasattr(policies, policy_name):
                raise UsageError(f"tasks: Meta-World task {task!r} has no scripted policy {policy_name}")
            self.envs[task] = (ALL_V3_ENVIRONMENTS[task], getattr(policies, policy_name)())
        self._live: dict[str, tuple] = {}

    def _open(self, task: str):
        """The task's environment and renderer, made on first use."""
        if task in self._live:
            return self._live[task]
        env_class, policy = self.envs[task]
        env = env_class()
        steps = self.config.frames_per_episode * self.config.action_repeat
        if steps > env.max_path_length:
            raise UsageError(f"frames_per_episode * action_repeat = {steps} exceeds Meta-World's episode limit "
                             f"{env.max_path_length}")
        # The set-up of Meta-World's own goal-observable environments: the expert policies read the goal from the
        # observation, and the initial positions are drawn from the environment's seeded generator at each reset.
        env._partially_observable = False
        del env.sawyer_observation_space
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env._set_task_called = True
        model = env.model
        height, width = self.config.size
        model.vis.quality.offsamples = 0
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, height)
        try:
            renderer = self.mujoco.Renderer(model, height, width)
        except Exception as err:  # the GL back end failed: say what to install or set
            raise RuntimeError(
                f"MuJoCo cannot render headless with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} ({err}); install EGL "
                "(apt-get install libegl1 libgl1-mesa-dri) or OSMesa (apt-get install libosmesa6) and set "
                "MUJOCO_GL=egl or MUJOCO_GL=osmesa"
            ) from err
        renderer.scene.flags[self.mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        renderer.scene.flags[self.mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._live[task] = (env, policy, renderer)
        return self._live[task]

    def _frame(self, renderer, env) -> np.ndarray:
        renderer.update_scene(env.data, camera=self.config.camera)
        frame = renderer.render()
        if self.config.camera.startswith("corner"):
            frame = frame[::-1, ::-1]  # these cameras are rolled by 180 degrees
        return np.ascontiguousarray(frame)

    def run(self, seed: int, task: str) -> dict[str, np.ndarray]:
        env, policy, renderer = self._open(task)
        rng = np.random.default_rng(seed)
        env.seed(seed)
        observation, _ = env.reset()
        frames, actions = [], []
        for _ in range(self.config.frames_per_episode):
            frames.append(self._frame(renderer, env))
            action = policy.get_action(observation) + rng.normal(0.0, METAWORLD_ACTION_NOISE, 4)
            action = np.clip(action, -1.0, 1.0).astype(np.float32)
            actions.append(action)
            for _ in range(self.config.action_repeat):
                observation, _, _, _, _ = env.step(action)
        return {"image": np.stack(frames), "action": np.stack(actions), "task": np.array(task)}

    def close(self) -> None:
        for env, _, renderer in self._live.values():
            renderer.close()
            env.close()
        self._live.clear()


def episode_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"episode_{index:06d}.npz"


def make_episodes(config: GenerationConfig) -> PushTEpisodes | MetaWorldEpisodes:
    return PushTEpisodes(config) if config.sim == "pusht" else MetaWorldEpisodes(config)


def write_episode(episodes: PushTEpisodes | MetaWorldEpisodes, out_dir: Path, index: int) -> int:
    """Generate episode ``index`` and write it; returns its number of frames."""
    config = episodes.config
    seed = episode_seed(config.seed, index)
    if config.sim == "pusht":
        arrays = episodes.run(seed)
    else:
        arrays = episodes.run(seed, config.tasks[index % len(config.tasks)])
    image, action = arrays.pop("image"), arrays.pop("action")
    save_episode(episode_path(out_dir, index), image, action, extras=arrays)
    return image.shape[0]


# Worker processes keep one simulator (and its environments) across the episodes they are given. It is made on the
# first episode, not in the pool's initializer: a Pool restarts workers whose initializer raises, forever.
_WORKER: dict = {}


def _worker_init(config: GenerationConfig, out_dir: str) -> None:
    _WORKER["config"] = config
    _WORKER["out_dir"] = Path(out_dir)


def _worker_episode(index: int) -> int:
    if "episodes" not in _WORKER:
        _WORKER["episodes"] = make_episodes(_WORKER["config"])
    return write_episode(_WORKER["episodes"], _WORKER["out_dir"], index)


def _versions(sim: str) -> dict[str, str]:
    versions = {}
    for package in ("numpy",) + SIM_PACKAGES[sim]:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _write_manifest(out_dir: Path, config: GenerationConfig, complete: bool, extra: dict | None = None) -> None:
    manifest = {"config": config.to_dict(), "complete": complete, "versions": _versions(config.sim), **(extra or {})}
    if config.sim == "metaworld":  # EGL and OSMesa need not render the same bytes
        manifest["mujoco_gl"] = os.environ.get("MUJOCO_GL")
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    files.write_bytes(out_dir / MANIFEST_FILE, text.encode("utf-8"))


def read_manifest(out_dir: str | Path) -> dict | None:
    """The manifest of a generated data set, or None when there is none."""
    path = Path(out_dir) / MANIFEST_FILE
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def generate(sim: str = "pusht", out_dir: str | Path | None = None, episodes: int = 300,
             frames_per_episode: int = 32, size=64, seed: int = 0, workers: int = 1, *, tasks=None,
             action_repeat: int | None = None, progress: bool = True) -> Path:
    """Generate ``episodes`` episodes of ``sim`` into ``out_dir`` (see the module doc); returns ``out_dir``.

    ``out_dir`` defaults to a directory named after the settings in the cache. A directory that already holds a
    complete data set with these settings is returned as it is; one with missing episodes is completed; one with
    other settings, or episode files without a manifest, raises ValueError.
    """
    config = make_config(sim, episodes, frames_per_episode, size, seed, tasks, action_repeat)
    workers = checks.integer("workers", workers, error=UsageError)
    configure_headless()  # here too, so that spawned workers inherit the choice and the manifest records it
    if out_dir is None:
        out_dir = cache_dir("sim", dataset_name(config))
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"out_dir must be a directory, got the file {str(out_dir)!r}")
    manifest = read_manifest(out_dir) if out_dir.is_dir() else None
    if manifest is not None and manifest.get("config") != config.to_dict():
        raise UsageError(f"out_dir {str(out_dir)!r} holds a data set generated with other settings "
                         f"({manifest.get('config')}); choose another out_dir")
    if manifest is not None and manifest.get("complete"):
        return out_dir
    if manifest is None and out_dir.is_dir() and list_episodes(out_dir):
        raise UsageError(f"out_dir {str(out_dir)!r} holds episode files but no {MANIFEST_FILE}; choose another "
                         "out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_manifest(out_dir, config, complete=False)

    pending = [i for i in range(config.episodes) if not episode_path(out_dir, i).exists()]
    bar = tqdm(total=config.episodes, initial=config.episodes - len(pending), desc=f"generating {config.sim}",
               unit="episode", disable=not progress)
    frames = 0
    started = time.perf_counter()
    try:
        if config.sim == "pusht" and (workers == 1 or len(pending) <= 1):
            simulator = make_episodes(config)
            try:
                for index in pending:
                    frames += write_episode(simulator, out_dir, index)
                    bar.update()
            finally:
                simulator.close()
        elif pending:
            # spawn, not fork: a forked child would share the parent's GL contexts and threads
            context = multiprocessing.get_context("spawn")
            with context.Pool(max(1, min(workers, len(pending))), initializer=_worker_init,
                              initargs=(config, str(out_dir))) as pool:
                for count in pool.imap_unordered(_worker_episode, pending):
                    frames += count
                    bar.update()
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    if pending:
        logger.info("generated %d %s episodes (%d frames) in %.1f s: %.1f frames/s", len(pending), config.sim,
                    frames, seconds, frames / max(seconds, 1e-9))
    stats = dataset_action_stats(out_dir, recompute=True)
    _write_manifest(out_dir, config, complete=True, extra={"action_dims": stats.action_dims})
    return out_dir


def dataset_name(config: GenerationConfig) -> str:
    """A directory name that tells data sets with different settings apart."""
    height, width = config.size
    name = (f"{config.sim}-{config.episodes}x{config.frames_per_episode}-{height}x{width}-repeat{config.action_repeat}"
            f"-seed{config.seed}")
    if config.sim == "metaworld":
        name += "-" + "+".join(config.tasks)
    return name


def default_dataset(progress: bool = True, workers: int = 1) -> Path:
    """The embedded data set of the main command (``DEFAULT_DATASET``), generated into the cache on first use."""
    return generate(**DEFAULT_DATASET, workers=workers, progress=progress)


# ---- the command ----------------------------------------------------------------------------------------------------
def add_cli(subparsers) -> None:
    """``rlvrw data generate | convert-rlds | check | frames``."""
    parser = subparsers.add_parser("data", help="generate simulator episodes, convert RT-1 from RLDS, check episodes",
                                   description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="data_command", required=True)

    gen = commands.add_parser("generate", help="write simulator episodes (npz) and their action statistics",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("--sim", choices=SIMULATORS, default=DEFAULT_DATASET["sim"])
    gen.add_argument("--out", default=None, help="directory (default: in the cache, named after the settings)")
    gen.add_argument("--episodes", type=int, default=DEFAULT_DATASET["episodes"])
    gen.add_argument("--frames", type=int, default=DEFAULT_DATASET["frames_per_episode"], help="frames per episode")
    gen.add_argument("--size", type=int, nargs=2, default=(DEFAULT_DATASET["size"],) * 2, metavar=("H", "W"))
    gen.add_argument("--seed", type=int, default=DEFAULT_DATASET["seed"])
    gen.add_argument("--workers", type=int, default=1, help="processes")
    gen.add_argument("--tasks", nargs="+", default=None,
                     help=f"Meta-World tasks (default: {' '.join(METAWORLD_TASKS)})")
    gen.add_argument("--action-repeat", type=int, default=None,
                     help="simulator steps per frame, each action held throughout (default: "
                          + ", ".join(f"{sim} {n}" for sim, n in DEFAULT_ACTION_REPEAT.items()) + ")")
    gen.set_defaults(func=_run_generate)

    convert = commands.add_parser("convert-rlds", help="Open X-Embodiment RLDS (e.g. RT-1) -> npz episodes; needs "
                                  "tensorflow_datasets")
    convert.add_argument("builder_dir", help="TFDS builder directory, e.g. .../fractal20220817_data/0.1.0")
    convert.add_argument("out", help="output directory")
    convert.add_argument("--max-episodes", type=int, default=None)
    convert.add_argument("--image-key", default="image", help="observation field with the frames")
    convert.set_defaults(func=_run_convert)

    check = commands.add_parser("check", help="read every episode file of a directory: count the corrupt ones and "
                                "print the action statistics")
    check.add_argument("root", help="directory of episode files")
    check.set_defaults(func=_run_check)

    frames = commands.add_parser("frames", help="the frames of one split of an episode directory as one npz "
                                 "(`image` (N, H, W, 3) uint8): the input of `rlvrw tokenizer --frames`")
    frames.add_argument("root", help="directory of episode files")
    frames.add_argument("out", help="output .npz")
    frames.add_argument("--split", choices=("train", "test", "all"), default="train")
    frames.set_defaults(func=_run_frames)


def _run_generate(args) -> int:
    out = generate(args.sim, args.out, args.episodes, args.frames, tuple(args.size), args.seed, args.workers,
                   tasks=args.tasks, action_repeat=args.action_repeat)
    print(f"{len(list_episodes(out))} episodes in {out}")
    return 0


def _run_convert(args) -> int:
    from rlvrw.data.rt1 import convert_rlds

    count = convert_rlds(args.builder_dir, args.out, max_episodes=args.max_episodes, image_key=args.image_key)
    print(f"{count} episodes in {args.out}")
    return 0


def export_frames(root: str | Path, out: str | Path, split: str = "train") -> int:
    """Write every frame of ``split``'s episodes under ``root``, in name order, to ``out`` as ``image`` (N, H, W, 3)
    uint8; corrupt episodes are reported, skipped and counted. Returns the number of frames."""
    from rlvrw.data.rt1 import CorruptEpisodeError, load_episode, split_episodes

    usage.output_file("out", out)
    images, skipped = [], 0
    for path in split_episodes(list_episodes(root), split):
        try:
            images.append(load_episode(path, action=False).image)
        except CorruptEpisodeError as err:
            skipped += 1
            logger.warning("skipping %s (%d skipped so far)", err, skipped)
    if not images:
        raise UsageError(f"root {str(root)!r} has no readable episodes in the {split!r} split")
    frames = np.concatenate(images)
    files.write_file(out, lambda f: np.savez(f, image=frames))
    return len(frames)


def _run_frames(args) -> int:
    count = export_frames(args.root, args.out, args.split)
    print(f"{count} frames of the {args.split} split of {args.root} in {args.out}")
    return 0


def _run_check(args) -> int:
    """Every episode file read whole: the corrupt ones named with their reason (see ``rlvrw.data.rt1``), the action
    statistics recomputed from the usable training files; exit code 1 when any file is corrupt."""
    from rlvrw.data.rt1 import check_episodes

    paths = list_episodes(args.root)
    if not paths:
        raise UsageError(f"root {args.root!r} holds no episode files (*.npz)")
    check = check_episodes(paths, image=True, actions=None, progress=True)
    print(f"{len(check.actions)} readable episode files, {len(check.corrupt)} corrupt")
    for why in check.corrupt.values():
        print(f"  corrupt: {why}")
    if check.action_dims is not None:
        try:
            stats = dataset_action_stats(args.root, recompute=True, check=check)
        except UsageError as err:  # no usable training file: the check's report says why; the statistics are left
            print(f"no action statistics: {err}")
            return 1
        print(f"action statistics ({stats.num_episodes} training episodes, {stats.num_steps} steps; written to "
              f"{Path(args.root) / STATS_FILE}):")
        print(f"  min {np.array2string(stats.low, precision=4)}")
        print(f"  max {np.array2string(stats.high, precision=4)}")
    return 1 if check.corrupt else 0
