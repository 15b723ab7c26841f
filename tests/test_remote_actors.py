"""Remote actors: `apex-local keys`, CURVE config and key-file errors, CURVE sockets that admit
only authorized keys, and real processes on two "hosts".

The process test puts the actors in their own network namespace joined to this one by a veth
pair (``ip netns`` + veth, created and removed by the test), so they reach the replay and the
learner only over tcp on the veth link. Where the machine does not allow that (not root, no
``ip``, no permission) it runs everything over loopback tcp with CURVE instead. Either way: an
actor with an authorized key contributes inserts and adopts weights from the learner's PUB
socket; actors with a wrong key or no key are refused at the handshake and insert nothing.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq

from service_harness import ROOT, Topology, free_port_block, scrape

from apex_local.config import ConfigError, TransportConfig, apply_overrides, config_from_dict
from apex_local.metrics import metrics_port
from apex_local.transport import (CurveKeyError, WeightsPublisher, WeightsSubscriber, auth_stats, check_key_files,
                                  generate_keys, make_socket, new_context)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def keyroot(tmp_path):
    """A directory for generated keys, removed after the test (secret keys are not left behind)."""
    d = tmp_path / "keyroot"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apex_local.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


# --------------------------------------------------------------------------- apex-local keys


def test_keys_cli_writes_private_files_and_refuses_to_overwrite(keyroot):
    out = keyroot / "keys"
    r = cli("keys", "--out", str(out), "--clients", "3")
    assert r.returncode == 0, r.stderr
    assert "curve_server_cert:" in r.stdout and "curve_authorized_dir:" in r.stdout
    expected = ["server.key", "server.key_secret", "authorized/client-1.key", "authorized/client-3.key",
                "clients/client-1.key_secret", "clients/client-3.key_secret", "clients/client-3.key"]
    for rel in expected:
        p = out / rel
        assert p.is_file() and str(p) in r.stdout, rel
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, (rel, oct(p.stat().st_mode))
    for d in (out, out / "authorized", out / "clients"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert len(list((out / "authorized").glob("*.key"))) == 3
    # zmq's own certificate format: load_certificate reads it, the secret belongs to the public key
    pub, sec = zmq.auth.load_certificate(str(out / "clients/client-2.key_secret"))
    assert zmq.curve_public(sec) == pub and zmq.auth.load_certificate(str(out / "authorized/client-2.key"))[0] == pub
    assert zmq.auth.load_certificate(str(out / "server.key"))[1] is None  # the public cert holds no secret

    before = (out / "server.key_secret").read_bytes()
    again = cli("keys", "--out", str(out))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr and "--force" in again.stderr
    assert (out / "server.key_secret").read_bytes() == before

    forced = cli("keys", "--out", str(out), "--force", "--clients", "1")
    assert forced.returncode == 0, forced.stderr
    assert (out / "server.key_secret").read_bytes() != before
    # clients 2 and 3 are no longer authorized (stale certs removed)
    assert sorted(p.name for p in (out / "authorized").iterdir()) == ["client-1.key"]
    assert not (out / "clients/client-3.key_secret").exists()
    assert stat.S_IMODE((out / "server.key_secret").stat().st_mode) == 0o600


# --------------------------------------------------------------------------- config and key-file errors


def _cfg(**transport):
    data = yaml.safe_load((ROOT / "configs/apex_cartpole.yaml").read_text())
    return config_from_dict(apply_overrides(data, {f"transport.{k}": v for k, v in transport.items()}))


@pytest.mark.parametrize("overrides, message", [
    ({"curve_server_cert": "/k/server.key_secret", "curve_client_cert": "/k/c"}, "transport.kind is 'ipc'"),
    ({"kind": "tcp", "curve_client_cert": "/k/c"}, "transport.curve_server_cert is empty"),
    ({"kind": "tcp", "curve_server_cert": "/k/server.key"}, "transport.curve_client_cert is empty"),
    ({"kind": "tcp", "host": "0.0.0.0"}, "transport.host '0.0.0.0' is not a loopback address"),
    ({"kind": "tcp", "host": "10.1.2.3"}, "allow_plaintext_remote"),
    ({"weights_transport": "shm"}, "transport.weights_transport"),
])
def test_bad_remote_actor_config_is_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        _cfg(**overrides)


def test_remote_actor_config_defaults_and_explicit_choices():
    t = _cfg().transport
    assert (t.weights_transport, t.curve_server_cert, t.allow_plaintext_remote) == ("board", "", False)
    assert _cfg(kind="tcp", host="10.1.2.3", allow_plaintext_remote=True).transport.host == "10.1.2.3"
    assert _cfg(kind="tcp", host="localhost").transport.host == "localhost"
    c = _cfg(kind="tcp", host="10.1.2.3", curve_server_cert="/k/server.key", curve_client_cert="/k/c",
             weights_transport="pub")
    assert c.transport.weights_transport == "pub"
    data = yaml.safe_load((ROOT / "configs/gorila_cartpole.yaml").read_text())
    with pytest.raises(ConfigError, match="weights_transport: pub is not supported with run.method gorila"):
        config_from_dict(apply_overrides(data, {"transport.weights_transport": "pub"}))


def test_bad_key_files_are_clear_errors(keyroot):
    ks = generate_keys(keyroot / "k", clients=1)
    good = dict(kind="tcp", curve_server_cert=str(ks.server_secret), curve_client_cert=str(ks.client_secrets[0]),
                curve_authorized_dir=str(ks.authorized_dir))
    assert len(check_key_files(TransportConfig(**good))) == 3
    garbage = keyroot / "garbage.key"
    garbage.write_text("metadata\ncurve\n    public-key = \"tooshort\"\n")
    bad_secret = keyroot / "bad.key_secret"
    text = Path(ks.client_secrets[0]).read_text()
    pub = zmq.auth.load_certificate(str(ks.client_secrets[0]))[0].decode()
    bad_secret.write_text(text.replace(pub, zmq.curve_keypair()[0].decode()))  # secret of another public key
    os.chmod(bad_secret, 0o600)
    open_secret = keyroot / "open.key_secret"
    shutil.copy(ks.client_secrets[0], open_secret)
    os.chmod(open_secret, 0o644)
    empty = keyroot / "empty_dir"
    empty.mkdir()
    cases = [
        ({"curve_client_cert": str(keyroot / "missing.key_secret")}, "transport.curve_client_cert: .*no such file"),
        ({"curve_client_cert": str(garbage)}, "transport.curve_client_cert: .*malformed certificate"),
        ({"curve_client_cert": str(bad_secret)}, "does not belong to its public-key"),
        ({"curve_client_cert": str(open_secret)}, "readable by group or others .*chmod 600"),
        ({"curve_client_cert": str(ks.client_publics[0])}, "transport.curve_client_cert: .*has no secret key"),
        ({"curve_client_cert": str(keyroot)}, "transport.curve_client_cert: .*cannot read"),
        ({"curve_authorized_dir": str(keyroot / "nope")}, "transport.curve_authorized_dir: .*no such directory"),
        ({"curve_authorized_dir": str(empty)}, "transport.curve_authorized_dir: .*no client certificate"),
    ]
    for change, message in cases:
        with pytest.raises(CurveKeyError, match=message):
            check_key_files(TransportConfig(**{**good, **change}))
    # a process that binds needs the server's secret; the public cert is refused there
    ctx = new_context()
    try:
        with pytest.raises(CurveKeyError, match="transport.curve_server_cert: .*has no secret key"):
            make_socket(ctx, "pull", TransportConfig(**{**good, "curve_server_cert": str(ks.server_public)}),
                        bind=f"tcp://127.0.0.1:{free_port_block()}")
        with pytest.raises(CurveKeyError, match="transport.curve_authorized_dir is empty"):
            make_socket(ctx, "pull", TransportConfig(**{**good, "curve_authorized_dir": ""}),
                        bind=f"tcp://127.0.0.1:{free_port_block()}")
    finally:
        ctx.term()
    # the CLI: check-config loads the key files and exits 2 naming the field
    r = cli("check-config", "configs/apex_cartpole.yaml", "--set", "transport.kind=tcp",
            "--set", f"transport.curve_server_cert={ks.server_public}",
            "--set", f"transport.curve_client_cert={keyroot / 'missing.key_secret'}")
    assert r.returncode == 2 and "transport.curve_client_cert" in r.stderr and "no such file" in r.stderr, r.stderr


# --------------------------------------------------------------------------- sockets


def _send_within(sock, data: bytes, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            sock.send(data)
            return True
        except zmq.Again:  # IMMEDIATE PUSH: no completed (authenticated) connection yet
            pass
    return False


def test_curve_sockets_admit_only_authorized_keys(keyroot):
    ks = generate_keys(keyroot / "k", clients=2)
    other = generate_keys(keyroot / "other", clients=1)
    port = free_port_block()
    server = TransportConfig(kind="tcp", curve_server_cert=str(ks.server_secret),
                             curve_client_cert=str(ks.client_secrets[0]), curve_authorized_dir=str(ks.authorized_dir))
    clients = {
        "good": TransportConfig(kind="tcp", curve_server_cert=str(ks.server_public),
                                curve_client_cert=str(ks.client_secrets[1])),
        "wrong": TransportConfig(kind="tcp", curve_server_cert=str(ks.server_public),
                                 curve_client_cert=str(other.client_secrets[0])),
        "none": TransportConfig(kind="tcp"),
    }
    sctx, cctx = new_context(), new_context()
    socks = []
    try:
        pull = make_socket(sctx, "pull", server, bind=f"tcp://127.0.0.1:{port}")
        n = 40_000  # 160 KB: more than one CURVE frame's worth of slack (the size limit applies on the wire)
        pub = WeightsPublisher(sctx, f"tcp://127.0.0.1:{port + 3}", server, numel=n, resend_seconds=0.05)
        socks += [pull, pub]
        pushes = {n: make_socket(cctx, "push", c, connect=f"tcp://127.0.0.1:{port}") for n, c in clients.items()}
        subs = {k: WeightsSubscriber(cctx, f"tcp://127.0.0.1:{port + 3}", c, numel=n) for k, c in clients.items()}
        socks += [*pushes.values(), *subs.values()]
        sent = {n: _send_within(s, n.encode(), 1.5) for n, s in pushes.items()}
        got = []
        while pull.poll(300):
            got.append(pull.recv())
        assert sent == {"good": True, "wrong": False, "none": False} and got == [b"good"], (sent, got)

        pub.publish(np.arange(n, dtype=np.float32), version=7)
        versions, out = {}, np.zeros(n, np.float32)
        end = time.monotonic() + 2.0
        while time.monotonic() < end and "good" not in versions:
            pub.tick()
            for k, s in subs.items():
                v = s.read(out)
                if v is not None:
                    versions[k] = (v, out.copy())
            time.sleep(0.02)
        time.sleep(0.3)
        for k in ("wrong", "none"):
            assert subs[k].read(out) is None
        assert list(versions) == ["good"] and versions["good"][0] == 7 and (versions["good"][1] == np.arange(n)).all()
        stats = auth_stats(sctx)
        assert stats["allowed"] >= 2 and stats["denied"] >= 2, stats  # push + sub each way (none: no ZAP call)
    finally:
        for s in socks:
            s.close()
        t0 = time.monotonic()
        sctx.term()  # stops the ZAP thread first; a running one would hang term()
        cctx.term()
        assert time.monotonic() - t0 < 2.0


# --------------------------------------------------------------------------- processes on two "hosts"


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=20)


class NetNs:
    """One network namespace ("host B") joined to this one ("host A") by a veth pair."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.name, self.veth_a, self.veth_b = f"apx{tag}", f"apx{tag}a", f"apx{tag}b"
        net = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
        self.host_a, self.host_b = f"{net}.1", f"{net}.2"
        try:
            _sh("ip", "netns", "add", self.name)
            _sh("ip", "link", "add", self.veth_a, "type", "veth", "peer", "name", self.veth_b)
            _sh("ip", "link", "set", self.veth_b, "netns", self.name)
            _sh("ip", "addr", "add", f"{self.host_a}/30", "dev", self.veth_a)
            _sh("ip", "link", "set", self.veth_a, "up")
            _sh("ip", "-n", self.name, "addr", "add", f"{self.host_b}/30", "dev", self.veth_b)
            _sh("ip", "-n", self.name, "link", "set", self.veth_b, "up")
            _sh("ip", "-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]  # execs the command: its pid is the Python process

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.veth_a], capture_output=True, timeout=20)  # removes both ends
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=20)


