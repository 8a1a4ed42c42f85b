"""Fast checks of the text plumbing shared by trainers and predictor (no training)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunetv2_textseg.cache import CacheError, TextEmbeddingCache, load_checked_cache, text_sha
from nnunetv2_textseg.encoders import EncoderSpec, TextEncoding, spec_to_dict
from nnunetv2_textseg.training.text_trainer import ENCODER_ENV, TextTrainingError, choose_encoder_spec


def _write_cache(folder, name, pooling="mean", max_length=128, reports=None):
    reports = reports or {"a": "left lung", "b": "right lung"}
    n = len(reports)
    spec = spec_to_dict(EncoderSpec(name, pooling, max_length))
    cache = TextEmbeddingCache(list(reports), [text_sha(t) for t in reports.values()], np.zeros((n, 4), np.float32),
                               np.zeros((n, 2, 4), np.float16), np.ones((n, 2), bool),
                               {"name_or_path": name, "config_sha": "x", "pooling": pooling, "max_length": max_length,
                                "dim": 4}, spec)
    return cache.save(folder / "text_embeddings" / f"{EncoderSpec(name, pooling, max_length).slug()}__Tr.npz")


def test_encoder_choice_default_single_cache_env_and_recorded(tmp_path, monkeypatch):
    monkeypatch.delenv(ENCODER_ENV, raising=False)
    default = EncoderSpec()
    assert choose_encoder_spec(tmp_path, default) == default  # nothing encoded yet
    _write_cache(tmp_path, "enc-a", pooling="cls", max_length=64)
    got = choose_encoder_spec(tmp_path, default)  # the only cache, with the pooling it was encoded with
    assert (got.name_or_path, got.pooling, got.max_length) == ("enc-a", "cls", 64)
    _write_cache(tmp_path, "enc-b")
    with pytest.raises(TextTrainingError, match=ENCODER_ENV):  # two caches, no choice: no guessing
        choose_encoder_spec(tmp_path, default)
    monkeypatch.setenv(ENCODER_ENV, "enc-a")
    assert choose_encoder_spec(tmp_path, default).pooling == "cls"  # env var picks its cache's settings
    recorded = {"name_or_path": "enc-b", "pooling": "mean", "max_length": 128}
    with pytest.raises(TextTrainingError, match="keeps its encoder"):  # a model never switches encoder
        choose_encoder_spec(tmp_path, default, recorded)
    monkeypatch.delenv(ENCODER_ENV)
    assert choose_encoder_spec(tmp_path, default, recorded).name_or_path == "enc-b"


def test_recorded_encoder_without_precision_is_float32(tmp_path, monkeypatch):
    """A model folder of an earlier version (no precision recorded) keeps training/validating with float32."""
    monkeypatch.delenv(ENCODER_ENV, raising=False)
    recorded = {"name_or_path": "enc-b", "pooling": "mean", "max_length": 128}
    assert choose_encoder_spec(tmp_path, EncoderSpec(), recorded).precision == "fp32"
    assert choose_encoder_spec(tmp_path, EncoderSpec(), dict(recorded, precision="bf16")).precision == "bf16"


def test_cache_of_another_configuration_is_refused(tmp_path):
    reports = {"a": "left lung", "b": "right lung"}
    path = _write_cache(tmp_path, "enc-a", pooling="cls", reports=reports)
    load_checked_cache(path, reports, spec=EncoderSpec("enc-a", "cls"))
    with pytest.raises(CacheError, match="another encoder configuration"):
        load_checked_cache(path, reports, spec=EncoderSpec("enc-a", "mean"))


def test_local_encoder_folders_with_the_same_name_get_different_caches(tmp_path):
    (tmp_path / "x" / "model").mkdir(parents=True)
    (tmp_path / "y" / "model").mkdir(parents=True)
    assert EncoderSpec(str(tmp_path / "x" / "model")).slug() != EncoderSpec(str(tmp_path / "y" / "model")).slug()


def test_token_rows_drop_padding_wherever_it_is():
    from nnunetv2_textseg.predictor import _one
    tokens = np.arange(2 * 4 * 3, dtype=np.float16).reshape(2, 4, 3)
    mask = np.array([[True, True, False, False], [False, False, True, True]])  # right and left padding
    enc = TextEncoding(np.zeros((2, 3), np.float32), tokens, mask)
    for i in range(2):
        pooled, tok, m = _one(enc, i)
        assert tok.shape == (2, 3) and bool(m.all())
        np.testing.assert_array_equal(tok.numpy(), tokens[i][mask[i]].astype(np.float32))


def test_prediction_report_table_keeps_literal_case_ids(tmp_path):
    from nnunetv2_textseg.reports import read_report_table
    f = tmp_path / "reports.csv"
    f.write_text("case_id,report\nmask_07,Lesion in the left lung.\ncase.v2,No infection.\n", encoding="utf-8")
    table = read_report_table(f)
    assert set(table.reports) == {"mask_07", "case.v2"}
    lvit = tmp_path / "lvit.csv"
    lvit.write_text("Image,Description\nmask_covid_1.png,Lesion in the right lung.\n", encoding="utf-8")
    assert list(read_report_table(lvit).reports) == ["covid_1"]  # foreign layout: name rules apply


class _LM:
    def __init__(self, regions=False, ignore=None):
        self.has_regions, self.has_ignore_label, self.ignore_label = regions, ignore is not None, ignore


def test_generation_target_ignores_the_ignore_label_and_handles_regions():
    from nnunetv2_textseg.training.biclip import nnUNetTrainerBiCLIP
    t = object.__new__(nnUNetTrainerBiCLIP)
    t.label_manager = _LM(ignore=3)
    target = torch.tensor([[[[0, 1], [3, 2]]]])
    fg, valid = nnUNetTrainerBiCLIP.lesion_mask(t, target)
    assert fg.tolist() == [[[[False, True], [False, True]]]] and valid.tolist() == [[[[True, True], [False, True]]]]
    t.label_manager = _LM(regions=True, ignore=9)
    regions = torch.tensor([[[[0, 1], [0, 0]], [[0, 0], [1, 0]], [[1, 0], [0, 0]]]])  # 2 regions + ignore channel
    fg, valid = nnUNetTrainerBiCLIP.lesion_mask(t, regions)
    assert fg.shape == (1, 1, 2, 2) and fg.tolist() == [[[[False, True], [True, False]]]]
    assert valid.tolist() == [[[[False, True], [True, True]]]]


def test_whole_case_term_only_where_the_patch_crops_the_images(monkeypatch):
    """_wholeCaseCropped: the whole-case term stays on where the planned patch is smaller than the median image and
    is switched off (weight 0, not logged, said in the log) where the patch covers it — there it trains as the
    default."""
    from types import SimpleNamespace
    from nnunetv2_textseg.training.text_trainer import nnUNetTrainerText
    from nnunetv2_textseg.training.variants import nnUNetTrainerBiCLIP_wholeCaseCropped as T
    monkeypatch.setattr(nnUNetTrainerText, "initialize", lambda self: None)  # only the switch is under test here
    for patch, median, crops in (([64, 64], [128, 128], True), ([64, 64], [64, 64], False),
                                 ([64, 64], [1, 64, 60], False), ([64, 64], [30, 64, 100], True)):
        t, log = object.__new__(T), []
        t.was_initialized, t.print_to_log_file = False, lambda *a, **k: log.append(" ".join(map(str, a)))
        t.configuration_manager = SimpleNamespace(patch_size=patch, median_image_size_in_voxels=median)
        t.unwrapped_network = lambda: SimpleNamespace(map_prior=None)
        assert t.patches_crop_images() is crops
        t.initialize()
        assert (t.lambda_whole_case, "whole_case" in t.aux_losses) == ((1.0, True) if crops else (0.0, False))
        assert any("covers the median image" in line for line in log) is not crops
    assert T.lambda_whole_case == 1.0 and "whole_case" in T.aux_losses  # the class keeps its defaults


def test_whole_case_generation_targets_pool_the_preprocessed_case_in_the_patient_frame(tmp_path):
    """BiCLIP's whole-case generation term: each training case's lesion share per map cell, pooled from nnU-Net's
    preprocessed segmentation (ignore label unlabelled, -1 background), read back where sample_patient_frame reads
    the map; the loss prefers the map with the lesion on the case's side, and the other side for a mirrored
    patient."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy
    from nnunetv2_textseg.patient_frame import patient_frame_dataset, position_channels, sample_patient_frame
    from nnunetv2_textseg.training.biclip import nnUNetTrainerBiCLIP
    seg_a = np.zeros((1, 1, 8, 8), np.int16)
    seg_a[..., :4, 5:] = 1  # upper right, 3/4 of the upper-right cell (asymmetric: a transpose shows)
    seg_a[..., 6:, :2] = 3  # ignore label, a quarter of the lower-left cell
    seg_b = np.full((1, 1, 8, 8), -1, np.int16)
    seg_b[..., 6:, 5:] = 2  # lower right
    for case, seg in (("a", seg_a), ("b", seg_b)):
        nnUNetDatasetNumpy.save_case(np.zeros((1, 1, 8, 8), np.float32), seg, {}, str(tmp_path / case))
    t = object.__new__(nnUNetTrainerBiCLIP)
    t.label_manager, t.device = _LM(ignore=3), torch.device("cpu")
    t.dataset_class = patient_frame_dataset(nnUNetDatasetNumpy)  # the trainer's, after initialize()
    t.preprocessed_dataset_folder, t.folder_with_segs_from_previous_stage = str(tmp_path), None
    t.training_case_ids, t.pseudo_activation, t.generation_source = ["a", "b"], "sigmoid", "fused"
    rows, lesion, labelled = t.whole_case_targets((2, 2))
    assert rows == {"a": 0, "b": 1} and lesion.shape == labelled.shape == (2, 1, 2, 2)
    torch.testing.assert_close(lesion[0, 0], torch.tensor([[0.0, 0.75], [0.0, 0.0]]))
    torch.testing.assert_close(labelled[0, 0], torch.tensor([[1.0, 1.0], [0.75, 1.0]]))
    torch.testing.assert_close(lesion[1, 0], torch.tensor([[0.0, 0.0], [0.0, 6 / 16]]))
    # at the image's own resolution, the map read at each pixel's patient-frame position is the mask again
    _, fine, _ = t.whole_case_targets((8, 8))
    read = sample_patient_frame(fine, torch.from_numpy(position_channels((8, 8)))[None].expand(2, -1, -1, -1))
    torch.testing.assert_close(read[0, 0], torch.from_numpy((seg_a[0, 0] == 1).astype(np.float32)))
    torch.testing.assert_close(read[1, 0], torch.from_numpy((seg_b[0, 0] == 2).astype(np.float32)))

    rows, lesion, labelled = t.whole_case_targets((2, 2))
    right_side = torch.tensor([[[[-4.0, 4.0], [-4.0, -4.0]]]])  # the lesion in case a's upper right
    candidates = {"as is": right_side, "left-right": right_side.flip(-1), "up-down": right_side.flip(-2)}
    t.patient_mirrored = torch.tensor([False])
    losses = {k: float(t.whole_case_generation_loss(v, ["a"])) for k, v in candidates.items()}
    assert min(losses, key=losses.get) == "as is", losses
    t.patient_mirrored = torch.tensor([True])  # the mirrored patient's lesion lies in the other half of the frame
    losses = {k: float(t.whole_case_generation_loss(v, ["a"])) for k, v in candidates.items()}
    assert min(losses, key=losses.get) == "left-right", losses
    with pytest.raises(TextTrainingError, match="batch_inputs"):  # a draw of another batch is never used
        t.whole_case_generation_loss(right_side.expand(2, -1, -1, -1), ["a", "b"])
    with pytest.raises(TextTrainingError, match="not training cases"):
        t.whole_case_generation_loss(right_side, ["c"])
    t.generation_source = "text"  # the term trains the map the U-Net reads, which is not G(t) then
    with pytest.raises(TextTrainingError, match="generation_source"):
        t.whole_case_generation_loss(right_side, ["a"])


