"""Drawing with per-user LoRA adapters on the tiny SDXL, and the "me" expansion."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from engine.render.renderer import AdapterRef, Renderer, RenderInputError, expand_me
from engine.train.lora import LoraTrainSettings, train_lora

SIZE = 64
PROMPT = "a photo of sks person"
DRAW = {"seed": 5, "size": (SIZE, SIZE), "steps": 2, "guidance": 5.0}


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("me as an astronaut", "sks person as an astronaut"),
        ("A portrait of ME in a meadow", "A portrait of sks person in a meadow"),
        ("Me, myself and I", "sks person, sks person and sks person"),
        ("i am a knight", "sks person am a knight"),
        ("a painting of me.", "a painting of sks person."),
        ("(me:1.2) with my dog", "(sks person:1.2) with my dog"),
        ("meadow, memes, time, mine, iris, Ice", "meadow, memes, time, mine, iris, Ice"),
        ("I'm on the moon", "I'm on the moon"),
        ("a cat", "a cat"),
    ],
)
def test_expand_me(prompt: str, expected: str) -> None:
    assert expand_me(prompt, "sks", "person") == expected


@pytest.fixture(scope="module")
def pipe(tiny_preset_dir: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_preset_dir / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lock() -> threading.Lock:
    return threading.Lock()


@pytest.fixture(scope="module")
def adapters(
    pipe: StableDiffusionXLPipeline, lock: threading.Lock, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, AdapterRef]:
    """Two users' LoRAs, trained with different seeds on different crops."""
    folder = tmp_path_factory.mktemp("adapters")
    refs = {}
    for user, seed in (("user_a", 1), ("user_b", 2)):
        rng = np.random.default_rng(seed)
        crops = [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(2)]
        settings = LoraTrainSettings(steps=3, rank=4, alpha=4, learning_rate=5e-2, resolution=SIZE, seed=seed)
        path = folder / f"{user}.safetensors"
        path.write_bytes(train_lora(pipe, lock, crops, "sks", "person", settings).weights)
        refs[user] = AdapterRef(user, path)
    return refs


@pytest.fixture
def renderers(pipe: StableDiffusionXLPipeline, lock: threading.Lock) -> Iterator[Callable[..., Renderer]]:
    """Makes renderers on the module's pipeline; unloads what they loaded afterwards."""
    made: list[Renderer] = []

    def make(**kwargs: int) -> Renderer:
        made.append(Renderer(pipe, lock, **kwargs))
        return made[-1]

    yield make
    for renderer in made:
        for adapter_id in renderer.loaded_adapters:
            renderer.forget(adapter_id)
    assert not getattr(pipe.unet, "peft_config", None)


def draw(renderer: Renderer, adapter: AdapterRef | None = None) -> np.ndarray:
    (image,) = renderer.draw(PROMPT, adapter=adapter, **DRAW)  # type: ignore[arg-type]
    assert image.size == (SIZE, SIZE)
    return np.asarray(image)


@pytest.mark.slow
def test_each_user_gets_their_own_adapter(
    renderers: Callable[..., Renderer], adapters: dict[str, AdapterRef]
) -> None:
    renderer = renderers()
    base = draw(renderer)
    a = draw(renderer, adapters["user_a"])
    b = draw(renderer, adapters["user_b"])
    a_again = draw(renderer, adapters["user_a"])
    base_again = draw(renderer)

    assert np.array_equal(a, a_again)
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, base) and not np.array_equal(b, base)
    assert np.array_equal(base, base_again)
    assert renderer.loaded_adapters == ["user_b", "user_a"]


