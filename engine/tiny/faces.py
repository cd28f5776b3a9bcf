"""Miniature stand-ins for insightface's antelopev2 face models, built offline with ``onnx.helper``.

The real antelopev2 (an SCRFD-10G detector, a glintr100 ArcFace recognizer and a gender/age model)
comes from ``avatarbooth models pull``; nothing here downloads anything. These three ONNX files have
the real models' signatures, so insightface's own ``model_zoo.get_model`` loads them as its ``SCRFD``,
``ArcFaceONNX`` and ``Attribute`` classes, and all the pre- and post-processing (anchor decoding,
thresholding, NMS, keypoint decoding, alignment, the attribute crop) is insightface's own code. Only
the networks are ours:

``scrfd_10g_bnkps.onnx``
    Input ``1×3×H×W`` (RGB, ``(x - 127.5) / 128``, as insightface feeds SCRFD). Nine outputs, like
    the real model: scores, box distances and five keypoints for strides 8, 16 and 32, two anchors
    per location, unbatched ``(N, C)`` rows. It is a hand-built skin-blob detector, not a learned
    one. It undoes the input normalisation and scores each 4×4 patch for skin-like colour (G/R and
    B/R close to the line skin tones lie on, and bright enough). At each stride it compares the skin
    fraction in a window seven strides wide with the ring above and beside it (not below: necks and
    shoulders are skin too), and keeps only maxima across neighbouring cells and strides. So a
    compact, bright, skin-coloured blob with non-skin (hair, background) around it fires once, if
    it is about 60 pixels or more across at the detector's input size (a tenth of a 640 input);
    flat, grey, blue or text images, and large skin-coloured areas such as warm walls, do not. The
    box is centred on the blob's skin centroid and sized from its skin area; the keypoints sit at
    fixed places in that box. Only the first anchor of each location fires. On insightface's
    ``t1.jpg`` it finds four of the six faces and nothing else; on scikit-image's astronaut, her
    face only.

``glintr100.onnx``
    Input ``N×3×112×112`` (an aligned face crop, ``(x - 127.5) / 127.5``), output ``N×512``. A
    band-pass filter and per-crop normalisation, then a small convolutional net with seeded random
    weights: the embedding is a deterministic function of the aligned crop. Re-encoded, rescaled or
    relit copies of one photo stay close (cosine above 0.8), a mirrored photo gives the same
    embedding (the weights are mirror-symmetric), and different faces mostly land below 0.4 (up to
    about 0.5). It does not know who anyone is.

``genderage.onnx``
    insightface's attribute model: input ``N×3×96×96`` (a square around the face box, 1.5 box sizes
    wide, which insightface's ``Attribute`` class cuts), output ``N×3``: two gender scores (female,
    male; insightface takes the argmax) and age / 100, named ``data`` and ``fc1`` like the mxnet
    export (insightface reads the names from the session). Per-crop standardisation, two
    mirror-symmetric seeded convolutions and a linear head with non-zero biases: the answer is a
    deterministic function of the crop that differs between faces (the astronaut reads as a woman,
    t1.jpg's faces both ways), the same for a mirrored selfie. It knows nobody's gender or age.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNIZER_FILE = "glintr100.onnx"
GENDERAGE_FILE = "genderage.onnx"
EMBEDDING_DIM = 512
RECOGNIZER_SIZE = 112
GENDERAGE_SIZE = 96  # insightface's model_zoo routes a 96×96 input to its Attribute class

_OPSET = 17
_IR_VERSION = 8  # accepted by every onnxruntime the project supports
_STRIDES = (8, 16, 32)
_NUM_ANCHORS = 2
_PATCH = 4  # skin is scored on 4×4 pixel patches

# Skin colour, on 4×4 patches, in (G/R, B/R): skin tones lie along a line in that plane (light to
# saturated), so the Gaussian is long along the line and narrow across it. Fitted on the faces of
# insightface's t1.jpg and scikit-image's astronaut.
_SKIN_CENTRE = (0.79, 0.64)
_SKIN_AXIS = (0.568, 0.823)  # unit vector along the skin line
_SKIN_WIDTHS = (0.23, 0.023)  # along, across
_SKIN_MIN_SUM = (425.0, 20.0)  # soft floor on R+G+B: sigmoid((r + g + b - 425) / 20)

# Blob score: sigmoid(gain * (centre fraction - ring weight * ring fraction - offset)).
_WINDOW_STRIDES = 7  # the centre window is seven strides wide
_RING_SCALE = 1.5  # the ring around it is this many times as wide
_SCORE_GAIN = 12.0
_SCORE_RING_WEIGHT = 1.32
_SCORE_OFFSET = 0.28

# Face box from the blob's skin area, and the five keypoints as fractions of the box around its centre.
_BOX_WIDTH_PER_SQRT_AREA = 1.15
_BOX_HEIGHT_PER_SQRT_AREA = 1.4
_KEYPOINTS = ((-0.3, -0.25), (0.3, -0.25), (0.0, 0.05), (-0.21, 0.26), (0.21, 0.26))

# Recognizer: a band-pass keeps what differs between aligned faces and drops the layout they share.
_BAND_LOW = 9  # box blur, in pixels: tolerance to a few pixels of misalignment
_BAND_HIGH = 41  # box blur subtracted: the layout every aligned face shares


def build_tiny_face_models(dest: Path, *, seed: int = 0) -> Path:
    """Write the tiny detector, recognizer and gender/age model into ``dest`` (antelopev2's layout).

    Deterministic for a given ``seed`` and fast (well under a second). Existing files are replaced.
    """
    dest.mkdir(parents=True, exist_ok=True)
    onnx.save_model(_detector_model(), str(dest / DETECTOR_FILE))
    onnx.save_model(_recognizer_model(seed), str(dest / RECOGNIZER_FILE))
    onnx.save_model(_genderage_model(seed), str(dest / GENDERAGE_FILE))
    return dest


class _GraphBuilder:
    """Accumulates nodes and initializers with generated, stable names."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self._prefix}{self._count}_{hint}"

    def const(self, value: Any, hint: str = "const") -> str:
        name = self._name(hint)
        array = np.asarray(value)
        array = array.astype(np.int64 if array.dtype.kind in "iu" else np.float32)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, out: str | None = None,
           **attrs: Any) -> Any:
        """Add one node; returns its output name (or a list of names when ``outputs`` > 1)."""
        names = [out] if out else [self._name(op_type.lower()) for _ in range(outputs)]
        node_name = self._name(f"node_{op_type.lower()}")
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=node_name, **attrs))
        return names[0] if outputs == 1 else names

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
              name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)],
                                  producer_name="avatarbooth-tiny-faces")
        model.ir_version = _IR_VERSION
        onnx.checker.check_model(model)
        return model


