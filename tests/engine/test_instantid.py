"""The resident base and the InstantID pipeline, on the tiny preset."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.pipelines.base import ResidentBase
from engine.faces.analyzer import FaceRecord
from engine.pipelines.instantid import (
    KEYPOINT_COLOURS,
    draw_keypoints,
    face_fraction,
    face_region_mask,
    fit_keypoints,
    frontalness,
    instantid_size,
    pose_index,
    render_preview,
)
from engine.presets import load_preset

pytestmark = pytest.mark.slow

KPS = np.array([[40.0, 50.0], [88.0, 50.0], [64.0, 72.0], [46.0, 96.0], [82.0, 96.0]])
SIZE = (128, 128)
PROMPT = "a photo of sks person"


@pytest.fixture(scope="module")
def base(tiny_preset_dir: Path) -> ResidentBase:
    return ResidentBase.load(load_preset("tiny", tiny_preset_dir.parent))


def face(seed: int) -> np.ndarray:
    """A face embedding with an insightface-like norm (~20)."""
    return np.random.default_rng(seed).normal(size=512).astype(np.float32)


def preview(base: ResidentBase, embedding: np.ndarray, kps: np.ndarray = KPS, seed: int = 7) -> np.ndarray:
    (image,) = render_preview(base, embedding, kps, SIZE, PROMPT, "", seed, 1, steps=2)
    return np.asarray(image, dtype=np.int16)


@pytest.fixture
def recorded_calls(base: ResidentBase) -> Iterator[dict[str, Any]]:
    """The keyword arguments the IdentityNet and the UNet receive, first step only."""
    calls: dict[str, Any] = {}

    def record(name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls.setdefault(name, kwargs)

        return hook

    handles = [
        base.instantid.controlnet.register_forward_pre_hook(record("controlnet"), with_kwargs=True),
        base.unet.register_forward_pre_hook(record("unet"), with_kwargs=True),
    ]
    yield calls
    for handle in handles:
        handle.remove()


def test_load_uses_from_pretrained(tiny_preset_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import ControlNetModel, StableDiffusionXLPipeline

    loaded: list[str] = []
    for cls in (StableDiffusionXLPipeline, ControlNetModel):
        original = cls.from_pretrained.__func__  # type: ignore[attr-defined]

        def spy(klass: type, path: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            loaded.append(Path(path).name)
            return _original(klass, path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))

    loaded_base = ResidentBase.load(load_preset("tiny", tiny_preset_dir.parent), device="cpu")

    assert loaded == ["sdxl", "identitynet"]
    assert loaded_base.device == torch.device("cpu") and loaded_base.dtype == torch.float32


def test_adapter_loads_every_key(base: ResidentBase, tiny_preset_dir: Path) -> None:
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    checkpoint = torch.load(tiny_preset_dir / "ip-adapter.bin", weights_only=True)
    projection = base.identity.projection
    ip_processors = [p for p in base.identity.processors.values() if hasattr(p, "to_k_ip")]

    assert isinstance(projection, IPAdapterPlusImageProjection)
    assert torch.equal(projection.proj_in.weight, checkpoint["image_proj"]["proj_in.weight"])
    assert torch.equal(projection.latents, checkpoint["image_proj"]["latents"])
    assert len(ip_processors) * 2 == len(checkpoint["ip_adapter"])
    for number, processor in zip(range(1, 2 * len(ip_processors), 2), ip_processors):
        assert torch.equal(processor.to_k_ip[0].weight, checkpoint["ip_adapter"][f"{number}.to_k_ip.weight"])
        assert torch.equal(processor.to_v_ip[0].weight, checkpoint["ip_adapter"][f"{number}.to_v_ip.weight"])


def test_pipelines_share_one_set_of_modules(base: ResidentBase) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        assert getattr(base.instantid, name) is getattr(base.text2img, name), name


def test_unet_stays_plain_outside_instantid(base: ResidentBase) -> None:
    preview(base, face(1))

    assert base.unet.encoder_hid_proj is None
    assert not any(hasattr(p, "to_k_ip") for p in base.unet.attn_processors.values())
    with base.gpu_lock:
        image = base.text2img(PROMPT, num_inference_steps=2).images[0]
    assert image.size == SIZE


def test_same_face_and_seed_reproduce_the_image(base: ResidentBase) -> None:
    assert np.array_equal(preview(base, face(1)), preview(base, face(1)))


def test_another_face_changes_the_image(base: ResidentBase) -> None:
    assert np.abs(preview(base, face(1)) - preview(base, face(2))).mean() > 1.0


def test_other_keypoints_change_the_image(base: ResidentBase) -> None:
    assert np.abs(preview(base, face(1)) - preview(base, face(1), kps=KPS[::-1] * 0.5)).mean() > 1.0


def test_identitynet_gets_the_identity_tokens(base: ResidentBase, recorded_calls: dict[str, Any]) -> None:
    embedding = face(3)
    preview(base, embedding)

    faces = torch.from_numpy(embedding)[None]
    expected = base.identity.project(torch.cat([torch.zeros_like(faces), faces])).detach()
    given = recorded_calls["controlnet"]["encoder_hidden_states"]
    text, (unet_tokens,) = recorded_calls["unet"]["encoder_hidden_states"]
    # The pipeline's projection vs this manual call (different tensors, so possibly different alignment and
    # last bits): a tight tolerance. Negative half: tokens of a zero embedding.
    torch.testing.assert_close(given, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(unet_tokens, given)  # the very same tokens go on to the UNet
    assert given.shape != text.shape  # 16 identity tokens, not the 77 text tokens


def test_render_preview_seeds_each_image_and_fits_keypoints(base: ResidentBase) -> None:
    steps: list[tuple[int, int]] = []
    images = render_preview(
        base, face(1), KPS * 2, (256, 256), PROMPT, "", seed=7, num_images=2, steps=2,
        callback=lambda done, total: steps.append((done, total)),
    )

    first, second = (np.asarray(image, dtype=np.int16) for image in images)
    alone = preview(base, face(1), seed=7)  # same keypoints once fitted into 128 px
    assert np.abs(first - alone).max() <= 2  # batched arithmetic may round differently
    assert np.abs(first - second).mean() > 1.0
    assert steps == [(1, 2), (2, 2)]


def test_rejects_an_embedding_of_the_wrong_width(base: ResidentBase) -> None:
    with pytest.raises(ValueError, match="512"):
        render_preview(base, np.zeros(128, np.float32), KPS, SIZE, PROMPT, "", 0, 1, steps=2)


def test_draw_keypoints_colours_each_point() -> None:
    image = np.asarray(draw_keypoints(KPS, 128))

    for (x, y), colour in zip(KPS.astype(int), KEYPOINT_COLOURS):
        assert tuple(image[y, x]) == colour
    assert image[5, 5].tolist() == [0, 0, 0]
    assert image.shape == (128, 128, 3)


def test_draw_keypoints_draws_each_limb_as_a_dimmed_ellipse() -> None:
    # At 1024 px, as IdentityNet was trained: the right eye's limb runs level from (300, 400) to the nose
    # at (600, 400); the other points sit far below it.
    kps = np.array([[300.0, 400.0], [900.0, 100.0], [600.0, 400.0], [300.0, 900.0], [900.0, 900.0]])
    image = np.asarray(draw_keypoints(kps, 1024))
    limb = np.all(image == (153, 0, 0), axis=-1)  # the right eye's red at 60 %

    def thickness(x: int) -> int:
        return int(limb[:, x].sum())

    middle, near_the_eye, near_the_nose = thickness(450), thickness(320), thickness(580)
    assert 7 <= middle <= 10  # 4 px either side of the axis
    # An ellipse narrows towards its ends (a line would keep its width): at a tenth of the way in its
    # half-width is 4 * sqrt(1 - 0.8**2) = 2.4 px.
    assert near_the_eye <= middle - 3 and near_the_nose <= middle - 3
    assert thickness(298) == 0  # behind the dot, nothing of the limb
    rows = np.flatnonzero(limb[:, 450])
    assert rows.min() >= 395 and rows.max() <= 405  # centred on the axis
    assert tuple(image[400, 300]) == KEYPOINT_COLOURS[0]  # the dot is drawn over the limb, full colour


def test_fit_keypoints_keeps_proportions() -> None:
    kps = np.array([[0, 0], [400, 0], [200, 100], [0, 200], [400, 200]], dtype=float)

    fitted = fit_keypoints(kps, (400, 200), 100)

    assert fitted[:, 0].tolist() == [0, 100, 50, 0, 100]
    assert fitted[:, 1].tolist() == [25, 25, 50, 75, 75]


# A face turned to one side: the nose beyond the left eye, the mouth corners crowded on that side.
PROFILE_KPS = np.array([[70.0, 50.0], [92.0, 50.0], [104.0, 72.0], [80.0, 96.0], [98.0, 96.0]])


def _record(kps: np.ndarray, bbox: tuple[float, float, float, float], image_size: tuple[int, int]) -> FaceRecord:
    return FaceRecord(
        embedding=np.zeros(512, np.float32), kps=np.asarray(kps, np.float32),
        bbox=np.asarray(bbox, np.float32), image_size=image_size, norm=20.0,
    )


def _rotated(kps: np.ndarray, degrees: float) -> np.ndarray:
    angle = np.radians(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = kps.mean(axis=0)
    return (kps - centre) @ rotation.T + centre


def test_frontalness_is_one_for_a_level_frontal_face_and_falls_as_it_turns_or_tilts() -> None:
    assert frontalness(KPS) == pytest.approx(1.0)
    assert frontalness(PROFILE_KPS) < 0.1
    assert frontalness(_rotated(KPS, 30)) == pytest.approx(np.cos(np.radians(30)), abs=1e-6)
    assert frontalness(_rotated(KPS, 90)) == pytest.approx(0.0, abs=1e-6)
    half_turned = KPS.copy()
    half_turned[2, 0] += 10  # nose a fifth of the eye distance off centre
    assert 0.3 < frontalness(half_turned) < 0.9


def test_face_fraction_is_the_box_side_relative_to_the_photo() -> None:
    assert face_fraction(np.array([0, 0, 50, 50]), (100, 100)) == pytest.approx(0.5)
    assert face_fraction(np.array([10, 10, 110, 60]), (200, 100)) == pytest.approx(np.sqrt(5000 / 20000))


def test_the_pose_comes_from_the_most_frontal_largest_face() -> None:
    profile = _record(PROFILE_KPS, (40, 20, 120, 120), (128, 128))
    frontal = _record(KPS, (30, 20, 100, 110), (128, 128))
    small_frontal = _record(KPS * 0.25, (7, 5, 25, 28), (128, 128))

    assert pose_index([profile, frontal]) == 1
    assert pose_index([small_frontal, frontal]) == 1
    assert pose_index([frontal, small_frontal, profile]) == 0
    assert pose_index([frontal, frontal]) == 0  # the first of equals
    with pytest.raises(ValueError):
        pose_index([])


BOX = np.array([36.0, 36.0, 92.0, 104.0])  # the face's box around KPS, in the 128-px photo


def test_face_region_mask_is_the_box_fitted_and_grown_a_little() -> None:
    mask = np.asarray(face_region_mask(np.array([100, 50, 300, 150]), (400, 200), (100, 100))) > 0

    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    # Fitted: x and y halve, y moves down by 25; grown: 10 % of 50 (x) and 25 (y) px on each side.
    assert (columns.min(), columns.max()) == (20, 80)
    assert (rows.min(), rows.max()) == (35, 65)
    assert mask[rows.min():rows.max() + 1, columns.min():columns.max() + 1].all()


def test_the_identity_tokens_act_only_inside_the_face_region(
    base: ResidentBase, recorded_calls: dict[str, Any]
) -> None:
    render_preview(base, face(3), KPS, SIZE, PROMPT, "", 7, 1, steps=1, bbox=BOX)

    unet = recorded_calls["unet"]
    (mask,) = unet["cross_attention_kwargs"]["ip_adapter_masks"]
    text, (tokens,) = unet["encoder_hidden_states"]
    expected = torch.from_numpy(np.asarray(face_region_mask(BOX, SIZE, SIZE)) > 0)
    assert mask.shape == (1, 1, *SIZE) and torch.equal(mask[0, 0] > 0.5, expected)

    # One of the UNet's IP-Adapter attentions, run as the pipeline ran it, on the latents' 16 x 16 grid:
    # another face's tokens must change its output inside the face's region and nowhere far from it.
    name, processor = next((n, p) for n, p in base.identity.processors.items() if hasattr(p, "to_k_ip"))
    attention = base.unet.get_submodule(name.removesuffix(".processor"))
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens.shape[0], 16 * 16, attention.to_q.in_features, generator=generator)
    faces = torch.from_numpy(face(4))[None]
    other = base.identity.project(torch.cat([torch.zeros_like(faces), faces]))[:, None]

    def attend(identity: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = processor(attention, hidden, encoder_hidden_states=(text, [identity]), ip_adapter_masks=[mask])
        return out.reshape(tokens.shape[0], 16, 16, -1)

    change = (attend(tokens) - attend(other)).abs().amax(dim=(0, 3))  # per grid cell of 8 px
    region = np.asarray(face_region_mask(BOX, SIZE, SIZE)) > 0
    rows, columns = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    centres = np.arange(16) * 8 + 3.5
    inside_rows = (centres >= rows.min() + 4) & (centres <= rows.max() - 4)
    inside_columns = (centres >= columns.min() + 4) & (centres <= columns.max() - 4)
    far_rows = (centres < rows.min() - 16) | (centres > rows.max() + 16)
    far_columns = (centres < columns.min() - 16) | (centres > columns.max() + 16)
    inside = torch.from_numpy(inside_rows[:, None] & inside_columns[None, :])
    far = torch.from_numpy(far_rows[:, None] | far_columns[None, :])
    assert inside.any() and far.any()
    assert float(change[inside].min()) > 1e-4
    assert float(change[far].max()) == 0.0  # two cells or more from the region: untouched


def test_the_face_mask_can_be_switched_off(base: ResidentBase, recorded_calls: dict[str, Any]) -> None:
    render_preview(base, face(3), KPS, SIZE, PROMPT, "", 7, 1, steps=1, bbox=BOX, mask_identity=False)

    assert recorded_calls["unet"].get("cross_attention_kwargs") is None


def test_instantid_on_sdxl_avoids_the_square_where_its_training_watermarks_show(tmp_path: Path) -> None:
    from avatarbooth.models import files_for
    from engine.worker import aspect_size

    for rel in files_for("sdxl"):  # the preset's files, empty: its settings load, no weights
        (tmp_path / "sdxl" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sdxl" / rel).touch()
    sdxl = load_preset("sdxl", tmp_path)
    square = aspect_size("1:1", sdxl.resolution, 64)  # the worker's size for 1:1 on a full-size preset

    assert square == (1024, 1024) and instantid_size(square) == (1016, 1016)
    assert instantid_size(aspect_size("3:4", sdxl.resolution, 64)) == (896, 1152)
    assert instantid_size((128, 128)) == (128, 128)


def test_render_preview_draws_a_1024_square_at_1016(base: ResidentBase) -> None:
    (image,) = render_preview(base, face(1), KPS * 8, (1024, 1024), PROMPT, "", 7, 1, steps=1, out_size=(1024, 1024))

    assert image.size == (1016, 1016)


def test_an_init_image_starts_the_denoising_part_of_the_way_down(base: ResidentBase) -> None:
    """Image-to-image (the face-detail pass): the last ``strength`` of the steps run, from the init
    image's latents noised to that step, so the first UNet input still carries the image. (The tiny
    VAE's latents are small, about 0.04 once scaled: only the last steps' noise leaves them visible.)"""
    first_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (sample, timestep) of each draw's first step

    def record(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if not first_inputs or first_inputs[-1][0] is None:
            first_inputs.append((args[0].detach().clone(), torch.as_tensor(args[1]).clone()))

    def draw(**extra: Any) -> None:
        handle = base.unet.register_forward_pre_hook(record)
        try:
            render_preview(base, face(1), KPS, SIZE, PROMPT, "", 7, 1, steps=10, **extra)
        finally:
            handle.remove()

    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    steps: list[tuple[int, int]] = []
    draw(init_image=init, strength=0.1, callback=lambda done, total: steps.append((done, total)))
    assert steps == [(1, 1)]
    pipe = base.require_instantid()
    pipe.scheduler.set_timesteps(10)
    (started, t_started), = first_inputs
    assert float(t_started) == float(pipe.scheduler.timesteps[9])

    with torch.no_grad():
        clean = pipe.vae.encode(pipe.image_processor.preprocess(init)).latent_dist.mode().flatten()
    first_inputs.clear()
    draw()  # no init image: pure noise, unrelated to that image
    (unrelated, t_unrelated), = first_inputs
    assert float(t_unrelated) == float(pipe.scheduler.timesteps[0])
    assert torch.corrcoef(torch.stack([clean, started[1].flatten()]))[0, 1] > 0.5  # the conditional half
    assert abs(float(torch.corrcoef(torch.stack([clean, unrelated[1].flatten()]))[0, 1])) < 0.2


@pytest.mark.parametrize("strength", [0.0, 1.5])
def test_an_init_image_needs_a_strength_in_range(base: ResidentBase, strength: float) -> None:
    init = Image.new("RGB", SIZE)
    with pytest.raises(ValueError, match="strength"):
        render_preview(base, face(1), KPS, SIZE, PROMPT, "", 0, 1, steps=2, init_image=init, strength=strength)
