"""Accumulators on tiny hand-built trajectories (STYLE.md #10)."""
from __future__ import annotations

import numpy as np
import pytest

from apex_local.replay.accumulators import NStepAccumulator, SequenceAccumulator


class FakeVecEnv:
    """Same-step-autoreset vector env with zero-padded k-stacks of random frames (the
    observation contract of docs/architecture.md). Records every frame by (env, seq), the
    episode each frame belongs to, and every stack it produced keyed by its newest frame."""

    def __init__(self, num_envs: int, k: int, frame_shape=(3, 2), dtype=np.uint8, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.num, self.k, self.shape, self.dtype = num_envs, k, tuple(frame_shape), np.dtype(dtype)
        self.frames = [[] for _ in range(num_envs)]
        self.episode_of = [[] for _ in range(num_envs)]
        self.stacks: dict[tuple[int, int], np.ndarray] = {}
        self.ep = np.zeros(num_envs, int)
        self.cur = np.zeros((num_envs, k, *self.shape), self.dtype)

    def _new_frame(self, i: int) -> int:
        if self.dtype.kind == "u":
            f = self.rng.integers(1, 256, self.shape).astype(self.dtype)
        else:
            f = self.rng.normal(size=self.shape).astype(self.dtype)
        self.frames[i].append(f)
        self.episode_of[i].append(int(self.ep[i]))
        return len(self.frames[i]) - 1

    def _first_stack(self, i: int) -> np.ndarray:
        s = self._new_frame(i)
        st = np.zeros((self.k, *self.shape), self.dtype)
        st[-1] = self.frames[i][s]
        self.stacks[(i, s)] = st
        return st

    def reset(self) -> np.ndarray:
        for i in range(self.num):
            self.cur[i] = self._first_stack(i)
        return self.cur.copy()

    def step(self, done) -> tuple[np.ndarray, np.ndarray]:
        final = np.zeros_like(self.cur)
        for i in range(self.num):
            s = self._new_frame(i)
            st = np.concatenate([self.cur[i, 1:], self.frames[i][s][None]])
            self.stacks[(i, s)] = st
            if done[i]:
                final[i] = st
                self.ep[i] += 1
                st = self._first_stack(i)
            self.cur[i] = st
        return self.cur.copy(), final


def run_random(acc, env: FakeVecEnv, steps: int, seed: int = 1, p_end: float = 0.15, flush_every: int = 0,
               num_actions: int = 3, recurrent: bool = False):
    """Drive ``acc`` with ``env`` for ``steps``; returns the list of non-empty chunks."""
    rng = np.random.default_rng(seed)
    acc.reset(env.reset())
    chunks = []
    for t in range(steps):
        done = rng.random(env.num) < p_end
        term = done & (rng.random(env.num) < 0.5)
        kw = {}
        if recurrent:
            cur = [len(env.frames[i]) - 1 for i in range(env.num)]  # seq of the obs acted in
            kw = {"state_h": np.array([[i, env.ep[i], cur[i]] for i in range(env.num)], np.float32),
                  "state_c": -np.ones((env.num, 3), np.float32)}
        nxt, final = env.step(done)
        acc.step(rng.integers(0, num_actions, env.num), rng.normal(size=env.num), term, done & ~term,
                 nxt, final, **kw)
        if flush_every and rng.random() < 1 / flush_every:
            c = acc.flush()
            if c is not None:
                chunks.append(c)
    c = acc.flush()
    if c is not None:
        chunks.append(c)
    return chunks


def items(chunk, keys=("stream", "obs_seq", "next_seq", "action", "reward", "discount")):
    """Chunk items as sorted tuples of plain Python values (floats rounded)."""
    out = []
    for b in range(len(chunk["stream"])):
        row = []
        for key in keys:
            v = chunk[key][b]
            v = np.round(v.astype(np.float64), 5).tolist() if v.dtype.kind == "f" else v.tolist()
            row.append(tuple(v) if isinstance(v, list) else v)
        out.append(tuple(row))
    return sorted(out)


def drive(acc, obs0, steps):
    """steps: (action, reward, terminated, truncated, next_obs, final_obs[, extra kwargs]) per call."""
    acc.reset(obs0)
    for st in steps:
        acc.step(*st[:6], **(st[6] if len(st) > 6 else {}))
    return acc.flush()


def stack_obs(values, k):
    """(1, k, 1) float32 stack whose last frames are ``values`` (zero padded)."""
    s = np.zeros((1, k, 1), np.float32)
    s[0, k - len(values):, 0] = values
    return s


# ----------------------------------------------------------------------------- n-step
@pytest.mark.parametrize("ending,tail_discounts", [
    ("terminated", [0.0, 0.0, 0.0]),
    ("truncated", [0.125, 0.25, 0.5]),  # time limit: bootstrap from the final obs, d = g^m
])
def test_nstep_five_step_episode(ending, tail_discounts):
    # one env, k=2, n=3, gamma=0.5, rewards 1..5; frames seq 0 (reset), 1..4, 5 (final), 6 (next ep)
    acc = NStepAccumulator(1, n=3, gamma=0.5, frame_stack=2, frame_shape=(1,), frame_dtype=np.float32)
    steps = []
    for t in range(5):
        last = t == 4
        nxt = stack_obs([60.0], 2) if last else stack_obs([10.0 * t, 10.0 * (t + 1)], 2)
        final = stack_obs([40.0, 50.0], 2) if last else np.zeros((1, 2, 1), np.float32)
        steps.append(([t % 2], [t + 1.0], [last and ending == "terminated"],
                      [last and ending == "truncated"], nxt, final))
    chunk = drive(acc, stack_obs([0.0], 2), steps)
    d3, d4, d5 = tail_discounts
    assert items(chunk) == sorted([
        (0, (-1, 0), (2, 3), 0, 2.75, 0.125),  # 1 + .5*2 + .25*3
        (0, (0, 1), (3, 4), 1, 4.5, 0.125),  # 2 + .5*3 + .25*4
        (0, (1, 2), (4, 5), 0, 6.25, d3),  # 3 + .5*4 + .25*5, m=3
        (0, (2, 3), (4, 5), 1, 6.5, d4),  # 4 + .5*5, m=2
        (0, (3, 4), (4, 5), 0, 5.0, d5),  # m=1
    ])
    assert chunk["frame_seq"].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert chunk["frames"][:, 0].tolist() == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    assert "priority" not in chunk
    assert acc._stack.tolist() == [[-1, 6]]  # the next episode's first stack


@pytest.mark.parametrize("length,ending,expected", [
    # n=3, gamma=0.5, rewards 1, 2: (obs, next, R, d)
    (2, "terminated", [((0,), (2,), 2.0, 0.0), ((1,), (2,), 2.0, 0.0)]),
    (2, "truncated", [((0,), (2,), 2.0, 0.25), ((1,), (2,), 2.0, 0.5)]),
    (1, "truncated", [((0,), (1,), 1.0, 0.5)]),
    (1, "terminated", [((0,), (1,), 1.0, 0.0)]),
])
def test_episode_shorter_than_n(length, ending, expected):
    acc = NStepAccumulator(1, n=3, gamma=0.5, frame_stack=1, frame_shape=(1,), frame_dtype=np.float32)
    steps = [([0], [t + 1.0], [t == length - 1 and ending == "terminated"],
              [t == length - 1 and ending == "truncated"], stack_obs([t + 1.0], 1), stack_obs([t + 1.0], 1))
             for t in range(length)]
    chunk = drive(acc, stack_obs([0.0], 1), steps)
    got = [(o, nx, r, d) for _, o, nx, _, r, d in items(chunk)]
    assert got == sorted(expected)


def test_multiple_envs_ending_at_different_steps():
    # n=2, gamma=0.5, k=1. env0 terminates after step 2, then runs 2 steps of a new episode;
    # env1 is truncated after step 4. Frame seqs per env: 0 = reset, one per step, +1 per episode end.
    acc = NStepAccumulator(2, n=2, gamma=0.5, frame_stack=1, frame_shape=(1,), frame_dtype=np.float32)
    r0, r1 = [1, 2, 3, 10, 20], [1, 1, 1, 1, 1]
    obs = np.zeros((2, 1, 1), np.float32)
    steps = [([0, 1], [r0[t], r1[t]], [t == 2, False], [False, t == 4], obs, obs) for t in range(5)]
    chunk = drive(acc, obs, steps)
    assert items(chunk) == sorted([
        (0, (0,), (2,), 0, 2.0, 0.25), (0, (1,), (3,), 0, 3.5, 0.0), (0, (2,), (3,), 0, 3.0, 0.0),
        (0, (4,), (6,), 0, 20.0, 0.25),  # new episode starts at seq 4 (3 was the terminal frame)
        (1, (0,), (2,), 1, 1.5, 0.25), (1, (1,), (3,), 1, 1.5, 0.25), (1, (2,), (4,), 1, 1.5, 0.25),
        (1, (3,), (5,), 1, 1.5, 0.25), (1, (4,), (5,), 1, 1.0, 0.5),
    ])
    assert acc.pending == 0
    assert sorted(zip(chunk["frame_stream"].tolist(), chunk["frame_seq"].tolist())) == sorted(
        [(0, s) for s in range(7)] + [(1, s) for s in range(7)])


def test_frame_stack_4_padding_refs():
    acc = NStepAccumulator(1, n=1, gamma=0.9, frame_stack=4, frame_shape=(1,), frame_dtype=np.float32)
    z = np.zeros((1, 4, 1), np.float32)
    steps = [([0], [0.0], [t == 2], [False], z, z) for t in range(4)]
    chunk = drive(acc, z, steps)
    got = [(o, nx) for _, o, nx, *_ in items(chunk)]
    assert got == sorted([((-1, -1, -1, 0), (-1, -1, 0, 1)), ((-1, -1, 0, 1), (-1, 0, 1, 2)),
                          ((-1, 0, 1, 2), (0, 1, 2, 3)),  # terminal: next = final obs (seq 3)
                          ((-1, -1, -1, 4), (-1, -1, 4, 5))])  # new episode starts padded again


@pytest.mark.parametrize("kind", ["nstep", "sequence"])
def test_frames_sent_exactly_once_and_before_use(kind):
    if kind == "nstep":
        env = FakeVecEnv(3, k=4, frame_shape=(2, 3))
        acc = NStepAccumulator(3, n=3, gamma=0.99, frame_stack=4, frame_shape=(2, 3), frame_dtype=np.uint8)
    else:
        env = FakeVecEnv(3, k=1, frame_shape=(2, 3))
        acc = SequenceAccumulator(3, burn_in=1, sequence_length=4, period=2, gamma=0.99, frame_shape=(2, 3),
                                  frame_dtype=np.uint8, state_size=3)
    chunks = run_random(acc, env, 200, flush_every=4, recurrent=kind == "sequence")
    assert len(chunks) > 10
    sent: dict[tuple[int, int], int] = {}
    for c_idx, c in enumerate(chunks):
        for s, q, f in zip(c["frame_stream"].tolist(), c["frame_seq"].tolist(), c["frames"]):
            assert (s, q) not in sent, "frame re-sent"
            sent[(s, q)] = c_idx
            np.testing.assert_array_equal(f, env.frames[s][q])
        refs = c["obs_seq"] if kind == "sequence" else np.concatenate([c["obs_seq"], c["next_seq"]], 1)
        for s, row in zip(c["stream"].tolist(), refs):
            for q in row[row >= 0].tolist():
                assert sent[(s, q)] <= c_idx, "frame referenced before it was sent"
    for i in range(3):  # every frame the env produced was sent, in seq order within a stream
        assert [q for s, q in sent if s == i] == list(range(len(env.frames[i])))


@pytest.mark.parametrize("ending", ["terminated", "truncated"])
def test_nstep_priorities_from_q(ending):
    # n=2, gamma=0.5, A=2; actions 1, 0, 0; rewards 1, 2, 4; episode ends after step 2.
    acc = NStepAccumulator(1, n=2, gamma=0.5, frame_stack=1, frame_shape=(1,), frame_dtype=np.float32)
    z = np.zeros((1, 1, 1), np.float32)
    qs = [[[1.0, 2.0]], [[0.0, 4.0]], [[3.0, 1.0]]]  # Q(s_0), Q(s_1), Q(s_2)
    q_final = np.array([[5.0, 7.0]])
    acc.reset(z)
    pending = []
    for t, a in enumerate([1, 0, 0]):
        last = t == 2
        acc.step([a], [[1.0, 2.0, 4.0][t]], [last and ending == "terminated"], [last and ending == "truncated"],
                 z, z, q=np.array(qs[t]), q_final=q_final if last else None)
        pending.append(acc.pending)
    assert pending == [0, 0, 3]  # t=0's window fills at step 1 but waits one call for max Q(s_2)
    chunk = acc.flush()
    boot = 0.0 if ending == "terminated" else 7.0
    d = {"terminated": (0.0, 0.0), "truncated": (0.25, 0.5)}[ending]
    expected = sorted([
        ((0,), 2.0, abs(2.0 + 0.25 * 3.0 - 2.0)),  # R = 1 + .5*2, + g^2 max Q(s_2) - Q(s_0, 1)
        ((1,), 4.0, abs(4.0 + d[0] * boot - 0.0)),  # R = 2 + .5*4, - Q(s_1, 0)
        ((2,), 4.0, abs(4.0 + d[1] * boot - 3.0)),  # R = 4, - Q(s_2, 0)
    ])
    got = sorted(zip(map(tuple, chunk["obs_seq"].tolist()), chunk["reward"].tolist(),
                     np.round(chunk["priority"], 5).tolist()))
    assert got == expected
    assert chunk["priority"].dtype == np.float32


def test_q_must_be_consistent_and_q_final_required():
    acc = NStepAccumulator(1, n=2, gamma=0.5, frame_stack=1, frame_shape=(1,), frame_dtype=np.float32)
    z = np.zeros((1, 1, 1), np.float32)
    acc.reset(z)
    acc.step([0], [0.0], [False], [False], z, z, q=np.zeros((1, 2)))
    with pytest.raises(ValueError, match="every step"):
        acc.step([0], [0.0], [False], [False], z, z)
    with pytest.raises(ValueError, match="q_final"):
        acc.step([0], [0.0], [False], [True], z, z, q=np.zeros((1, 2)))
    with pytest.raises(ValueError, match="next_obs"):
        acc.step([0], [0.0], [False], [False], np.zeros((1, 2, 1), np.float32), z, q=np.zeros((1, 2)))
    with pytest.raises(RuntimeError, match="reset"):
        NStepAccumulator(1, 2, 0.5, 1, (1,), np.float32).step([0], [0.0], [False], [False], z, z)


# ----------------------------------------------------------------------------- sequences
def seq_acc(num_envs=1, burn_in=1, sequence_length=3, period=2):
    return SequenceAccumulator(num_envs, burn_in=burn_in, sequence_length=sequence_length, period=period,
                               gamma=0.9, frame_shape=(1,), frame_dtype=np.float32, state_size=2)


def seq_steps(length, ending, q=False, num_actions=2):
    """One env: actions t % 2, rewards t + 1, state_h = [t, 0] before acting at step t."""
    z = np.zeros((1, 1, 1), np.float32)
    out = []
    for t in range(length):
        last = t == length - 1
        kw = {"state_h": np.array([[t, 0.0]]), "state_c": np.array([[-t, 0.0]])}
        if q:
            kw["q"] = np.full((1, num_actions), 10.0 + t)
            kw["q_final"] = np.full((1, num_actions), 99.0)
        out.append(([t % 2], [t + 1.0], [last and ending == "terminated"], [last and ending == "truncated"],
                    z, z, kw))
    return out


def seq_items(chunk):
    keys = ("obs_seq", "action", "reward", "discount", "mask", "state_h")
    return [tuple(np.round(chunk[k][b].astype(np.float64), 5).tolist() if chunk[k].dtype.kind == "f"
                  else chunk[k][b].tolist() for k in keys) for b in range(len(chunk["stream"]))]


def test_sequence_shorter_than_T_is_padded_once():
    # T = 1 + 3 = 4, period 2; episode of 3 steps, terminated. Start 0: 3 real steps, 1 pad step.
    # Start 2 has 1 real step <= burn_in 1: nothing to learn, not emitted.
    acc = seq_acc()
    chunk = drive(acc, np.zeros((1, 1, 1), np.float32), seq_steps(3, "terminated"))
    assert seq_items(chunk) == [([0, 1, 2, 3, -1], [0, 1, 0, 0], [1.0, 2.0, 3.0, 0.0], [0.9, 0.9, 0.0, 0.0],
                                 [1.0, 1.0, 1.0, 0.0], [0.0, 0.0])]
    assert acc.skipped == 1
    assert chunk["obs_seq"].shape == (1, 5) and chunk["mask"].dtype == np.float32


def test_sequences_overlap_with_period_and_pad_at_the_end():
    # T = 4, period 2, episode of 9 steps truncated (obs 9 = final, seq 10 = next episode)
    acc = seq_acc()
    chunk = drive(acc, np.zeros((1, 1, 1), np.float32), seq_steps(9, "truncated"))
    g = 0.9
    assert seq_items(chunk) == [
        ([0, 1, 2, 3, 4], [0, 1, 0, 1], [1.0, 2.0, 3.0, 4.0], [g] * 4, [1.0] * 4, [0.0, 0.0]),
        ([2, 3, 4, 5, 6], [0, 1, 0, 1], [3.0, 4.0, 5.0, 6.0], [g] * 4, [1.0] * 4, [2.0, 0.0]),
        ([4, 5, 6, 7, 8], [0, 1, 0, 1], [5.0, 6.0, 7.0, 8.0], [g] * 4, [1.0] * 4, [4.0, 0.0]),
        # truncated: the last real step still bootstraps (discount gamma) from the final obs 9
        ([6, 7, 8, 9, -1], [0, 1, 0, 0], [7.0, 8.0, 9.0, 0.0], [g, g, g, 0.0], [1.0, 1.0, 1.0, 0.0], [6.0, 0.0]),
    ]  # start 8: 1 real step <= burn_in, skipped
    assert chunk["state_c"][:, 0].tolist() == [0.0, -2.0, -4.0, -6.0]
    assert "q" not in chunk


def test_sequences_never_cross_episodes_and_store_start_state():
    env = FakeVecEnv(3, k=1, frame_shape=(2,), dtype=np.float32, seed=3)
    acc = SequenceAccumulator(3, burn_in=2, sequence_length=5, period=3, gamma=0.99, frame_shape=(2,),
                              frame_dtype=np.float32, state_size=3)
    chunks = run_random(acc, env, 300, p_end=0.06, flush_every=5, recurrent=True)
    n = 0
    for c in chunks:
        for b in range(len(c["stream"])):
            i, refs, mask = int(c["stream"][b]), c["obs_seq"][b], c["mask"][b]
            length = int(mask.sum())
            assert length > 2 and mask[:length].all() and not mask[length:].any()
            assert (refs[:length + 1] >= 0).all() and (refs[length + 1:] == -1).all()
            eps = {env.episode_of[i][q] for q in refs[:length + 1].tolist()}
            assert len(eps) == 1, "sequence crosses an episode boundary"
            assert np.all(np.diff(refs[:length + 1]) == 1)
            ep = eps.pop()
            start = int(refs[0]) - env.episode_of[i].index(ep)  # episode step of the first obs
            h = c["state_h"][b]  # [env, episode, seq of the obs acted in] given at the start
            assert h.tolist() == [i, ep, refs[0]] and start % 3 == 0  # starts every period steps
            assert c["discount"][b][length:].tolist() == [0.0] * (7 - length)
            n += 1
    assert n > 50


def test_sequence_q_values_arrive_one_call_later():
    acc = seq_acc(burn_in=0, sequence_length=2, period=2)  # T = 2
    acc.reset(np.zeros((1, 1, 1), np.float32))
    steps = seq_steps(5, "truncated", q=True)
    pending = []
    for st in steps:
        acc.step(*st[:6], **st[6])
        pending.append(acc.pending)
    # start 0 is complete at step 1 but waits for Q(o_2), passed at step 2; starts 2, 4 at the end
    assert pending == [0, 0, 1, 1, 3]
    chunk = acc.flush()
    assert chunk["q"].shape == (3, 3, 2)
    assert chunk["q"][:, :, 0].tolist() == [[10.0, 11.0, 12.0], [12.0, 13.0, 14.0], [14.0, 99.0, 0.0]]
