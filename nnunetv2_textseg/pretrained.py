"""Start a text trainer from a plain nnU-Net model (``nnUNetv2_train ... -pretrained_weights``).

nnU-Net's ``load_pretrained_weights`` requires every parameter of the new network to be in the file,
with the same shape. A text network holds nnU-Net's planned U-Net under ``unet.`` plus text modules,
and BiCLIP's U-Net takes one more input channel (the pseudo-image), so a plain checkpoint cannot be
loaded as is. :func:`convert_plain_checkpoint` writes a file that can: the plain U-Net's weights under
``unet.``, the extra input channel's weights set to zero (the converted U-Net's features are exactly the
plain one's, whatever the pseudo-image, and it learns to use it during fine-tuning), and the text
modules at their fresh initialisation (zero-initialised gates and FiLM stay zero). As for any
``-pretrained_weights``, nnU-Net itself re-initialises the segmentation layers (``.seg_layers.``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from nnunetv2_textseg.training.text_trainer import PLANS_KEY, TextTrainingError, nnUNetTrainerText
from nnunetv2_textseg.training.variants import text_trainer_class


class PretrainedConversionError(TextTrainingError):
    """The plain checkpoint does not fit the text trainer's network; the message says why and what to do."""


def _text_in_dim(trainer: type[nnUNetTrainerText], preprocessed: Path) -> dict:
    """The text-plans entry the trainer will record: the encoder it will choose (same rules as training)."""
    from nnunetv2_textseg.cache import TextEmbeddingCache, cache_path
    from nnunetv2_textseg.encoders import TextEncoder
    from nnunetv2_textseg.training.text_trainer import choose_encoder_spec

    spec = choose_encoder_spec(preprocessed, trainer.text_encoder, None)
    path = cache_path(preprocessed, spec, "Tr")
    dim = TextEmbeddingCache.load(path).identity["dim"] if path.is_file() else TextEncoder(spec).dim
    return {"text_in_dim": int(dim)}


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
    try:
        ckpt = torch.load(plain_checkpoint, map_location="cpu", weights_only=False)
        plain = ckpt["network_weights"]
    except Exception as e:  # not a torch file, or not an nnU-Net checkpoint
        raise PretrainedConversionError(f"{plain_checkpoint} is not an nnU-Net checkpoint ({type(e).__name__}: "
                                        f"{e}); give a model folder's fold_X/checkpoint_final.pth.") from None
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
    unet_in = conv.in_channels  # image channels (+ 1 for BiCLIP's pseudo-image)
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
            padded = torch.zeros_like(want)  # an input conv: the added channel (pseudo-image) starts with no influence
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


def _strip_wrappers(key: str) -> str:
    """Parameter name without DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes."""
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def write_converted(plain_checkpoint: str | Path, output: str | Path, trainer_name: str, dataset: str | int,
                    configuration: str = "2d", plans_identifier: str = "nnUNetPlans", overwrite: bool = False) -> Path:
    """Convert and save atomically; an existing output is only replaced with ``overwrite``."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise PretrainedConversionError(f"{output} exists; choose another -o or pass --overwrite.")
    converted = convert_plain_checkpoint(plain_checkpoint, trainer_name, dataset, configuration, plans_identifier)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + f".tmp{os.getpid()}")
    try:
        torch.save(converted, tmp)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return output
