"""`kubetune`: validate, render and run FineTuneJobs, find a job's learning rate, convert datasets, print
the CRD, run the demo.

Each subcommand is a few lines of glue around the functions the operator itself uses: the spec model
(validate), the builders (render), trainer_config and the trainer's local runner (run --local) and
range test (tune-lr --local), and the trainer's packer (data pack).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from kubetune_operator.messages import Loc, field_path, format_validation_error, show
from kubetune_operator.spec import API_VERSION, GROUP, KIND, FineTuneJob

if TYPE_CHECKING:
    from kubetune_trainer.config import TrainerConfig

STDIN = "-"
# A FineTuneJob has a few hundred values at most; a YAML alias bomb expands to billions.
MAX_VALUES = 100_000

# -- reading manifests --------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as kubectl does.

    PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; kubectl reads it as a number, so a
    learningRate written that way must validate here too.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


@dataclass
class Document:
    """One YAML document of a file, with the line of every field, for error messages."""

    data: Any
    line: int
    lines: dict[Loc, int] = field(default_factory=dict)
    duplicates: list[tuple[Loc, int, int]] = field(default_factory=list)

    def items(self) -> list[Document]:
        """The objects in this document: itself, or each item of a `kind: List` (`kubectl get -o yaml`)."""
        data = self.data
        if not (isinstance(data, dict) and data.get("kind") == "List" and isinstance(data.get("items"), list)):
            return [self]
        return [
            Document(
                data=item,
                line=self.lines.get(("items", i), self.line),
                lines={loc[2:]: line for loc, line in self.lines.items() if loc[:2] == ("items", i)},
                duplicates=[(loc[2:], a, b) for loc, a, b in self.duplicates if loc[:2] == ("items", i)],
            )
            for i, item in enumerate(data["items"])
        ]

    def locate(self, loc: Loc) -> int | None:
        """The line of `loc`, or of its nearest enclosing field that is in the file."""
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.lines:
                return self.lines[loc[:end]]
        return self.line


def load_documents(text: str) -> list[Document]:
    """Every non-empty YAML document in `text`; raises yaml.YAMLError on a syntax error."""
    loader = _Loader(text)
    docs = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            if _expanded_size(node, {}) > MAX_VALUES:
                raise yaml.YAMLError(f"more than {MAX_VALUES} values once aliases are expanded")
            data = loader.construct_document(node)
            if data is None:
                continue
            doc = Document(data=data, line=node.start_mark.line + 1)
            _index(node, (), doc)
            docs.append(doc)
    finally:
        loader.dispose()
    return docs


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` holds with every alias expanded; linear time, as aliases share nodes."""
    if id(node) not in sizes:
        sizes[id(node)] = 0  # a recursive alias counts once, not forever
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def _index(node: yaml.Node, loc: Loc, doc: Document) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key, line = str(key_node.value), key_node.start_mark.line + 1
            if key in seen:
                doc.duplicates.append(((*loc, key), line, seen[key]))
            seen[key] = line
            _index(value_node, (*loc, key), doc)
            doc.lines[(*loc, key)] = line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            doc.lines[(*loc, i)] = item.start_mark.line + 1
            _index(item, (*loc, i), doc)


