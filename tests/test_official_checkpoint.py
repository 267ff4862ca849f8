"""An official search's ``latest.pth`` loads as scales as it is: the yacs config, the optimizer's,
scheduler's and amp's state pickled beside the model are read as inert stand-ins (yacs is neither
needed nor imported, nothing is run), the scales come from ``model`` as the official extraction
takes them (or from ``ema`` with ``scales_from="ema"``), only their tensors are read, and a file
that would run code is still refused.
"""

from __future__ import annotations

import contextlib
import copy
import pickletools
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from repopt.errors import ConfigError, ScalesError
from repopt.family import build_model, get_spec
from repopt.scales import SCALES_FILENAME, load_scales, random_scales, read_scales, save_scales
from target_train.scales_source import resolve_scales
from tests.test_hostile_pickles import _TouchByOpen, _TouchBySystem  # the payloads those tests use

pytestmark = pytest.mark.usefixtures("single_thread")

ARCHS = {"vgg": "tiny", "ghostnet": "ghostnet_tiny"}
OFFICIAL_KEYS = {  # how the official HS models name their layers (LinearAddBlock, RepOptGhostModule)
    "vgg": [
        "stage0.conv.weight",
        "stage0.scale_conv.weight",
        "stage0.conv_1x1.weight",
        "stage0.scale_1x1.weight",
        "stage1.1.scale_identity.weight",
        "stage1.1.bn.running_mean",
        "linear.weight",
    ],
    "ghostnet": [
        "conv_stem.weight",
        "blocks.1.0.ghost1.primary_conv.0.weight",
        "blocks.1.0.ghost1.fusion_scale.weight",
        "blocks.1.0.ghost1.cheap_operation.0.weight",
        "blocks.1.0.ghost1.cheap_operation.1.weight",
        "blocks.1.0.ghost1.final_bn.running_mean",
        "classifier.weight",
    ],
}


@contextlib.contextmanager
def fake_yacs():
    """A ``yacs.config.CfgNode`` (a dict subclass with attribute state, as yacs has) registered in
    ``sys.modules`` only inside the block: the checkpoint records ``yacs.config.CfgNode``, and the
    loader, run outside the block, must neither need nor import it."""
    names = ("yacs", "yacs.config")
    saved = {name: sys.modules.get(name) for name in names}
    package, module = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init=None):
            super().__init__(init or {})
            self.__dict__.update(
                {"__immutable__": False, "__deprecated_keys__": set(), "__renamed_keys__": {}, "__new_allowed__": False}
            )

        def __getattr__(self, name):
            if name in self:
                return self[name]
            raise AttributeError(name)

        def freeze(self):
            self.__dict__["__immutable__"] = True

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    package.config, module.CfgNode = module, CfgNode
    sys.modules.update({"yacs": package, "yacs.config": module})
    try:
        yield CfgNode
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def official_config(CfgNode):
    """A frozen search config shaped like the official ``config.py`` (nested nodes, tuples, None)."""
    cfg = CfgNode(
        {
            "MODEL": CfgNode({"ARCH": "RepOpt-VGG-B1-hs", "RESUME": "", "LABEL_SMOOTHING": 0.1}),
            "DATA": CfgNode({"DATASET": "cf100", "IMG_SIZE": 32, "MEAN": (0.5071, 0.4865, 0.4409)}),
            "TRAIN": CfgNode(
                {
                    "EPOCHS": 240,
                    "BASE_LR": 0.1,
                    "EMA_ALPHA": 5e-5,
                    "SCALES_PATH": None,
                    "OPTIMIZER": CfgNode({"NAME": "sgd", "MOMENTUM": 0.9}),
                }
            ),
            "AMP_OPT_LEVEL": "O1",
            "OUTPUT": "output/RepOpt-VGG-B1-hs/search",
            "SAVE_FREQ": 20,
        }
    )
    cfg.freeze()
    return cfg


def set_scales(model, scales):
    with torch.no_grad():
        params = model.scale_parameters()
        for key, value in scales.items():
            params[key].copy_(value)


