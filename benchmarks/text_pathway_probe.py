"""Can BiCLIP's text pathway learn where reports put lesions from the labelled cases alone? Not a test.

    python benchmarks/text_pathway_probe.py -d Dataset990_TextSegDemo [--runs "" "cycle=0.1" "mirror=0.5"]
        [--heldout 150] [--out benchmarks/results/text_pathway_probe.json]

The report's pathway of nnUNetTrainerBiCLIP — the real attention pooling, generator, zone-scale map and
generation loss (and, per run, the real image-to-text head and cycle loss) — is trained in isolation: no image,
no U-Net, no augmentation, on the cases of nnU-Net's fold-0 training split (``splits_final.json``; the few-labels
benchmark writes its label subset there) with the cached token embeddings of their reports and their label
masks, 750 steps of batch 2 like the ``_demo`` trainers. It is scored on *other* training cases of the dataset
(never the test set): pixel AUC of the map for lesion vs background over the whole image and within the
lesion-prone region (pixels that are lesion in at least one scored case), with the real, shuffled (another
case's) and the learned null report, and on the held-out cases with lesions in one image half only, how often the
map is brighter in that half (the side, which region AUC hides). Runs are ``key=value`` settings: ``lr``, ``steps``, ``drop`` (report
dropout), ``cycle`` (λ of the cycle loss), ``normalized`` (layer-normalised cycle), ``mirror`` (probability of
training on the left↔right-swapped report with the mirrored mask), ``token_maps`` (1: per-token zone maps),
``window`` (tokens each per-token map reads), ``seed``, ``pseudo`` (1: also train on the report-only cases below),
``blur`` (σ of the target's Gaussian blur as a fraction of the side, the trainer's ``generation_blur``; 1/16).

``--pseudo_labels DIR``: segmentations predicted (e.g. by plain nnU-Net trained on the labelled cases) for training
cases outside the labelled split. Those cases are report-only: their report is real, their target is the image
model's guess, never their label. Runs with ``pseudo=1`` add them to the training cases, so the pathway learns where
reports put lesions from every report of the dataset instead of the labelled few. Scored cases are then chosen among
the cases without a file in DIR, identical for every run. Needs 2D images of one size.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULTS = dict(lr=1e-3, steps=750, drop=0.25, batch=2, cycle=0.0, normalized=False, mirror=0.0, seed=0, token_maps=0,
                window=1, pseudo=0, blur=1 / 16)


from nnunetv2_textseg.errors import TextSegError, run_cli  # noqa: E402  (after the path line above)


class ProbeInputError(TextSegError):
    """The dataset lacks what the probe reads; the message names the file and the fix."""


def check_inputs(pre: Path, raw: Path) -> Path:
    """The training-report cache of ``pre`` (the newest), after checking that every file the probe reads exists."""
    caches = sorted((pre / "text_embeddings").glob("*Tr.npz"), key=lambda p: p.stat().st_mtime)
    if not caches:
        raise ProbeInputError(f"text_pathway_probe: no training-report cache in {pre / 'text_embeddings'}. "
                              f"Run nnUNetv2_textseg_encode -d {pre.name} (or train a text trainer once) first.")
    for path, fix in ((pre / "splits_final.json", "run nnUNetv2_train once (it writes the splits), or the "
                                                   "few-labels benchmark, which writes its label subset there"),
                      (raw / "reportsTr.csv", "attach reports with nnUNetv2_textseg_attach_reports"),
                      (raw / "dataset.json", "it is an nnU-Net raw dataset folder"), (raw / "labelsTr", "")):
        if not path.exists():
            raise ProbeInputError(f"text_pathway_probe: {path} is missing" + (f"; {fix}." if fix else "."))
    return caches[-1]


def load_cases(pre: Path, raw: Path, heldout: int, pseudo_labels: Path | None = None) -> dict:
    from PIL import Image

    from nnunetv2_textseg.cache import TextEmbeddingCache
    from nnunetv2_textseg.encoders import record_precision
    cache = TextEmbeddingCache.load(check_inputs(pre, raw))
    train_ids = json.loads((pre / "splits_final.json").read_text())[0]["train"]
    ending = json.loads((raw / "dataset.json").read_text())["file_ending"]
    unlabelled = [c for c in cache.case_ids if c not in set(train_ids)]
    guessed = [c for c in unlabelled if pseudo_labels is not None and (pseudo_labels / f"{c}{ending}").is_file()]
    if pseudo_labels is not None and not guessed:
        raise ProbeInputError(f"text_pathway_probe: {pseudo_labels} holds no {ending} segmentation of a training case "
                              f"outside the labelled split; predict those cases (imagesTr) into it first.")
    others = [c for c in unlabelled if c not in set(guessed)][:heldout]
    if not others:
        raise ProbeInputError(f"text_pathway_probe: no training case is left to score on: every case outside the "
                              f"labelled split has a segmentation in {pseudo_labels}. Leave some out (e.g. the "
                              f"validation cases of splits_final.json).")

    def part(ids, labels: Path = raw / "labelsTr"):
        rows = cache.rows(ids)
        masks = [np.asarray(Image.open(labels / f"{c}{ending}")) > 0 for c in ids]
        shapes = {m.shape for m in masks}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ProbeInputError(f"text_pathway_probe: the label maps in {labels} must be 2D and of one "
                                  f"size (found {sorted(shapes)[:3]}); the probe compares maps pixel by pixel.")
        masks = np.stack(masks)
        return (torch.from_numpy(cache.tokens[rows].astype(np.float32)), torch.from_numpy(cache.mask[rows]),
                torch.from_numpy(masks.astype(np.float32))[:, None])

    with open(raw / "reportsTr.csv", newline="", encoding="utf-8") as f:
        reports = {r["case_id"]: r["report"] for r in csv.DictReader(f)}
    return {"train": part(train_ids), "heldout": part(others), "train_ids": train_ids, "heldout_ids": others,
            "pseudo": part(guessed, pseudo_labels) if guessed else None, "pseudo_ids": guessed,
            "train_reports": [reports[c] for c in train_ids], "pseudo_reports": [reports[c] for c in guessed],
            "precision": record_precision(cache.identity)}


def mirrored_reports(data: dict, split: str = "train") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token embeddings of the left↔right-swapped reports of ``split`` ("train" or "pseudo"; padded to the cache's
    length), masks mirrored."""
    from nnunetv2_textseg.encoders import EncoderSpec, load_encoder
    from nnunetv2_textseg.report_parsing import swap_laterality
    # the default encoder at the cache's precision, so swapped and original reports are encoded alike
    texts = [swap_laterality(t) for t in data[f"{split}_reports"]]
    enc = load_encoder(EncoderSpec(precision=data["precision"])).encode(texts)
    tokens, mask, masks = data[split]
    length = tokens.shape[1]
    tok = torch.zeros_like(tokens)
    msk = torch.zeros_like(mask)
    n = min(length, enc.tokens.shape[1])
    tok[:, :n] = torch.from_numpy(np.asarray(enc.tokens, dtype=np.float32)[:, :n])
    msk[:, :n] = torch.from_numpy(np.asarray(enc.mask, dtype=bool)[:, :n])
    return tok, msk, masks.flip(-1)


