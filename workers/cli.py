"""`inspection` command line: the local stack, the workers, the camera simulator, control, the demo."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import signal
import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel

from schemas.config import (
    BENCH_JUDGE_MODES,
    DEFAULT_BENCH_JUDGE,
    ControlConfig,
    InferenceConfig,
    ModelConfig,
    SecurityConfig,
    StackConfig,
    TopicsConfig,
    TrainingConfig,
)

log = logging.getLogger("inspection")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO if not args.quiet else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kafka-python warns about its own event-loop timing under CPU load; real errors still show, and so do
    # group-membership warnings (a consumer evicted from its group must not go unnoticed).
    logging.getLogger("kafka").setLevel(logging.ERROR)
    logging.getLogger("kafka.coordinator").setLevel(logging.WARNING)
    return args.handler(args) or 0


# ---------------------------------------------------------------------- options from the config models
Config = TypeVar("Config", bound=BaseModel)
HIDDEN_FIELD_PREFIX = "fault_"  # fault injection for tests: accepted, never listed in --help


@dataclass(frozen=True)
class ConfigOptions:
    """Fields of a config model offered as options: `--field-name`, the field's default, its description as
    help. A field of the same name in another model a subcommand builds reads the same option."""

    model: type[BaseModel]
    fields: tuple[str, ...]
    used_by: str = ""  # who reads them, prefixed to their help ("infer: ...")
    flags: dict[str, str] = field(default_factory=dict)  # field -> option name where it is not `--field-name`

    def flag(self, name: str) -> str:
        return self.flags.get(name, "--" + name.replace("_", "-"))


WORKER_OPTIONS = (
    ConfigOptions(InferenceConfig, ("metrics_port",)),  # every kind serves metrics
    ConfigOptions(InferenceConfig, ("max_batch_size", "max_wait_ms", "max_frame_bytes", "max_frame_pixels",
                                    "decode_threads", "delivery", "transaction_timeout_ms",
                                    "fault_sleep_after_first_commit_s"), used_by="infer"),
    ConfigOptions(ControlConfig, ("training_root", "transaction_timeout_ms", "command_timeout_s",
                                  "fault_hang_category", "fault_exit_before_commit_category"), used_by="control"),
)
SECURITY_OPTIONS = ConfigOptions(SecurityConfig, ("enabled", "tls"), used_by="with up", flags={"enabled": "--auth"})
STACK_OPTIONS = ConfigOptions(StackConfig, ("state_dir",))
TRAINING_OPTIONS = ConfigOptions(TrainingConfig, ("max_train_images",))
SEED_OPTIONS = ConfigOptions(ModelConfig, ("seed",))


def add_config_options(parser: argparse.ArgumentParser, *groups: ConfigOptions) -> None:
    for group in groups:
        for name in group.fields:
            _add_field_option(parser, group, name)


def _add_field_option(parser: argparse.ArgumentParser, group: ConfigOptions, name: str) -> None:
    info = group.model.model_fields[name]
    help_text = f"{group.used_by}: {info.description}" if group.used_by else info.description
    shared = next((a for a in parser._actions if a.dest == name), None)
    if shared is not None:  # one option for the same field of two models: it must mean one default
        if shared.default != info.default:
            raise ValueError(f"{name}: {group.model.__name__}'s default {info.default!r} is not {shared.default!r}")
        if shared.help != argparse.SUPPRESS:
            shared.help = f"{shared.help} {help_text}"
        return
    hidden = name.startswith(HIDDEN_FIELD_PREFIX)
    parser.add_argument(group.flag(name), dest=name, default=info.default,
                        help=argparse.SUPPRESS if hidden else help_text, **_value_options(info.annotation))


def _value_options(annotation: object) -> dict:
    """argparse's way to read a field's type: `X | None` reads X, a Literal its choices, a bool is a flag."""
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return {"choices": get_args(annotation)}
    if annotation is bool:
        return {"action": "store_true"}
    return {"type": annotation}


def config_from_args(model: type[Config], args: argparse.Namespace) -> Config:
    """`model` with every field the parsed options name; its defaults for the rest."""
    return model(**{name: getattr(args, name) for name in model.model_fields if hasattr(args, name)})


# ------------------------------------------------------------------------------------- parsing
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inspection", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    stack = commands.add_parser("stack", help="start/stop/describe the local Kafka + Redis (+ Prometheus)")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.add_argument("--wipe", action="store_true", help="with down: delete the servers' data too")
    add_config_options(stack, SECURITY_OPTIONS)
    _stack_options(stack)
    stack.set_defaults(handler=_stack)

    worker = commands.add_parser("worker", help="run an inference or control worker until SIGTERM")
    worker.add_argument("kind", choices=["infer", "control", "monitor"])
    worker.add_argument("--worker-id", default=None)
    worker.add_argument("--metrics-host", default=os.environ.get("INSPECTION_METRICS_HOST", "127.0.0.1"),
                        help="address the metrics endpoint binds (0.0.0.0 in containers; loopback by default)")
    worker.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    worker.add_argument("--device", default="cpu", help="torch device for the backbone, e.g. cuda")
    add_config_options(worker, *WORKER_OPTIONS)
    worker.add_argument("--max-restarts", type=int, default=20, help="restarts after a crash or a stuck consumer "
                        "before the supervisor gives up")
    worker.add_argument("--no-supervisor", action="store_true",
                        help="run in this process; by default a parent restarts the worker if its consumer gets stuck")
    _connection_options(worker)
    worker.set_defaults(handler=_worker)

    simulate = commands.add_parser("simulate", help="publish a dataset's test images as camera frames")
    simulate.add_argument("--root", type=Path, required=True, help="folder of categories in the MVTec AD layout")
    simulate.add_argument("--category", action="append", required=True)
    simulate.add_argument("--rate", type=float, default=10.0, help="frames per second (0 = unthrottled)")
    simulate.add_argument("--limit-per-category", type=int, default=None)
    simulate.add_argument("--no-ground-truth", action="store_true", help="do not attach labels in headers")
    simulate.add_argument("--seed", type=int, default=0)
    _connection_options(simulate)
    simulate.set_defaults(handler=_simulate)

    control = commands.add_parser("control", help="send one operator command to the control topic")
    control.add_argument("action", choices=["add", "remove", "threshold", "expert", "rollback"])
    control.add_argument("category")
    control.add_argument("--train-dir", help="add: folder of normal images")
    control.add_argument("--expert", help="add / expert: expert name")
    control.add_argument("--threshold", type=float, help="threshold: raw score")
    control.add_argument("--false-alarm-rate", type=float, help="threshold: target FAR on held-out normals")
    control.add_argument("--replace", action="store_true", help="add: retrain an existing category")
    control.add_argument("--task-version", type=int, help="rollback: the task version to serve again "
                         "(`inspection store history CATEGORY` lists them)")
    control.add_argument("--frame-budget-ms", type=float, help="add: the line's per-frame budget for this "
                         "category's expert (default: the control worker's)")
    control.add_argument("--wait", type=float, default=0, help="seconds to wait for the command's outcome (0: don't)")
    _connection_options(control)
    control.set_defaults(handler=_control)

    bench = commands.add_parser("bench", help="offline benchmark of every expert on every category of a dataset root")
    bench.add_argument("--root", type=Path, default=Path("../shared/datasets"))
    bench.add_argument("--category", action="append", default=None, help="default: every category under --root")
    bench.add_argument("--expert", action="append", default=None, help="default: the automatic choice's pool "
                       "(name reverse_distillation or ucad to add them)")
    add_config_options(bench, TRAINING_OPTIONS)
    bench.add_argument("--frame-budget-ms", type=float, action="append", default=None,
                       help="per-frame budgets the automatic choice runs at, the first as the `auto` row "
                       "(default: 250 and 2500, the default and a GPU-class budget)")
    add_config_options(bench, SEED_OPTIONS)
    bench.add_argument("--judge", choices=BENCH_JUDGE_MODES, default=DEFAULT_BENCH_JUDGE, help="candidates run on the test set: "
                       "every one the automatic choice fitted (default; gives the validation-test Spearman), only "
                       "those it kept (quicker), or all, the ones it left unfitted fitted here")
    bench.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    bench.set_defaults(handler=_bench)

    delivery = commands.add_parser("bench-delivery", help="frames/s with and without Kafka transactions, and the time "
                                   "to the next committed result after a worker SIGKILL and a broker restart")
    delivery.add_argument("--frames", type=int, default=160, help="frames per throughput run (half per fault run)")
    delivery.add_argument("--rate", type=float, default=6.0, help="frames/s the cameras publish during fault runs")
    delivery.add_argument("--json", type=Path, default=None)
    delivery.set_defaults(handler=_bench_delivery)

    first_frame = commands.add_parser("bench-first-frame", help="latency of a newly added task's first frames, its "
                                      "expert on a backbone no earlier task used (worker on a local stack)")
    first_frame.add_argument("--frames", type=int, default=10)
    first_frame.add_argument("--threads", type=int, default=1, help="the worker's torch CPU threads")
    first_frame.set_defaults(handler=_bench_first_frame)

    perf = commands.add_parser("perf", help="frames/s and p50/p99 per stage: the key search with 1-1,000 tasks, "
                               "the model path against batch size, tasks and expert, and end to end through Kafka")
    perf.add_argument("--part", action="append", choices=["compute", "routing", "model", "kafka"], default=None,
                      help="default: all four")
    perf.add_argument("--dataset-root", type=Path, default=Path("../shared/datasets"))
    perf.add_argument("--category", action="append", default=None, help="default: magnetic_tile, ball_screw")
    perf.add_argument("--device", default="cpu", help="torch device of the model path, e.g. cuda")
    perf.add_argument("--batch-sizes", default="1,4,16,64")
    perf.add_argument("--tasks", default="1,10,100,1000", help="numbers of tasks (real ones plus decoys)")
    perf.add_argument("--expert", action="append", default=None, help="default: patchcore")
    perf.add_argument("--frames", type=int, default=64, help="frames timed per model-path row")
    perf.add_argument("--routing-frames", type=int, default=0, help="test frames per category (0 = all)")
    perf.add_argument("--kafka-frames", type=int, default=160)
    perf.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default: every core)")
    perf.add_argument("--json", type=Path, default=None, help="also write the tables here (markdown in JSON)")
    perf.set_defaults(handler=_perf)

    report = commands.add_parser("report", help="an HTML report of the results on the results topic, with "
                                 "Prometheus plots and galleries of flagged frames and missed defects")
    report.add_argument("--out", type=Path, default=Path("report.html"))
    report.add_argument("--prometheus-url", default=f"http://127.0.0.1:{StackConfig().prometheus_port}",
                        help="'' for none")
    _connection_options(report)
    report.set_defaults(handler=_report)

    boards = commands.add_parser("dashboards", help="write the Grafana dashboards (grafana-foundation-sdk) as JSON")
    boards.add_argument("--out", type=Path, default=None, help="default: deploy/grafana/dashboards")
    boards.set_defaults(handler=_dashboards)

    soak = commands.add_parser("soak", help="randomized fault soak: cameras, operators and a seeded nemesis on a "
                               "stack of its own; exits non-zero on any lost or duplicated frame or answer")
    soak.add_argument("--minutes", type=float, default=20.0, help="how long faults are injected")
    soak.add_argument("--seed", type=int, default=0, help="the nemesis', operators' and cameras' random choices")
    soak.add_argument("--state-dir", type=Path, default=Path(".stack-soak"), help="its stack, data and logs (wiped first)")
    soak.add_argument("--inference-workers", type=int, default=2)
    soak.add_argument("--rate", type=float, default=4.0, help="camera frames per second")
    soak.add_argument("--fault-every-s", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                      help="the pause between two faults, drawn uniformly (default: the soak's, about 55 faults "
                      "in 20 minutes)")
    soak.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    soak.set_defaults(handler=_soak)

    continual = commands.add_parser("continual", help="continual benchmark: tasks learnt in sequence, task inferred per frame")
    continual.add_argument("--root", type=Path, default=Path("../shared/datasets"))
    continual.add_argument("--category", action="append", default=None, help="default: every category under --root")
    continual.add_argument("--elpv", action="store_true", help="add the ELPV solar-cell product (optional extra "
                           "'.[elpv]', CC BY-NC-SA) after the categories of --root")
    continual.add_argument("--synthetic", action="append", default=None,
                           help="synthetic texture tasks appended last (default: brick, grass, gravel; 'none': no synthetic task)")
    continual.add_argument("--synthetic-dir", type=Path, default=Path(".stack/synthetic"))
    continual.add_argument("--expert", default="auto", help="expert of every task; 'auto' = automatic choice")
    add_config_options(continual, TRAINING_OPTIONS, SEED_OPTIONS)
    continual.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    continual.set_defaults(handler=_continual)

    demo = commands.add_parser("demo", help="the end-to-end demo on the local stack (README's first command)")
    demo.add_argument("--dataset-root", type=Path, default=Path("../shared/datasets"))
    demo.add_argument("--category", action="append", default=None, help="default: magnetic_tile, ball_screw")
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--rate", type=float, default=8.0, help="frames per second the cameras publish")
    demo.add_argument("--limit-per-category", type=int, default=None)
    add_config_options(demo, TRAINING_OPTIONS)
    demo.add_argument("--keep-running", action="store_true", help="leave the stack and workers up afterwards")
    demo.add_argument("--report", type=Path, default=None, help="write the JSON report here")
    _stack_options(demo)
    demo.set_defaults(handler=_demo)

    routing = commands.add_parser("bench-routing", help="task identification and unknown rejection with routing's "
                                  "ViT key pass at smaller squares (measurement only; the stored routing is unchanged)")
    routing.add_argument("--root", type=Path, default=Path("../shared/datasets"), help="MVTec-layout products")
    routing.add_argument("--sizes", type=int, nargs="+", default=[112, 140, 168, 224], help="key-pass square sides")
    routing.add_argument("--elpv", action="store_true", help="add the ELPV solar-cell product (optional extra '.[elpv]')")
    routing.add_argument("--synthetic", action="store_true", help="add the synthetic texture categories (brick, grass, "
                         "gravel; written to a temporary folder)")
    routing.add_argument("--max-test-frames", type=int, default=None, help="a seeded sample of each product's test "
                         "frames (default: all)")
    add_config_options(routing, SEED_OPTIONS)
    routing.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    routing.set_defaults(handler=_bench_routing)
    return parser


def _bench_routing(args: argparse.Namespace) -> int:
    import tempfile
    import time

    from pipeline.evaluation.routing_sizes import markdown_table, measure_routing_sizes, product_sources, rows_as_dicts
    from pipeline.features.backbone import Backbones

    model, started = config_from_args(ModelConfig, args), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as scratch:  # synthetic frames: nothing kept
        sources = product_sources(args.root, args.elpv, Path(scratch) if args.synthetic else None, model.seed)
        rows = measure_routing_sizes(sources, Backbones.pretrained(), model, TrainingConfig(), args.sizes,
                                     args.max_test_frames)
    seconds = time.perf_counter() - started
    print(markdown_table(rows) + f"\n\n{len(sources)} products, {seconds:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"sizes": args.sizes, "products": [s.category for s in sources],
                                         "max_test_frames": args.max_test_frames, "seed": model.seed,
                                         "seconds": round(seconds, 1), "rows": rows_as_dicts(rows)}, indent=2))
    return 0


_PORTS = ("kafka_port", "kafka_controller_port", "redis_port", "prometheus_port")


def _stack_options(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser, STACK_OPTIONS)
    for port in _PORTS:  # None: what the state folder remembers from its `up`, else the default
        info = StackConfig.model_fields[port]
        parser.add_argument(STACK_OPTIONS.flag(port), type=int, default=None,
                            help=f"{info.description} Default: the state folder's, else {info.default}.")


def _connection_options(parser: argparse.ArgumentParser) -> None:
    defaults = StackConfig()
    parser.add_argument("--bootstrap", default=os.environ.get("INSPECTION_BOOTSTRAP", defaults.bootstrap_servers))
    parser.add_argument("--redis-url", default=os.environ.get("INSPECTION_REDIS_URL", defaults.redis_url))


def stack_config(args: argparse.Namespace) -> StackConfig:
    from tools.stack import remembered_config

    # A stack is found again by its folder alone: `status` or `down --state-dir X` without the ports it was
    # started with must not take a live server's pid file for a stale one.
    base = remembered_config(args.state_dir) or StackConfig(state_dir=args.state_dir)
    ports = {port: getattr(args, port) for port in _PORTS if getattr(args, port) is not None}
    security = config_from_args(SecurityConfig, args)
    starting = getattr(args, "action", "up") == "up"
    return base.model_copy(update={**ports, "state_dir": args.state_dir,
                                   **({"security": security} if starting else {})})


# ------------------------------------------------------------------------------------ handlers
def _stack(args: argparse.Namespace) -> int:
    from tools.stack import LocalStack

    stack = LocalStack(stack_config(args), TopicsConfig())
    if args.action == "up":
        report = stack.up()
    elif args.action == "down":
        report = stack.down(wipe=args.wipe)
    else:
        report = stack.status()
    print(json.dumps(report, indent=2, default=str))
    return 0


def default_worker_id(kind: str) -> str:
    """Unique per process on a host and across hosts (containers all run as a low pid)."""
    return f"{kind}-{socket.gethostname()}-{os.getpid()}"


def _worker(args: argparse.Namespace) -> int:
    if not args.no_supervisor:  # the parent stays small: no torch, no models
        from workers.liveness import supervise

        # The id is chosen here, once: every restarted child keeps it, so an inference worker keeps its
        # transactional id (a restart fences its predecessor and aborts its open transaction at once).
        named = [] if args.worker_id else ["--worker-id", default_worker_id(args.kind)]
        return supervise([sys.executable, "-m", "workers.cli", *args.argv, *named, "--no-supervisor"],
                         max_restarts=args.max_restarts)
    import torch
    from prometheus_client import CollectorRegistry

    from pipeline.core.store import KnowledgeStore
    from pipeline.features.backbone import Backbones
    from workers.metrics import ControlMetrics, InferenceMetrics, serve

    if args.threads:
        torch.set_num_threads(args.threads)
    worker_id = args.worker_id or default_worker_id(args.kind)
    stop = _stop_on_signals()
    registry = CollectorRegistry()
    from workers.security import load_credentials, redis_client_options

    backbones = Backbones.pretrained(args.device)
    # Credentials come from the environment or a credentials file (never argv); Kafka clients read them too.
    store = KnowledgeStore.from_url(args.redis_url, **redis_client_options(load_credentials()))
    topics = TopicsConfig()
    if args.kind == "infer":
        from pipeline.core.inspector import Inspector
        from workers.inference import InferenceWorker

        worker = InferenceWorker(args.bootstrap, topics, config_from_args(InferenceConfig, args), Inspector(backbones, ModelConfig()), store,
                                 InferenceMetrics(registry), worker_id)
    elif args.kind == "monitor":
        from pipeline.core.inspector import Inspector
        from workers.metrics import MonitorMetrics
        from workers.monitor import MonitorWorker

        worker = MonitorWorker(Inspector(backbones, ModelConfig()), store, MonitorMetrics(registry), worker_id)
    else:
        from workers.control import ControlWorker

        worker = ControlWorker(args.bootstrap, topics, config_from_args(ControlConfig, args), ModelConfig(),
                               TrainingConfig(), backbones, store, ControlMetrics(registry), worker_id)
    port = serve(registry, args.metrics_host, args.metrics_port)
    log.info("%s ready; metrics on http://%s:%d/metrics", worker_id, args.metrics_host, port)
    worker.run(stop)
    log.info("%s stopped", worker_id)
    return 0


def _stop_on_signals() -> threading.Event:
    """SIGTERM/SIGINT finish the current batch, then stop (offsets of finished work are committed)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _simulate(args: argparse.Namespace) -> int:
    from tools.simulator import dataset_stream, publish

    items = dataset_stream(args.root, args.category, args.limit_per_category, args.seed)
    sent = publish(args.bootstrap, TopicsConfig(), items, args.rate, with_ground_truth=not args.no_ground_truth)
    print(json.dumps({"published": len(sent), "topic": TopicsConfig().frames}))
    return 0


