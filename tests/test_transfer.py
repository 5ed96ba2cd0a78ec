"""Transfer learning from local weights (resnorm.transfer): loading torchvision-format state dicts and
this project's checkpoints, the one-line errors, norm swap, freezing, the head's own rate; and
architectures, pre-activation blocks and dropout through the real train / evaluate / predict."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TINY, write_params
from resnorm.io import UserError
from resnorm.model import ResNet, build_model
from resnorm.params import ModelParams, TrainParams, load_params
from resnorm.train import load_checkpoint, make_model, make_optimizer, prepare_model, run_paths, train
from resnorm.transfer import describe, freeze, keep_frozen_norms, load_weights


def saved(tmp_path, model_or_state, name="w.pth"):
    path = tmp_path / name
    torch.save(model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state, path)
    return path


def test_a_torchvision_state_dict_loads_into_our_bn_and_the_head_is_new(tmp_path):
    """torchvision's file format (nn.BatchNorm2d keys, 1000 classes) into ResNet-18 with this project's BN."""
    torch.manual_seed(1)
    source = build_model("resnet18", 1000, "torch_bn")
    with torch.no_grad():                              # non-trivial statistics, as in a trained file
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 1.5)
    path = saved(tmp_path, source)
    torch.manual_seed(2)
    model = build_model("resnet18", 5, "bn")
    head = model.fc.weight.detach().clone()
    report = load_weights(model, path, "resnet18")
    own, ref = model.state_dict(), source.state_dict()
    for k in own:
        if not k.startswith("fc."):
            assert torch.equal(own[k], ref[k]), k
    assert torch.equal(model.fc.weight, head) and model.fc.out_features == 5
    assert report["loaded"] == len(own) - 2 and report["not_loaded"] == [] and report["unused"] == []
    assert report["new_head"] == ["fc.bias", "fc.weight"] and len(report["sha1"]) == 40
    model.eval()                                       # and it computes what the source computes, up to the head
    source.fc = nn.Identity()
    model.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), source.eval()(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm, not_loaded, unused", [
    ("gn", [], ["num_batches_tracked", "running_mean", "running_var"]),
    ("bin", ["rho"], []),
    ("nn", ["bias"], ["bias", "num_batches_tracked", "running_mean", "running_var", "weight"]),
])
def test_norm_swap_copies_what_fits_and_says_what_did_not(tmp_path, norm, not_loaded, unused):
    path = saved(tmp_path, ResNet(1, 4, norm="torch_bn"))
    model = ResNet(1, 4, norm=norm)
    report = load_weights(model, path, "resnet6n2")
    assert sorted({k.rsplit(".", 1)[1] for k in report["not_loaded"]}) == not_loaded
    assert sorted({k.rsplit(".", 1)[1] for k in report["unused"]}) == unused
    text = describe(report)
    assert f"{report['loaded']} tensors loaded" in text
    for suffix in not_loaded:
        assert f"x {suffix}" in text.split("left at their initial values")[1]
    if norm == "gn":                                   # BN's affine parameters land in GN
        src = torch.load(path, weights_only=True)
        assert torch.equal(model.stage1[0].norm1.weight, src["stage1.0.norm1.weight"])


def test_a_checkpoint_of_this_project_loads_and_names_its_arch(tmp_path):
    m = ResNet(1, 3, norm="gn", gn_groups=4)
    ck = {"model": m.state_dict(), "model_config": {"arch": "resnet6n2", "norm": "gn", "n": 1, "num_classes": 3}}
    path = saved(tmp_path, ck, "best.pt")
    report = load_weights(ResNet(1, 7, norm="gn"), path, "resnet6n2")
    assert report["source"] == "resnorm checkpoint (gn)" and report["not_loaded"] == []
    with pytest.raises(UserError, match=r"holds a resnet6n2 \(its model_config\); model.arch is resnet18"):
        load_weights(build_model("resnet18", 3, "gn"), path, "resnet18")


def test_weights_errors_are_one_line_naming_the_file(tmp_path):
    r18 = build_model("resnet18", 3, "bn")
    with pytest.raises(UserError, match=r"missing.pth: no such file \(nothing is downloaded"):
        load_weights(r18, tmp_path / "missing.pth", "resnet18")
    path = saved(tmp_path, build_model("resnet34", 10, "torch_bn"), "r34.pth")
    with pytest.raises(UserError, match=r"r34.pth does not fit model.arch = resnet18: the file has 16 conv layers "
                                        r"the model lacks \(first: layer1.2.conv1.weight\)"):
        load_weights(r18, path, "resnet18")
    path = saved(tmp_path, ResNet(2, 3, in_channels=1), "gray.pth")
    with pytest.raises(UserError, match=r"conv1.weight is \[16, 1, 3, 3\] in the file but \[16, 3, 3, 3\] in the "
                                        r"model \(1 conv weights differ"):
        load_weights(ResNet(2, 3), path, "resnet6n2")
    path = saved(tmp_path, ResNet(1, 3), "n1.pth")                 # another depth: conv layers missing
    with pytest.raises(UserError, match=r"12 of the model's 19 conv layers are not in the file"):
        load_weights(ResNet(3, 3), path, "resnet6n2")
    (tmp_path / "junk.pth").write_bytes(b"not a zip file at all")
    with pytest.raises(UserError, match=r"junk.pth: not a readable PyTorch file"):
        load_weights(r18, tmp_path / "junk.pth", "resnet18")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(UserError, match=r"list.pth: not a state dict"):
        load_weights(r18, tmp_path / "list.pth", "resnet18")


def test_module_prefix_and_state_dict_wrapper_are_accepted(tmp_path):
    src = ResNet(1, 3)
    path = saved(tmp_path, {"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}})
    model = ResNet(1, 3)
    assert load_weights(model, path, "resnet6n2")["not_loaded"] == []
    assert torch.equal(model.conv1.weight, src.conv1.weight)


@pytest.mark.parametrize("spec, frozen_prefixes", [
    ("stem", ("conv1", "norm1")),
    ("stages:2", ("conv1", "norm1", "stage1", "stage2")),
    ("all-but-head", ("conv1", "norm1", "stage1", "stage2", "stage3")),
])
def test_frozen_parameters_and_running_statistics_do_not_move(tmp_path, spec, frozen_prefixes):
    torch.manual_seed(0)
    path = saved(tmp_path, ResNet(1, 3, norm="bn"))
    m = ModelParams(n=1, weights=str(path), freeze=spec)
    model, report = prepare_model(m, "bn", 3)
    assert report["freeze"] == spec and report["frozen_parameters"] > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, TrainParams(lr=0.1, weight_decay=0.01), 0.1)
    assert all(q.requires_grad for g in opt.param_groups for q in g["params"])
    for _ in range(3):
        model.train()
        keep_frozen_norms(model)
        x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 3
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    after = model.state_dict()
    for k in after:
        moved = not torch.equal(after[k], before[k])
        if k.startswith(frozen_prefixes):
            assert not moved, f"{k} is frozen but changed"
        elif k.endswith((".weight", "running_mean")) and not k.startswith(frozen_prefixes):
            assert moved, f"{k} should train"


def test_freeze_all_but_head_on_torchvision_leaves_only_fc(tmp_path):
    path = saved(tmp_path, build_model("resnet18", 10, "torch_bn"))
    model, report = prepare_model(ModelParams(arch="resnet18", weights=str(path), freeze="all-but-head"), "bn", 4)
    assert [k for k, q in model.named_parameters() if q.requires_grad] == ["fc.weight", "fc.bias"]
    assert report["trainable_parameters"] == 512 * 4 + 4 and report["frozen_norms_with_statistics"] == 20


def test_head_lr_gets_its_own_groups_and_the_schedule_keeps_the_ratio():
    from resnorm.train import set_lr
    model = ResNet(1, 3)
    opt = make_optimizer(model, TrainParams(lr=0.01, weight_decay=0.1), 0.01, head_lr=0.1)
    head = opt.param_groups[-2:]
    assert [len(g["params"]) for g in head] == [1, 1] and head[0]["params"][0] is model.fc.weight
    assert head[0]["weight_decay"] == 0.1 and head[1]["weight_decay"] == 0.0
    set_lr(opt, 0.005)
    assert head[0]["lr"] == pytest.approx(0.05) and opt.param_groups[0]["lr"] == 0.005
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    plain = make_optimizer(model, TrainParams(lr=0.01), 0.01)      # no head_lr: the groups as before
    assert len(plain.param_groups) == 2


def test_variant_head_lr_is_scaled_with_the_batch_like_lr():
    p = load_params(overrides={"train": {"lr": 0.1, "head_lr": 0.4}, "study": {"variants": {
        "x": {"norm": "bn", "batch_size": 64}}}})
    v = p.variant("x")
    assert v.lr == pytest.approx(0.2) and v.head_lr == pytest.approx(0.8)
    assert load_params().experiment().head_lr == load_params().experiment().lr


def test_fine_tuning_through_train_records_the_transfer_and_resumes(prepared, tmp_path):
    """The real train / evaluate: weights from a first run's best.pt, stages frozen, the head at its own
    rate; the run record says what was loaded; a kill and rerun resumes with the same numbers."""
    from resnorm.evaluate import evaluate
    first = train(load_params())
    src = tmp_path / "first.pt"
    src.write_bytes(run_paths(None, None).best.read_bytes())
    for f in run_paths(None, None).models.iterdir():
        f.unlink()
    over = {"model": {"n": 1, "weights": str(src), "freeze": "stages:1"}, "train": {"head_lr": 0.2}}
    p = load_params(overrides=over)
    with pytest.raises(SystemExit):
        train(p, stop_after_epoch=1)
    resumed = train(p)
    assert resumed["transfer"]["freeze"] == "stages:1" and resumed["transfer"]["not_loaded"] == []
    best = load_checkpoint(run_paths(None, None).best)
    frozen = load_checkpoint(src)["model"]
    for k in ("conv1.weight", "stage1.0.conv1.weight", "stage1.0.norm1.running_mean"):
        assert torch.equal(best["model"][k], frozen[k]), k
    assert not torch.equal(best["model"]["stage2.0.conv1.weight"], frozen["stage2.0.conv1.weight"])
    for f in run_paths(None, None).models.iterdir():
        f.unlink()
    straight = train(p)
    assert straight["history"] == resumed["history"] != first["history"]
    m = evaluate(p)
    assert m["transfer"]["weights"] == str(src) and m["model"]["arch"] == "resnet6n2"


def test_a_missing_weights_file_stops_train_with_one_line(prepared):
    with pytest.raises(UserError, match="model.weights: nowhere.pth: no such file"):
        train(load_params(overrides={"model": {"weights": "nowhere.pth"}}))


@pytest.mark.parametrize("model", [{"arch": "resnet18", "gn_groups": 4}, {"n": 1, "block": "preact"},
                                   {"n": 1, "dropout": 0.5}])
def test_other_architectures_train_evaluate_and_predict(prepared, model):
    """model.arch / block / dropout through train, evaluate and predict (rebuilt from model_config)."""
    from resnorm.evaluate import evaluate
    from resnorm.predict import load_model
    p = load_params(overrides={"model": model, "norm": "gn", "train": {"epochs": 1}})
    state = train(p)
    assert state["status"] == "finished"
    assert {k: state["model_config"][k] for k in model} == model
    assert evaluate(p)["val"]["accuracy"] >= 0
    net, info = load_model(run_paths(None, None).best)
    assert (type(net) is ResNet) == ("arch" not in model) and info["image_size"] == 16
    if "block" in model:
        assert net.block == "preact"
    if "dropout" in model:
        assert net.fc.dropout == 0.5


def test_study_variants_may_set_model_keys(prepared):
    write_params(prepared, {**TINY, "data": load_params().data.__dict__ | {"split": TINY["data"]["split"]},
                            "study": {"seeds": [0], "variants": {
                                "gn-r18-bs8": {"arch": "resnet18", "norm": "gn", "batch_size": 8, "gn_groups": 4,
                                               "epochs": 1},
                                "bn-pre": {"norm": "bn", "batch_size": 8, "block": "preact", "epochs": 1}}},
                            "gradcam": {"classes": ["class_0"]}})
    p = load_params()
    assert p.variant("gn-r18-bs8").model.arch == "resnet18" and p.variant("bn-pre").model.block == "preact"
    state = train(p, "gn-r18-bs8", 0)
    assert state["model_config"]["arch"] == "resnet18"
    assert isinstance(make_model(p.variant("bn-pre").model, "bn", 3), ResNet)


def test_inputs_are_normalized_as_the_weights_expect(prepared, tmp_path):
    """model.input_stats: auto takes a checkpoint's own mean and std, ImageNet's for a torchvision file,
    and the train split's from scratch; data and imagenet force one. The checkpoint keeps what was used,
    so evaluate, gradcam and predict normalize the same way."""
    from resnorm.predict import load_model
    from resnorm.transfer import IMAGENET_STATS

    def fresh(**model):
        for f in run_paths(None, None).models.iterdir():
            f.unlink()
        return train(load_params(overrides={"model": {"n": 1, **model}, "train": {"epochs": 1}}))

    data = train(load_params(overrides={"train": {"epochs": 1}}))        # from scratch: the train split's
    assert data["mean"] != IMAGENET_STATS["mean"]
    ck = load_checkpoint(run_paths(None, None).best)
    ck["mean"], ck["std"] = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]              # a source trained on other data
    src = tmp_path / "other.pt"
    torch.save(ck, src)
    state = fresh(weights=str(src))
    assert (state["mean"], state["std"]) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    assert load_model(run_paths(None, None).best)[1]["mean"] == [0.1, 0.2, 0.3]
    assert (fresh(weights=str(src), input_stats="data")["mean"]) == data["mean"]
    assert fresh(input_stats="imagenet")["std"] == IMAGENET_STATS["std"]
    r18 = saved(tmp_path, build_model("resnet18", 1000, "torch_bn"), "r18.pth")    # torchvision's format
    state = fresh(arch="resnet18", weights=str(r18))
    assert (state["mean"], state["std"]) == (IMAGENET_STATS["mean"], IMAGENET_STATS["std"])
    assert state["transfer"]["input_stats"]["from"].startswith("ImageNet")
    plain = saved(tmp_path, ResNet(1, 3), "plain.pth")      # a bare state dict of the 6n+2 net: nothing known
    assert fresh(weights=str(plain))["mean"] == data["mean"]
