"""Bad input and safety (issue 12): every test calls the real code with a harmful or damaged input and checks
the message (what, where, how to fix) and that the user's files are unchanged.

1. nnUNetv2_textseg_degrade: an output folder that contains (or is inside) the input is refused; --overwrite
   deletes only the files the tool wrote itself (its manifest), never the user's.
2. nnUNetv2_textseg_convert_pretrained: never replaces its own input; loads checkpoints with weights_only=True;
   a corrupt checkpoint is one error line.
3. Embedding caches are validated on load (shapes, row counts, finite values).
4. A cache's recorded spec never switches trust_remote_code on.
5. Reports longer than max_length are truncated with a warning.
6. Atomically written outputs respect the umask.
"""
from __future__ import annotations

import hashlib
import json
import os

# Never touch the network: set before transformers / huggingface_hub are imported here.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_textseg.cache import CacheError, TextEmbeddingCache, build_or_update_cache, cache_folder
from nnunetv2_textseg.encoders import (EncoderError, EncoderSpec, ReportTruncationWarning, TextEncoder,
                                       bundled_minilm_path, load_encoder, spec_from_record, spec_to_dict)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (what must survive untouched)."""
    return {str(p.relative_to(root)): _sha(p) for p in sorted(Path(root).rglob("*")) if p.is_file()}


# =========================================================================================
# 1. nnUNetv2_textseg_degrade
# =========================================================================================
def _png_folder(folder: Path, names=("case_000_0000.png", "case_001_0000.png")) -> Path:
    import SimpleITK as sitk
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        sitk.WriteImage(sitk.GetImageFromArray(rng.integers(0, 255, (24, 24), dtype=np.uint8)), str(folder / name))
    return folder


def _raw_dataset_layout(root: Path) -> Path:
    """D/imagesTs + D/labelsTs + D/dataset.json + D/reportsTs.csv, as a user's raw dataset looks."""
    d = root / "Dataset500_X"
    _png_folder(d / "imagesTs")
    _png_folder(d / "labelsTs", names=("case_000.png", "case_001.png"))
    (d / "dataset.json").write_text(json.dumps({"file_ending": ".png"}))
    (d / "reportsTs.csv").write_text("case_id,report\ncase_000,a\ncase_001,b\n")
    return d