def write_official_latest(path: Path, family: str, protocol: int = 2) -> tuple[dict, dict]:
    """``latest.pth`` as the official ``save_latest`` writes it during a search: ``model`` and ``ema`` (the
    HS model's and its moving average's state dicts, official names, no DDP prefix), the optimizer's and
    scheduler's state, ``max_accuracy``, ``epoch``, the yacs ``config`` and apex ``amp``'s state.
    Returns the two state dicts."""
    spec = get_spec(ARCHS[family])
    torch.manual_seed(0)
    model = build_model(spec, 100, "hs")
    optimizer = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        if family == "vgg"
        else torch.optim.AdamW(model.parameters(), lr=1e-3)
    )
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # momentum buffers / Adam moments in the optimizer's state
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=240)
    set_scales(model, random_scales(spec, 1))
    ema = copy.deepcopy(model)
    set_scales(ema, random_scales(spec, 2))
    model_sd, ema_sd = model.state_dict(), ema.state_dict()
    assert all(key in model_sd for key in OFFICIAL_KEYS[family])
    with fake_yacs() as CfgNode:
        state = {
            "model": model_sd,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "max_accuracy": 71.5,
            "epoch": 239,
            "config": official_config(CfgNode),
            "amp": OrderedDict(loss_scaler0={"loss_scale": 65536.0, "unskipped": 17}),
            "ema": ema_sd,
        }
        torch.save(state, path, pickle_protocol=protocol)
    return model_sd, ema_sd


def official_extraction(path: Path, family: str, key: str = "model") -> dict[str, torch.Tensor]:
    """What the official code does with the file: ``torch.load`` it whole (yacs importable, any code
    allowed), ``load_state_dict(..., strict=False)`` into a fresh HS model, read its scale layers."""
    with fake_yacs():
        weights = torch.load(path, map_location="cpu", weights_only=False)[key]
    model = build_model(get_spec(ARCHS[family]), 100, "hs")
    model.load_state_dict(weights, strict=False)
    return {k: p.detach().clone() for k, p in model.scale_parameters().items()}


def assert_equal(a: dict, b: dict):
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.float32 and torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- loads, as the official extraction


@pytest.mark.parametrize("protocol", [1, 2, 4])
@pytest.mark.parametrize("family", ["vgg", "ghostnet"])
def test_official_latest_loads_the_scales_of_its_model_and_ema(tmp_path, family, protocol):
    """Protocol 2 is torch.save's default (the config pickles as NEWOBJ + SETITEMS + BUILD), protocol 1
    builds the dict subclass with ``copyreg._reconstructor``, protocol 4 names globals on the stack."""
    path = tmp_path / "latest.pth"
    model_sd, ema_sd = write_official_latest(path, family, protocol)
    spec = get_spec(ARCHS[family])
    assert "yacs" not in sys.modules and "yacs.config" not in sys.modules
    loaded = load_scales(path, spec)
    assert "yacs" not in sys.modules and "yacs.config" not in sys.modules  # nothing was imported to read it
    assert_equal(loaded, official_extraction(path, family))
    assert_equal(loaded, {k: model_sd[k] for k in spec.scale_shapes()})
    # the same tensors as a plain official scales .pth holding them
    plain = tmp_path / "scales.pth"
    torch.save({k: model_sd[k] for k in spec.scale_shapes()}, plain)
    assert_equal(loaded, load_scales(plain, spec))

    ema = load_scales(path, spec, scales_from="ema")
    assert_equal(ema, official_extraction(path, family, "ema"))
    assert_equal(ema, {k: ema_sd[k] for k in spec.scale_shapes()})
    assert not any(torch.equal(ema[k], loaded[k]) for k in loaded)


def test_only_the_scale_tensors_are_read(tmp_path, monkeypatch):
    """The optimizer's moments, the convs, BN and the EMA stay in the archive: only the records of the
    scale tensors are read."""
    path = tmp_path / "latest.pth"
    write_official_latest(path, "vgg")
    spec = get_spec(ARCHS["vgg"])
    records = [n for n in zipfile.ZipFile(path).namelist() if "/data/" in n]
    read = []
    real_read = zipfile.ZipFile.read

    def recording_read(self, name, *args, **kwargs):
        read.append(str(name))
        return real_read(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "read", recording_read)
    load_scales(path, spec)
    tensors_read = [n for n in read if "/data/" in n]
    assert len(tensors_read) == len(spec.scale_shapes()) < len(records) / 4


