"""Architecture specs: layout, widths, scale keys (against the official files), HS init, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import repopt
from repopt.errors import ConfigError
from repopt.vgg import MODES, RepOptVGG
from repopt.vgg.arch import ArchSpec, get_arch

OFFICIAL_DIR = Path(repopt.__file__).parent / "official_scales"
OFFICIAL = ("B1", "B2", "L1", "L2")


pytestmark = pytest.mark.usefixtures("single_thread")


def _official(name: str) -> dict[str, torch.Tensor]:
    return torch.load(OFFICIAL_DIR / f"RepOpt-VGG-{name}-scales.pth", map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- layout and widths


@pytest.mark.parametrize(
    "name, num_blocks, widths",
    [
        ("B1", (4, 6, 16, 1), (64, 128, 256, 512, 2048)),
        ("B2", (4, 6, 16, 1), (64, 160, 320, 640, 2560)),
        ("L1", (8, 14, 24, 1), (64, 128, 256, 512, 2048)),
        ("L2", (8, 14, 24, 1), (64, 160, 320, 640, 2560)),
    ],
)
def test_official_layout(name, num_blocks, widths):
    arch = get_arch(name)
    assert arch.num_blocks == num_blocks
    assert arch.stage_widths == widths
    assert arch.feature_dim == widths[-1]
    assert arch.strides == (2, 2, 2, 2, 2)
    blocks = arch.blocks
    assert len(blocks) == 1 + sum(num_blocks)
    # stage0: 3 -> 64, stride 2
    assert (blocks[0].name, blocks[0].in_channels, blocks[0].out_channels, blocks[0].stride) == ("stage0", 3, 64, 2)
    for stage in range(1, 5):
        stage_blocks = [b for b in blocks if b.stage == stage]
        assert len(stage_blocks) == num_blocks[stage - 1]
        assert [b.name for b in stage_blocks] == [f"stage{stage}.{i}" for i in range(num_blocks[stage - 1])]
        assert [b.index for b in stage_blocks] == list(range(num_blocks[stage - 1]))
        assert all(b.out_channels == widths[stage] for b in stage_blocks)
        assert stage_blocks[0].in_channels == widths[stage - 1]
        assert all(b.in_channels == widths[stage] for b in stage_blocks[1:])
        assert stage_blocks[0].stride == 2
        assert all(b.stride == 1 for b in stage_blocks[1:])


def test_small_arch_widths():
    assert get_arch("tiny").stage_widths == (8, 8, 16, 32, 64)
    assert get_arch("small").stage_widths == (16, 16, 32, 64, 256)
    # stage0 is capped at 64 channels even for wide stage 1
    wide = ArchSpec("wide", (1, 1, 1, 1), (4, 1, 1, 1))
    assert wide.stage_widths == (64, 256, 128, 256, 512)


@pytest.mark.parametrize("name", OFFICIAL)
def test_scale_keys_match_official_files(name):
    official = _official(name)
    shapes = get_arch(name).scale_shapes()
    assert set(shapes) == set(official)
    for key, value in official.items():
        assert tuple(value.shape) == shapes[key], key
    expected_count = {"B1": 79, "B2": 79, "L1": 139, "L2": 139}[name]
    assert len(shapes) == expected_count


@pytest.mark.parametrize("name", OFFICIAL)
def test_hs_model_parameter_names_match_official_keys(name):
    # built on the meta device: no memory, no init cost
    with torch.device("meta"):
        model = RepOptVGG(name, 1000, mode="hs")
    scale_params = {n: tuple(p.shape) for n, p in model.named_parameters() if ".scale_" in n}
    official = _official(name)
    assert set(scale_params) == set(official)
    assert all(scale_params[k] == tuple(v.shape) for k, v in official.items())


def test_has_identity_default_strides():
    arch = get_arch("B1")
    ident = {b.name for b in arch.blocks if b.has_identity}
    expected = {f"stage{s}.{i}" for s, n in zip(range(1, 5), (4, 6, 16, 1)) for i in range(1, n)}
    assert ident == expected
    assert "stage0" not in ident and "stage4.0" not in ident


def test_has_identity_custom_strides():
    # tiny: stage0 = 8 channels, stage1 = 8 channels: a stride-1 stage1.0 gets the identity
    arch = get_arch("tiny", strides=(1, 1, 2, 2, 2))
    by_name = {b.name: b for b in arch.blocks}
    assert by_name["stage0"].stride == 1 and not by_name["stage0"].has_identity  # 3 -> 8 channels
    assert by_name["stage1.0"].stride == 1 and by_name["stage1.0"].has_identity
    assert not by_name["stage2.0"].has_identity  # stride 2 and 8 -> 16
    assert "stage1.0.scale_identity.weight" in arch.scale_shapes()
    # same widths but stride 2: no identity
    arch2 = get_arch("tiny", strides=(1, 2, 2, 2, 2))
    assert not {b.name: b for b in arch2.blocks}["stage1.0"].has_identity
    # stride 1 but widths differ (B1: 64 -> 128): no identity
    b1 = get_arch("B1", strides=(1, 1, 2, 2, 2))
    assert not {b.name: b for b in b1.blocks}["stage1.0"].has_identity
    # stride 1 on stage 2 with equal widths: stage2.0 of a family member with w1 == 2*w2 ... widths 16 -> 16
    eq = ArchSpec("eq", (1, 1, 1, 1), (0.25, 0.125, 0.25, 0.5), strides=(2, 2, 1, 2, 2))
    assert eq.stage_widths[1] == eq.stage_widths[2] == 16
    assert {b.name: b for b in eq.blocks}["stage2.0"].has_identity
    # the model follows the spec
    model = RepOptVGG(arch, 10, mode="hs")
    assert hasattr(model.stage1[0], "scale_identity")
    assert not hasattr(RepOptVGG("tiny", 10, mode="hs").stage1[0], "scale_identity")
    rep = RepOptVGG(arch, 10, mode="repvgg")
    assert hasattr(rep.stage1[0], "rbr_identity")


def test_with_strides_keeps_other_fields_and_original():
    base = get_arch("tiny")
    other = base.with_strides((1, 1, 1, 2, 2))
    assert other.strides == (1, 1, 1, 2, 2)
    assert other.num_blocks == base.num_blocks and other.width_multiplier == base.width_multiplier
    assert base.strides == (2, 2, 2, 2, 2)
    assert ArchSpec.from_dict(other.to_dict()) == other


# ---------------------------------------------------------------- HS init constants


@pytest.mark.parametrize("name", ["tiny", "small", "B1", "L1"])
def test_init_scales_constants(name):
    arch = get_arch(name)
    init = arch.init_scales()
    assert set(init) == set(arch.scale_shapes())
    for b in arch.blocks:
        expected = 1.0 if (b.stage == 0 or b.index == 0) else math.sqrt(2.0 / b.index)
        for kind in ("scale_conv", "scale_1x1"):
            t = init[f"{b.name}.{kind}.weight"]
            assert t.dtype == torch.float32 and t.shape == (b.out_channels,)
            assert torch.equal(t, torch.full((b.out_channels,), expected, dtype=torch.float32))
        if b.has_identity:
            assert torch.equal(init[f"{b.name}.scale_identity.weight"], torch.ones(b.out_channels))
    if name == "L1":
        # spot values: stage3.8 -> sqrt(2/8) = 0.5; stage3.2 -> 1
        assert init["stage3.8.scale_conv.weight"][0].item() == 0.5
        assert init["stage3.2.scale_1x1.weight"][0].item() == 1.0
        assert init["stage3.1.scale_1x1.weight"][0].item() == pytest.approx(math.sqrt(2.0))


@pytest.mark.parametrize("mode", ["hs", "csla"])
def test_hs_model_starts_at_init_scales(mode):
    arch = get_arch("small", strides=(1, 1, 2, 2, 2))
    model = RepOptVGG(arch, 10, mode=mode)
    params = dict(model.named_parameters())
    init = arch.init_scales()
    for key, value in init.items():
        assert torch.equal(params[key].detach(), value), key
    # csla: s_conv / s_1x1 are frozen, s_id trains
    for key in init:
        trainable = params[key].requires_grad
        if mode == "hs" or key.endswith("scale_identity.weight"):
            assert trainable, key
        else:
            assert not trainable, key


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_blocks=(1, 1, 1), width_multiplier=(1, 1, 1, 1)),
        dict(num_blocks=(1, 1, 1, 0), width_multiplier=(1, 1, 1, 1)),
        dict(num_blocks=(1, -2, 1, 1), width_multiplier=(1, 1, 1, 1)),
        dict(num_blocks=(1, 1, 1, 1), width_multiplier=(1, 1, 1)),
        dict(num_blocks=(1, 1, 1, 1), width_multiplier=(1, 0, 1, 1)),
        dict(num_blocks=(1, 1, 1, 1), width_multiplier=(1, 1, -1, 1)),
        dict(num_blocks=(1, 1, 1, 1), width_multiplier=(1, 1, 1, 1), strides=(2, 2, 2, 2)),
        dict(num_blocks=(1, 1, 1, 1), width_multiplier=(1, 1, 1, 1), strides=(2, 2, 3, 2, 2)),
        dict(num_blocks=(1, 1, 1, 1), width_multiplier=(1, 1, 1, 1), strides=(2, 2, 0, 2, 2)),
    ],
)
def test_bad_spec_raises_config_error(kwargs):
    with pytest.raises(ConfigError):
        ArchSpec("bad", **kwargs)


@pytest.mark.parametrize(
    "num_blocks, width_multiplier",
    [
        ((1, 1, 1, 1), (0.01, 0.01, 0.01, 0.01)),  # int(64*0.01) == 0 channels
        ((1, 1, 1, 1), (1, 1, 1, float("nan"))),  # plain ValueError from int(nan)
        ((1.5, 1, 1, 1), (1, 1, 1, 1)),  # silently truncated to 1 block
    ],
)
def test_degenerate_spec_raises_config_error(num_blocks, width_multiplier):
    with pytest.raises(ConfigError):
        ArchSpec("bad", num_blocks, width_multiplier)


def test_unknown_names_raise_config_error():
    with pytest.raises(ConfigError, match="B3"):
        get_arch("B3")
    with pytest.raises(ConfigError):
        get_arch("tiny", strides=(2, 2))
    with pytest.raises(ConfigError, match="bogus"):
        RepOptVGG("tiny", 10, mode="bogus")
    with pytest.raises(ConfigError):
        RepOptVGG("tiny", 0)
    with pytest.raises(ConfigError):
        RepOptVGG("nope", 10)
    assert isinstance(ConfigError("x"), repopt.RepOptError)


def test_registry_lists_all_names():
    names = repopt.arch_names()
    for n in ("B1", "B2", "L1", "L2", "tiny", "small"):
        assert n in names
        assert get_arch(n).name == n
    spec = get_arch("tiny")
    assert get_arch(spec) is spec


# ---------------------------------------------------------------- forward shapes


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strides", [None, (1, 1, 2, 2, 2)])
def test_forward_shape_every_mode(mode, strides):
    torch.manual_seed(0)
    arch = get_arch("tiny", strides=strides)
    model = RepOptVGG(arch, 7, mode=mode)
    x = torch.randn(3, 3, 32, 32)
    out = model.train()(x)
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    assert model.eval()(x).shape == (3, 7)
    assert [spec.name for spec, _ in model.blocks()] == [b.name for b in arch.blocks]


def test_hs_fused_forward_matches_branches():
    torch.manual_seed(1)
    arch = get_arch("tiny", strides=(1, 1, 2, 2, 2))
    a = RepOptVGG(arch, 5, mode="hs").double()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in a.named_parameters():
            if ".scale_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    b = RepOptVGG(arch, 5, mode="hs", fused_forward=True).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    a.eval(), b.eval()
    torch.testing.assert_close(b(x), a(x), rtol=1e-10, atol=1e-10)


def test_stride_geometry():
    # 32 px with ImageNet strides ends at 1 px; with (1,1,2,2,2) at 4 px
    for strides, size in [((2, 2, 2, 2, 2), 1), ((1, 1, 2, 2, 2), 4)]:
        model = RepOptVGG(get_arch("tiny", strides=strides), 3, mode="target").eval()
        feats = torch.randn(1, 3, 32, 32)
        for stage in (model.stage0, model.stage1, model.stage2, model.stage3, model.stage4):
            feats = stage(feats)
        assert feats.shape == (1, 64, size, size)


# ---------------------------------------------------------------- overrides from the config


def test_overridden_depth_and_width_are_another_architecture():
    base = get_arch("tiny")
    deeper = get_arch("tiny", num_blocks=[1, 1, 3, 1], width_multiplier=[0.25, 0.25, 0.25, 0.25])
    assert deeper.name == "tiny[num_blocks=1-1-3-1,width_multiplier=0.25-0.25-0.25-0.25]"
    assert deeper.depth == 1 + 6 and deeper.stage_widths == (16, 16, 32, 64, 128) and deeper != base
    assert get_arch("tiny", num_blocks=list(base.num_blocks)) == base  # no change, no new name
    assert get_arch("B1cpu").depth == 28 and get_arch("B1cpu_mid").depth == 15 and get_arch("B1cpu_shallow").depth == 6


def test_bad_overrides_are_one_clear_line():
    from hypersearch.config import HSConfig
    from repopt.config import to_typed

    with pytest.raises(ConfigError, match=r"^arch tiny\[num_blocks=1-2\]: num_blocks must be 4 positive integers"):
        to_typed({"arch": {"name": "tiny", "num_blocks": [1, 2]}}, HSConfig)
    with pytest.raises(ConfigError, match=r"^arch tiny\[width_multiplier=0-1-1-1\]: width_multiplier must be 4 positive"):
        to_typed({"arch": {"name": "tiny", "width_multiplier": [0, 1, 1, 1]}}, HSConfig)


def test_overrides_end_to_end_hs_scales_target(tmp_path, capsys):
    """HS with an overridden depth writes scales with the full spec; the target with the same overrides
    trains from them; a target of another depth refuses them with the arch it expected."""
    from hypersearch.app import main as hs_main
    from repopt.engine import load_checkpoint
    from repopt.scales import read_metadata
    from target_train.app import main as target_main
    from tests.helpers.runs import TINY, read_json, run_hydra

    spec = ["arch.num_blocks=[1,1,2,1]", "arch.width_multiplier=[0.25,0.25,0.25,0.25]"]
    expected = get_arch("tiny", [1, 2, 2, 2, 1], num_blocks=[1, 1, 2, 1], width_multiplier=[0.25] * 4)
    hs_dir, target_dir = tmp_path / "hs", tmp_path / "target"
    run_hydra(hs_main, TINY + spec + ["epochs=1", f"hydra.run.dir={hs_dir}"])
    assert read_metadata(hs_dir)["arch"] == expected.to_dict()
    hs = read_json(hs_dir / "metrics.json")
    assert hs["arch_spec"] == expected.to_dict() and hs["depth"] == 6 and hs["arch"] == expected.name
    run_hydra(target_main, TINY + spec + ["epochs=1", f"scales={hs_dir}", "deploy=false", f"hydra.run.dir={target_dir}"])
    target = read_json(target_dir / "metrics.json")
    assert target["status"] == "completed" and target["scales"]["kind"] == "file" and target["depth"] == 6
    assert load_checkpoint(target_dir / "last.pt")["arch"] == expected.to_dict()
    other = tmp_path / "other"
    run_hydra(
        target_main,
        TINY
        + [
            "arch.num_blocks=[1,1,3,1]",
            "arch.width_multiplier=[0.25,0.25,0.25,0.25]",
            "epochs=1",
            f"scales={hs_dir}",
            f"hydra.run.dir={other}",
        ],
        expect_exit=1,
    )
    err = capsys.readouterr().err
    assert "does not fit arch tiny[num_blocks=1-1-3-1,width_multiplier=0.25-0.25-0.25-0.25]" in err
    assert "stage3.2.scale_conv.weight" in err and not (other / "last.pt").exists()