def run(data: dict, settings: dict) -> dict:
    from nnunetv2_textseg.building_blocks.biclip import (AttentionPoolText, ImageToTextHead, PseudoImageGenerator,
                                                         TokenZoneMaps, noisy_or_logits)
    from nnunetv2_textseg.diagnose import lesion_prone_region, pixel_auc, side_score
    from nnunetv2_textseg.losses import blur_mask, cycle_loss, lesion_generation_loss
    s = {**DEFAULTS, **settings}
    torch.manual_seed(s["seed"])
    tokens, mask, masks = data["train"]
    if s["pseudo"]:
        if data.get("pseudo") is None:
            raise ProbeInputError("text_pathway_probe: a run with pseudo=1 needs --pseudo_labels DIR")
        tokens, mask, masks = (torch.cat([a, b]) for a, b in zip(data["train"], data["pseudo"]))
    size, dim, zone = masks.shape[-1], 784, 16
    pool, generator, head = AttentionPoolText(tokens.shape[-1], dim), PseudoImageGenerator(dim, out_bias=-2.0), \
        ImageToTextHead(dim)
    null = torch.nn.Parameter(0.02 * torch.randn(dim))
    token_maps = TokenZoneMaps(tokens.shape[-1], zone, window=int(s["window"])) if s["token_maps"] else None
    params = [*pool.parameters(), *generator.parameters(), null] + (list(head.parameters()) if s["cycle"] else []) \
        + (list(token_maps.parameters()) if token_maps is not None else [])
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=1e-4)
    target = blur_mask(masks, size * s["blur"])
    mirror = None
    if s["mirror"]:
        m_tok, m_mask, m_masks = mirrored_reports(data)
        if s["pseudo"]:
            m_tok, m_mask, m_masks = (torch.cat([a, b]) for a, b in zip((m_tok, m_mask, m_masks),
                                                                         mirrored_reports(data, "pseudo")))
        mirror = (m_tok, m_mask, blur_mask(m_masks, size * s["blur"]))

    def frame(t, tok=None, msk=None, keep=None):  # zone-scale map, read back at full size
        z = F.adaptive_avg_pool2d(generator(t), zone)
        if token_maps is not None and tok is not None:
            # dropped reports (keep False) have no tokens: their map is the null report's alone
            per_token = token_maps(tok, msk & keep[:, None] if keep is not None else msk)
            z = noisy_or_logits(z, per_token)
        return F.interpolate(z, size=size, mode="bilinear", align_corners=False)

    for step in range(s["steps"]):
        for g in opt.param_groups:
            g["lr"] = s["lr"] * (1 - step / s["steps"]) ** 0.9
        i = torch.randint(0, len(tokens), (s["batch"],))
        tok, msk, tgt = tokens[i], mask[i], target[i]
        if mirror is not None:
            use = torch.rand(len(i)) < s["mirror"]
            tok = torch.where(use[:, None, None], mirror[0][i], tok)
            msk = torch.where(use[:, None], mirror[1][i], msk)
            tgt = torch.where(use[:, None, None, None], mirror[2][i], tgt)
        t = pool(tok, msk)
        dropped = torch.rand(len(i)) < s["drop"]
        t = torch.where(dropped[:, None], null.expand(len(i), -1), t)
        logits = frame(t, tok, msk, ~dropped)
        loss = lesion_generation_loss(logits, tgt, torch.ones_like(tgt, dtype=torch.bool))
        if s["cycle"]:
            zone_map = torch.sigmoid(F.adaptive_avg_pool2d(generator(t), zone))
            loss = loss + s["cycle"] * cycle_loss(t.detach(), head(zone_map), normalized=bool(s["normalized"]))
        opt.zero_grad()
        loss.backward()
        opt.step()

    result = {}
    with torch.no_grad():
        for split in ("heldout", "train"):
            tok, msk, ref = data[split]
            ref = ref.bool().numpy()
            region = lesion_prone_region([r.ravel() for r in ref])
            inside = np.tile(region, len(ref)) if region is not None else None
            perm = torch.roll(torch.arange(len(tok)), 1)
            variants = {"real": frame(pool(tok, msk), tok, msk),
                        "shuffled": frame(pool(tok[perm], msk[perm]), tok[perm], msk[perm]),
                        "null": frame(null[None]).expand(len(tok), -1, -1, -1)}
            for v, logits in variants.items():
                if split == "train" and v != "real":
                    continue
                scores = torch.sigmoid(logits).numpy().ravel()
                result[f"{split}_{v}"] = {"auc": pixel_auc(scores, ref.ravel()),
                                          "auc_region": pixel_auc(scores[inside], ref.ravel()[inside])
                                          if inside is not None else None}
            if split == "heldout":
                result["heldout_side"] = side_score(torch.sigmoid(variants["real"])[:, 0].numpy(), ref[:, 0])
    return result


