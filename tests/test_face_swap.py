"""Face swap building blocks: landmarks, the robust similarity fit, warping, pasting, masks,
and the SDEdit schedule with background consistency."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from standin.errors import FaceModelError, InvalidRequestError
from standin.face import face_square
from standin.face_detectors import SCRFD_FILE, FaceBox, ScrfdDetector
from standin.face_landmarks import FaceLandmarks, RetinaFaceLandmarkDetector, ScrfdLandmarkDetector
from standin.face_swap import (
    FacePaster,
    Similarity,
    SwapReference,
    box_soft_mask,
    fit_similarity,
    fit_similarity_lmeds,
    landmark_soft_mask,
    parser_face_mask,
    paste,
    swap_reference,
    warp_affine,
)
from standin.sdedit import (
    BackgroundConsistency,
    hard_latent_mask,
    sdedit_schedule,
    sdedit_start_latents,
)

FACES = Path(__file__).parent / "data" / "faces"

# A frontal face's landmarks (left eye, right eye, nose, left and right mouth corner) in a
# 112×112 crop: the ArcFace alignment template's layout.
TEMPLATE = np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]])


def photo(name: str, upscale: float = 1.0) -> np.ndarray:
    img = Image.open(FACES / name).convert("RGB")
    if upscale != 1.0:
        img = img.resize((round(img.width * upscale), round(img.height * upscale)), Image.Resampling.LANCZOS)
    return np.asarray(img)


@functools.lru_cache(maxsize=1)
def retinaface() -> RetinaFaceLandmarkDetector:
    return RetinaFaceLandmarkDetector()


def about_centre(scale: float, angle: float, shift: tuple[float, float], centre: np.ndarray) -> Similarity:
    """Scale and rotate about `centre`, then translate by `shift`."""
    turn = Similarity.from_params(scale, angle, 0.0, 0.0)
    offset = centre + np.asarray(shift) - turn.apply(centre[None])[0]
    return Similarity(np.concatenate([turn.matrix[:, :2], offset[:, None]], axis=1))


def closed_form_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity written independently with complex numbers: w ≈ α·z + β.

    Returns the 2×3 matrix [[Re α, −Im α, Re β], [Im α, Re α, Im β]].
    """
    z = src[:, 0] + 1j * src[:, 1]
    w = dst[:, 0] + 1j * dst[:, 1]
    zc, wc = z - z.mean(), w - w.mean()
    alpha = np.sum(np.conj(zc) * wc) / np.sum(np.abs(zc) ** 2)
    beta = w.mean() - alpha * z.mean()
    return np.array([[alpha.real, -alpha.imag, beta.real], [alpha.imag, alpha.real, beta.imag]])


class FixedLandmarks:
    """A detector that reports the faces it was given, whatever the image."""

    def __init__(self, faces: list[FaceLandmarks]) -> None:
        self.faces = faces

    def detect_landmarks(self, image: np.ndarray) -> list[FaceLandmarks]:
        return list(self.faces)


def face_at(points: np.ndarray, score: float = 0.9) -> FaceLandmarks:
    lo, hi = points.min(axis=0) - 20, points.max(axis=0) + 20
    return FaceLandmarks(FaceBox(lo[0], lo[1], hi[0], hi[1], score), np.asarray(points, np.float64))


# ---------------------------------------------------------------- landmarks on real photos


def test_offline_detector_finds_five_landmarks_inside_the_face_box() -> None:
    faces = retinaface().detect_landmarks(photo("astronaut.jpg"))
    assert len(faces) == 1
    face = faces[0]
    assert face.points.shape == (5, 2)
    box = face.box
    assert ((face.points >= [box.x1, box.y1]) & (face.points <= [box.x2, box.y2])).all()
    left_eye, right_eye, nose, left_mouth, right_mouth = face.points
    assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
    assert retinaface().detect_landmarks(photo("coffee.jpg")) == []


