"""``tracekit trace-dataset`` and ``tracekit edit-sweep``: the two sweep recipes as commands.

``recipes/trace_dataset.py`` and ``recipes/edit_sweep.py`` are thin scripts over this module;
the sweeps themselves are ``tracekit.studies``.
Both take ``--executor local|ray``: ``local`` (the default) computes here; ``ray`` spreads the
items over a Ray cluster's workers while this process writes the store (docs/cluster.md).
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

from tracekit.cli.common import add_model_args, console, load_from_args
from tracekit.cli.editing import CONVENTIONS
from tracekit.data.args import add_data_args, records_from_args
from tracekit.errors import TracekitError
from tracekit.store.cli import add_store_args
from tracekit.studies.tasks import TRACE_KINDS

# Parsers are built for `tracekit --help`: the store, the studies and torch load when a command runs.

PROBLEMS = ("error-injection", "tracing-reversal", "fact-erasure", "fact-amplification", "fact-forcing")
METHODS = ("rome", "memit", "ft-1", "ft-5")

TRACE_HELP = """Causal tracing (and representation zeroing) over a dataset, into a result store.

    tracekit trace-dataset --model smollm2-135m --n 2000 --n-known 100 --kinds mlp --windows 5 \\
        --store runs/smollm.sqlite

Resumable: rerun the same command after an interruption and only missing traces are computed.
Sharded: --shard K/N (e.g. a Slurm array with --store runs/shard-{shard}.sqlite, then
`tracekit store merge runs/all.sqlite runs/shard-*.sqlite`); or --shard shared for processes
side by side on one machine and one store, each taking the next items nobody holds. On a Ray
cluster: --executor ray.
"""

EDIT_HELP = """The editing sweep (methods x problems x layers) over a dataset, into a result store.

    tracekit edit-sweep --model smollm2-135m --n 2000 --n-known 100 \\
        --methods rome ft-1 --problems error-injection fact-forcing --layers auto --store runs/smollm.sqlite

--layers auto: about 8 layers spread from first to last plus the default (ROME preset)
layer, as the paper did for GPT-J. Every edit result is stored the moment it is scored;
rerun to resume; --shard K/N to split the work over a scheduler's jobs, --shard shared for
processes side by side on one machine and one store, or --executor ray to spread it over a
Ray cluster (docs/cluster.md).
"""


def add_executor_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where the items run")
    group.add_argument("--executor", choices=["local", "ray"], default="local",
                       help="local: in this process (default); ray: on a Ray cluster's workers, one model per "
                            "worker, this process writing the store (needs pip install 'tracekit[ray]')")
    group.add_argument("--address", default=None,
                       help="Ray cluster: 'auto' (the one this machine joined), ray://HOST:10001, or HOST:6379; "
                            "default: $RAY_ADDRESS, else a cluster started here by `ray start`, else a new local one")
    group.add_argument("--workers", type=int, default=None,
                       help="Ray workers (each loads the model once); default: the cluster's GPUs / "
                            "--gpus-per-worker (CPU-only: its CPUs / --cpus-per-worker)")
    group.add_argument("--gpus-per-worker", type=float, default=None,
                       help="GPUs per worker, fractions allowed (0.5: two models per GPU); default: 1 on a "
                            "cluster with GPUs, else 0")
    group.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per worker; default: %(default)s")
    group.add_argument("--points-per-batch", type=int, default=1,
                       help="points handed to a worker at once (a point's items share its preparation); "
                            "default: %(default)s")
    group.add_argument("--worker-env", nargs="+", default=[], metavar="KEY=VALUE",
                       help="environment variables for the Ray workers, e.g. TRACEKIT_CACHE=/shared/tracekit "
                            "(a cache every machine reads); '{worker}' in a value becomes the worker's number")
    group.add_argument("--max-attempts", type=int, default=3,
                       help="tries per item (a worker dying on it, or an unexpected error) before it is stored "
                            "as failed; default: %(default)s")


@contextmanager
def model_from_args(args):
    """The loaded model (--executor local), or a Ray pool's view of the model its workers loaded."""
    if args.executor == "local":
        yield load_from_args(args)
        return
    from tracekit.studies.executors import ModelSource
    from tracekit.studies.ray_executor import RayExecutor

    bad = [pair for pair in args.worker_env if "=" not in pair or pair.startswith("=")]
    if bad:
        raise TracekitError(f"--worker-env takes KEY=VALUE pairs, got {' '.join(bad)}")
    source = ModelSource(args.model, backend=args.backend, device=args.device, dtype=args.dtype,
                         prepend_bos=False if getattr(args, "bare_prompts", False) else None)
    with RayExecutor(source, address=args.address, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                     cpus_per_worker=args.cpus_per_worker, points_per_batch=args.points_per_batch,
                     max_attempts=args.max_attempts,
                     worker_env=dict(pair.split("=", 1) for pair in args.worker_env)) as pool:
        with console.status(f"starting {pool.n_workers} Ray worker(s), each loading {args.model}"):
            model = pool.model
        workers = pool.ready_workers()
        console.print(f"Ray: {len(workers)} of {pool.n_workers} worker(s) ready on "
                      f"{len({w.info['node'] for w in workers})} machine(s) ({workers[0].info['device']})",
                      highlight=False)
        yield model


