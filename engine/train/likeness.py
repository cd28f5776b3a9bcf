"""Best checkpoint by likeness: keep the weights whose drawings look most like the user, not the last ones.

The loss says how well the model denoises the crops, not whether its drawings are the user: a run can
overfit (every drawing a copy of one selfie) or stop short. EasyPhoto judges its LoRA by the face
similarity of a few renders at each checkpoint and keeps the best; ``BestByLikeness`` does the same for
LoRA, DreamBooth and Textual Inversion. Every ``every`` steps (and at the last step) it draws ``LIKENESS_PROMPTS`` with the
weights being trained, has a ``Judge`` score them (the worker's: ArcFace cosine of each drawn face to the
mean of the user's own crops), and keeps a copy of the trainable weights when the score is the best so
far. At the end the best weights go back into the model before it is saved.

It is opt-in (``[training] keep_best_by_likeness``): each evaluation draws ``len(LIKENESS_PROMPTS)``
images. Drawings without a face score nothing; when no evaluation found one, the last weights stay.
A run resumed from a checkpoint judges again from there (the best of the steps before the kill is not
kept in the checkpoint).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from engine.faces.analyzer import DetectedFace, FaceAnalyzer, cosine
from engine.train.stages import training_autocast

if TYPE_CHECKING:
    from engine.pipelines.base import TextToImagePipeline
    from engine.train.stages import TrainingState

_log = logging.getLogger(__name__)

Judge = Callable[[list[Image.Image]], float | None]
"""How much drawings look like the user (higher is more), or None when none has a face to judge."""

LIKENESS_PROMPTS = (
    "a close-up portrait photo of {subject}, looking at the camera",
    "a photo of {subject} smiling, outdoors, natural light",
    "a head and shoulders photo of {subject} in a studio",
)
"""Fixed prompts, so that scores of one run's checkpoints compare like with like."""


@dataclass
class BestByLikeness:
    """Judges a run's weights every ``every`` steps and remembers the best (see the module docstring)."""

    pipe: TextToImagePipeline  # the resident pipeline: its VAE, scheduler and frozen parts draw
    lock: threading.Lock
    judge: Judge
    subject: str  # "sks person": what the prompts draw
    every: int
    resolution: int
    steps: int  # denoising steps per drawing
    seed: int = 0
    # How to draw with, and what to keep of, a run's state: by default the UNet and encoders of
    # ``state.modules()`` and their trainable parameters (LoRA, DreamBooth); TI passes its own.
    view_for: Callable[[Any], Any] | None = None
    weights_of: Callable[[Any], Mapping[str, torch.nn.Parameter]] | None = None
    best_score: float | None = None
    best_step: int | None = None
    scores: dict[int, float | None] = field(default_factory=dict)  # step → score, for logs and tests
    _best: dict[str, torch.Tensor] | None = None

    @classmethod
    def for_run(
        cls, pipe: TextToImagePipeline, lock: threading.Lock, judge: Judge | None, subject: str,
        settings: Any, resolution: int | None = None, **views: Any,
    ) -> BestByLikeness | None:
        """The run's judge of its checkpoints, or None without a ``judge``. ``settings`` are LoRA's,
        DreamBooth's or TI's (each has ``checkpoint_every``, ``likeness_every``, ``likeness_steps``,
        ``resolution`` and ``seed``); ``views`` are ``view_for`` / ``weights_of`` where the state is not
        a ``TrainingState`` (TI)."""
        if judge is None:
            return None
        every = settings.likeness_every or settings.checkpoint_every
        return cls(pipe, lock, judge, subject, every, resolution or settings.resolution,
                   settings.likeness_steps, settings.seed, **views)

    def after_step(self, state: TrainingState, total: int) -> None:
        """Judge the weights when ``state.step`` is a multiple of ``every`` or the last step."""
        if state.step % self.every and state.step < total:
            return
        score = self.judge(self.draw(state))
        self.scores[state.step] = score
        if score is not None and (self.best_score is None or score > self.best_score):
            self.best_score, self.best_step = score, state.step
            self._best = {name: p.detach().clone() for name, p in self._weights(state).items()}

    def draw(self, state: TrainingState) -> list[Image.Image]:
        """``LIKENESS_PROMPTS`` drawn with the run's own (training) modules, one seeded image each."""
        view = self.view_for(state) if self.view_for is not None else _module_view(self.pipe, state)
        images = []
        # Autocast on a GPU: DreamBooth's copy is float32 beside the resident float16 parts.
        with self.lock, torch.no_grad(), training_autocast(view.unet, True):
            for i, prompt in enumerate(LIKENESS_PROMPTS):
                generator = torch.Generator("cpu").manual_seed(self.seed + i)
                out = view(prompt=prompt.format(subject=self.subject), num_inference_steps=self.steps,
                           width=self.resolution, height=self.resolution, generator=generator)
                images.extend(out.images)
        return images

    def _weights(self, state: Any) -> Mapping[str, torch.nn.Parameter]:
        return self.weights_of(state) if self.weights_of is not None else _trainable(state)

    def restore_best(self, state: TrainingState) -> int:
        """Put the best weights back into ``state``'s modules; returns the step they are from."""
        if self._best is None or self.best_step is None:
            _log.info("likeness: no drawing had a face to judge; keeping the last step's weights")
            return state.step
        if self.best_step != state.step:
            with torch.no_grad():
                for name, param in self._weights(state).items():
                    param.copy_(self._best[name])
        _log.info("likeness: keeping step %d of %d (score %.3f)", self.best_step, state.step, self.best_score)
        return self.best_step


def _module_view(pipe: TextToImagePipeline, state: TrainingState) -> Any:
    view: Any = copy.copy(pipe)  # a shallow view: the run's UNet and encoders, the resident rest
    for name, module in state.modules().items():
        view.__dict__[name] = module  # bypass DiffusionPipeline.__setattr__: the resident config stays
    return view


def judge_by_faces(faces: FaceAnalyzer, references: list[Image.Image]) -> Judge:
    """A ``Judge``: the mean ArcFace cosine of each drawing's largest face to the mean unit embedding
    of the faces in ``references`` (the user's own training crops). Drawings without a face count as
    nothing; None when none has one, or when no reference has a face either."""
    found = [_largest(faces, image) for image in references]
    embeddings = [face.embedding for face in found if face is not None]
    target = _unit(np.mean(embeddings, axis=0)) if embeddings else None

    def judge(images: list[Image.Image]) -> float | None:
        if target is None:
            return None
        drawn = [_largest(faces, image) for image in images]
        scores = [cosine(face.embedding, target) for face in drawn if face is not None]
        return float(np.mean(scores)) if scores else None

    return judge


def _largest(faces: FaceAnalyzer, image: Image.Image) -> DetectedFace | None:
    detected = faces.detect(np.asarray(image.convert("RGB")))
    return max(detected, key=lambda face: face.area) if detected else None


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def _trainable(state: TrainingState) -> Mapping[str, torch.nn.Parameter]:
    return {
        f"{prefix}.{name}": param
        for prefix, module in state.modules().items()
        for name, param in module.named_parameters()
        if param.requires_grad
    }