@pytest.fixture
def hosts():
    """(host A address, host B address, NetNs or None for loopback)."""
    ns = None
    if os.geteuid() == 0 and shutil.which("ip") and os.environ.get("APEX_TEST_NO_NETNS") != "1":
        try:
            ns = NetNs()
        except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as exc:
            print(f"ip netns not available here ({exc}); using loopback tcp with CURVE")
    try:
        yield (ns.host_a, ns.host_b, ns) if ns else ("127.0.0.1", "127.0.0.1", None)
    finally:
        if ns is not None:
            ns.remove()
            assert ns.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_remote_actor_with_the_right_key_contributes_wrong_or_no_key_inserts_nothing(tmp_path, keyroot, hosts):
    host_a, host_b, ns = hosts
    print(f"two hosts via {'ip netns + veth' if ns else 'loopback tcp'}: A={host_a} B={host_b}")
    keys = generate_keys(keyroot / "keys", clients=2)
    other = generate_keys(keyroot / "otherkeys", clients=1)  # a valid keypair the server never authorized
    t = Topology(tmp_path / "run", {
        "run.max_env_steps": 10**9, "replay.min_size": 300, "learner.batch_size": 32,
        "transport.kind": "tcp", "transport.host": host_a, "transport.base_port": free_port_block(),
        "transport.curve_server_cert": str(keys.server_secret),
        "transport.curve_client_cert": str(keys.client_secrets[0]),
        "transport.curve_authorized_dir": str(keys.authorized_dir)})
    base = t.cfg.to_dict()

    def host_b_config(name: str, **transport) -> Path:
        d = {k: dict(v) for k, v in base.items()}
        d["transport"].update(curve_authorized_dir="", **transport)
        d["metrics"]["host"] = host_b  # scraped from host A over the link
        path = t.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(d))
        return path

    good = host_b_config("good", curve_server_cert=str(keys.server_public),
                         curve_client_cert=str(keys.client_secrets[1]), weights_transport="pub")
    # The bad actors read weights from the /dev/shm board (shared by both namespaces of this one
    # machine) so that they step and try to insert: what is tested is the insert socket's refusal.
    wrong = host_b_config("wrong", curve_server_cert=str(keys.server_public),
                          curve_client_cert=str(other.client_secrets[0]))
    nokey = host_b_config("nokey", curve_server_cert="", curve_client_cert="", allow_plaintext_remote=True)

    def start_b(index: int, config: Path):
        name = f"actor.{index}"
        t.logs[name] = t.tmp / f"{name}.log"
        cmd = [*(ns.prefix() if ns else []), sys.executable, "-m", "services.actor", "--index", str(index)]
        t.procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=dict(t.env, APEX_CONFIG=str(config)),
                                         stdout=open(t.logs[name], "ab"), stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def actor(index: int) -> dict[str, float]:
        return scrape(metrics_port(t.metrics_base, "actor", index), host_b)

    try:
        t.start("replay")
        t.start("learner")
        start_b(1, wrong)
        start_b(2, nokey)
        # phase 1: only the bad actors; they step until their first flush, then their sends block
        for i in (1, 2):
            t.wait_for(lambda: actor(i).get("apex_actor_env_steps_total", 0) > 0, 45, f"bad actor {i} stepping")
        time.sleep(2.0)
        rep = t.metrics("replay")
        assert rep.get("apex_replay_inserted_total", -1) == 0 and rep.get("apex_replay_size", -1) == 0, rep
        assert all(actor(i).get("apex_actor_inserted_total", -1) == 0 for i in (1, 2))
        assert "CURVE: refused a client" in t.log("replay.0"), t.dump()  # the wrong key reached ZAP

        # phase 2: the actor with the authorized key, weights over PUB
        start_b(0, good)
        t.wait_for(lambda: t.metrics("replay").get("apex_replay_inserted_total", 0) >= 300, 60, "good inserts")
        t.wait_for(lambda: t.metrics("learner").get("apex_learner_updates_total", 0) >= 20, 60, "learner updates")
        t.wait_for(lambda: actor(0).get("apex_actor_weights_version", 0) >= 2, 60,
                   "the remote actor adopting trained weights from PUB")
        assert all(actor(i).get("apex_actor_inserted_total", -1) == 0 for i in (1, 2))
        rep = t.metrics("replay")
        assert rep.get("apex_replay_rejected_messages_total", 0) == 0, rep

        codes = t.stop(signal.SIGTERM)
        assert all(code == 0 for code, _ in codes.values()), (codes, t.dump())
        assert t.leftovers() == []
    finally:
        t.kill_all()