def test_offline_detector_boxes_agree_with_the_box_only_detector() -> None:
    image = photo("astronaut.jpg")
    ours = retinaface().detect(image)
    theirs = retinaface().detector.detect(image)
    assert len(ours) == len(theirs) == 1
    np.testing.assert_allclose(
        [ours[0].x1, ours[0].y1, ours[0].x2, ours[0].y2],
        [theirs[0].x1, theirs[0].y1, theirs[0].x2, theirs[0].y2],
        atol=1e-3,
    )


def test_fit_on_real_photos_equals_a_direct_least_squares_computation() -> None:
    reference = retinaface().detect_landmarks(photo("astronaut.jpg"))[0].points
    frame = retinaface().detect_landmarks(photo("camera.png"))[0].points
    np.testing.assert_allclose(
        fit_similarity(reference, frame).matrix, closed_form_similarity(reference, frame), atol=1e-9
    )
    # LMedS then least squares on its inliers: the direct computation on some 3+ of them.
    robust = fit_similarity_lmeds(reference, frame)
    subsets = [list(s) for k in (5, 4, 3) for s in itertools.combinations(range(5), k)]
    matches = [
        s
        for s in subsets
        if np.allclose(robust.matrix, closed_form_similarity(reference[s], frame[s]), atol=1e-9)
    ]
    assert matches, "the robust fit is not the least-squares fit of any 3+ of the landmarks"


def test_moving_video_made_from_one_photo_recovers_the_known_transforms() -> None:
    # The astronaut at 2× (a ~115 px face, where the small offline detector is precise to a
    # few pixels), moved by known similarities; each frame's fit from the reference's
    # landmarks must recover its transform.
    image = photo("astronaut.jpg", upscale=2.0)
    size = image.shape[:2]
    centre = np.array([size[1] / 2, size[0] / 2])
    reference = swap_reference(image, retinaface())
    assert reference.landmarks is not None
    motions = [(1.0, 0.0, (0, 0)), (0.9, 10.0, (40, -10)), (1.15, -12.0, (-60, 20)), (0.85, 20.0, (50, 50))]
    frames, truths = [], []
    for scale, angle, shift in motions:
        truth = about_centre(scale, angle, shift, centre)
        frames.append(np.clip(np.rint(warp_affine(image, truth, size)), 0, 255).astype(np.uint8))
        truths.append(truth)
    eye_distance = np.linalg.norm(reference.landmarks[1] - reference.landmarks[0])
    for frame, truth, (scale, angle, _) in zip(frames, truths, motions, strict=True):
        face = retinaface().detect_landmarks(frame)[0]
        fitted = fit_similarity_lmeds(reference.landmarks, face.points)
        assert fitted is not None
        assert fitted.scale == pytest.approx(scale, rel=0.05)
        assert fitted.angle_deg == pytest.approx(angle, abs=4.0)
        moved = np.linalg.norm(fitted.apply(reference.landmarks) - truth.apply(reference.landmarks), axis=1)
        assert moved.max() < 0.15 * eye_distance * scale
    # The whole video goes through the landmark path, and the pasted face lands where the
    # transformed reference is: the mask's centroid follows the known motion.
    swapped = FacePaster(retinaface()).paste_video(np.stack(frames), reference)
    assert swapped.paths == ("landmarks",) * len(frames)
    ref_ys, ref_xs = np.nonzero(reference.alpha > 128)
    ref_centroid = np.array([ref_xs.mean(), ref_ys.mean()])
    for mask, truth in zip(swapped.masks, truths, strict=True):
        ys, xs = np.nonzero(mask > 128)
        expected = truth.apply(ref_centroid[None])[0]
        assert np.linalg.norm([xs.mean() - expected[0], ys.mean() - expected[1]]) < 0.15 * eye_distance


