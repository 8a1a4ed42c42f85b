"""Start a text trainer from a plain nnU-Net model (``nnUNetv2_train ... -pretrained_weights``).

nnU-Net's ``load_pretrained_weights`` requires every parameter of the new network to be in the file,
with the same shape. A text network holds nnU-Net's planned U-Net under ``unet.`` plus text modules,
and its U-Net takes more input channels (BiCLIP: the pseudo-image and the position channels; MedCLIPSeg: the
position channels), so a plain checkpoint cannot be loaded as is. :func:`convert_plain_checkpoint` writes a file
that can: the plain U-Net's weights under ``unet.``, the extra input channels' weights set to zero (the converted
U-Net's features are exactly the plain one's, whatever the pseudo-image and position, and it learns to use them
during fine-tuning), and the text
modules at their fresh initialisation (zero-initialised gates and FiLM stay zero). As for any
``-pretrained_weights``, nnU-Net itself re-initialises the segmentation layers (``.seg_layers.``).
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch

from nnunetv2_textseg.training.text_trainer import PLANS_KEY, TextTrainingError, nnUNetTrainerText
from nnunetv2_textseg.training.variants import text_trainer_class


class PretrainedConversionError(TextTrainingError):
    """The plain checkpoint does not fit the text trainer's network; the message says why and what to do."""


