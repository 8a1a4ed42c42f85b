"""``nnUNetv2_textseg_diagnose``: does a trained text model read its report?

    nnUNetv2_textseg_diagnose -d D -c 2d -f 0 -tr nnUNetTrainerBiCLIP -i imagesTs -ref labelsTs [-reports R] -o OUT

Every test case is preprocessed by the model's own nnU-Net preprocessor (image and reference label
together, so both share the network's grid) and predicted with each **report variant**:

- ``real``: the case's report; ``shuffled``: another case's report (a fixed derangement);
- ``contradictory``: sides and levels swapped / negated (:mod:`nnunetv2_textseg.report_variants`);
- ``missing_location``: the report with its side, zone and laterality words removed;
- ``underdescriptive``: only the most generic statement ("Pulmonary infection."): another report that names no
  place, phrased unlike ``missing_location`` (which location-free training, ``_locationFree``, rewrites reports with);
- ``rephrased`` (only with ``--phrasings``): every report replaced by one of the user's own place-free phrasings, in
  turn by case (``--negative_phrasing`` for the reports read as negative) — phrasings training never saw, so that a
  model which learnt the variants above by heart is still caught reading "no place" as "nowhere";
- ``null``: no report (the model's learned null report);
- your own variants (``--variant_table NAME=TABLE``, repeatable): a report table (any layout the importer reads) with
  one report per test case. ``contradictory`` / ``missing_location`` / ``underdescriptive`` replace the rule-made ones
  (e.g. BUSUC's ``Test_text_contradictory.xlsx``); any other name adds a row before ``null``.

The rule-made variants know the chest-report vocabulary of lung sides and zones. A report they cannot rewrite (a
breast ultrasound report's "upper area", say) is left as it was, so that row would repeat ``real`` and look like a
model that ignores its report: every variant's count of reports left as they were is recorded and printed, and text
sensitivity is not computed when no contradictory report differs from the real one.

Measured (written to OUT/diagnosis.json and printed as a table):

- Dice of the prediction with each variant, on the preprocessed grid;
- text sensitivity ``mean|P_real − P_contra| / mean|P_real|`` (P = foreground probability);
- reliance: Dice(real) − Dice(null) (for BiCLIP without ``text_adapters`` the report reaches the U-Net only
  through the pseudo-image, so this is the Δ Dice of replacing the pseudo-image by the null report's);
- BiCLIP only: the per-pixel AUC of the pseudo-image for lesion vs background with each variant — over
  the whole image, and **within the lesion-prone region** (the pixels that are lesion in at least one test
  case, when all cases share one grid): the whole-image AUC rewards knowing where lesions can be at all
  (inside the lungs), the regional one only knowing where *this* case's lesion is, i.e. what a report can
  add — and the U-Net's first-convolution weight norm per input group (image, pseudo-image, position);
- the side, on the cases whose lesions all lie in one half of the image (left or right columns): how often the
  pseudo-image (BiCLIP) and the predicted foreground probability are higher in that half than in the other, with
  the real and with the contradictory report (which names the other side for such cases). Region AUC hides a map
  that ignores the side (most findings are bilateral); this does not. A model that reads the side: real near 1,
  contradictory well below it;
- OUT/diagnosis.png: for a few cases, image, reference, report and the pseudo-images / predictions.

A model that reads its report shows real > shuffled/contradictory/null, in Dice and (BiCLIP) in AUC.
"""
from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from nnunetv2_textseg.errors import TextSegError, run_cli

VARIANTS = ("real", "shuffled", "contradictory", "missing_location", "underdescriptive", "null")
RULE_MADE_VARIANTS = ("contradictory", "missing_location", "underdescriptive")  # report_variants' rewriting rules
_RESERVED_VARIANTS = ("real", "shuffled", "null", "rephrased", "rephrased_as_given")


class DiagnoseError(TextSegError, RuntimeError):
    """The diagnosis cannot run as asked; the message names what and the fix."""


