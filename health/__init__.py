"""Health checks: GPUs through NVML (or scripted states), the node, collectives and stragglers.

Entry points: health.preflight.run_preflight, health.monitor.HealthMonitor, health.actions.decide_health,
health.stragglers.StragglerTracker, health.collective.probe_collective, health.collective_local.run_local_probe.
"""
