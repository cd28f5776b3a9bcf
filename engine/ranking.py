"""Which of a draw's images are kept, in which order: the NSFW screen, best-of-N by likeness, and the
face-detail pass (``engine.render.detail``) kept only where it makes the face look more like the user.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.faces.analyzer import DetectedFace, FaceAnalyzer, cosine
from engine.pipelines.nsfw import NsfwChecker
from engine.render.detail import face_region, redraw_face, to_crop

FaceRedraw = Callable[[Image.Image, np.ndarray, np.ndarray], Image.Image]
"""The face-detail pass's redraw: the face's square scaled to the preset's resolution, and the drawn
face's keypoints and box in the square's coordinates → the square redrawn at that size."""


@dataclass(frozen=True)
class Ranked:
    """An image on its way to the store: its likeness, the face it was measured on, and, once the
    face-detail pass ran, the likeness before and after it (``image`` is the better of the two)."""

    image: Image.Image
    flagged: bool  # withheld by the NSFW check: ``image`` is black
    score: float | None
    face: DetectedFace | None
    drawn_score: float | None = None  # the pass ran: the likeness of the image as drawn
    detailed_score: float | None = None  # the pass ran and found a face: the likeness of its result

    def order(self) -> tuple[bool, float]:
        return self.flagged, -2.0 if self.score is None else -self.score


class Ranking:
    """Best-of-N over a loaded face analyser and NSFW checker."""

    def __init__(self, faces: FaceAnalyzer, nsfw: NsfwChecker, resolution: int) -> None:
        self._faces = faces
        self._nsfw = nsfw
        self._resolution = resolution

    def rank(
        self,
        images: Sequence[Image.Image],
        target: np.ndarray | None,
        *,
        keep: int | None = None,
        redraw: FaceRedraw | None = None,
    ) -> list[Ranked]:
        """NSFW-screen ``images``, rank them by ArcFace cosine to ``target`` (flagged and faceless last),
        keep the best ``keep`` (all when None), give each kept face the face-detail pass when ``redraw``
        is given, and rank again."""
        screened = self._nsfw.screen(images)
        ranked = [
            Ranked(image, flagged, *(self.scored_face(image, target) if not flagged else (None, None)))
            for image, flagged in zip(screened.images, screened.flagged, strict=True)
        ]
        ranked.sort(key=Ranked.order)
        ranked = ranked[:keep] if keep is not None else ranked
        if redraw is not None and target is not None:
            ranked = sorted((self.detailed(item, target, redraw) for item in ranked), key=Ranked.order)
        return ranked

    def detailed(self, item: Ranked, target: np.ndarray, redraw: FaceRedraw) -> Ranked:
        """``item`` after the face-detail pass: the redrawn image when it scores higher (and passes the
        NSFW check), else the image as drawn; both scores recorded either way. Unchanged where there is
        no face, or the face is drawn near full resolution already."""
        if item.flagged or item.face is None or item.score is None:
            return item
        res = self._resolution
        region = face_region(item.image.size, item.face.bbox, res)
        if region is None:
            return item
        kps, box = to_crop(item.face.kps, region, res), to_crop(item.face.bbox, region, res)
        detailed = redraw_face(item.image, region, lambda crop: redraw(crop, kps, box), res)
        if self._nsfw.check([detailed])[0]:
            return dataclasses.replace(item, drawn_score=item.score)
        score, face = self.scored_face(detailed, target)
        outcome = dataclasses.replace(item, drawn_score=item.score, detailed_score=score)
        if score is not None and score > item.score:
            return dataclasses.replace(outcome, image=detailed, score=score, face=face)
        return outcome

    def scored_face(
        self, image: Image.Image, target: np.ndarray | None
    ) -> tuple[float | None, DetectedFace | None]:
        """The likeness of ``image``'s largest face to ``target`` (None without either), and that face."""
        if target is None:
            return None, None
        faces = self._faces.detect(np.asarray(image.convert("RGB")))
        if not faces:
            return None, None
        largest = faces[0]  # detect() sorts them largest first
        return round(cosine(largest.embedding, target), 4), largest
