"""`python -m kubetune_operator`: run the operator against the cluster kubectl would talk to.

With no arguments it logs in like kubectl (in-cluster ServiceAccount, else the kubeconfig) and serves
FineTuneJobs in every namespace; `--namespace` (repeatable) or KUBETUNE_NAMESPACES narrows that. kopf
serves a liveness endpoint (`--liveness`). The test harness (tests/operator/conftest.py) builds the
operator from the same `build_registry`, `build_runtime` and `kopf_settings`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence

import kopf
from kubernetes.config import ConfigException

from kubetune_operator import handlers
from kubetune_operator.diffbase import CarriedDiffBase
from kubetune_operator.hooks import Hooks
from kubetune_operator.kube import REPORTING_COMPONENT, Kube
from kubetune_operator.kube import login as kube_login
from kubetune_operator.metrics import OperatorMetrics, install_hooks
from kubetune_operator.runtime import Runtime
from kubetune_operator.settings import OperatorSettings, package_version, parse_list

logger = logging.getLogger("kubetune_operator")

DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"
# kopf accepts either kind of event to stop the operator or to say it is ready.
Flag = asyncio.Event | threading.Event
LoginFn = Callable[..., kopf.ConnectionInfo | None]
# gc.set_threshold: allocations between collections of the youngest generation, then how many
# collections of each generation before one of the next (Python's defaults: 700, 10, 10).
GC_THRESHOLDS = (20_000, 50, 100)


def build_registry(login: LoginFn = kube_login) -> kopf.OperatorRegistry:
    """Every handler the operator runs, on a registry of its own.

    `login` gives kopf its credentials: by default the ones the operator's own client uses, i.e.
    in-cluster ServiceAccount, else the kubeconfig $KUBECONFIG names when kopf logs in (a fresh
    registry has none of kopf's implicit login handlers).
    """
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(login)
    handlers.register(registry)
    return registry


def build_runtime(settings: OperatorSettings, kube: Kube, hooks: Hooks | None = None) -> Runtime:
    """What the handlers share; the hooks keep the Prometheus metrics in step with every job."""
    hooks = hooks or Hooks()
    metrics = OperatorMetrics(process_collectors=True)
    install_hooks(hooks, metrics)
    return Runtime(settings=settings, kube=kube, metrics=metrics, hooks=hooks)


def kopf_settings(runtime: Runtime | None = None) -> kopf.OperatorSettings:
    """kopf's settings for this operator (tests shorten the timeouts of a copy).

    kopf's bookkeeping lives in status.kopf (the CRD keeps that stanza): its diff base, which the
    launch's status write carries (`diffbase.CarriedDiffBase`; with `runtime`, its status writer does),
    and a handler's retry state, which a handler that succeeds at once never writes. (In annotations,
    kopf would also mark every new job as managed: one more write.)
    """
    settings = kopf.OperatorSettings()
    progress = kopf.StatusProgressStorage(name="kopf")
    settings.persistence.progress_storage = progress
    diffbase = CarriedDiffBase(progress)
    settings.persistence.diffbase_storage = diffbase
    if runtime is not None:
        runtime.status.diffbase = diffbase
    # The Events people read come from lifecycle; kopf adds only its handler errors.
    settings.posting.level = logging.ERROR
    settings.posting.reporting_component = REPORTING_COMPONENT
    settings.posting.reporting_instance = socket.gethostname()
    settings.posting.event_name_prefix = "kubetune-"
    # Watches are re-established regularly, so a silently dropped connection never stalls the operator.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    return settings


async def run_operator(
    runtime: Runtime,
    *,
    registry: kopf.OperatorRegistry,
    settings: kopf.OperatorSettings,
    liveness_endpoint: str | None = None,
    peering_name: str | None = None,
    stop_flag: Flag | None = None,
    ready_flag: Flag | None = None,
) -> None:
    """Run kopf with our handlers until `stop_flag` is set (or forever)."""
    namespaces = list(runtime.settings.namespaces)
    await kopf.operator(
        registry=registry,
        settings=settings,
        memo=kopf.Memo(runtime=runtime),
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=liveness_endpoint or None,
        # One replica (the chart's Deployment uses Recreate); peering only when asked for by name.
        standalone=peering_name is None,
        peering_name=peering_name,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_operator",
        description="The kubetune operator: runs FineTuneJobs as KubeRay RayJobs.",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="serve FineTuneJobs in this namespace only (repeatable; default: KUBETUNE_NAMESPACES, else all)",
    )
    parser.add_argument(
        "--liveness",
        default=os.environ.get("KUBETUNE_LIVENESS_URL", DEFAULT_LIVENESS),
        help=f"liveness endpoint URL kopf serves, '' for none (default: {DEFAULT_LIVENESS})",
    )
    parser.add_argument("--standalone", action="store_true", help="run without kopf peering (the default)")
    parser.add_argument("--peering", metavar="NAME", help="coordinate with other replicas via kopf's peering NAME")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (default: KUBETUNE_LOG_LEVEL, else INFO)")
    return parser.parse_args(argv)


def tune_garbage_collector() -> None:
    """Fewer, cheaper collections for a long-running process that holds every watched object.

    Profiled in a burst of 500 new jobs, Python's cyclic collector took about a third of the
    operator's CPU: with the default thresholds it ran every 700 allocations, and each collection of
    the older generations walked all of kopf's, the kubernetes library's and this package's import-time
    objects again. Those live as long as the process, so they are frozen out of collection, and the
    generations are collected less often (`GC_THRESHOLDS`). Nearly all of the operator's garbage has no
    reference cycles and is freed at once by reference counting; the rest waits a little longer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def configure_logging(level: str) -> None:
    kopf.configure(log_format=kopf.LogFormat.FULL, log_prefix=True)
    logging.getLogger().setLevel(level.upper())
    # kopf logs two or three routine INFO lines per handler run on every object ("Handler 'launch'
    # succeeded", "Creation is processed"); the operator's own lines say what happened to each job.
    # kopf's warnings and errors (a handler failing or retrying) stay; --log-level DEBUG shows all.
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("kopf.objects").setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))