def pixel_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count half); NaN without both classes."""
    from scipy.stats import rankdata
    labels = labels.astype(bool).ravel()
    n1, n0 = int(labels.sum()), int((~labels).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(scores.ravel().astype(np.float64))
    return float((ranks[labels].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def lesion_prone_region(refs: list[np.ndarray]) -> np.ndarray | None:
    """Flattened reference masks of equally sized cases -> the pixels that are lesion in at least one case
    (flattened bool), or None when the cases differ in size (no common grid) or the region is empty."""
    if not refs or len({r.size for r in refs}) != 1:
        return None
    region = np.logical_or.reduce([r.astype(bool) for r in refs])
    return region if region.any() else None


def side_score(maps, refs) -> dict | None:
    """maps, refs: (N, H, W) arrays or sequences of 2-D arrays (cases may differ in size). Over the cases whose
    lesions all lie in one half of the image (left or right columns): how often the map's mean is higher in that
    half than in the other (``named_side_brighter``), and the median ratio of the two means. None without
    one-sided cases."""
    named, other = [], []
    for m, r in zip(maps, refs):
        half = r.shape[-1] // 2
        left, right = bool(r[..., :half].any()), bool(r[..., half:].any())
        if left == right:
            continue
        mean_left, mean_right = float(m[..., :half].mean()), float(m[..., half:].mean())
        named.append(mean_left if left else mean_right)
        other.append(mean_right if left else mean_left)
    if not named:
        return None
    named, other = np.asarray(named), np.asarray(other)
    return {"cases": int(named.size), "named_side_brighter": float((named > other).mean()),
            "median_ratio": float(np.median(named / np.maximum(other, 1e-6)))}


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Foreground Dice; NaN when both are empty (nnU-Net's evaluation convention)."""
    pred, ref = pred.astype(bool), ref.astype(bool)
    denom = pred.sum() + ref.sum()
    return float("nan") if denom == 0 else float(2 * (pred & ref).sum() / denom)


def rephrased_reports(reports: dict[str, str], phrasings: Sequence[str], negative_phrasing: str | None = None
                      ) -> dict[str, str]:
    """case -> one of ``phrasings`` in turn (cases sorted); a report the parser reads as negative gets
    ``negative_phrasing`` when one is given, so that the variant changes the wording and the place, not the finding."""
    from nnunetv2_textseg.report_parsing import parse_report
    if not phrasings or any(not str(t).strip() for t in phrasings) or (
            negative_phrasing is not None and not negative_phrasing.strip()):
        raise DiagnoseError("--phrasings / --negative_phrasing need non-empty report texts, e.g. "
                            "--phrasings \"Findings consistent with pneumonia.\" \"Lung opacities are present.\"")
    out = {}
    for i, case in enumerate(sorted(reports)):
        finding = parse_report(reports[case]) if negative_phrasing is not None else None
        out[case] = negative_phrasing if finding is not None and finding.is_negative else phrasings[i % len(phrasings)]
    return out


def parse_variant_tables(specs: Sequence[str]) -> dict[str, Path]:
    """``--variant_table`` values ``NAME=TABLE`` -> {name: table path}; DiagnoseError for a malformed, reserved or
    repeated name or a table that does not exist."""
    tables: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = str(spec).partition("=")
        name = name.strip()
        if not sep or not path.strip():
            raise DiagnoseError(f"--variant_table {spec!r}: expected NAME=TABLE, e.g. --variant_table "
                                f"contradictory=Test_text_contradictory.xlsx")
        if not name.isidentifier():
            raise DiagnoseError(f"--variant_table {spec!r}: a variant name is letters, digits and _ (e.g. "
                                f"missing_location), got {name!r}")
        name = name.lower() if name.lower() in RULE_MADE_VARIANTS else name
        if name.lower() in _RESERVED_VARIANTS + ("original",):
            raise DiagnoseError(f"--variant_table {spec!r}: {name!r} is measured by diagnose itself (original: the "
                                f"real reports); name your table otherwise (contradictory, missing_location and "
                                f"underdescriptive replace the rule-made variants, any other name adds one).")
        if name in tables:
            raise DiagnoseError(f"--variant_table: {name!r} is given twice ({tables[name]}, {path}); keep one.")
        if not Path(path).is_file():
            raise DiagnoseError(f"--variant_table {spec!r}: {path}: no such file.")
        tables[name] = Path(path)
    return tables


