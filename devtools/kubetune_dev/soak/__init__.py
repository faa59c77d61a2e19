"""The chaos soak: a stream of small FineTuneJobs on the dev cluster while a seeded schedule injects faults,
then invariants checked per job and a results file (`make soak`; `python -m kubetune_dev.soak`).

NOT part of the product, nor of `make test` (a 3-minute variant is one slow test). It runs from a checkout:
it drives the e2e tests' busy world (`tests.support.busy_world`) and their fault seams (`DevCluster`'s).

- `schedule`: the seeded plan: which jobs, and which fault when (pure).
- `faults`: one injector per fault kind, through the dev cluster's seams.
- `jobs`: the job stream (classification and detection, suspended, resumed, deleted) and what each saw.
- `invariants`: the checks, each a small function of observed facts returning a `Check`.
- `report`: soak/results.md.
- `runner`: all of it in order; `__main__`: the command line.
"""
