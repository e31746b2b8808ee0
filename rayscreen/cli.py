"""``rayscreen <stage> ...``: the command line. Every stage calls the same function as
its ``jobs/`` entry point, so there is one code path for laptop and cluster."""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
import time
import warnings

from .store import RayscreenError
from .store.uri import mask_url_passwords


def _storage_options(text: str | None) -> dict | None:
    """``--storage-options '{"endpoint_url": "http://127.0.0.1:5000"}'``; credentials stay in the environment."""
    from .config import ConfigError

    if not text:
        return None
    example = """e.g. '{"endpoint_url": "http://127.0.0.1:5000"}'"""
    try:
        options = json.loads(text)
    except ValueError as e:  # JSONDecodeError: a user's typo, not a traceback
        # the text itself is not repeated: it may hold credentials
        raise ConfigError(f"--storage-options: expected a JSON object, {example}; "
                          f"the text given is not JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(options, dict):
        raise ConfigError(f"--storage-options: expected a JSON object, {example}; found {type(options).__name__}")
    return options


def _int_at_least(low: int):
    """An argparse ``type``: an integer ``>= low``. A value out of range is a usage error
    naming the flag (exit 2), caught before a command writes anything."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {low}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: expected an integer >= {low}")
        return value

    return parse


def _fraction(text: str) -> float:
    """An argparse ``type``: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a fraction in [0, 1]") from None
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text}: expected a fraction in [0, 1]")
    return value


def cmd_info(args) -> int:
    from .store.info import format_info, plate_info
    from .store.uri import expand_uris

    options = _storage_options(args.storage_options)
    for uri in expand_uris(args.uris, options):  # globs as in a config's plates
        info = plate_info(uri, options)
        print(json.dumps(info, default=str) if args.json else format_info(info))
    return 0


def cmd_ingest(args) -> int:
    from .ingest import ingest

    uris = ingest(args.loaddata, args.out_dir, platemap=args.platemap, ngff=args.ngff, levels=args.levels,
                  use_ray=not args.no_ray, progress=not args.quiet,
                  storage_options=_storage_options(args.storage_options))
    for uri in uris:
        print(uri)
    return 0


def cmd_synth(args) -> int:
    from . import synth

    so = _storage_options(args.storage_options)
    # a flag of the other kind of screen would be ignored without a word
    other = {"wscnn": {"--n-plates": args.n_plates},
             "moa": {"--n-images": args.n_images, "--rare-fraction": args.rare_fraction}}[args.kind]
    given = [flag for flag, value in other.items() if value is not None]
    if given:
        raise RayscreenError(f"synth {args.kind}: {', '.join(given)} is for the other kind of screen "
                             f"({'moa' if args.kind == 'wscnn' else 'wscnn'}); expected "
                             f"{'--n-images, --rare-fraction' if args.kind == 'wscnn' else '--n-plates'}")
    if args.kind == "wscnn":
        uris = synth.synth_wscnn(args.out_dir, n_images=400 if args.n_images is None else args.n_images,
                                 rare_fraction=0.1 if args.rare_fraction is None else args.rare_fraction,
                                 seed=args.seed, storage_options=so)
    else:
        uris = synth.synth_moa(args.out_dir, n_plates=2 if args.n_plates is None else args.n_plates,
                               seed=args.seed, storage_options=so)
    for uri in uris:
        print(uri)
    return 0


def _load(args, extra: dict | None = None):
    """The config of ``args.config`` with ``--set`` (then ``extra``, from a stage's own flags)
    applied, and ``--storage-options`` merged over its ``storage_options`` (the flag's keys win)."""
    from .config import load_config, parse_overrides

    storage_options = _storage_options(getattr(args, "storage_options", None))
    config = load_config(args.config, overrides={**parse_overrides(args.set), **(extra or {})})
    if storage_options:
        config = config.replace(storage_options={**(config.storage_options or {}), **storage_options})
    return config


def _check_plates(config) -> None:
    """Expand the config's plate globs, and look for the plates named without one, before Ray
    starts: a glob that matches nothing or a plate that is not there is then an error within
    a second, naming it, not after a local Ray has taken ~15 s to start (or a wait on a
    cluster address that never answers). The stage expands them again; a listing and one
    request per plate, in the planning threads, are cheap next to a Ray start."""
    from .store.uri import exists, expand_uris
    from .stream.datasource import in_threads

    def present(uri: str) -> bool:
        try:
            return exists(uri, config.storage_options)
        except PermissionError:  # S3 without s3:ListBucket answers 403 for a prefix: the stage will tell
            return True

    plates = expand_uris(config.plates, config.storage_options)
    missing = [u for u, ok in zip(plates, in_threads(present, plates)) if not ok]
    if missing:
        hint = "; a list of plates is written [a.zarr, b.zarr]" if any("," in u for u in missing) else ""
        raise RayscreenError(f"plates: {len(missing)} plate(s) not found: {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}{hint}")


