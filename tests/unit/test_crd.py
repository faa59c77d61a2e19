"""The CRD generated from the spec model: what `kubectl` users get, and proof it agrees with the model.

The API server cannot run here, so each of its checks is reproduced with a stand-in: kubernetes-validate
for the CRD object itself, jsonschema for the OpenAPI schema, cel-python for the CEL rules (after
applying the schema's defaults, as the API server does before validating).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from kubetune_operator import crd as crd_module
from kubetune_operator.crd import CRD_PATH, DOCS_PATH, crd, docs_with_reference, openapi_schema, render_crd
from kubetune_operator.messages import PATTERNS_IN_WORDS
from kubetune_operator.spec import MAX_NAME_LENGTH, FineTuneJob
from kubetune_operator.states import PHASES
from tests.support.paths import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
CORPUS = sorted((REPO / "tests" / "fixtures" / "invalid").glob("*.yaml"))
SCHEMA = openapi_schema()
# Corpus cases the API server decides before any CRD schema applies: it routes by apiVersion and kind,
# and a namespace with an invalid name cannot exist.
DECIDED_BEFORE_THE_SCHEMA = {"wrong-api-version", "wrong-kind", "namespace-invalid"}


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


def nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path, properties, items and map values included."""
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from nodes(child, f"{path}.{name}")
    if "items" in schema:
        yield from nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from nodes(schema["additionalProperties"], f"{path}{{}}")


# -- the committed files are the generated ones -------------------------------------------------------


def test_committed_crd_is_the_generated_one() -> None:
    assert (REPO / CRD_PATH).read_text() == render_crd(), "run: python -m kubetune_operator.crd --docs"


def test_docs_field_reference_is_current() -> None:
    text = (REPO / DOCS_PATH).read_text()
    assert text == docs_with_reference(text), "run: python -m kubetune_operator.crd --docs"
    assert "`spec.training.epochs` | integer | `10` | >= 1; <= 1000 |" in text


def test_check_mode_reports_a_stale_file_and_changes_nothing(tmp_path: Path) -> None:
    stale = tmp_path / "crd.yaml"
    stale.write_text("old\n")
    assert crd_module.main(["--output", str(stale), "--check"]) == 1
    assert stale.read_text() == "old\n"
    assert crd_module.main(["--output", str(stale)]) == 0
    assert crd_module.main(["--output", str(stale), "--check"]) == 0


# -- what kubectl users see ---------------------------------------------------------------------------


def test_names_scope_and_status_subresource() -> None:
    obj = crd()
    spec = obj["spec"]
    assert obj["metadata"]["name"] == "finetunejobs.kubetune.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "FineTuneJob",
        "listKind": "FineTuneJobList",
        "plural": "finetunejobs",
        "singular": "finetunejob",
        "shortNames": ["ftj"],
        "categories": ["kubetune"],
    }
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_printer_columns_read_fields_the_status_has() -> None:
    columns = crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    default = [c["name"] for c in columns if not c.get("priority")]
    wide = [c["name"] for c in columns if c.get("priority") == 1]
    assert default == ["Phase", "Progress", "Epoch", "Val-Acc", "Val-mAP", "Trials", "Best", "Age"]
    assert "Message" in wide
    paths = {p for p, _ in nodes(SCHEMA)}
    for column in columns:
        if column["jsonPath"] != ".metadata.creationTimestamp":
            assert column["jsonPath"] in paths, column
    assert dict(nodes(SCHEMA))[".status.phase"]["enum"] == list(PHASES)


def test_every_field_has_a_description_for_kubectl_explain() -> None:
    missing = [
        path
        for path, node in nodes(SCHEMA)
        # Kubernetes forbids anything but name/generateName restrictions under metadata.
        if not path.startswith(".metadata") and not path.endswith(("[]", "{}")) and not node.get("description")
    ]
    assert missing == []


