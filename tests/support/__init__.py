"""What the tests share: the S3 and cluster worlds they run in, and where the repository is.

Test folders hold tests and their conftest.py only; every module a test imports besides the product lives
here (imported as `tests.support.<module>`; pyproject's `pythonpath` puts the repository on sys.path for
pytest, and `python -m pytest`/`python -m bench` from the repository root have it there anyway). The
fixtures every folder may use are in tests/conftest.py.

- `paths`: `REPO`, the repository root, whatever the working directory.
- `s3_world`: `S3World`, buckets seeded on moto's S3 server, IAM users, IAM enforced on demand.
- `operator_harness`: the real operator against kmock's API server (`OperatorHarness`, `running_operator`).
- `digits_world`, `shapes_world`: real data for training (scikit-learn's digits; drawn shapes with COCO
  boxes), and small models.
- `trainer_faults`: a worker failure on demand, through the trainer's test seam.
- `busy_world`, `scenarios`: the embedded dev cluster with several jobs at once, each in its own trouble.
- `observability_stands`: kmock answering TokenReviews, a fake clock, the Debian tools' paths.
- `live_operator`: the operator as main.py builds it, its metrics and progress endpoints on free ports.
- `chart_support`, `k8s_schema`, `operator_api`: the chart rendered, Kubernetes' schemas, the operator's API calls.
"""