# --- detector -------------------------------------------------------------------------------------


def _detector_model() -> onnx.ModelProto:
    g = _GraphBuilder("det")
    skin = _skin_map(g, "input.1")
    maps = [_stride_maps(g, skin, stride) for stride in _STRIDES]
    scores = _scale_space_peaks(g, [score for score, _, _ in maps])
    rows = {
        "score": [_to_rows(g, score, 1, first_anchor_only=True) for score in scores],
        "bbox": [_to_rows(g, bbox, 4) for _, bbox, _ in maps],
        "kps": [_to_rows(g, kps, 10) for _, _, kps in maps],
    }
    outputs: list[onnx.ValueInfoProto] = []
    for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):  # insightface's output order
        for stride, row in zip(_STRIDES, rows[kind]):
            name = f"{kind}_{stride}"
            g.op("Identity", row, out=name)
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                         [f"anchors_{stride}", width]))
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])
    return g.model([image], outputs, "tiny_scrfd")


def _skin_map(g: _GraphBuilder, image: str) -> str:
    """(1,3,H,W) normalised input → (1,1,H/4,W/4) skin-likeness in [0, 1] per 4×4 patch."""
    rgb = g.op("Add", g.op("Mul", image, g.const(128.0)), g.const(127.5))  # undo (x - 127.5) / 128
    patches = g.op("AveragePool", rgb, kernel_shape=[_PATCH, _PATCH], strides=[_PATCH, _PATCH])
    red, green, blue = g.op("Split", patches, outputs=3, axis=1)
    red_safe = g.op("Add", red, g.const(1.0))
    ratios = g.op("Concat", g.op("Div", green, red_safe), g.op("Div", blue, red_safe), axis=1)
    z = g.op("Conv", ratios, g.const(_skin_projection()), g.const(_skin_projection_bias()),
             kernel_shape=[1, 1])
    distance = g.op("ReduceSum", g.op("Mul", z, z), g.const([1]), keepdims=1)
    chroma = g.op("Exp", g.op("Mul", distance, g.const(-0.5)))
    total = g.op("ReduceSum", patches, g.const([1]), keepdims=1)
    floor, softness = _SKIN_MIN_SUM
    bright = g.op("Sigmoid", g.op("Div", g.op("Sub", total, g.const(floor)), g.const(softness)))
    return str(g.op("Mul", chroma, bright))