def read_jobs(name: str) -> tuple[list[FineTuneJob], list[str]]:
    """The FineTuneJobs in file `name` ('-' for stdin), and one line per problem found in it."""
    source = "<stdin>" if name == STDIN else name
    try:
        if name == STDIN:
            text = sys.stdin.read()
        else:
            with open(name, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        return [], [f"{source}: cannot read: {getattr(exc, 'strerror', None) or exc}"]
    try:
        docs = load_documents(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        return [], [f"{where}: invalid YAML: {exc.problem or exc.context}"]
    except yaml.YAMLError as exc:
        return [], [f"{source}: invalid YAML: {exc}"]
    if not docs:
        return [], [f"{source}: no FineTuneJob in it (the file has no YAML documents)"]
    jobs: list[FineTuneJob] = []
    problems: list[str] = []
    for doc in (item for d in docs for item in d.items()):
        job, found = _check_document(doc, source)
        problems += found
        if job is not None and not found:
            jobs.append(job)
    return jobs, problems


def _check_document(doc: Document, source: str) -> tuple[FineTuneJob | None, list[str]]:
    problems = [
        f"{source}:{line}: {field_path(loc)}: duplicate key (first at line {first}); only one may be given"
        for loc, line, first in doc.duplicates
    ]
    data = doc.data
    if not isinstance(data, dict):
        return None, [*problems, f"{source}:{doc.line}: (document): must be a {KIND} mapping (got {show(data)})"]
    api_version, kind = data.get("apiVersion"), data.get("kind")
    if kind != KIND and not str(api_version).startswith(f"{GROUP}/"):
        return None, [
            *problems,
            f"{source}:{doc.line}: kind: {api_version} {kind} is not a {KIND} ({API_VERSION}); "
            f"kubetune validates {KIND}s only",
        ]
    try:
        return FineTuneJob.from_body(data), problems
    except ValidationError as exc:
        return None, [*problems, *format_validation_error(exc, source, model=FineTuneJob, locate=doc.locate)]


# -- subcommands ------------------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    failed = False
    for name in args.files:
        jobs, problems = read_jobs(name)
        source = "<stdin>" if name == STDIN else name
        for line in problems:
            print(line)
        for job in jobs:
            refusals = _not_allowed(job, args)
            for message in refusals:
                print(f"{source}: {job.metadata.name}: {message}")
            if not refusals:
                print(f"{source}: {job.metadata.name} valid")
            failed = failed or bool(refusals)
        failed = failed or bool(problems)
    return 1 if failed else 0


def _not_allowed(job: FineTuneJob, args: argparse.Namespace) -> list[str]:
    """What the operator's allow-lists, as given on the command line, refuse in `job` (allowlist.py)."""
    from kubetune_operator import allowlist
    from kubetune_operator.settings import OperatorSettings

    found = []
    if args.allowed_s3_endpoint is not None:
        found.append(allowlist.endpoint_refusal(job.spec.storage.endpoint, args.allowed_s3_endpoint))
    if args.allowed_image_registry is not None:
        trainer_image = OperatorSettings.from_env().trainer_image
        found.append(allowlist.image_refusal(job.spec.image, trainer_image, args.allowed_image_registry))
    return [message for message in found if message is not None]


def _endpoint_entry(text: str) -> Any:
    from kubetune_operator.allowlist import EndpointEntry

    try:
        return EndpointEntry.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _registry_entry(text: str) -> str:
    from kubetune_operator.allowlist import parse_registries

    try:
        return parse_registries([text])[0]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_render(args: argparse.Namespace) -> int:
    jobs, problems = read_jobs(args.file)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    from kubetune_operator.builders import manifests
    from kubetune_operator.settings import OperatorSettings
    from kubetune_operator.sweep_plan import plan_lines

    settings = OperatorSettings.from_env()
    if args.image:
        settings = dataclasses.replace(settings, trainer_image=args.image)
    placed = [
        job
        if job.metadata.namespace is not None
        else job.model_copy(update={"metadata": job.metadata.model_copy(update={"namespace": args.namespace})})
        for job in jobs
    ]
    # A sweep's plan (trials, workers, GPU budget) as comments ahead of the objects: the stream still applies.
    plans = [line + "\n" for job in placed for line in plan_lines(job)]
    sys.stdout.write("".join(plans) + yaml.safe_dump_all(manifests(placed, settings), sort_keys=False))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = local_config(
        args,
        f"kubetune run trains on this machine only, so it needs --local: kubetune run {args.file} --local\n"
        f"To train on a cluster, apply the job: kubectl apply -f {args.file}",
    )
    if isinstance(config, int):
        return config
    try:
        from kubetune_trainer.local import run_local
    except ModuleNotFoundError as exc:
        return trainer_missing("run --local", exc)
    # --s3-endpoint, else spec.storage.endpoint, else AWS_ENDPOINT_URL (kubetune_trainer.storage.resolve_endpoint)
    return run_local(config, s3_endpoint=args.s3_endpoint)


def cmd_tune_lr(args: argparse.Namespace) -> int:
    config = local_config(
        args,
        f"kubetune tune-lr runs on this machine only, so it needs --local: kubetune tune-lr {args.file} --local",
    )
    if isinstance(config, int):
        return config
    try:
        from kubetune_trainer.tune_lr import tune_lr_local
    except ModuleNotFoundError as exc:
        return trainer_missing("tune-lr --local", exc)
    picture = args.plot or Path(f"{config.job_name}-lr-range-test.png")
    return tune_lr_local(config, s3_endpoint=args.s3_endpoint, steps=args.steps, picture=picture)


def local_config(args: argparse.Namespace, needs_local: str) -> TrainerConfig | int:
    """The TrainerConfig of the one job in `args.file` for a command that runs here, or its exit code:
    2 without --local (saying `needs_local`), 1 when the file holds no single valid job (problems on stderr)."""
    if not args.local:
        print(needs_local, file=sys.stderr)
        return 2
    jobs, problems = read_jobs(args.file)
    if problems or len(jobs) != 1:
        print("\n".join(problems) or f"{args.file}: holds {len(jobs)} {KIND}s; run one at a time", file=sys.stderr)
        return 1
    from kubetune_operator.trainer_config import trainer_config

    job = jobs[0]
    if job.spec.model.resume == "never" and not job.metadata.uid:
        # A file has no uid: each local run of a job that never resumes is a run of its own.
        job = job.model_copy(update={"metadata": job.metadata.model_copy(update={"uid": str(uuid.uuid4())})})
    return trainer_config(job)


def trainer_missing(command: str, error: ModuleNotFoundError) -> int:
    print(
        f"kubetune {command} needs the trainer ({error.name} is missing): pip install 'kubetune[trainer]'",
        file=sys.stderr,
    )
    return 2


def cmd_data_pack(args: argparse.Namespace) -> int:
    try:
        from kubetune_trainer.pack import PackOptions, pack
    except ModuleNotFoundError as exc:
        return trainer_missing("data pack", exc)
    return pack(PackOptions(**{name: getattr(args, name) for name in PackOptions.__dataclass_fields__}))


# `kubetune demo` lives in the kubetune-dev distribution (devtools/ of a checkout), not in this package.
DEMO_MISSING = """kubetune demo needs kubetune's development tools, and {missing} is not installed.
They come with a checkout of the repository, not with the kubetune package: in the checkout, run
  make setup      (then: make demo)
or install them into this environment:
  pip install -e '.[trainer,demo]' -e ./devtools"""


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from kubetune_dev.demo import DemoOptions
        from kubetune_dev.demo import main as demo_main
    except ModuleNotFoundError as exc:
        print(DEMO_MISSING.format(missing=(exc.name or "a module it imports").split(".")[0]), file=sys.stderr)
        return 2
    options = DemoOptions(
        workdir=args.workdir, manifest=args.manifest, keep_running=args.keep_running, timeout=args.timeout
    )
    result: int = demo_main(options)
    return result


def cmd_crd(args: argparse.Namespace) -> int:
    from kubetune_operator.crd import render_crd

    sys.stdout.write(render_crd())
    return 0


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds (got {text!r})") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds (got {text})")
    return value


def _range_test_steps(text: str) -> int:
    try:
        steps = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of steps") from None
    if not 20 <= steps <= 1000:
        raise argparse.ArgumentTypeError(f"{steps} steps: use 20 to 1000")
    return steps


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kubetune", description="Fine-tune computer-vision models on Kubernetes.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (_add_validate, _add_render, _add_run, _add_tune_lr, _add_data, _add_demo, _add_crd):
        add_command(sub)
    return top


Subcommands = argparse._SubParsersAction  # what add_subparsers returns; argparse names it no other way


def _add_validate(sub: Subcommands) -> None:
    validate = sub.add_parser(
        "validate",
        help="check FineTuneJob manifests offline",
        description="Check FineTuneJob manifests offline with every rule the operator and the CRD apply. "
        "Exit 0 when all are valid, 1 otherwise.",
    )
    validate.add_argument(
        "files", nargs="+", metavar="FILE", help="YAML file(s), any number of documents; '-' reads stdin"
    )
    validate.add_argument(
        "--allowed-s3-endpoint",
        action="append",
        type=_endpoint_entry,
        metavar="ENDPOINT",
        help="also check spec.storage.endpoint against AWS S3 and these, as the operator's allowedS3Endpoints "
        "does ([http(s)://]host[:port] or *.domain; repeatable)",
    )
    validate.add_argument(
        "--allowed-image-registry",
        action="append",
        type=_registry_entry,
        metavar="REGISTRY",
        help="also check spec.image against the trainer image's registry and these, as the operator's "
        "allowedImageRegistries does (registry[:port][/path]; repeatable)",
    )
    validate.set_defaults(handler=cmd_validate)


def _add_render(sub: Subcommands) -> None:
    render = sub.add_parser(
        "render",
        help="print the objects the operator would create for a job",
        description="Print, as a YAML stream, every object the operator would create for the FineTuneJob(s) in FILE; "
        "a sweep's plan (trials, workers and GPUs per trial and in all, GPU budget, scheduler) comes first, as "
        "comments.",
    )
    render.add_argument("file", metavar="FILE", help="FineTuneJob YAML; '-' reads stdin")
    render.add_argument("--image", help="trainer image (default: the operator's)")
    render.add_argument("--namespace", default="default", help="namespace of jobs that name none (default: default)")
    render.set_defaults(handler=cmd_render)


def _add_run(sub: Subcommands) -> None:
    run = sub.add_parser(
        "run",
        help="train a job on this machine (--local)",
        description="Run a FineTuneJob's training on this machine, on a local Ray cluster (CPU when there is no GPU).",
    )
    _add_local_job_arguments(run, local="train here (required: the cluster path is kubectl apply)")
    run.set_defaults(handler=cmd_run)


def _add_local_job_arguments(command: argparse.ArgumentParser, *, local: str) -> None:
    """FILE, --local and --s3-endpoint: what each command that runs a job's code on this machine takes."""
    command.add_argument("file", metavar="FILE", help="FineTuneJob YAML with one job; '-' reads stdin")
    command.add_argument("--local", action="store_true", help=local)
    command.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="S3 endpoint (default: spec.storage.endpoint, then AWS_ENDPOINT_URL, then AWS S3)",
    )