def test_mirrored_patient_negates_the_column_channel_and_swaps_the_report_rows():
    """Mirrored-patient samples: only the patient-frame column channel changes sign (image, IAC view, row and inside
    channels untouched) and those samples read the laterality-swapped report's tokens; the others are unchanged."""
    from nnunetv2_textseg.training.biclip import nnUNetTrainerBiCLIP
    t = object.__new__(nnUNetTrainerBiCLIP)
    t.text_rows = {"a": 0, "b": 1}
    t.mirrored_tokens = torch.full((2, 4, 3), -1.0, dtype=torch.float16)
    t.mirrored_token_mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    data = torch.randn(2, 2 + 3, 8, 8)  # 1 image channel, 1 strong view, (row, column, inside)
    tokens, mask = torch.ones(2, 4, 3), torch.tensor([[True, True, False, False]] * 2)

    t.mirrored_patient = 1.0
    d, tok, m = t.mirror_patients(data, tokens, mask, ["b", "a"])
    assert torch.equal(d[:, 3], -data[:, 3]) and torch.equal(d[:, [0, 1, 2, 4]], data[:, [0, 1, 2, 4]])
    assert torch.equal(tok, torch.full((2, 4, 3), -1.0)) and tok.dtype == torch.float32
    assert m.tolist() == [[True, False, False, False], [True, True, True, False]]  # rows of b, then a

    t.mirrored_patient = 0.5
    torch.manual_seed(0)
    flips = []
    for _ in range(200):
        d, tok, m = t.mirror_patients(data, tokens, mask, ["a", "b"])
        flipped = (d[:, 3] != data[:, 3]).flatten(1).any(1)
        assert torch.equal(tok[:, 0, 0] < 0, flipped)  # the swapped report goes with the mirrored frame
        assert torch.equal(t.patient_mirrored, flipped)  # recorded for targets kept in the patient frame
        flips += flipped.tolist()
    assert 0.4 < np.mean(flips) < 0.6


