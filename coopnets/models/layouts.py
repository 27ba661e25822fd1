"""Stage layouts: how to run a timm backbone one block at a time.

timm's ``forward_intermediates(..., stop_early=True)`` runs a backbone *up to* a
stage. Three features need more control:

* the ``blocks`` depth plan skips blocks *inside* every stage (EKD's depth-level
  sub-networks);
* ``exit_points="blocks"`` puts exit heads after blocks inside stages
  (:attr:`StageLayout.block_ends`, :meth:`StageLayout.block_info`);
* early exit with batch compaction resumes a forward pass where the previous exit
  stopped, on fewer samples.

:class:`~coopnets.models.runners.layout.LayoutRunner` drives a layout for all of them
(and for every depth of an ``exits``-plan model of these families).

A :class:`StageLayout` describes a backbone family as ``stem -> stages of blocks ->
finish`` so a runner can start and stop anywhere between blocks. Its intermediate
features are, by construction and by test, identical to the ones timm's
``forward_intermediates`` returns (NCHW, no final norm), so exit heads trained on
one path work on the other.

Families with a layout: ResNet, ConvNeXt, EfficientNet, MobileNetV3, RegNet,
VisionTransformer, SwinTransformer. Others still get the ``exits`` plan through
``forward_intermediates``; asking them for blocks or early exit raises an error that
lists these families.
"""
from __future__ import annotations

import copy
import itertools
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._utils import default_input_size

Position = Tuple[int, int]  # (stage index, number of blocks of that stage already run)


