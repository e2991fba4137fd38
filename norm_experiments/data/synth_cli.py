"""`norm-exp-synth OUT_DIR [options]` (also `python -m norm_experiments.data.synth_cli`): write the synthetic
dataset (data/synthetic.py) into a folder as NIfTI, to look at or to train on with data=msd/nnunet/folder."""

from __future__ import annotations

import argparse

from norm_experiments.data.generated import LAYOUTS, generate_dataset, out_dir_argument
from norm_experiments.data.synthetic import SynthConfig
from norm_experiments.errors import OneLineParser, exit_on_user_error


def _parser() -> argparse.ArgumentParser:
    d = SynthConfig()
    p = OneLineParser(
        prog="norm-exp-synth",
        description="Write a synthetic 3D segmentation dataset (NIfTI) with per-case intensity gain/offset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,  # every option shows its default
    )
    p.add_argument("out_dir", type=out_dir_argument, help="folder to create (must not exist or be empty)")
    p.add_argument("--layout", choices=LAYOUTS, default="msd", help="dataset layout")
    p.add_argument("--cases", type=int, default=d.num_cases, help="number of cases")
    p.add_argument(
        "--shape", type=int, nargs=3, default=d.shape, metavar=("D", "H", "W"), help="voxels per case"
    )
    p.add_argument("--spacing", type=float, nargs=3, default=d.spacing, metavar=("SX", "SY", "SZ"), help="mm")
    p.add_argument("--classes", type=int, default=d.num_classes, help="foreground classes")
    p.add_argument(
        "--objects-per-class",
        type=int,
        nargs=2,
        default=d.objects_per_class,
        metavar=("MIN", "MAX"),
        help="ellipsoids per class and case",
    )
    ranges = {  # option: (default, help); each takes LO HI
        "--radius-range": (d.radius_range, "ellipsoid radii, voxels"),
        "--scale-range": (d.intensity_scale_range, "per-case scanner gain (log-uniform)"),
        "--offset-range": (d.intensity_offset_range, "per-case intensity offset (uniform)"),
        "--contrast-range": (
            d.contrast_range,
            "per-case tissue contrast multiplier (log-uniform; 1 1 = off)",
        ),
        "--gamma-range": (d.gamma_range, "per-case gamma of the intensity curve (log-uniform; 1 1 = off)"),
    }
    for option, (default, text) in ranges.items():
        p.add_argument(option, type=float, nargs=2, default=default, metavar=("LO", "HI"), help=text)
    p.add_argument(
        "--class-imbalance", type=float, default=d.class_imbalance, help=">1: higher classes smaller"
    )
    p.add_argument(
        "--noise",
        type=float,
        nargs="+",
        default=d.noise_std,
        metavar="STD",
        help="noise std relative to object contrast: one value, or LO HI drawn per case",
    )
    p.add_argument(
        "--bias-field",
        type=float,
        nargs="+",
        default=d.bias_field,
        metavar="STRENGTH",
        help="bias field strength: one value, or LO HI drawn per case (0 = off)",
    )
    p.add_argument(
        "--seed", type=int, default=d.seed, help="the dataset's seed: the same seed, the same files"
    )
    p.add_argument(
        "--air-margin",
        type=float,
        default=d.air_margin,
        help="share of each axis, at each end, that is air around the body (0 = none)",
    )
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """norm-exp-synth OUT_DIR [options]: write a synthetic dataset and say what was written."""
    a = _parser().parse_args(argv)
    cfg = SynthConfig(
        num_cases=a.cases,
        shape=a.shape,
        spacing=a.spacing,
        num_classes=a.classes,
        objects_per_class=a.objects_per_class,
        radius_range=a.radius_range,
        class_imbalance=a.class_imbalance,
        noise_std=a.noise[0] if len(a.noise) == 1 else a.noise,
        intensity_scale_range=a.scale_range,
        intensity_offset_range=a.offset_range,
        contrast_range=a.contrast_range,
        gamma_range=a.gamma_range,
        bias_field=a.bias_field[0] if len(a.bias_field) == 1 else a.bias_field,
        seed=a.seed,
        air_margin=a.air_margin,
    )
    out = generate_dataset(a.out_dir, cfg, a.layout)
    shape = "x".join(map(str, cfg.shape))
    cases = f"{cfg.num_cases} case{'s' if cfg.num_cases != 1 else ''}"
    classes = f"{cfg.num_classes} foreground class{'es' if cfg.num_classes != 1 else ''}"
    print(f"wrote {cases} ({a.layout} layout, {shape} voxels, {classes}) to {out}")


if __name__ == "__main__":
    main()
