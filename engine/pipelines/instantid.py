"""InstantID on diffusers' SDXL ControlNet pipeline.

InstantID conditions SDXL on a face in two ways, both driven by the same identity tokens (a face
embedding passed through the adapter's Resampler):

* the UNet's cross-attention attends to them next to the text, through IP-Adapter attention
  processors (``to_k_ip``/``to_v_ip``), within the face's region when a mask is given;
* IdentityNet, a ControlNet, receives them as its ``encoder_hidden_states`` (instead of the text
  embeddings) together with an image of the face's five keypoints.

The stock ``StableDiffusionXLControlNetPipeline`` feeds the ControlNet the text embeddings, so
``InstantIDPipeline`` has its own ``__call__`` built from the parent's stages. The IP-Adapter
processors are attached to the shared UNet only while an InstantID image is being drawn
(``IdentityAdapter.attached``): outside that, the UNet is a plain SDXL UNet for text-to-image and
LoRA training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import StableDiffusionXLControlNetPipeline
from diffusers.image_processor import IPAdapterMaskProcessor
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from diffusers import ControlNetModel, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    from engine.pipelines.base import ResidentBase
    from engine.faces.analyzer import FaceRecord

# Colours of the five keypoints, in insightface's order: right eye, left eye, nose, mouth corners.
KEYPOINT_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (255, 0, 255),
)
_NOSE = 2
# IdentityNet's training images (InstantID's draw_kps, at about 1024 px): each limb joins a point to the
# nose as a filled ellipse 4 px in half-width, in that point's colour; the limbs are then dimmed to 60 %
# and the points drawn over them as full-colour dots of radius 10.
_LIMB_BRIGHTNESS = 0.6
_LIMB_HALF_WIDTH_AT_1024 = 4.0
_DOT_RADIUS_AT_1024 = 10.0
_ELLIPSE_VERTICES = 72
_FACE_MASK_MARGIN = 0.1  # of the face box's width (height) on each side
_WATERMARKED_SQUARE, _UNWATERMARKED_SQUARE = (1024, 1024), (1016, 1016)

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (steps done, total steps)."""


def draw_keypoints(kps: np.ndarray, size: int | tuple[int, int]) -> Image.Image:
    """Draw five face keypoints as IdentityNet's condition, on black: each point joined to the nose by
    a filled ellipse (the limb) in the point's colour at 60 % brightness, then a full-colour dot per point.

    ``kps`` is a (5, 2) array of (x, y) pixel coordinates in the output image; ``size`` is its
    side or (width, height). Sizes follow the training images' at 1024 px, scaled to the shorter side.
    """
    width, height = (size, size) if isinstance(size, int) else size
    points = _check_keypoints(kps)
    image = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    scale = min(width, height) / 1024
    half_width = max(1.0, _LIMB_HALF_WIDTH_AT_1024 * scale)
    radius = max(2.0, _DOT_RADIUS_AT_1024 * scale)
    for index, point in enumerate(points):
        if index != _NOSE:
            limb = tuple(int(c * _LIMB_BRIGHTNESS) for c in KEYPOINT_COLOURS[index])
            draw.polygon(_limb_outline(point, points[_NOSE], half_width), fill=limb)
    for (x, y), colour in zip(points, KEYPOINT_COLOURS):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    return image


def _limb_outline(start: np.ndarray, end: np.ndarray, half_width: float) -> list[tuple[float, float]]:
    """Vertices of the ellipse whose long axis runs from ``start`` to ``end``, ``half_width`` across."""
    centre = (start + end) / 2
    along = (end - start) / 2  # semi-major axis as a vector
    length = float(np.hypot(*along))
    across = np.array([-along[1], along[0]]) / length * half_width if length else np.array([0.0, half_width])
    angles = np.linspace(0.0, 2 * np.pi, _ELLIPSE_VERTICES, endpoint=False)
    outline = centre + np.cos(angles)[:, None] * along + np.sin(angles)[:, None] * across
    return [(float(x), float(y)) for x, y in outline]


