"""Typed configuration: one YAML file per topology -> frozen dataclasses, one per concern.

Every process of a run reads the same file (``--config`` or ``APEX_CONFIG``) and may apply
``--set section.field=value`` overrides. Validation runs before anything starts and every
error names the field, the bad value and what is allowed (``ConfigError``; the CLI exits 2).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import hashlib
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the field and the bad value."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class RunConfig:
    method: str = "dqn"  # dqn | rainbow | apex | r2d2 | drqn | gorila (a label; nets/losses follow the sections)
    seed: int = 0  # base seed; actor i uses seed + 1000 * (i + 1)
    max_env_steps: int = 100_000  # the run ends cleanly when this many env steps (all actors) are done
    max_updates: int = 0  # learner stops after this many updates; 0 = no limit
    dir: str = "runs/{run_id}"  # checkpoints and logs; {run_id} is substituted
    run_id: str = ""  # namespaces shm segments and ipc paths; APEX_RUN_ID overrides; '' = derived
    device: str = "auto"  # auto | cpu | cuda | cuda:N  (learner device; actors always use the CPU)
    log_every_seconds: float = 5.0  # period of the one-line status on stdout
    torch_threads: int = 0  # torch threads of the learner / local trainer; 0 = auto (1 for MLP nets)


@dataclass(frozen=True)
class EnvConfig:
    id: str = "CartPole-v1"  # gymnasium id, Atari id (ALE/Pong-v5 or 'pong'), or 'package.module:Factory'
    num_envs: int = 1  # environments per actor (vectorised)
    frame_stack: int = 1  # k frames stacked on axis 1: obs shape = (k, *frame_shape)
    # --- Atari preprocessing (ignored for non-Atari envs)
    frame_skip: int = 4  # repeat each action; max-pool the last two frames
    noop_max: int = 30  # random no-ops at reset
    screen_size: int = 84  # square grayscale frames
    sticky_action_prob: float = 0.25  # ALE v5 default
    full_action_space: bool = False
    terminal_on_life_loss: bool = False  # training signal only; returns are reported per game
    clip_rewards: bool = False  # clip rewards to {-1, 0, 1} (returns are reported unclipped)
    max_episode_steps: int = 0  # truncate after this many agent steps; 0 = env default (Atari: 27000)
    backend: str = "auto"  # Atari only: auto | ale_vector | gymnasium
    # --- partial observability (DRQN paper)
    flicker_prob: float = 0.0  # whole observation zeroed with this probability
    mask_velocity: bool = False  # CartPole: hide the velocity entries
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # passed to a user's env factory / gym.make


@dataclass(frozen=True)
class NetworkConfig:
    torso: str = "auto"  # auto | mlp | nature_cnn  (auto: nature_cnn for image frames)
    hidden_sizes: tuple[int, ...] = (256, 256)  # MLP torso layers
    head_hidden: int = 512  # hidden width of the Q head (Nature DQN: 512); 0 = linear head
    dueling: bool = False  # Wang et al. 2016: V + A - mean(A)
    noisy: bool = False  # Fortunato et al. 2018: factorised Gaussian layers in the head
    noisy_sigma0: float = 0.5
    categorical: bool = False  # C51 (Bellemare et al. 2017)
    num_atoms: int = 51
    v_min: float = -10.0
    v_max: float = 10.0
    lstm_size: int = 0  # > 0: recurrent core after the torso (DRQN / R2D2)


@dataclass(frozen=True)
class ReplayConfig:
    capacity: int = 100_000  # transitions (or sequences for recurrent agents)
    prioritized: bool = True
    alpha: float = 0.6  # priority exponent
    beta: float = 0.4  # initial importance-sampling exponent
    beta_final: float = 1.0  # beta annealed linearly to this
    beta_anneal_updates: int = 0  # over this many learner updates; 0 = constant beta
    priority_eps: float = 1e-6  # added to |TD| before the exponent
    min_size: int = 1_000  # no sampling before this many items
    samples_per_insert: float = 0.0  # Reverb-style rate limit; 0 = off
    spi_error_buffer: float = 0.0  # tolerance around the ratio, in samples; 0 = derived
    n_step: int = 3
    gamma: float = 0.99
    sequence_length: int = 80  # R2D2: learning steps per sequence (burn-in excluded)
    sequence_period: int = 40  # R2D2: a new sequence starts every this many steps (overlap)
    burn_in: int = 40  # R2D2: steps replayed without gradient to warm the LSTM state
    batch_slots: int = 4  # shared-memory batch slots (K prefetched batches)
    snapshot_every_seconds: float = 0.0  # replay server: write run_dir/replay_snapshot.npz this often and on
    #   a clean stop, and restore it at start (unless --fresh / APEX_FRESH=1); 0 = off


@dataclass(frozen=True)
class LearnerConfig:
    batch_size: int = 64
    optimizer: str = "adam"  # adam | rmsprop
    lr: float = 1e-4
    adam_eps: float = 1.5e-4
    max_grad_norm: float = 10.0  # 0 = no clipping
    double_q: bool = True
    huber_delta: float = 1.0
    target_update_period: int = 1_000  # updates between target-network syncs
    train_every: int = 1  # local mode: env steps (per vector step) between updates
    updates_per_train: int = 1  # local mode: updates each time training runs
    publish_every: int = 10  # updates between weight publications
    checkpoint_every_updates: int = 0  # 0 = off
    checkpoint_every_seconds: float = 300.0  # 0 = off
    prefetch: int = 2  # sample requests kept in flight (distributed learner)
    max_nonfinite_in_row: int = 100  # stop with exit code 3 after this many non-finite losses in a row
    # --- R2D2 / DRQN
    value_rescale: bool = False  # h(x) = sign(x)(sqrt(|x|+1)-1) + eps x
    rescale_eps: float = 1e-3
    priority_eta: float = 0.9  # sequence priority: eta max|d| + (1-eta) mean|d|
    stored_state: bool = True  # R2D2 stored-state vs zero-state start
    drqn_update: str = "none"  # none | sequential | random (DRQN bootstrapped updates)
    # --- Gorila (Nair et al. 2015): N learners push gradients to a parameter server, which applies
    # them asynchronously (the optimizer above, same lr/eps) and syncs the target network every
    # target_update_period APPLIED updates (Algorithm 1: "every global N steps sync theta^-").
    gorila_staleness_bound: int = 32  # max applied updates a gradient may lag the master params (Gorila §4)
    gorila_stale_policy: str = "drop"  # beyond the bound: drop | downweight (scale by 1/(1+staleness))
    gorila_sync_every: int = 1  # learner steps between parameter/target refreshes (Algorithm 1: every step)
    # shared: every learner samples the one replay server; local: learner j hosts its own replay
    # (Gorila §3 bundles), fed by the actors routed to it (apex_local/roles/gorila_replay.py)
    gorila_replay: str = "shared"  # shared | local


@dataclass(frozen=True)
class ActorConfig:
    num_actors: int = 0  # N > 0: the paper's exact Ape-X ladder over N actors; 0: prefix-covering ladder
    exploration: str = "linear"  # linear | apex | none  (none: noisy nets)
    eps_start: float = 1.0  # linear decay (single-process DQN)
    eps_end: float = 0.05
    eps_decay_steps: int = 10_000
    apex_eps: float = 0.4  # Ape-X: eps_i = apex_eps ** (1 + apex_alpha * i / (N - 1))
    apex_alpha: float = 7.0
    flush_every: int = 50  # transitions batched per insert message
    sync_every: int = 400  # env steps between weight polls
    eval_epsilon: float = 0.001  # evaluator / eval command
    eval_episodes: int = 10
    eval_every_seconds: float = 30.0


@dataclass(frozen=True)
class TransportConfig:
    kind: str = "ipc"  # ipc | tcp
    host: str = "127.0.0.1"  # tcp bind/connect address
    base_port: int = 15_550  # tcp: replay = base, replay-sample = base + 1, ...
    ipc_dir: str = ""  # '' = $XDG_RUNTIME_DIR or /tmp, then apex-local/<run_id> (mode 0700)
    send_hwm: int = 64  # messages queued per socket before a sender blocks
    send_timeout_ms: int = 200  # a blocked send gives up after this (so signals are handled)
    max_message_bytes: int = 256 * 1024 * 1024  # ZMQ_MAXMSGSIZE on receiving sockets
    # Each actor writes its insert messages into its own shared-memory ring (sized to its messages,
    # at most this many MiB) and pushes only a reference (transport/insert_ring.py), when the replay
    # shares its /dev/shm (ipc, or tcp to loopback without CURVE, weights on the board); a message
    # that does not fit goes inline. 0 = always inline.
    insert_ring_mb: int = 32
    # Messages smaller than this go inline even with a ring: the copies a ring saves are
    # microseconds there, and a rate-limited CartPole Ape-X run (~3 KiB messages) made 15% fewer
    # updates through the ring than inline (docs/architecture.md, "Insert rings"). 0 = all.
    insert_ring_min_kb: int = 64
    request_timeout_ms: int = 2_000  # learner sample request retry (Lazy Pirate)
    # Remote actors (README "Remote actors (two hosts)"; keys from `apex-local keys --out DIR`).
    # '' = no CURVE. Set = every tcp socket is CURVE: the server cert with its secret key
    # (DIR/server.key_secret) where sockets bind (replay, learner); the public DIR/server.key
    # is enough on a host whose processes only connect (remote actors). Needs kind: tcp.
    curve_server_cert: str = ""
    curve_client_cert: str = ""  # this host's client secret cert (DIR/clients/client-K.key_secret)
    curve_authorized_dir: str = ""  # where sockets bind: client public certs let in (DIR/authorized)
    weights_transport: str = "board"  # board (shm, same host) | pub: actors subscribe to the learner's PUB
    allow_plaintext_remote: bool = False  # tcp to a non-loopback host without CURVE is refused unless true


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    base_port: int = 9_400  # replay +0, learner +1, evaluator +2, paramserver +3, actor i +100+i


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict:
        return _to_plain(self)

    @property
    def recurrent(self) -> bool:
        return self.network.lstm_size > 0


SECTIONS: dict[str, type] = {f.name: f.type for f in fields(Config)}  # type: ignore[misc]
_SECTION_TYPES = {
    "run": RunConfig, "env": EnvConfig, "network": NetworkConfig, "replay": ReplayConfig,
    "learner": LearnerConfig, "actor": ActorConfig, "transport": TransportConfig,
    "metrics": MetricsConfig,
}

# --------------------------------------------------------------------------- validation rules

_CHOICES = {
    ("run", "method"): ("dqn", "rainbow", "apex", "r2d2", "drqn", "gorila"),
    ("env", "backend"): ("auto", "ale_vector", "gymnasium"),
    ("network", "torso"): ("auto", "mlp", "nature_cnn"),
    ("learner", "optimizer"): ("adam", "rmsprop"),
    ("learner", "drqn_update"): ("none", "sequential", "random"),
    ("learner", "gorila_stale_policy"): ("drop", "downweight"),
    ("learner", "gorila_replay"): ("shared", "local"),
    ("actor", "exploration"): ("linear", "apex", "none"),
    ("transport", "kind"): ("ipc", "tcp"),
    ("transport", "weights_transport"): ("board", "pub"),
}
# (min, max, inclusive-min) for numbers; None = unbounded
_RANGES: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("run", "max_env_steps"): (1, None), ("run", "max_updates"): (0, None),
    ("run", "log_every_seconds"): (0, None), ("run", "torch_threads"): (0, 256),
    ("env", "num_envs"): (1, 4096), ("env", "frame_stack"): (1, 64), ("env", "frame_skip"): (1, 64),
    ("env", "noop_max"): (0, 1000), ("env", "screen_size"): (8, 512),
    ("env", "sticky_action_prob"): (0, 1), ("env", "flicker_prob"): (0, 1),
    ("env", "max_episode_steps"): (0, None),
    ("network", "noisy_sigma0"): (0, None), ("network", "num_atoms"): (2, 1001),
    ("network", "lstm_size"): (0, 65536), ("network", "head_hidden"): (0, 65536),
    ("replay", "capacity"): (1, None), ("replay", "alpha"): (0, None), ("replay", "beta"): (0, 1),
    ("replay", "beta_final"): (0, 1), ("replay", "beta_anneal_updates"): (0, None),
    ("replay", "priority_eps"): (0, None), ("replay", "min_size"): (1, None),
    ("replay", "samples_per_insert"): (0, None), ("replay", "spi_error_buffer"): (0, None),
    ("replay", "n_step"): (1, 1000), ("replay", "gamma"): (0, 1),
    ("replay", "sequence_length"): (1, 10_000), ("replay", "sequence_period"): (1, 10_000),
    ("replay", "burn_in"): (0, 10_000), ("replay", "batch_slots"): (1, 1024),
    ("replay", "snapshot_every_seconds"): (0, None),
    ("learner", "batch_size"): (1, 1_000_000), ("learner", "lr"): (0, None),
    ("learner", "adam_eps"): (0, None), ("learner", "max_grad_norm"): (0, None),
    ("learner", "huber_delta"): (0, None), ("learner", "target_update_period"): (1, None),
    ("learner", "train_every"): (1, None), ("learner", "updates_per_train"): (1, None),
    ("learner", "publish_every"): (1, None), ("learner", "checkpoint_every_updates"): (0, None),
    ("learner", "checkpoint_every_seconds"): (0, None), ("learner", "prefetch"): (1, 1024),
    ("learner", "max_nonfinite_in_row"): (1, None), ("learner", "rescale_eps"): (0, None),
    ("learner", "priority_eta"): (0, 1),
    ("learner", "gorila_staleness_bound"): (0, None), ("learner", "gorila_sync_every"): (1, None),
    ("actor", "num_actors"): (0, 4096), ("actor", "eps_start"): (0, 1), ("actor", "eps_end"): (0, 1),
    ("actor", "eps_decay_steps"): (1, None), ("actor", "apex_eps"): (0, 1),
    ("actor", "apex_alpha"): (0, None), ("actor", "flush_every"): (1, 1_000_000),
    ("actor", "sync_every"): (1, None), ("actor", "eval_epsilon"): (0, 1),
    ("actor", "eval_episodes"): (1, None), ("actor", "eval_every_seconds"): (0, None),
    ("transport", "base_port"): (1024, 65_000), ("transport", "send_hwm"): (1, None),
    ("transport", "insert_ring_mb"): (0, 65_536), ("transport", "insert_ring_min_kb"): (0, 1 << 20),
    ("transport", "send_timeout_ms"): (1, None), ("transport", "max_message_bytes"): (1024, None),
    ("transport", "request_timeout_ms"): (1, None),
    ("metrics", "base_port"): (1024, 65_000),
}
# Fields that must be strictly positive (a zero would make no sense).
_POSITIVE = {("learner", "lr"), ("network", "noisy_sigma0")}


def _transport_checks(cfg: Config) -> None:
    """CURVE / remote-actor settings (key files themselves are read by transport.curve)."""
    t = cfg.transport
    set_ = [f for f in ("curve_client_cert", "curve_authorized_dir") if getattr(t, f)]
    if set_ and not t.curve_server_cert:
        raise ConfigError(f"transport.{set_[0]} is set but transport.curve_server_cert is empty: CURVE needs "
                          "the server certificate too (see `apex-local keys`)")
    if t.curve_server_cert:
        if t.kind != "tcp":
            raise ConfigError(f"transport.curve_server_cert is set but transport.kind is '{t.kind}': CURVE keys need "
                              "transport.kind: tcp (ipc sockets are host-local, protected by their 0700 directory)")
        if not t.curve_client_cert:
            raise ConfigError("transport.curve_client_cert is empty: with CURVE every process that connects "
                              "(learner, actors) needs this host's client certificate (clients/client-K.key_secret "
                              "from `apex-local keys`)")
    if t.weights_transport == "pub" and cfg.run.method == "gorila":
        raise ConfigError("transport.weights_transport: pub is not supported with run.method gorila (the "
                          "parameter server publishes to the shared-memory board only); use board")
    if t.kind == "tcp" and not t.curve_server_cert and not t.allow_plaintext_remote:
        import ipaddress  # noqa: WPS433

        try:
            loopback = ipaddress.ip_address(t.host).is_loopback
        except ValueError:
            loopback = t.host == "localhost"
        if not loopback:
            raise ConfigError(
                f"transport.host '{t.host}' is not a loopback address and CURVE is off: inserts and weights would "
                "cross the network unauthenticated. Set transport.curve_server_cert / curve_client_cert / "
                "curve_authorized_dir (`apex-local keys`), or transport.allow_plaintext_remote: true")


def _cross_checks(cfg: Config) -> None:
    """Checks that involve more than one field."""
    _transport_checks(cfg)
    n, r = cfg.network, cfg.replay
    if n.categorical and not n.v_min < n.v_max:
        raise ConfigError(f"network.v_min ({n.v_min}) must be < network.v_max ({n.v_max})")
    if r.min_size > r.capacity:
        raise ConfigError(
            f"replay.min_size ({r.min_size}) exceeds replay.capacity ({r.capacity}): sampling would never start")
    if cfg.recurrent and cfg.env.frame_stack != 1 and cfg.run.method in ("r2d2", "drqn"):
        raise ConfigError(
            f"env.frame_stack={cfg.env.frame_stack} with a recurrent network: R2D2/DRQN use single frames "
            "(set env.frame_stack: 1)")
    if cfg.recurrent and r.sequence_period > r.sequence_length:
        raise ConfigError(
            f"replay.sequence_period ({r.sequence_period}) > replay.sequence_length ({r.sequence_length}): "
            "steps between sequences would never be replayed")
    if not cfg.recurrent and cfg.learner.drqn_update != "none":
        raise ConfigError("learner.drqn_update needs a recurrent network (network.lstm_size > 0)")
    if cfg.network.noisy and cfg.actor.exploration != "none":
        raise ConfigError(
            f"network.noisy is true but actor.exploration is '{cfg.actor.exploration}': noisy nets switch "
            "epsilon off (set actor.exploration: none)")
    if cfg.actor.eps_end > cfg.actor.eps_start:
        raise ConfigError(
            f"actor.eps_end ({cfg.actor.eps_end}) > actor.eps_start ({cfg.actor.eps_start})")
    if cfg.env.mask_velocity and "cartpole" not in cfg.env.id.lower():
        raise ConfigError(f"env.mask_velocity is only defined for CartPole, not env.id '{cfg.env.id}'")
    lc = cfg.learner
    if (cfg.run.method == "gorila" and lc.gorila_stale_policy == "drop"
            and lc.gorila_staleness_bound < lc.publish_every - 1):
        raise ConfigError(
            f"learner.gorila_staleness_bound ({lc.gorila_staleness_bound}) < learner.publish_every - 1 "
            f"({lc.publish_every - 1}) with gorila_stale_policy 'drop': gradients computed on the newest "
            "published weights could all be dropped (the parameter server would stop learning)")
    if lc.gorila_replay == "local" and cfg.run.method != "gorila":
        raise ConfigError(
            f"learner.gorila_replay 'local' needs run.method: gorila (got '{cfg.run.method}'): only Gorila "
            "learners host their own replay; set learner.gorila_replay: shared")
    if r.samples_per_insert > 0:
        from apex_local.replay.rate_limiter import check_rate_limit_settings  # noqa: WPS433

        check_rate_limit_settings(r.samples_per_insert, r.min_size, r.spi_error_buffer,
                                  batch_size=cfg.learner.batch_size)


# --------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(section: str, name: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` to ``tp`` or raise a ConfigError naming the field."""
    where = f"{section}.{name}"
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [
                v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of integers, got {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        out = tuple(_convert(section, name, item_tp, v) for v in value)
        if any(v <= 0 for v in out):
            raise ConfigError(f"{where}: sizes must be positive, got {list(value)!r}")
        return out
    if origin in (collections.abc.Mapping, dict) or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{where}: unsupported field type {tp!r}")  # pragma: no cover


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _did_you_mean(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _build_section(section: str, raw: Mapping[str, Any]) -> Any:
    cls = _SECTION_TYPES[section]
    types = _field_types(cls)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"section '{section}' must be a mapping of fields, got {raw!r}")
    kwargs = {}
    for key, value in raw.items():
        key = str(key)
        if key not in types:
            raise ConfigError(
                f"unknown key '{section}.{key}'{_did_you_mean(key, list(types))}; "
                f"allowed: {', '.join(sorted(types))}")
        kwargs[key] = _convert(section, key, types[key], value)
    obj = cls(**kwargs)
    for f in fields(cls):
        value = getattr(obj, f.name)
        choices = _CHOICES.get((section, f.name))
        if choices is not None and value not in choices:
            raise ConfigError(
                f"{section}.{f.name}: {value!r} is not allowed; choose one of {', '.join(choices)}"
                f"{_did_you_mean(str(value), choices)}")
        bounds = _RANGES.get((section, f.name))
        if bounds is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            lo, hi = bounds
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
                raise ConfigError(f"{section}.{f.name}: {value!r} is out of range; allowed {rng}")
            if value != value:  # NaN
                raise ConfigError(f"{section}.{f.name}: NaN is not allowed")
        if (section, f.name) in _POSITIVE and value <= 0:
            raise ConfigError(f"{section}.{f.name}: must be > 0, got {value!r}")
    return obj


def config_from_dict(data: Mapping[str, Any] | None) -> Config:
    """Build and validate a Config from a plain mapping (as loaded from YAML)."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"the config must be a mapping of sections, got {type(data).__name__}")
    for key in data:
        if key not in _SECTION_TYPES:
            raise ConfigError(
                f"unknown section '{key}'{_did_you_mean(str(key), list(_SECTION_TYPES))}; "
                f"allowed: {', '.join(_SECTION_TYPES)}")
    cfg = Config(**{name: _build_section(name, data.get(name) or {}) for name in _SECTION_TYPES})
    _cross_checks(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, str, str]:
    """'section.field=value' -> (section, field, raw value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must look like section.field (e.g. learner.batch_size)")
    section, name = parts
    if section not in _SECTION_TYPES:
        raise ConfigError(
            f"override {text!r}: unknown section '{section}'{_did_you_mean(section, list(_SECTION_TYPES))}")
    return section, name, value


def apply_overrides(data: dict, overrides: Sequence[str] | Mapping[str, Any] | None) -> dict:
    """Return a copy of ``data`` with overrides applied.

    ``overrides`` is a list of 'section.field=value' strings (values parsed as YAML scalars
    later, by the field's type) or a mapping {'section.field': value}.
    """
    out = {k: dict(v or {}) for k, v in data.items()}
    if not overrides:
        return out
    items = overrides.items() if isinstance(overrides, Mapping) else [
        (f"{s}.{f}", v) for s, f, v in map(parse_override, overrides)]
    for key, value in items:
        section, name, _ = parse_override(f"{key}=")
        out.setdefault(section, {})[name] = value
    return out


def load_config(path: str | os.PathLike | None = None,
                overrides: Sequence[str] | Mapping[str, Any] | None = None) -> Config:
    """Load a topology config. ``path`` defaults to ``$APEX_CONFIG``; then apply overrides.

    Raises ConfigError for a missing/malformed file, unknown keys (with a did-you-mean),
    wrong types and out-of-range values.
    """
    if path is None:
        path = os.environ.get("APEX_CONFIG")
        if not path:
            raise ConfigError("no config given: pass --config FILE or set APEX_CONFIG")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: malformed YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    for key in data:
        if key not in _SECTION_TYPES:
            raise ConfigError(
                f"{p}: unknown section '{key}'{_did_you_mean(str(key), list(_SECTION_TYPES))}; "
                f"allowed: {', '.join(_SECTION_TYPES)}")
        if data[key] is not None and not isinstance(data[key], dict):
            raise ConfigError(f"{p}: section '{key}' must be a mapping of fields, got {data[key]!r}")
    try:
        return config_from_dict(apply_overrides(data, overrides))
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def replace(cfg: Config, **overrides: Any) -> Config:
    """Return a validated copy with {'section.field': value} overrides."""
    return config_from_dict(apply_overrides(cfg.to_dict(), overrides))


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def run_id(cfg: Config) -> str:
    """The run id: ``APEX_RUN_ID`` if set, else ``run.run_id``, else derived from the config.

    Derived ids hash the resolved config, so every process of one honcho run (same file,
    same overrides) agrees without coordination. Only [A-Za-z0-9_-] are kept (it is used
    in shm segment names and paths).
    """
    rid = os.environ.get("APEX_RUN_ID") or cfg.run.run_id
    if not rid:
        rid = "r" + hashlib.sha1(dump_config(cfg).encode()).hexdigest()[:10]
    clean = "".join(c for c in rid if c.isalnum() or c in "_-")
    if not clean or len(clean) > 40:
        raise ConfigError(f"run id {rid!r} must be 1-40 characters of [A-Za-z0-9_-]")
    return clean


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.dir.replace("{run_id}", run_id(cfg)))