def _init_ray() -> None:
    # Under `ray job submit` RAY_ADDRESS points at the cluster and ray.init() joins it;
    # on a laptop the same call starts a local embedded Ray.
    from .raylocal import ensure_ray

    ensure_ray()


def cmd_stage(args) -> int:
    from .pipeline import run_stage

    # illum's --normalize, given, sets the config's stream.normalize (over a --set of it)
    normalize = getattr(args, "normalize", None)
    config = _load(args, {"stream.normalize": normalize} if normalize else None)
    # no ray.init here: a stage validates its config first (bad configs fail in a second,
    # not after starting Ray); Ray Data / Ray Train then start or join Ray themselves.
    # illum spreads its Ray tasks only over a Ray that is already up: start or join it.
    if args.command == "illum":
        _check_plates(config)
        _init_ray()
    result = run_stage(config, args.command, progress=not args.quiet)
    if result is None or args.quiet:
        return 0
    if args.command == "train":
        print(_train_summary(result, config.train.metric))
    elif args.command == "evaluate":
        # the comparison table is printed above; the full result (per-MOA figures, confusion
        # matrices) is a page of JSON, so say where it is instead of printing it
        from .analysis.stages import evaluation_dir
        from .store.uri import join

        print(f"evaluation: {join(evaluation_dir(config), 'evaluation.json')}")
    else:
        print(json.dumps(result, default=str) if isinstance(result, dict) else result)
    return 0


def _train_summary(result, metric: str) -> str:
    """A few lines on a training run (its result holds the whole metrics table, whose repr
    pandas truncates to a meaningless excerpt): epochs, the best epoch and its score, where
    the model and the run are."""
    best, metrics, score = result.best_epoch, result.metrics, ""
    if best is not None and metric in metrics.columns:
        rows = metrics[metrics["epoch"] == best]
        if len(rows):
            score = f" ({metric} {float(rows[metric].iloc[-1]):.4g})"
    return "\n".join([f"train: {result.epochs_completed} epoch(s); best epoch {best}{score}",
                      f"model: {result.artefact}",
                      f"run: {result.run_dir}"])


def cmd_illum(args) -> int:
    from .config import config_from_dict, parse_overrides

    configs = [a for a in args.config if a.lower().endswith((".yaml", ".yml"))]
    if configs and len(args.config) > 1:  # else the YAML file would be taken for a plate, after Ray started
        raise RayscreenError(f"illum takes one CONFIG.yaml or plates, not both: got {args.config}")
    if configs:
        args.config = configs[0]
        return cmd_stage(args)
    # plates given directly: illumination (and the chosen normaliser) for each; --set keys
    # (stream.level, stream.channels, ...) apply as they would to a config, and are checked as strictly
    from .pipeline import stage_function

    overrides = parse_overrides(args.set)
    if args.normalize:
        overrides["stream.normalize"] = args.normalize
    config = config_from_dict({"plates": list(args.config), "output": "",
                               "storage_options": _storage_options(args.storage_options),
                               "stream": {"illumination": True, "normalize": "percentile"}},
                              source="illum", overrides=overrides)
    _check_plates(config)
    _init_ray()
    result = stage_function("illum")(config, progress=not args.quiet)
    if not args.quiet:
        print(json.dumps(result, default=str) if isinstance(result, dict) else result)
    return 0


def cmd_run(args) -> int:
    from .pipeline import check_settings, is_complete, planned_stages, run_pipeline

    config = _load(args)
    stages = args.stages.split(",") if args.stages else None
    # as in cmd_stage: illum spreads its fits over Ray only when Ray is already up, so start or
    # join it when illum is going to run (the plan run_pipeline makes); otherwise a cluster's
    # pipeline job fits every plate one after another on the head node
    todo = planned_stages(config, stages)
    if "illum" in todo and (args.force or not is_complete(config, "illum")):
        check_settings(config, todo)  # as run_pipeline does, but before Ray starts
        _check_plates(config)
        _init_ray()
    run_pipeline(config, stages=stages, progress=not args.quiet, force=args.force)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, quiet=args.quiet)
    return 0


