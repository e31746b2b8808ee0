"""Train the learned-profiles network on a *reference* screen of made-up MOAs, for transfer.

    python benchmarks/reference_model.py --out DIR [--seed 1000] [--moas 16] [--plates 3]
        [--epochs N] [--max-cosine 0.5] [--set train.KEY=VALUE]
    python benchmarks/moa.py --preset small --seed S --learned-checkpoint DIR/run/train/model

Pawlowski et al. profile a screen with features of a network trained on other images
(ImageNet). These machines cannot download ImageNet weights, and a network trained on the
screen it profiles (``benchmarks/moa.py --learned``) sees only a few hundred fields. This
script makes the transfer setting's source: a synthetic screen like ``synth_moa``'s (same
cells, stains, plate effects and artefacts) whose compounds follow ``--moas`` random MOA
directions (``random_moa_directions``: random parameters, signs and sizes), none of them
the evaluation screens' MOAs by name; by chance some come close to one (it prints the
closest per real MOA), and ``--max-cosine`` redraws those. It trains ``jobs/configs/learned-profiles.yaml`` on it
(compound labels, through ``rayscreen illum`` + ``rayscreen train``) and prints where the
model artefact is; ``benchmarks/moa.py --learned-checkpoint`` then profiles MOA screens with
it through ``rayscreen infer`` without training on them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings

from moa import PRESETS, learned_config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (plates/ and run/)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="field size and fields per well")
    p.add_argument("--seed", type=int, default=1000, help="screen seed (directions, compounds, plate effects)")
    p.add_argument("--moas", type=int, default=16, help="made-up MOAs of the reference screen")
    p.add_argument("--compounds-per-moa", type=int, default=2)
    p.add_argument("--plates", type=int, default=3, help="plates (= batches) of the reference screen")
    p.add_argument("--epochs", type=int, help="training epochs (default: the config's)")
    p.add_argument("--max-cosine", type=float, default=1.0,
                   help="redraw made-up MOAs whose direction has a cosine above this with a real MOA's "
                        "(MOA_DIRECTIONS; default 1: no constraint, random directions come close by chance)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="override a key of the learned config (YAML value), e.g. --set train.mixup=0.2")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")

    import ray

    from rayscreen.config import parse_overrides
    from rayscreen.pipeline import run_pipeline
    from rayscreen.raylocal import local_init_kwargs
    from rayscreen.synth import synth_moa
    from rayscreen.synth.moa import MOA_DIRECTIONS, direction_cosine, random_moa_directions

    settings = parse_overrides(args.settings)
    if args.epochs:
        settings["train.epochs"] = args.epochs
    preset = PRESETS[args.preset]
    directions = random_moa_directions(args.seed, args.moas, avoid=MOA_DIRECTIONS, max_cosine=args.max_cosine)
    # how close the made-up MOAs came to the real ones the evaluation screens hold
    for moa, real in MOA_DIRECTIONS.items():
        cos, name = max((direction_cosine(real, d), k) for k, d in directions.items())
        print(f"closest made-up MOA to {moa!r}: {name} (cosine {cos:.2f})")
    t0 = time.perf_counter()
    uris = synth_moa(f"{args.out}/plates", n_plates=args.plates, fields_per_well=preset["fields_per_well"],
                     field_shape=preset["field_shape"], seed=args.seed, n_moas=args.moas,
                     compounds_per_moa=args.compounds_per_moa, moa_directions=directions, name_prefix="ref")
    t_synth = time.perf_counter() - t0
    with open(f"{args.out}/directions.json", "w") as f:
        json.dump(directions, f, indent=1)
    config = learned_config(uris, f"{args.out}/run", None, args.seed, settings)
    ray.init(**local_init_kwargs(include_dashboard=False))
    t0 = time.perf_counter()
    result = run_pipeline(config, stages=["illum", "train"], progress=False)
    t_train = time.perf_counter() - t0
    ray.shutdown()
    trained = result["train"]
    epoch = trained.best_epoch or trained.epochs_completed  # None: no validation epoch scored, the last one is exported
    best = trained.metrics[trained.metrics["epoch"] == epoch].iloc[0]
    print(f"reference screen: {len(uris)} plates, {args.moas} made-up MOAs x {args.compounds_per_moa} compounds "
          f"(seed {args.seed}); exported epoch {epoch} of {trained.epochs_completed}: val accuracy "
          f"{best['val_accuracy']:.3f}, balanced {best['val_balanced_accuracy']:.3f}, loss {best['val_loss']:.3f}")
    print(f"model: {os.path.abspath(trained.artefact)}")
    print(f"seconds: synth {t_synth:.1f}, illum+train {t_train:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
