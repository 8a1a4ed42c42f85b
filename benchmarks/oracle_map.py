"""How much can a report's map add at most? Plain nnU-Net given the *true* lesion map as a second channel. Not a test.

    python benchmarks/oracle_map.py --work OUT/seed_S/work [--work ...] [--maps fine coarse]
        [--trainer nnUNetTrainer_demo] [--conditions clean lowdose motion] [--out benchmarks/results/oracle_map.json]
    python benchmarks/oracle_map.py --combine run1.json run2.json ...   (one table from earlier runs)

BiCLIP's generator is trained to draw, from the report, the lesion mask blurred at zone scale, and the U-Net reads
that map as an extra input channel. A perfect report pathway would draw exactly that map for every case, training
and test. This script measures what such a map is worth: for each few-labels benchmark run folder (``--work``: a
``low_label.py`` seed's ``work`` folder, whose dataset, label subset in ``splits_final.json`` and degraded test
images it reuses), it writes a copy of the dataset whose images carry a second channel computed from the true mask
(``zones``: the lung zones the case's report names, re-drawn from the demo generator's random stream — exactly
what a report says about where, the most a perfect reader of it could know; ``zonesBlurred``: those zones blurred
with σ = side/16, the soft map a perfect probabilistic reader would draw; ``zonesBoxes``: the named zones as bands
of the case's lung bounding boxes, blurred alike (the lungs' position and size without their outline: a box-shaped
stand-in for a text map moved and scaled onto the patient's lungs);
``zonesTextOnly``: the named zones drawn on the dataset's *average* lung and blurred alike, what a perfect reader of
the report that ignores the image could draw; ``fine``: the mask blurred with σ = side/16, BiCLIP's generation
target, which knows the outline too; ``coarse``: σ = side/8) and trains and evaluates plain nnU-Net on it with nnU-Net's own commands (``nnUNetv2_preprocess`` with the
run's plans, ``nnUNetv2_train``, ``nnUNetv2_predict``, ``nnUNetv2_evaluate_folder``). Test images get the map of their
own true mask (or zones); on clean images also another case's map (``shuffled``) and an empty one (``none``), which show how
much the model relies on the channel. The difference to plain nnU-Net of the same run (its predictions in the run
folder) bounds what any pathway that hands the U-Net such a map can add on that data; a real report, which names
zones and not outlines, carries less than ``fine``; ``zones`` is its content.

Writes only under each ``--work`` folder, never over a dataset it did not write (datasets ``<id + 100>``, ``+ 101``, ``+ 102``, ``+ 103``, ``+ 104``, ``+ 105`` for fine, coarse, zones, zonesBlurred, zonesTextOnly, zonesBoxes) and ``--out``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nnunetv2_textseg.errors import TextSegError, run_cli  # noqa: E402  (after the path line above)

MAP_BLUR = {"fine": 1 / 16, "coarse": 1 / 8}  # σ as a fraction of the image side
MAP_KINDS = (*MAP_BLUR, "zones", "zonesBlurred", "zonesTextOnly", "zonesBoxes")  # dataset id offsets 100 ... 105
ZONE_MAPS = {"zones": "named zones", "zonesBlurred": "named zones, blurred",
             "zonesTextOnly": "named zones on the average lung, blurred",
             "zonesBoxes": "named zones as bands of the lung bounding boxes, blurred"}
CONFIGURATION, PLANS, FOLD = "2d", "nnUNetPlans", 0


class OracleInputError(TextSegError):
    """A run folder lacks what the oracle reads; the message names the file and the fix."""


def oracle_map(mask: np.ndarray, blur: float) -> np.ndarray:
    """Binary lesion mask (H, W) -> uint8 map (H, W): blurred with σ = blur · side, peak scaled to 255 (0 for an
    empty mask)."""
    from scipy import ndimage
    m = ndimage.gaussian_filter(mask.astype(np.float32), sigma=blur * max(mask.shape))
    peak = float(m.max())
    return np.zeros(mask.shape, np.uint8) if peak <= 0 else np.round(255 * m / peak).astype(np.uint8)


def map_function(kind: str, raw: Path, meta: dict):
    """(case id, its label file) -> the case's uint8 map of this kind."""
    if kind in MAP_BLUR:
        return lambda case, label: oracle_map(_read(label), MAP_BLUR[kind])
    from nnunetv2_textseg.demo_data import default_reports_dir, load_real_reports, named_zones
    demo = meta.get("textseg_demo")
    if demo is None or demo.get("control"):
        raise OracleInputError(f"oracle_map: the 'zones' map re-draws the demo generator's cases; {raw / 'dataset.json'} "
                               f"is not a (non-control) demo dataset. Use --maps fine coarse.")
    pool = []
    if demo.get("real_reports"):
        folder = default_reports_dir()
        if folder is None:
            raise OracleInputError("oracle_map: the dataset was generated from the real report tables, which are not "
                                   "found now; set NNUNET_TEXTSEG_SHARED_REPORTS to their folder.")
        pool = load_real_reports(folder)

    from nnunetv2_textseg.demo_data import case_finding_and_lungs
    from nnunetv2_textseg.report_parsing import LEVELS
    seed, size = demo["seed"], demo["image_size"]

    def redrawn(case: str, label: Path):
        """The case's finding and lungs, re-drawn from the generator, after checking that it is the case on disk."""
        finding, lungs = case_finding_and_lungs(seed, int(case.rsplit("_", 1)[1]) - 1, size, pool)
        z = named_zones(seed, int(case.rsplit("_", 1)[1]) - 1, size, pool)
        if (_read(label).astype(bool) & ~z).any():
            raise OracleInputError(f"oracle_map: {label} has lesion pixels outside the zones its re-drawn report "
                                   f"names; the dataset was not generated with this report pool or generator.")
        return finding, lungs, z

    if kind == "zonesTextOnly":
        # the named zones on the average lung: for each zone the share of the dataset's training cases whose lungs
        # put a pixel in it (zones are disjoint, so the named zones' shares add up)
        n_train = int(meta["numTraining"])
        share: dict[tuple[str, str], np.ndarray] = {}
        for index in range(n_train):
            _, lungs = case_finding_and_lungs(seed, index, size, pool)
            for zone in ((side, level) for side in ("left", "right") for level in LEVELS):
                share[zone] = share.get(zone, 0) + lungs.zone_mask(zone[0], (zone[1],)) / n_train

        def text_only(case: str, label: Path) -> np.ndarray:
            finding, _, _ = redrawn(case, label)
            union = sum((share[zone] for zone in finding.zones), np.zeros((size, size)))
            return oracle_map(np.clip(union, 0, 1), MAP_BLUR["fine"])
        return text_only

    def zones(case: str, label: Path) -> np.ndarray:
        finding, lungs, z = redrawn(case, label)
        if kind == "zonesBoxes":
            # each named zone's rows, across its lung's whole width: position and size of the lung, not its outline
            z = np.zeros_like(z)
            for side, level in finding.zones:
                rows = np.flatnonzero(lungs.zone_mask(side, (level,)).any(axis=1))
                cols = np.flatnonzero(lungs.masks[side].any(axis=0))
                z[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
        # blurred at zone scale: what a perfect *probabilistic* reader of the report would draw (soft edges)
        return z.astype(np.uint8) * 255 if kind == "zones" else oracle_map(z, MAP_BLUR["fine"])
    return zones


def _read(path: Path) -> np.ndarray:
    from skimage import io
    return np.asarray(io.imread(path))


def _write(path: Path, array: np.ndarray) -> None:
    from skimage import io
    io.imsave(path, array, check_contrast=False)


def _case_ids(images: Path, ending: str) -> list[str]:
    return sorted(p.name[:-len("_0000" + ending)] for p in images.glob(f"*_0000{ending}"))


def base_dataset(work: Path, dataset_id: int) -> tuple[Path, Path]:
    """(raw folder, preprocessed folder) of the run's dataset, after checking what the oracle reads."""
    raws = sorted((work / "nnUNet_raw").glob(f"Dataset{dataset_id:03d}_*"))
    if not raws:
        raise OracleInputError(f"oracle_map: no Dataset{dataset_id:03d}_* in {work / 'nnUNet_raw'}; --work must be a "
                               f"low_label.py seed's work folder (e.g. benchmarks/results/low_label/seed_0/work).")
    raw = raws[0]
    pre = work / "nnUNet_preprocessed" / raw.name
    for path in (raw / "dataset.json", raw / "labelsTr", raw / "imagesTs", raw / "labelsTs", pre / "nnUNetPlans.json",
                 pre / "splits_final.json", pre / "dataset_fingerprint.json"):
        if not path.exists():
            raise OracleInputError(f"oracle_map: {path} is missing; run low_label.py on this folder first.")
    return raw, pre


def condition_images(work: Path, raw: Path, condition: str) -> Path:
    folder = raw / "imagesTs" if condition == "clean" else work / "degraded" / raw.name / condition
    if not folder.is_dir():
        raise OracleInputError(f"oracle_map: no test images for condition {condition!r} ({folder}); low_label.py "
                               f"makes them (--conditions).")
    return folder


MARKER = "oracle_map.json"  # in every raw dataset this script writes: it only rewrites folders that carry it


def _check_ours(work: Path, new_id: int, out_raw: Path, out_pre: Path) -> None:
    """Refuse to write over a dataset (raw or preprocessed) with the oracle's id that this script did not write."""
    for root, mine in ((work / "nnUNet_raw", out_raw), (work / "nnUNet_preprocessed", out_pre)):
        for other in root.glob(f"Dataset{new_id:03d}_*"):
            if other != mine:
                raise OracleInputError(f"oracle_map: {other} already uses dataset id {new_id}, which the oracle "
                                       f"dataset {mine.name} needs; move it away (the oracle never overwrites it).")
    if (out_raw.exists() and not (out_raw / MARKER).is_file()) or (out_pre.exists() and not out_raw.exists()):
        raise OracleInputError(f"oracle_map: {out_raw if out_raw.exists() else out_pre} exists but was not written by "
                               f"this script (no {out_raw / MARKER}); move it away, the oracle never overwrites it.")


def write_oracle_dataset(work: Path, raw: Path, pre: Path, new_id: int, kind: str,
                         conditions: list[str]) -> tuple[Path, dict[str, Path]]:
    """The two-channel copy of the run's dataset (raw + plans + splits) and its test folders by name."""
    meta = json.loads((raw / "dataset.json").read_text())
    ending = meta["file_ending"]
    name = f"Dataset{new_id:03d}_{raw.name.split('_', 1)[1]}Oracle{kind.capitalize()}"
    out_raw = work / "nnUNet_raw" / name
    out_pre = work / "nnUNet_preprocessed" / name
    _check_ours(work, new_id, out_raw, out_pre)
    sources = {condition: condition_images(work, raw, condition) for condition in conditions}  # before any writing
    map_of = map_function(kind, raw, meta)
    (out_raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out_raw / MARKER).write_text(json.dumps({"written_by": "benchmarks/oracle_map.py", "map": kind,
                                              "from": raw.name}))
    shutil.copytree(raw / "labelsTr", out_raw / "labelsTr", dirs_exist_ok=True)
    for case in _case_ids(raw / "imagesTr", ending):
        shutil.copy2(raw / "imagesTr" / f"{case}_0000{ending}", out_raw / "imagesTr" / f"{case}_0000{ending}")
        _write(out_raw / "imagesTr" / f"{case}_0001{ending}", map_of(case, raw / "labelsTr" / f"{case}{ending}"))
    meta["channel_names"] = {"0": meta["channel_names"]["0"], "1": f"oracle lesion map ({kind})"}
    (out_raw / "dataset.json").write_text(json.dumps(meta, indent=2))
    # nnU-Net's plans of the run (same network, patch and batch), with the second channel z-scored like the first
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["dataset_name"] = name
    for cfg in plans["configurations"].values():
        if "normalization_schemes" in cfg:
            cfg["normalization_schemes"] = cfg["normalization_schemes"][:1] + ["ZScoreNormalization"]
            cfg["use_mask_for_norm"] = cfg["use_mask_for_norm"][:1] + [False]
    plans["foreground_intensity_properties_per_channel"]["1"] = \
        plans["foreground_intensity_properties_per_channel"]["0"]
    out_pre.mkdir(parents=True, exist_ok=True)
    (out_pre / "nnUNetPlans.json").write_text(json.dumps(plans, indent=2))
    shutil.copy2(pre / "splits_final.json", out_pre / "splits_final.json")
    fingerprint = json.loads((pre / "dataset_fingerprint.json").read_text())  # nnUNetv2_train copies it
    channels = fingerprint.get("foreground_intensity_properties_per_channel", {})
    if "0" in channels:
        channels["1"] = channels["0"]
    (out_pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint, indent=2))
    (out_pre / "dataset.json").write_text(json.dumps(meta, indent=2))

    tests: dict[str, Path] = {}
    cases = _case_ids(raw / "imagesTs", ending)
    maps = {c: map_of(c, raw / "labelsTs" / f"{c}{ending}") for c in cases}
    from nnunetv2_textseg.demo_data import derangement
    other = dict(zip(cases, (cases[i] for i in derangement(np.random.default_rng(new_id), len(cases)))))
    for condition in conditions:
        variants = ["own"] + (["shuffled", "none"] if condition == "clean" else [])
        source = sources[condition]
        for variant in variants:
            folder = work / "oracle_tests" / name / f"{condition}_{variant}"
            folder.mkdir(parents=True, exist_ok=True)
            for c in cases:
                shutil.copy2(source / f"{c}_0000{ending}", folder / f"{c}_0000{ending}")
                m = {"own": maps[c], "shuffled": maps[other[c]], "none": np.zeros_like(maps[c])}[variant]
                _write(folder / f"{c}_0001{ending}", m)
            tests[f"{condition}_{variant}"] = folder
    return out_raw, tests


