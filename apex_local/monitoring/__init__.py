"""Monitoring tools around the per-process ``/metrics`` endpoints (DESIGN.md §8).

- `procstats`: process RSS and /dev/shm usage read from /proc (sampled by the Prometheus
  recorder at scrape time, so roles record nothing for them);
- `scrape`: fetch and parse one endpoint's text exposition (no prometheus_client import);
- `targets`: the run's processes as a Prometheus file_sd target list (`apex-local targets`);
- `top`: a live terminal view of a running topology (`apex-local top`).
"""
