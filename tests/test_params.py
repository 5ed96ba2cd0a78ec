"""params.yaml is validated once: each bad value stops with one line naming key, value and rule."""
import pytest

from resnorm.params import ParamError, load_params
from conftest import REPO, write_params


def test_repo_params_load():
    p = load_params(REPO / "params.yaml")
    assert p.experiment().name == f"{p.norm}-bs{p.batch_size}"
    assert {v.norm for v in p.variants()} == {"bn", "in", "bin", "ln", "gn", "nn", "torch_bn"}
    assert p.norm == "torch_bn"                      # Section 1.1's model: nn.BatchNorm2d
    assert p.model.shortcut == "A"
    batch = p.variants("batch")
    assert {(v.norm, v.batch_size) for v in batch} == {(n, b) for n in ("bn", "gn") for b in (8, 32, 128)}
    # one protocol for the whole batch-size study: everything but norm, batch size and name agrees
    assert len({v.train for v in batch}) == 1 and batch[0].train.early_stopping_patience > 0
    assert batch[0].train.schedule == "plateau"
    assert batch[0].train.early_stopping_patience > batch[0].train.plateau_patience + 1   # anneals before it stops
    assert {v.batch_size for v in p.variants("norms")} == {32}


def test_linear_lr_scaling(workdir):
    write_params(workdir, {"train": {"lr": 0.1, "lr_scaling": "linear", "lr_reference_batch": 32}})
    p = load_params()
    lrs = {b: p.variant(n).lr for n, b in (("bn-bs8-es", 8), ("bn-bs32-es", 32), ("bn-bs128-es", 128))}
    assert lrs == {8: pytest.approx(0.025), 32: pytest.approx(0.1), 128: pytest.approx(0.4)}
    write_params(workdir, {"train": {"lr": 0.1, "lr_scaling": "none"}})
    assert {load_params().variant(n).lr for n in ("bn-bs8-es", "bn-bs128-es")} == {0.1}