def fit_keypoints(kps: np.ndarray, image_size: tuple[int, int], out_size: int | tuple[int, int]) -> np.ndarray:
    """Map keypoints from an image of ``image_size`` (width, height) into an output of ``out_size``
    (a square's side, or (width, height)).

    The image is scaled to fit the output and centred, so the face keeps its proportions.
    """
    return _fit_points(_check_keypoints(kps), image_size, out_size)


def face_region_mask(
    bbox: np.ndarray, image_size: tuple[int, int], out_size: int | tuple[int, int]
) -> Image.Image:
    """The face's region in the output, white on black: its box (x1, y1, x2, y2) in an image of
    ``image_size``, fitted into ``out_size`` as ``fit_keypoints`` fits the keypoints, and grown by a
    tenth of its size on each side.

    The UNet sees the mask downsampled to each attention's grid (down to 1/32 of the image), so a
    margin keeps the jaw and hairline inside it.
    """
    x1, y1, x2, y2 = np.asarray(bbox, dtype=np.float64)
    grow_x, grow_y = (x2 - x1) * _FACE_MASK_MARGIN, (y2 - y1) * _FACE_MASK_MARGIN
    corners = np.array([[x1 - grow_x, y1 - grow_y], [x2 + grow_x, y2 + grow_y]])
    (left, top), (right, bottom) = _fit_points(corners, image_size, out_size)
    mask = Image.new("L", _width_height(out_size), 0)
    ImageDraw.Draw(mask).rectangle([left, top, right, bottom], fill=255)
    return mask