def test_schema_is_structural() -> None:
    for path, node in nodes(SCHEMA):
        if node.get("x-kubernetes-preserve-unknown-fields") and "anyOf" in node:
            # Value alternatives (a number or auto): untyped, and no types inside anyOf.
            assert "type" not in node and all("type" not in branch for branch in node["anyOf"]), path
            continue
        assert "type" in node, f"{path} has no type"
        for keyword in ("$ref", "anyOf", "allOf", "oneOf", "not", "const", "title", "propertyNames"):
            assert keyword not in node, f"{path} has {keyword}"
        assert not ("properties" in node and "additionalProperties" in node), path
        for key in node:
            assert not key.startswith("x-") or key.startswith("x-kubernetes-"), f"{path}: {key}"
        if node["type"] in ("object",) and "properties" not in node and "additionalProperties" not in node:
            assert node.get("x-kubernetes-preserve-unknown-fields"), path


def test_defaults_bounds_enums_and_patterns_come_from_the_model() -> None:
    at = dict(nodes(SCHEMA))
    assert at[".spec.training.epochs"] | {} == {
        "type": "integer",
        "description": "Passes over the training data.",
        "default": 10,
        "minimum": 1,
        "maximum": 1000,
    }
    assert at[".spec.training"]["default"] == {}
    assert at[".spec.model.strategy"]["enum"] == ["head", "partial", "full"]
    assert at[".spec.data.validationSplit"]["exclusiveMinimum"] is True
    assert at[".spec.model.checkpoint"]["pattern"].startswith("^s3://")
    assert at[".spec.data.train"]["pattern"].startswith("^s3://")
    assert at[".status.conditions"]["x-kubernetes-list-type"] == "map"
    assert at[".status.conditions[].lastTransitionTime"]["format"] == "date-time"
    assert at[".metadata.name"]["maxLength"] == MAX_NAME_LENGTH
    assert "default" not in at[".spec.model"], "a required section needs no default"


def test_every_pattern_is_explained_in_words() -> None:
    patterns = {node["pattern"] for _, node in nodes(SCHEMA) if "pattern" in node}
    assert patterns - set(PATTERNS_IN_WORDS) == set()


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.utils.latest_version()])
def test_kubernetes_accepts_the_crd_object(version: str) -> None:
    kubernetes_validate.validate(yaml.safe_load(render_crd()), version, strict=True)


def test_defaults_are_valid_values() -> None:
    for _, node in nodes(SCHEMA):
        if "default" in node:
            jsonschema.Draft4Validator(node).validate(apply_defaults(node, copy.deepcopy(node["default"])))