def test_location_free_reports_replace_only_the_drawn_samples_report_rows():
    """Location-free samples read their location-free report's tokens and mask, half of them the bare finding's;
    the others, and the image, keep theirs; the share drawn follows ``location_free_reports``."""
    from nnunetv2_textseg.training.biclip import nnUNetTrainerBiCLIP
    t = object.__new__(nnUNetTrainerBiCLIP)
    t.text_rows = {"a": 0, "b": 1}
    t.location_free_tokens = torch.stack([torch.full((4, 3), -1.0), torch.full((4, 3), -2.0)]).half()
    t.location_free_token_mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    t.finding_only_tokens = torch.stack([torch.full((4, 3), -10.0), torch.full((4, 3), -20.0)]).half()
    t.finding_only_token_mask = torch.tensor([[True, False, False, False], [False, True, False, False]])
    tokens, mask = torch.ones(2, 4, 3), torch.tensor([[True, True, True, False]] * 2)
    t.location_free_reports = 1.0
    torch.manual_seed(0)
    seen = set()
    for _ in range(50):
        tok, m = t.strip_locations(tokens, mask, ["b", "a"])
        assert tok.dtype == torch.float32
        for i, key in enumerate(["b", "a"]):  # each sample reads one whole row of one of the two tables
            row = t.text_rows[key]
            value = float(tok[i, 0, 0])
            table, table_mask = ((t.location_free_tokens, t.location_free_token_mask) if value > -5
                                 else (t.finding_only_tokens, t.finding_only_token_mask))
            assert torch.equal(tok[i], table[row].float()) and torch.equal(m[i], table_mask[row])
            seen.add(value)
    assert seen == {-1.0, -2.0, -10.0, -20.0}
    t.location_free_reports = 0.25
    torch.manual_seed(0)
    picked, terse = [], []
    for _ in range(400):
        tok, m = t.strip_locations(tokens, mask, ["a", "b"])
        stripped = tok[:, 0, 0] < 0
        assert bool((tok[~stripped] == 1).all()) and bool(m[~stripped].eq(mask[~stripped]).all())
        picked += stripped.tolist()
        terse += (tok[stripped, 0, 0] < -5).tolist()
    assert 0.2 < np.mean(picked) < 0.3 and 0.4 < np.mean(terse) < 0.6
    t.finding_only_share = 0.0  # the earlier _locationFree variants: the place-free rewrite only, no second table
    del t.finding_only_tokens, t.finding_only_token_mask
    tok, m = t.strip_locations(tokens, mask.clone(), ["a", "b"])
    assert tok[:, 0, 0].tolist() in ([-1.0, -2.0], [1.0, -2.0], [-1.0, 1.0], [1.0, 1.0])
    t.location_free_reports = 1.0
    assert t.strip_locations(tokens, mask, ["a", "b"])[0][:, 0, 0].tolist() == [-1.0, -2.0]


