"""Textual Inversion on the tiny SDXL and SD1.5: only the new rows train, the resident pipeline stays as
it was, and the saved file draws the same image in a fresh diffusers pipeline as in process."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load, save

from engine.progress import TrainingProgress
from engine.tiny.models import IMAGE_SIZE
from engine.personal.ti import SDXL_KEYS, TextualInversionFileError, load_ti, loaded_ti, unload_ti
from engine.train.ti import (
    TiTrainingState,
    TiTrainOutcome,
    TiTrainSettings,
    build_trainable,
    check_token,
    encode_prompts,
    native_resolution,
    start_training,
    train_textual_inversion,
)
from engine.train.stages import TrainingInputError
from tests.support import noise_crops

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SIZE = 64
TOKEN = "<u1>"
PROMPT = f"a photo of {TOKEN} person"
PLAIN_PROMPT = "a photo of person"
DRAW = {"num_inference_steps": 2, "guidance_scale": 5.0, "width": SIZE, "height": SIZE, "output_type": "np"}
SEED = 3
# A high learning rate so that a few steps visibly change the images (losses on random weights are noise).
SETTINGS = TiTrainSettings(steps=4, learning_rate=5e-2, vectors_per_token=2, resolution=SIZE, seed=0)
RESIDENT = ("unet", "vae", "text_encoder", "text_encoder_2")


def load_pipe(model_dir: Path) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def snapshot(pipe: DiffusionPipeline) -> dict[str, dict[str, torch.Tensor]]:
    modules = {name: getattr(pipe, name, None) for name in RESIDENT}
    return {
        name: {key: t.detach().clone() for key, t in module.state_dict().items()}
        for name, module in modules.items()
        if module is not None
    }


def assert_same(before: dict[str, dict[str, torch.Tensor]], after: dict[str, dict[str, torch.Tensor]]) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name
        changed = [key for key in before[name] if not torch.equal(before[name][key], after[name][key])]
        assert changed == [], name


def draw(pipe: DiffusionPipeline, prompt: str) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(SEED)
    return np.asarray(pipe(prompt=prompt, generator=generator, **DRAW).images[0])


def tokenizers(pipe: DiffusionPipeline) -> list[object]:
    return [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]


@pytest.fixture(scope="module", params=["sdxl", "sd15"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    """The pipeline folder of the tiny SDXL or SD1.5 preset (each built once per test session)."""
    if request.param == "sdxl":
        return request.getfixturevalue("tiny_preset_dir") / "sdxl"
    return request.getfixturevalue("tiny_sd15_preset_dir") / "sd15"


@dataclass
class Run:
    model_dir: Path
    pipe: DiffusionPipeline
    lock: threading.Lock
    resident_before: dict[str, dict[str, torch.Tensor]]
    vocab_sizes: list[int]
    initial: list[torch.Tensor]
    state: TiTrainingState
    outcome: TiTrainOutcome
    progress: list[TrainingProgress]


@pytest.fixture(scope="module")
def run(model_dir: Path) -> Run:
    """One training run on a resident pipeline, with everything the tests compare."""
    pipe, lock = load_pipe(model_dir), threading.Lock()
    resident = snapshot(pipe)
    vocab_sizes = [len(t) for t in tokenizers(pipe)]
    state = start_training(build_trainable(pipe, lock, TOKEN, "person", SETTINGS.vectors_per_token), SETTINGS)
    initial = [p.detach().clone() for p in state.trainable.parameters()]
    progress: list[TrainingProgress] = []
    outcome = train_textual_inversion(pipe, lock, noise_crops(), TOKEN, "person", SETTINGS, progress.append, state=state)
    return Run(model_dir, pipe, lock, resident, vocab_sizes, initial, state, outcome, progress)


def test_only_the_new_rows_train(run: Run) -> None:
    encoders = run.state.trainable.encoders
    assert len(encoders) == (2 if "text_encoder_2" in run.resident_before else 1)
    for encoder, initial in zip(encoders, run.initial):
        vectors = encoder.embedding.vectors.detach()
        assert vectors.shape == (SETTINGS.vectors_per_token, initial.shape[1])
        assert not torch.equal(vectors[0], initial[0]) and not torch.equal(vectors[1], initial[1])
        # Every other weight of the copy, the old embedding rows included, is the resident's.
        resident = run.resident_before[encoder.text_encoder_attr]
        copy_state = encoder.text_encoder.state_dict()
        copied = {k.replace(".base.", "."): v for k, v in copy_state.items() if ".rows." not in k}
        assert_same({"copy": resident}, {"copy": copied})


def test_new_rows_start_from_the_init_word(run: Run) -> None:
    for encoder, initial in zip(run.state.trainable.encoders, run.initial):
        (word_id,) = encoder.tokenizer("person", add_special_tokens=False).input_ids
        table = getattr(run.pipe, encoder.text_encoder_attr).get_input_embeddings().weight.detach()
        assert torch.equal(initial, table[word_id].expand_as(initial))


def test_resident_pipeline_is_untouched_by_training(run: Run) -> None:
    assert_same(run.resident_before, snapshot(run.pipe))
    for name in RESIDENT:
        module = getattr(run.pipe, name, None)
        assert module is None or all(p.grad is None for p in module.parameters()), name
    for tokenizer, size in zip(tokenizers(run.pipe), run.vocab_sizes):
        assert len(tokenizer) == size
        assert TOKEN not in tokenizer.get_vocab()
        assert TOKEN not in tokenizer.tokenize(PROMPT)


def test_progress_is_reported_every_step(run: Run) -> None:
    assert [p.step for p in run.progress] == list(range(1, SETTINGS.steps + 1))
    assert {p.total for p in run.progress} == {SETTINGS.steps}
    assert all(np.isfinite(p.loss) and p.eta_s >= 0 for p in run.progress)
    assert run.progress[-1].eta_s == 0
    assert run.outcome.steps == SETTINGS.steps
    assert run.outcome.final_loss == run.progress[-1].loss


def test_saved_file_holds_the_trained_rows_under_the_loader_keys(run: Run) -> None:
    tensors = load(run.outcome.weights)
    encoders = run.state.trainable.encoders
    expected_keys = list(SDXL_KEYS) if len(encoders) == 2 else [TOKEN]
    assert sorted(tensors) == sorted(expected_keys)
    for encoder in encoders:
        assert torch.equal(tensors[encoder.key], encoder.embedding.vectors.detach())


def test_training_encodes_prompts_as_a_draw_with_the_word_does(run: Run) -> None:
    trained = encode_prompts(run.state.trainable, [PROMPT], SIZE)
    with run.lock, loaded_ti(run.pipe, run.outcome.weights, TOKEN):
        drawn = run.pipe.encode_prompt(
            PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    # Two code paths (training's encoder call vs the pipeline's encode_prompt): the same matmuls can
    # differ in the last bit with the weights' memory alignment (seen on AVX-512), so a tight tolerance.
    torch.testing.assert_close(trained.prompt_embeds, drawn[0], rtol=1e-5, atol=1e-6)
    if trained.pooled_embeds is not None:
        torch.testing.assert_close(trained.pooled_embeds, drawn[2], rtol=1e-5, atol=1e-6)


def test_saved_file_draws_the_same_image_in_a_fresh_pipeline(run: Run, tmp_path: Path) -> None:
    path = tmp_path / "user.safetensors"
    path.write_bytes(run.outcome.weights)
    with run.lock:
        base = draw(run.pipe, PROMPT)
        plain = draw(run.pipe, PLAIN_PROMPT)
        with loaded_ti(run.pipe, path, TOKEN):
            with_word = draw(run.pipe, PROMPT)
        after = draw(run.pipe, PROMPT)

    fresh = draw_in_subprocess(run.model_dir, path, tmp_path / "fresh.npy")

    assert np.array_equal(fresh, with_word)
    assert not np.array_equal(with_word, plain), "the learned word does not change the image"
    assert not np.array_equal(with_word, base)
    assert np.array_equal(after, base), "unloading the word did not give the base image back"
    assert_same(run.resident_before, snapshot(run.pipe))
    for tokenizer, size in zip(tokenizers(run.pipe), run.vocab_sizes):
        assert len(tokenizer) == size
        assert set(tokenizer.added_tokens_encoder) == {"<|startoftext|>", "<|endoftext|>"}


def draw_in_subprocess(model_dir: Path, embedding: Path, out: Path) -> np.ndarray:
    """from_pretrained and plain load_textual_inversion in a new interpreter (the SDXL two-call recipe)."""
    script = textwrap.dedent(
        f"""
        import numpy as np, torch
        from diffusers import DiffusionPipeline
        from safetensors.torch import load_file
        torch.set_num_threads({torch.get_num_threads()})
        pipe = DiffusionPipeline.from_pretrained({str(model_dir)!r})
        pipe.set_progress_bar_config(disable=True)
        if getattr(pipe, "text_encoder_2", None) is None:
            pipe.load_textual_inversion({str(embedding)!r})
        else:
            state_dict = load_file({str(embedding)!r})
            pipe.load_textual_inversion(
                state_dict["clip_l"], token={TOKEN!r}, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
            )
            pipe.load_textual_inversion(
                state_dict["clip_g"], token={TOKEN!r}, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
            )
        generator = torch.Generator("cpu").manual_seed({SEED})
        image = pipe(prompt={PROMPT!r}, generator=generator, **{DRAW!r}).images[0]
        np.save({str(out)!r}, np.asarray(image))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(out)