# -- the CRD and the model agree ---------------------------------------------------------------------


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """What the API server stores: absent fields with a default get it, top-down (so {} gets its own)."""
    if isinstance(value, dict) and "properties" in schema:
        for name, prop in schema["properties"].items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
            if name in value:
                value[name] = apply_defaults(prop, value[name])
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def cel_failures(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """The messages of every CEL rule that `value` breaks, each evaluated where the API server would."""
    env = celpy.Environment()
    failures = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = env.program(env.compile(rule["rule"]))
        try:
            ok = program.evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError:
            ok = False
        if not isinstance(ok, celpy.celtypes.BoolType) or not ok:
            failures.append(f"{path}: {rule['message']}")
    if isinstance(value, dict):
        for name, prop in schema.get("properties", {}).items():
            if name in value:
                failures += cel_failures(prop, value[name], f"{path}.{name}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            failures += cel_failures(schema["items"], item, f"{path}[{i}]")
    return failures


def crd_verdict(doc: dict[str, Any]) -> list[str]:
    """Why the API server would reject `doc` under this CRD: schema errors, then CEL failures."""
    stored = apply_defaults(SCHEMA, copy.deepcopy(doc))
    errors = [e.message for e in jsonschema.Draft4Validator(SCHEMA).iter_errors(stored)]
    return errors or cel_failures(SCHEMA, stored)


def python_only(exc: ValidationError) -> bool:
    """Errors a CRD schema cannot express: unknown fields (pruned, and reported by kubectl's strict field
    validation), map keys (no keyword constrains them), unknown architectures, and the insides of elastic
    workers (`{min, max}`: a structural schema cannot type a number-or-object, so min <= max, the global
    batch rule and a sweep's rules on the workers are the model's, spec.WORKERS_SCHEMA), and a sweep's values,
    checked by validating the trial's spec (config.check_sweep: a CEL rule would copy every sweepable field's
    bounds)."""
    return all(
        e["type"] == "extra_forbidden"
        or "[key]" in e["loc"]
        or _unknown_architecture(e["msg"])
        or _elastic_workers(e)
        or "is not a value the field accepts" in str(e["msg"])
        for e in exc.errors()
    )


def _elastic_workers(error: Any) -> bool:
    message = str(error["msg"])
    return any(
        said in message
        for said in (
            "is more than max",
            "with elastic workers the global batch",
            # A sweep's rules on resources.workers (spec.FineTuneJobSpec._sweep_fits_one_ray_cluster).
            "a sweep (spec.sweep) needs a fixed number of workers",
            "resources.workers * maxConcurrentTrials must be at most",
        )
    )


def _unknown_architecture(message: str) -> bool:
    """The list of timm models is too long for a CEL rule: only the Python model knows it."""
    return "model.architecture: '" in message and "' is not a " in message


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_crd_accepts_every_example(path: Path) -> None:
    assert crd_verdict(load(path)) == []


@pytest.mark.parametrize("path", [p for p in CORPUS if p.stem not in DECIDED_BEFORE_THE_SCHEMA], ids=lambda p: p.stem)
def test_crd_and_model_agree_on_the_corpus(path: Path) -> None:
    doc = load(path)
    with pytest.raises(ValidationError) as caught:
        FineTuneJob.from_body(doc)
    if python_only(caught.value):
        assert crd_verdict(doc) == [], "the CRD now catches this too: drop it from the Python-only cases"
    else:
        assert crd_verdict(doc), f"the API server would accept what the model rejects: {caught.value}"


DETECTION_ANNOTATIONS = {"train": "s3://bkt/ann/train.json", "validation": "s3://bkt/ann/val.json"}
CEL_CASES = [
    # (the edit, the CEL message it must trigger); each mirrors a Python rule beside it.
    ({"model": {"strategy": "partial"}}, "trainableLayers is required"),
    ({"model": {"trainableLayers": 2}}, "trainableLayers is required"),
    ({"training": {"epochs": 3, "warmupEpochs": 3}}, "warmupEpochs must be less than epochs"),
    ({"data": {"validation": "s3://bkt/data/train/sub"}}, "validation must not overlap train"),
    ({"output": {"path": "s3://bkt/data"}}, "output.path must not overlap data.train"),
    ({"output": {"path": "s3://bkt/data/train/out"}}, "output.path must not overlap data.train"),
    (
        {"data": {"validation": "s3://bkt/val"}, "output": {"path": "s3://bkt/val/runs/"}},
        "output.path must not overlap data.validation",
    ),
    ({"resources": {"tolerations": [{"operator": "Exists", "key": "k", "value": "v"}]}}, "value must be empty"),
    ({"resources": {"tolerations": [{"value": "v"}]}}, "operator must be Exists"),
    ({"resources": {"tolerations": [{"key": "k", "tolerationSeconds": 5}]}}, "tolerationSeconds is only allowed"),
    ({"task": "detection", "model": {"architecture": "ssdlite320_mobilenet_v3_large"}}, "data.annotations is required"),
    ({"data": {"annotations": DETECTION_ANNOTATIONS}}, "data.annotations is required"),
    ({"task": "detection", "data": {"annotations": DETECTION_ANNOTATIONS}}, "model.architecture must be"),
    ({"model": {"architecture": "fcos_resnet50_fpn"}}, "model.architecture must be"),
    ({"training": {"selectBy": "valMap"}}, "training.selectBy must be valAccuracy or valLoss"),
    ({"data": {"test": "s3://bkt/data/train/test"}}, "test must not overlap train"),
    (
        {"data": {"validation": "s3://bkt/val/", "test": "s3://bkt/val"}},
        "data.test must not overlap data.validation",
    ),
    ({"data": {"test": "s3://bkt/test/"}, "output": {"path": "s3://bkt/test/out"}}, "must not overlap data.test"),
    (
        {
            "task": "detection",
            "model": {"architecture": "ssdlite320_mobilenet_v3_large"},
            "data": {"annotations": DETECTION_ANNOTATIONS, "test": "s3://bkt/test/"},
        },
        "data.test is allowed with task detection only together with data.annotations.test",
    ),
    ({"output": {"formats": ["onnx", "torchscript"]}}, "formats must include safetensors"),
    ({"training": {"checkpointEvery": "0s"}}, "checkpointEvery must be 'epoch' or a duration"),
    ({"data": {"format": "manifest", "train": "s3://bkt/data/train.txt"}}, "with format manifest"),
    ({"data": {"format": "webdataset", "train": "s3://bkt/data/train-{0..3}.tgz"}}, "with format webdataset"),
    ({"data": {"train": "s3://bkt/data/train-{0..3}"}}, "braces name shards"),
    (
        {"data": {"format": "manifest", "train": "s3://bkt/m/train.csv", "test": "s3://bkt/test/"}},
        "with format manifest, train, validation and test name .csv or .jsonl files",
    ),
    ({"data": {"format": "coco"}}, "data.format must be a format of the task"),
    (
        {
            "task": "detection",
            "model": {"architecture": "ssdlite320_mobilenet_v3_large"},
            "data": {"format": "imagefolder", "annotations": DETECTION_ANNOTATIONS},
        },
        "data.format must be a format of the task",
    ),
    (
        {
            "task": "detection",
            "model": {"architecture": "ssdlite320_mobilenet_v3_large"},
            "data": {"format": "manifest", "train": "s3://bkt/m/train.jsonl", "annotations": DETECTION_ANNOTATIONS},
        },
        "data.annotations is required",
    ),
    ({"training": {"checkpointEvery": "169h"}}, "checkpointEvery must be 'epoch' or a duration"),
    ({"runPolicy": {"keepFailedFor": "168h1s"}}, "keepFailedFor must be a duration from 0s to 168h"),
    ({"runPolicy": {"keepFailedFor": "10081m"}}, "keepFailedFor must be a duration from 0s to 168h"),
    ({"training": {"batchSize": 7, "mixupAlpha": 0.2}}, "batchSize must be even with mixupAlpha or cutmixAlpha"),
    ({"training": {"batchSize": 7, "cutmixAlpha": 1.0}}, "batchSize must be even with mixupAlpha or cutmixAlpha"),
    ({"training": {"epochs": 3, "earlyStopping": {"patience": 3}}}, "earlyStopping.patience must be less than epochs"),
    ({"training": {"earlyStopping": {"metric": "valMap"}}}, "training.earlyStopping.metric must be valAccuracy"),
    *(
        (
            {
                "task": "detection",
                "model": {"architecture": "ssdlite320_mobilenet_v3_large"},
                "data": {"annotations": DETECTION_ANNOTATIONS},
                "training": option,
            },
            "training.labelSmoothing, mixupAlpha, cutmixAlpha and randAugment are only allowed with task classification",
        )
        for option in (
            {"labelSmoothing": 0.1},
            {"mixupAlpha": 0.2},
            {"cutmixAlpha": 1.0},
            {"randAugment": "rand-m9-mstd0.5"},
        )
    ),
]


def merged(base: dict[str, Any], edit: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in edit.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


BASE = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "cel-case"},
    "spec": {
        "model": {"architecture": "resnet18", "checkpoint": "s3://bkt/base/resnet18.safetensors"},
        "data": {"train": "s3://bkt/data/train/"},
        "output": {"path": "s3://bkt/runs/cel-case/"},
    },
}


@pytest.mark.parametrize(("edit", "message"), CEL_CASES, ids=[m for _, m in CEL_CASES])
def test_each_cel_rule_rejects_what_its_python_twin_rejects(edit: dict[str, Any], message: str) -> None:
    doc = merged(BASE, {"spec": edit})
    with pytest.raises(ValidationError):
        FineTuneJob.from_body(doc)
    failures = crd_verdict(doc)
    assert any(message in f for f in failures), failures


@pytest.mark.parametrize(
    "edit",
    [
        {"spec": {"model": {"strategy": "partial", "trainableLayers": 2}}},
        {"spec": {"training": {"epochs": 3, "warmupEpochs": 2}}},
        {"spec": {"training": {"checkpointEvery": "1h30m"}}},
        {"spec": {"training": {"checkpointEvery": "168h"}}},
        {"spec": {"runPolicy": {"keepFailedFor": "0s"}}},
        {"spec": {"runPolicy": {"keepFailedFor": "168h"}}},
        {"spec": {"runPolicy": {"keepFailedFor": "2h30m"}}},
        {"spec": {"training": {"learningRate": "auto"}}},
        {"spec": {"training": {"learningRate": 0.003}}},
        {"spec": {"training": {"learningRate": 1}}},
        {
            "spec": {
                "training": {
                    "epochs": 4,
                    "batchSize": 8,
                    "accumulateSteps": 4,
                    "gradientClipNorm": 1.0,
                    "labelSmoothing": 0.1,
                    "mixupAlpha": 0.2,
                    "cutmixAlpha": 1.0,
                    "randAugment": "rand-m9-n2-mstd0.5",
                    "emaDecay": 0.999,
                    "earlyStopping": {"metric": "valLoss", "patience": 3, "minDelta": 0.01},
                }
            }
        },
        {
            "spec": {
                "task": "detection",
                "model": {"architecture": "fasterrcnn_mobilenet_v3_large_320_fpn"},
                "data": {"annotations": DETECTION_ANNOTATIONS},
                "training": {"accumulateSteps": 2, "emaDecay": 0.99, "earlyStopping": {"metric": "valMap50"}},
            }
        },
        # Siblings that merely share a string prefix do not overlap: data/train vs data/train-2.
        {"spec": {"output": {"path": "s3://bkt/data/train-runs/"}, "data": {"validation": "s3://bkt/data/training"}}},
        {"spec": {"resources": {"tolerations": [{"operator": "Exists"}, {"key": "k", "value": "v"}]}}},
        {"spec": {"data": {"format": "webdataset", "train": "s3://bkt/shards/train-{000000..000127}.tar"}}},
        {
            "spec": {
                "data": {"format": "manifest", "train": "s3://bkt/m/train.csv", "validation": "s3://bkt/m/val.jsonl"}
            }
        },
        {
            "spec": {
                "task": "detection",
                "model": {"architecture": "fasterrcnn_mobilenet_v3_large_320_fpn"},
                "data": {"format": "webdataset", "train": "s3://bkt/shards/{a,b}.tar"},
            }
        },
        {"spec": {"resources": {"tolerations": [{"key": "k", "effect": "NoExecute", "tolerationSeconds": 5}]}}},
        {
            "spec": {
                "task": "detection",
                "model": {"architecture": "fasterrcnn_mobilenet_v3_large_320_fpn"},
                "data": {"annotations": DETECTION_ANNOTATIONS},
            }
        },
    ],
)
def test_cel_rules_accept_what_the_model_accepts(edit: dict[str, Any]) -> None:
    doc = merged(BASE, edit)
    FineTuneJob.from_body(doc)
    assert crd_verdict(doc) == []


@pytest.mark.parametrize(
    ("name", "accepted"),
    [("a" * MAX_NAME_LENGTH, True), ("a" * (MAX_NAME_LENGTH + 1), False), ("9lives", False), ("ok-9", True)],
)
def test_root_cel_rules_on_the_name_match_the_model(name: str, accepted: bool) -> None:
    doc = merged(BASE, {"metadata": {"name": name}})
    failures = cel_failures(SCHEMA, apply_defaults(SCHEMA, doc))
    assert (failures == []) is accepted, failures
    try:
        FineTuneJob.from_body(doc)
        assert accepted
    except ValidationError:
        assert not accepted
