"""How far an honest calibration set drifts from the eval set, against how far the usual preprocessing mistakes do.

The calibration validator's drift check compares, per channel, the calibration set's mean and
mean per-sample std with the eval set's, within ``calibration.distribution_tolerance`` x the
eval set's pooled std. This benchmark measures that statistic (the largest |offset| / pooled
std over channels and both statistics) on real photographs:

* photos: scikit-learn's two sample images and scikit-image's natural RGB photos
  (``pip install -e .[bench]``), all shipped inside the wheels;
* honest pairs: every split of the photos into an eval half and a calibration half; each set is
  random crops (40-100% of the short side) of its own photos, resized to the model input, scaled
  by 1/255, ImageNet mean/std, NCHW: the same preprocessing on different photos. The baseline
  is the same photos with fresh crops;
* mistaken pairs: the same eval sets against calibration sets of the other photos read with one
  mistake each (mean/std in 0-255 units with scale 1/255, no scale, NHWC for an NCHW model, gray
  for RGB, BGR, a wrong or missing mean/std, an HWC buffer reshaped to CHW).

Every preprocessing goes through the loader's own ``trtforge.calibration.preprocess_image`` and
every statistic through the validator's ``sample_statistics``, ``reference_of`` and
``drift_offsets``. It prints, per case, the smallest and largest statistic over the splits, the
smallest as a ratio of the honest largest (the baseline of the run), the same for the spread
factor (a channel's mean per-sample std over the eval set's, either way), and how many pairs the
tolerance (default: the spec's) and the validator's 16x spread check refuse.

    python benchmarks/drift_tolerance.py [--size 96] [--crops 48] [--tolerance T] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from trtforge.calibration import preprocess_image
from trtforge.spec import CalibrationSpec, InputSpec, Preprocessing
from trtforge.stages.validate_calibration import SPREAD_FACTOR, channel_axis, drift_offsets, reference_of, sample_statistics

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
SEED = 20261201


def photos() -> dict[str, Image.Image]:
    """The natural RGB photographs the two wheels ship (no download)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    shipped = load_sample_images()
    found = {name.rsplit("/", 1)[-1].removesuffix(".jpg"): image for name, image in zip(shipped.filenames, shipped.images)}
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        found[name] = getattr(data, name)()
    return {name: Image.fromarray(pixels) for name, pixels in sorted(found.items())}


def crops(photo: Image.Image, count: int, rng: np.random.Generator) -> list[Image.Image]:
    short = min(photo.size)
    boxes = []
    for _ in range(count):
        side = int(short * rng.uniform(0.4, 1.0))
        left, top = int(rng.integers(0, photo.width - side + 1)), int(rng.integers(0, photo.height - side + 1))
        boxes.append(photo.crop((left, top, left + side, top + side)))
    return boxes


@dataclass(frozen=True)
class Mistake:
    name: str
    # None: the honest preprocessing; the array step runs after preprocess_image on the stacked set.
    preprocessing: Preprocessing | None
    after: Callable[[np.ndarray], np.ndarray] | None = None


