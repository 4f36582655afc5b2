"""Chaos drills: inject real faults into a supervised run on a seeded schedule, then check the run survived.

schedule: which fault when (pure); faults: the faults themselves (signals, files, mounts);
runner: launches `resilient run`, relaunches it like Slurm would, fires the schedule;
checks: the verdicts a drill must pass (finished, same digest, no orphans, every fault seen, goodput).
"""
