"""``rayscreen demo``: the main job on a local embedded Ray, on a small synthetic screen.

Today: synthesise a small MOA screen, export it as TIFF files + a LoadData CSV (the
input users bring), ingest that on Ray into OME-Zarr plates, and summarise them.
Later stages (illumination, training, inference, profiling, evaluation, report) join
the same job as they land.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from .ingest import ingest
from .ingest.export import export_loaddata
from .store.info import format_info, plate_info

log = logging.getLogger(__name__)


def run_demo(out: str = "demo_out", *, quiet: bool = False, seed: int = 0) -> dict:
    from .synth import synth_moa

    start = time.perf_counter()
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    step = _stepper(quiet)
    step("synth: a small MOA screen")
    synth_uris = synth_moa(os.path.join(out, "synth"), seed=seed)
    step("export: TIFF files + LoadData CSV")
    csv = export_loaddata(synth_uris, os.path.join(out, "raw"))
    step(f"ingest: {csv} -> OME-Zarr plates on a local Ray")
    import ray

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING, configure_logging=False, include_dashboard=False)
    plates = ingest(csv, os.path.join(out, "plates"), progress=not quiet)
    infos = [plate_info(uri) for uri in plates]
    for info in infos:
        print(format_info(info))
    summary = {"plates": plates, "fields": sum(i["fields"] for i in infos),
               "seconds": round(time.perf_counter() - start, 1)}
    print(f"demo: {len(plates)} plates, {summary['fields']} fields ingested in {summary['seconds']} s; "
          f"outputs under {os.path.abspath(out)}")
    return summary


def _stepper(quiet: bool):
    def step(message: str) -> None:
        if not quiet:
            print(f"[rayscreen demo] {message}", flush=True)

    return step
