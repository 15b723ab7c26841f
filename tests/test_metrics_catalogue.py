"""The metric catalogue: code (apex_local.metrics.CATALOGUE) and docs/metrics.md list the same
series with the same type, unit, labels and exporting role; every name the code records is
catalogued; the process-level series (RSS, /dev/shm) are exported by every recorder."""
from __future__ import annotations

import re
import socket
import urllib.request
import uuid
from pathlib import Path

import pytest

from apex_local.metrics import CATALOGUE, PrometheusRecorder, Recorder, metric_roles, metric_unit

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "metrics.md"
HEADER = ["name", "type", "unit", "labels", "exported by", "meaning"]


def doc_table() -> dict[str, dict[str, str]]:
    """Rows of the table under '## Catalogue' in docs/metrics.md, keyed by metric name."""
    text = DOC.read_text()
    section = text.split("\n## Catalogue", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header == HEADER, f"docs/metrics.md catalogue header {header} != {HEADER}"
    assert set(rows[1].replace("|", "").strip()) <= set("-: "), "second row must be the separator"
    out = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(HEADER), f"bad row in docs/metrics.md: {line}"
        row = dict(zip(HEADER, cells))
        name = row["name"].strip("`")
        assert name not in out, f"{name} listed twice in docs/metrics.md"
        out[name] = row
    return out


def test_docs_table_lists_exactly_the_catalogue():
    docs = doc_table()
    missing, extra = set(CATALOGUE) - set(docs), set(docs) - set(CATALOGUE)
    assert not missing, f"in CATALOGUE but not in docs/metrics.md: {sorted(missing)}"
    assert not extra, f"in docs/metrics.md but not in CATALOGUE: {sorted(extra)}"


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_docs_row_matches_the_code(name):
    row, d = doc_table()[name], CATALOGUE[name]
    assert row["type"] == d.kind, name
    assert row["unit"] == metric_unit(name), name
    labels = [] if row["labels"] in ("", "-", "–") else [x.strip().strip("`") for x in row["labels"].split(",")]
    assert tuple(labels) == d.labels, name
    assert row["exported by"] == metric_roles(name), name
    assert row["meaning"], name


def test_units_are_base_units_in_the_name():
    for name in CATALOGUE:
        unit = metric_unit(name)
        stem = name.removesuffix("_total")
        if unit in ("seconds", "bytes"):
            assert stem.endswith("_" + unit), name
        assert not re.search(r"_(ms|milliseconds|kb|mb|mib|gib|minutes|hours|percent)(_|$)", name), name


_CALL = re.compile(r"""\.(?:inc|set|observe)\(\s*["'](apex_[a-z0-9_]+)["']""")


def test_every_recorded_name_in_the_code_is_catalogued():
    used = {}
    for folder in ("apex_local", "services"):
        for path in (ROOT / folder).rglob("*.py"):
            for name in _CALL.findall(path.read_text()):
                used.setdefault(name, str(path.relative_to(ROOT)))
    assert used, "found no recorder calls: the pattern is out of date"
    unknown = {n: p for n, p in used.items() if n not in CATALOGUE}
    assert not unknown, f"recorded but not in CATALOGUE (add them there and to docs/metrics.md): {unknown}"
    collected = [n for n in used if n in CATALOGUE and CATALOGUE[n].collected]
    assert not collected, f"process-level series are sampled by the recorder, never recorded: {collected}"


def test_core_series_of_design_section_8_are_catalogued():
    core = ["apex_actor_env_steps_total", "apex_actor_episode_return", "apex_actor_epsilon",
            "apex_actor_weights_version", "apex_replay_size", "apex_replay_inserted_total",
            "apex_replay_sampled_total", "apex_replay_rejected_messages_total", "apex_learner_updates_total",
            "apex_learner_loss", "apex_learner_weights_version", "apex_learner_batch_wait_seconds",
            "apex_paramserver_gradients_applied_total"]
    for name in core:
        assert name in CATALOGUE, name
    assert CATALOGUE["apex_replay_rejected_messages_total"].labels == ("reason",)
    assert CATALOGUE["apex_learner_batch_wait_seconds"].kind == "histogram"


# ---------------------------------------------------------------------- process-level series

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, float]:
    from apex_local.monitoring.scrape import parse_text

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {n + str(sorted(labels.items())): v for n, labels, v in parse_text(text)} | \
        {n: v for n, _, v in parse_text(text)}


def test_recorder_exports_rss_and_shm_of_the_process():
    from apex_local.monitoring import procstats
    from apex_local.transport.shm import Segment

    run = "tm" + uuid.uuid4().hex[:8]
    seg = Segment.create(f"apex_{run}_probe", 3 << 20)
    other = Segment.create(f"apex_{run}_other", 1 << 20)
    port = _free_port()
    rec = PrometheusRecorder("127.0.0.1", port, {"role": "replay", "index": "0"}, run_id=run)
    try:
        other.close()  # unmapped and unlinked: no longer counted anywhere
        seg.mmap[: 1 << 20] = b"\x01" * (1 << 20)  # touch 1 MiB: it shows up as RssShmem
        got = _scrape(port)
        labels = [("index", "0"), ("role", "replay")]
        assert got["apex_process_shm_bytes" + str(labels)] == 3 << 20
        assert got["apex_run_shm_bytes" + str(labels)] == 3 << 20
        rss = {k: got["apex_process_resident_memory_bytes" + str(sorted(labels + [("kind", k)]))]
               for k in ("anon", "file", "shmem")}
        assert rss["shmem"] >= 1 << 20 and rss["anon"] > 0
        # the prometheus_client process collector is there too, and agrees on the total
        assert abs(sum(rss.values()) - got["process_resident_memory_bytes"]) < 64 << 20
        assert procstats.mapped_shm()[f"apex_{run}_probe"] == 3 << 20
    finally:
        rec.close()
        seg.close()
    assert procstats.run_shm_bytes(run) == 0


def test_run_id_is_guessed_from_mapped_segments(tmp_path):
    from apex_local.monitoring.procstats import guess_run_id

    (tmp_path / "my_run").mkdir()
    assert guess_run_id(["apex_my_run_weights"], tmp_path) == "my_run"
    assert guess_run_id(["apex_r12ab_replay_obs"], tmp_path) == "r12ab"
    assert guess_run_id([], tmp_path) is None


def test_role_counters_start_at_zero_and_other_roles_stay_silent():
    port = _free_port()
    rec = PrometheusRecorder("127.0.0.1", port, {"role": "actor", "index": "2"})
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        rec.close()
    assert 'apex_actor_env_errors_total{index="2",role="actor"} 0.0' in text
    assert 'apex_actor_env_steps_total{index="2",role="actor"} 0.0' in text
    assert "\napex_replay_inserted_total{" not in text  # another role's counter: not exported
    assert "\napex_actor_epsilon{" not in text  # gauges appear when first set
    assert "_created" not in text


def test_collected_series_are_plain_catalogue_entries_for_the_in_memory_recorder():
    rec = Recorder()
    rec.set("apex_process_shm_bytes", 5.0)
    assert rec.get("apex_process_shm_bytes") == 5.0
