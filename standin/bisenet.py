"""BiSeNet face parser (19 CelebAMask-HQ classes), key-compatible with `parsing_bisenet.pth`.

The parameter names follow the file distributed with facexlib, so that the user-supplied
file loads unchanged and strictly: a ResNet-18 context path (`cp.resnet.*`) with attention
refinement on its 1/16 and 1/32 features (`cp.arm16`, `cp.arm32`) and a global-context
branch (`cp.conv_avg`); the 1/8 ResNet feature stands in for the spatial path and is fused
with the context by `ffm`; `conv_out` is the main head, `conv_out16` / `conv_out32` are the
training-time auxiliary heads (kept so that the file's keys match; never run here).

Class 0 is background; hair, neck, clothes, hat etc. have their own classes. The released
weights (CelebAMask-HQ) are for non-commercial research only; we never download them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from standin.checkpoints import load_strict, read_torch_pickle
from standin.errors import CheckpointError, FaceModelError
from standin.face_detectors import check_model_file

log = logging.getLogger(__name__)

NUM_CLASSES = 19
BACKGROUND_CLASS = 0
PARSER_INPUT_SIZE = 512
# The official Stand-In preprocessor feeds the parser (rgb/255 - 0.5) / 0.5, not ImageNet
# statistics; we reproduce its masks, so we use the same.
PARSER_MEAN = 0.5
PARSER_STD = 0.5


class ConvBnRelu(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1×1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + y)


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout))


class ResNet18Features(nn.Module):
    """ResNet-18 trunk returning its 1/8, 1/16 and 1/32 feature maps (128, 256, 512 ch)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _stage(64, 64, 1)
        self.layer2 = _stage(64, 128, 2)
        self.layer3 = _stage(128, 256, 2)
        self.layer4 = _stage(256, 512, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        f8 = self.layer2(self.layer1(x))
        f16 = self.layer3(f8)
        return f8, f16, self.layer4(f16)


class AttentionRefinement(nn.Module):
    """Conv, then reweight channels by a sigmoid of their global average."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = ConvBnRelu(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        weight = torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean((2, 3), keepdim=True))))
        return feat * weight


class ContextPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.resnet = ResNet18Features()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBnRelu(128, 128)
        self.conv_head16 = ConvBnRelu(128, 128)
        self.conv_avg = ConvBnRelu(512, 128, kernel=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, 3, H, W] → (ResNet 1/8 feature [B, 128, H/8, W/8],
        context at 1/8 [B, 128, H/8, W/8])."""
        f8, f16, f32 = self.resnet(x)
        global_ctx = self.conv_avg(f32.mean((2, 3), keepdim=True))  # broadcasts over H, W
        up32 = F.interpolate(self.arm32(f32) + global_ctx, f16.shape[2:], mode="nearest")
        up32 = self.conv_head32(up32)
        up16 = F.interpolate(self.arm16(f16) + up32, f8.shape[2:], mode="nearest")
        return f8, self.conv_head16(up16)


class FeatureFusion(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.convblk = ConvBnRelu(cin, cout, kernel=1)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        weight = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean((2, 3), keepdim=True)))))
        return feat * weight + feat


class SegmentationHead(nn.Module):
    def __init__(self, cin: int, mid: int, num_classes: int) -> None:
        super().__init__()
        self.conv = ConvBnRelu(cin, mid)
        self.conv_out = nn.Conv2d(mid, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """Face parser: image [B, 3, H, W] normalised → class logits [B, 19, H, W]."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = SegmentationHead(256, 256, num_classes)
        # Auxiliary training heads: present in the checkpoint, unused at inference.
        self.conv_out16 = SegmentationHead(128, 64, num_classes)
        self.conv_out32 = SegmentationHead(128, 64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial, context = self.cp(x)
        logits = self.conv_out(self.ffm(spatial, context))
        return F.interpolate(logits, x.shape[2:], mode="bilinear", align_corners=True)


def load_bisenet(path: Path | str, device: str | torch.device = "cpu") -> BiSeNet:
    """Build `BiSeNet` on the meta device and load `parsing_bisenet.pth` into it strictly.

    Any problem with the file (missing, pointer, truncated, wrong keys or shapes) is a
    `FaceModelError` naming the path and what was found.
    """
    path = Path(path)
    check_model_file(path, "BiSeNet face parser weights")
    with torch.device("meta"):
        model = BiSeNet()
    try:
        tensors = read_torch_pickle(path, dtype=torch.float32, device=device)
        # Files saved before BatchNorm counted its batches lack these eval-irrelevant buffers.
        for key, t in model.state_dict().items():
            if key.endswith("num_batches_tracked") and key not in tensors:
                tensors[key] = (torch.zeros((), dtype=t.dtype, device=device), path.name)
        load_strict(model, tensors, expected_in=str(path))
    except CheckpointError as e:
        raise FaceModelError(f"BiSeNet face parser {path}: {e}") from e
    log.info("loaded BiSeNet face parser from %s", path)
    return model.eval()


@torch.no_grad()
def background_mask(model: BiSeNet, image: np.ndarray) -> np.ndarray:
    """Where the parser sees background: RGB uint8 [H, W, 3] → bool [H, W]."""
    param = next(model.parameters())
    x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).to(param.device)
    x = x.permute(2, 0, 1)[None].to(param.dtype) / 255.0
    x = (x - PARSER_MEAN) / PARSER_STD
    labels = model(x).argmax(dim=1)[0]
    return (labels == BACKGROUND_CLASS).cpu().numpy()