def constant_scrfd(path: Path, with_keypoints: bool = True) -> None:
    """An ONNX model with SCRFD's signature whose outputs ignore the image: one face, scored
    0.9, from anchor 0 of the stride-16 cell (row 10, column 20), centre (320, 160) in the
    640×640 input; box distances (2, 3, 2, 4) and keypoint offsets `SCRFD_KPS` in stride units."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    nodes, inits, outputs = [], [], []
    heads = [("score", 1), ("box", 4)] + ([("kps", 10)] if with_keypoints else [])
    for head, width in heads:
        for stride in (8, 16, 32):
            n = (640 // stride) ** 2 * 2
            value = np.zeros((n, width), np.float32)
            if stride == 16:
                value[(10 * 40 + 20) * 2] = {"score": [0.9], "box": [2, 3, 2, 4], "kps": SCRFD_KPS.ravel()}[
                    head
                ]
            inits.append(
                helper.make_tensor(f"c_{head}{stride}", TensorProto.FLOAT, value.shape, value.ravel())
            )
            nodes.append(helper.make_node("Identity", [f"c_{head}{stride}"], [f"{head}{stride}"]))
            outputs.append(
                helper.make_tensor_value_info(f"{head}{stride}", TensorProto.FLOAT, list(value.shape))
            )
    graph = helper.make_graph(
        nodes,
        "constant_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 640, 640])],
        outputs,
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


SCRFD_KPS = np.array([[-1.0, -1.0], [1.0, -1.0], [0.0, 0.5], [-0.8, 1.5], [0.8, 1.5]])


def test_scrfd_keypoints_are_decoded_in_image_pixels(tmp_path: Path) -> None:
    constant_scrfd(tmp_path / SCRFD_FILE)
    detector = ScrfdLandmarkDetector(ScrfdDetector(tmp_path / SCRFD_FILE))
    image = np.zeros((600, 800, 3), np.uint8)  # scaled by 640 / 800 = 0.8 into the input
    faces = detector.detect_landmarks(image)
    assert len(faces) == 1
    centre = np.array([320.0, 160.0])
    np.testing.assert_allclose(faces[0].points, (centre + SCRFD_KPS * 16) / 0.8, atol=1e-4)
    box = faces[0].box
    np.testing.assert_allclose(
        [box.x1, box.y1, box.x2, box.y2], np.array([288, 112, 352, 224]) / 0.8, atol=1e-4
    )
    assert box.score == pytest.approx(0.9)
    # the same box as the box-only detector
    only = detector.detector.detect(image)[0]
    np.testing.assert_allclose(
        [only.x1, only.y1, only.x2, only.y2], [box.x1, box.y1, box.x2, box.y2], atol=1e-3
    )


def test_scrfd_without_keypoint_head_is_a_face_model_error(tmp_path: Path) -> None:
    constant_scrfd(tmp_path / SCRFD_FILE, with_keypoints=False)
    with pytest.raises(FaceModelError, match="no keypoint head"):
        ScrfdLandmarkDetector(ScrfdDetector(tmp_path / SCRFD_FILE))


# ---------------------------------------------------------------- the similarity fit


@pytest.mark.parametrize(
    ("scale", "angle", "tx", "ty"),
    [(1.0, 0.0, 0.0, 0.0), (2.3, 37.0, -40.0, 12.5), (0.4, -170.0, 300.0, 80.0)],
)
def test_exact_landmarks_give_the_exact_transform(scale: float, angle: float, tx: float, ty: float) -> None:
    truth = Similarity.from_params(scale, angle, tx, ty)
    target = truth.apply(TEMPLATE)
    for fit in (fit_similarity, fit_similarity_lmeds):
        np.testing.assert_allclose(fit(TEMPLATE, target).matrix, truth.matrix, atol=1e-9)
    assert truth.scale == pytest.approx(scale) and truth.angle_deg == pytest.approx(angle)


def test_least_squares_equals_the_closed_form_with_noise() -> None:
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 500, (7, 2))
    dst = Similarity.from_params(0.7, 25, 10, -3).apply(src) + rng.normal(0, 2.0, (7, 2))
    np.testing.assert_allclose(fit_similarity(src, dst).matrix, closed_form_similarity(src, dst), atol=1e-9)


@pytest.mark.parametrize("wrong", [[2], [0], [4], [1, 3], [2, 4]])
def test_outlier_landmarks_do_not_break_lmeds(wrong: list[int]) -> None:
    truth = Similarity.from_params(1.3, -20, 55, 40)
    target = truth.apply(TEMPLATE)
    target[wrong] += np.array([[90.0, -140.0], [-60.0, 75.0]])[: len(wrong)]
    robust = fit_similarity_lmeds(TEMPLATE, target)
    np.testing.assert_allclose(robust.matrix, truth.matrix, atol=1e-9)
    # plain least squares is dragged away by the same outliers
    assert np.abs(fit_similarity(TEMPLATE, target).matrix - truth.matrix).max() > 1.0


def test_lmeds_ignores_outliers_among_noisy_landmarks() -> None:
    rng = np.random.default_rng(7)
    truth = Similarity.from_params(0.9, 12, -15, 30)
    target = truth.apply(TEMPLATE) + rng.normal(0, 0.5, (5, 2))
    target[3] += [45.0, 30.0]
    robust = fit_similarity_lmeds(TEMPLATE, target)
    inliers = [0, 1, 2, 4]
    np.testing.assert_allclose(
        robust.matrix, closed_form_similarity(TEMPLATE[inliers], target[inliers]), atol=1e-9
    )


def test_lmeds_is_deterministic() -> None:
    rng = np.random.default_rng(11)
    target = Similarity.from_params(1.1, 5, 3, 4).apply(TEMPLATE) + rng.normal(0, 3.0, (5, 2))
    results = {fit_similarity_lmeds(TEMPLATE, target).matrix.tobytes() for _ in range(5)}
    assert len(results) == 1


def test_degenerate_landmarks_give_no_transform() -> None:
    same = np.tile([[10.0, 20.0]], (5, 1))
    assert fit_similarity(same, TEMPLATE) is None
    assert fit_similarity_lmeds(same, TEMPLATE) is None


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (np.zeros((5, 3)), np.zeros((5, 3))),
        (np.zeros((5, 2)), np.zeros((4, 2))),
        (np.zeros((1, 2)), np.zeros((1, 2))),
    ],
)
def test_malformed_landmarks_are_refused(src: np.ndarray, dst: np.ndarray) -> None:
    with pytest.raises(InvalidRequestError):
        fit_similarity_lmeds(src, dst)


def test_transforms_compose() -> None:
    first, second = Similarity.from_params(2, 30, 1, 2), Similarity.from_params(0.5, -10, -3, 7)
    np.testing.assert_allclose(
        first.then(second).apply(TEMPLATE), second.apply(first.apply(TEMPLATE)), atol=1e-9
    )


# ---------------------------------------------------------------- warping and pasting


def test_identity_warp_returns_the_image() -> None:
    image = photo("astronaut.jpg")
    out = warp_affine(image, Similarity.from_params(1, 0, 0, 0), image.shape[:2])
    np.testing.assert_array_equal(out, image.astype(np.float32))


def test_integer_shift_moves_pixels_and_fills_zeros() -> None:
    image = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
    out = warp_affine(image, Similarity.from_params(1, 0, 3, 2), (6, 8))
    np.testing.assert_allclose(out[2:, 3:], image[:4, :5], atol=1e-5)
    assert (out[:2] == 0).all() and (out[:, :3] == 0).all()


def test_half_pixel_shift_interpolates_bilinearly() -> None:
    image = np.array([[0.0, 10.0, 20.0], [30.0, 40.0, 50.0]])
    out = warp_affine(image, Similarity.from_params(1, 0, -0.5, -0.5), (2, 3))
    assert out[0, 0] == pytest.approx(20.0)  # mean of 0, 10, 30, 40
    assert out[0, 1] == pytest.approx(30.0)
    assert out[1, 2] == pytest.approx(12.5)  # only 50 inside, weight 1/4; the rest is border 0


def test_ninety_degree_turn_matches_numpy() -> None:
    image = photo("astronaut.jpg")[:100, :60]
    # counter-clockwise by 90° as displayed: (x, y) → (y, 59 − x)
    turn = Similarity(np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 59.0]]))
    assert turn.angle_deg == pytest.approx(90.0)
    out = warp_affine(image, turn, (60, 100))
    np.testing.assert_allclose(out, np.rot90(image).astype(np.float32), atol=1e-3)


@pytest.mark.parametrize(
    "transform",
    [
        Similarity.from_params(0.3, 10, 300, 100),  # small, inside
        Similarity.from_params(1.7, -35, -60, 40),  # large, partly outside
        Similarity.from_params(0.8, 180, 500, 900),  # mostly outside
        Similarity.from_params(1.0, 0, 2000, 0),  # entirely outside
    ],
)
def test_warp_equals_an_independent_bilinear_resampling(transform: Similarity) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    image = np.random.default_rng(5).uniform(0, 255, (90, 70, 2))
    out = warp_affine(image, transform, (240, 320))
    inverse = np.linalg.inv(np.vstack([transform.matrix, [0, 0, 1]]))[:2]
    ys, xs = np.mgrid[0:240, 0:320].astype(np.float64)
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    for c in range(2):
        expected = ndimage.map_coordinates(image[..., c], [sy, sx], order=1, mode="grid-constant", cval=0.0)
        np.testing.assert_allclose(out[..., c], expected, atol=1e-3)


def test_paste_is_the_alpha_blend_rounded() -> None:
    frame = np.full((2, 2, 3), 100, np.uint8)
    face = np.full((2, 2, 3), 201.0)
    alpha = np.array([[0, 255], [51, 128]], np.uint8)
    out = paste(frame, face, alpha)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], [[100, 201], [120, np.rint(100 + 101 * 128 / 255)]])


# ---------------------------------------------------------------- masks


def test_landmark_soft_mask_covers_the_face_and_fades_out() -> None:
    points = TEMPLATE * 2 + 50  # a face about 200 px tall in a 320 × 300 image
    mask = landmark_soft_mask(320, 300, points)
    assert mask.shape == (320, 300) and mask.dtype == np.uint8
    for x, y in points:  # every landmark is well inside
        assert mask[round(y), round(x)] == 255
    assert mask[0, 0] == 0 and mask[-1, -1] == 0
    # the edge is soft: some values strictly between 0 and 255
    assert ((mask > 0) & (mask < 255)).sum() > 100


def test_landmark_soft_mask_turns_with_the_face() -> None:
    centre = np.array([149.5, 149.5])  # np.rot90 turns a 300 × 300 image about its centre pixel
    points = TEMPLATE * 2 + 94
    upright = landmark_soft_mask(300, 300, points)
    turned_points = about_centre(1.0, 90.0, (0, 0), centre).apply(points)
    turned = landmark_soft_mask(300, 300, turned_points)
    # turning the landmarks by 90° turns the mask (counter-clockwise as displayed)
    assert np.abs(np.rot90(upright).astype(int) - turned.astype(int)).max() <= 1


def test_box_soft_mask_is_the_inscribed_ellipse() -> None:
    mask = box_soft_mask(100, 120, FaceBox(20, 10, 100, 90, 0.9))
    assert mask[50, 60] == 255
    assert mask[10, 20] == 0 and mask[89, 99] == 0
    assert mask[50, 21] < 128 and mask[50, 30] > 128


def test_official_box_arithmetic() -> None:
    # corners truncated: 100, 80, 180, 200; centre (140, 140); side int(120 × 1.5) = 180
    assert face_square(FaceBox(100.7, 80.2, 180.9, 200.5, 0.9), 640, 480) == (50, 50, 230, 230)
    assert face_square(FaceBox(5, 20, 65, 100, 0.9), 300, 150) == (0, 0, 95, 120)


class CentreParser(torch.nn.Module):
    """A stand-in parser: class 1 (skin) in a centred square of half the crop, background
    elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        logits = torch.zeros(1, 19, h, w)
        logits[:, 0] = 1.0
        logits[:, 1, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 2.0
        return logits


def test_parser_mask_keeps_face_classes_dilated_and_blurred() -> None:
    crop = np.zeros((128, 128, 3), np.uint8)
    mask = parser_face_mask(CentreParser(), crop)
    assert mask.shape == (128, 128)
    assert mask[64, 64] == 255 and mask[0, 0] == 0
    # dilated by ~5/512 of the crop and blurred: a little wider than the class region, soft
    assert mask[64, 31] > 100 and mask[64, 24] < 30
    assert ((mask > 0) & (mask < 255)).sum() > 0


# ---------------------------------------------------------------- the frame paster


def test_frames_without_a_face_are_untouched() -> None:
    frames = np.stack([photo("coffee.jpg")] * 3)
    reference = SwapReference(photo("astronaut.jpg"), np.full((320, 320), 255, np.uint8), TEMPLATE)
    swapped = FacePaster(retinaface()).paste_video(frames, reference)
    np.testing.assert_array_equal(swapped.frames, frames)
    assert (swapped.masks == 0).all() and swapped.masks.shape == (3, 160, 240)
    assert swapped.paths == ("none",) * 3


def test_low_score_faces_are_ignored() -> None:
    frame = np.full((64, 64, 3), 90, np.uint8)
    reference = SwapReference(np.zeros((112, 112, 3), np.uint8), np.full((112, 112), 255, np.uint8), TEMPLATE)
    paster = FacePaster(FixedLandmarks([face_at(TEMPLATE * 0.5, score=0.5)]))
    out, mask, path = paster.paste_frame(frame, reference)
    assert path == "none" and (out == frame).all() and (mask == 0).all()


def test_landmark_path_pastes_the_warped_reference_with_its_alpha() -> None:
    ref_rgb = np.zeros((112, 112, 3), np.uint8)
    ref_rgb[..., 0] = 250
    alpha = landmark_soft_mask(112, 112, TEMPLATE)
    reference = SwapReference(ref_rgb, alpha, TEMPLATE)
    truth = Similarity.from_params(1.5, 15, 60, 40)
    frame = np.full((240, 260, 3), 30, np.uint8)
    paster = FacePaster(FixedLandmarks([face_at(truth.apply(TEMPLATE))]))
    out, mask, path = paster.paste_frame(frame, reference)
    assert path == "landmarks"
    expected_alpha = warp_affine(alpha, truth, (240, 260))
    np.testing.assert_array_equal(mask, np.rint(expected_alpha).astype(np.uint8))
    np.testing.assert_array_equal(out, paste(frame, warp_affine(ref_rgb, truth, (240, 260)), expected_alpha))
    nose = np.rint(truth.apply(TEMPLATE[2:3])[0]).astype(int)
    assert out[nose[1], nose[0], 0] == 250 and mask[nose[1], nose[0]] == 255
    assert (out[mask == 0] == 30).all()


def test_reference_without_landmarks_takes_the_box_path() -> None:
    reference = SwapReference(
        np.full((64, 64, 3), 200, np.uint8), np.full((64, 64), 255, np.uint8), landmarks=None
    )
    face = FaceLandmarks(FaceBox(40.0, 30.0, 80.0, 90.0, 0.95), TEMPLATE)
    frame = np.full((160, 140, 3), 20, np.uint8)
    for parser in (None, CentreParser()):
        out, mask, path = FacePaster(FixedLandmarks([face]), parser=parser).paste_frame(frame, reference)
        assert path == "box"
        left, top, right, bottom = face_square(face.box, 140, 160)  # (15, 15, 105, 105)
        outside = np.ones(mask.shape, bool)
        outside[top:bottom, left:right] = False
        assert (mask[outside] == 0).all() and (out[outside] == 20).all()
        centre = ((top + bottom) // 2, (left + right) // 2)
        assert mask[centre] == 255 and out[centre][0] == 200


def test_reference_from_a_real_photo_without_a_parser() -> None:
    image = photo("astronaut.jpg")
    reference = swap_reference(image, retinaface())
    assert reference.landmarks is not None
    np.testing.assert_array_equal(reference.alpha, landmark_soft_mask(320, 320, reference.landmarks))
    background = np.zeros((320, 320), bool)
    background[:, :100] = True
    parsed = swap_reference(image, retinaface(), background=background)
    assert (parsed.alpha[:, :100] == 0).all() and (parsed.alpha[:, 100:] == 255).all()
    blank = swap_reference(np.full((64, 64, 3), 255, np.uint8), retinaface())
    assert blank.landmarks is None


def test_pasting_is_deterministic() -> None:
    frames = np.stack([photo("astronaut.jpg")] * 2)
    reference = swap_reference(photo("camera.png"), retinaface())
    paster = FacePaster(retinaface())
    first, second = paster.paste_video(frames, reference), paster.paste_video(frames, reference)
    np.testing.assert_array_equal(first.frames, second.frames)
    np.testing.assert_array_equal(first.masks, second.masks)
    np.testing.assert_array_equal(first.frames[0], first.frames[1])


def test_malformed_frames_are_refused() -> None:
    reference = SwapReference(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8), None)
    with pytest.raises(InvalidRequestError):
        FacePaster(FixedLandmarks([])).paste_video(np.zeros((2, 8, 8), np.uint8), reference)


# ---------------------------------------------------------------- SDEdit


def official_sigmas(num_steps: int, strength: float, shift: float) -> np.ndarray:
    """The official SDEdit schedule in float64: linspace(s, 0, N + 1)[:-1], then the shift."""
    u = np.linspace(strength, 0.0, num_steps + 1, dtype=np.float64)[:-1]
    return shift * u / (1 + (shift - 1) * u)


@pytest.mark.parametrize("strength", [0.85, 1.0, 0.3, 0.05])
@pytest.mark.parametrize("num_steps", [1, 4, 20])
@pytest.mark.parametrize("shift", [5.0, 1.0, 3.0])
def test_schedule_equals_the_official_formula(strength: float, num_steps: int, shift: float) -> None:
    schedule = sdedit_schedule(num_steps, strength, shift)
    expected = official_sigmas(num_steps, strength, shift)
    assert schedule.sigmas.shape == (num_steps + 1,)
    np.testing.assert_allclose(schedule.sigmas[:-1].double().numpy(), expected, rtol=0, atol=2e-7)
    assert schedule.sigmas[-1].item() == 0.0
    np.testing.assert_allclose(schedule.timesteps.double().numpy(), 1000 * expected, rtol=0, atol=2e-4)


def test_default_strength_is_the_official_0_85() -> None:
    schedule = sdedit_schedule(20)
    assert schedule.sigmas[0].item() == pytest.approx(5 * 0.85 / (1 + 4 * 0.85), abs=1e-7)


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.01, float("nan")])
def test_strength_outside_zero_one_is_refused(strength: float) -> None:
    with pytest.raises(InvalidRequestError, match="denoising_strength"):
        sdedit_schedule(20, strength)