def mistakes(size: int) -> list[Mistake]:
    honest = dict(resize=(size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return [
        Mistake(
            "mean/std in 0-255 units, scale 1/255",
            Preprocessing(**{**honest, "mean": [m * 255 for m in IMAGENET_MEAN], "std": [s * 255 for s in IMAGENET_STD]}),
        ),
        Mistake("scale missing (1.0)", Preprocessing(**honest, scale=1.0)),
        Mistake("NHWC for an NCHW model", Preprocessing(**honest, layout="NHWC")),
        Mistake("HWC buffer reshaped to CHW", Preprocessing(**honest, layout="NHWC"), lambda a: a.reshape(len(a), 3, size, size)),
        Mistake("gray (1 channel) for RGB", Preprocessing(**{**honest, "mean": [0.449], "std": [0.226]}, color="gray")),
        Mistake(
            "gray copied to 3 channels",
            Preprocessing(**{**honest, "mean": [0.449], "std": [0.226]}, color="gray"),
            lambda a: np.repeat(a, 3, axis=1),
        ),
        Mistake("BGR for RGB", None, lambda a: a[:, ::-1].copy()),
        Mistake("mean/std 0.5 instead of ImageNet's", Preprocessing(**{**honest, "mean": [0.5] * 3, "std": [0.5] * 3})),
        Mistake("no mean/std (0-1 pixels)", Preprocessing(resize=(size, size))),
    ]


def preprocessed(images: list[Image.Image], preprocessing: Preprocessing) -> np.ndarray:
    return np.stack([preprocess_image(image, preprocessing) for image in images]).astype(np.float32)


def statistics_of(model: InputSpec, array: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample statistics as the validator takes them from a ready-made .npz for this model (channels where the spec has them)."""
    return sample_statistics(array, channel_axis(model, CalibrationSpec(data="calibration.npz"), array.ndim))


def joined(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-sample statistics of sets put together: the statistics are per sample, so they concatenate."""
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def drift(eval_stats: dict[str, np.ndarray], calibration_stats: dict[str, np.ndarray]) -> tuple[float, float]:
    """The validator's two statistics: the largest |offset| / pooled std over channels and (mean, std), and the
    largest factor by which a channel's mean per-sample std differs from the eval set's (either way)."""
    offsets = drift_offsets(calibration_stats, reference_of(eval_stats))
    spreads = [d.observed / d.target for d in offsets if d.statistic == "std"]
    return max(d.offset for d in offsets), max(max(r, 1 / r) if r > 0 else np.inf for r in spreads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=96, help="model input height and width")
    parser.add_argument("--crops", type=int, default=48, help="crops per photo and set")
    default = CalibrationSpec.model_fields["distribution_tolerance"].default
    parser.add_argument(
        "--tolerance", type=float, default=default, help=f"the tolerance to report against (default: the spec's, {default:g})"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    rng = np.random.default_rng(SEED)
    model = InputSpec(name="images", shape=["batch", 3, args.size, args.size], dynamic={"batch": {"min": 1, "opt": 8, "max": 256}})
    honest = Preprocessing(resize=(args.size, args.size), mean=IMAGENET_MEAN, std=IMAGENET_STD)

    pool = photos()
    names = sorted(pool)
    eval_crops = {name: crops(pool[name], args.crops, rng) for name in names}
    calibration_crops = {name: crops(pool[name], args.crops, rng) for name in names}
    eval_stats = {name: statistics_of(model, preprocessed(eval_crops[name], honest)) for name in names}
    cases = [Mistake("honest: other photos", None), *mistakes(args.size)]
    calibration_stats = {}
    for case in cases:
        arrays = {name: preprocessed(calibration_crops[name], case.preprocessing or honest) for name in names}
        calibration_stats[case.name] = {n: statistics_of(model, case.after(a) if case.after else a) for n, a in arrays.items()}

    half = len(names) // 2
    splits = [(list(e), [n for n in names if n not in e]) for e in itertools.combinations(names, half)]
    figures: dict[str, list[tuple[float, float]]] = {"baseline: same photos, fresh crops": []}
    for eval_names, calibration_names in splits:
        eval_set = joined([eval_stats[n] for n in eval_names])
        same = joined([calibration_stats["honest: other photos"][n] for n in eval_names])
        figures["baseline: same photos, fresh crops"].append(drift(eval_set, same))
        for case in cases:
            other = joined([calibration_stats[case.name][n] for n in calibration_names])
            figures.setdefault(case.name, []).append(drift(eval_set, other))

    honest_largest = max(offset for offset, _ in figures["honest: other photos"])
    rows = []
    for case, values in figures.items():
        offsets = [offset for offset, _ in values]
        spreads = [spread for _, spread in values]
        rows.append(
            {
                "case": case,
                "smallest": min(offsets),
                "largest": max(offsets),
                "smallest_over_honest_largest": min(offsets) / honest_largest,
                "spread_factor_smallest": min(spreads),
                "spread_factor_largest": max(spreads),
                "refused_by_tolerance": sum(v > args.tolerance for v in offsets),
                "refused_by_spread": sum(v > SPREAD_FACTOR for v in spreads),
                "pairs": len(values),
            }
        )
    elapsed = time.perf_counter() - started
    if args.json:
        print(
            json.dumps(
                {"photos": names, "size": args.size, "crops": args.crops, "tolerance": args.tolerance, "seconds": elapsed, "cases": rows},
                indent=2,
            )
        )
        return
    print(
        f"photos: {', '.join(names)}; {len(splits)} eval/calibration splits of {half} photos each, {args.crops} crops per photo, {args.size}x{args.size}"
    )
    print(
        f"offset: largest |offset| / eval pooled std over 3 channels x (mean, mean per-sample std), refused above the tolerance "
        f"{args.tolerance:g}; spread: largest factor between a channel's mean per-sample std and the eval set's, refused above {SPREAD_FACTOR:g}"
    )
    print(
        f"{'case':40s} {'offset min':>10s} {'max':>8s} {'min/honest max':>14s} {'refused':>8s} {'spread min':>11s} {'max':>8s} {'refused':>8s}"
    )
    for row in rows:
        pairs = row["pairs"]
        print(
            f"{row['case']:40s} {row['smallest']:10.3f} {row['largest']:8.3f} {row['smallest_over_honest_largest']:14.2f} "
            f"{row['refused_by_tolerance']:>4d}/{pairs:<3d} {row['spread_factor_smallest']:11.2f} {row['spread_factor_largest']:8.2f} "
            f"{row['refused_by_spread']:>4d}/{pairs:<3d}"
        )
    print(f"{elapsed:.1f} s")


if __name__ == "__main__":
    main()
