"""``rasteragg quantify`` against MCQuant's method, on an OME-TIFF with a cell and a nucleus mask.

The data: :func:`xr_rasteragg.synthetic.make_cells` (the reference dataset of DESIGN §6: 4096² px,
8 channels uint16, ~18.8k cells) written by tifffile as a tiled OME-TIFF (512 px tiles, channel
names in the OME metadata), the cell mask, and a nucleus mask (each cell eroded by 4 px) as TIFFs.

Two methods, each in a fresh process, each writing its CSV tables:

``ours``
    The command line's entry, in-process: ``main(["quantify", "--masks", ..., "--image", ...])``:
    the image read lazily by tiles, once for both masks.
``mcquant``
    MCQuant's ``ExtractSingleCells`` as its code does it: the masks read whole, each channel read
    whole (``tifffile.imread(key=c)``), ``regionprops_table`` per channel per mask for the mean
    intensity, one more per mask for its mask properties, the columns renamed and ordered.

Time is one wall-clock run (the libraries imported beforehand, the numba cache warm); peak memory
is the growth of the process's resident set during the run (``VmHWM``, see
:mod:`benchmarks.measure`), over the process before the run (the masks and the image are on disk,
not in memory, before either method starts).

Run ``python benchmarks/quantify.py`` (4096² px, 8 channels); ``--quick`` is a small smoke run.
The suite's ``quantify`` section (``python benchmarks/suite.py --only quantify``) runs the same
functions in rounds and puts the figures on the benchmarks page.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import peak_rss

METHODS = ("ours", "mcquant")
#: The dataset of the full run and of ``--quick``: image side in px and channels.
FULL: dict[str, int] = {"size": 4096, "channels": 8}
QUICK: dict[str, int] = {"size": 512, "channels": 3}
#: Where the files are made, once per size.
CACHE = Path(tempfile.gettempdir()) / "rasteragg-bench-quantify"
#: MCQuant's default mask properties (its ``MaskIDs``).
MCQUANT_MASK_PROPS = (
    "label",
    "centroid",
    "area",
    "major_axis_length",
    "minor_axis_length",
    "eccentricity",
    "solidity",
    "extent",
    "orientation",
)


def make_files(folder: Path, size: int, channels: int) -> dict[str, Path]:
    """The OME-TIFF, the two masks and a markers file in ``folder`` (made once)."""
    import scipy.ndimage as ndi
    import tifffile

    from xr_rasteragg.synthetic import make_cells

    paths = {
        "image": folder / "exemplar.ome.tif",
        "cell": folder / "cellMask.tif",
        "nucleus": folder / "nucleiMask.tif",
        "markers": folder / "markers.csv",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    cells, image = make_cells((size, size), n_channels=channels, seed=0)
    # The nucleus: the cell without the pixels within 4 px of another label (or the background).
    edge = ndi.grey_dilation(cells, size=9) != ndi.grey_erosion(cells, size=9)
    nuclei = np.where(edge, 0, cells).astype(np.int32)
    markers = [f"marker{c}" for c in range(channels)]
    tifffile.imwrite(
        paths["image"], image, tile=(512, 512), metadata={"axes": "CYX", "Channel": {"Name": markers}}
    )
    tifffile.imwrite(paths["cell"], cells, tile=(512, 512))
    tifffile.imwrite(paths["nucleus"], nuclei, tile=(512, 512))
    paths["markers"].write_text("marker_name\n" + "\n".join(markers) + "\n")
    return paths


def dataset(size: int, channels: int, cache: Path = CACHE) -> dict[str, Path]:
    """The files of ``size``² px and ``channels`` channels in ``cache`` (made on the first call)."""
    return make_files(cache / f"{size}_{channels}", size, channels)


def run_ours(paths: dict[str, Path], output: Path) -> None:
    from xr_rasteragg.cli import main

    masks = [str(paths["cell"]), str(paths["nucleus"])]
    code = main(
        ["quantify", "--masks", *masks, "--image", str(paths["image"]),
         "--channel_names", str(paths["markers"]), "--output", str(output), "--no-progress", "--overwrite"]
    )  # fmt: skip
    if code:
        raise SystemExit(f"rasteragg quantify failed with status {code}")


def run_mcquant(paths: dict[str, Path], output: Path) -> None:
    """MCQuant's ``ExtractSingleCells`` with ``intensity_props=["intensity_mean"]``, as in its code."""
    import pandas as pd
    import skimage.measure
    import tifffile

    markers = list(pd.read_csv(paths["markers"]).marker_name)
    masks = {p.name.split(".")[0]: tifffile.imread(p) for p in (paths["cell"], paths["nucleus"])}
    per_channel: dict[str, list[dict[str, Any]]] = {name: [] for name in masks}
    for z in range(len(markers)):
        channel = tifffile.imread(paths["image"], key=z)
        for name, mask in masks.items():
            per_channel[name].append(
                skimage.measure.regionprops_table(mask, channel, properties=("intensity_mean",))
            )
    renames = {"CellID": "label", "X_centroid": "centroid-1", "Y_centroid": "centroid-0", "Area": "area",
               "MajorAxisLength": "major_axis_length", "MinorAxisLength": "minor_axis_length",
               "Eccentricity": "eccentricity", "Solidity": "solidity", "Extent": "extent",
               "Orientation": "orientation"}  # fmt: skip
    for name, mask in masks.items():
        table: dict[str, Any] = dict(
            zip(markers, [t["intensity_mean"] for t in per_channel[name]], strict=True)
        )
        ids = skimage.measure.regionprops_table(mask, properties=MCQUANT_MASK_PROPS)
        table.update({new: ids[old] for new, old in renames.items()})
        table = {"CellID": table.pop("CellID"), **table}
        pd.DataFrame(table).to_csv(output / f"exemplar_{name}.csv", index=False)