def _skin_projection() -> np.ndarray:
    """1×1 conv weights: (G/R, B/R) → distances along and across the skin line, in widths."""
    along, across = np.asarray(_SKIN_AXIS), np.asarray([-_SKIN_AXIS[1], _SKIN_AXIS[0]])
    rows = np.stack([along / _SKIN_WIDTHS[0], across / _SKIN_WIDTHS[1]])
    return rows[:, :, None, None]


def _skin_projection_bias() -> np.ndarray:
    bias: np.ndarray = -(_skin_projection()[:, :, 0, 0] @ np.asarray(_SKIN_CENTRE))
    return bias


def _stride_maps(g: _GraphBuilder, skin: str, stride: int) -> tuple[str, str, str]:
    """(1,C,h,w) maps of one stride: blob score, 4 box distances, 10 keypoint offsets."""
    step = stride // _PATCH  # patches per cell
    size = _WINDOW_STRIDES * step  # centre window, in patches
    centre = g.op("Conv", skin, g.const(_window_weights(size)), kernel_shape=[size, size],
                  strides=[step, step], pads=[(size - step) // 2] * 4)
    ring = 2 * round(size * _RING_SCALE / 2)
    ring_fraction = g.op("Conv", skin, g.const(_ring_weights(size, ring)), kernel_shape=[ring, ring],
                         strides=[step, step], pads=[(ring - step) // 2] * 4)
    mass, moment_x, moment_y = g.op("Split", centre, outputs=3, axis=1)
    score = _blob_score(g, mass, ring_fraction, size)
    geometry = _blob_geometry(g, mass, moment_x, moment_y)
    boxes_and_points = g.op("Conv", geometry, g.const(_geometry_to_outputs(stride)),
                            g.const(_geometry_bias()), kernel_shape=[1, 1])
    bbox, kps = g.op("Split", boxes_and_points, g.const([4, 10]), outputs=2, axis=1)
    return score, bbox, kps


def _scale_space_peaks(g: _GraphBuilder, scores: list[str]) -> list[str]:
    """Zero every score that is not a maximum among its 3×3 neighbours at its own and adjacent strides.

    One blob then fires at one place and one stride, the way a trained detector's heads agree.
    """
    local = [g.op("MaxPool", s, kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]) for s in scores]
    kept = []
    for i, score in enumerate(scores):
        rivals = [local[i]]
        if i > 0:  # the finer stride, pooled down to this grid
            rivals.append(g.op("MaxPool", local[i - 1], kernel_shape=[2, 2], strides=[2, 2]))
        if i + 1 < len(scores):  # the coarser stride, repeated up to this grid
            rivals.append(g.op("Resize", local[i + 1], "", g.const([1.0, 1.0, 2.0, 2.0]),
                               mode="nearest"))
        best = g.op("Max", *rivals) if len(rivals) > 1 else rivals[0]
        is_peak = g.op("Cast", g.op("GreaterOrEqual", score, best), to=TensorProto.FLOAT)
        kept.append(str(g.op("Mul", score, is_peak)))
    return kept


def _window_weights(size: int) -> np.ndarray:
    """Conv weights (3,1,size,size): skin mass, and its x and y moments in pixels from the centre."""
    offsets = (np.arange(size) + 0.5 - size / 2) * _PATCH
    ones = np.ones((size, size))
    return np.stack([ones, np.tile(offsets, (size, 1)), np.tile(offsets[:, None], (1, size))])[:, None]


def _ring_weights(size: int, ring: int) -> np.ndarray:
    """Conv weights (1,1,ring,ring) averaging the ring above and beside the centre window.

    Below the window is left out: a neck, shoulders or a bare chest under a face are skin too.
    """
    weights = np.ones((ring, ring))
    start = (ring - size) // 2
    weights[start:, start:start + size] = 0.0  # the window and the column under it
    weights[start + size:, :] = 0.0  # everything below the window
    normalised: np.ndarray = weights / weights.sum()
    return normalised[None, None]


def _blob_score(g: _GraphBuilder, mass: str, ring_fraction: str, size: int) -> str:
    """High where the centre window is skin and the ring around it is not."""
    centre_fraction = g.op("Div", mass, g.const(float(size * size)))
    contrast = g.op("Sub", centre_fraction,
                    g.op("Add", g.op("Mul", ring_fraction, g.const(_SCORE_RING_WEIGHT)),
                         g.const(_SCORE_OFFSET)))
    return str(g.op("Sigmoid", g.op("Mul", contrast, g.const(_SCORE_GAIN))))


def _blob_geometry(g: _GraphBuilder, mass: str, moment_x: str, moment_y: str) -> str:
    """(1,4,h,w): skin centroid offset from the cell centre (x, y, pixels) and sqrt of skin area."""
    safe_mass = g.op("Add", mass, g.const(1e-3))
    centre_x = g.op("Div", moment_x, safe_mass)
    centre_y = g.op("Div", moment_y, safe_mass)
    side = g.op("Sqrt", g.op("Mul", mass, g.const(float(_PATCH * _PATCH))))
    return str(g.op("Concat", centre_x, centre_y, side, axis=1))


def _geometry_to_outputs(stride: int) -> np.ndarray:
    """1×1 conv weights: (centroid x, centroid y, sqrt area) → 4 box distances + 10 keypoint offsets.

    insightface multiplies both by the stride and measures them from the cell's corner (its anchor
    centre), which is half a stride before the window centre; the bias adds that half.
    """
    half_w, half_h = _BOX_WIDTH_PER_SQRT_AREA / 2, _BOX_HEIGHT_PER_SQRT_AREA / 2
    rows = [[-1, 0, half_w], [0, -1, half_h], [1, 0, half_w], [0, 1, half_h]]  # left, top, right, bottom
    for fx, fy in _KEYPOINTS:
        rows += [[1, 0, fx * _BOX_WIDTH_PER_SQRT_AREA], [0, 1, fy * _BOX_HEIGHT_PER_SQRT_AREA]]
    return np.asarray(rows, dtype=np.float32)[:, :, None, None] / stride


def _geometry_bias() -> np.ndarray:
    return np.asarray([-0.5, -0.5, 0.5, 0.5] + [0.5] * 10, dtype=np.float32)


def _to_rows(g: _GraphBuilder, maps: str, width: int, *, first_anchor_only: bool = False) -> str:
    """(1,C,h,w) → (h*w*anchors, C), anchors innermost, as SCRFD's decoder expects."""
    per_cell = g.op("Unsqueeze", g.op("Transpose", maps, perm=[0, 2, 3, 1]), g.const([3]))
    per_anchor = g.op("Expand", per_cell, g.const([1, 1, 1, _NUM_ANCHORS, 1]))
    if first_anchor_only:
        mask = np.zeros((1, 1, 1, _NUM_ANCHORS, 1))
        mask[..., 0, :] = 1.0
        per_anchor = g.op("Mul", per_anchor, g.const(mask))
    return str(g.op("Reshape", per_anchor, g.const([-1, width])))


# --- recognizer -----------------------------------------------------------------------------------


_RAW_NORM_SCALE = 4.25  # brings the raw norm on real photos from ≈ 5 to ≈ 22


def _recognizer_model(seed: int) -> onnx.ModelProto:
    g = _GraphBuilder("rec")
    rng = np.random.default_rng(seed)
    x = _standardise(g, "input.1")  # node names avoid "Sub"/"Mul": insightface would read mxnet
    for in_ch, out_ch, kernel in ((3, 16, 4), (16, 32, 2), (32, 32, 2)):  # 112 → 28 → 14 → 7
        weights = rng.normal(0.0, 1.0 / np.sqrt(in_ch * kernel * kernel), (out_ch, in_ch, kernel, kernel))
        x = g.op("Tanh", g.op("Conv", x, g.const(_mirror_symmetric(weights)),
                              kernel_shape=[kernel, kernel], strides=[kernel, kernel]))
    projection = rng.normal(0.0, 1.0 / np.sqrt(32 * 7 * 7), (EMBEDDING_DIM, 32, 7, 7))
    # Scaled so that raw embeddings have antelopev2's norm (≈ 22, not 1): InstantID takes the raw vector,
    # and a recognizer whose outputs were unit-length would hide a normalised vector reaching it.
    flat_projection = _RAW_NORM_SCALE * _mirror_symmetric(projection).reshape(EMBEDDING_DIM, -1).T
    g.op("MatMul", g.op("Flatten", x, axis=1), g.const(flat_projection), out="embedding")
    image = helper.make_tensor_value_info(
        "input.1", TensorProto.FLOAT, ["batch", 3, RECOGNIZER_SIZE, RECOGNIZER_SIZE])
    embedding = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", EMBEDDING_DIM])
    return g.model([image], [embedding], "tiny_arcface")


def _mirror_symmetric(weights: np.ndarray) -> np.ndarray:
    """Make weights equal to their left-right mirror, so a mirrored face gets the same embedding
    (front cameras often mirror selfies; a trained ArcFace is nearly mirror-invariant too)."""
    symmetric: np.ndarray = (weights + weights[..., ::-1]) / 2
    return symmetric


def _standardise(g: _GraphBuilder, image: str) -> str:
    """Band-pass, then per-crop unit variance: lighting and the layout every aligned face shares move
    the embedding little; the crop's own detail moves it most."""
    centred = g.op("Sub", _box_blur(g, image, _BAND_LOW), _box_blur(g, image, _BAND_HIGH))
    variance = g.op("ReduceMean", g.op("Mul", centred, centred), axes=[1, 2, 3], keepdims=1)
    return str(g.op("Div", centred, g.op("Sqrt", g.op("Add", variance, g.const(1e-4)))))


def _box_blur(g: _GraphBuilder, image: str, size: int) -> str:
    return str(g.op("AveragePool", image, kernel_shape=[size, size], strides=[1, 1],
                    pads=[size // 2] * 4, count_include_pad=0))


# --- gender and age -------------------------------------------------------------------------------


# The random stream of its weights, picked so that scikit-image's astronaut (Eileen Collins) reads as a
# woman with a clear margin while insightface's t1.jpg faces and LFW's split both ways: a fixed answer
# for everyone would hide a class word that ignores the photos.
_GENDERAGE_STREAM = 17
_GENDER_BIAS = 0.05  # the scores a featureless crop gets: (female, male) = (+b, -b), as a trained head has
_AGE_BIAS, _AGE_SPREAD = 0.32, 0.08  # age / 100 around 32, like the published model's adult outputs


def _genderage_model(seed: int) -> onnx.ModelProto:
    g = _GraphBuilder("ga")
    rng = np.random.default_rng([seed, _GENDERAGE_STREAM])  # its own stream: the recognizer is left alone
    x = _standardise_crop(g, "data")
    for in_ch, out_ch, kernel in ((3, 8, 4), (8, 16, 3)):  # 96 → 24 → 8
        weights = rng.normal(0.0, 1.0 / np.sqrt(in_ch * kernel * kernel), (out_ch, in_ch, kernel, kernel))
        x = g.op("Tanh", g.op("Conv", x, g.const(_mirror_symmetric(weights)),
                              kernel_shape=[kernel, kernel], strides=[kernel, kernel]))
    gender, age = (_mirror_symmetric(rng.normal(0.0, 1.0, (16, 8, 8))).reshape(-1) for _ in range(2))
    gender /= np.linalg.norm(gender)
    age *= _AGE_SPREAD / np.linalg.norm(age)
    # One direction decides: (female, male) = (+d, -d), so insightface's argmax is the sign of d.
    head = np.stack([gender, -gender, age], axis=1)
    bias = np.asarray([_GENDER_BIAS, -_GENDER_BIAS, _AGE_BIAS])
    g.op("Add", g.op("MatMul", g.op("Flatten", x, axis=1), g.const(head)), g.const(bias), out="fc1")
    image = helper.make_tensor_value_info(
        "data", TensorProto.FLOAT, ["batch", 3, GENDERAGE_SIZE, GENDERAGE_SIZE])
    scores = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["batch", 3])
    return g.model([image], [scores], "tiny_genderage")


def _standardise_crop(g: _GraphBuilder, image: str) -> str:
    """Per-crop zero mean and unit variance: the output does not depend on which input normalisation
    insightface picks for an attribute model (it guesses from the first node names)."""
    centred = g.op("Sub", image, g.op("ReduceMean", image, axes=[1, 2, 3], keepdims=1))
    variance = g.op("ReduceMean", g.op("Mul", centred, centred), axes=[1, 2, 3], keepdims=1)
    return str(g.op("Div", centred, g.op("Sqrt", g.op("Add", variance, g.const(1e-4)))))