def _add_tune_lr(sub: Subcommands) -> None:
    tune = sub.add_parser(
        "tune-lr",
        help="find a learning rate for a job on this machine (--local)",
        description="Run the learning-rate range test of a FineTuneJob on this machine: a few steps on the job's "
        "data while the learning rate grows from 1e-6 to 1; print the rate a run would choose (the bottom of the "
        "smoothed loss curve) and write the curve as a PNG. A job without training.learningRate runs the same test "
        "before it trains.",
    )
    _add_local_job_arguments(tune, local="run here (required)")
    tune.add_argument(
        "--steps",
        type=_range_test_steps,
        default=100,
        metavar="N",
        help="steps of the sweep, 20-1000 (default: 100, as a run does)",
    )
    tune.add_argument(
        "--plot", type=Path, metavar="PNG", help="where the curve goes (default: <job name>-lr-range-test.png)"
    )
    tune.set_defaults(handler=cmd_tune_lr)


def _add_data(sub: Subcommands) -> None:
    data = sub.add_parser(
        "data",
        help="convert a dataset to the scalable formats (data pack)",
        description="Convert datasets between the layouts data.format reads.",
    )
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    pack = actions.add_parser(
        "pack",
        help="write WebDataset shards (or a manifest) from an ImageFolder or COCO dataset",
        description="Write an ImageFolder (SRC/<class>/<image>) or, with --annotations, a COCO dataset as WebDataset "
        "tar shards DEST/train-000000.tar, ... (or, with --to manifest, DEST/train.csv or .jsonl naming the images "
        "where they are), and print the data: values of a FineTuneJob that trains from them. SRC and DEST are "
        "local folders or s3:// prefixes. The same input gives the same shards, byte for byte.",
    )
    pack.add_argument("src", metavar="SRC", help="the images: a local folder or an s3:// prefix")
    pack.add_argument(
        "dest", metavar="DEST", help="where the shards or the manifest go: a local folder or an s3:// prefix"
    )
    pack.add_argument(
        "--to", choices=("webdataset", "manifest"), default="webdataset", help="what to write (default: webdataset)"
    )
    pack.add_argument(
        "--annotations", metavar="FILE", help="COCO JSON of SRC's images (local or s3://): a detection set"
    )
    pack.add_argument("--validation", metavar="SRC", help="the validation images, packed beside train the same way")
    pack.add_argument(
        "--validation-annotations", metavar="FILE", help="COCO JSON of the --validation images (with --annotations)"
    )
    pack.add_argument(
        "--shard-size", type=int, default=10_000, metavar="N", help="at most N samples a shard (default: 10000)"
    )
    pack.add_argument(
        "--max-shard-bytes",
        default="256MiB",
        metavar="SIZE",
        help="at most SIZE bytes a shard, e.g. 1GiB (default: 256MiB)",
    )
    pack.add_argument(
        "--seed", type=int, default=0, help="the shuffle that mixes the classes across shards (default: 0)"
    )
    pack.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="S3 endpoint (default: AWS_ENDPOINT_URL, then AWS S3); credentials from the environment",
    )
    pack.add_argument("--region", help="S3 region (default: AWS_REGION, then AWS_DEFAULT_REGION, then us-east-1)")
    pack.add_argument("--overwrite", action="store_true", help="replace shards or manifests DEST already holds")
    pack.add_argument("--quiet", action="store_true", help="no progress bar or summary on stderr")
    pack.set_defaults(handler=cmd_data_pack)


