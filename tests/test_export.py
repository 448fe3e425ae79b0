"""`sparsepo export`: a training checkpoint (``.ckpt`` or FSDP2 folder) to a Hugging Face checkpoint plus masks.

Every export is compared with the module that wrote the checkpoint (logits, weights, mask tensors), never only
checked for existence; the trained weights are also checked to differ from the untrained base model.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparsepo_lightning import cli
from sparsepo_lightning.evaluate.policies import load_policy, reference_name
from sparsepo_lightning.export import export_checkpoint, load_masks
from sparsepo_lightning.masks import LearnedMasker, ReferenceOutputs
from sparsepo_lightning.module import PreferenceModule
from sparsepo_lightning.objectives import SparsePO
from tests.test_module import fit, make_data
from tests.tiny_models import tiny_llama

REPO = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[1, 5, 9, 12, 7, 30, 2], [1, 44, 3, 8, 100, 17, 60]])
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the machine's cores are shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def _mask_values(masker: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward and KL masks of ``masker`` on fixed random per-layer states (4 rows, 17 positions, 2 layers, width 32)."""
    g = torch.Generator().manual_seed(0)
    layers = tuple(torch.randn(4, 17, 32, generator=g) for _ in range(2))
    response = torch.ones(4, 16, dtype=torch.bool)
    masks = masker.eval()(ReferenceOutputs(last_hidden=layers[-1], layers=layers, head=None), response)
    return masks.reward, masks.kl


@pytest.fixture(scope="module")
def cli_fit(tiny_model_dir, pairs_file, tmp_path_factory) -> tuple[Path, PreferenceModule]:
    """A real ``sparsepo fit`` (LightningCLI: config.yaml in the log folder, ``last.ckpt`` link) with independent
    learned masks whose mixer activation is not the default, so masks.json can only get it from config.yaml."""
    runs = tmp_path_factory.mktemp("runs")
    fitted = cli.run(["fit", "--config", str(REPO / "configs/debug/tiny.yaml"), "--model.model", tiny_model_dir,
                      "--model.masker.init_args.independent", "true",
                      "--model.masker.init_args.mixer_activation", "none", "--data.train_file", pairs_file,
                      "--data.val_file", pairs_file, "--trainer.logger.init_args.save_dir", str(runs),
                      "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                      "--trainer.enable_progress_bar", "false"])  # fmt: skip
    return Path(fitted.trainer.logger.log_dir) / "checkpoints" / "last.ckpt", fitted.model


def test_ckpt_export_loads_with_auto_classes_and_equals_the_trained_policy(cli_fit, tiny_model_dir, tmp_path):
    checkpoint, module = cli_fit
    out = export_checkpoint(checkpoint, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(out)
    expected = _logits(module.policy)
    assert torch.equal(_logits(exported), expected)
    assert not torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir)), expected, atol=1e-4)
    assert AutoTokenizer.from_pretrained(out)("hello world").input_ids == \
        AutoTokenizer.from_pretrained(tiny_model_dir)("hello world").input_ids  # fmt: skip
    provenance = json.loads((out / "export.json").read_text())
    assert provenance["source_checkpoint"] == str(checkpoint.resolve())  # the step file, not the moving link
    assert (provenance["global_step"], provenance["model"], provenance["reference"]) == (2, tiny_model_dir,
                                                                                         tiny_model_dir)
    assert (provenance["checkpoint_format"], provenance["dtype"], provenance["lora"]) == ("lightning_ckpt",
                                                                                          "float32", None)