def test_start_latents_equal_the_official_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(1, 16, 3, 4, 6, generator=gen)
    noise = torch.randn(1, 16, 3, 4, 6, generator=gen)
    schedule = sdedit_schedule(20, 0.85)
    start = sdedit_start_latents(schedule, clean, noise)
    s0 = official_sigmas(20, 0.85, 5.0)[0]
    expected = (1 - s0) * clean.double() + s0 * noise.double()
    np.testing.assert_allclose(start.double().numpy(), expected.numpy(), rtol=0, atol=1e-6)


def test_hard_mask_is_the_official_threshold_on_the_nearest_exact_grid() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (9, 24, 40), dtype=np.uint8)
    video = np.stack([pixels, np.zeros_like(pixels), np.full_like(pixels, 255)], axis=-1)  # channel 0 counts
    hard = hard_latent_mask(video, (1, 16, 3, 3, 5))
    assert hard.shape == (1, 1, 3, 3, 5) and hard.dtype == torch.float32

    def nearest(out: int, size: int) -> np.ndarray:  # nearest-exact: floor((i + 0.5) · in / out)
        return np.minimum(np.floor((np.arange(out) + 0.5) * size / out).astype(int), size - 1)

    sampled = pixels[np.ix_(nearest(3, 9), nearest(3, 24), nearest(5, 40))].astype(np.float64)
    expected = (sampled * (2 / 255) - 1) > 0.5  # the official [-1, 1] mapping, then > 0.5
    np.testing.assert_array_equal(hard[0, 0].numpy(), expected.astype(np.float32))