@pytest.mark.slow
def test_adapters_load_once_and_base_is_never_reloaded(
    pipe: StableDiffusionXLPipeline,
    renderers: Callable[..., Renderer],
    adapters: dict[str, AdapterRef],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loads: list[str] = []
    original = pipe.load_lora_weights

    def counting(path: str, adapter_name: str) -> None:
        loads.append(adapter_name)
        original(path, adapter_name=adapter_name)

    monkeypatch.setattr(pipe, "load_lora_weights", counting)
    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", _refuse)
    unet = pipe.unet
    renderer = renderers()
    for user in ("user_a", "user_b", "user_a", "user_b", "user_a"):
        draw(renderer, adapters[user])
    draw(renderer)
    assert loads == ["user_a", "user_b"]
    assert pipe.unet is unet


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("the base was reloaded")


@pytest.mark.slow
def test_least_recently_used_adapter_is_unloaded(
    pipe: StableDiffusionXLPipeline, renderers: Callable[..., Renderer], adapters: dict[str, AdapterRef]
) -> None:
    renderer = renderers(max_adapters=1)
    a = draw(renderer, adapters["user_a"])
    draw(renderer, adapters["user_b"])
    assert renderer.loaded_adapters == ["user_b"]
    assert "user_a" not in pipe.unet.peft_config
    assert np.array_equal(draw(renderer, adapters["user_a"]), a)  # reloaded from its file, same image
    renderer.forget("user_a")
    assert renderer.loaded_adapters == []


@pytest.mark.slow
def test_lora_is_off_between_draws(
    pipe: StableDiffusionXLPipeline, renderers: Callable[..., Renderer], adapters: dict[str, AdapterRef]
) -> None:
    """Other users of the shared UNet (InstantID) must see the plain base after a LoRA draw."""
    renderer = renderers()
    base = draw(renderer)
    draw(renderer, adapters["user_a"])
    generator = torch.Generator("cpu").manual_seed(DRAW["seed"])  # type: ignore[arg-type]
    (direct,) = pipe(
        prompt=PROMPT, num_inference_steps=2, guidance_scale=5.0, width=SIZE, height=SIZE, generator=[generator]
    ).images
    assert np.array_equal(np.asarray(direct), base)


@pytest.mark.slow
def test_seeds_make_draws_reproducible(renderers: Callable[..., Renderer]) -> None:
    renderer = renderers()
    first = [np.asarray(im) for im in renderer.draw(PROMPT, **{**DRAW, "seed": 11}, num_images=2)]  # type: ignore[arg-type]
    again = [np.asarray(im) for im in renderer.draw(PROMPT, **{**DRAW, "seed": 11}, num_images=2)]  # type: ignore[arg-type]
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    assert not np.array_equal(first[0], first[1])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "  "}, "empty"),
        ({"num_images": 0}, "num_images"),
        ({"steps": 0}, "steps"),
        ({"size": (60, 64)}, "size"),
    ],
)
def test_bad_draw_requests_are_refused(
    pipe: StableDiffusionXLPipeline, lock: threading.Lock, kwargs: dict[str, object], message: str
) -> None:
    arguments = {"prompt": PROMPT, **kwargs}
    prompt = arguments.pop("prompt")
    with pytest.raises(RenderInputError, match=message):
        Renderer(pipe, lock).draw(prompt, **arguments)  # type: ignore[arg-type]


@pytest.mark.slow
def test_bad_adapters_are_refused(pipe: StableDiffusionXLPipeline, lock: threading.Lock, tmp_path: Path) -> None:
    renderer = Renderer(pipe, lock)
    with pytest.raises(RenderInputError, match="does not exist"):
        renderer.draw(PROMPT, adapter=AdapterRef("user_x", tmp_path / "missing.safetensors"), **DRAW)  # type: ignore[arg-type]
    with pytest.raises(RenderInputError, match="adapter id"):
        renderer.draw(PROMPT, adapter=AdapterRef("user.x", tmp_path / "x.safetensors"), **DRAW)  # type: ignore[arg-type]


def test_a_variation_is_drawn_from_its_source_image(renderers: Callable[..., Renderer]) -> None:
    # The tiny VAE has random weights, so it does not round-trip pixels: "close to the source" is not
    # measurable here. What is: the output is a function of the source, and differs from a fresh draw.
    renderer = renderers()
    first, second = (renderer.draw(PROMPT, seed=s, size=(SIZE, SIZE), steps=4)[0] for s in (1, 3))

    def vary(source: Image.Image) -> np.ndarray:
        (image,) = renderer.draw(PROMPT, seed=2, size=(SIZE, SIZE), steps=4, variation_of=source, strength=0.5)
        return np.asarray(image)

    fresh = np.asarray(renderer.draw(PROMPT, seed=2, size=(SIZE, SIZE), steps=4)[0])
    assert np.array_equal(vary(first), vary(first))
    assert not np.array_equal(vary(first), vary(second))
    assert not np.array_equal(vary(first), fresh)


def test_a_draw_stops_where_its_step_callback_raises_and_leaves_the_pipeline_as_it_was(
    renderers: Callable[..., Renderer], adapters: dict[str, AdapterRef], lock: threading.Lock
) -> None:
    renderer = renderers()
    seen: list[tuple[int, int]] = []

    def stop_after_two(done: int, total: int) -> None:
        seen.append((done, total))
        if done == 2:
            raise RuntimeError("cancelled")

    adapter = next(iter(adapters.values()))
    with pytest.raises(RuntimeError, match="cancelled"):
        renderer.draw(PROMPT, adapter=adapter, size=(64, 64), steps=5, on_step=stop_after_two)
    assert seen == [(1, 5), (2, 5)]  # stopped at the second of five steps
    assert not lock.locked()
    full = renderer.draw(PROMPT, size=(64, 64), steps=2, on_step=lambda done, total: seen.append((done, total)))
    assert seen[2:] == [(1, 2), (2, 2)] and len(full) == 1