def plain_dice(work: Path, raw: Path, trainer: str, condition: str) -> float | None:
    """Plain nnU-Net's Dice of the run (its evaluated predictions in the run folder), if there."""
    from nnunetv2_textseg.harness import read_summary
    summary = work / "predictions" / raw.name / trainer / f"fold_{FOLD}" / condition / "summary.json"
    return float(read_summary(summary).foreground_mean["Dice"]) if summary.is_file() else None


def run_one(work: Path, dataset_id: int, kinds: list[str], trainer: str, conditions: list[str]) -> dict:
    from nnunetv2_textseg.harness import evaluate_command, nnunet_env, read_summary, run_command
    raw, pre = base_dataset(work, dataset_id)
    env = nnunet_env(work, n_proc_da=1, def_n_proc=1)
    logs = work.parent / "logs"
    result: dict = {"work": str(work), "plain": {c: plain_dice(work, raw, trainer, c) for c in conditions}}
    for kind in kinds:
        new_id = dataset_id + 100 + MAP_KINDS.index(kind)
        out_raw, tests = write_oracle_dataset(work, raw, pre, new_id, kind, conditions)
        fold_dir = work / "nnUNet_results" / out_raw.name / f"{trainer}__{PLANS}__{CONFIGURATION}" / f"fold_{FOLD}"
        if not (fold_dir / "checkpoint_final.pth").is_file():  # else: trained by an earlier run, evaluated again
            run_command(["nnUNetv2_preprocess", "-d", str(new_id), "-c", CONFIGURATION, "-np", "1"], env,
                        logs / f"oracle_{kind}_preprocess.log")
            run_command(["nnUNetv2_train", str(new_id), CONFIGURATION, str(FOLD), "-tr", trainer, "-device", "cpu"],
                        env, logs / f"oracle_{kind}_train.log")
        dice = {}
        for test, images in tests.items():
            pred = work / "oracle_predictions" / out_raw.name / test
            if pred.exists():
                shutil.rmtree(pred)
            run_command(["nnUNetv2_predict", "-i", str(images), "-o", str(pred), "-d", str(new_id), "-c",
                         CONFIGURATION, "-p", PLANS, "-f", str(FOLD), "-tr", trainer, "-device", "cpu",
                         "--disable_progress_bar", "-npp", "0", "-nps", "0"], env, logs / f"oracle_{kind}_{test}.log")
            run_command(evaluate_command(raw / "labelsTs", pred, 1), env, logs / f"oracle_{kind}_{test}_eval.log")
            dice[test] = float(read_summary(pred).foreground_mean["Dice"])
            print(f"  {work.parent.name} oracle {kind} / {test}: Dice {dice[test]:.4f}", flush=True)
        if kind == "zones":  # no training: plain nnU-Net's own predictions with everything outside the zones removed
            for condition in conditions:
                plain = work / "predictions" / raw.name / trainer / f"fold_{FOLD}" / condition
                if not (plain / "summary.json").is_file():
                    continue
                pred = work / "oracle_predictions" / out_raw.name / f"plain_inside_zones_{condition}"
                _mask_predictions(plain, tests["clean_own"], pred)
                run_command(evaluate_command(raw / "labelsTs", pred, 1), env, logs / f"oracle_posthoc_{condition}.log")
                dice[f"{condition}_plain_inside_zones"] = float(read_summary(pred).foreground_mean["Dice"])
                print(f"  {work.parent.name} plain nnU-Net inside the zones / {condition}: "
                      f"Dice {dice[f'{condition}_plain_inside_zones']:.4f}", flush=True)
        result[kind] = dice
    return result