def test_degrade_refuses_output_that_contains_the_input_and_keeps_the_dataset(tmp_path, capsys):
    """The reported data loss: ``-i D/imagesTs -o D --overwrite`` run twice deleted all of D."""
    from nnunetv2_textseg.robustness import degrade_main

    d = _raw_dataset_layout(tmp_path)
    before = _tree(d)
    for _ in range(2):
        with pytest.raises(SystemExit) as e:
            degrade_main(["-i", str(d / "imagesTs"), "-o", str(d), "--kind", "gaussian", "--level", "0.1",
                          "--overwrite"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        error_lines = [line for line in err.splitlines() if "error:" in line]
        assert len(error_lines) == 1, err
        assert f"Output folder {d} contains the input folder {d / 'imagesTs'}" in error_lines[0]
        assert "separate folder" in error_lines[0]  # the fix
        assert _tree(d) == before
    # a folder further up as well
    with pytest.raises(SystemExit):
        degrade_main(["-i", str(d / "imagesTs"), "-o", str(tmp_path), "--kind", "gaussian", "--level", "0.1",
                      "--overwrite"])
    assert "contains the input folder" in capsys.readouterr().err
    assert _tree(d) == before


def test_degrade_refuses_output_inside_input_also_through_a_symlink(tmp_path):
    from nnunetv2_textseg.robustness import degrade_folder

    src = _png_folder(tmp_path / "imagesTs")
    before = _tree(src)
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    with pytest.raises(ValueError, match="is the input folder.*separate folder"):
        degrade_folder(src, link, "gaussian", 0.1, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="lies inside the input folder"):
        degrade_folder(src, link / "sub", "gaussian", 0.1, overwrite=True, progress=False)
    (tmp_path / "up").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ValueError, match="contains the input folder"):
        degrade_folder(src, tmp_path / "up", "gaussian", 0.1, overwrite=True, progress=False)
    assert _tree(src) == before and not (src / "sub").exists()


def test_degrade_overwrite_deletes_only_files_it_wrote(tmp_path):
    """In a folder the user made, --overwrite removes the tool's earlier outputs (also cases no longer in the
    input) but never the user's own files, whatever their names."""
    from nnunetv2_textseg.robustness import DEGRADATION_FILE, degrade_folder

    src = _png_folder(tmp_path / "imagesTs", names=("a_0000.png", "b_0000.png", "c_0000.png"))
    (src / "reports.csv").write_text("case_id,report\na,x\nb,y\nc,z\n")
    out = tmp_path / "results"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    _png_folder(out, names=("mine_0000.png",))  # the user's own image, same ending as ours
    (out / "sub" / "keep.png").write_bytes(b"keep")
    user_files = _tree(out)
    src_before = _tree(src)

    degrade_folder(src, out, "gaussian", 0.1, overwrite=True, progress=False)
    (src / "c_0000.png").unlink()  # a case dropped from the input: its degraded copy is now stale
    src_before.pop("c_0000.png")
    degrade_folder(src, out, "gaussian", 0.2, overwrite=True, progress=False)
    now = _tree(out)
    assert {k: now.get(k) for k in user_files} == user_files  # every user file still there, unchanged
    assert _tree(src) == src_before
    assert not (out / "c_0000.png").exists()
    assert (out / "a_0000.png").is_file() and (out / "b_0000.png").is_file()
    meta = json.loads((out / DEGRADATION_FILE).read_text())
    assert sorted(meta["written_files"]) == sorted(["a_0000.png", "b_0000.png", "reports.csv", DEGRADATION_FILE])
    assert meta["created_output_folder"] is False


def test_degrade_manifest_cannot_name_files_outside_the_folder(tmp_path):
    """A (hand-edited or foreign) degradation.json naming other paths deletes nothing outside the folder."""
    from nnunetv2_textseg.robustness import DEGRADATION_FILE, degrade_folder

    src = _png_folder(tmp_path / "imagesTs")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "x.txt").write_text("x")
    (out / DEGRADATION_FILE).write_text(json.dumps({
        "files": {"../victim.txt": {}, str(victim): {}, "data": {}},
        "written_files": ["../victim.txt", str(victim), "data", "..", "."], "created_output_folder": False}))
    degrade_folder(src, out, "gaussian", 0.1, overwrite=True, progress=False)
    assert victim.read_text() == "precious" and (out / "data" / "x.txt").read_text() == "x"


def test_degrade_legacy_record_deletes_only_its_listed_files(tmp_path):
    """A degradation.json of an older version (no manifest) is not a licence to clear the folder."""
    from nnunetv2_textseg.robustness import DEGRADATION_FILE, degrade_folder

    src = _png_folder(tmp_path / "imagesTs", names=("a_0000.png",))
    out = _png_folder(tmp_path / "out", names=("old_0000.png", "user_0000.png"))
    (out / "user.txt").write_text("mine")
    (out / DEGRADATION_FILE).write_text(json.dumps({"files": {"old_0000.png": {"psnr": 1.0}}, "reports": None}))
    keep = {k: v for k, v in _tree(out).items() if k in ("user_0000.png", "user.txt")}
    degrade_folder(src, out, "gaussian", 0.1, overwrite=True, progress=False)
    assert not (out / "old_0000.png").exists()
    assert {k: _sha(out / k) for k in keep} == keep