def add_trace_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_data_args(parser)
    group = parser.add_argument_group("tracing")
    group.add_argument("--kinds", nargs="+", default=["mlp"], choices=TRACE_KINDS,
                       help="states to restore (zero = representation zeroing of MLP outputs); default: mlp")
    group.add_argument("--windows", nargs="+", type=int, default=[5],
                       help="window sizes (the paper: 5; ROME's figures: 10); default: 5")
    group.add_argument("--samples", type=int, default=10, help="noise samples per point; default: %(default)s")
    group.add_argument("--noise", default="s3", help="noise rule: s3 (3 x embedding std), a float, or u<scale>")
    group.add_argument("--seed", type=int, default=0, help="noise seed (point i uses seed + case id)")
    group.add_argument("--batch", type=int, default=None,
                       help="points traced together, their rows packed into shared passes (same results); "
                            "default: 1 on a CPU (packing only adds padding there), on a GPU as many as a quarter "
                            "of its free memory holds (up to 64; 16 on Ray workers' GPUs)")
    add_store_args(parser)
    add_executor_args(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _given_batch(args) -> int | None:
    if args.batch is not None and args.batch < 1:
        raise TracekitError(f"--batch must be >= 1, got {args.batch}")
    return args.batch


def trace_batch(args, model) -> int:
    """--batch, or the default for the device the points are traced on (1 where that is not here)."""
    if _given_batch(args) is not None:
        return args.batch
    if getattr(model, "device", None) is None:  # a Ray pool: the workers' memory is not seen from here
        return 16 if getattr(model, "device_type", "cpu") == "cuda" else 1
    from tracekit.tracing.trace import default_prompt_batch

    return default_prompt_batch(model, args.samples)


def run_trace(args, *, trace_fn=None, zero_fn=None) -> None:
    from tracekit.store.cli import open_store_from_args
    from tracekit.store.sweep import print_report
    from tracekit.studies.study import trace_study

    store, shard = open_store_from_args(args)
    with store, model_from_args(args) as model:
        records = records_from_args(args, model, cache=store, shard=shard, console=console)
        report = trace_study(model, records, store, kinds=args.kinds, windows=args.windows, samples=args.samples,
                             noise=args.noise, seed=args.seed, shard=shard, trace_fn=trace_fn, zero_fn=zero_fn,
                             progress=not args.quiet, batch=trace_batch(args, model))
        print_report(report, store, console)


def add_edit_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_data_args(parser)
    group = parser.add_argument_group("editing")
    group.add_argument("--methods", nargs="+", default=["rome"], choices=METHODS, help="default: rome")
    group.add_argument("--problems", nargs="+", default=["error-injection"], choices=PROBLEMS,
                       help="default: error-injection")
    group.add_argument("--layers", nargs="+", default=["auto"],
                       help="0-based edit layers, or 'auto' (spread layers + the default layer); default: auto")
    group.add_argument("--spread", type=int, default=8, help="how many spread layers 'auto' takes; default: 8")
    group.add_argument("--default-layer", type=int, default=None,
                       help="the method's usual layer (default: the editing preset's ROME layer for the model); "
                            "hyperparameters come from the editing presets for each model, method and problem")
    group.add_argument("--seed", type=int, default=0, help="seed for noise (Fact Forcing, Tracing Reversal)")
    group.add_argument("--convention", default="paper-code", choices=CONVENTIONS,
                       help="how Fact Forcing and Tracing Reversal noise the subject: as the paper's code (noise "
                            "drawn afresh for every pass) or tracekit's single seeded draw (docs/fidelity.md); "
                            "a store holds one convention; default: %(default)s")
    group.add_argument("--batch", type=int, default=None,
                       help="points edited together at each (method, problem, layer): their v* optimised in one "
                            "pass per step and their scoring in one pass (same results); default: 16 on a GPU, "
                            "1 on a CPU (where padding to the longest point costs more than batching saves)")
    group.add_argument("--score-batch", type=int, default=None,
                       help="of a batch, points scored in one pass (default: the whole batch); on a CPU, "
                            "--batch 8 --score-batch 1 tunes FT-1/FT-5 8 points at a time (1.8x faster per item) and scores "
                            "them one by one (batched scoring is slower there)")
    add_store_args(parser)
    add_executor_args(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def edit_batch(args, model) -> int:
    """--batch, or the default for the device the items run on."""
    if _given_batch(args) is not None:
        return args.batch
    from tracekit.editing.kv_batch import default_batch

    return default_batch(getattr(model, "device", None) or getattr(model, "device_type", "cpu"))


def score_batch(args) -> int | None:
    if args.score_batch is not None and args.score_batch < 1:
        raise TracekitError(f"--score-batch must be >= 1, got {args.score_batch}")
    return args.score_batch


def edit_layers(args, model) -> tuple[list[int], int | None]:
    from tracekit.studies.executors import preset_layer
    from tracekit.studies.study import spread_layers

    default = args.default_layer if args.default_layer is not None else preset_layer(model)
    if args.layers == ["auto"]:
        return spread_layers(model.n_layers, args.spread, default), default
    try:
        return sorted({int(x) for x in args.layers}), default
    except ValueError:
        raise TracekitError(f"--layers takes integers or 'auto', got {' '.join(args.layers)}") from None


def run_edit(args, *, edit_fn=None, hparams=None) -> None:
    from tracekit.store.cli import open_store_from_args
    from tracekit.store.sweep import print_report
    from tracekit.studies.study import edit_study

    store, shard = open_store_from_args(args)
    with store, model_from_args(args) as model:
        layers, default = edit_layers(args, model)
        records = records_from_args(args, model, cache=store, shard=shard, console=console)
        console.print(f"edit layers {layers} (default layer {default})", highlight=False)
        report = edit_study(model, records, store, methods=args.methods, problems=args.problems, layers=layers,
                            default_layer=default, hparams=hparams, seed=args.seed, shard=shard, edit_fn=edit_fn,
                            progress=not args.quiet, batch=edit_batch(args, model),
                            score_batch=score_batch(args), convention=args.convention)
        print_report(report, store, console)


def register(sub) -> None:
    p = sub.add_parser("trace-dataset", help="causal tracing over a dataset, into a result store",
                       description=TRACE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_trace_args(p)
    p.set_defaults(func=run_trace)
    p = sub.add_parser("edit-sweep", help="the editing sweep (methods x problems x layers) into a result store",
                       description=EDIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_edit_args(p)
    p.set_defaults(func=run_edit)