def test_stand_ins_run_nothing_even_when_the_class_is_importable(tmp_path):
    """A class whose ``__setstate__`` and ``__setitem__`` would run code is built as a stand-in that
    swallows its state, even while its module is importable: the loader never looks the class up."""
    marker = tmp_path / "marker"
    module = types.ModuleType("trap_config")

    class TrapConfig(dict):
        def __setitem__(self, key, value):
            marker.touch()
            super().__setitem__(key, value)

        def __setstate__(self, state):
            marker.touch()

    TrapConfig.__module__, TrapConfig.__qualname__ = "trap_config", "TrapConfig"
    module.TrapConfig = TrapConfig
    sys.modules["trap_config"] = module
    try:
        config = TrapConfig()
        dict.__setitem__(config, "ARCH", "RepOpt-VGG-B1-hs")
        config.__dict__["frozen"] = True
        spec = get_spec("tiny")
        path = tmp_path / "latest.pth"
        torch.save({"model": build_model(spec, 100, "hs").state_dict(), "config": config}, path)
        assert not marker.exists()
        torch.load(path, weights_only=False)  # the control: unpickled for real, the class runs
        assert marker.exists()
        marker.unlink()
        load_scales(path, spec)
        assert not marker.exists()
    finally:
        sys.modules.pop("trap_config", None)


def test_big_endian_records_are_swapped(tmp_path):
    """A file written on a big-endian machine (``byteorder`` record ``big``) gives the same values."""
    spec = get_spec("tiny")
    scales = random_scales(spec, 4)
    little = tmp_path / "little.pth"
    torch.save(scales, little)
    big = tmp_path / "big.pth"
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in name:  # every record is float32
                data = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, 4).flip(1).numpy().tobytes()
            dst.writestr(name, data)
    assert_equal(load_scales(big, spec), load_scales(little, spec))


# ---------------------------------------------------------------- stage two


def test_stage_two_takes_scales_from_and_records_it(tmp_path):
    path = tmp_path / "latest.pth"
    model_sd, ema_sd = write_official_latest(path, "ghostnet")
    spec = get_spec(ARCHS["ghostnet"])
    model = resolve_scales(str(path), spec)
    ema = resolve_scales(str(path), spec, scales_from="ema")
    assert_equal(model.scales, {k: model_sd[k] for k in spec.scale_shapes()})
    assert_equal(ema.scales, {k: ema_sd[k] for k in spec.scale_shapes()})
    # one file, two sets of scales: a resume must not mix them up
    assert model.identity() == {"kind": "file", "sha256": model.file.sha256}
    assert ema.identity() == {"kind": "file", "sha256": model.file.sha256, "scales_from": "ema"}
    assert (model.describe()["scales_from"], ema.describe()["scales_from"]) == ("model", "ema")
    mean = resolve_scales(str(path), spec, "channel_mean", scales_from="ema")
    assert mean.identity()["scales_from"] == "ema" and mean.identity()["transform"] == "channel_mean"


# ---------------------------------------------------------------- still refused, clear errors


@pytest.mark.parametrize("payload_cls", [_TouchBySystem, _TouchByOpen])
@pytest.mark.parametrize("where", ["config", "optimizer", "ema", "scale", "config_item"])
def test_a_payload_in_an_official_checkpoint_is_refused_and_runs_nothing(tmp_path, payload_cls, where):
    """A call hidden anywhere in the checkpoint (as the config, deep in the optimizer's state, in the EMA,
    as a scale, inside the yacs config) is refused before any scale is taken, and never run."""
    path = tmp_path / "latest.pth"
    write_official_latest(path, "vgg")
    marker = tmp_path / "pwned"
    payload = payload_cls(marker)
    with fake_yacs():
        state = torch.load(path, weights_only=False)
        if where == "config":
            state["config"] = payload
        elif where == "optimizer":
            state["optimizer"]["param_groups"][0]["lr"] = payload
        elif where == "ema":
            state["ema"]["stage0.bn.running_mean"] = payload
        elif where == "scale":
            state["model"]["stage0.scale_conv.weight"] = payload
        else:
            dict.__setitem__(state["config"]["TRAIN"], "SCALES_PATH", payload)
        torch.save(state, path)
    assert not marker.exists()
    for scales_from in ("model", "ema"):
        with pytest.raises(ScalesError, match="refused") as exc:
            load_scales(path, "tiny", scales_from=scales_from)
        assert not marker.exists(), "loading the checkpoint ran code"
        message = str(exc.value)
        assert str(path) in message and ("system" in message or "open" in message)
        assert "Fix:" in message