def zone_reference(raw: Path, data: dict) -> dict[str, dict]:
    """What the report says at most, as the same scores: the true named lung zones of each held-out case (demo
    datasets only: re-drawn from the generator, :func:`nnunetv2_textseg.demo_data.named_zones`), as drawn and
    blurred to zone scale like the generation target, and drawn on the dataset's average lung (what a perfect reader
    of the report that does not see the image could draw: ``benchmarks/oracle_map.py``'s ``zonesTextOnly``). Empty
    for other datasets."""
    from benchmarks.oracle_map import map_function
    from nnunetv2_textseg.demo_data import default_reports_dir, load_real_reports, named_zones
    from nnunetv2_textseg.diagnose import lesion_prone_region, pixel_auc
    from nnunetv2_textseg.losses import blur_mask
    demo = json.loads((raw / "dataset.json").read_text()).get("textseg_demo")
    if not demo or demo.get("control") or (demo.get("real_reports") and default_reports_dir() is None):
        return {}
    pool = load_real_reports(default_reports_dir()) if demo.get("real_reports") else []
    zones = torch.from_numpy(np.stack([named_zones(demo["seed"], int(c.rsplit("_", 1)[1]) - 1, demo["image_size"],
                                                   pool) for c in data["heldout_ids"]]).astype(np.float32))[:, None]
    ref = data["heldout"][2].bool().numpy()
    if zones.shape[1:] != ref.shape[1:] or (ref & ~zones.bool().numpy()).any():
        return {}  # not the generator's cases (other size or report pool): no reference
    region = lesion_prone_region([r.ravel() for r in ref])
    inside = np.tile(region, len(ref)) if region is not None else None
    meta = json.loads((raw / "dataset.json").read_text())
    text_only_map = map_function("zonesTextOnly", raw, meta)
    text_only = torch.from_numpy(np.stack([text_only_map(c, raw / "labelsTr" / f"{c}{meta['file_ending']}")
                                           for c in data["heldout_ids"]]).astype(np.float32))
    out = {}
    for name, m in (("true zones", zones), ("true zones, blurred", blur_mask(zones, ref.shape[-1] / 16)),
                    ("true zones on the average lung, blurred", text_only[:, None] / 255)):
        scores = m.numpy().ravel()
        out[name] = {"heldout_real": {"auc": pixel_auc(scores, ref.ravel()), "auc_region": pixel_auc(
            scores[inside], ref.ravel()[inside]) if inside is not None else None}}
    return out