def read_variant_tables(tables: dict[str, Path], cases: Sequence[str]) -> dict[str, dict[str, str]]:
    """{name: table path} -> {name: case -> report} for ``cases``; DiagnoseError naming the table and the cases it
    lacks. Tables may hold more cases (a dataset's whole test table)."""
    from nnunetv2_textseg.reports import ReportError, read_report_table
    out = {}
    for name, path in tables.items():
        try:
            table = read_report_table(path)
        except ReportError as e:
            raise DiagnoseError(f"--variant_table {name}={path}: {e} (diagnose reads a table's columns and file names "
                                f"as nnUNetv2_textseg_attach_reports does by default; a case_id,report CSV is "
                                f"taken literally)") from None
        missing = [c for c in cases if c not in table]
        if missing:
            raise DiagnoseError(f"--variant_table {name}={path}: {len(missing)} of the {len(cases)} diagnosed case(s) "
                                f"have no report in it: {missing[:10]}. Add a row for each, in a case_id,report CSV "
                                f"(ids taken literally) or with image file names as nnUNetv2_textseg_attach_reports "
                                f"maps them by default.")
        out[name] = {c: table[c] for c in cases}
    return out


def report_variants(reports: dict[str, str], seed: int = 0, phrasings: Sequence[str] = (),
                    negative_phrasing: str | None = None, tables: dict[str, dict[str, str]] | None = None
                    ) -> dict[str, dict[str, str | None]]:
    """variant -> case -> report text (None: the null report), in :data:`VARIANTS` order with ``rephrased`` and then
    the ``tables``' new variants before ``null``; a table named like a rule-made variant replaces it. Shuffled is a
    derangement (no case keeps its own)."""
    from nnunetv2_textseg.report_variants import _case_rng, make_variant
    cases = sorted(reports)
    rng = np.random.default_rng(seed)
    order = list(cases)
    if len(cases) > 1:
        shift = int(rng.integers(1, len(cases)))
        order = cases[shift:] + cases[:shift]
    tables = tables or {}

    def made(kind: str) -> dict[str, str]:  # the user's table, else the rules' rewrite
        if kind in tables:
            return {c: tables[kind][c] for c in cases}
        return {c: make_variant(reports[c], kind, _case_rng(seed, kind, c)) for c in cases}

    return {"real": dict(reports),
            "shuffled": {c: reports[o] for c, o in zip(cases, order)},
            **{kind: made(kind) for kind in RULE_MADE_VARIANTS},
            **({"rephrased": rephrased_reports(reports, phrasings, negative_phrasing)} if phrasings else {}),
            **{v: {c: texts[c] for c in cases} for v, texts in tables.items() if v not in RULE_MADE_VARIANTS},
            "null": {c: None for c in cases}}


def first_conv_norms(net: torch.nn.Module, image_channels: int) -> dict[str, float]:
    """Weight norm of the U-Net's first convolution per input group (image, pseudo-image, position)."""
    first = next(m for m in net.unet.modules() if isinstance(m, torch.nn.Conv2d))
    norms = first.weight.detach().float().transpose(0, 1).flatten(1).norm(dim=1)
    out = {"image": float(norms[:image_channels].mean())}
    if norms.numel() > image_channels:
        out["pseudo_image"] = float(norms[image_channels])
    if norms.numel() > image_channels + 1:
        out["position"] = float(norms[image_channels + 1:].mean())
    return out


def map_prior_weights(net: torch.nn.Module) -> list[float] | None:
    """The learned weight per output channel of a BiCLIP map prior (how far the report's map is trusted as a
    prior on the logits; see MapLogitPrior), or None for a network without one."""
    prior = getattr(net, "map_prior", None)
    return None if prior is None else [float(w) for w in prior.weight.detach().float()]


def _model_folder(dataset: str, trainer: str, plans: str, configuration: str) -> Path:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise DiagnoseError(f"Dataset {dataset!r} not found in nnUNet_raw/nnUNet_preprocessed/nnUNet_results: {e}")
    folder = Path(get_output_folder(name, trainer, plans, configuration))
    if not (folder / "plans.json").is_file():
        raise DiagnoseError(f"No trained model in {folder}. Train it with nnUNetv2_train {dataset} {configuration} "
                            f"FOLD -tr {trainer}, or check -tr/-p/-c.")
    if "textseg" not in json.loads((folder / "plans.json").read_text()):
        raise DiagnoseError(f"{folder} holds a model without text ({trainer} is not a text trainer, or it was trained "
                            f"by plain nnU-Net): there is no report to diagnose. Pick a BiCLIP or MedCLIPSeg model.")
    return folder