def _one_line(e: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (torch's unpickling errors run over many lines)."""
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "").split(". ")[0]
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _numpy_safe_globals() -> list:
    """numpy scalar/array/dtype reconstructors: nnU-Net logs numpy floats into its checkpoints (``logging``).
    Rebuilding a numpy scalar or array from its dtype and bytes runs no user code, unlike arbitrary pickled
    objects (the elements of an object array still pass the same restricted unpickler)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    found = [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes through their classes
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)]
    return found


def load_checkpoint_safely(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)``: tensors, dicts, lists, numbers and strings (plus numpy scalars),
    never arbitrary pickled Python objects, so loading a checkpoint cannot run code.

    Errors name the file in one line: unreadable/truncated files, and files holding other Python objects
    (which are refused, not unpickled)."""
    path = Path(path)
    kwargs = dict(map_location="cpu", weights_only=True)
    try:
        safe = getattr(torch.serialization, "safe_globals", None)
        if safe is not None:
            with safe(_numpy_safe_globals()):
                ckpt = torch.load(path, **kwargs)
        else:
            ckpt = torch.load(path, **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported (?:global|class)[: ]*(?:GLOBAL )?([\w.<>]+)", str(e))
        if found:  # a Python object the safe unpickler refuses to rebuild
            raise PretrainedConversionError(
                f"{path} contains non-tensor Python objects (e.g. {found.group(1)}); they are not unpickled, for "
                f"safety (unpickling can run arbitrary code). Give a plain nnU-Net checkpoint "
                f"(fold_X/checkpoint_final.pth), which holds only tensors, dicts, lists, numbers and strings.") from None
        raise PretrainedConversionError(f"{path} is not an nnU-Net checkpoint (not a readable torch file: truncated "
                                        f"or corrupt?); give a model folder's fold_X/checkpoint_final.pth.") from None
    except Exception as e:  # not a torch file, truncated, corrupt
        raise PretrainedConversionError(f"{path} is not an nnU-Net checkpoint ({_one_line(e)}; truncated or "
                                        f"corrupt?); give a model folder's fold_X/checkpoint_final.pth.") from None
    if not isinstance(ckpt, dict):
        raise PretrainedConversionError(f"{path} is not an nnU-Net checkpoint (it holds a {type(ckpt).__name__}, "
                                        f"not a dict); give a model folder's fold_X/checkpoint_final.pth.")
    return ckpt


def _text_in_dim(trainer: type[nnUNetTrainerText], preprocessed: Path) -> dict:
    """The text-plans entry the trainer will record: the encoder it will choose (same rules as training)."""
    from nnunetv2_textseg.cache import TextEmbeddingCache, cache_path
    from nnunetv2_textseg.encoders import TextEncoder
    from nnunetv2_textseg.training.text_trainer import choose_encoder_spec

    spec = choose_encoder_spec(preprocessed, trainer.text_encoder, None)
    path = cache_path(preprocessed, spec, "Tr")
    from nnunetv2_textseg.patient_frame import POSITION_CHANNELS
    from nnunetv2_textseg.training.text_trainer import NETWORK_VERSION

    dim = TextEmbeddingCache.load(path).identity["dim"] if path.is_file() else TextEncoder(spec).dim
    return {"text_in_dim": int(dim), "position_channels": POSITION_CHANNELS if trainer.patient_frame else 0,
            "network_version": NETWORK_VERSION, **trainer.network_plans_entry()}


def convert_plain_checkpoint(plain_checkpoint: str | Path, trainer_name: str, dataset: str | int,
                             configuration: str = "2d", plans_identifier: str = "nnUNetPlans") -> dict:
    """A ``-pretrained_weights`` file content ({"network_weights": ...}) for ``trainer_name`` on this
    dataset's plans, made from a plain nnU-Net checkpoint of the same plans and configuration."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_textseg.paths import preprocessed_dataset_folder

    plain_checkpoint = Path(plain_checkpoint)
    if not plain_checkpoint.is_file():
        raise PretrainedConversionError(f"No checkpoint {plain_checkpoint}; give a plain nnU-Net model's "
                                        f"checkpoint_final.pth (or checkpoint_best.pth).")
    ckpt = load_checkpoint_safely(plain_checkpoint)
    try:
        plain = ckpt["network_weights"]
        if not isinstance(plain, dict) or not all(isinstance(v, torch.Tensor) for v in plain.values()):
            raise TypeError("'network_weights' is not a dict of tensors")
    except Exception as e:  # a torch file, but not an nnU-Net checkpoint
        raise PretrainedConversionError(f"{plain_checkpoint} is not an nnU-Net checkpoint ({_one_line(e)}); "
                                        f"give a model folder's fold_X/checkpoint_final.pth.") from None
    try:
        trainer = text_trainer_class(trainer_name)
    except KeyError as e:
        raise PretrainedConversionError(e.args[0]) from None
    if any(k.startswith("unet.") for k in plain):
        raise PretrainedConversionError(
            f"{plain_checkpoint} was written by a text trainer ({ckpt.get('trainer_name', '?')}), not by plain "
            f"nnU-Net: pass it to -pretrained_weights directly if it is the same trainer, no conversion needed.")
    init = ckpt.get("init_args", {})
    if init.get("configuration") not in (None, configuration):
        raise PretrainedConversionError(
            f"{plain_checkpoint} is a {init['configuration']!r} model, the text trainer trains {configuration!r}: "
            f"convert a model of the same configuration (text trainers use nnU-Net's 2d configuration).")

    pre = preprocessed_dataset_folder(dataset)
    plans_file = pre / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise PretrainedConversionError(f"No plans {plans_file}; run nnUNetv2_plan_and_preprocess -d {dataset} first.")
    plans = PlansManager(json.loads(plans_file.read_text()))
    config = plans.get_configuration(configuration)
    dataset_json = json.loads((pre / "dataset.json").read_text())
    plans.plans[PLANS_KEY] = _text_in_dim(trainer, pre)
    channels = determine_num_input_channels(plans, config, dataset_json)
    heads = plans.get_label_manager(dataset_json).num_segmentation_heads
    with torch.random.fork_rng():  # the text modules' initialisation, reproducibly, without touching the caller's RNG
        torch.manual_seed(0)
        net = trainer.build_network_architecture(plans, config, channels, heads, True)
    target = net.state_dict()
    first, conv = next((n, m) for n, m in net.unet.named_modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
    unet_in = conv.in_channels  # image channels (+ pseudo-image and position channels)
    plain = {_strip_wrappers(k): v for k, v in plain.items()}
    plain_in = plain.get(f"{first}.weight")
    if plain_in is not None and plain_in.shape[1] != channels:
        raise PretrainedConversionError(
            f"{plain_checkpoint} takes {plain_in.shape[1]} input channel(s), dataset {dataset} has {channels}: "
            f"convert a plain model trained on this dataset's plans.")

    out, mismatched = dict(target), []
    for key, value in plain.items():
        name = "unet." + key
        if name not in target:
            mismatched.append(f"{key}: not in the {trainer_name} network")
            continue
        want = target[name]
        if value.shape == want.shape:
            out[name] = value.to(want.dtype)
        elif (unet_in > channels and value.ndim == want.ndim >= 3 and value.shape[1] == channels
              and want.shape[1] == unet_in and value.shape[0] == want.shape[0] and value.shape[2:] == want.shape[2:]):
            padded = torch.zeros_like(want)  # an input conv: the added channels start with no influence
            padded[:, :channels] = value.to(want.dtype)
            out[name] = padded
        elif ".seg_layers." in key:
            continue  # another label set: nnU-Net does not transfer segmentation layers anyway
        else:
            mismatched.append(f"{key}: {tuple(value.shape)} in the plain model, {tuple(want.shape)} here")
    missing = [k[len("unet."):] for k in target if k.startswith("unet.") and k[len("unet."):] not in plain]
    if mismatched or missing:
        detail = "; ".join(mismatched[:3] + [f"{k}: missing in the plain model" for k in missing[:3]])
        raise PretrainedConversionError(
            f"{plain_checkpoint} does not fit {trainer_name} on {plans_file.name}/{configuration} ({detail}"
            f"{' ...' if len(mismatched) + len(missing) > 3 else ''}). Convert a plain model trained with the same "
            f"plans (-p {plans_identifier}) and configuration on this dataset.")
    return {"network_weights": out, "textseg_converted_from": str(plain_checkpoint.resolve()),
            "trainer_name": trainer_name, "plain_trainer_name": ckpt.get("trainer_name")}


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Same file: same resolved path, or (both existing) the same inode, e.g. a hard link or a symlink."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _strip_wrappers(key: str) -> str:
    """Parameter name without DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes."""
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def write_converted(plain_checkpoint: str | Path, output: str | Path, trainer_name: str, dataset: str | int,
                    configuration: str = "2d", plans_identifier: str = "nnUNetPlans", overwrite: bool = False) -> Path:
    """Convert and save atomically; an existing output is only replaced with ``overwrite``, and never when it is
    the input checkpoint itself (also through a symlink or hard link)."""
    output = Path(output)
    if _same_file(plain_checkpoint, output):
        raise PretrainedConversionError(
            f"-o {output} is the input checkpoint -i {plain_checkpoint} itself; writing there would replace the plain "
            f"model. Choose another output file (e.g. {Path(output).with_name(Path(output).stem + '_converted.pth')}).")
    if output.exists() and not overwrite:
        raise PretrainedConversionError(f"{output} exists; choose another -o or pass --overwrite.")
    converted = convert_plain_checkpoint(plain_checkpoint, trainer_name, dataset, configuration, plans_identifier)
    from nnunetv2_textseg.atomic import atomic_write

    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, lambda f: torch.save(converted, f))
    return output