def instantid_size(size: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) to draw InstantID at for a requested ``size``: 1016 × 1016 for exactly
    1024 × 1024, where InstantID's training watermarks show (ComfyUI_InstantID's advice), else ``size``."""
    return _UNWATERMARKED_SQUARE if tuple(size) == _WATERMARKED_SQUARE else size


def _fit_points(points: np.ndarray, image_size: tuple[int, int], out_size: int | tuple[int, int]) -> np.ndarray:
    width, height = image_size
    out_width, out_height = _width_height(out_size)
    scale = min(out_width / width, out_height / height)
    offset = np.array([(out_width - width * scale) / 2, (out_height - height * scale) / 2])
    fitted: np.ndarray = np.asarray(points, dtype=np.float64) * scale + offset
    return fitted


def _width_height(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def frontalness(kps: np.ndarray) -> float:
    """How squarely a face looks at the camera, from its five keypoints: 1 for a frontal, level face,
    towards 0 for a profile or a face on its side.

    Frontal means the nose halfway between the eyes and halfway between the mouth corners (a turned
    head moves it towards one side) and the eyes level (cos of their line's angle).
    """
    right_eye, left_eye, nose, right_mouth, left_mouth = _check_keypoints(kps)
    eyes, mouth = left_eye - right_eye, left_mouth - right_mouth
    if not np.any(eyes) or not np.any(mouth):
        return 0.0
    # Where the nose falls along each line, from 0 (the right-hand point) to 1 (the left-hand one).
    along_eyes = float(np.dot(nose - right_eye, eyes) / np.dot(eyes, eyes))
    along_mouth = float(np.dot(nose - right_mouth, mouth) / np.dot(mouth, mouth))
    turn = min(1.0, abs(along_eyes - 0.5) + abs(along_mouth - 0.5))
    level = max(0.0, float(eyes[0] / np.hypot(*eyes)))
    return (1.0 - turn) * level


def face_fraction(bbox: np.ndarray, image_size: tuple[int, int]) -> float:
    """The face box's side relative to its photo's (the square root of their areas' ratio), 0 to 1."""
    x1, y1, x2, y2 = np.asarray(bbox, dtype=np.float64)
    width, height = image_size
    area = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return min(1.0, float(np.sqrt(area / (width * height))))


def pose_index(faces: Sequence[FaceRecord]) -> int:
    """Which of the enrolled faces InstantID takes its pose from: the most frontal and largest in its
    photo (frontalness × face fraction; the first of equals).

    The keypoints are fitted into the output as the whole photo is, so a small face in its photo becomes
    a small face in the image, and a turned one a turned face.
    """
    if not faces:
        raise ValueError("no face to take a pose from")
    scores = [frontalness(face.kps) * face_fraction(face.bbox, face.image_size) for face in faces]
    return int(np.argmax(scores))


def _check_keypoints(kps: np.ndarray) -> np.ndarray:
    points = np.asarray(kps, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"expected 5 face keypoints of shape (5, 2), got shape {points.shape}")
    return points


class IdentityAdapter:
    """InstantID's adapter, kept apart from the UNet: the Resampler and the IP-Adapter processors.

    diffusers' ``load_ip_adapter`` builds both into the UNet; ``take_from`` takes them out again, so
    that the shared UNet stays plain until ``attached`` puts the processors back for one call.
    """

    def __init__(self, projection: IPAdapterPlusImageProjection, processors: dict[str, Any]) -> None:
        self.projection = projection
        self.processors = processors
        self._attention: tuple[int, dict[str, Any]] | None = None  # (id of a UNet, its attention modules)

    @classmethod
    def take_from(cls, unet: UNet2DConditionModel) -> IdentityAdapter:
        """Capture what ``load_ip_adapter`` installed in ``unet`` (call ``unload_ip_adapter`` after)."""
        if unet.encoder_hid_proj is None or unet.config.encoder_hid_dim_type != "ip_image_proj":
            raise ValueError("the UNet has no IP-Adapter loaded")
        (projection,) = unet.encoder_hid_proj.image_projection_layers
        # The Resampler's own attention layers show up in attn_processors too; keep the UNet's.
        processors = {k: v for k, v in unet.attn_processors.items() if not k.startswith("encoder_hid_proj.")}
        return cls(projection, processors)

    @property
    def embedding_dim(self) -> int:
        """Width of the face embedding the Resampler takes (512 for antelopev2)."""
        return int(self.projection.proj_in.in_features)

    def set_scale(self, scale: float) -> None:
        """Weight of the identity tokens in every cross-attention."""
        for processor in self.processors.values():
            if hasattr(processor, "to_k_ip"):
                processor.scale = [scale]

    def project(self, face_embeddings: torch.Tensor) -> torch.Tensor:
        """(batch, 512) face embeddings → (batch, tokens, cross_attention_dim) identity tokens."""
        weight = self.projection.proj_in.weight
        embeddings = face_embeddings.to(device=weight.device, dtype=weight.dtype)
        return self.projection(embeddings[:, None, :])

    @contextlib.contextmanager
    def attached(self, unet: UNet2DConditionModel) -> Iterator[None]:
        """Use the IP-Adapter attention processors in ``unet`` for the duration of the block."""
        modules = self._attention_modules(unet)
        previous = {name: module.processor for name, module in modules.items()}
        for name, module in modules.items():
            module.set_processor(self.processors[name])
        try:
            yield
        finally:
            for name, module in modules.items():
                module.set_processor(previous[name])

    def _attention_modules(self, unet: UNet2DConditionModel) -> dict[str, Any]:
        """``unet``'s attention modules by their ``attn_processors`` key, found once per UNet: walking the
        modules on every call (as ``set_attn_processor`` does) costs more than a few-step preview's step."""
        if self._attention is None or self._attention[0] != id(unet):
            found = {f"{name}.processor": module for name, module in unet.named_modules() if hasattr(module, "set_processor")}
            if set(found) != set(self.processors):
                raise ValueError("the UNet's attention layers are not the ones the identity adapter was taken from")
            self._attention = (id(unet), found)
        return self._attention[1]


class InstantIDPipeline(StableDiffusionXLControlNetPipeline):
    """SDXL + IdentityNet + InstantID adapter. Build with ``from_text2img`` to share modules."""

    identity: IdentityAdapter

    @classmethod
    def from_text2img(
        cls,
        text2img: StableDiffusionXLPipeline,
        controlnet: ControlNetModel,
        identity: IdentityAdapter,
    ) -> InstantIDPipeline:
        """A pipeline over the same module objects as ``text2img`` (no copies)."""
        unused = ("image_encoder", "feature_extractor")  # InstantID embeds faces with insightface
        parts = {k: v for k, v in text2img.components.items() if k not in unused}
        pipe = cls(
            **parts,
            controlnet=controlnet,
            force_zeros_for_empty_prompt=text2img.config.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
        pipe.identity = identity
        return pipe

    @property
    def _execution_device(self) -> torch.device:
        """The UNet's device. The resident pipelines are never offloaded, and diffusers' own lookup walks
        every module of every component on each read (≈ 10 ms on the tiny preset's CPU; a call reads it
        about seven times, a tenth of a few-step preview)."""
        return next(self.unet.parameters()).device  # ModelMixin.device walks the modules too

    @torch.no_grad()
    def __call__(
        self,
        *,
        prompt: str,
        face_embedding: torch.Tensor,
        keypoint_image: Image.Image,
        negative_prompt: str | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        identity_strength: float = 0.8,
        ip_adapter_scale: float = 0.8,
        generator: Sequence[torch.Generator] = (),
        num_images: int = 1,
        callback: StepCallback | None = None,
        face_mask: Image.Image | None = None,
        init_image: Image.Image | None = None,
        strength: float = 1.0,
    ) -> list[Image.Image]:
        """Draw ``num_images`` images of the face ``face_embedding`` (512,) posed by ``keypoint_image``.

        The output size is the keypoint image's size. ``generator`` holds one generator per image.
        ``face_mask`` (white where the face goes, the keypoint image's size; ``face_region_mask``) limits
        the identity tokens' share of the UNet's cross-attention to that region, through diffusers'
        ``ip_adapter_masks``; None: they act on the whole image. IdentityNet sees them either way.
        With ``init_image`` the images start from it (image-to-image, e.g. the face-detail pass): it is
        encoded, noised to the timestep ``strength`` of the way up, and only the remaining steps run
        (``strength`` 1 redraws it entirely; the last ``round(steps * strength)`` steps are taken).
        """
        self._check_identity_inputs(face_embedding, keypoint_image, generator, num_images)
        if face_mask is not None and face_mask.size != keypoint_image.size:
            raise ValueError(f"face_mask is {face_mask.size}, the keypoint image {keypoint_image.size}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must lie in (0, 1], got {strength}")
        width, height = keypoint_image.size
        do_cfg = guidance_scale > 1.0
        text = self._encode_text(prompt, negative_prompt, num_images, do_cfg)
        tokens = self._identity_tokens(face_embedding, num_images, do_cfg)
        control = self.prepare_image(
            keypoint_image, width, height, num_images, 1, self._execution_device,
            self.controlnet.dtype, do_classifier_free_guidance=do_cfg,
        )
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        timesteps = self.scheduler.timesteps
        if init_image is None:
            latents = self.prepare_latents(  # noise scaled by the first timestep's sigma
                num_images, self.unet.config.in_channels, height, width, text["embeds"].dtype,
                self._execution_device, list(generator),
            )
        else:
            image = init_image.convert("RGB").resize((width, height))
            latents, timesteps = self._noised(image, strength, list(generator), text["embeds"].dtype)
        masks = None if face_mask is None else [self._identity_mask(face_mask)]
        self.identity.set_scale(ip_adapter_scale)
        with self.identity.attached(self.unet):
            latents = self._denoise(
                latents, timesteps, text, tokens, control, (height, width), guidance_scale, identity_strength,
                list(generator), callback, masks,
            )
        return self._decode(latents)

    def _noised(
        self, image: Image.Image, strength: float, generator: list[torch.Generator], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``image``'s latents (one per generator) noised to the step where ``strength`` of the denoising
        is left, and the timesteps from there on; the scheduler is set to begin there (its timesteps
        already set)."""
        order = self.scheduler.order
        total = len(self.scheduler.timesteps) // order
        start = min(total - 1, max(0, total - round(total * strength)))
        timesteps = self.scheduler.timesteps[start * order :]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start * order)
        pixels = self.image_processor.preprocess(image).to(self._execution_device)
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.vae.to(dtype=torch.float32)
        try:
            clean = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()
        finally:
            if upcast:
                self.vae.to(dtype=torch.float16)
        clean = (clean * self.vae.config.scaling_factor).to(dtype)
        noise = torch.cat([
            torch.randn(clean.shape, generator=g, device=g.device, dtype=dtype).to(self._execution_device)
            for g in generator
        ])
        first = timesteps[:1].repeat(len(generator))
        return self.scheduler.add_noise(clean.expand(len(generator), -1, -1, -1), noise, first), timesteps

    def _identity_mask(self, face_mask: Image.Image) -> torch.Tensor:
        """The mask as IPAdapterAttnProcessor2_0 takes it: (1, images of the adapter = 1, height, width),
        0 or 1, on the execution device (it is downsampled there to each attention's grid)."""
        width, height = face_mask.size
        mask = IPAdapterMaskProcessor().preprocess(face_mask, height=height, width=width)
        return mask.reshape(1, 1, height, width).to(self._execution_device, torch.float32)

    def _check_identity_inputs(
        self,
        face_embedding: torch.Tensor,
        keypoint_image: Image.Image,
        generator: Sequence[torch.Generator],
        num_images: int,
    ) -> None:
        expected = (self.identity.embedding_dim,)
        if tuple(face_embedding.shape) != expected:
            raise ValueError(f"face_embedding must have shape {expected}, got {tuple(face_embedding.shape)}")
        width, height = keypoint_image.size
        if width % self.vae_scale_factor or height % self.vae_scale_factor:
            raise ValueError(f"image size {width}x{height} is not a multiple of {self.vae_scale_factor}")
        if num_images < 1 or len(generator) != num_images:
            raise ValueError(f"need one generator per image: {len(generator)} for {num_images} images")

    def _encode_text(
        self, prompt: str, negative_prompt: str | None, num_images: int, do_cfg: bool
    ) -> dict[str, torch.Tensor]:
        """Text embeddings and pooled embeddings, negative first when guidance is on."""
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            prompt=prompt,
            device=self._execution_device,
            num_images_per_prompt=num_images,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt or None,
        )
        if do_cfg:
            embeds = torch.cat([negative, embeds])
            pooled = torch.cat([negative_pooled, pooled])
        return {"embeds": embeds, "pooled": pooled}

    def _identity_tokens(self, face_embedding: torch.Tensor, num_images: int, do_cfg: bool) -> torch.Tensor:
        """Resampler tokens of the face; the unconditional half is the tokens of a zero embedding."""
        faces = face_embedding[None].expand(num_images, -1)
        if do_cfg:
            faces = torch.cat([torch.zeros_like(faces), faces])
        return self.identity.project(faces).to(self.unet.dtype)

    def _denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: dict[str, torch.Tensor],
        tokens: torch.Tensor,
        control: torch.Tensor,
        size: tuple[int, int],
        guidance_scale: float,
        identity_strength: float,
        generator: list[torch.Generator],
        callback: StepCallback | None,
        identity_masks: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The denoising loop over ``timesteps`` (the scheduler's, already set, or their tail).

        IdentityNet sees the identity tokens; the UNet sees text + identity tokens, the latter masked to
        ``identity_masks`` when given (diffusers' ``ip_adapter_masks``: one per adapter).
        """
        added = {"text_embeds": text["pooled"], "time_ids": self._time_ids(size, text["pooled"])}
        # A masked IP-Adapter takes its tokens per image of the adapter: (batch, 1 image, tokens, dim).
        unet_tokens = tokens if identity_masks is None else tokens[:, None]
        attention = None if identity_masks is None else {"ip_adapter_masks": identity_masks}
        do_cfg = guidance_scale > 1.0  # the conditioning then holds [unconditional, conditional]
        for index, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            down, mid = self.controlnet(
                model_input, t, encoder_hidden_states=tokens, controlnet_cond=control,
                conditioning_scale=identity_strength, added_cond_kwargs=added, return_dict=False,
            )
            noise = self.unet(
                model_input, t, encoder_hidden_states=(text["embeds"], [unet_tokens]),
                down_block_additional_residuals=down, mid_block_additional_residual=mid,
                added_cond_kwargs=added, cross_attention_kwargs=attention, return_dict=False,
            )[0]
            if do_cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise, t, latents, generator=generator, return_dict=False)[0]
            if callback is not None:
                callback(index + 1, len(timesteps))
        return latents

    def _time_ids(self, size: tuple[int, int], pooled: torch.Tensor) -> torch.Tensor:
        """SDXL's micro-conditioning: original size, crop origin, target size (no crop)."""
        time_ids = self._get_add_time_ids(
            size, (0, 0), size, dtype=pooled.dtype, text_encoder_projection_dim=int(pooled.shape[-1])
        )
        return time_ids.to(pooled.device).repeat(pooled.shape[0], 1)

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents → PIL images, in float32 when the VAE is float16 (SDXL's VAE overflows in it)."""
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.vae.to(dtype=torch.float32)
        try:
            latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
            image = self.vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                self.vae.to(dtype=torch.float16)
        return self.image_processor.postprocess(image, output_type="pil")



def render_preview(
    base: ResidentBase,
    embedding: np.ndarray,
    kps: np.ndarray,
    image_size: tuple[int, int],
    prompt: str,
    negative_prompt: str,
    seed: int,
    num_images: int,
    steps: int | None = None,
    callback: StepCallback | None = None,
    out_size: tuple[int, int] | None = None,
    while_locked: Callable[[], AbstractContextManager[object]] | None = None,
    bbox: np.ndarray | None = None,
    mask_identity: bool = True,
    init_image: Image.Image | None = None,
    strength: float = 1.0,
    guidance: float | None = None,
) -> list[Image.Image]:
    """Zero-shot InstantID images of one face, with the preset's guidance (or ``guidance``) and identity weights.

    ``embedding`` is the face's 512-d insightface embedding (InstantID was trained on the raw
    ``embedding``, not the normalised one); ``kps`` are its five keypoints in the coordinates of an
    image of ``image_size`` (width, height), fitted into the output, and ``bbox`` its box there.
    ``out_size`` is the output's (width, height), multiples of 8; None: the preset's square; a square of
    exactly 1024 is drawn at 1016 (``instantid_size``). With ``mask_identity`` and a ``bbox``, the
    UNet's attention to the identity tokens is limited to the face's region (``face_region_mask``), as
    InstantID's demo does by default ("enhance non-face region"); IdentityNet sees them either way.
    Image ``i`` is seeded with ``seed + i``, so each image is reproducible on its own. Holds ``base.gpu_lock`` while drawing;
    ``while_locked`` (e.g. a user's LoRA made active on the shared UNet) is entered inside the lock.
    With ``init_image`` the images start from it at ``strength`` (``InstantIDPipeline.__call__``).
    Raises ``PreviewUnavailable`` on a base without InstantID (SD1.5).
    """
    instantid = base.require_instantid()
    preset = base.preset
    size = instantid_size(out_size or (preset.resolution, preset.resolution))
    keypoints = fit_keypoints(kps, image_size, size)
    keypoint_image = draw_keypoints(keypoints, size)
    face_mask = face_region_mask(bbox, image_size, size) if mask_identity and bbox is not None else None
    face = torch.from_numpy(np.asarray(embedding, dtype=np.float32))
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
    with base.gpu_lock, (while_locked or nullcontext)():
        return instantid(
            prompt=prompt,
            negative_prompt=negative_prompt,
            face_embedding=face,
            keypoint_image=keypoint_image,
            num_inference_steps=steps or preset.inference_steps,
            guidance_scale=preset.guidance_scale if guidance is None else guidance,
            identity_strength=preset.identity_strength,
            ip_adapter_scale=preset.ip_adapter_scale,
            generator=generators,
            num_images=num_images,
            callback=callback,
            face_mask=face_mask,
            init_image=init_image,
            strength=strength,
        )
