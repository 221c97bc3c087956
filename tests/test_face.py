"""Face preprocessing: crop rules, both detector backends, the BiSeNet parser, whitening."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from standin.bisenet import BiSeNet, background_mask, load_bisenet
from standin.errors import FaceModelError, InvalidImageError
from standin.face import (
    FaceConfig,
    FacePreprocessor,
    face_crop_box,
    fills_image,
    largest_face,
    preprocess_reference,
)
from standin.face_detectors import (
    SCRFD_FILE,
    FaceBox,
    RetinaFaceDetector,
    ScrfdDetector,
    nms,
    resize_bilinear,
)

DATA = Path(__file__).parent / "data"
FACES = DATA / "faces"

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402


def image_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


class FixedDetector:
    """A detector that reports the boxes it was given (for the selection rules)."""

    def __init__(self, boxes: list[FaceBox]) -> None:
        self.boxes = boxes

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        return list(self.boxes)


# ---------------------------------------------------------------- crop rules


def test_crop_is_a_centred_square_of_one_and_a_half_the_longer_side() -> None:
    face = FaceBox(100.7, 80.2, 180.9, 200.5, 0.9)  # truncated: 100, 80, 180, 200
    # centre (140, 140), longer side 120 → square 180, half 90
    assert face_crop_box(face, 640, 480) == (50, 50, 230, 230)


def test_crop_is_clipped_to_the_image() -> None:
    face = FaceBox(5, 20, 65, 100, 0.9)  # centre (35, 60), side int(80*1.5)=120, half 60
    assert face_crop_box(face, 300, 150) == (0, 0, 95, 120)


def test_face_touching_all_four_borders_uses_the_whole_image() -> None:
    assert face_crop_box(FaceBox(10, 3, 291, 145, 0.9), 300, 150) == (0, 0, 300, 150)
    # touching only three borders is still a crop
    assert not fills_image(FaceBox(10, 3, 289, 145, 0.9), 300, 150)
    assert face_crop_box(FaceBox(100, 3, 291, 145, 0.9), 300, 150) == (52, 0, 300, 150)


def test_no_face_uses_the_whole_image() -> None:
    assert face_crop_box(None, 300, 150) == (0, 0, 300, 150)


def test_largest_face_wins_over_the_most_confident() -> None:
    small = FaceBox(0, 0, 10, 10, 0.99)
    big = FaceBox(50, 50, 90, 95, 0.6)
    assert largest_face([small, big]) == big
    assert largest_face([]) is None


def test_nms_drops_overlapping_boxes_and_keeps_separate_ones() -> None:
    boxes = np.array([[0, 0, 100, 100], [5, 5, 105, 105], [200, 200, 260, 260]], np.float32)
    scores = np.array([0.8, 0.9, 0.7], np.float32)
    assert nms(boxes, scores, 0.4) == [1, 2]


def test_bilinear_resize_matches_half_pixel_sampling() -> None:
    img = np.array([[0, 100], [200, 255]], np.uint8)[:, :, None]
    up = resize_bilinear(img, 4, 4)[:, :, 0]
    # corners are copied, the centre 2×2 mixes all four pixels 9:3:3:1
    assert up[0, 0] == 0 and up[3, 3] == 255
    assert up[1, 1] == round((9 * 0 + 3 * 100 + 3 * 200 + 255) / 16)


# ---------------------------------------------------------------- offline backend


@pytest.fixture(scope="module")
def offline() -> FacePreprocessor:
    return FacePreprocessor(FaceConfig())


def test_offline_detector_finds_the_astronaut(offline: FacePreprocessor) -> None:
    ref = offline.process_bytes((FACES / "astronaut.jpg").read_bytes())
    face = ref.face
    assert face is not None and face.score > 0.9
    # Eileen Collins' face, hand-checked on the 320×320 photo
    np.testing.assert_allclose([face.x1, face.y1, face.x2, face.y2], [112, 37, 169, 110], atol=5)
    left, top, right, bottom = ref.crop
    assert right - left == bottom - top  # not clipped: a square
    assert abs((right - left) - 1.5 * (face.y2 - face.y1)) <= 3
    assert abs((left + right) / 2 - (face.x1 + face.x2) / 2) <= 1.5
    assert abs((top + bottom) / 2 - (face.y1 + face.y2) / 2) <= 1.5
    assert ref.image.size == (512, 512) and ref.image.mode == "RGB"
    assert ref.background is None  # the offline default does not whiten


def test_offline_detector_finds_a_face_in_a_greyscale_photo(offline: FacePreprocessor) -> None:
    ref = offline.process_bytes((FACES / "camera.png").read_bytes())
    assert ref.face is not None
    np.testing.assert_allclose(
        [ref.face.x1, ref.face.y1, ref.face.x2, ref.face.y2], [96, 58, 132, 103], atol=5
    )


def test_offline_detector_is_found_through_the_wheel() -> None:
    detector = RetinaFaceDetector()
    assert detector.detect(np.full((200, 300, 3), 255, np.uint8)) == []


def test_photo_without_a_face_is_padded_whole(offline: FacePreprocessor) -> None:
    ref = offline.process_bytes((FACES / "coffee.jpg").read_bytes())  # 240×160
    assert ref.face is None and ref.crop == (0, 0, 240, 160)
    out = ref.to_array()
    # 240×160 padded to 240² → white bands of 40/240 of the height above and below
    assert (out[:80] == 255).all() and (out[-80:] == 255).all()
    assert out[100:412].std() > 10


def test_blank_image_takes_the_no_face_path(offline: FacePreprocessor) -> None:
    blank = Image.new("RGB", (300, 200), (128, 128, 128))
    ref = offline.process_bytes(image_bytes(blank))
    assert ref.face is None and ref.crop == (0, 0, 300, 200)
    out = ref.to_array()
    assert (out[:85] == 255).all() and (out[86:426] == 128).all() and (out[427:] == 255).all()


def test_object_mode_skips_detection() -> None:
    pre = FacePreprocessor(FaceConfig(subject="object"))
    assert pre.detector is None
    ref = pre.process_bytes((FACES / "astronaut.jpg").read_bytes())
    assert ref.face is None and ref.crop == (0, 0, 320, 320)
    original = Image.open(FACES / "astronaut.jpg").convert("RGB").resize((512, 512), Image.BILINEAR)
    assert np.abs(ref.to_array().astype(int) - np.asarray(original, int)).mean() < 3


def test_face_filling_the_image_uses_the_whole_image() -> None:
    pre = FacePreprocessor(FaceConfig(), detector=FixedDetector([FaceBox(4, 2, 198, 97, 0.9)]))
    ref = pre.process(Image.new("RGB", (200, 100), (0, 90, 0)))
    assert ref.face is None and ref.crop == (0, 0, 200, 100)


def test_preprocess_reference_returns_512_rgb() -> None:
    out = preprocess_reference((FACES / "astronaut.jpg").read_bytes())
    assert isinstance(out, Image.Image) and out.size == (512, 512) and out.mode == "RGB"


def test_preprocess_reference_refuses_bad_uploads() -> None:
    with pytest.raises(InvalidImageError):
        preprocess_reference(b"not an image")
    data = (FACES / "astronaut.jpg").read_bytes()
    with pytest.raises(InvalidImageError, match="truncated or corrupt"):
        preprocess_reference(data[: len(data) // 3])


def test_unknown_backend_or_subject_is_refused() -> None:
    with pytest.raises(FaceModelError, match="backend"):
        FaceConfig(backend="dlib")  # type: ignore[arg-type]
    with pytest.raises(FaceModelError, match="subject"):
        FaceConfig(subject="dog")  # type: ignore[arg-type]
    with pytest.raises(FaceModelError, match="model_dir"):
        FaceConfig(backend="insightface")


# ---------------------------------------------------------------- production backend (SCRFD)


def make_scrfd_like(path: Path, *, batched: bool = False, size: int = 640) -> None:
    """Write an ONNX model with SCRFD's signature (input [1, 3, 640, 640]; 9 outputs:
    scores, box distances, keypoints for strides 8/16/32, 2 anchors per cell) that
    "detects" the bounding box of the dark pixels of its input.

    The box is reported by the second anchor of the stride-8 cell that holds the box
    centre, as distances from that cell's anchor centre, so the decoder's anchor order and
    stride scaling must be right for the box to come back.
    """
    i64 = TensorProto.INT64
    nodes, inits = [], []

    def const(name: str, value, dtype=np.int64) -> str:
        inits.append(
            helper.make_tensor(
                name,
                TensorProto.FLOAT if dtype == np.float32 else i64,
                np.shape(value),
                np.asarray(value, dtype).ravel(),
            )
        )
        return name

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    node("ReduceMean", ["input.1"], "grey", axes=[1], keepdims=0)  # [1, S, S]
    # "dark" is a band that excludes the black (0) padding the detector adds.
    node("Less", ["grey", const("dark_level", -0.5, np.float32)], "below")
    node("Greater", ["grey", const("black_level", -0.9, np.float32)], "above")
    node("And", ["below", "above"], "dark_b")
    node("Cast", ["dark_b"], "dark", to=TensorProto.FLOAT)
    node("ReduceMax", ["dark"], "rows", axes=[2], keepdims=0)  # [1, S]: any dark in row
    node("ReduceMax", ["dark"], "cols", axes=[1], keepdims=0)
    node("ReduceMax", ["dark"], "found", axes=[1, 2], keepdims=0)  # [1]
    node("ArgMax", ["rows"], "y1", axis=1, keepdims=0)
    node("ArgMax", ["rows"], "y2_last", axis=1, keepdims=0, select_last_index=1)
    node("Add", ["y2_last", const("one", [1])], "y2")
    node("ArgMax", ["cols"], "x1", axis=1, keepdims=0)
    node("ArgMax", ["cols"], "x2_last", axis=1, keepdims=0, select_last_index=1)
    node("Add", ["x2_last", const("one_b", [1])], "x2")
    cells = size // 8
    n8 = cells * cells * 2
    node("Div", [node("Add", ["x1", "x2"], "xs"), const("two_x", [2])], "cx")
    node("Div", [node("Add", ["y1", "y2"], "ys"), const("two_y", [2])], "cy")
    node("Div", ["cx", const("eight_x", [8])], "col")
    node("Div", ["cy", const("eight_y", [8])], "row")
    node("Mul", ["row", const("cells", [cells])], "row_off")
    node("Add", ["row_off", "col"], "cell")
    node("Add", [node("Mul", ["cell", const("anchors", [2])], "a0"), const("second", [1])], "idx")
    node(
        "OneHot", ["idx", const("depth", [n8]), const("onoff", [0.0, 1.0], np.float32)], "onehot", axis=-1
    )  # [1, n8]
    node("Mul", ["onehot", node("Unsqueeze", ["found", const("ax1", [1])], "found2")], "hit")
    node("Reshape", ["hit", const("score_shape", [n8, 1])], "score8")
    node("Mul", ["col", const("stride_x", [8])], "anchor_x")
    node("Mul", ["row", const("stride_y", [8])], "anchor_y")
    parts = []
    for name, a, b in [
        ("l", "anchor_x", "x1"),
        ("t", "anchor_y", "y1"),
        ("r", "x2", "anchor_x"),
        ("b", "y2", "anchor_y"),
    ]:
        parts.append(node("Sub", [a, b], f"d_{name}"))
    node("Concat", parts, "dist_i", axis=0)
    node("Cast", ["dist_i"], "dist_px", to=TensorProto.FLOAT)
    node("Div", ["dist_px", const("stride_f", 8.0, np.float32)], "dist")  # in stride units
    node("Expand", ["dist", const("box_shape", [n8, 4])], "box8")

    outputs = {"score8": (n8, 1), "box8": (n8, 4)}
    for stride in (16, 32):
        n = (size // stride) ** 2 * 2
        outputs[node("Identity", [const(f"s{stride}", np.zeros((n, 1)), np.float32)], f"score{stride}")] = (
            n,
            1,
        )
        outputs[node("Identity", [const(f"b{stride}", np.zeros((n, 4)), np.float32)], f"box{stride}")] = (
            n,
            4,
        )
    for stride in (8, 16, 32):
        n = (size // stride) ** 2 * 2
        outputs[node("Identity", [const(f"k{stride}", np.zeros((n, 10)), np.float32)], f"kps{stride}")] = (
            n,
            10,
        )
    order = ["score8", "score16", "score32", "box8", "box16", "box32", "kps8", "kps16", "kps32"]
    final = []
    for name in order:
        shape = outputs[name]
        if batched:
            name = node("Unsqueeze", [name, const(f"ax0_{name}", [0])], f"batched_{name}")
            shape = (1, *shape)
        final.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
    graph = helper.make_graph(
        nodes,
        "scrfd_like",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, size, size])],
        final,
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def dark_box_image() -> tuple[Image.Image, tuple[int, int, int, int]]:
    img = Image.new("RGB", (800, 600), (235, 225, 210))
    box = (300, 150, 460, 350)
    img.paste((45, 40, 35), box)
    return img, box


@pytest.fixture(scope="module")
def antelope_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("antelopev2")
    make_scrfd_like(d / SCRFD_FILE)
    return d


@pytest.mark.parametrize("batched", [False, True])
def test_scrfd_decoding_recovers_the_box(tmp_path: Path, batched: bool) -> None:
    make_scrfd_like(tmp_path / SCRFD_FILE, batched=batched)
    detector = ScrfdDetector(tmp_path / SCRFD_FILE)
    assert detector.batched == batched
    img, box = dark_box_image()
    faces = detector.detect(np.asarray(img))
    assert len(faces) == 1
    np.testing.assert_allclose([faces[0].x1, faces[0].y1, faces[0].x2, faces[0].y2], box, atol=2)
    assert detector.detect(np.full((600, 800, 3), 230, np.uint8)) == []


def test_insightface_backend_crops_around_the_detected_face(antelope_dir: Path) -> None:
    pre = FacePreprocessor(FaceConfig(backend="insightface", model_dir=antelope_dir))
    img, _ = dark_box_image()
    ref = pre.process_bytes(image_bytes(img, "JPEG"))
    assert ref.face is not None
    # box (300, 150, 460, 350): centre (380, 250), square int(200 × 1.5) = 300
    np.testing.assert_allclose(ref.crop, (230, 100, 530, 400), atol=3)
    out = ref.to_array()
    # the dark box spans 160/300 of the crop's width, centred
    dark_cols = np.where(out[256, :, 0] < 100)[0]
    assert abs(dark_cols.min() - 256 * (1 - 160 / 300)) <= 4
    assert abs(dark_cols.max() - 256 * (1 + 160 / 300)) <= 4


def test_missing_model_dir_is_a_face_model_error(tmp_path: Path) -> None:
    missing = tmp_path / "antelopev2"
    with pytest.raises(FaceModelError, match=f"does not exist: {missing}"):
        FacePreprocessor(FaceConfig(backend="insightface", model_dir=missing))


def test_model_dir_without_the_detector_names_what_it_holds(tmp_path: Path) -> None:
    (tmp_path / "glintr100.onnx").write_bytes(b"x" * 10)
    with pytest.raises(FaceModelError, match=r"missing SCRFD.*glintr100\.onnx"):
        FacePreprocessor(FaceConfig(backend="insightface", model_dir=tmp_path))


def test_git_lfs_pointer_is_a_face_model_error(tmp_path: Path) -> None:
    (tmp_path / SCRFD_FILE).write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 16923827\n"
    )
    with pytest.raises(FaceModelError, match=f"git-lfs pointer.*{SCRFD_FILE}"):
        FacePreprocessor(FaceConfig(backend="insightface", model_dir=tmp_path))


@pytest.mark.parametrize("keep", [0, 0.5])
def test_truncated_or_empty_detector_is_a_face_model_error(
    tmp_path: Path, antelope_dir: Path, keep: float
) -> None:
    data = (antelope_dir / SCRFD_FILE).read_bytes()
    (tmp_path / SCRFD_FILE).write_bytes(data[: int(len(data) * keep)])
    reason = "empty" if keep == 0 else "truncated or not an ONNX model"
    with pytest.raises(FaceModelError, match=f"{reason}.*" if keep == 0 else reason) as info:
        FacePreprocessor(FaceConfig(backend="insightface", model_dir=tmp_path))
    assert str(tmp_path / SCRFD_FILE) in str(info.value)


# ---------------------------------------------------------------- BiSeNet parser


def official_layout() -> list[tuple[str, tuple[int, ...]]]:
    entries = []
    for line in (DATA / "parsing_bisenet_keys.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, shape = line.partition(" ")
        entries.append((key, tuple(int(s) for s in shape.split(",") if s)))
    return entries


def random_parser_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised state dict in the official key layout (not from our module)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in official_layout():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(0, dtype=torch.long)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("running_mean") or (key.endswith("bias") and len(shape) == 1):
            sd[key] = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 1:  # BatchNorm scale
            sd[key] = 1 + torch.randn(shape, generator=g) * 0.1
        else:  # conv weight [out, in, k, k]
            fan_in = shape[1] * shape[2] * shape[3]
            sd[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return sd


@pytest.fixture(scope="module")
def parser_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("parser") / "parsing_bisenet.pth"
    sd = random_parser_weights()
    # Random heads rarely pick class 0 anywhere; make background and skin (1) compete on
    # the sign of one random projection so both appear, in image-dependent places.
    head = sd["conv_out.conv_out.weight"]
    head.zero_()
    head[0] = torch.randn(head.shape[1:], generator=torch.Generator().manual_seed(1))
    head[1] = -head[0]
    torch.save(sd, path)
    return path


def test_official_layout_matches_our_module() -> None:
    ours = {k: tuple(v.shape) for k, v in BiSeNet().state_dict().items()}
    assert ours == dict(official_layout())


def test_parser_loads_the_official_layout_and_parses(parser_file: Path) -> None:
    model = load_bisenet(parser_file)
    assert not model.training
    sd = torch.load(parser_file, weights_only=True)
    key = "cp.resnet.layer3.1.conv2.weight"
    assert torch.equal(model.state_dict()[key], sd[key])
    logits = model(torch.zeros(1, 3, 64, 96))
    assert logits.shape == (1, 19, 64, 96)


def test_parser_loads_files_without_batch_counters(tmp_path: Path) -> None:
    sd = {k: v for k, v in random_parser_weights().items() if "num_batches" not in k}
    torch.save(sd, tmp_path / "old.pth")
    load_bisenet(tmp_path / "old.pth")


def test_parser_missing_key_is_named(tmp_path: Path) -> None:
    sd = random_parser_weights()
    del sd["ffm.conv1.weight"]
    torch.save(sd, tmp_path / "p.pth")
    with pytest.raises(FaceModelError, match=r"missing ffm\.conv1\.weight"):
        load_bisenet(tmp_path / "p.pth")


def test_parser_wrong_shape_is_named(tmp_path: Path) -> None:
    sd = random_parser_weights()
    sd["conv_out.conv_out.weight"] = torch.zeros(11, 256, 1, 1)  # an 11-class parser
    torch.save(sd, tmp_path / "p.pth")
    with pytest.raises(FaceModelError, match=r"conv_out\.conv_out\.weight.*\(11, 256, 1, 1\)"):
        load_bisenet(tmp_path / "p.pth")


def test_parser_truncated_file_or_pointer_is_a_face_model_error(tmp_path: Path, parser_file: Path) -> None:
    data = parser_file.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(FaceModelError, match=f"{tmp_path / 'cut.pth'}"):
        load_bisenet(tmp_path / "cut.pth")
    (tmp_path / "ptr.pth").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(FaceModelError, match="git-lfs pointer"):
        load_bisenet(tmp_path / "ptr.pth")
    with pytest.raises(FaceModelError, match="missing"):
        load_bisenet(tmp_path / "nope.pth")


def test_background_is_white_exactly_where_the_parser_says_background(
    antelope_dir: Path, parser_file: Path
) -> None:
    config = FaceConfig(backend="insightface", model_dir=antelope_dir, parser_weights=parser_file)
    pre = FacePreprocessor(config)
    img, _ = dark_box_image()
    ref = pre.process(img)
    no_parser = FaceConfig(backend="insightface", model_dir=antelope_dir)
    unwhitened = FacePreprocessor(no_parser, detector=pre.detector)
    plain = unwhitened.process(img).to_array()
    mask = background_mask(pre.parser, plain)
    assert ref.background is not None and np.array_equal(ref.background, mask)
    assert 0.02 < mask.mean() < 0.98, "the random parser should see some background, not all"
    out = ref.to_array()
    assert (out[mask] == 255).all()
    assert np.array_equal(out[~mask], plain[~mask])
    assert (plain[mask] != 255).any(), "whitening must have changed something"
