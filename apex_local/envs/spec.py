"""Environment ids and the static description of an environment (`EnvSpec`).

Three families of ids are accepted (see `describe_env_families`):

* Atari through ale-py: ``'ALE/Pong-v5'``, ``'PongNoFrameskip-v4'``, ``'Pong'`` or ``'pong'``
  all name the same game; preprocessing always comes from `EnvConfig` (Mnih et al. 2015),
  never from the version suffix.
* Any registered gymnasium id (``'CartPole-v1'``, ``'Acrobot-v1'``, ...).
* A user's environment: ``'package.module:ClassOrFactory'``.

An id that is none of these fails at once with the closest known names.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import re

import numpy as np
from apex_local.errors import BadInputError  # a ValueError; the CLI exits 2

__all__ = ["EnvSpec", "ResolvedId", "resolve_env_id", "describe_env_families", "ATARI_SCORES"]

# (random, human) per-game scores, the standard table of Mnih et al. 2015 / Wang et al. 2016,
# used to report human-normalised scores: (score - random) / (human - random).
ATARI_SCORES: dict[str, tuple[float, float]] = {
    "alien": (227.8, 7127.7), "amidar": (5.8, 1719.5), "assault": (222.4, 742.0),
    "asterix": (210.0, 8503.3), "asteroids": (719.1, 47388.7), "atlantis": (12850.0, 29028.1),
    "bank_heist": (14.2, 753.1), "battle_zone": (2360.0, 37187.5), "beam_rider": (363.9, 16926.5),
    "bowling": (23.1, 160.7), "boxing": (0.1, 12.1), "breakout": (1.7, 30.5),
    "centipede": (2090.9, 12017.0), "enduro": (0.0, 860.5), "freeway": (0.0, 29.6),
    "frostbite": (65.2, 4334.7), "gopher": (257.6, 2412.5), "gravitar": (173.0, 3351.4),
    "krull": (1598.0, 2665.5), "montezuma_revenge": (0.0, 4753.3), "ms_pacman": (307.3, 6951.6),
    "pong": (-20.7, 14.6), "private_eye": (24.9, 69571.3), "qbert": (163.9, 13455.0),
    "seaquest": (68.4, 42054.7), "space_invaders": (148.0, 1668.7), "tennis": (-23.8, -8.3),
    "venture": (0.0, 1187.5),
}


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """What the rest of the system needs to know about an environment, before building it.

    Observations are ``obs_shape == (frame_stack, *frame_shape)`` of ``obs_dtype``; actions are
    integers in ``[0, num_actions)``. ``env_id`` is the resolved id (``'ALE/Pong-v5'`` for any
    spelling of Pong). ``game`` is the ale-py ROM id for Atari (``'pong'``), else None.
    """

    obs_shape: tuple[int, ...]
    frame_shape: tuple[int, ...]
    frame_stack: int
    obs_dtype: np.dtype
    num_actions: int
    is_atari: bool
    env_id: str
    game: str | None = None
    random_score: float | None = None
    human_score: float | None = None

    def human_normalized(self, score: float) -> float | None:
        """(score - random) / (human - random), or None when the game is not in the table."""
        if self.random_score is None or self.human_score is None:
            return None
        return (score - self.random_score) / (self.human_score - self.random_score)


@dataclasses.dataclass(frozen=True)
class ResolvedId:
    """An env id sorted into its family. kind: 'atari' | 'gym' | 'custom'."""

    kind: str
    env_id: str
    game: str | None = None  # ale-py ROM id, Atari only


@functools.lru_cache(maxsize=1)
def _atari_tables() -> tuple[dict[str, str], dict[str, str]]:
    """(squashed game name -> ROM id, ROM id -> canonical 'ALE/Name-v5' id)."""
    import ale_py  # noqa: F401  (importing registers the ALE ids with gymnasium)
    import gymnasium as gym
    from ale_py import roms

    games = {g.replace("_", ""): g for g in roms.get_all_rom_ids()}
    canonical = {}
    for env_id, spec in gym.registry.items():
        game = (spec.kwargs or {}).get("game")
        if env_id.startswith("ALE/") and env_id.endswith("-v5") and game:
            canonical[game] = env_id
    return games, canonical


def _is_ale_entry(spec) -> bool:
    return "ale_py" in str(spec.entry_point)


def _squash_atari_name(name: str) -> str:
    """'ALE/MsPacman-v5', 'MsPacmanNoFrameskip-v4', 'ms_pacman' -> 'mspacman'."""
    name = name.removeprefix("ALE/")
    name = re.sub(r"-v\d+$", "", name)
    name = re.sub(r"(NoFrameskip|Deterministic)$", "", name)
    return name.replace("_", "").replace("-", "").lower()


def resolve_env_id(env_id: str) -> ResolvedId:
    """Sort ``env_id`` into a family, or raise ValueError listing close matches."""
    import gymnasium as gym

    raw = env_id.strip()
    if not raw:
        raise BadInputError("env.id is empty: give a gymnasium id, an Atari game or 'package.module:Factory'")
    games, canonical = _atari_tables()
    if ":" in raw:
        return ResolvedId("custom", raw)
    if raw in gym.registry:
        spec = gym.registry[raw]
        if _is_ale_entry(spec):
            game = spec.kwargs["game"]
            return ResolvedId("atari", canonical.get(game, raw), game)
        return ResolvedId("gym", raw)
    game = games.get(_squash_atari_name(raw))
    if game is not None:
        return ResolvedId("atari", canonical.get(game, f"ALE/{game}-v5"), game)
    raise BadInputError(unknown_id_message(raw))


def unknown_id_message(env_id: str) -> str:
    """Error text for an unknown id, with difflib close matches over gymnasium ids and ROM ids."""
    import gymnasium as gym

    games, _ = _atari_tables()
    candidates = [k for k, s in gym.registry.items() if not _is_ale_entry(s)]
    candidates += sorted(games.values())
    lowered = {c.lower(): c for c in candidates}
    close = [lowered[c] for c in difflib.get_close_matches(env_id.lower(), list(lowered), n=4, cutoff=0.6)]
    # 'ALE/Pongg-v5', 'SpaceInvader': compare the bare game name too
    close += [games[g] for g in difflib.get_close_matches(_squash_atari_name(env_id), list(games), n=2, cutoff=0.75)]
    close = list(dict.fromkeys(close))
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return (f"unknown env.id {env_id!r}: not a registered gymnasium id, an Atari game known to ale-py, "
            f"or 'package.module:Factory'.{hint} Run `apex-local envs` to list the families.")


def describe_env_families() -> str:
    """Human-readable list of the env families and example ids (the `apex-local envs` command)."""
    import gymnasium as gym

    games, _ = _atari_tables()
    classic = [k for k in ("CartPole-v1", "Acrobot-v1", "MountainCar-v0") if k in gym.registry]
    has_box2d = importlib.util.find_spec("Box2D") is not None
    lines = [
        "Environment families (env.id):",
        "",
        f"  Atari via ale-py ({len(games)} games), frames uint8 (k, screen, screen):",
        "    ALE/Pong-v5 | PongNoFrameskip-v4 | Pong | pong   (all the same game)",
        "    ALE/Breakout-v5, ALE/SpaceInvaders-v5, ALE/Seaquest-v5, ALE/Qbert-v5, ...",
        "    DQN preprocessing (Mnih et al. 2015): no-op starts, frame skip + max-pool, grayscale",
        "    resize, sticky actions, optional life-loss terminals and reward clipping.",
        "    env.backend: auto | ale_vector (ale_py.vector_env, C++ threads) | gymnasium (Python loop)",
        "",
        "  Gymnasium classic control, observations float32 (k, *obs_shape):",
        "    " + ", ".join(classic),
        "  Gymnasium Box2D: LunarLander-v3" + ("" if has_box2d else " (not installed: pip install 'gymnasium[box2d]')"),
        "  Any other registered gymnasium id with Discrete actions and Box/Discrete observations",
        "  (Discrete observations become one-hot vectors), e.g. FrozenLake-v1, Taxi-v4.",
        "",
        "  Your own environment: 'package.module:ClassOrFactory'",
        "    called with env.kwargs; must return a gymnasium.Env with a Discrete action space.",
        "",
        "  Partial observability (Hausknecht & Stone 2015, DRQN), on any family:",
        "    env.flicker_prob=p     each observed frame is zeroed with probability p",
        "    env.mask_velocity=true CartPole only: drop cart velocity and pole angular velocity",
        "                           (obs keeps [x, theta], frame shape (2,))",
    ]
    return "\n".join(lines)
