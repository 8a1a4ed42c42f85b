"""Calibration and uncertainty quality of a prediction folder.

- Expected calibration error (ECE) of the foreground probability: pixels binned by predicted
  foreground probability; ECE = Σ_b (n_b / N)·|mean prob_b − foreground rate_b|.
- Error-retrieval AUC: rank pixels by uncertainty (most uncertain first) and follow the fraction of all
  segmentation errors found as more pixels are inspected. The area under that curve is 0.5 for an
  uncertainty unrelated to errors and approaches 1 when the errors come first; with error rate e the
  best possible value is 1 − e/2.

    nnUNetv2_textseg_calibration -ref labelsTs -pred PRED_FOLDER  (PRED_FOLDER from --save_probabilities)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def expected_calibration_error(prob: np.ndarray, label: np.ndarray, n_bins: int = 15) -> float:
    """ECE of probabilities ``prob`` in [0, 1] for binary ``label`` (same shape), equal-width bins."""
    prob, label = np.asarray(prob, np.float64).ravel(), np.asarray(label, bool).ravel()
    if prob.size == 0:
        return float("nan")
    bins = np.minimum((prob * n_bins).astype(int), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    conf = np.bincount(bins, weights=prob, minlength=n_bins)
    hits = np.bincount(bins, weights=label, minlength=n_bins)
    nz = count > 0
    return float(np.sum(np.abs(conf[nz] - hits[nz])) / prob.size)


def error_retrieval_auc(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """Area under 'fraction of errors found' vs 'fraction of pixels inspected, most uncertain first'.
    Ties in uncertainty are inspected together (their errors are spread evenly over the tie)."""
    u, e = np.asarray(uncertainty, np.float64).ravel(), np.asarray(error, bool).ravel()
    n, n_err = u.size, int(e.sum())
    if n == 0 or n_err == 0:
        return float("nan")
    order = np.argsort(-u, kind="stable")
    u, e = u[order], e[order]
    # group ties so that an uninformative (constant) uncertainty scores 0.5, not by pixel order
    starts = np.r_[0, np.nonzero(np.diff(u))[0] + 1]
    sizes = np.diff(np.r_[starts, n])
    errs = np.add.reduceat(e.astype(np.float64), starts)
    x = np.r_[0, np.cumsum(sizes)] / n
    y = np.r_[0, np.cumsum(errs)] / n_err
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    return float(trapezoid(y, x))


def evaluate_folder(ref_folder: Path, pred_folder: Path, file_ending: str | None = None, n_bins: int = 15) -> dict:
    """ECE and error-retrieval AUC over all pixels of all cases with saved probabilities (``CASE.npz``).
    The uncertainty is ``uncertainty/CASE_entropy.nii.gz`` if present, else the entropy of the probabilities."""
    import SimpleITK as sitk
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pred_folder, ref_folder = Path(pred_folder), Path(ref_folder)
    dataset_json = json.loads((pred_folder / "dataset.json").read_text())
    ending = file_ending or dataset_json["file_ending"]
    reader = PlansManager(json.loads((pred_folder / "plans.json").read_text())).image_reader_writer_class()
    cases = sorted(f.stem for f in pred_folder.glob("*.npz"))
    if not cases:
        raise FileNotFoundError(f"No CASE.npz probability files in {pred_folder}; predict with --save_probabilities.")
    probs, labels, uncs, errors, per_case = [], [], [], [], {}
    for case in cases:
        ref = ref_folder / f"{case}{ending}"
        if not ref.is_file():
            raise FileNotFoundError(f"No reference segmentation {ref} for predicted case {case}.")
        p = np.load(pred_folder / f"{case}.npz", allow_pickle=False)["probabilities"].astype(np.float32)
        seg, _ = reader.read_seg(str(ref))
        fg_prob = 1.0 - p[0]  # foreground = any non-background class
        fg = seg[0] > 0
        if fg_prob.shape != fg.shape:
            fg_prob = fg_prob.reshape(fg.shape)
        unc_file = pred_folder / "uncertainty" / f"{case}_entropy.nii.gz"
        if unc_file.is_file():
            unc = sitk.GetArrayFromImage(sitk.ReadImage(str(unc_file))).reshape(fg.shape)
        else:
            unc = -(p * np.log(np.clip(p, 1e-8, 1))).sum(0).reshape(fg.shape)
        err = (p.argmax(0).reshape(fg.shape) > 0) != fg
        per_case[case] = {"ece": expected_calibration_error(fg_prob, fg, n_bins),
                          "error_retrieval_auc": error_retrieval_auc(unc, err), "mean_uncertainty": float(unc.mean())}
        probs.append(fg_prob.ravel()), labels.append(fg.ravel()), uncs.append(unc.ravel()), errors.append(err.ravel())
    prob, label, unc, err = (np.concatenate(a) for a in (probs, labels, uncs, errors))
    return {"ece": expected_calibration_error(prob, label, n_bins), "error_retrieval_auc": error_retrieval_auc(unc, err),
            "error_rate": float(err.mean()), "best_possible_auc": float(1 - err.mean() / 2),
            "mean_uncertainty": float(unc.mean()), "n_cases": len(cases), "per_case": per_case}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-ref", required=True, help="folder with reference segmentations (e.g. labelsTs)")
    p.add_argument("-pred", required=True, help="prediction folder written with --save_probabilities")
    p.add_argument("-o", default=None, help="output JSON (default: PRED/calibration.json)")
    p.add_argument("--bins", type=int, default=15)
    a = p.parse_args(argv)
    res = evaluate_folder(Path(a.ref), Path(a.pred), n_bins=a.bins)
    out = Path(a.o) if a.o else Path(a.pred) / "calibration.json"
    out.write_text(json.dumps(res, indent=2))
    print(f"cases {res['n_cases']}: ECE {res['ece']:.4f}, error-retrieval AUC {res['error_retrieval_auc']:.4f} "
          f"(0.5 = uninformative, best possible {res['best_possible_auc']:.4f}), mean uncertainty "
          f"{res['mean_uncertainty']:.4f} -> {out}")