def test_resuming_from_a_state_continues_the_same_run(run: Run) -> None:
    def fresh_state() -> TiTrainingState:
        return start_training(build_trainable(run.pipe, run.lock, TOKEN, "person", 1), settings)

    settings = dataclasses.replace(SETTINGS, steps=3, vectors_per_token=1)
    straight = train_textual_inversion(run.pipe, run.lock, noise_crops(), TOKEN, "person", settings)
    state = fresh_state()
    first_step = dataclasses.replace(settings, steps=1)
    train_textual_inversion(run.pipe, run.lock, noise_crops(), TOKEN, "person", first_step, state=state)
    resumed = train_textual_inversion(run.pipe, run.lock, noise_crops(), TOKEN, "person", settings, state=state)
    assert resumed.steps == 3 and resumed.weights == straight.weights
    assert all(t.shape[0] == 1 for t in load(straight.weights).values())


def test_a_file_for_another_base_is_refused_and_leaves_nothing_behind(run: Run) -> None:
    width = run.pipe.text_encoder.get_input_embeddings().embedding_dim
    sdxl = "text_encoder_2" in run.resident_before
    wrong = {"clip_l": torch.zeros(1, width)} if sdxl else {key: torch.zeros(1, width) for key in SDXL_KEYS}
    with pytest.raises(TextualInversionFileError):
        load_ti(run.pipe, save(wrong), TOKEN)
    with pytest.raises(TextualInversionFileError, match="safetensors"):
        load_ti(run.pipe, b"not a safetensors file", TOKEN)
    assert all(TOKEN not in t.get_vocab() for t in tokenizers(run.pipe))
    assert_same(run.resident_before, snapshot(run.pipe))


