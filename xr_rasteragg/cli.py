"""The ``rasteragg`` command: per-cell tables of SpatialData stores, and a demo.

::

    rasteragg demo [--out DIR]
    rasteragg aggregate STORE.zarr --image I --labels L [--stats mean,var] [--table NAME]
                       [--coordinate-system CS] [--channels A,B] [--overwrite] [--scheduler ADDRESS]
    rasteragg quantify --masks CELL.tif [NUCLEI.tif ...] --image IMAGE.ome.tif
                       [--channel_names markers.csv] --output DIR [--mask_props P ...]
                       [--intensity_props P ...] [--format csv|h5ad|spatialdata] [--overwrite]

Mistakes in the input (a missing store or element, an unknown statistic, a table that exists)
are reported in one line on stderr with exit status 1, before any pixel is read. Anything that
goes wrong later is a failure, reported with its traceback. Whatever goes wrong, the store is left
as it was: the table is written beside the store (with ``--scheduler``, by the cluster's workers)
and moved into place only when complete. ``quantify`` (MCQuant's command, see
:mod:`xr_rasteragg.quantify`) likewise writes its tables under temporary names in the output
folder and renames them into place only when all are complete.

Progress is dask's own: ``dask.diagnostics.ProgressBar`` on the local threads, for the pass and
the table; ``distributed.progress`` on a cluster, for the pass and then the table.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dask
import dask.threaded

from . import __version__
from .stats import STATISTICS
from .validation import InputDataError

__all__ = ["main"]

PROG = "rasteragg"
#: Errors of the file system (a path that is missing, not a directory, not writable): reported in
#: one line, as :class:`UsageError` and :class:`~xr_rasteragg.validation.InputDataError` are.
#: Every other error is a failure, shown with its traceback.
_FILE_ERRORS = (FileNotFoundError, NotADirectoryError, PermissionError)
#: The libraries' known chatter, silenced on stderr (other warnings are shown).
_CHATTER: tuple[tuple[str, type[Warning], str], ...] = (
    (r"zarr v3 autosharding", UserWarning, ""),  # (message, category, module), as regular expressions
    (r"", DeprecationWarning, r"ome_zarr"),
)


#: The adapter's arguments that options set, named as options in its error messages.
_OPTIONS = {
    "image": "--image",
    "labels": "--labels",
    "stats": "--stats",
    "channels": "--channels",
    "coordinate_system": "--coordinate-system",
    "table_name": "--table",
}

#: ``quantify``'s arguments, named as MCQuant's options in its error messages.
_QUANTIFY_OPTIONS = {
    name: f"--{name}"
    for name in ("masks", "image", "channel_names", "output", "mask_props", "intensity_props", "format")
}

#: Packages of the ``spatialdata`` extra, which the command line needs.
_EXTRA = ("spatialdata", "anndata", "zarr", "tifffile", "matplotlib", "distributed")


class UsageError(Exception):
    """A mistake in the command line or its input, found before the pass; printed as one line."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rasteragg`` command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        with _quiet_libraries():
            if args.command == "demo":
                from .demo import MIN_SIZE, run_demo

                if args.size < MIN_SIZE:
                    raise UsageError(
                        f"--size must be at least {MIN_SIZE} pixels for a useful demo; got {args.size}"
                    )
                run_demo(Path(args.out), size=args.size, seed=args.seed)
            elif args.command == "quantify":
                _quantify(args)
            else:
                _aggregate(args)
    except (UsageError, InputDataError, *_FILE_ERRORS) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] not in _EXTRA:
            raise
        package = error.name.split(".")[0]
        print(
            f"{PROG}: error: '{PROG} {args.command}' needs {package!r}, which is not installed; install the "
            "extra: pip install 'xr_rasteragg[spatialdata]'",
            file=sys.stderr,
        )
        return 1
    except BrokenPipeError:  # the reader of our output went away (as `rasteragg demo | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        where = {
            "aggregate": f"; {getattr(args, 'store', '')} is as it was",
            "quantify": f"; nothing was written to {getattr(args, 'output', '')}",
        }.get(args.command, "")
        print(f"{PROG}: failed{where}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Per-cell, per-channel statistics of multiplexed images over segmentations."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="aggregate a synthetic multiplexed tissue image; write a SpatialData store and a figure",
        description="Generate a synthetic multiplexed image and segmentation (no download), compute a "
        "per-cell table, print a summary, and write DIR/demo.zarr and DIR/demo.png.",
    )
    demo.add_argument(
        "--out", default="rasteragg-demo", metavar="DIR", help="output folder (default: %(default)s)"
    )
    demo.add_argument("--size", type=int, default=1024, help="image side in pixels (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")

    per_channel = [name for name, spec in STATISTICS.items() if spec.dims == ("c",)]
    agg = commands.add_parser(
        "aggregate",
        help="write a per-cell table of an image over a labels element into a SpatialData store",
        description="Compute per-cell statistics of image I over labels L and write them as a table "
        "annotating L into STORE. The cell areas go to obs['area'] and the centroids to "
        "obsm['spatial'] in any case. The store is changed only if everything succeeds.",
    )
    agg.add_argument("store", metavar="STORE.zarr", help="SpatialData zarr store")
    agg.add_argument("--image", required=True, metavar="I", help="name of the image element")
    agg.add_argument("--labels", required=True, metavar="L", help="name of the labels element")
    agg.add_argument(
        "--stats",
        default="mean",
        help=f"comma-separated statistics from {','.join(per_channel)}; the first goes to X, the others "
        "to layers; shape features (area, eccentricity, solidity, ...) may follow: scalars go to obs, "
        "vectors to obsm (default: %(default)s)",
    )
    agg.add_argument("--table", metavar="NAME", help="table name (default: <labels>_stats)")
    agg.add_argument("--coordinate-system", default="global", metavar="CS", help="(default: %(default)s)")
    agg.add_argument("--channels", metavar="A,B", help="comma-separated channel names to keep (default: all)")
    agg.add_argument("--overwrite", action="store_true", help="replace a table of the same name")
    agg.add_argument("--scheduler", metavar="ADDRESS", help="address of a dask.distributed scheduler")
    agg.add_argument("--no-progress", action="store_true", help="no progress bar")

    quant = commands.add_parser(
        "quantify",
        help="MCQuant's single-cell tables of an OME-TIFF/zarr image over one or more masks",
        description="A drop-in for MCQuant (MCMICRO): for each mask, write OUTPUT/<image>_<mask>.csv with "
        "CellID, the mean intensity of each marker, <marker>_<prop> for further intensity properties, "
        "then X_centroid, Y_centroid, Area and MCQuant's other mask properties. The image is read "
        "once, block by block, for all masks; nothing is written unless everything succeeds.",
    )
    quant.add_argument(
        "--masks", nargs="+", required=True, metavar="MASK", help="label mask files (TIFF, zarr)"
    )
    quant.add_argument("--image", required=True, help="the image (OME-TIFF, TIFF, OME-Zarr or zarr)")
    quant.add_argument(
        "--channel_names",
        "--channel-names",
        metavar="CSV",
        help="markers file: a 'marker_name' column or one name a line (default: the OME channel names)",
    )
    quant.add_argument("--output", required=True, metavar="DIR", help="output folder (made if missing)")
    quant.add_argument(
        "--mask_props",
        "--mask-props",
        nargs="+",
        default=[],
        metavar="P",
        help="further scikit-image regionprops mask properties",
    )
    quant.add_argument(
        "--intensity_props",
        "--intensity-props",
        nargs="+",
        default=[],
        metavar="P",
        help="further intensity properties per marker: intensity_max, intensity_min, intensity_std, "
        "intensity_sum, or a statistic's name (var, skew, kurtosis, ...)",
    )
    quant.add_argument(
        "--format", choices=("csv", "h5ad", "spatialdata"), default="csv", help="(default: %(default)s)"
    )
    quant.add_argument("--overwrite", action="store_true", help="replace tables that exist")
    quant.add_argument("--scheduler", metavar="ADDRESS", help="address of a dask.distributed scheduler")
    quant.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _quantify(args: argparse.Namespace) -> None:
    from . import quantify as mcquant

    try:
        resolved = mcquant.plan(
            args.masks,
            args.image,
            args.output,
            channel_names=args.channel_names,
            mask_props=args.mask_props,
            intensity_props=args.intensity_props,
            format=args.format,
            overwrite=args.overwrite,
        )
    except (TypeError, ValueError, FileNotFoundError) as error:
        message = str(error)
        for argument, option in _QUANTIFY_OPTIONS.items():  # every argument named, not only the first
            message = message.replace(f"'{argument}' ", f"{option} ")
        raise UsageError(message) from error
    start = time.perf_counter()
    with _scheduler(args.scheduler):
        tables = mcquant.compute(resolved, progress=not args.no_progress)
    written = mcquant.write(resolved, tables)
    seconds = time.perf_counter() - start
    cells = ", ".join(f"{name}: {len(table)} cells" for name, table in tables.items())
    print(
        f"wrote {', '.join(str(path) for path in written)} ({cells}; {resolved.image.sizes['c']} markers) "
        f"in {seconds:.1f} s"
    )