def test_mirrored_patient_without_the_report_table_is_one_clear_error(tmp_path):
    """Swapping left and right needs the report texts: a cache used as is (no reportsTr.csv) is refused with the
    file to add, not a KeyError later in training."""
    from types import SimpleNamespace

    from nnunetv2_textseg.training.biclip import nnUNetTrainerBiCLIP
    t = object.__new__(nnUNetTrainerBiCLIP)
    t.plans_manager = SimpleNamespace(dataset_name="Dataset123_X")
    with pytest.raises(TextTrainingError, match=r"reportsTr\.csv.*Dataset123_X"):
        t._prepare_mirrored_reports(None, None, tmp_path, EncoderSpec())


def test_a_model_folder_keeps_its_network(tmp_path):
    """Continuing, validating or adding a fold to a model whose recorded network (report pathways, token maps, token
    window) differs from what the trainer class builds now is one error naming the folder, what differs and the way
    out; a model from before an entry existed is compared with that entry's old value; the same network passes."""
    from nnunetv2_textseg.training.biclip import nnUNetTrainerBiCLIP
    t = object.__new__(nnUNetTrainerBiCLIP)
    t.output_folder_base = str(tmp_path / "nnUNetTrainerBiCLIP__nnUNetPlans__2d")
    now = {**nnUNetTrainerBiCLIP.network_plans_entry(), "encoder": {}}
    assert now == {"report_pathways": 4, "token_maps": True, "token_window": 3, "map_prior": False,
                   "anatomy_gate": False, "deep_map": False, "text_adapters": True, "encoder": {}}
    t._check_same_network({}, now)  # no recorded entry: nothing to compare
    t._check_same_network(dict(now), now)
    with pytest.raises(TextTrainingError, match=r"nnUNetTrainerBiCLIP__nnUNetPlans__2d.*report_pathways: 1 there, 4 "
                                                r"now.*token_maps: False there.*nnUNetTrainerBiCLIP_endToEnd"):
        t._check_same_network({"encoder": {}, "network_version": 2}, now)  # an earlier default's plans
    mapped = {"report_pathways": 4, "token_maps": True, "token_window": 3, "text_adapters": True}  # the default's
    with pytest.raises(TextTrainingError, match=r"token_window: 1 there, 3 now"):
        t._check_same_network({**mapped, "token_window": 1}, now)
    with pytest.raises(TextTrainingError, match=r"map_prior: True there, False now"):  # a _mapPrior model's folder
        t._check_same_network({**mapped, "map_prior": True}, now)
    with pytest.raises(TextTrainingError, match=r"anatomy_gate: True there, False now"):  # an _anatomyGate model
        t._check_same_network({**mapped, "anatomy_gate": True}, now)
    with pytest.raises(TextTrainingError, match=r"deep_map: True there, False now"):  # a _deepMap model's folder
        t._check_same_network({**mapped, "deep_map": True}, now)
    # the map-only default up to fc1398c (text_adapters recorded False, or not yet recorded): its own variant
    for earlier in ({**mapped, "text_adapters": False}, {"report_pathways": 4, "token_maps": True, "token_window": 3}):
        with pytest.raises(TextTrainingError, match=r"text_adapters: False there, True now.*BiCLIP_mapOnly \(the"):
            t._check_same_network(earlier, now)
    with pytest.raises(TextTrainingError, match=r"text_adapters: False there.*the trainer variant that matches it"):
        t._check_same_network({**mapped, "text_adapters": False, "anatomy_gate": True}, now)  # an _anatomyGate model
    t._check_same_network(mapped, now)  # before map_prior, anatomy_gate and deep_map were recorded