def _add_demo(sub: Subcommands) -> None:
    demo = sub.add_parser(
        "demo",
        help="the whole loop on this machine (from a checkout, after make setup)",
        description="Run a FineTuneJob end to end on this machine: an embedded Kubernetes API, S3 and a KubeRay "
        "stand-in on 127.0.0.1, the real operator, and the job followed to the end with a live status table. "
        "Ctrl-C (or SIGTERM) stops everything it started. Needs the development tools of a checkout "
        "(devtools/, installed by make setup).",
    )
    demo.add_argument(
        "--manifest",
        type=Path,
        metavar="FILE",
        help="the FineTuneJob to run (default: examples/demo-finetunejob.yaml of the checkout)",
    )
    demo.add_argument(
        "--workdir",
        type=Path,
        default=Path(".demo"),
        metavar="DIR",
        help="where logs, the kubeconfig and results go (default: .demo)",
    )
    demo.add_argument(
        "--keep-running", action="store_true", help="leave the endpoints up after the job ends, until Ctrl-C"
    )
    demo.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=900.0,
        metavar="SECONDS",
        help="give up when the job has not ended after this long (default: 900)",
    )
    demo.set_defaults(handler=cmd_demo)


def _add_crd(sub: Subcommands) -> None:
    crd = sub.add_parser("crd", help="print the FineTuneJob CustomResourceDefinition")
    crd.set_defaults(handler=cmd_crd)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
