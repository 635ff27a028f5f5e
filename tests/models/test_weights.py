import pytest
import torch

from models.vit import create_model
from models.weights import inflate_patch_kernel, load_pretrained, load_timm_vit, resample_pos_embed

TIMM_PAIRS = [  # (timm name, ours, extra kwargs for both: L keeps its width and heads, fewer blocks for time)
    ("vit_tiny_patch16_224", "vit_ti16", {}),
    ("vit_small_patch16_224", "vit_s16", {}),
    ("vit_base_patch16_224", "vit_b16", {}),
    ("vit_large_patch16_224", "vit_l16", {"depth": 4}),
]


def _random_timm(timm, name, **kw):
    model = timm.create_model(name, pretrained=False, num_classes=7, img_size=32, **kw).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial values everywhere (timm inits biases and tokens to ~0)
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize(("timm_name", "ours", "kw"), TIMM_PAIRS)
def test_dense_model_is_timm_vit(timm, timm_name, ours, kw):
    ref = _random_timm(timm, timm_name, **kw)
    model = create_model(ours, num_classes=7, img_size=32, **kw).eval()
    left = load_timm_vit(model, ref.state_dict())
    assert left == ["alpha", "router.proj.bias", "router.proj.weight"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(x, 1.0), want, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(model(x, 0.3), want, atol=1e-3)  # a budget really changes the computation


def test_gap_model_maps_fc_norm(timm):
    ref = _random_timm(timm, "vit_small_patch16_224", class_token=False, global_pool="avg")
    model = create_model("vit_s16", num_classes=7, img_size=32, pool="gap").eval()
    load_timm_vit(model, ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["central", "average"])
def test_vit_inflates_into_vivit_spatial_encoder(timm, method):
    """A static clip through the inflated ViViT gives, per frame, the ViT's normalised CLS feature."""
    ref = _random_timm(timm, "vit_tiny_patch16_224")
    model = create_model("vivit_ti16", num_classes=5, img_size=32, num_frames=4).eval()
    left = load_timm_vit(model, ref.state_dict(), inflate=method)
    assert "head.fc.weight" in left and "temporal_pos_embed" in left and "spatial_norm.weight" not in left
    frame = torch.randn(2, 3, 32, 32)
    clip = frame[:, :, None].expand(2, 3, 4, 32, 32)  # (B, C, T, H, W), the same frame 4 times
    with torch.no_grad():
        want = ref.forward_features(frame)[:, 0]  # (B, D): timm's `norm`(CLS)
        pooled, _ = model.encode_frames(model.embed_pixels(clip), None)  # (B*T', D)
        got = model.spatial_norm(pooled).view(2, 2, -1)  # (B, T', D)
    torch.testing.assert_close(got, want[:, None].expand_as(got), rtol=1e-4, atol=1e-4)


def test_inflation_and_resampling_shapes():
    w = torch.randn(8, 3, 16, 16)
    central = inflate_patch_kernel(w, 2, "central")
    assert central.shape == (8, 3, 2, 16, 16) and torch.equal(central[:, :, 1], w) and not central[:, :, 0].any()
    torch.testing.assert_close(inflate_patch_kernel(w, 4, "average").sum(2), w)
    with pytest.raises(ValueError, match="inflation"):
        inflate_patch_kernel(w, 2, "nearest")
    pos = torch.randn(1, 1 + 14 * 14, 8)
    out = resample_pos_embed(pos, 4, num_prefix=1)
    assert out.shape == (1, 17, 8) and torch.equal(out[:, 0], pos[:, 0])
    assert resample_pos_embed(pos, 14, num_prefix=0).shape == (1, 196, 8)


def test_pretrained_at_another_resolution_loads(timm):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    model = create_model("vivit_ti16", num_classes=5, img_size=64, num_frames=4)
    load_timm_vit(model, ref.state_dict())
    assert model.pos_embed.shape == (1, 17, 192)


def test_load_pretrained_from_files(timm, tmp_path):
    torch.manual_seed(0)
    src = create_model("vivit_tiny", num_classes=4).eval()
    src.alpha.data.fill_(0.3)
    torch.save(src.state_dict(), tmp_path / "mone.pt")
    dst = create_model("vivit_tiny", num_classes=4).eval()
    assert load_pretrained(dst, tmp_path / "mone.pt") == []
    x = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x, 0.3), src(x, 0.3))
    # other classes and frames: head left fresh, temporal positions interpolated
    other = create_model("vivit_tiny", num_classes=9, num_frames=16)
    assert load_pretrained(other, {"model": src.state_dict()}) == ["head.fc.bias", "head.fc.weight"]
    assert other.temporal_pos_embed.shape == (1, 8, 64)  # vivit_tiny: no temporal CLS (pool=max), width 64
    # a timm ViT state dict file, inflated into a ViViT; our own MoNE ViT too
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    torch.save({"state_dict": vit.state_dict()}, tmp_path / "timm.pth")
    video = create_model("vivit_ti16", num_classes=4, img_size=32, num_frames=4)
    assert "blocks.0.attn.qkv.weight" not in load_pretrained(video, tmp_path / "timm.pth")
    torch.testing.assert_close(video.blocks[3].mlp.fc1.weight, vit.blocks[3].mlp.fc1.weight)
    ours_vit = create_model("vit_tiny", num_classes=4)
    video_tiny = create_model("vivit_tiny", num_classes=4)
    left = load_pretrained(video_tiny, ours_vit.state_dict())
    assert "spatial_norm.weight" not in left and "router.proj.weight" in left
    torch.testing.assert_close(video_tiny.spatial_norm.weight, ours_vit.head.norm.weight)
    with pytest.raises(FileNotFoundError):
        load_pretrained(video_tiny, tmp_path / "missing.pt")


def test_load_pretrained_reads_safetensors(timm, tmp_path):
    """Our inference checkpoints (a directory with model.safetensors, or model.pt before safetensors), a bare
    .safetensors file, and timm's safetensors all load."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = create_model("vivit_tiny", num_classes=4).eval()
    src.alpha.data.fill_(0.3)
    (tmp_path / "ours").mkdir()
    (tmp_path / "legacy").mkdir()
    save_file(src.state_dict(), str(tmp_path / "ours" / "model.safetensors"))
    torch.save(src.state_dict(), tmp_path / "legacy" / "model.pt")
    x = torch.randn(1, 3, 8, 64, 64)
    for source in (tmp_path / "ours", tmp_path / "ours" / "model.safetensors", tmp_path / "legacy"):
        dst = create_model("vivit_tiny", num_classes=4).eval()
        assert load_pretrained(dst, source) == [], source
        with torch.no_grad():
            torch.testing.assert_close(dst(x, 0.3), src(x, 0.3))
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    save_file(vit.state_dict(), str(tmp_path / "timm.safetensors"))
    video = create_model("vivit_ti16", num_classes=4, img_size=32, num_frames=4)
    assert "blocks.0.attn.qkv.weight" not in load_pretrained(video, tmp_path / "timm.safetensors")
    torch.testing.assert_close(video.blocks[3].mlp.fc1.weight, vit.blocks[3].mlp.fc1.weight)