def _control(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        command = _command_of(args)
    except ValidationError as exc:  # e.g. --threshold nan: refused here, never sent
        raise SystemExit(f"control {args.action}: {exc.errors(include_url=False)[0]['msg']} "
                         f"({'.'.join(map(str, exc.errors()[0]['loc']))})") from None
    return _send_control(args, command)


def _command_of(args: argparse.Namespace):
    from schemas.messages import AddCategory, ChooseExpert, RemoveCategory, RollbackCategory, SetThreshold

    if args.action == "add":
        if not args.train_dir:
            raise SystemExit("control add needs --train-dir")
        command = AddCategory(category=args.category, train_dir=str(Path(args.train_dir).resolve()),
                              expert=args.expert, replace=args.replace, frame_budget_ms=args.frame_budget_ms)
    elif args.action == "remove":
        command = RemoveCategory(category=args.category)
    elif args.action == "threshold":
        command = SetThreshold(category=args.category, threshold=args.threshold, false_alarm_rate=args.false_alarm_rate)
    elif args.action == "rollback":
        if args.task_version is None:
            raise SystemExit("control rollback needs --task-version")
        command = RollbackCategory(category=args.category, task_version=args.task_version)
    else:
        command = ChooseExpert(category=args.category, expert=args.expert)
    return command


def _send_control(args: argparse.Namespace, command) -> int:
    from tools.client import send_commands, wait_for_outcomes

    send_commands(args.bootstrap, TopicsConfig(), [command])
    print(json.dumps({"sent": command.action, "command_id": command.command_id}))
    if args.wait > 0:
        outcome = wait_for_outcomes(args.bootstrap, TopicsConfig(), [command.command_id], args.wait)[command.command_id]
        print(outcome.model_dump_json())
        return 0 if outcome.kind.value == "finished" else 1
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pipeline.data.datasets import discover_categories
    from pipeline.evaluation.benchmark import benchmark_category, markdown_table, rows_as_dicts
    from pipeline.core.expert_selection import AUTO_EXPERTS
    from pipeline.features.backbone import Backbones

    from pipeline.evaluation.benchmark import GPU_CLASS_FRAME_BUDGET_MS
    from schemas.config import DEFAULT_FRAME_BUDGET_MS

    model = config_from_args(ModelConfig, args)
    training = config_from_args(TrainingConfig, args)
    budgets = args.frame_budget_ms or [DEFAULT_FRAME_BUDGET_MS, GPU_CLASS_FRAME_BUDGET_MS]
    if not all(math.isfinite(b) and b > 0 for b in budgets):
        raise SystemExit("--frame-budget-ms takes finite numbers > 0")
    backbones = Backbones.pretrained()
    from tools.progress import bars_disabled, fraction_bar

    rows = []
    for category in args.category or discover_categories(args.root):
        with fraction_bar(f"bench {category}", disable=bars_disabled(args.quiet)) as on_progress:
            rows += benchmark_category(
                args.root, category, args.expert or list(AUTO_EXPERTS), backbones, model, training,
                on_row=lambda row: log.info("%s/%s @ %s: image AUROC %.4f, recall@1%%FAR %.3f, %.0f ms/frame",
                                            row.category, row.expert, row.spec, row.image_auroc,
                                            row.recall_at_1pct_far, row.ms_per_frame),
                on_progress=on_progress, judge=args.judge, frame_budgets_ms=budgets,
            )
    print(markdown_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "max_train_images": args.max_train_images,
                                         "frame_budgets_ms": budgets, "rows": rows_as_dicts(rows)}, indent=2))
    return 0