def test_hard_mask_threshold_is_192() -> None:
    mask = np.array([[[191, 192]]], np.uint8)
    np.testing.assert_array_equal(hard_latent_mask(mask, (1, 1, 2))[0, 0].numpy(), [[[0.0, 1.0]]])


def test_background_consistency_restores_the_input_outside_the_mask() -> None:
    gen = torch.Generator().manual_seed(1)
    shape = (1, 16, 3, 4, 6)
    clean = torch.randn(shape, generator=gen)
    noise = torch.randn(shape, generator=gen)
    face_pixels = np.zeros((9, 32, 48), np.uint8)
    face_pixels[:, 8:24, 16:40] = 255
    hard = hard_latent_mask(face_pixels, shape)
    schedule = sdedit_schedule(6, 0.85)
    keeper = BackgroundConsistency(schedule, clean, noise, hard)
    latents = sdedit_start_latents(schedule, clean, noise)
    inside, outside = hard.expand(shape) > 0.5, hard.expand(shape) < 0.5
    assert inside.any() and outside.any()
    for i in range(len(schedule)):
        velocity = torch.randn(shape, generator=gen)  # any model output
        latents = keeper.apply(schedule.step(velocity, i, latents), i)
        if i < len(schedule) - 1:
            sigma = float(schedule.sigmas[i + 1])
            expected = (1 - sigma) * clean.double() + sigma * noise.double()
            np.testing.assert_allclose(
                latents[outside].double().numpy(), expected[outside].numpy(), atol=1e-6
            )
    assert torch.equal(latents[outside], clean[outside])  # exactly the input latents
    assert not torch.allclose(latents[inside], clean[inside])


def test_background_consistency_checks_shapes() -> None:
    schedule = sdedit_schedule(4)
    with pytest.raises(InvalidRequestError):
        BackgroundConsistency(
            schedule, torch.zeros(1, 16, 2, 4, 4), torch.zeros(1, 16, 2, 4, 5), torch.ones(1, 1, 2, 4, 4)
        )
    with pytest.raises(InvalidRequestError):
        BackgroundConsistency(
            schedule, torch.zeros(1, 16, 2, 4, 4), torch.zeros(1, 16, 2, 4, 4), torch.ones(1, 1, 3, 4, 4)
        )
    keeper = BackgroundConsistency(
        schedule, torch.zeros(1, 16, 2, 4, 4), torch.zeros(1, 16, 2, 4, 4), torch.ones(1, 1, 2, 4, 4)
    )
    with pytest.raises(InvalidRequestError):
        keeper.apply(torch.zeros(1, 16, 2, 4, 4), 4)