async def serve(
    settings: OperatorSettings | None = None,
    *,
    kube: Kube | None = None,
    hooks: Hooks | None = None,
    liveness_endpoint: str | None = None,
    peering_name: str | None = None,
    stop_flag: Flag | None = None,
    ready_flag: Flag | None = None,
) -> None:
    """The whole operator, in the running event loop, until `stop_flag` is set.

    For embedding (the demo, end-to-end tests): `settings` default to the environment's and `kube` to
    the kubeconfig/in-cluster login, exactly as `python -m kubetune_operator` does.
    """
    settings = settings or OperatorSettings.from_env()
    own_kube = kube is None
    kube = kube or Kube.from_environment()
    logger.info(
        "kubetune operator %s: serving FineTuneJobs in %s; trainer image %s; progress endpoint %s",
        package_version(),
        ", ".join(settings.namespaces) or "all namespaces",
        settings.trainer_image,
        settings.progress_base_url or "none",
    )
    runtime = build_runtime(settings, kube, hooks)
    try:
        await run_operator(
            runtime,
            registry=build_registry(),
            settings=kopf_settings(runtime),
            liveness_endpoint=liveness_endpoint,
            peering_name=peering_name,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        if own_kube:
            kube.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = OperatorSettings.from_env()
    if args.namespace:
        settings = dataclasses.replace(settings, namespaces=parse_list(",".join(args.namespace)))
    configure_logging(args.log_level or settings.log_level)
    try:
        kube = Kube.from_environment()
    except ConfigException as exc:
        logger.error(
            "No Kubernetes credentials: not in a cluster, and no usable kubeconfig ($KUBECONFIG or ~/.kube/config): %s",
            exc,
        )
        return 1
    tune_garbage_collector()
    # kopf stops gracefully on SIGTERM/SIGINT; a second Ctrl-C lands here.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings, kube=kube, liveness_endpoint=args.liveness, peering_name=args.peering))
    kube.close()
    return 0