def _aggregate(args: argparse.Namespace) -> None:
    from . import spatialdata as adapter

    stats = [s.strip() for s in args.stats.split(",") if s.strip()]
    channels = None if args.channels is None else [c.strip() for c in args.channels.split(",") if c.strip()]
    table_name = args.table or f"{args.labels}_stats"
    sdata = _read_store(Path(args.store))
    try:
        plan = adapter.plan(
            sdata,
            args.image,
            args.labels,
            stats,
            table_name=table_name,
            coordinate_system=args.coordinate_system,
            channels=channels,
            write=True,
            overwrite=args.overwrite,
        )
    except (TypeError, ValueError) as error:
        raise UsageError(_as_option(str(error))) from error
    start = time.perf_counter()
    progress = not args.no_progress
    with _scheduler(args.scheduler) as client:
        if progress and client is not None:
            print(
                f"computing on the cluster at {args.scheduler} (dashboard: {client.dashboard_link})",
                file=sys.stderr,
            )
        # The pass leaves its partials where it ran; the table is finalized and written from them
        # by whoever runs dask's tasks (the cluster's workers with --scheduler).
        table = adapter.compute_table(plan, progress=progress)
        adapter.store_table(sdata, table_name, table, overwrite=args.overwrite, progress=progress)
    seconds = time.perf_counter() - start
    layers = f"; layers: {', '.join(table.layers)}" if len(table.layers) else ""
    print(
        f"wrote table {table_name!r} to {args.store}: {table.n_obs} cells x {table.n_vars} channels "
        f"(X: {plan.stats[0]}{layers}; obs['area'], obsm['spatial'] in {args.coordinate_system!r}"
        f"{''.join(f', {name}' for name in plan.shape)}) "
        f"in {seconds:.1f} s"
    )


