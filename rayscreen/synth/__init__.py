"""Deterministic synthetic screens.

- :mod:`rayscreen.synth.wscnn`: the WSCNN paper's simulation (ellipses, a rare
  subpopulation of circles in positive images), per-object ground truth.
- :mod:`rayscreen.synth.moa`: a BBBC021-like MOA screen (DNA/Actin/Tubulin, compounds at
  doses, DMSO controls, plate batch effects, rare responders, QC artefacts), per-field
  ground truth.

Each generator has pure functions that return arrays and tables (``render_*``,
``design_*``) and a writer (``synth_*``) that puts them into OME-Zarr plates through
:mod:`rayscreen.store`. Every field is a pure function of ``(seed, plate, well, field)``:
same seed, same bytes, whatever the write order.
"""

from .moa import (ARTEFACTS, BASELINE, CHANNELS, MOA_DIRECTIONS, MoaScreen, design_moa_screen, load_moa_fields,
                  phenotype, render_moa_field, synth_moa)
from .wscnn import grid_positions, load_wscnn_objects, render_wscnn_image, synth_wscnn, wscnn_layout

__all__ = [
    "render_wscnn_image", "grid_positions", "wscnn_layout", "synth_wscnn", "load_wscnn_objects",
    "render_moa_field", "design_moa_screen", "MoaScreen", "phenotype", "synth_moa", "load_moa_fields",
    "CHANNELS", "ARTEFACTS", "BASELINE", "MOA_DIRECTIONS",
]