def test_masks_export_equals_the_masker_and_round_trips_into_a_fresh_one(cli_fit, tmp_path):
    checkpoint, module = cli_fit
    out = export_checkpoint(checkpoint, tmp_path / "export")
    saved = load_file(out / "masks.safetensors")
    trained = module.masker.state_dict()
    assert set(saved) == set(trained) and any(k.startswith("kl_net.") for k in saved)
    assert all(torch.equal(saved[k], trained[k]) for k in saved)
    masks = load_masks(out)
    assert masks.class_path == "sparsepo_lightning.masks.LearnedMasker"
    assert masks.init_args["independent"] is True and masks.init_args["mixer_activation"] == "none"
    assert masks.info["masker_source"] == str(checkpoint.parent.parent / "config.yaml")
    assert masks.info["tensors"]["reward_net.layer_weight"] == {"shape": [2, 32], "dtype": "float32"}
    rebuilt = masks.build(AutoModelForCausalLM.from_pretrained(out))
    assert isinstance(rebuilt, LearnedMasker) and isinstance(rebuilt.kl_net.mixer_act, torch.nn.Identity)
    for got, want in zip(_mask_values(rebuilt), _mask_values(module.masker), strict=True):
        assert torch.equal(got, want) and (want != 0).sum() > 8  # equal, and not just all zeros