def test_a_word_that_is_already_loaded_is_refused_and_removed(run: Run) -> None:
    load_ti(run.pipe, run.outcome.weights, TOKEN)
    with pytest.raises(TextualInversionFileError, match="already"):
        load_ti(run.pipe, run.outcome.weights, TOKEN)
    assert all(TOKEN not in t.get_vocab() for t in tokenizers(run.pipe))
    unload_ti(run.pipe, TOKEN)  # a no-op now
    assert_same(run.resident_before, snapshot(run.pipe))


def test_default_resolution_is_the_base_native_size(run: Run) -> None:
    assert native_resolution(run.pipe) == IMAGE_SIZE


@pytest.mark.parametrize("token", ["person", "<U1>", "<u 1>", ""])
def test_tokens_the_tokenizer_cannot_learn_are_refused(run: Run, token: str) -> None:
    with pytest.raises(TrainingInputError):
        check_token(run.pipe, token)


@pytest.mark.parametrize(
    "bad",
    [{"steps": 0}, {"learning_rate": 0.0}, {"vectors_per_token": 0}, {"resolution": 60}, {"batch_size": 0}],
)
def test_bad_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(TrainingInputError):
        TiTrainSettings(**bad).check()  # type: ignore[arg-type]


def test_tiny_text_encoder_configs_carry_the_legacy_eos_token_id(tiny_preset_dir: Path) -> None:
    """As the published SD1.5/SDXL configs do: with 2, transformers pools at the highest token id."""
    for encoder in ("text_encoder", "text_encoder_2"):
        config = json.loads((tiny_preset_dir / "sdxl" / encoder / "config.json").read_text())
        assert config["eos_token_id"] == 2, encoder


def test_pooled_embedding_of_a_prompt_with_a_word_sees_past_the_word(tiny_preset_dir: Path) -> None:
    """SDXL's pooled conditioning pools at end-of-text, not at the added word (the highest token id)."""
    from engine.pipelines.base import ResidentBase
    from engine.presets import load_preset

    base = ResidentBase.load(load_preset("tiny", tiny_preset_dir.parent))
    pipe = base.text2img
    generator = torch.Generator().manual_seed(0)
    widths = [e.get_input_embeddings().embedding_dim for e in (pipe.text_encoder, pipe.text_encoder_2)]
    weights = save({key: torch.randn(1, width, generator=generator) for key, width in zip(SDXL_KEYS, widths)})

    def pooled(prompt: str) -> torch.Tensor:
        with torch.no_grad():
            out = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        return out[2]

    with base.gpu_lock, loaded_ti(pipe, weights, TOKEN):
        assert all(len(t) > t.eos_token_id + 1 for t in tokenizers(pipe)), "the word is not above end-of-text"
        short, long = pooled(PROMPT), pooled(f"{PROMPT} in the snow")
    assert (short - long).abs().max() > 1e-2 * short.abs().max(), "words after the added word are ignored"