def _case_files(images: Path, ending: str) -> dict[str, list[Path]]:
    """case id -> its channel files, as nnU-Net lists an imagesTs folder (CASE_XXXX<ending>)."""
    from nnunetv2.utilities.utils import (create_lists_from_splitted_dataset_folder,
                                          get_identifiers_from_splitted_dataset_folder)
    ids = get_identifiers_from_splitted_dataset_folder(str(images), ending)
    return {c: [Path(f) for f in files] for c, files in
            zip(ids, create_lists_from_splitted_dataset_folder(str(images), ending, ids, num_processes=1))}


def diagnose(model: Path, fold: int, images: Path, labels: Path, reports_file: Path | None, out: Path,
             checkpoint: str = "checkpoint_final.pth", device: str = "cpu", n_figure: int = 4, max_cases: int = 0,
             seed: int = 0, phrasings: Sequence[str] = (), negative_phrasing: str | None = None,
             keep_unfamiliar_reports: bool = False, variant_tables: dict[str, Path] | None = None) -> dict:
    from nnunetv2_textseg.patient_frame import with_position_channels
    from nnunetv2_textseg.predictor import _NULL_REPORT, default_reports_file, nnUNetTextPredictor
    from nnunetv2_textseg.report_parsing import parse_report
    from nnunetv2_textseg.reports import read_report_table

    if not (model / f"fold_{fold}" / checkpoint).is_file():
        raise DiagnoseError(f"No {checkpoint} in {model / f'fold_{fold}'}: train fold {fold} first, or pass -f/-chk.")
    reports_file = reports_file or default_reports_file(images)
    if reports_file is None:
        raise DiagnoseError(f"No report table for {images}: pass -reports FILE (or put reports.csv in the input "
                            f"folder / reportsTs.csv next to it).")
    reports = read_report_table(reports_file).reports
    dataset_json = json.loads((model / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    files = _case_files(images, ending)
    if not files:
        raise DiagnoseError(f"No images CASE_0000{ending} in {images}.")
    missing = sorted(c for c in files if c not in reports)
    if missing:
        raise DiagnoseError(f"{len(missing)} case(s) in {images} have no report in {reports_file}: {missing[:10]}. "
                            f"Add them to the table.")
    no_label = sorted(c for c in files if not (labels / f"{c}{ending}").is_file())
    if no_label:
        raise DiagnoseError(f"{len(no_label)} case(s) have no reference {labels}/CASE{ending}: {no_label[:10]}.")
    cases = sorted(files)[:max_cases] if max_cases > 0 else sorted(files)
    variant_tables = variant_tables or {}
    variants = report_variants({c: reports[c] for c in cases}, seed, phrasings, negative_phrasing,
                               read_variant_tables(variant_tables, cases))
    # a variant that left reports as they were repeats ``real`` for them (rule-made variants of reports whose
    # vocabulary the rules do not know): counted so that it is not read as a model that ignores its report
    unchanged = {v: sum(texts[c] == reports[c] for c in cases) for v, texts in variants.items()
                 if v not in ("real", "null")}
    in_rule_wording = sum(parse_report(reports[c]) is not None for c in cases)
    if phrasings and not keep_unfamiliar_reports:  # what the guard below protects from stays measured
        ordered = {}
        for name, texts in variants.items():
            ordered[name] = texts
            if name == "rephrased":
                ordered["rephrased_as_given"] = texts
        variants = ordered

    predictor = nnUNetTextPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                    perform_everything_on_device=device != "cpu", device=torch.device(device),
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False,
                                    allow_missing_reports=True, keep_unfamiliar_reports=keep_unfamiliar_reports)
    predictor.initialize_from_trained_model_folder(str(model), (fold,), checkpoint)
    net = predictor._net()
    has_pseudo = net.has_pseudo_image
    texts = sorted({t for v in variants.values() for t in v.values() if t is not None})
    predictor.set_reports({str(i): t for i, t in enumerate(texts)})
    index = {t: str(i) for i, t in enumerate(texts)}
    # as nnUNetv2_textseg_predict would: reports worded unlike training are given the null report (unless kept)
    replaced = {t for t in texts if index[t] in predictor.unfamiliar_reports and not keep_unfamiliar_reports}

    reader = predictor.plans_manager.image_reader_writer_class()
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    fg_labels = predictor.label_manager.foreground_labels
    per_variant = {v: {"dice": [], "pseudo": [], "pseudo2d": [], "ref": [], "ref2d": [], "prob": []}
                   for v in variants}
    figure_rows = []
    for n, case in enumerate(cases):
        img, props = reader.read_images([str(f) for f in files[case]])
        seg, _ = reader.read_seg(str(labels / f"{case}{ending}"))
        data, ref, _ = preprocessor.run_case_npy(img, seg, props, predictor.plans_manager,
                                                 predictor.configuration_manager, dataset_json)
        ref = np.isin(ref[0], fg_labels)
        data_t = torch.from_numpy(data)
        row = {"case": case, "image": data[0, 0], "ref": ref[0], "report": reports[case]}
        for v in variants:
            text = variants[v][case]
            null = text is None or (text in replaced and v != "rephrased_as_given")
            predictor._current_text = _NULL_REPORT if null else predictor.embeddings[index[text]]
            logits = predictor.predict_logits_from_preprocessed_data(data_t).float()
            prob_fg = 1 - torch.softmax(logits, 0)[0].numpy()  # P(any foreground)
            pred = logits.argmax(0).numpy()
            per_variant[v]["dice"].append(dice(np.isin(pred, fg_labels), ref))
            per_variant[v]["prob"].append(prob_fg[0])
            per_variant[v]["ref2d"].append(ref[0])
            row[f"pred_{v}"] = np.isin(pred[0], fg_labels)
            if has_pseudo:
                with torch.inference_mode():
                    predictor.set_network_text(None)
                    x = with_position_channels(data_t).to(predictor.device).float().transpose(0, 1)
                    pseudo = net.current_pseudo_image(x)[0, 0].float().cpu().numpy()
                    net.set_text(None)
                per_variant[v]["pseudo"].append(pseudo.ravel())
                per_variant[v]["pseudo2d"].append(pseudo)
                per_variant[v]["ref"].append(ref[0].ravel())
                row[f"pseudo_{v}"] = pseudo
        predictor._current_text = None
        if n < n_figure:
            figure_rows.append(row)
        print(f"[diagnose] {n + 1}/{len(cases)} {case}", flush=True)

    result = {"model": str(model), "fold": fold, "checkpoint": checkpoint, "cases": len(cases),
              "reports": str(reports_file), "dice": {}, "pseudo_image_auc": {}, "pseudo_image_auc_lesion_region": {},
              "unfamiliar_reports": {v: sum(t is not None and index[t] in predictor.unfamiliar_reports
                                            for t in variants[v].values())
                                     for v in variants if v != "rephrased_as_given"},
              "unfamiliar_reports_read_as_given": keep_unfamiliar_reports,
              "variant_tables": {v: str(p) for v, p in variant_tables.items()},
              "unchanged_reports": unchanged,
              "reports_in_rule_wording": in_rule_wording}
    region = lesion_prone_region(per_variant["real"]["ref"]) if has_pseudo else None
    for v in variants:
        result["dice"][v] = float(np.nanmean(per_variant[v]["dice"]))
        if has_pseudo:
            result["pseudo_image_auc"][v] = pixel_auc(np.concatenate(per_variant[v]["pseudo"]),
                                                      np.concatenate(per_variant[v]["ref"]))
            if region is not None:
                inside = np.tile(region, len(cases))
                result["pseudo_image_auc_lesion_region"][v] = pixel_auc(
                    np.concatenate(per_variant[v]["pseudo"])[inside], np.concatenate(per_variant[v]["ref"])[inside])
    if region is None:
        result["pseudo_image_auc_lesion_region"] = None
    else:
        result["lesion_region_fraction"] = float(region.mean())
    # text sensitivity over the cases whose model input the contradictory variant changed: a report the rules could
    # not rewrite, or one the guard gave the null report as it did the real one, would only dilute it
    given = {v: [None if variants[v][c] is None or (variants[v][c] in replaced and v != "rephrased_as_given")
                 else variants[v][c] for c in cases] for v in ("real", "contradictory")}
    contrasted = [i for i, (a, b) in enumerate(zip(given["real"], given["contradictory"])) if a != b]
    result["text_sensitivity_cases"] = len(contrasted)
    if contrasted:
        p_real = np.concatenate([per_variant["real"]["prob"][i].ravel() for i in contrasted])
        p_contra = np.concatenate([per_variant["contradictory"]["prob"][i].ravel() for i in contrasted])
        result["text_sensitivity"] = float(np.abs(p_real - p_contra).mean() / max(np.abs(p_real).mean(), 1e-12))
    else:
        result["text_sensitivity"] = None
    result["reliance"] = result["dice"]["real"] - result["dice"]["null"]
    refs = per_variant["real"]["ref2d"]
    result["side"] = {what: {v: side_score(per_variant[v][key], refs) if v == "real" or contrasted else None
                             for v in ("real", "contradictory")}
                      for what, key in (("pseudo_image", "pseudo2d"), ("prediction", "prob"))
                      if what == "prediction" or has_pseudo}
    if has_pseudo:
        result["first_conv_weight_norm"] = first_conv_norms(net, net.image_channels)
        prior_weights = map_prior_weights(net)
        if prior_weights is not None:
            result["map_prior_weight"] = prior_weights
    else:
        result["pseudo_image_auc"] = result["pseudo_image_auc_lesion_region"] = None
        result["note"] = (f"{model.name}: no pseudo-image (not a BiCLIP model); its pseudo-image AUC and "
                          f"first-convolution rows are skipped.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnosis.json").write_text(json.dumps(result, indent=2))
    _figure(figure_rows, has_pseudo, out / "diagnosis.png")
    return result


def _figure(rows: list[dict], has_pseudo: bool, path: Path) -> None:
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    if not rows:
        return
    cols = ["image", "ref"] + ([f"pseudo_{v}" for v in ("real", "contradictory", "null")] if has_pseudo else []) + \
           ["pred_real", "pred_contradictory"]
    titles = {"image": "image", "ref": "reference", "pseudo_real": "pseudo-image (real)",
              "pseudo_contradictory": "pseudo (contradictory)", "pseudo_null": "pseudo (no report)",
              "pred_real": "prediction (real)", "pred_contradictory": "prediction (contradictory)"}
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.6 * len(cols), 3.1 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, key in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(row[key], cmap="gray" if key == "image" else "magma",
                      vmin=None if key == "image" else 0, vmax=None if key == "image" else 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[key], fontsize=9)
        axes[r, 0].set_ylabel(row["case"], fontsize=8)
        axes[r, 1].set_xlabel("\n".join(textwrap.wrap(row["report"], 34)[:4]), fontsize=6.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(result: dict) -> str:
    lines = ["| variant | Dice | pseudo-image AUC | AUC in the lesion-prone region |", "|---|---|---|---|"]
    for v in result["dice"]:
        aucs = [(result.get(k) or {}).get(v) for k in ("pseudo_image_auc", "pseudo_image_auc_lesion_region")]
        cells = " | ".join("—" if a is None else f"{a:.4f}" for a in aucs)
        lines.append(f"| {v} | {result['dice'][v]:.4f} | {cells} |")
    used = result.get("text_sensitivity_cases")
    sensitivity = "not measured (no case's contradictory report reached the model differing from its real one)" \
        if result["text_sensitivity"] is None else f"{result['text_sensitivity']:.4f}" + (
            f" (over the {used} of {result['cases']} cases whose contradictory report differs)"
            if used is not None and used < result["cases"] else "")
    lines.append(f"\ntext sensitivity |P_real − P_contra| / |P_real|: {sensitivity}; "
                 f"reliance Dice(real) − Dice(null): {result['reliance']:+.4f}")
    tables = result.get("variant_tables") or {}
    for v, n in (result.get("unchanged_reports") or {}).items():
        if not n:
            continue
        why = (" (the rules rewrite lung sides and zones; give your own with --variant_table "
               f"{v}=TABLE)") if v in RULE_MADE_VARIANTS and v not in tables else ""
        lines.append(f"{v}: {n}/{result['cases']} report(s) left as they were — the row repeats real for them{why}")
    made = [v for v in RULE_MADE_VARIANTS if v not in tables]
    in_wording = result.get("reports_in_rule_wording")
    if made and in_wording is not None and in_wording < result["cases"]:
        lines.append(f"{result['cases'] - in_wording}/{result['cases']} real report(s) are not in the chest-report "
                     f"wording the rule-made variants rewrite (lung sides and zones): for them {', '.join(made)} are "
                     f"no meaningful rewrites — give your own with --variant_table NAME=TABLE")
    for what, scores in (result.get("side") or {}).items():
        real, contra = scores.get("real"), scores.get("contradictory")
        if real is None:
            lines.append(f"side ({what}): no case with its lesions in one half of the image")
            continue
        lines.append(f"side ({what}, {real['cases']} one-sided cases): named half higher with the real report "
                     f"{real['named_side_brighter']:.2f} (median ratio {real['median_ratio']:.2f}), with the "
                     f"contradictory one {contra['named_side_brighter']:.2f} ({contra['median_ratio']:.2f})")
    flagged = {v: n for v, n in (result.get("unfamiliar_reports") or {}).items() if n}
    if flagged:
        how = "read as given" if result.get("unfamiliar_reports_read_as_given") else "given the null report"
        lines.append("reports worded unlike training (" + how + "): " +
                     ", ".join(f"{v} {n}/{result['cases']}" for v, n in flagged.items()))
    if result.get("first_conv_weight_norm"):
        lines.append("first-convolution weight norm per input: " +
                     ", ".join(f"{k} {v:.3f}" for k, v in result["first_conv_weight_norm"].items()))
    if result.get("map_prior_weight"):
        lines.append("map prior weight per output channel (the map's log-odds added to the logits): " +
                     ", ".join(f"{w:.3f}" for w in result["map_prior_weight"]))
    if result.get("note"):
        lines.append(result["note"])
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nnUNetv2_textseg_diagnose", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("-c", default="2d", help="configuration")
    p.add_argument("-f", type=int, default=0, help="fold")
    p.add_argument("-tr", required=True, help="trainer class name")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-i", required=True, type=Path, help="folder with test images (CASE_0000<ending>)")
    p.add_argument("-ref", required=True, type=Path, help="folder with reference segmentations (CASE<ending>)")
    p.add_argument("-reports", type=Path, default=None, help="report table (default: reports.csv in -i or reportsTs.csv next to it)")
    p.add_argument("-o", type=Path, default=None, help="output folder (default: MODEL/fold_F/diagnosis)")
    p.add_argument("-chk", default="checkpoint_final.pth")
    p.add_argument("-device", default="cpu", choices=("cpu", "cuda", "mps"))
    p.add_argument("--n_figure", type=int, default=4, help="cases shown in diagnosis.png")
    p.add_argument("--max_cases", type=int, default=0, help="diagnose only the first N cases (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled / contradictory reports")
    p.add_argument("--phrasings", nargs="+", default=(), metavar="TEXT",
                   help="place-free reports worded unlike anything in training: adds the 'rephrased' variant (every "
                        "report replaced by one of them, in turn by case)")
    p.add_argument("--negative_phrasing", default=None, metavar="TEXT",
                   help="with --phrasings: the text for reports the parser reads as negative (e.g. \"No acute "
                        "findings.\"); without it every report gets one of --phrasings")
    p.add_argument("--variant_table", action="append", default=[], metavar="NAME=TABLE",
                   help="your own report variant: a table with one report per test case (any layout "
                        "nnUNetv2_textseg_attach_reports reads); contradictory / missing_location / underdescriptive "
                        "replace the rule-made ones, which know chest-report wording only; any other name adds a row. "
                        "Repeatable")
    p.add_argument("--keep_unfamiliar_reports", action="store_true",
                   help="read reports worded unlike every training report as given (default, as prediction does: "
                        "the learned null report)")
    a = p.parse_args(argv)
    if a.negative_phrasing is not None and not a.phrasings:
        raise DiagnoseError("--negative_phrasing is the negative reports' text of the 'rephrased' variant: give the "
                            "positive ones with --phrasings too.")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise DiagnoseError("-device cuda, but no CUDA GPU is available here: use -device cpu.")
    for folder, flag in ((a.i, "-i"), (a.ref, "-ref")):
        if not folder.is_dir():
            raise DiagnoseError(f"{flag} {folder}: no such folder.")
    variant_tables = parse_variant_tables(a.variant_table)
    model = _model_folder(a.d, a.tr, a.p, a.c)
    out = a.o or model / f"fold_{a.f}" / "diagnosis"
    result = diagnose(model, a.f, a.i, a.ref, a.reports, out, a.chk, a.device, a.n_figure, a.max_cases, a.seed,
                      a.phrasings, a.negative_phrasing, a.keep_unfamiliar_reports, variant_tables)
    print(format_table(result))
    print(f"[diagnose] wrote {out / 'diagnosis.json'} and {out / 'diagnosis.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``nnUNetv2_textseg_diagnose``: exit code 0, or 2 with one ``ERROR:`` line for a problem the user can fix."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