def _soak(args: argparse.Namespace) -> int:
    from tools.soak import DEFAULT_FAULT_EVERY_S, SoakOptions, run_soak, write_report

    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # the soak's own clients see every broker kill
    # a SIGTERM ends the soak through its cleanup: its stack and workers are stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    report = run_soak(SoakOptions(minutes=args.minutes, seed=args.seed, state_dir=args.state_dir.resolve(),
                                  inference_workers=args.inference_workers, rate_fps=args.rate,
                                  fault_every_s=tuple(args.fault_every_s or DEFAULT_FAULT_EVERY_S)))
    print(report.table())
    if args.json:
        write_report(report, args.json)
    return 0 if report.ok else 1


def _bench_delivery(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from tools.delivery_bench import markdown_table, run_delivery_benchmark

    rows = run_delivery_benchmark(args.frames, args.rate)
    print(markdown_table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


def _bench_first_frame(args: argparse.Namespace) -> int:
    from tools.first_frame_bench import run_first_frame_benchmark, table

    print(table(run_first_frame_benchmark(args.frames, args.threads)))
    return 0


def _perf(args: argparse.Namespace) -> int:
    import torch

    from tools.perf import PerfOptions, run_perf

    if args.threads:
        torch.set_num_threads(args.threads)
    options = PerfOptions(
        parts=tuple(args.part or PerfOptions.parts), dataset_root=args.dataset_root,
        categories=tuple(args.category or PerfOptions.categories), device=args.device,
        batch_sizes=_ints(args.batch_sizes), task_counts=_ints(args.tasks), experts=tuple(args.expert or ("patchcore",)),
        frames=args.frames, routing_frames=args.routing_frames, kafka_frames=args.kafka_frames)
    tables = run_perf(options)
    print(tables)
    if args.json:
        args.json.write_text(json.dumps({"options": str(options), "tables": tables}, indent=2))
    return 0


def _ints(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise SystemExit(f"expected positive integers separated by commas, got {text!r}")
    return values


def _report(args: argparse.Namespace) -> int:
    from schemas.messages import InspectionResult
    from tools.client import parse_all
    from workers.kafka_io import read_topic
    from tools.progress import count_bar
    from tools.report import write_report

    topics = TopicsConfig()
    with count_bar("reading results", None, "result") as bar:
        def count(records) -> bool:  # read until the timeout: the topic has no "last" record
            bar.update(len(records) - bar.n)
            return False

        records = read_topic(args.bootstrap, topics.results, topics, timeout_s=10, until=count)
    path = write_report(args.out, parse_all(InspectionResult, records), args.prometheus_url or None)
    print(json.dumps({"report": str(path), "results": len(records)}))
    return 0


def _dashboards(args: argparse.Namespace) -> int:
    from tools.dashboards import OUT_DIR, write_all

    print(json.dumps({"written": [str(p) for p in write_all(args.out or OUT_DIR)]}, indent=2))
    return 0


def _continual(args: argparse.Namespace) -> int:
    from pipeline.data.datasets import SYNTHETIC_TEXTURES, discover_categories, write_synthetic_category
    from pipeline.evaluation.continual import TaskSource, markdown_report, run_continual_benchmark
    from pipeline.features.backbone import Backbones

    model = config_from_args(ModelConfig, args)
    training = config_from_args(TrainingConfig, args)
    root = args.root
    sources = [TaskSource(c, root) for c in (args.category or (discover_categories(root) if root.is_dir() else []))]
    if args.elpv:
        from pipeline.data.elpv import ELPV_CONTINUAL_CATEGORY, default_elpv_root, materialise_elpv

        materialise_elpv(default_elpv_root(), seed=args.seed)
        sources.append(TaskSource(ELPV_CONTINUAL_CATEGORY, default_elpv_root()))
    textures = [] if args.synthetic == ["none"] else (args.synthetic or SYNTHETIC_TEXTURES)
    if "none" in textures or not set(textures) <= set(SYNTHETIC_TEXTURES):
        raise SystemExit(f"--synthetic takes {', '.join(SYNTHETIC_TEXTURES)} (repeatable) or 'none' alone")
    for texture in textures:
        name = f"synthetic_{texture}"
        write_synthetic_category(args.synthetic_dir, name, texture, seed=args.seed)
        sources.append(TaskSource(name, args.synthetic_dir))
    from tools.progress import bars_disabled, count_bar

    def on_step(step, bar) -> None:
        log.info("task %d (%s) learnt in %.1fs: %s", step.step + 1, step.added, step.train_seconds,
                 ", ".join(f"{t} AUROC {r['image_auroc']:.4f} task-ID {r['task_id_accuracy']:.4f}" for t, r in step.rows.items()))
        bar.update(1)

    with count_bar("continual", len(sources), "task", disable=bars_disabled(args.quiet)) as bar:
        report = run_continual_benchmark(
            sources, Backbones.pretrained(), model, training,
            expert=None if args.expert == "auto" else args.expert, on_step=lambda step: on_step(step, bar),
        )
    print(markdown_report(report))
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2, default=str))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tools.demo import DemoOptions, run_demo

    options = DemoOptions(
        stack=stack_config(args),
        dataset_root=args.dataset_root,
        categories=args.category,
        workers=args.workers,
        rate_fps=args.rate,
        limit_per_category=args.limit_per_category,
        max_train_images=args.max_train_images,
        keep_running=args.keep_running,
        report_path=args.report,
    )
    return run_demo(options)


if __name__ == "__main__":
    sys.exit(main())