def measure_one(method: str, paths: dict[str, Path]) -> dict[str, Any]:
    """Time and peak memory of one method, in this process, its libraries imported beforehand."""
    if method == "ours":
        import xr_rasteragg.cli
        import xr_rasteragg.quantify  # noqa: F401
    else:
        import pandas  # noqa: F401
        import skimage.measure  # noqa: F401
        import tifffile  # noqa: F401
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp)
        if method == "ours":
            seconds, peak, _ = peak_rss(lambda: run_ours(paths, output))
        else:
            seconds, peak, _ = peak_rss(lambda: run_mcquant(paths, output))
        rows = {p.name: sum(1 for _ in p.open()) - 1 for p in sorted(output.glob("*.csv"))}
    return {"method": method, "seconds": seconds, "peak_mib": peak, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size", type=int, default=FULL["size"], help="image side in px (default: %(default)s)"
    )
    parser.add_argument("--channels", type=int, default=FULL["channels"], help="(default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a 512² px, 3-channel smoke run")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # one method, in this process
    args = parser.parse_args()
    size, channels = (QUICK["size"], QUICK["channels"]) if args.quick else (args.size, args.channels)
    paths = dataset(size, channels, args.cache)
    if args.method:
        print("RESULT " + json.dumps(measure_one(args.method, paths)))
        return
    results = {}
    for method in METHODS:
        command = [sys.executable, __file__, "--size", str(size), "--channels", str(channels),
                   "--cache", str(args.cache), "--method", method]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            raise SystemExit(f"{method} failed:\n{done.stderr}")
        results[method] = json.loads(lines[-1][len("RESULT ") :])
    ours = results["ours"]
    rows = ", ".join(f"{name}: {count} rows" for name, count in ours["rows"].items())
    print(f"{size}² px, {channels} channels, 2 masks ({rows})")
    for method, result in results.items():
        ratio = result["seconds"] / ours["seconds"]
        memory = result["peak_mib"] / ours["peak_mib"] if ours["peak_mib"] else float("nan")
        print(
            f"  {method:22s} {result['seconds']:8.2f} s  peak +{result['peak_mib']:7.0f} MiB"
            + ("" if method == "ours" else f"   time {ratio:5.1f}x ours, peak memory {memory:5.2f}x ours")
        )


if __name__ == "__main__":
    main()