def cmd_config(args) -> int:
    """``rayscreen config CONFIG``: the config with every default filled in, as the stages
    see it (secrets in storage_options masked); ``--reference``: every key documented."""
    from .config import ConfigError, dump_config

    if args.reference:
        from .config_doc import config_reference

        print(config_reference(), end="")
        return 0
    if args.config is None:
        raise ConfigError("give a CONFIG.yaml to print, or --reference for every key")
    print(dump_config(_load(args)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rayscreen", description="Process high-content screens (OME-Zarr HCS plates) on Ray: the same "
        "commands on a laptop and, under `ray job submit` (jobs/*.py), on a cluster. "
        "`rayscreen <stage> --help` for each; `rayscreen config --reference` for every config key.")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks with errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="<stage>")
    # every command takes --quiet and -v after its name too (`rayscreen ingest CSV OUT --quiet`,
    # and jobs/*.py, which put their arguments after the command); SUPPRESS: when not given
    # there, the top-level flag's value stands
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output")
    quiet.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="debug logging, and tracebacks with errors")

    s = sub.add_parser("synth", help="write a synthetic screen (WSCNN simulation or MOA screen)", parents=[quiet])
    s.add_argument("kind", choices=["wscnn", "moa"])
    s.add_argument("out_dir")
    s.add_argument("--seed", type=_int_at_least(0), default=0)
    s.add_argument("--n-images", type=_int_at_least(1),
                   help="wscnn: number of images (fields), rounded up to whole wells of 4 fields (default 400)")
    s.add_argument("--rare-fraction", type=_fraction,
                   help="wscnn: circles among objects of positive images, in [0, 1] (default 0.1)")
    s.add_argument("--n-plates", type=_int_at_least(1), help="moa: number of plates (batches; default 2)")
    s.add_argument("--storage-options", help="JSON fsspec options, e.g. an S3 endpoint_url")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("ingest", help="LoadData CSV + TIFF/PNG images -> OME-Zarr plates", parents=[quiet])
    s.add_argument("loaddata", metavar="LOADDATA.csv")
    s.add_argument("out_dir", metavar="OUT_DIR")
    s.add_argument("--platemap", help="CSV/TSV/parquet of per-well annotations (overrides the CSV's)")
    s.add_argument("--ngff", choices=["0.5", "0.4"], default="0.5")
    s.add_argument("--levels", type=_int_at_least(1), default=1, help="pyramid levels to write (1: no pyramid)")
    s.add_argument("--no-ray", action="store_true", help="write in this process instead of Ray tasks")
    s.add_argument("--storage-options", help="JSON fsspec options for an s3:// OUT_DIR")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("info", help="summarise plates: wells, fields, channels, shape, chunks, bytes",
                       parents=[quiet])
    s.add_argument("uris", nargs="+", metavar="URI")
    s.add_argument("--json", action="store_true")
    s.add_argument("--storage-options", help="JSON fsspec options")
    s.set_defaults(func=cmd_info)

    common = argparse.ArgumentParser(add_help=False, parents=[quiet])
    common.add_argument("config", metavar="CONFIG.yaml")
    common.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=2 (repeatable)")
    common.add_argument("--storage-options", metavar="JSON",
                        help="JSON fsspec options merged over the config's storage_options")
    for stage, text in [
        ("train", "weakly supervised training on Ray Train (label, model, train sections)"),
        ("infer", "batch inference to the results store: scores, saliency, profiles"),
        ("profile", "transfer-learning profiles (torchvision backbones) to the profiles store"),
        ("aggregate", "field -> well -> treatment profiles, normalised and feature-selected"),
        ("evaluate", "MOA retrieval (NSC, NSCB, mAP), hits and Z'-factor"),
        ("report", "static HTML report with figures"),
    ]:
        s = sub.add_parser(stage, help=text, parents=[common])
        s.set_defaults(func=cmd_stage)

    s = sub.add_parser("illum", help="per-plate illumination functions and normalisers, stored with the plates",
                       parents=[quiet])
    s.add_argument("config", nargs="+", metavar="CONFIG.yaml | PLATE",
                   help="a config (stream section), or plate URIs/globs")
    s.add_argument("--normalize", choices=["none", "percentile", "meanstd", "control"],
                   help="the normaliser to fit (default: percentile, or the config's stream.normalize)")
    s.add_argument("--storage-options", metavar="JSON",
                   help="JSON fsspec options (with a config: merged over its storage_options)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set stream.level=1 (repeatable)")
    s.set_defaults(func=cmd_illum)

    s = sub.add_parser("config", help="print a config with every default filled in, or the reference of every key",
                       parents=[quiet])
    s.add_argument("config", nargs="?", metavar="CONFIG.yaml")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    s.add_argument("--storage-options", metavar="JSON",
                   help="JSON fsspec options merged over the config's storage_options")
    s.add_argument("--reference", action="store_true", help="every key with its type, default and meaning (Markdown)")
    s.set_defaults(func=cmd_config)

    s = sub.add_parser("run", help="all stages of a config in order, skipping complete ones", parents=[common])
    s.add_argument("--stages", help="comma-separated subset, e.g. train,infer")
    s.add_argument("--force", action="store_true", help="rerun stages even when complete")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("demo", help="the main job on a local embedded Ray, on a small synthetic screen",
                       parents=[quiet])
    s.add_argument("--out", default="demo_out")
    s.set_defaults(func=cmd_demo)
    return p


