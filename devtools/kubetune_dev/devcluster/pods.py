"""What the kubelet does for a pod, done on this machine: resolve env, materialise volumes, mint tokens.

The KubeRay stand-in runs a RayJob's head (driver) and workers as local processes. A container's
`env` (with `secretKeyRef`, `configMapKeyRef`, `fieldRef`), `envFrom`, and its ConfigMap, Secret,
projected (incl. service-account token) and emptyDir volumes are resolved from the API into a
sandbox directory. Mount paths do not exist here, so every mount path is rewritten to its sandbox
directory in the entrypoint, the env values and the text of materialised files (the trainer config
in the head's env names the token file by its mount path, for instance). `/dev/shm` and `/tmp` exist on
this machine and are left alone: this machine's /tmp stands in for a pod's /tmp emptyDir, and Ray's
session dir (`/tmp/ray` in a pod) is a folder of its own per Ray head (`processes.RayHead`). Nothing here
enforces a pod's securityContext, an emptyDir's sizeLimit or an ephemeral-storage request.
"""

from __future__ import annotations

import base64
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_dev.devcluster.client import AsyncKube, path

log = logging.getLogger(__name__)

HOST_PATHS = ("/dev/shm", "/tmp", "/tmp/ray")


# As the kubelet expands env values: `$(VAR)` of a variable defined before it, `$$` a literal `$`.
_ENV_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand(value: str, defined: Mapping[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return defined.get(match.group(1), match.group(0))

    return _ENV_REFERENCE.sub(one, value)


class PodNotReadyError(Exception):
    """The pod cannot start yet (a missing Secret or ConfigMap): the kubelet would keep retrying."""


@dataclass
class Sandbox:
    """A pod's materialised volumes and the mount-path rewrites that point into them."""

    root: Path
    mounts: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Absolute, whatever the working directory: the driver runs in a folder of its own, and a mount
        # path rewritten to a relative folder would point nowhere there.
        self.root = self.root.resolve()

    def rewrite(self, text: str) -> str:
        for mount in sorted(self.mounts, key=len, reverse=True):
            text = text.replace(mount.rstrip("/"), str(self.mounts[mount]))
        return text


def parse_cpu(quantity: Any) -> float:
    text = str(quantity)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


def container_cpus(container: Mapping[str, Any], ray_start_params: Mapping[str, Any]) -> int:
    """The CPUs Ray would see in this container: rayStartParams num-cpus, else the CPU limit/request."""
    if "num-cpus" in ray_start_params:
        return math.ceil(float(ray_start_params["num-cpus"]))
    resources = container.get("resources") or {}
    for section in ("limits", "requests"):
        cpu = (resources.get(section) or {}).get("cpu")
        if cpu is not None:
            return max(math.ceil(parse_cpu(cpu)), 1)
    return 1


def main_container(template: Mapping[str, Any]) -> dict[str, Any]:
    containers = list(((template.get("spec") or {}).get("containers")) or [])
    if not containers:
        raise PodNotReadyError("the pod template has no containers")
    for container in containers:
        if container.get("name") in ("ray-head", "ray-worker"):
            return dict(container)
    return dict(containers[0])


class PodMaterialiser:
    """Resolves one pod template against the API into env vars and files under a sandbox."""

    def __init__(self, kube: AsyncKube, namespace: str, pod_name: str, sandbox: Sandbox) -> None:
        self.kube = kube
        self.namespace = namespace
        self.pod_name = pod_name
        self.sandbox = sandbox

    async def _object(self, plural: str, name: str, optional: bool) -> dict[str, Any] | None:
        obj = await self.kube.get(path("", "v1", plural, self.namespace, name))
        if obj is None and not optional:
            raise PodNotReadyError(f'{plural[:-1]} "{name}" not found')
        return obj

    async def _data(self, plural: str, name: str, optional: bool) -> dict[str, str] | None:
        obj = await self._object(plural, name, optional)
        if obj is None:
            return None
        if plural == "secrets":
            data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            data.update(obj.get("stringData") or {})
            return data
        return dict(obj.get("data") or {})

    async def env(self, container: Mapping[str, Any]) -> dict[str, str]:
        out: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for ref_key, plural in (("configMapRef", "configmaps"), ("secretRef", "secrets")):
                ref = source.get(ref_key)
                if ref:
                    data = await self._data(plural, ref["name"], bool(ref.get("optional")))
                    out.update({prefix + k: v for k, v in (data or {}).items()})
        for var in container.get("env") or []:
            name = var["name"]
            if "value" in var:
                out[name] = _expand(str(var["value"]), out)
                continue
            source = var.get("valueFrom") or {}
            for ref_key, plural in (("secretKeyRef", "secrets"), ("configMapKeyRef", "configmaps")):
                ref = source.get(ref_key)
                if ref:
                    optional = bool(ref.get("optional"))
                    data = await self._data(plural, ref["name"], optional)
                    if data is not None and ref["key"] in data:
                        out[name] = data[ref["key"]]
                    elif not optional:
                        raise PodNotReadyError(f'key "{ref["key"]}" not found in {plural[:-1]} "{ref["name"]}"')
            if "fieldRef" in source:
                out[name] = {
                    "metadata.name": self.pod_name,
                    "metadata.namespace": self.namespace,
                    "status.podIP": "127.0.0.1",
                    "status.hostIP": "127.0.0.1",
                    "spec.nodeName": "localhost",
                }.get(source["fieldRef"].get("fieldPath", ""), "")
        return {k: self.sandbox.rewrite(v) for k, v in out.items()}

    async def volumes(self, template: Mapping[str, Any], container: Mapping[str, Any]) -> None:
        spec = template.get("spec") or {}
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        service_account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        for mount in container.get("volumeMounts") or []:
            mount_path = mount["mountPath"]
            if mount_path in HOST_PATHS or mount_path in self.sandbox.mounts:
                continue
            volume = volumes.get(mount["name"])
            if volume is None:
                raise PodNotReadyError(f'volume "{mount["name"]}" is mounted but not defined')
            target = self.sandbox.root / "volumes" / volume["name"]
            target.mkdir(parents=True, exist_ok=True)
            await self._fill(volume, target, service_account)
            local = target / mount["subPath"] if mount.get("subPath") else target
            self.sandbox.mounts[mount_path] = local

    async def _fill(self, volume: Mapping[str, Any], target: Path, service_account: str) -> None:
        if "configMap" in volume:
            ref = volume["configMap"]
            await self._write_items(target, await self._data("configmaps", ref["name"], bool(ref.get("optional"))), ref)
        elif "secret" in volume:
            ref = volume["secret"]
            data = await self._data("secrets", ref["secretName"], bool(ref.get("optional")))
            await self._write_items(target, data, ref)
        elif "projected" in volume:
            for source in volume["projected"].get("sources") or []:
                if "serviceAccountToken" in source:
                    token_spec = source["serviceAccountToken"]
                    request = {
                        "apiVersion": "authentication.k8s.io/v1",
                        "kind": "TokenRequest",
                        "spec": {
                            "audiences": [token_spec["audience"]] if token_spec.get("audience") else [],
                            "expirationSeconds": int(token_spec.get("expirationSeconds") or 3600),
                        },
                    }
                    url = path("", "v1", "serviceaccounts", self.namespace, service_account) + "/token"
                    try:
                        response = await self.kube.request("POST", url, request)
                    except Exception as exc:
                        raise PodNotReadyError(
                            f'cannot mint a token for serviceaccount "{service_account}": {exc}'
                        ) from exc
                    file = target / token_spec["path"]
                    file.parent.mkdir(parents=True, exist_ok=True)
                    file.write_text(response["status"]["token"])
                for key, plural, name_key in (("configMap", "configmaps", "name"), ("secret", "secrets", "name")):
                    if key in source:
                        ref = source[key]
                        await self._write_items(
                            target, await self._data(plural, ref[name_key], bool(ref.get("optional"))), ref
                        )
        elif "emptyDir" in volume:
            pass  # the directory itself is the volume
        else:
            log.warning("volume %s of an unsupported type is left empty", volume.get("name"))

    async def _write_items(self, target: Path, data: Mapping[str, str] | None, ref: Mapping[str, Any]) -> None:
        if data is None:
            return
        items = ref.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] not in data:
                raise PodNotReadyError(f'key "{item["key"]}" not found for a volume')
            file = target / item["path"]
            file.parent.mkdir(parents=True, exist_ok=True)
            # Files may name other mount paths (a config naming the token file): point them here too.
            file.write_text(self.sandbox.rewrite(data[item["key"]]))

    def rewrite_files(self) -> None:
        """Rewrite mount paths in files written before every mount was known."""
        for local in set(self.sandbox.mounts.values()):
            if local.is_file():
                files = [local]
            elif local.is_dir():
                files = [f for f in local.rglob("*") if f.is_file()]
            else:
                files = []
            for file in files:
                try:
                    text = file.read_text()
                except UnicodeDecodeError:
                    continue
                rewritten = self.sandbox.rewrite(text)
                if rewritten != text:
                    file.write_text(rewritten)