# =========================================================================================
# 2. nnUNetv2_textseg_convert_pretrained
# =========================================================================================
def _nnunet_like_checkpoint() -> dict:
    """What nnU-Net's save_checkpoint writes: state dicts, its logger (numpy floats), init args (a torch.device),
    a tuple of axes."""
    from nnunetv2.training.logging.nnunet_logger import LocalLogger

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.InstanceNorm2d(4, affine=True), torch.nn.Conv2d(4, 2, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    net(torch.randn(1, 1, 8, 8)).sum().backward()
    opt.step()
    logger = LocalLogger()  # what nnU-Net's MetaLogger.get_checkpoint returns
    for epoch in range(2):
        logger.log("mean_fg_dice", np.float64(0.5 + epoch / 10), epoch)
        logger.log("dice_per_class_or_region", [np.float64(0.4), np.float32(0.6)], epoch)
        logger.log("train_losses", np.float32(-0.3), epoch)
        logger.log("val_losses", np.float64(-0.2), epoch)
        logger.log("lrs", 0.01, epoch)
        logger.log("epoch_start_timestamps", 1.0, epoch)
        logger.log("epoch_end_timestamps", 2.0, epoch)
    return {"network_weights": net.state_dict(), "optimizer_state": opt.state_dict(), "grad_scaler_state": None,
            "logging": logger.get_checkpoint(), "_best_ema": np.float64(0.55), "current_epoch": 2,
            "init_args": {"plans": {"plans_name": "nnUNetPlans", "configurations": {"2d": {"patch_size": [8, 8]}}},
                          "configuration": "2d", "fold": 0, "dataset_json": {"file_ending": ".png"},
                          "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1)}


def test_nnunet_checkpoint_loads_with_weights_only(tmp_path):
    from nnunetv2_textseg.pretrained import load_checkpoint_safely

    ckpt = _nnunet_like_checkpoint()
    path = tmp_path / "checkpoint_final.pth"
    torch.save(ckpt, path)
    loaded = load_checkpoint_safely(path)
    assert loaded.keys() == ckpt.keys()
    for k, v in ckpt["network_weights"].items():
        torch.testing.assert_close(loaded["network_weights"][k], v)
    assert loaded["logging"]["mean_fg_dice"] == ckpt["logging"]["mean_fg_dice"]
    assert loaded["init_args"] == ckpt["init_args"] and loaded["_best_ema"] == ckpt["_best_ema"]


def _make_dir(path: str) -> None:  # what a malicious pickle would run on load (module level: picklable)
    os.mkdir(path)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _make_dir, (self.marker,)


def _convert_cli(capsys, *args: str) -> tuple[int, str]:
    from nnunetv2_textseg.cli import _run, convert_pretrained_main
    rc = _run(convert_pretrained_main, ["-d", "999", *args])
    return rc, capsys.readouterr().err


def test_convert_refuses_pickled_python_objects_without_running_them(tmp_path, capsys):
    ckpt = _nnunet_like_checkpoint()
    marker = tmp_path / "EXECUTED"
    ckpt["extra"] = _Payload(marker)
    path = tmp_path / "evil.pth"
    torch.save(ckpt, path)
    before = _sha(path)
    rc, err = _convert_cli(capsys, "-i", str(path), "-o", str(tmp_path / "out.pth"))
    assert rc == 2 and not marker.exists(), err  # refused, and the payload never ran
    assert err.count("\n") == 1 and err.startswith("ERROR: ") and "Traceback" not in err
    assert str(path) in err and "non-tensor Python objects" in err and "not unpickled, for safety" in err
    assert _sha(path) == before and not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_convert_corrupt_checkpoint_is_one_error_line(tmp_path, capsys, damage):
    good = tmp_path / "good.pth"
    torch.save(_nnunet_like_checkpoint(), good)
    data = good.read_bytes()
    path = tmp_path / "checkpoint_final.pth"
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x80\x02not a checkpoint",
                      "empty": b""}[damage])
    before = _sha(path)
    rc, err = _convert_cli(capsys, "-i", str(path), "-o", str(tmp_path / "out.pth"))
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"ERROR: {path} is not an nnU-Net checkpoint" in err and "checkpoint_final.pth" in err
    assert _sha(path) == before and not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("how", ["same path", "other spelling", "symlink", "hardlink"])
def test_convert_refuses_to_overwrite_its_input(tmp_path, capsys, how):
    """``-i X.pth -o X.pth --overwrite`` would replace the user's only plain checkpoint."""
    src = tmp_path / "models" / "checkpoint_final.pth"
    src.parent.mkdir()
    torch.save(_nnunet_like_checkpoint(), src)
    before = _sha(src)
    if how == "same path":
        out = src
    elif how == "other spelling":
        (tmp_path / "sub").mkdir()
        out = tmp_path / "sub" / ".." / "models" / "checkpoint_final.pth"
    elif how == "symlink":
        out = tmp_path / "link.pth"
        out.symlink_to(src)
    else:
        out = tmp_path / "hard.pth"
        os.link(src, out)
    rc, err = _convert_cli(capsys, "-i", str(src), "-o", str(out), "--overwrite")
    assert rc == 2 and err.count("\n") == 1, err
    assert f"-o {out} is the input checkpoint -i {src} itself" in err and "Choose another output file" in err
    assert _sha(src) == before


# =========================================================================================
# 3./4. embedding caches
# =========================================================================================
def _cache(n: int = 3, dim: int = 4, length: int = 5, spec: dict | None = None) -> TextEmbeddingCache:
    rng = np.random.default_rng(0)
    mask = np.zeros((n, length), bool)
    mask[:, :3] = True
    return TextEmbeddingCache([f"case_{i}" for i in range(n)], [f"{i:064x}" for i in range(n)],
                              rng.normal(size=(n, dim)).astype(np.float32),
                              rng.normal(size=(n, length, dim)).astype(np.float16), mask,
                              {"name_or_path": "enc", "config_sha": "0", "pooling": "mean", "max_length": 8,
                               "dim": dim}, spec or spec_to_dict(EncoderSpec("enc", max_length=8)))


def _damaged(kind: str) -> TextEmbeddingCache:
    c = _cache()
    if kind == "pooled rows":
        c.pooled = c.pooled[:2]
    elif kind == "tokens rows":
        c.tokens = c.tokens[:2]
    elif kind == "tokens dim":
        c.tokens = c.tokens[..., :3]
    elif kind == "mask shape":
        c.mask = c.mask[:, :4]
    elif kind == "hash count":
        c.text_sha = c.text_sha[:2]
    elif kind == "nan pooled":
        c.pooled[1, 2] = np.nan
    elif kind == "inf tokens":
        c.tokens[2, 0, 1] = np.inf
    elif kind == "duplicate ids":
        c.case_ids = ["case_0", "case_0", "case_2"]
    elif kind == "dim record":
        c.identity = dict(c.identity, dim=7)
    return c


@pytest.mark.parametrize("kind, detail", [
    ("pooled rows", "'pooled' has shape (2, 4), expected (3, D) for 3 case ids"),
    ("tokens rows", "'tokens' has shape (2, 5, 4), expected (3, L, 4)"),
    ("tokens dim", "'tokens' has shape (3, 5, 3), expected (3, L, 4)"),
    ("mask shape", "'mask' has shape (3, 4), expected (3, 5)"),
    ("hash count", "2 report hashes for 3 case ids"),
    ("nan pooled", "'pooled' holds 1 non-finite value(s)"),
    ("inf tokens", "'tokens' holds 1 non-finite value(s)"),
    ("duplicate ids", "1 duplicate case id(s)"),
    ("dim record", "embeddings have 4 dimensions, its encoder record says 7"),
])
def test_damaged_cache_is_refused_on_load(tmp_path, kind, detail):
    path = _damaged(kind).save(tmp_path / "enc__mean8__Tr.npz")  # save() writes what it is given
    before = _sha(path)
    with pytest.raises(CacheError) as e:
        TextEmbeddingCache.load(path)
    msg = str(e.value)
    assert f"The text embedding cache {path} is damaged: {detail}" in msg
    assert "Delete it and run nnUNetv2_textseg_encode again" in msg
    # updating it is refused the same way, and the file stays as it was
    with pytest.raises(CacheError, match="is damaged"):
        build_or_update_cache({"case_0": "x"}, path, spec=EncoderSpec("enc", max_length=8), progress=False)
    assert _sha(path) == before


def test_cache_with_pickled_objects_is_never_unpickled(tmp_path):
    marker = tmp_path / "EXECUTED"
    good = _cache().save(tmp_path / "good.npz")
    with np.load(good, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["case_ids"] = np.array([_Payload(marker), "case_1", "case_2"], dtype=object)
    path = tmp_path / "evil.npz"
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(CacheError, match=r"Cannot read the text embedding cache .*evil\.npz.*Delete it"):
        TextEmbeddingCache.load(path)
    assert not marker.exists()


def test_valid_cache_still_loads(tmp_path):
    c = _cache()
    loaded = TextEmbeddingCache.load(c.save(tmp_path / "c.npz"))
    assert loaded.case_ids == c.case_ids and np.array_equal(loaded.pooled, c.pooled)
    assert np.array_equal(loaded.tokens, c.tokens) and np.array_equal(loaded.mask, c.mask)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A 1-layer, 32-d BERT with MiniLM's tokenizer, saved like any downloaded model folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    folder = tmp_path_factory.mktemp("tiny_bert")
    tok = BertTokenizerFast.from_pretrained(str(bundled_minilm_path()))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def remote_code_model(tiny_dir, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A model folder whose architecture exists only as its own code; that code, if run, creates a marker."""
    import transformers.dynamic_module_utils as dmu
    marker = tmp_path / "EXECUTED"
    monkeypatch.setenv("TEXTSEG_TEST_MARKER", str(marker))
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
        monkeypatch.delitem(sys.modules, name)
    dst = tmp_path / "remote_model"
    shutil.copytree(tiny_dir, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(auto_map={"AutoConfig": "custom_model.CustomConfig", "AutoModel": "custom_model.CustomModel"},
               model_type="cxr-bert-test")
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "custom_model.py").write_text("import os, pathlib\n"
                                         "pathlib.Path(os.environ['TEXTSEG_TEST_MARKER']).write_text('executed')\n"
                                         "raise RuntimeError('custom code executed')\n")
    return dst, marker


def test_cache_record_never_turns_on_remote_code(tmp_path, remote_code_model, monkeypatch):
    """A cache .npz recording trust_remote_code=True must not make anything run the model's code: only the
    user's explicit opt-in for this run does."""
    from nnunetv2_textseg.training.text_trainer import (ENCODER_ENV, TRUST_ENV, TextTrainingError,
                                                        choose_encoder_spec)

    model, marker = remote_code_model
    monkeypatch.delenv(TRUST_ENV, raising=False)
    monkeypatch.delenv(ENCODER_ENV, raising=False)
    pre = tmp_path / "pre"
    record = dict(spec_to_dict(EncoderSpec(str(model))), trust_remote_code=True)
    path = _cache(spec=record).save(cache_folder(pre) / "remote__mean128__Tr.npz")
    before = _sha(path)
    cache = TextEmbeddingCache.load(path)

    # encoders: a recorded dict never opts in
    assert spec_from_record(cache.spec).trust_remote_code is False
    with pytest.raises(EncoderError, match="pass --trust_remote_code"):
        load_encoder(cache.spec)
    # training: the dataset's only cache chooses the encoder, but not remote code
    try:
        chosen = choose_encoder_spec(pre, EncoderSpec())
    except TextTrainingError as e:  # refused outright, naming the opt-in
        assert TRUST_ENV in str(e) and str(model) in str(e)
    else:
        assert chosen.name_or_path == str(model) and chosen.trust_remote_code is False
        with pytest.raises(EncoderError, match="pass --trust_remote_code"):
            TextEncoder(chosen)
    assert not marker.exists() and _sha(path) == before
    # the user's own, explicit choice still counts
    assert spec_from_record(cache.spec, trust_remote_code=True).trust_remote_code is True
    monkeypatch.setenv(TRUST_ENV, "1")
    assert choose_encoder_spec(pre, EncoderSpec()).trust_remote_code is True


# =========================================================================================
# 5. truncation of long reports
# =========================================================================================
def _text_of_tokens(tokenizer, n: int) -> str:
    """A text that the tokenizer turns into exactly ``n`` tokens (special tokens included)."""
    text = " ".join(["lung"] * (n - 2))
    assert len(tokenizer(text)["input_ids"]) == n
    return text


def test_long_reports_are_truncated_with_a_warning(tiny_dir):
    enc = TextEncoder(EncoderSpec(str(tiny_dir), max_length=8))
    at_limit = _text_of_tokens(enc.tokenizer, 8)
    long = _text_of_tokens(enc.tokenizer, 20)
    longer = _text_of_tokens(enc.tokenizer, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReportTruncationWarning)
        enc.encode(["short.", at_limit])  # fits: no warning
    with pytest.warns(ReportTruncationWarning) as caught:
        out = enc.encode(["short.", long, at_limit, long, longer])
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "\n" not in msg
    assert "3 of 5 report(s) are longer than the text encoder's max_length of 8 tokens" in msg
    assert "--max_length N" in msg and "at most 512" in msg
    assert out.mask.shape[1] == 8 and out.mask[1].sum() == 8


def test_encode_cli_warns_in_one_line_and_takes_max_length(tiny_dir, tmp_path, monkeypatch, capsys):
    from nnunetv2_textseg.cli import encode_main
    from nnunetv2_textseg.reports import ReportTable, reports_path

    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / k).mkdir()
        monkeypatch.setenv(k, str(tmp_path / k))
    tok = TextEncoder(EncoderSpec(str(tiny_dir))).tokenizer
    reports = {"a": "short.", "b": _text_of_tokens(tok, 30), "c": _text_of_tokens(tok, 12)}
    folder = tmp_path / "nnUNet_raw" / "Dataset991_X"
    (folder / "imagesTr").mkdir(parents=True)
    for case in reports:
        (folder / "imagesTr" / f"{case}_0000.png").write_bytes(b"")
    ReportTable(reports).write(reports_path(folder, "Tr"))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "X"}, "labels": {"background": 0, "x": 1},
                                                     "numTraining": 3, "file_ending": ".png"}))
    table = _sha(reports_path(folder, "Tr"))
    encode_main(["-d", "991", "--encoder", str(tiny_dir), "--max_length", "10"])
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "max_length" in line]
    assert warning == [line for line in captured.err.splitlines() if line.startswith("WARNING: ")]
    assert len(warning) == 1 and warning[0].startswith("WARNING: 2 of 3 report(s)") and "max_length of 10" in warning[0]
    assert "nnUNetv2_textseg_encode --max_length N" in warning[0]
    assert "(3 report(s) encoded now)" in captured.out and _sha(reports_path(folder, "Tr")) == table
    # raising it as the message says: no warning any more
    encode_main(["-d", "991", "--encoder", str(tiny_dir), "--max_length", "40"])
    assert "WARNING" not in capsys.readouterr().err


# =========================================================================================
# 6. file modes of atomically written outputs
# =========================================================================================
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_respect_the_umask(tmp_path, umask):
    from nnunetv2_textseg.reports import ReportTable

    old = os.umask(umask)
    try:
        cache = _cache().save(tmp_path / "c.npz")
        table = tmp_path / "reportsTr.csv"
        ReportTable({"a": "x"}).write(table)
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what open() gives a new file under this umask
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert (plain.stat().st_mode & 0o777) == expected
    assert (cache.stat().st_mode & 0o777) == expected
    assert (table.stat().st_mode & 0o777) == expected