class StageLayout:
    """Block-level view of a backbone. Subclasses fill in the family specifics.

    Attributes:
        backbone: the wrapped timm model.
        stages: the blocks of every stage, in execution order.
        feature_ends: for every ``feature_info`` index, the position right after the
            block whose output timm reports as that feature (``None`` for the stem).
        grad_checkpointing: :meth:`run` recomputes every block in the backward pass
            (``torch.utils.checkpoint``) when gradients are on.
    """

    family: str = ""

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone
        self.stages: List[List[nn.Module]] = self._stages()
        self.feature_ends: List[Optional[Position]] = self._feature_ends()
        self.grad_checkpointing = False

    # --- family specifics -------------------------------------------------------
    def _stages(self) -> List[List[nn.Module]]:
        raise NotImplementedError

    def _feature_ends(self) -> List[Optional[Position]]:
        raise NotImplementedError

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def enter(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """Work done at the start of a stage before its first block (downsampling)."""
        return x

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Turn the last stage's output into what ``forward_features`` returns."""
        return x

    def to_nchw(self, x: torch.Tensor, image_hw: Tuple[int, int]) -> torch.Tensor:
        """Turn a stage output into the NCHW map ``forward_intermediates`` reports."""
        return x

    def truncate(self, model: nn.Module, blocks_per_stage: Sequence[int]) -> None:
        """Structurally drop the trailing blocks of every stage of ``model`` (a copy of the backbone)."""
        raise NotImplementedError

    # --- generic runner ---------------------------------------------------------
    def call_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``block(x)``, checkpointed when :attr:`grad_checkpointing` is on and gradients are recorded."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def run(self, x: torch.Tensor, start: Position, stop: Position) -> torch.Tensor:
        """Run blocks from position ``start`` (exclusive of work already done) to ``stop``."""
        stage, done = start
        while (stage, done) < stop:
            if done == len(self.stages[stage]):
                stage, done = stage + 1, 0
                continue
            if done == 0:
                x = self.enter(stage, x)
            x = self.call_block(self.stages[stage][done], x)
            done += 1
        return x

    def run_blocks(self, x: torch.Tensor, blocks_per_stage: Sequence[int]) -> List[torch.Tensor]:
        """Run every stage with only its first ``blocks_per_stage[s]`` blocks; returns each stage's output."""
        outs = []
        for stage, n in enumerate(blocks_per_stage):
            x = self.enter(stage, x)
            for block in self.stages[stage][:n]:
                x = self.call_block(block, x)
            outs.append(x)
        return outs

    @property
    def end(self) -> Position:
        return len(self.stages) - 1, len(self.stages[-1])

    @property
    def block_ends(self) -> List[Position]:
        """The position right after every block, in execution order (the last one is :attr:`end`)."""
        return [(stage, done) for stage, blocks in enumerate(self.stages) for done in range(1, len(blocks) + 1)]

    def input_hw(self) -> Tuple[int, int]:
        """The image size the backbone was built for: its patch embedding's ``img_size`` (fixed-size
        transformers), else its pretrained config's ``input_size``."""
        img_size = getattr(getattr(self.backbone, "patch_embed", None), "img_size", None)
        if img_size is None:
            img_size = default_input_size(self.backbone.pretrained_cfg)[-2:]
        return int(img_size[0]), int(img_size[1])

    def block_info(self, in_chans: int) -> List[Dict[str, Any]]:
        """``feature_info``-style entries for every block end (:attr:`block_ends`): ``num_chs`` and
        ``reduction`` of the NCHW map :meth:`to_nchw` makes of it, and the block's ``module`` name.

        The shapes come from one pass of a weightless copy of the backbone on the meta device
        (nothing is computed or allocated) on an ``in_chans`` x :meth:`input_hw` image.

        Example:
            >>> import timm
            >>> info = get_layout(timm.create_model("resnet18")).block_info(in_chans=3)
            >>> [(f["module"], f["num_chs"], f["reduction"]) for f in info[1:4]]
            [('layer1.1', 64, 4), ('layer2.0', 128, 8), ('layer2.1', 128, 8)]
        """
        names = {id(m): name for name, m in self.backbone.named_modules()}
        shadow = type(self)(_meta_copy(self.backbone).eval())
        hw = self.input_hw()
        info: List[Dict[str, Any]] = []
        with torch.no_grad():
            x, start = shadow.stem(torch.empty(1, in_chans, *hw, device="meta")), (0, 0)
            for stage, done in self.block_ends:
                x, start = shadow.run(x, start, (stage, done)), (stage, done)
                fmap = shadow.to_nchw(x, hw)
                info.append({"num_chs": int(fmap.shape[1]), "reduction": round(hw[0] / fmap.shape[2]),
                             "module": names[id(self.stages[stage][done - 1])]})
        return info


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are empty tensors on the meta device
    (for shape probes; no tensor data is copied)."""
    memo: Dict[int, Any] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def _seq(module: nn.Module) -> List[nn.Module]:
    return list(module.children()) if isinstance(module, nn.Sequential) else [module]


def _keep_first(seq: nn.Sequential, n: int) -> nn.Sequential:
    return nn.Sequential(*list(seq.children())[:n])


class ResNetLayout(StageLayout):
    family = "resnet"
    names = ("layer1", "layer2", "layer3", "layer4")

    def _stages(self):
        return [_seq(getattr(self.backbone, n)) for n in self.names]

    def _feature_ends(self):
        return [None] + [(i, len(s)) for i, s in enumerate(self.stages)]

    def stem(self, x):
        b = self.backbone
        return b.maxpool(b.act1(b.bn1(b.conv1(x))))

    def truncate(self, model, blocks_per_stage):
        for name, n in zip(self.names, blocks_per_stage):
            setattr(model, name, _keep_first(getattr(model, name), n))


class ConvNeXtLayout(StageLayout):
    family = "convnext"

    def _stages(self):
        return [_seq(s.blocks) for s in self.backbone.stages]

    def _feature_ends(self):
        return [(i, len(s)) for i, s in enumerate(self.stages)]

    def stem(self, x):
        return self.backbone.stem(x)

    def enter(self, stage, x):
        return self.backbone.stages[stage].downsample(x)

    def finish(self, x):
        return self.backbone.norm_pre(x)

    def truncate(self, model, blocks_per_stage):
        for stage, n in zip(model.stages, blocks_per_stage):
            stage.blocks = _keep_first(stage.blocks, n)


class SwinLayout(ConvNeXtLayout):
    family = "swin"

    def _stages(self):
        return [_seq(s.blocks) for s in self.backbone.layers]

    def stem(self, x):
        return self.backbone.patch_embed(x)

    def enter(self, stage, x):
        return self.backbone.layers[stage].downsample(x)

    def finish(self, x):
        return self.backbone.norm(x)

    def to_nchw(self, x, image_hw):
        return x.permute(0, 3, 1, 2).contiguous()

    def truncate(self, model, blocks_per_stage):
        for stage, n in zip(model.layers, blocks_per_stage):
            stage.blocks = _keep_first(stage.blocks, n)


class EfficientNetLayout(StageLayout):
    """EfficientNet and MobileNetV3: ``conv_stem, bn1, blocks[i]...``; feature ends via ``stage_ends``."""

    family = "efficientnet"

    def _stages(self):
        return [_seq(s) for s in self.backbone.blocks]

    def _feature_ends(self):
        ends = []
        for stage_end in self.backbone.stage_ends:
            ends.append(None if stage_end == 0 else (stage_end - 1, len(self.stages[stage_end - 1])))
        return ends

    def stem(self, x):
        return self.backbone.bn1(self.backbone.conv_stem(x))

    def finish(self, x):
        b = self.backbone
        if hasattr(b, "bn2"):  # EfficientNet folds its head conv into forward_features
            x = b.bn2(b.conv_head(x))
        return x

    def truncate(self, model, blocks_per_stage):
        for i, n in enumerate(blocks_per_stage):
            model.blocks[i] = _keep_first(model.blocks[i], n)


class RegNetLayout(StageLayout):
    family = "regnet"
    names = ("s1", "s2", "s3", "s4")

    def _stages(self):
        return [list(getattr(self.backbone, n).children()) for n in self.names]

    def _feature_ends(self):
        return [None] + [(i, len(s)) for i, s in enumerate(self.stages)]

    def stem(self, x):
        return self.backbone.stem(x)

    def finish(self, x):
        return self.backbone.final_conv(x)

    def truncate(self, model, blocks_per_stage):
        for name, n in zip(self.names, blocks_per_stage):
            stage = getattr(model, name)
            for child in list(stage._modules)[n:]:
                del stage._modules[child]


class VisionTransformerLayout(StageLayout):
    """ViT: one stage of blocks; features are the spatial tokens reshaped to NCHW."""

    family = "vit"

    def _stages(self):
        return [_seq(self.backbone.blocks)]

    def _feature_ends(self):
        return [(0, i + 1) for i in range(len(self.stages[0]))]

    def stem(self, x):
        b = self.backbone
        return b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(x))))

    def finish(self, x):
        return self.backbone.norm(x)

    def to_nchw(self, x, image_hw):
        b = self.backbone
        x = x[:, b.num_prefix_tokens:]
        h, w = b.patch_embed.dynamic_feat_size(image_hw)
        return x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()

    def truncate(self, model, blocks_per_stage):
        model.blocks = _keep_first(model.blocks, blocks_per_stage[0])


_LAYOUTS: Dict[str, Type[StageLayout]] = {
    "ResNet": ResNetLayout,
    "ConvNeXt": ConvNeXtLayout,
    "SwinTransformer": SwinLayout,
    "EfficientNet": EfficientNetLayout,
    "MobileNetV3": EfficientNetLayout,
    "RegNet": RegNetLayout,
    "VisionTransformer": VisionTransformerLayout,
}

LAYOUT_FAMILIES: Tuple[str, ...] = tuple(_LAYOUTS)


def get_layout(backbone: nn.Module, purpose: str = "this feature", instead: str = "plan='exits'") -> StageLayout:
    """The :class:`StageLayout` of ``backbone``; for families without one, a ``NotImplementedError``
    that names ``purpose``, the supported classes and the alternative ``instead``."""
    for cls in type(backbone).__mro__:
        if cls.__name__ in _LAYOUTS:
            return _LAYOUTS[cls.__name__](backbone)
    raise NotImplementedError(
        f"{purpose} needs a block-level layout, and timm class {type(backbone).__name__} has none. "
        f"Supported backbone classes: {', '.join(LAYOUT_FAMILIES)}. Use {instead} "
        f"(works for any timm backbone with forward_intermediates) or add a StageLayout in "
        f"coopnets/models/layouts.py."
    )



def find_layout(backbone: nn.Module) -> Optional[StageLayout]:
    """The :class:`StageLayout` of ``backbone``, or ``None`` for a family without one (a model builds it
    once and hands it to its depth plan).

    Example:
        >>> import timm
        >>> type(find_layout(timm.create_model("resnet18"))).__name__, find_layout(timm.create_model("test_byobnet"))
        ('ResNetLayout', None)
    """
    try:
        return get_layout(backbone)
    except NotImplementedError:
        return None