def job_main(stage: str, argv: list[str] | None = None) -> int:
    """``python jobs/<stage>.py --config C [--set k=v] [--quiet]``: the CLI's parser and code path.

    ``ray job submit ... -- python jobs/train.py --config screen.yaml`` runs exactly what
    ``rayscreen train screen.yaml`` runs.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    script = f"jobs/{os.path.basename(sys.argv[0]) if sys.argv[0].endswith('.py') else stage + '.py'}"
    argv = [part for a in argv for part in (a.split("=", 1) if a.startswith("--config=") else [a])]
    if "--config" not in argv:
        if "-h" in argv or "--help" in argv:  # the stage's own options, as `rayscreen STAGE --help`
            print(f"usage: python {script} --config CONFIG.yaml [options of `rayscreen {stage}`]\n")
            try:
                return main([stage, "--help"])
            except SystemExit as e:  # argparse exits after printing help
                return int(e.code or 0)
        print(f"usage: python {script} --config CONFIG.yaml [--set KEY=VALUE] [--quiet]", file=sys.stderr)
        return 2
    i = argv.index("--config")
    if i + 1 >= len(argv):
        print(f"{script}: --config needs a path", file=sys.stderr)
        return 2
    config = argv[i + 1]
    rest = argv[:i] + argv[i + 2:]
    quiet = ["--quiet"] if "--quiet" in rest else []
    rest = [a for a in rest if a != "--quiet"]
    return main([*quiet, stage, config, *rest])


def _storage_problem(error: BaseException) -> str | None:
    """A user-facing message when ``error`` (or an exception it came from, found as
    :func:`~rayscreen.raylocal.cause_of` finds a worker's error) says that storage could not
    be reached or read: no credentials, an endpoint that does not answer, access denied, a
    path that is not there. ``None`` for anything else, which keeps its traceback (a bug).
    botocore's messages name the endpoint or the operation, never the credentials."""
    from .raylocal import cause_of

    try:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
    except ImportError:  # s3fs not installed: no S3 errors to recognise
        BotoCoreError = ClientError = NoCredentialsError = ()  # noqa: N806
    found = cause_of(error, (NoCredentialsError, BotoCoreError, ClientError, OSError))
    if isinstance(found, NoCredentialsError):
        return ("S3: no credentials found (environment variables AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "an AWS profile or an instance role); for a public bucket pass --storage-options "
                "'{\"anon\": true}'")
    if isinstance(found, (BotoCoreError, ClientError)):
        return f"S3: {found}"
    # a refused or timed-out connection may be Ray's own, not storage's: keep its traceback
    if isinstance(found, OSError) and not isinstance(found, (ConnectionRefusedError, TimeoutError)):
        return f"storage: {found}"
    return None


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll says POLLERR on the write
    end): a BrokenPipeError from a storage connection leaves stdout as it was."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no file descriptor (captured)
        return False


# libraries whose DEBUG/INFO lines can hold credentials or request signatures
QUIET_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3fs", "urllib3", "fsspec", "aiohttp")


def _warning_printer(command: str):
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"rayscreen {command}: warning: {message}", file=file or sys.stderr)
    return show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.verbose:
        logging.getLogger("rayscreen").setLevel(logging.DEBUG)
    # never the storage clients' debug lines, -v or not: botocore's request logs carry the
    # session token and access key id (X-Amz-Security-Token, Credential=), which under
    # `ray job submit` land in the stored job logs; at INFO it says where it found credentials
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():  # restored after the command (callers and tests go on)
            if not args.verbose:  # a one-line message, not the source line of the warn call
                warnings.showwarning = _warning_printer(args.command)
            code = args.func(args)
    except RayscreenError as e:  # messages name URIs, which may carry a password
        print(f"rayscreen {args.command}: error: {mask_url_passwords(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        # the reader of our output went away (`rayscreen info ... | head`): stop quietly, as
        # cat does, instead of reporting a storage error; stdout pointed at /dev/null so that
        # the interpreter's last flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:
        problem = None if args.verbose else _storage_problem(e)
        if problem is None:
            raise
        print(f"rayscreen {args.command}: error: {mask_url_passwords(problem)}", file=sys.stderr)
        # zarr's other reads of the failed request are left pending; when they are collected
        # at exit aiobotocore raises in each ("Exception ignored in coroutine", a page of
        # tracebacks under the message). The run has failed and said why: at exit (not now,
        # for a caller that goes on) let them go quietly.
        atexit.register(setattr, sys, "unraisablehook", lambda unraisable: None)
        return 2
    if not args.quiet:
        logging.getLogger(__name__).debug("%s took %.1f s", args.command, time.perf_counter() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