def _as_option(message: str) -> str:
    """The adapter's message with the argument it starts with named as its option."""
    for argument, option in _OPTIONS.items():
        if message.startswith(f"'{argument}' "):
            return option + message[len(argument) + 2 :]
    return message


def _read_store(path: Path) -> Any:
    import spatialdata

    if not path.exists():
        raise UsageError(f"STORE {str(path)!r} does not exist")
    if not path.is_dir() or not any((path / name).is_file() for name in ("zarr.json", ".zgroup")):
        raise UsageError(f"STORE {str(path)!r} is not a zarr store (no zarr.json or .zgroup in it)")
    try:
        sdata = spatialdata.read_zarr(path)
    except Exception as error:
        raise UsageError(f"STORE {str(path)!r} could not be read as SpatialData: {error}") from error
    if not any(len(getattr(sdata, kind)) for kind in ("images", "labels", "points", "shapes", "tables")):
        raise UsageError(
            f"STORE {str(path)!r} is a zarr store but holds no SpatialData elements (no images, labels, "
            "points, shapes or tables group with elements in it)"
        )
    return sdata


@contextlib.contextmanager
def _scheduler(address: str | None) -> Iterator[Any]:
    """Run dask on the distributed scheduler at ``address`` and yield its client (None: the
    local threads, unless dask's configuration names a scheduler)."""
    if address is None:
        if dask.config.get("scheduler", None) is not None:
            yield None
            return
        # Named as a function, so that dask does not import distributed (0.3-0.5 s) to look for
        # a client that this process cannot have.
        with dask.config.set(scheduler=dask.threaded.get):
            yield None
        return
    from distributed import Client

    try:
        client = Client(address, timeout="10s")
    except (OSError, TimeoutError) as error:
        raise UsageError(f"could not connect to the scheduler at {address!r}: {error}") from error
    with client:
        yield client


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence the libraries' known chatter on stderr: zarr's format notice, ome-zarr's log, deprecations."""
    names = ("ome_zarr", "spatialdata", "distributed")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for message, category, module in _CHATTER:
                warnings.filterwarnings("ignore", message, category, module)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
