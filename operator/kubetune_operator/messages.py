"""Validation errors as people read them: one line each, naming the field, what is allowed and what was given.

    job.yaml:14: spec.training.epochs: must be >= 1 (got -3)

Field paths use the camelCase names of the YAML (pydantic's locations carry the aliases that were read),
list items are `[i]` and map keys that are not plain words `["key"]`. Cross-field checks in the models
raise ValueErrors whose messages start with "<field>: "; that field extends the path.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from kubetune_operator.pod_template import DNS_LABEL, ENV_NAME, LABEL_VALUE, MOUNT_PATH, QUALIFIED_NAME, OwnsFields
from kubetune_operator.spec import (
    DISK_SIZE_PATTERN,
    IMAGE_PATTERN,
    KEEP_FAILED_FOR_PATTERN,
    NAME_PATTERN,
    QUANTITY_PATTERN,
    REASON_PATTERN,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
)
from kubetune_trainer.config import (
    ANNOTATIONS_PATTERN,
    ARCHITECTURE_PATTERN,
    CACHE_LIMIT_PATTERN,
    CHECKPOINT_EVERY_PATTERN,
    CHECKPOINT_PATTERN,
    CONFIG_MAP_KEY,
    DNS_SUBDOMAIN,
    ENDPOINT_PATTERN,
    MLFLOW_URI_PATTERN,
    RAND_AUGMENT_PATTERN,
    REGION_PATTERN,
    S3_OBJECT_PATTERN,
    S3_PREFIX_PATTERN,
    TrainerConfig,
)
from kubetune_trainer.progress_model import PRINTABLE_PATTERN, TRIAL_ID_PATTERN

Loc = tuple[str | int, ...]
MAX_SHOWN = 60

_LETTERS_DIGITS_DASH = "lowercase letters, digits and '-'"
PATTERNS_IN_WORDS: dict[str, str] = {
    S3_PREFIX_PATTERN: (
        "must be an s3:// prefix like s3://<bucket>/<path>/: a bucket name of 3-63 lowercase letters, digits, "
        "'.' or '-', and a path without spaces and without empty, '.' or '..' segments"
    ),
    S3_OBJECT_PATTERN: (
        "must be an s3:// URI of an object like s3://<bucket>/<key>, without spaces and without empty, '.' or '..' "
        "segments"
    ),
    CHECKPOINT_PATTERN: (
        "must be an s3:// URI of a .safetensors/.pt/.pth/.bin object like s3://<bucket>/<path>/model.safetensors "
        "(lowercase bucket, no spaces, no empty, . or .. segments)"
    ),
    ANNOTATIONS_PATTERN: (
        "must be an s3:// URI of a COCO .json file like s3://<bucket>/<path>/train.json (lowercase bucket, no "
        "spaces, no empty, . or .. segments)"
    ),
    ARCHITECTURE_PATTERN: "must be a timm model name: lowercase letters, digits, '_', '.' and '-', e.g. resnet50",
    ENDPOINT_PATTERN: (
        "must be an http:// or https:// URL like https://minio.example.com:9000, without user:password@ "
        "(the keys go in the Secret spec.storage.credentialsSecret names)"
    ),
    MLFLOW_URI_PATTERN: (
        "must be an http:// or https:// URL like https://mlflow.example.com:5000, without credentials "
        "(user:password@) or spaces"
    ),
    REGION_PATTERN: f"must be a region name of 2-32 {_LETTERS_DIGITS_DASH}, e.g. us-east-1",
    DNS_SUBDOMAIN: (
        "must be a Kubernetes object name: lowercase letters, digits, '-' and '.', "
        "starting and ending with a letter or digit"
    ),
    NAME_PATTERN: (
        f"must be a DNS-1035 label: {_LETTERS_DIGITS_DASH}, starting with a letter and ending with a letter or digit"
    ),
    DNS_LABEL: f"must be a DNS-1123 label: {_LETTERS_DIGITS_DASH}, starting and ending with a letter or digit",
    QUALIFIED_NAME: (
        "must be a label key: an optional DNS prefix and '/', then up to 63 letters, digits, '-', '_' or '.', "
        "starting and ending with a letter or digit"
    ),
    LABEL_VALUE: "must be a label value: up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
    QUANTITY_PATTERN: "must be a Kubernetes quantity: a number with an optional unit, e.g. 512Mi, 16Gi or 2G",
    DISK_SIZE_PATTERN: "must be a whole number of Mi, Gi or Ti above zero, e.g. 500Mi, 20Gi or 2Ti",
    CACHE_LIMIT_PATTERN: "must be a whole number of Ki, Mi, Gi or Ti above zero, e.g. 800Ki, 500Mi or 20Gi",
    IMAGE_PATTERN: "must be a container image reference without spaces",
    REASON_PATTERN: "must be a CamelCase word",
    ENV_NAME: "must be an env var name: letters, digits, '-', '_' and '.', not starting with a digit",
    MOUNT_PATH: "must be an absolute path without empty segments, e.g. /etc/ssl/private-ca",
    r"^[^/](.*[^/])?$": "must be a relative path inside the volume, not starting or ending with '/'",
    CONFIG_MAP_KEY: "must be a ConfigMap key: letters, digits, '-', '_' and '.'",
    CHECKPOINT_EVERY_PATTERN: "must be 'epoch' or a duration in hours, minutes and seconds, e.g. 10m, 1h30m or 90s",
    KEEP_FAILED_FOR_PATTERN: "must be a duration in hours, minutes and seconds, e.g. 0s, 30m, 1h or 1h30m",
    TRIAL_ID_PATTERN: "must be a trial's id: trial- and its number, e.g. trial-003",
    PRINTABLE_PATTERN: "must be printable ASCII text: letters, digits, spaces and punctuation",
    RAND_AUGMENT_PATTERN: (
        "must be timm's RandAugment string: rand, then dash-separated options m<magnitude>, n<ops per image>, "
        "p<probability>, mstd<magnitude noise>, mmax<magnitude cap>, inc0 or inc1, e.g. rand-m9-mstd0.5"
    ),
}

# Why a limit is what it is, where that is not obvious from the field.
_WHY: dict[Loc, str] = {
    ("metadata", "name"): "KubeRay derives the Ray cluster's and its services' names from it",
}

# Root models whose fields the messages can look up (allowed names, enum values, descriptions).
_ROOTS: dict[str, type[BaseModel]] = {
    model.__name__: model for model in (FineTuneJob, FineTuneJobSpec, FineTuneJobStatus, TrainerConfig)
}

_URL_CREDENTIALS = re.compile(r"(://)[^/@\s]*@")
# A cross-field rule's message starts with the field it is about: `training.selectBy: ...`, and list items
# by index: `sweep.parameters[2]: ...`.
_CROSS_FIELD = re.compile(
    r"^([A-Za-z][A-Za-z0-9]*(?:\[[0-9]+\])*(?:\.[A-Za-z][A-Za-z0-9]*(?:\[[0-9]+\])*)*): (.*)$", re.DOTALL
)
_PATH_PART = re.compile(r"([A-Za-z][A-Za-z0-9]*)|\[([0-9]+)\]")
_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def pattern_in_words(pattern: str) -> str:
    """What a value matching `pattern` looks like, for people."""
    return PATTERNS_IN_WORDS.get(pattern, f"must match the pattern {pattern}")


def format_validation_error(
    exc: ValidationError,
    source: str,
    *,
    model: type[BaseModel] | None = None,
    locate: Callable[[Loc], int | None] | None = None,
) -> list[str]:
    """One line per error: `SOURCE[:LINE]: field.path: what is allowed (got what was given)`.

    `model` is the class that was validated (found from the error's title when omitted); `locate` maps a
    field path to its line in the source, when the caller knows (the CLI does, from the YAML).
    """
    root = model or _ROOTS.get(exc.title)
    lines = []
    for error in exc.errors(include_url=False):
        loc, message = describe(error, root)
        line = locate(loc) if locate else None
        where = f"{source}:{line}" if line else source
        lines.append(f"{where}: {field_path(loc) or '(document)'}: {message}")
    return lines


def field_path(loc: Sequence[str | int]) -> str:
    """`spec.resources.tolerations[0].effect`, `spec.resources.nodeSelector["nvidia.com/gpu"]`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _WORD.match(part):
            out += f".{part}" if out else part
        else:
            out += f'["{part}"]'
    return out


def path_parts(path: str) -> Loc:
    """`sweep.parameters[2]` as a loc: ("sweep", "parameters", 2)."""
    return tuple(name or int(index) for name, index in _PATH_PART.findall(path))


def describe(error: Any, root: type[BaseModel] | None) -> tuple[Loc, str]:
    """The field path and the message of one pydantic error (an ErrorDetails dict)."""
    loc: Loc = tuple(error["loc"])
    kind: str = error["type"]
    ctx: dict[str, Any] = error.get("ctx") or {}
    given = error.get("input")
    key_error = bool(loc) and loc[-1] == "[key]"
    if key_error:
        loc = loc[:-1]
    about = "key " if key_error else ""

    if kind in ("value_error", "assertion_error"):
        text = str(ctx.get("error", error["msg"]))
        match = _CROSS_FIELD.match(text)
        if match:
            return loc + path_parts(match.group(1)), match.group(2)
        return loc, text
    if kind == "missing":
        info = _field(root, loc)
        hint = f": {_sentence_part(info.description)}" if info and info.description else ""
        return loc, f"required{hint}"
    if kind == "extra_forbidden":
        owner = _type_at(root, loc[:-1]) if root else None
        if isinstance(owner, type) and issubclass(owner, OwnsFields) and str(loc[-1]) in owner.OWNED:
            return loc, f"not allowed: {owner.OWNED[str(loc[-1])]}"
        allowed = _field_names(root, loc[:-1])
        if not allowed:
            return loc, "unknown field"
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        guess = f"; did you mean {close[0]}?" if close else ""
        return loc, f"unknown field{guess} (allowed: {', '.join(allowed)})"
    if kind == "literal_error":
        choices = _literal_values(root, loc)
        if len(choices) == 1:
            return loc, f"must be {choices[0]} (got {show(given)})"
        allowed_text = ", ".join(choices) if choices else str(ctx.get("expected"))
        return loc, f"must be one of {allowed_text} (got {show(given)})"
    return loc, about + _constraint(kind, ctx, given, loc, str(error["msg"]))


def _constraint(kind: str, ctx: dict[str, Any], given: Any, loc: Loc, fallback: str) -> str:
    got = f"(got {show(given)})"
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
    }
    if kind in bounds:
        symbol, name = bounds[kind]
        return f"must be {symbol} {ctx[name]} {got}"
    if kind == "string_pattern_mismatch":
        return f"{pattern_in_words(str(ctx['pattern']))} {got}"
    if kind == "string_too_long":
        why = f": {_WHY[loc]}" if loc in _WHY else ""
        return f"must be at most {ctx['max_length']} characters{why} (got {len(given)} characters)"
    if kind == "string_too_short":
        if ctx.get("min_length") == 1:
            return "must not be empty"
        return f"must be at least {ctx['min_length']} characters {got}"
    if kind in ("too_long", "too_short"):
        limit = "at most" if kind == "too_long" else "at least"
        size = ctx.get("max_length" if kind == "too_long" else "min_length")
        noun = "items" if ctx.get("field_type") == "List" else "entries"
        return f"must have {limit} {size} {noun} (got {ctx.get('actual_length')})"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer {got}{_unquote_hint(given, int)}"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number {got}{_unquote_hint(given, float)}"
    if kind in ("bool_type", "bool_parsing"):
        quoted = "; write true or false without quotes" if str(given).lower() in ("true", "false") else ""
        return f"must be true or false {got}{quoted}"
    if kind in ("string_type", "str_type"):
        return f"must be a string {got}"
    if kind in ("model_type", "model_attributes_type", "dict_type", "mapping_type"):
        return f"must be a mapping of fields {got}"
    if kind in ("list_type", "tuple_type"):
        return f"must be a list {got}"
    if kind.startswith("datetime"):
        return f"must be an RFC 3339 time like 2025-01-31T12:00:00Z {got}"
    if kind == "finite_number":
        return f"must be a finite number {got}"
    return f"{fallback[:1].lower()}{fallback[1:]} {got}"


