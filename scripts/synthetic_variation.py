"""How much synthetic cases still differ after a per-case z-score, with and without the non-linear knobs.

    python scripts/synthetic_variation.py            # default synthetic data (configs/data/synthetic.yaml)
    python scripts/synthetic_variation.py --quick    # the quick sweep's smaller volumes

A per-case z-score (data.intensity=zscore) removes gain and offset exactly. What it leaves is what BatchNorm's
running statistics still have to average over: after z-scoring, where does each case put its background and
its objects, and how far apart? The script prints, over the cases, the mean and the standard deviation of
those levels (in units of the case's own standard deviation), for three generators: linear only (gain and
offset), the defaults (plus contrast, gamma, bias-field strength and noise level per case), and each
non-linear knob alone. No training: seconds.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from norm_experiments.data.synthetic import SynthConfig, make_case

LINEAR_ONLY = {"contrast_range": (1.0, 1.0), "gamma_range": (1.0, 1.0), "noise_std": 0.25, "bias_field": 0.15}


def zscored_levels(cfg: SynthConfig) -> np.ndarray:
    """Per case: z-scored mean of background, class 1, class 2, and the class-1 minus class-2 distance."""
    rows = []
    for index in range(cfg.num_cases):
        image, label, _ = make_case(cfg, index)
        z = (image - image.mean()) / image.std()
        levels = [z[label == c].mean() for c in range(3)]
        rows.append([*levels, levels[1] - levels[2]])
    return np.array(rows)


def describe(name: str, cfg: SynthConfig) -> str:
    levels = zscored_levels(cfg)
    cells = [f"{m:+.2f} ± {s:.2f}" for m, s in zip(levels.mean(0), levels.std(0, ddof=1), strict=True)]
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick sweep's 24^3 volumes")
    parser.add_argument("--cases", type=int, default=40, help="cases to generate (default 40)")
    args = parser.parse_args()
    size = {"shape": (24, 24, 24), "radius_range": (3.0, 6.0)} if args.quick else {}
    base = SynthConfig(num_cases=args.cases, **size)
    variants = {
        "linear only (gain, offset)": dataclasses.replace(base, **LINEAR_ONLY),
        "defaults (all knobs)": base,
    }
    for knob in ("contrast_range", "gamma_range", "noise_std", "bias_field"):
        others = {k: v for k, v in LINEAR_ONLY.items() if k != knob}
        variants[f"linear + {knob} only"] = dataclasses.replace(base, **others)
    print(
        f"{args.cases} cases of {base.shape}; mean ± sd over cases of z-scored levels (case-own sd units)\n"
    )
    print("| generator | background | class 1 | class 2 | class 1 − class 2 |")
    print("|:---|---:|---:|---:|---:|")
    for name, cfg in variants.items():
        print(describe(name, cfg))


if __name__ == "__main__":
    main()