def _mask_predictions(plain: Path, zone_images: Path, out: Path) -> None:
    """Plain nnU-Net's predicted labels with every pixel outside the case's zone map set to background."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy2(plain / name, out / name)
    ending = json.loads((plain / "dataset.json").read_text())["file_ending"]
    for seg in sorted(plain.glob(f"*{ending}")):
        zones = _read(zone_images / f"{seg.name[:-len(ending)]}_0001{ending}") > 0
        _write(out / seg.name, np.where(zones, _read(seg), 0).astype(np.uint8))


def table(results: list[dict], kinds: list[str], conditions: list[str]) -> str:
    rows = ["| map | test | Dice | Δ vs plain nnU-Net (paired) | runs |", "|---|---|---:|---:|---:|"]

    def fmt(values: list[float]) -> str:
        return f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.4f}"

    for c in conditions:
        plain = [r["plain"][c] for r in results if r["plain"][c] is not None]
        if plain:
            rows.append(f"| none (plain nnU-Net) | {c} | {fmt(plain)} | – | {len(plain)} |")
    for kind in kinds:
        tests = list(dict.fromkeys(t for r in results for t in r.get(kind, {})))
        for test in tests:
            condition = test.split("_")[0]  # clean_own, clean_shuffled, motion_own, clean_plain_inside_zones ...
            runs = [r for r in results if test in r.get(kind, {})]
            values = [r[kind][test] for r in runs]
            deltas = [r[kind][test] - r["plain"][condition] for r in runs if r["plain"].get(condition) is not None]
            rows.append(f"| {kind} | {test} | {fmt(values)} | {fmt(deltas) if deltas else '–'} | {len(values)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, nargs="+", default=[])
    parser.add_argument("--combine", type=Path, nargs="+", default=[],
                        help="JSON files of earlier runs of this script: their runs join the table (nothing is trained)")
    parser.add_argument("--dataset_id", type=int, default=990)
    parser.add_argument("--maps", nargs="+", default=["zones", "fine"], choices=list(MAP_KINDS))
    parser.add_argument("--trainer", default="nnUNetTrainer_demo")
    parser.add_argument("--conditions", nargs="+", default=["clean", "lowdose", "motion"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "oracle_map.json")
    args = parser.parse_args(argv)
    if not args.work and not args.combine:
        parser.error("give --work (run folders to train on) and/or --combine (earlier results)")
    results = [run_one(w.resolve(), args.dataset_id, args.maps, args.trainer, args.conditions) for w in args.work]
    for earlier in args.combine:
        results += json.loads(earlier.read_text())["runs"]
    args.maps = [k for k in MAP_KINDS if any(k in r for r in results)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"maps": {k: MAP_BLUR.get(k, ZONE_MAPS.get(k)) for k in args.maps}, "trainer": args.trainer,
                                    "runs": results}, indent=2))
    print(table(results, args.maps, args.conditions))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
