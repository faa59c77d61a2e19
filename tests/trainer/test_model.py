"""The model: safe base-weight loading, head replacement, strategies and frozen layers."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from kubetune_trainer.errors import CheckpointError, ConfigError
from kubetune_trainer.model import (
    apply_strategy,
    build_model,
    check_architecture,
    create_model,
    param_groups,
    read_state_dict,
    set_train_mode,
)

ARCH = "test_resnet"


def base_state(num_classes: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return dict(timm.create_model(ARCH, num_classes=num_classes).state_dict())


class CreatesFile:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def test_head_is_replaced_and_backbone_loaded(tmp_path: Path) -> None:
    base = base_state(num_classes=10)
    path = tmp_path / "base.safetensors"
    save_file(base, str(path))

    model, report = build_model(ARCH, 5, path, "s3://models/base.safetensors")

    assert model.get_classifier().out_features == 5
    assert sorted(report.dropped_keys) == ["fc.bias", "fc.weight"]
    assert report.missing_keys == []
    assert report.unexpected_keys == []
    state = model.state_dict()
    assert torch.equal(state["layer1.0.conv1.weight"], base["layer1.0.conv1.weight"])
    assert torch.equal(state["bn1.running_mean"], base["bn1.running_mean"])


def test_head_of_same_size_is_still_replaced(tmp_path: Path) -> None:
    # digits 0-4 and digits 5-9 both have five classes: the old classifier must not carry over.
    base = base_state(num_classes=5)
    path = tmp_path / "base.safetensors"
    save_file(base, str(path))
    torch.manual_seed(123)
    model, report = build_model(ARCH, 5, path, "s3://m/base.safetensors")
    assert "fc.weight" in report.dropped_keys
    assert not torch.equal(model.state_dict()["fc.weight"], base["fc.weight"])


def test_mismatched_and_extra_keys_are_reported(tmp_path: Path) -> None:
    base = base_state()
    base["layer1.0.conv1.weight"] = torch.zeros(3, 3)  # wrong shape
    base["extra.thing"] = torch.ones(2)
    del base["layer2.0.bn1.running_var"]
    path = tmp_path / "base.safetensors"
    save_file(base, str(path))

    _, report = build_model(ARCH, 5, path, "s3://m/base.safetensors")

    assert any(k.startswith("layer1.0.conv1.weight ") for k in report.dropped_keys)
    assert report.unexpected_keys == ["extra.thing"]
    assert set(report.missing_keys) == {"layer1.0.conv1.weight", "layer2.0.bn1.running_var"}
    assert "missing (kept at random initialisation)" in "\n".join(report.log_lines())


def test_wrapped_torch_checkpoint_with_ddp_prefix_loads(tmp_path: Path) -> None:
    base = base_state()
    path = tmp_path / "base.pt"
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in base.items()}}, path)

    model, report = build_model(ARCH, 5, path, "s3://m/base.pt")

    assert report.missing_keys == [] and report.unexpected_keys == []
    assert torch.equal(model.state_dict()["layer4.0.conv2.weight"], base["layer4.0.conv2.weight"])


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "vit.safetensors"
    save_file(dict(timm.create_model("test_vit", num_classes=5).state_dict()), str(path))
    with pytest.raises(CheckpointError, match=r"s3://m/vit.safetensors does not fit architecture 'test_resnet'"):
        build_model(ARCH, 5, path, "s3://m/vit.safetensors")


def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    victim = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"state_dict": CreatesFile(victim)}))

    with pytest.raises(CheckpointError, match=r"refused to load s3://m/evil.pt: it is a pickle that needs code"):
        read_state_dict(path, "s3://m/evil.pt")
    assert not victim.exists()


def test_garbage_files_give_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"s3://m/bad\.safetensors is not a valid safetensors file"):
        read_state_dict(bad, "s3://m/bad.safetensors")
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    with pytest.raises(CheckpointError, match="holds no state dict of tensors"):
        read_state_dict(listing, "s3://m/list.pt")


def test_unknown_architecture_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"model.architecture: 'resnet5000' is not a timm architecture"):
        check_architecture("resnet5000")


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("strategy", "layers", "prefixes"),
    [
        ("head", None, {"fc"}),
        ("partial", 1, {"fc", "layer4"}),
        ("partial", 2, {"fc", "layer4", "layer3"}),
        ("full", None, {"fc", "layer4", "layer3", "layer2", "layer1", "conv1", "bn1"}),
    ],
)
def test_strategy_selects_the_trainable_stages(strategy: str, layers: int | None, prefixes: set[str]) -> None:
    model = create_model(ARCH, 5)
    apply_strategy(model, strategy, layers)
    assert {n.split(".")[0] for n in trainable(model)} == prefixes


def test_partial_beyond_the_stages_trains_everything() -> None:
    model = create_model(ARCH, 5)
    plan = apply_strategy(model, "partial", 40)
    assert trainable(model) == {n for n, _ in model.named_parameters()}
    assert plan.stages_trained == plan.stages_total == 5


def test_full_gives_each_stage_its_layer_decayed_rate_and_skips_decay_on_norms() -> None:
    model = create_model(ARCH, 5)
    plan = apply_strategy(model, "full")
    groups = {
        g["name"]: g for g in param_groups(model, plan, lr=0.01, weight_decay=0.05, backbone_scale=0.5, layer_decay=0.8)
    }
    assert groups["head"]["lr"] == 0.01
    # test_resnet's stages, input side first: stem, layer1..layer4; the top one at backbone_scale.
    stage_rates = [groups[f"backbone-{i}"]["lr"] for i in range(5)]
    assert stage_rates == pytest.approx([0.01 * 0.5 * 0.8**k for k in (4, 3, 2, 1, 0)])
    assert {n.split(".")[0] for n in plan.backbone_stages[0]} == {"conv1", "bn1"}
    assert {n.split(".")[0] for n in plan.backbone_stages[-1]} == {"layer4"}
    assert groups["backbone-4-no-decay"]["weight_decay"] == 0.0
    assert all(p.ndim <= 1 for p in groups["backbone-4-no-decay"]["params"])
    in_groups = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in model.parameters())


def test_partial_decays_only_the_stages_it_trains() -> None:
    model = create_model(ARCH, 5)
    plan = apply_strategy(model, "partial", 2)
    groups = {g["name"]: g for g in param_groups(model, plan, lr=0.01, weight_decay=0.05, layer_decay=0.5)}
    assert [groups[f"backbone-{i}"]["lr"] for i in range(2)] == pytest.approx([0.005, 0.01])
    assert {n.split(".")[0] for g in plan.backbone_stages for n in g} == {"layer3", "layer4"}


def test_frozen_layers_stay_bit_identical_under_head() -> None:
    torch.manual_seed(0)
    model = create_model(ARCH, 5)
    plan = apply_strategy(model, "head")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(param_groups(model, plan, 0.05, 0.05))
    for _ in range(3):
        set_train_mode(model, plan)
        loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(0, 5, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}