@pytest.mark.parametrize("override, words", [
    ({"data": {"image_size": 30}}, ["data.image_size", "30", "multiple of 4"]),
    ({"data": {"image_size": "big"}}, ["data.image_size", "integer"]),
    ({"data": {"split": {"train": 0.5, "val": 0.1, "test": 0.1}}}, ["data.split", "sum to 1"]),
    ({"data": {"min_images_per_class": -3}}, ["data.min_images_per_class", "-3"]),
    ({"data": {"colour": 1}}, ["unknown key data.colour"]),
    ({"bogus": 1}, ["unknown key bogus"]),
    ({"norm": "xn"}, ["norm", "'xn'", "one of bn, in, bin"]),
    ({"batch_size": 0}, ["batch_size", ">= 1"]),
    ({"train": {"optimizer": "lbfgs"}}, ["train.optimizer", "sgd, adam"]),
    ({"train": {"schedule": "cyclic"}}, ["train.schedule"]),
    ({"train": {"epochs": 3, "warmup_epochs": 3}}, ["train.warmup_epochs", "< epochs"]),
    ({"train": {"lr": -1}}, ["train.lr", "> 0"]),
    ({"train": {"augment": "yes"}}, ["train.augment", "true or false"]),
    ({"train": {"cutout": 40}}, ["train.cutout", "40", "[0, 32]"]),
    ({"train": {"cutout": -1}}, ["train.cutout", "[0, 32]"]),
    ({"train": {"color_jitter": 1.0}}, ["train.color_jitter", "[0, 1)"]),
    ({"train": {"augment": False, "cutout": 8}}, ["train.cutout", "augment is true"]),
    ({"train": {"augment": False, "color_jitter": 0.2}}, ["train.color_jitter", "augment is true"]),
    ({"train": {"rotate": 200}}, ["train.rotate", "[0, 180]"]),
    ({"train": {"zoom": 1.5}}, ["train.zoom", "[0, 1)"]),
    ({"train": {"augment": False, "zoom": 0.1}}, ["train.zoom", "augment is true"]),
    ({"study": {"variants": {"bn-cut": {"norm": "bn", "batch_size": 8, "cutout": 33}}}},
     ["study.variants.bn-cut.cutout", "33"]),
    ({"train": {"device": "tpu"}}, ["train.device"]),
    ({"model": {"gn_groups": 5}}, ["model.gn_groups", "divide"]),
    ({"model": {"shortcut": "C"}}, ["model.shortcut", "one of A, B"]),
    ({"model": {"bin_gate_lr": 0}}, ["model.bin_gate_lr", "> 0"]),
    ({"model": {"arch": "vgg16"}}, ["model.arch", "resnet6n2, resnet18, resnet34, resnet50"]),
    ({"model": {"arch": "resnet18", "gn_groups": 3}}, ["model.gn_groups", "resnet18: 64, 128, 256, 512"]),
    ({"model": {"arch": "resnet50", "block": "preact"}}, ["model.block", "preact blocks are for resnet6n2"]),
    ({"model": {"block": "bottleneck"}}, ["model.block", "basic, preact"]),
    ({"model": {"dropout": 1}}, ["model.dropout", "[0, 1)"]),
    ({"model": {"freeze": "layers:2", "weights": "w.pth"}}, ["model.freeze", "stages:K"]),
    ({"model": {"freeze": "stages:4", "weights": "w.pth"}}, ["model.freeze", "resnet6n2 has 3 stages"]),
    ({"model": {"freeze": "stem"}}, ["model.freeze", "model.weights"]),
    ({"model": {"input_stats": "cifar"}}, ["model.input_stats", "auto, data, imagenet"]),
    ({"model": {"weights": 3}}, ["model.weights", "a path"]),
    ({"train": {"head_lr": -0.1}}, ["train.head_lr", ">= 0"]),
    ({"study": {"variants": {"x": {"norm": "gn", "batch_size": 8, "arch": "resnet18", "gn_groups": 6}}}},
     ["study.variants.x.gn_groups", "resnet18"]),
    ({"train": {"lr_scaling": "sqrt"}}, ["train.lr_scaling", "none, linear"]),
    ({"gradcam": {"split": "train"}}, ["gradcam.split", "val, test"]),
    ({"study": {"variants": {"x": {"norm": "bn", "batch_size": 8, "group": "misc"}}}}, ["study.variants.x.group"]),
    ({"study": {"seeds": [1, 1]}}, ["study.seeds", "distinct"]),
    ({"study": {"variants": {"x": {"norm": "bn"}}}}, ["study.variants.x.batch_size", "missing"]),
    ({"study": {"variants": {"x": {"norm": "qq", "batch_size": 8}}}}, ["study.variants.x.norm"]),
    ({"study": {"variants": {"x": {"norm": "bn", "batch_size": 8, "lr": "fast"}}}}, ["study.variants.x.lr"]),
    ({"study": {"variants": {"x": {"norm": "bn", "batch_size": 8, "colour": 1}}}}, ["study.variants.x.colour"]),
    ({"study": {"variants": {"../../../x": {"norm": "bn", "batch_size": 8}}}}, ["study.variants", "file name"]),
    ({"study": {"variants": {".hidden": {"norm": "bn", "batch_size": 8}}}}, ["study.variants", "dot"]),
    ({"study": {"variants": {"a/b": {"norm": "bn", "batch_size": 8}}}}, ["study.variants.a/b", "file name"]),
    ({"seed": 2**31}, ["seed", "[0, 2147483647]"]),
    ({"seed": -1}, ["seed", "[0, 2147483647]"]),
    ({"study": {"seeds": [0, 10**8 * 30]}}, ["study.seeds[1]", "[0, 2147483647]"]),
    ({"data": {"seed": -5}}, ["data.seed", "[0, 2147483647]"]),
    ({"data": {"image_size": 100000}}, ["data.image_size", "at most 1024"]),
    ({"data": {"near_duplicate_bits": 1000}}, ["data.near_duplicate_bits", "[0, 16]"]),
    ({"train": {"device": "cpu", "precision": "fp16"}}, ["train.precision", "fp32 on a CPU"]),
    ({"study": {"variants": {"x": {"norm": "bn", "batch_size": 8, "device": "cpu", "precision": "bf16"}}}},
     ["study.variants.x.precision", "fp32 on a CPU"]),
    ({"train": {"compile": "fast"}}, ["train.compile", "auto, default, reduce-overhead"]),
])
def test_bad_values_are_refused_in_one_line(workdir, override, words):
    write_params(workdir, override)
    with pytest.raises(ParamError) as e:
        load_params()
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_missing_and_broken_file(workdir):
    with pytest.raises(ParamError, match="not found"):
        load_params("nope.yaml")
    (workdir / "params.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ParamError, match="not valid YAML"):
        load_params()


@pytest.mark.parametrize("content, words", [
    (b"seed: 1\nnorm: bn\nseed: 2\n", ["line 3, column 1", "duplicate key 'seed'"]),
    (b"train:\n  lr: 0.1\n  lr: 0.2\n", ["line 3, column 3", "duplicate key 'lr'"]),
    (b"seed: 1\ntrain: {lr: [1,}\n", ["line 2, column", "not valid YAML"]),
    (b"seed: 1\nnorm: \xff\xfe\n", ["not UTF-8", "byte"]),
])
def test_params_file_errors_name_the_place(workdir, content, words):
    """Duplicate keys are refused (YAML keeps the last one silently), errors say where, and a file
    that is not UTF-8 text, or a folder, is one line too."""
    (workdir / "params.yaml").write_bytes(content)
    with pytest.raises(ParamError) as e:
        load_params()
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_params_that_is_a_folder(tmp_path):
    with pytest.raises(ParamError, match="is a directory"):
        load_params(tmp_path)


def test_variant_overrides_base_train(workdir):
    write_params(workdir, {"train": {"epochs": 7},
                           "study": {"variants": {"gn-bs8": {"norm": "gn", "batch_size": 8, "lr": 0.01}}}})
    v = load_params().variant("gn-bs8")
    assert (v.norm, v.batch_size, v.train.lr, v.train.epochs) == ("gn", 8, 0.01, 7)
    with pytest.raises(ParamError, match="no variant"):
        load_params().variant("bn-bs3")


def test_params_yaml_is_written_the_way_dvc_exp_run_s_writes_it(tmp_path):
    """`dvc exp run -S` rewrites params.yaml through ruamel; in that style already, a run that sets
    a value to what it was leaves the file byte-identical (no noise in the first experiment's diff)."""
    import shutil
    from dvc.utils.hydra import apply_overrides
    from conftest import REPO
    copy = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", copy)
    p = load_params(copy)
    apply_overrides(copy, [f"norm={p.norm}", f"study.seeds=[{','.join(map(str, p.study.seeds))}]"])
    assert copy.read_bytes() == (REPO / "params.yaml").read_bytes()


def test_every_knob_is_in_params_yaml_so_dvc_can_set_it():
    """`dvc exp run -S model.arch=resnet18` can only override a key params.yaml has (DVC: "Could not
    override 'model.arch' ... Key 'arch' is not in struct"): every field of every section is there."""
    import dataclasses
    import typing

    import yaml
    from resnorm.params import Params

    def missing(cls, node, prefix):
        hints, out = typing.get_type_hints(cls), []
        for f in dataclasses.fields(cls):
            if f.name not in node:
                out.append(prefix + f.name)
            elif dataclasses.is_dataclass(hints[f.name]):
                out += missing(hints[f.name], node[f.name], f"{prefix}{f.name}.")
        return out
    assert missing(Params, yaml.safe_load((REPO / "params.yaml").read_text()), "") == []
