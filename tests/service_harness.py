"""Start the services as real subprocesses for tests (loopback/ipc only), scrape their
metrics, stop them with signals and check that nothing is left behind."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import yaml

from apex_local.config import apply_overrides, config_from_dict
from apex_local.metrics import metrics_port

ROOT = Path(__file__).resolve().parents[1]
_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$')


def scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """{'name{labels}': value} and {'name': value summed over labels} from
    http://host:port/metrics; {} if nothing answers."""
    try:
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m or line.startswith("#"):
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        out[name + labels] = value
        out[name] = out.get(name, 0.0) + value
    return out


def free_port_block(size: int = 200) -> int:
    """A base port with ``size`` free ports above it (best effort)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        base = 20_000 + base % 30_000
        ok = True
        for p in (base, base + 1, base + 2, base + 3, base + 100, base + 101, base + 102):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port block")


class Topology:
    def __init__(self, tmp_path: Path, overrides: dict | None = None, base: str = "configs/apex_cartpole.yaml"):
        self.tmp = Path(tmp_path)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.run_id = "t" + uuid.uuid4().hex[:10]
        self.metrics_base = free_port_block()
        data = yaml.safe_load((ROOT / base).read_text())
        o = {"run.dir": str(self.tmp / "run"), "run.log_every_seconds": 1, "metrics.base_port": self.metrics_base,
             "actor.eval_every_seconds": 3}
        o.update(overrides or {})
        self.cfg = config_from_dict(apply_overrides(data, o))
        self.config_path = self.tmp / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(self.cfg.to_dict()))
        self.env = dict(os.environ, APEX_CONFIG=str(self.config_path), APEX_RUN_ID=self.run_id,
                        PYTHONUNBUFFERED="1")
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def start(self, role: str, index: int = 0, *extra: str) -> subprocess.Popen:
        name = f"{role}.{index}"
        log = self.tmp / f"{name}.log"
        self.logs[name] = log
        cmd = [sys.executable, "-m", f"services.{role}", "--index", str(index), *extra]
        p = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs[name] = p
        return p

    def start_honcho(self, concurrency: str) -> subprocess.Popen:
        """``honcho start -c CONCURRENCY`` on the repository's Procfile with this topology's
        config, in its own session; output in ``tmp/honcho.log`` (`honcho_log`)."""
        with open(self.tmp / "honcho.log", "wb") as out:
            return subprocess.Popen(["honcho", "start", "-f", str(ROOT / "Procfile"), "-d", str(ROOT), "-c",
                                     concurrency], cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def run_honcho(self, concurrency: str, timeout: float = 300) -> tuple[int | None, str]:
        """`start_honcho` and wait for it to end by itself: (exit code, honcho's output); a run
        still going after ``timeout`` is SIGKILLed (code None)."""
        p = self.start_honcho(concurrency)
        try:
            code = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        return code, self.honcho_log()

    def honcho_log(self) -> str:
        log = self.tmp / "honcho.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace") if name in self.logs else ""

    def metrics(self, role: str, index: int = 0) -> dict[str, float]:
        """`scrape` of the process's /metrics ({} while it does not answer)."""
        return scrape(metrics_port(self.metrics_base, role, index))

    def wait_for(self, predicate, timeout: float, what: str, interval: float = 0.5):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = predicate()
            if value:
                return value
            for name, p in self.procs.items():
                if p.poll() is not None and p.returncode != 0:
                    raise AssertionError(f"{name} exited {p.returncode} while waiting for {what}:\n{self.log(name)[-3000:]}")
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n" + self.dump())

    def dump(self) -> str:
        return "\n".join(f"--- {n}\n{self.log(n)[-1500:]}" for n in self.logs)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 3.0) -> dict[str, tuple[int | None, float]]:
        """Signal every live process; returns name -> (exit code, seconds to exit)."""
        t0 = time.monotonic()
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(sig)
        result = {}
        for name, p in self.procs.items():
            try:
                p.wait(timeout=max(0.01, timeout - (time.monotonic() - t0)))
                result[name] = (p.returncode, time.monotonic() - t0)
            except subprocess.TimeoutExpired:
                result[name] = (None, time.monotonic() - t0)
        return result

    def leftovers(self) -> list[str]:
        shm = [f for f in os.listdir("/dev/shm") if f.startswith(f"apex_{self.run_id}_")]
        from apex_local.transport.rundir import ipc_base

        d = ipc_base(self.cfg.transport.ipc_dir) / self.run_id
        return shm + ([str(p) for p in d.iterdir()] + [str(d)] if d.exists() else [])

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
        from apex_local.transport import clean

        clean(self.run_id)