def _sentence_part(description: str) -> str:
    """A description to follow a colon: no final period, no capital unless it starts a name."""
    text = description.rstrip(".")
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        text = text[0].lower() + text[1:]
    return text


def _unquote_hint(given: Any, kind: type) -> str:
    if isinstance(given, str):
        try:
            kind(given.strip())
        except ValueError:
            return ""
        return "; write it without quotes"
    return ""


def show(value: Any) -> str:
    """A given value as YAML users wrote it, cut short when long."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # Credentials in a URL (https://user:password@host) never reach a message: it lands in the status.
        value = _URL_CREDENTIALS.sub(r"\1***@", value)
        if len(value) > MAX_SHOWN:
            return repr(value[:MAX_SHOWN])[:-1] + "…" + repr(value)[-1] + f", {len(value)} characters"
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


# -- looking fields up along a location ------------------------------------------------------------------


def _field(root: type[BaseModel] | None, loc: Loc) -> FieldInfo | None:
    """The pydantic field at `loc` below `root`, if `loc` names one."""
    if root is None or not loc:
        return None
    parent = _type_at(root, loc[:-1])
    if isinstance(parent, type) and issubclass(parent, BaseModel):
        return _named_field(parent, loc[-1])
    return None


def _field_names(root: type[BaseModel] | None, loc: Loc) -> list[str]:
    model = _type_at(root, loc) if root else None
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [info.alias or name for name, info in model.model_fields.items()]
    return []


def _literal_values(root: type[BaseModel] | None, loc: Loc) -> list[str]:
    tp = _unwrap(_type_at(root, loc)) if root else None
    if get_origin(tp) is Literal:
        return [str(v) for v in get_args(tp)]
    return []


def _named_field(model: type[BaseModel], key: str | int) -> FieldInfo | None:
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return info
    return None


def _type_at(root: Any, loc: Loc) -> Any:
    """The declared type at `loc`, walking models, lists and maps; None where the walk loses its way."""
    tp = root
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            info = _named_field(tp, part)
            if info is None:
                return None
            tp = info.annotation
        elif get_origin(tp) in (list, tuple) and isinstance(part, int):
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        else:
            return None
    return _unwrap(tp)


def _unwrap(tp: Any) -> Any:
    """`X` from `X | None`, `Optional[X]` and `Annotated[X, ...]`."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            rest = [a for a in get_args(tp) if a is not type(None)]
            if len(rest) != 1:
                return tp
            tp = rest[0]
        else:
            return tp