def test_a_pickle_cannot_rewrite_the_readers_tensor_records(tmp_path):
    """A BUILD right after a tensor record (state None) would, on a dataclass, repoint its storage or
    offset; the reader's records refuse it, and the file is an error."""
    spec = get_spec("tiny")
    good = tmp_path / "good.pth"
    torch.save(random_scales(spec), good)
    with zipfile.ZipFile(good) as archive:
        entries = [(name, archive.read(name)) for name in archive.namelist()]
    pkl_name, pkl = next((n, d) for n, d in entries if n.endswith("/data.pkl"))
    ops = list(pickletools.genops(pkl))
    # the first tensor: REDUCE on its memoized args TUPLE (OrderedDict() for its hooks takes EMPTY_TUPLE);
    # the BUILD goes after the tensor's own memo put
    cut = next(
        ops[i + 2][2]
        for i in range(2, len(ops) - 2)
        if ops[i][0].name == "REDUCE" and ops[i - 2][0].name == "TUPLE" and "PUT" in ops[i + 1][0].name
    )
    hostile = tmp_path / "rewrite.pth"
    with zipfile.ZipFile(hostile, "w", zipfile.ZIP_STORED) as out:
        for name, data in entries:
            out.writestr(name, pkl[:cut] + b"Nb" + pkl[cut:] if name == pkl_name else data)
    assert len(load_scales(good, spec)) == len(spec.scale_shapes())
    with pytest.raises(ScalesError, match="may not rewrite the reader's records") as exc:
        load_scales(hostile, spec)
    assert str(hostile) in str(exc.value)


def test_errors_name_the_keys_found_and_the_fix(tmp_path):
    spec = get_spec("tiny")
    sd = build_model(spec, 100, "hs").state_dict()
    without_ema = tmp_path / "no_ema.pth"
    with fake_yacs() as CfgNode:
        torch.save(
            {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3, "config": official_config(CfgNode)},
            without_ema,
        )
    with pytest.raises(ScalesError) as exc:
        load_scales(without_ema, spec, scales_from="ema")
    for needle in (without_ema, "'ema'", "keys found: model, optimizer, epoch, config", "scales_from=model"):
        assert str(needle) in str(exc.value)

    only_ema = tmp_path / "only_ema.pth"
    torch.save({"ema": sd, "epoch": 3}, only_ema)
    with pytest.raises(ScalesError, match="scales_from=ema"):
        load_scales(only_ema, spec)

    whole_module = tmp_path / "whole_module.pth"
    module = build_model(spec, 100, "hs")
    torch.save({"model": module, "epoch": 3}, whole_module)
    with pytest.raises(ScalesError) as exc:
        load_scales(whole_module, spec)
    name = f"{type(module).__module__}.{type(module).__qualname__}"
    for needle in (f"inert stand-in for {name}", "not a state dict", "state_dict()"):
        assert needle in str(exc.value)

    safetensors = save_scales(tmp_path / SCALES_FILENAME, random_scales(spec)).path
    with pytest.raises(ScalesError, match="holds one set of scales.*scales_from=model"):
        read_scales(safetensors, spec, scales_from="ema")
    with pytest.raises(ConfigError, match="scales_from='best': must be one of model, ema"):
        read_scales(safetensors, spec, scales_from="best")

    config_as_scale = tmp_path / "config_as_scale.pth"
    with fake_yacs() as CfgNode:
        torch.save({"model": {**random_scales(spec), "stage0.scale_conv.weight": official_config(CfgNode)}}, config_as_scale)
    with pytest.raises(ScalesError, match="'stage0.scale_conv.weight' is an inert stand-in for yacs.config.CfgNode"):
        load_scales(config_as_scale, spec)


@pytest.mark.parametrize("damage", ["truncated", "flipped_scale_byte"])
def test_a_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    path = tmp_path / "latest.pth"
    write_official_latest(path, "vgg")
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:  # a byte of every tensor record, the scales' among them: the zip's CRC catches it
        with zipfile.ZipFile(path) as archive:
            records = [i for i in archive.infolist() if "/data/" in i.filename and i.file_size]
        for record in records:  # the data follows the local header and its own name and extra field
            header = data[record.header_offset : record.header_offset + 30]
            start = record.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
            data[start] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ScalesError, match="damaged") as exc:
        load_scales(path, "tiny")
    assert str(path) in str(exc.value)