def main(argv: list[str] | None = None) -> int:
    from nnunetv2_textseg.paths import preprocessed_dataset_folder, raw_dataset_folder
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-d", required=True, help="dataset id or name (in $nnUNet_raw / $nnUNet_preprocessed)")
    p.add_argument("--runs", nargs="+", default=["", "cycle=0.1", "cycle=0.1,normalized=1", "mirror=0.5"])
    p.add_argument("--heldout", type=int, default=150, help="other training cases to score on")
    p.add_argument("--pseudo_labels", type=Path, default=None, help="predicted segmentations of report-only training "
                   "cases (outside the labelled split), for runs with pseudo=1")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "text_pathway_probe.json")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("TEXTSEG_PROBE_THREADS", "1")))
    data = load_cases(preprocessed_dataset_folder(a.d), raw_dataset_folder(a.d), a.heldout, a.pseudo_labels)
    rows = []
    print(f"{len(data['train_ids'])} labelled cases, {len(data['pseudo_ids'])} report-only cases with predicted "
          f"masks, {len(data['heldout'][0])} other training cases scored\n")
    print("| run | train AUC region (real) | held-out AUC real | shuffled | null | region real | shuffled | null | "
          "one-sided cases: named side brighter |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spec in a.runs:
        settings = {k: float(v) for k, v in (kv.split("=") for kv in spec.split(",") if kv)}
        settings = {k: int(v) if k in ("steps", "batch", "seed", "pseudo") else v for k, v in settings.items()}
        t0 = time.time()
        r = run(data, settings)
        rows.append({"run": spec or "default", "settings": settings, "seconds": time.time() - t0, **r})
        f = lambda k, m: "–" if r[k][m] is None else f"{r[k][m]:.3f}"  # noqa: E731
        side = "–" if r["heldout_side"] is None else \
            f"{r['heldout_side']['named_side_brighter']:.2f} of {r['heldout_side']['cases']}"
        print(f"| {spec or 'default'} | {f('train_real', 'auc_region')} | {f('heldout_real', 'auc')} | "
              f"{f('heldout_shuffled', 'auc')} | {f('heldout_null', 'auc')} | {f('heldout_real', 'auc_region')} | "
              f"{f('heldout_shuffled', 'auc_region')} | {f('heldout_null', 'auc_region')} | {side} |", flush=True)
    for name, r in zone_reference(raw_dataset_folder(a.d), data).items():
        rows.append({"run": name, "reference": True, **r})
        g = lambda m: "–" if r["heldout_real"][m] is None else f"{r['heldout_real'][m]:.3f}"  # noqa: E731
        print(f"| {name} (reference) | – | {g('auc')} | – | – | {g('auc_region')} | – | – | – |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"dataset": str(a.d), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