def test_lora_export_merged_and_as_peft_adapter_give_the_trained_logits(tiny_model_dir, pairs_file, tmp_path):
    peft = pytest.importorskip("peft")
    seed_everything(0)
    module = PreferenceModule(tiny_model_dir, objective=SparsePO(), masker=LearnedMasker(), lr=1e-2, lora=LORA)
    trainer, _ = fit(module, make_data(tiny_model_dir, pairs_file), tmp_path, max_steps=2)
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    expected = _logits(module.policy)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.allclose(_logits(base), expected, atol=1e-4)  # the adapters moved the policy
    merged = export_checkpoint(tmp_path / "lora.ckpt", tmp_path / "merged")
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(merged)), expected, rtol=1e-5, atol=1e-5)
    assert json.loads((merged / "export.json").read_text())["lora"] == "merged"
    adapter = export_checkpoint(tmp_path / "lora.ckpt", tmp_path / "adapter", lora="adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "masks.safetensors"} <= {p.name for p in
                                                                                         adapter.iterdir()}
    assert not (adapter / "model.safetensors").exists()
    with_adapter = peft.PeftModel.from_pretrained(base, adapter)
    torch.testing.assert_close(_logits(with_adapter), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strategy", ["fsdp2", "fsdp1"])
def test_sharded_checkpoint_folder_exports_the_full_policy_and_masks(strategy, ranks_by_mode, tiny_model_dir,
                                                                      tmp_path):
    """``tests/distributed_run.py`` (mode ``<strategy>_export``) trains 2 steps on 2 gloo ranks, saves a sharded
    checkpoint and the gathered weights at that point; the export read in this process must equal them. FSDP1
    folders also hold the frozen reference (not exported)."""
    full = ranks_by_mode[f"{strategy}_export"][0]
    shutil.copytree(full["sharded"], tmp_path / "sharded")  # the session's launch is shared: work on a copy
    sharded = tmp_path / "sharded"
    assert sorted(p.name for p in sharded.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    out = export_checkpoint(sharded, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert set(exported) == set(full["policy"])
    for name, value in full["policy"].items():
        assert torch.equal(exported[name], value), name
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(base[k], v) for k, v in full["policy"].items())
    masks = load_file(out / "masks.safetensors")
    assert set(masks) == set(full["masker"]) and all(torch.equal(masks[k], v) for k, v in full["masker"].items())
    info = json.loads((out / "export.json").read_text())
    assert (info["checkpoint_format"], info["global_step"]) == ("distributed", full["global_step"])
    assert load_masks(out).class_path == "sparsepo_lightning.masks.LearnedMasker"  # inferred: no config.yaml
    loaded = load_policy(str(sharded))  # `sparsepo evaluate` takes the folder too
    # the session's launch ran on one worker's copy of the tiny model (same files, another folder)
    assert loaded.label == "sharded" and reference_name(str(sharded)) == full["model_dir"]
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in full["policy"].items())
    shutil.copytree(sharded, tmp_path / "tampered")  # .metadata is a pickle: only DCP's own classes are accepted
    marker = tmp_path / "pwned"
    (tmp_path / "tampered" / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ValueError, match=r"tampered/.metadata: not a readable .*refusing to load"):
        export_checkpoint(tmp_path / "tampered", tmp_path / "never")
    assert not marker.exists() and not (tmp_path / "never").exists()


class _Payload:
    """Unpickling this writes a file: what a malicious checkpoint could do with a plain ``pickle.load``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.path),))


def test_errors_name_the_path_and_the_fix_and_nothing_is_overwritten(cli_fit, tiny_tokenizer, tmp_path):
    checkpoint, _ = cli_fit
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=rf"{out}.*Fix: give a new output folder"):
        export_checkpoint(checkpoint, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no partial folder left behind
    with pytest.raises(FileNotFoundError, match="missing.ckpt' does not exist"):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "a")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: .*not a PreferenceModule checkpoint"):
        export_checkpoint(tmp_path / "other.pt", tmp_path / "b")
    torch.save({"code": LearnedMasker()}, tmp_path / "pickled.pt")  # a pickled object is never unpickled
    with pytest.raises(ValueError, match=r"pickled.pt: cannot be read with torch.load\(weights_only=True\)"):
        export_checkpoint(tmp_path / "pickled.pt", tmp_path / "c")
    with pytest.raises(ValueError, match="not a distributed checkpoint"):
        export_checkpoint(out, tmp_path / "d")
    with pytest.raises(ValueError, match="trained without LoRA.*Fix: drop --lora"):
        export_checkpoint(checkpoint, tmp_path / "e", lora="adapter")
    smaller = tmp_path / "smaller-model"  # the checkpoint's model replaced by one of another size
    tiny_llama(vocab=len(tiny_tokenizer) - 1).save_pretrained(smaller)
    tiny_tokenizer.save_pretrained(smaller)
    moved = torch.load(checkpoint, weights_only=True)
    moved["hyper_parameters"]["model"] = str(smaller)
    torch.save(moved, tmp_path / "moved.ckpt")
    with pytest.raises(ValueError, match="(?s)moved.ckpt: the saved policy weights do not fit .*Fix:"):
        export_checkpoint(tmp_path / "moved.ckpt", tmp_path / "f")
    assert not (tmp_path / "f").exists()


def test_cli_help_and_export_in_bfloat16(cli_fit, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["sparsepo", "export", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in ("checkpoint", "out_dir", "--dtype", "--lora"))
    checkpoint, module = cli_fit
    monkeypatch.setattr(sys, "argv", ["sparsepo", "export", str(checkpoint), str(tmp_path / "bf16"), "--dtype",
                                      "bfloat16"])  # fmt: skip
    cli.main()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert exported.dtype == torch.bfloat16
    for name, value in module.policy.state_dict().items():
        assert torch.equal(exported.state_dict()[name], value.to(torch.bfloat16)), name
    assert load_file(tmp_path / "bf16" / "masks.safetensors")["reward_net.layer_weight"].dtype == torch.float32


def test_export_of_a_plugin_run_with_extra_state_writes_the_policy(tiny_model_dir, pairs_file, tmp_path):
    """A token-weighting plug-in whose only masker state is a draw counter (SamPO): the policy exports, and the
    counter (training progress, not weights) is not written as mask weights."""
    fitted = cli.run(["fit", "--config", str(REPO / "configs/debug/tiny.yaml"), "--config",
                      str(REPO / "configs/methods/sampo.yaml"), "--model.model", tiny_model_dir,
                      "--data.train_file", pairs_file, "--data.val_file", pairs_file,
                      "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.max_steps", "2",
                      "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"])
    checkpoint = Path(fitted.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["state_dict"]["masker._extra_state"]["calls"] >= 2
    out = export_checkpoint(checkpoint, tmp_path / "export")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out)), _logits(fitted.model.policy))
    assert not (out / "masks.safetensors").exists()
